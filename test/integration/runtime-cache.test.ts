/**
 * ACTOR_CACHE_MAX_BYTES reaches the actor host the runtime builds: an `api` process fed
 * tasks with large payloads over HTTP holds at most that many bytes of snapshots.
 */
import { afterAll, beforeAll, expect, it } from 'vitest';
import { configWith } from '../../src/config.js';
import { silentLogger } from '../../src/log.js';
import { type Runtime, startRuntime } from '../../src/runtime.js';
import { createTestDatabase, type TestDatabase } from '../support/database.js';
import { NATS_URL, natsAdmin, testNames } from '../support/transport.js';

const CAP = 1024 * 1024;
const names = testNames();
let db: TestDatabase;
let runtime: Runtime;

beforeAll(async () => {
  db = await createTestDatabase('runtime_cache');
  const config = configWith({
    DATABASE_URL: db.url,
    NATS_URL,
    NATS_PREFIX: names.prefix,
    NATS_STREAM: names.stream,
    PORT: '0',
    ACTOR_CACHE_MAX_BYTES: String(CAP),
  });
  runtime = await startRuntime(config, 'api', silentLogger());
});
afterAll(async () => {
  await runtime?.stop();
  const admin = await natsAdmin();
  await admin.close([names]);
  await db?.drop();
});

it('holds at most ACTOR_CACHE_MAX_BYTES of actors', async () => {
  const post = async (path: string, body: unknown) => {
    const res = await fetch(`${runtime.url}${path}`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify(body),
    });
    expect(res.status).toBeLessThan(300);
    return (await res.json()) as { id: string };
  };
  const ticket = await post('/tickets', { title: 'cache' });
  const blob = 'c'.repeat(40_000);
  for (let i = 0; i < 40; i++) {
    await post(`/tickets/${ticket.id}/tasks`, { type: 'x', payload: { i, blob } });
    expect(runtime.host.cachedBytes).toBeLessThanOrEqual(CAP);
  }
  // 40 tasks of ~40 kB are 1.6 MB: the cache is full up to its cap, not beyond.
  expect(runtime.host.cachedBytes).toBeGreaterThan(CAP - 2 * 40_000);
  expect(runtime.host.cachedActors).toBeLessThan(41);
});
