/**
 * Idempotency keys expire: a key's stored answer is kept IDEMPOTENCY_KEY_TTL_MS and then
 * deleted, a thousand rows per statement, by every process at once without waiting on each
 * other. Within the TTL a retry replays the first answer; after it the same key is a new
 * request. Without this the table grows by a row per keyed POST for as long as it runs.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { silentLogger } from '../../src/log.js';
import type { Sql } from '../../src/persistence/db.js';
import {
  EXPIRY_BATCH,
  expireIdempotencyKeys,
  findStoredResponse,
  IdempotencyExpiry,
  storeResponse,
} from '../../src/persistence/idempotency-rows.js';
import { loadMigrations, migrate } from '../../src/persistence/migrate.js';
import { startApi } from '../support/api-runtime.js';
import { createTestDatabase } from '../support/database.js';
import { createTestApp, type TestApp } from '../support/http-app.js';
import { eventually } from '../support/transport.js';

const DAY_MS = 86_400_000;
let t: TestApp;
beforeAll(async () => {
  t = await createTestApp('idem_expiry');
});
afterAll(() => t?.close());

/** `n` stored keys under `prefix`, created `ageMs` ago. */
async function storedKeys(sql: Sql, prefix: string, n: number, ageMs: number): Promise<void> {
  await sql`insert into idempotency_keys (scope, key, request_hash, status, body, created_at)
    select 'anonymous', ${prefix} || i, 'h', 200, '{}'::jsonb,
      now() - make_interval(secs => ${ageMs / 1000})
    from generate_series(1, ${n}) i`;
}

async function count(sql: Sql, prefix: string): Promise<number> {
  const [row] = await sql<{ n: number }[]>`
    select count(*)::int as n from idempotency_keys where key like ${`${prefix}%`}`;
  return row?.n ?? 0;
}

describe('expireIdempotencyKeys', () => {
  it('replays within the TTL, forgets the key after it, and keeps the younger keys', async () => {
    const key = { 'Idempotency-Key': 'create-once' };
    const first = await t.call('POST', '/tickets', { title: 'once' }, key);
    expect(first.status).toBe(201);
    const young = await t.call('POST', '/tickets', { title: 'young' }, { 'Idempotency-Key': 'y' });
    expect(young.status).toBe(201);

    expect(await expireIdempotencyKeys(t.db.sql, DAY_MS)).toBe(0);
    const replay = await t.call('POST', '/tickets', { title: 'once' }, key);
    expect(replay.body.id).toBe(first.body.id);

    await t.db.sql`update idempotency_keys set created_at = now() - interval '25 hours'
      where key = 'create-once'`;
    expect(await expireIdempotencyKeys(t.db.sql, DAY_MS)).toBe(1);
    const again = await t.call('POST', '/tickets', { title: 'once' }, key);
    expect(again.status).toBe(201);
    expect(again.body.id).not.toBe(first.body.id);
    // The younger key still replays its own answer.
    const youngReplay = await t.call(
      'POST',
      '/tickets',
      { title: 'young' },
      { 'Idempotency-Key': 'y' },
    );
    expect(youngReplay.body.id).toBe(young.body.id);
  });

  it('deletes in batches, and leaves what a run does not reach to the next one', async () => {
    await storedKeys(t.db.sql, 'old-', 2 * EXPIRY_BATCH + 500, 2 * DAY_MS);
    await storedKeys(t.db.sql, 'new-', 10, 60_000);
    expect(await expireIdempotencyKeys(t.db.sql, DAY_MS, { maxBatches: 2 })).toBe(2 * EXPIRY_BATCH);
    expect(await count(t.db.sql, 'old-')).toBe(500);
    expect(await expireIdempotencyKeys(t.db.sql, DAY_MS)).toBe(500);
    expect(await count(t.db.sql, 'old-')).toBe(0);
    expect(await count(t.db.sql, 'new-')).toBe(10);
  });

  it('runs in several processes at once, each row deleted once', async () => {
    await storedKeys(t.db.sql, 'race-', 6_000, 2 * DAY_MS);
    const others = [t.db.pool(2), t.db.pool(2), t.db.pool(2)];
    const deleted = await Promise.all(
      others.map((sql) => expireIdempotencyKeys(sql, DAY_MS, { batch: 200 })),
    );
    expect(deleted.reduce((a, b) => a + b, 0)).toBe(6_000);
    expect(await count(t.db.sql, 'race-')).toBe(0);
  });
});

describe('IdempotencyExpiry', () => {
  it('deletes expired keys in the background and counts them', async () => {
    await storedKeys(t.db.sql, 'bg-', 30, 10_000);
    const expiry = new IdempotencyExpiry(t.db.sql, silentLogger(), {
      ttlMs: 5_000,
      intervalMs: 50,
    });
    expiry.start();
    try {
      await eventually(async () => expect(await count(t.db.sql, 'bg-')).toBe(0));
      expect(expiry.expired).toBeGreaterThanOrEqual(30);
    } finally {
      await expiry.stop();
    }
  });

  it('keeps every key with a TTL of 0', async () => {
    await storedKeys(t.db.sql, 'kept-', 5, 400 * DAY_MS);
    const expiry = new IdempotencyExpiry(t.db.sql, silentLogger(), { ttlMs: 0, intervalMs: 10 });
    expiry.start();
    await new Promise((r) => setTimeout(r, 200));
    await expiry.stop();
    expect(expiry.expired).toBe(0);
    expect(await count(t.db.sql, 'kept-')).toBe(5);
  });
});

describe('the runtime', () => {
  it('expires keys after IDEMPOTENCY_KEY_TTL_MS and counts them in /metrics', async () => {
    const api = await startApi('idem_expiry_runtime', { IDEMPOTENCY_KEY_TTL_MS: '1000' });
    try {
      const post = async () => {
        const r = await fetch(`${api.url}/tickets`, {
          method: 'POST',
          headers: { 'content-type': 'application/json', 'idempotency-key': 'runtime-1' },
          body: JSON.stringify({ title: 'expiring' }),
        });
        expect(r.status).toBe(201);
        return ((await r.json()) as { id: string }).id;
      };
      const first = await post();
      expect(await post()).toBe(first);
      await eventually(async () => {
        const metrics = await (await fetch(`${api.url}/metrics`)).text();
        expect(metrics).toMatch(/^orch_idempotency_keys_expired_total [1-9]/m);
        expect(metrics).toMatch(/^orch_timers_fired_total \d+$/m);
        return true;
      });
      expect(await post()).not.toBe(first);
    } finally {
      await api.stop();
    }
  });
});

describe('the stored answer as text (migration 0021)', () => {
  it('keeps the answers stored before it, and stores new ones as written', async () => {
    const old = await createTestDatabase('idem_body_upgrade', { migrate: false });
    try {
      const all = await loadMigrations();
      await migrate(
        old.sql,
        all.filter((m) => m.name < '0021'),
      );
      await old.sql`insert into idempotency_keys (scope, key, request_hash, status, body)
        values ('anonymous', 'before', 'h', 201, ${old.sql.json({ zeta: 1, a: [true, null] })})`;
      expect(await migrate(old.sql)).toEqual(['0021-idempotency-body-text.sql']);
      await old.sql.begin(async (tx) => {
        expect(await findStoredResponse(tx, 'anonymous', 'before')).toEqual({
          request_hash: 'h',
          status: 201,
          body: { zeta: 1, a: [true, null] },
        });
        const body = { zeta: 'last letter first', a: { y: 2, b: 1 }, list: [3, 1] };
        await storeResponse(tx, {
          scope: 'anonymous',
          key: 'after',
          requestHash: 'h2',
          status: 200,
          body,
        });
        const [row] = await tx<{ text: string }[]>`
          select body::text as text from idempotency_keys where key = 'after'`;
        expect(row?.text).toBe(JSON.stringify(body));
      });
    } finally {
      await old.drop();
    }
  });
});
