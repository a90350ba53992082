/**
 * `createOpsApp(services)`: the listener on OPS_PORT. It serves only the probes and
 * `/metrics`, so a `worker` process, which has no API, can be probed and scraped like the
 * others, and an API's metrics can be read on a port that is not exposed. `/metrics` asks
 * for the bearer token when API_TOKEN is set, as on the API; the probes never do.
 */
import { Hono } from 'hono';
import { bearerAuth, PROBES } from './auth.js';
import { errorHandler } from './errors.js';
import { observeRequest, requestLatency } from './request-latency.js';
import { probeRoutes } from './routes/probes.js';
import type { AppEnv, OpsServices } from './services.js';

const PUBLIC = new Set<string>(PROBES);

export function createOpsApp(s: OpsServices): Hono<AppEnv> {
  const app = new Hono<AppEnv>();
  const latency = requestLatency();
  app.use('*', async (c, next) => {
    const started = performance.now();
    await next();
    observeRequest(latency, c, started);
  });
  app.use(
    '*',
    bearerAuth(s.config.API_TOKEN, (path) => PUBLIC.has(path)),
  );
  app.route('/', probeRoutes(s, latency));
  app.notFound((c) =>
    c.json(
      {
        error: 'not_found',
        message: `no route ${c.req.method} ${c.req.path.slice(0, 200)} (this port serves ${[...PROBES, '/metrics'].join(', ')})`,
      },
      404,
    ),
  );
  app.onError(errorHandler(s.log));
  return app;
}
