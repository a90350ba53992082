/**
 * Request and response headers read and written on Node's own objects when the app runs on
 * @hono/node-server, and through Hono's web API otherwise (`app.request` in tests, another
 * runtime).
 *
 * Why: on node-server, the first `c.req.header(name)` builds a web `Headers` from every
 * incoming header, and a `c.header()` before the handler answers makes the response carry a
 * `Headers` object, which takes the listener off its plain-object fast path. Together they
 * cost a request more server CPU than the rest of Hono's routing and answering (measured with
 * `npm run bench -- --only http`). Node has already parsed the headers into a plain object,
 * and headers set on its response are merged into the ones the listener writes.
 */
import type { IncomingMessage, ServerResponse } from 'node:http';
import type { Context } from 'hono';

interface NodeBindings {
  incoming?: IncomingMessage;
  outgoing?: ServerResponse;
}

const bindings = (c: Context): NodeBindings | undefined => c.env as NodeBindings | undefined;

/**
 * A request header by its lower-case name. On Node, a repeated header reads as Node joins
 * it: a comma-separated list, or the first for the headers that may appear once
 * (`authorization`, `content-type`, `content-length`...), where the web API would join them.
 */
export function requestHeader(c: Context, name: string): string | undefined {
  const incoming = bindings(c)?.incoming;
  if (!incoming) return c.req.header(name);
  const v = incoming.headers[name];
  return Array.isArray(v) ? v.join(', ') : v;
}

/**
 * Sets a header on the response whatever the handler answers (its own response, the error
 * handler's or the 404's): on Node, the listener's headers win only where they name the same
 * header. Elsewhere, on the response as it stands after the handler ran.
 */
export function setResponseHeader(c: Context, name: string, value: string): void {
  const outgoing = bindings(c)?.outgoing;
  if (outgoing && !outgoing.headersSent) outgoing.setHeader(name, value);
  else c.res.headers.set(name, value);
}

/** The Node request, when there is one: its stream tells whether the body was read. */
export function incomingOf(c: Context): IncomingMessage | undefined {
  return bindings(c)?.incoming;
}
