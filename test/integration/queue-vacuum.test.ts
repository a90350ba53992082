/**
 * The queue vacuum: a burst of fired timers leaves dead entries at the start of the timer
 * poller's index of due timers, and every poll walks them until a vacuum. `vacuumQueueTables`
 * removes them once a table has enough dead rows, one process at a time.
 */
import { afterAll, beforeAll, expect, it } from 'vitest';
import { silentLogger } from '../../src/log.js';
import type { Sql } from '../../src/persistence/db.js';
import {
  deadRows,
  QueueVacuum,
  VACUUM_LOCK_ID,
  vacuumQueueTables,
} from '../../src/persistence/queue-vacuum.js';
import { createTestDatabase, type TestDatabase } from '../support/database.js';
import { eventually } from '../support/transport.js';

let db: TestDatabase;
beforeAll(async () => {
  db = await createTestDatabase('queue_vacuum');
});
afterAll(() => db.drop());

/** `n` timers fired (deleted, as the poller does) and 10 left to come. */
async function burst(sql: Sql, n: number, prefix: string): Promise<void> {
  const conn = await sql.reserve();
  try {
    await conn`insert into timers (entity_type, entity_id, key, event, due_at, token)
      select 'task', ${prefix} || i, 'k', '{}', now() + make_interval(secs => i), gen_random_uuid()
      from generate_series(0, ${n + 9}) i`;
    await conn`delete from timers where entity_id like ${`${prefix}%`}
      and due_at < (select max(due_at) - interval '9.5 seconds' from timers
        where entity_id like ${`${prefix}%`})`;
    // The statistics reach the shared view at the session's next report.
    await conn`select pg_stat_force_next_flush()`;
    await conn`select 1`;
  } finally {
    conn.release();
  }
}

/** Buffers the poller's scan (earliest due first) reads. */
async function scanBuffers(sql: Sql): Promise<number> {
  // Through the index, as the poller's scan goes (with 10 live rows a planner may prefer
  // reading the table).
  const rows = await sql.begin(async (tx) => {
    await tx`set local enable_seqscan = off`;
    return tx.unsafe<{ 'QUERY PLAN': string }[]>(
      `explain (analyze, buffers, timing off)
       select entity_id from timers order by due_at limit 10`,
    );
  });
  const plan = rows.map((r) => r['QUERY PLAN']).join('\n');
  return Number(/Buffers: shared hit=(\d+)/.exec(plan)?.[1] ?? 0);
}

/** The dead-row statistics once the timers' count satisfies `ok` (they are reported late). */
function deadTimers(ok: (dead: number) => boolean): Promise<Map<string, number>> {
  return eventually(
    async () => {
      const d = await deadRows(db.sql);
      return ok(d.get('timers') ?? 0) && d;
    },
    5_000,
    'the dead rows of timers',
  );
}

it('leaves a table below the threshold alone, then vacuums it and the scan stops walking the dead', async () => {
  await burst(db.sql, 20_000, 'a-');
  const dead = await deadTimers((n) => n >= 20_000);
  expect(dead.get('timers')).toBeGreaterThanOrEqual(20_000);

  const below = await vacuumQueueTables(db.sql, 50_000);
  expect(below).toEqual({ vacuumed: [], ran: true });
  // Walked twice: the first walk marks the dead entries, which later scans still read.
  await scanBuffers(db.sql);
  const before = await scanBuffers(db.sql);
  expect(before).toBeGreaterThan(30);

  const run = await vacuumQueueTables(db.sql, 10_000);
  expect(run).toEqual({ vacuumed: ['timers'], ran: true });
  expect((await deadRows(db.sql)).get('timers') ?? 0).toBeLessThan(1_000);
  const after = await scanBuffers(db.sql);
  expect(after).toBeLessThan(10);
  // The timers still to come are all there for the poller.
  const [left] = await db.sql<{ n: number }[]>`select count(*)::int as n from timers`;
  expect(left?.n).toBe(10);
});

it('one process at a time: while another holds the lock, a run does nothing', async () => {
  const other = db.pool(1);
  const holder = await other.reserve();
  try {
    await holder`select pg_advisory_lock(${VACUUM_LOCK_ID})`;
    await burst(db.sql, 12_000, 'b-');
    await deadTimers((n) => n >= 12_000);
    expect(await vacuumQueueTables(db.sql, 10_000)).toEqual({ vacuumed: [], ran: false });
    await holder`select pg_advisory_unlock(${VACUUM_LOCK_ID})`;
    expect(await vacuumQueueTables(db.sql, 10_000)).toEqual({ vacuumed: ['timers'], ran: true });
  } finally {
    holder.release();
    await other.end({ timeout: 1 });
  }
});

it('the background job vacuums on its own, and an interval of 0 turns it off', async () => {
  const off = new QueueVacuum(db.sql, silentLogger(), { intervalMs: 0, deadRows: 100 });
  off.start();
  await burst(db.sql, 11_000, 'c-');
  await deadTimers((n) => n >= 11_000);
  await new Promise((r) => setTimeout(r, 300));
  expect((await deadRows(db.sql)).get('timers')).toBeGreaterThanOrEqual(11_000);
  await off.stop();

  const job = new QueueVacuum(db.sql, silentLogger(), { intervalMs: 50, deadRows: 10_000 });
  job.start();
  try {
    const after = await deadTimers((n) => n < 1_000);
    expect(after.get('timers')).toBeLessThan(1_000);
  } finally {
    const started = performance.now();
    await job.stop();
    expect(performance.now() - started).toBeLessThan(2_000);
  }
});
