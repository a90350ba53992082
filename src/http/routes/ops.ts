/**
 * Operations and inspection: the probes and metrics (`probes.ts`), dead letters, the machine
 * definitions and the OpenAPI document.
 */
import { Hono } from 'hono';
import { DeadLetterQuery, MermaidQuery } from '../../api/schemas.js';
import { NotFound } from '../../errors.js';
import type { Histogram } from '../metrics.js';
import { openApiDocument } from '../openapi.js';
import { validate } from '../request.js';
import type { AppEnv, AppServices } from '../services.js';
import { probeRoutes } from './probes.js';

export function opsRoutes(s: AppServices, httpLatency: Histogram): Hono<AppEnv> {
  const app = new Hono<AppEnv>();

  app.route('/', probeRoutes(s, httpLatency));

  /** Messages a reaction gave up on after max_deliver attempts, newest first, with their error. */
  app.get('/dead-letters', async (c) => {
    const q = validate(DeadLetterQuery, c.req.query(), 'query');
    return c.json({ items: await s.queries.deadLetters(q.limit) });
  });

  app.get('/openapi.json', (c) => c.json(openApiDocument()));

  app.get('/machines', (c) => c.json({ machines: s.machines.list() }));

  /** The definition as the Stately visualizer loads it. */
  app.get('/machines/:name', (c) => {
    const name = c.req.param('name');
    const def = s.machines.definition(name);
    if (def === undefined) throw new NotFound('machine', name.slice(0, 100));
    return c.json(def as object);
  });

  /** Mermaid `stateDiagram-v2` text, `?state=` highlighted (the dashboard draws it). */
  app.get('/machines/:name/mermaid', (c) => {
    const name = c.req.param('name');
    const q = validate(MermaidQuery, c.req.query(), 'query');
    const text = s.machines.mermaid(name, q.state);
    if (text === undefined) throw new NotFound('machine', name.slice(0, 100));
    return c.text(text);
  });

  return app;
}
