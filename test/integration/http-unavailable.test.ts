/**
 * The database unreachable under a request is answered 503 `unavailable` with Retry-After,
 * not a 500: the request was fine, the client may retry it.
 */
import { afterAll, beforeAll, expect, it } from 'vitest';
import { createSql, type Sql } from '../../src/persistence/db.js';
import { Queries } from '../../src/persistence/queries.js';
import { createTestApp, type TestApp } from '../support/http-app.js';

let t: TestApp;
let dead: Sql;
beforeAll(async () => {
  // A real driver pointed at a port where nothing listens.
  dead = createSql('postgres://postgres@127.0.0.1:1/none', { max: 1, connectTimeoutSec: 2 });
  t = await createTestApp('unavailable', { services: { queries: new Queries(dead) } });
});
afterAll(async () => {
  await dead.end({ timeout: 1 });
  await t.close();
});

it('a request while the database is unreachable gets 503 unavailable and Retry-After', async () => {
  const r = await t.call('GET', '/tickets?limit=5');
  expect(r.status).toBe(503);
  expect(r.body.error).toBe('unavailable');
  expect(r.headers.get('retry-after')).toBe('1');
  expect(r.body.message).toMatch(/database is unavailable/);
});
