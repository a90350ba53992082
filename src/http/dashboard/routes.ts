/**
 * The dashboard: one HTML page, its script and stylesheet, and Mermaid's browser bundle
 * from node_modules, all served locally (no CDN). The page reads the JSON API and the SSE
 * stream like any other client.
 */
import { readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { Hono } from 'hono';
import type { AppEnv } from '../services.js';

const here = (file: string) => new URL(`./${file}`, import.meta.url);

interface Asset {
  body: string;
  type: string;
}

function loader(path: () => string | URL, type: string): () => Asset {
  let asset: Asset | undefined;
  return () => {
    asset ??= { body: readFileSync(path(), 'utf8'), type };
    return asset;
  };
}

const ASSETS: Record<string, () => Asset> = {
  '/': loader(() => here('index.html'), 'text/html; charset=utf-8'),
  '/assets/dashboard.js': loader(() => here('dashboard.js'), 'text/javascript; charset=utf-8'),
  '/assets/dashboard.css': loader(() => here('dashboard.css'), 'text/css; charset=utf-8'),
  '/assets/mermaid.min.js': loader(
    () => createRequire(import.meta.url).resolve('mermaid/dist/mermaid.min.js'),
    'text/javascript; charset=utf-8',
  ),
};

export function dashboardRoutes(): Hono<AppEnv> {
  const app = new Hono<AppEnv>();
  for (const [path, load] of Object.entries(ASSETS)) {
    app.get(path, (c) => {
      const asset = load();
      c.header('Content-Type', asset.type);
      c.header('Cache-Control', path === '/' ? 'no-cache' : 'public, max-age=300');
      return c.body(asset.body);
    });
  }
  return app;
}
