/**
 * `createApp(services)`: the Hono application of CONTRACT section 2. Cross-cutting concerns
 * live here, in order: request id (X-Request-Id on every response and log line), latency
 * histogram, bearer auth when API_TOKEN is set, body limit; then the routes; then the one
 * error mapping (`errors.ts`) and the 404 fallback.
 */
import { randomUUID } from 'node:crypto';
import { type Context, Hono } from 'hono';
import { bodyLimit } from 'hono/body-limit';
import { bearerAuth, PROBES } from './auth.js';
import { dashboardRoutes } from './dashboard/routes.js';
import { errorHandler, HttpProblem } from './errors.js';
import { incomingOf, requestHeader, setResponseHeader } from './node-io.js';
import { observeRequest, requestLatency } from './request-latency.js';
import { opsRoutes } from './routes/ops.js';
import { outputRoutes } from './routes/output.js';
import { streamRoutes } from './routes/stream.js';
import { taskRoutes } from './routes/tasks.js';
import { ticketRoutes } from './routes/tickets.js';
import { workflowRoutes } from './routes/workflows.js';
import type { AppEnv, AppServices } from './services.js';

export type { AppServices, EventSource, MachineCatalog, Readiness } from './services.js';

const REQUEST_ID = /^[A-Za-z0-9._:-]{1,128}$/;
/** Reachable without a token: probes, and the dashboard's static shell (it asks for one). */
const PUBLIC = new Set([...PROBES, '/', '/favicon.ico']);
const isPublic = (path: string) => PUBLIC.has(path) || path.startsWith('/assets/');

/** Whether the request declared a body that the answer leaves (partly) unread. */
function bodyLeftUnread(c: Context): boolean {
  const length = requestHeader(c, 'content-length');
  const declared = requestHeader(c, 'transfer-encoding') !== undefined || (length ?? '0') !== '0';
  if (!declared) return false;
  const incoming = incomingOf(c);
  return incoming ? !incoming.readableEnded : !c.req.raw.bodyUsed;
}

export function createApp(s: AppServices): Hono<AppEnv> {
  const app = new Hono<AppEnv>();
  const latency = requestLatency();

  app.use('*', async (c, next) => {
    const given = requestHeader(c, 'x-request-id');
    const requestId = given && REQUEST_ID.test(given) ? given : randomUUID();
    c.set('requestId', requestId);
    const started = performance.now();
    await next();
    setResponseHeader(c, 'X-Request-Id', requestId);
    // Left unread, the body would sit on a keep-alive connection until the server gives up
    // draining it and drops the socket under the client's next request.
    if (bodyLeftUnread(c)) setResponseHeader(c, 'Connection', 'close');
    observeRequest(latency, c, started);
  });

  app.use('*', bearerAuth(s.config.API_TOKEN, isPublic));

  const maxBody = s.config.BODY_LIMIT_BYTES;
  const tooLarge = (): never => {
    throw new HttpProblem('payload_too_large', `the body is over the ${maxBody}-byte limit`);
  };
  // Hono's middleware counts a body of unknown length as it reads it. It first turns the
  // request into a web Request with a stream body, which on @hono/node-server cost more
  // than the rest of a request's HTTP handling, so it only sees the bodies that need it.
  const streamedLimit = bodyLimit({ maxSize: maxBody, onError: tooLarge });
  app.use('*', async (c, next) => {
    const method = c.req.method;
    if (method === 'GET' || method === 'HEAD') return next(); // a web Request has no body
    const length = requestHeader(c, 'content-length');
    if (length === undefined || requestHeader(c, 'transfer-encoding') !== undefined) {
      return streamedLimit(c, next);
    }
    // Without a transfer-encoding the body is exactly Content-Length bytes (Node's parser
    // holds the request to it): the header decides, as in the middleware.
    if (Number.parseInt(length, 10) > maxBody) tooLarge();
    return next();
  });

  app.route('/', ticketRoutes(s));
  app.route('/', taskRoutes(s));
  app.route('/', workflowRoutes(s));
  app.route('/', streamRoutes(s));
  app.route('/', outputRoutes(s));
  app.route('/', opsRoutes(s, latency));
  app.route('/', dashboardRoutes());

  app.notFound((c) =>
    c.json(
      { error: 'not_found', message: `no route ${c.req.method} ${c.req.path.slice(0, 200)}` },
      404,
    ),
  );
  app.onError(errorHandler(s.log));
  return app;
}
