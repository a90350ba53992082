/**
 * The request latency histogram every listener keeps (the API's and OPS_PORT's): one
 * family name and route labelling, so a scrape reads the same figure from either.
 */
import type { Context } from 'hono';
import { Histogram } from './metrics.js';

export function requestLatency(): Histogram {
  return new Histogram(
    'http_request_duration_seconds',
    'HTTP request latency by method, route and status (to the first byte).',
  );
}

/** Records one answered request, `started` from `performance.now()`. */
export function observeRequest(latency: Histogram, c: Context, started: number): void {
  // A request no route matched is one label, not one per path a scanner tries.
  const route = c.res.status === 404 && c.req.routePath === '*' ? 'unmatched' : c.req.routePath;
  latency.observe(
    { method: c.req.method, route, status: String(c.res.status) },
    (performance.now() - started) / 1000,
  );
}
