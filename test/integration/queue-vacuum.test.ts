/**
 * The queue vacuum: a burst of fired timers leaves dead entries at the start of the timer
 * poller's index of due timers, and every poll walks them until a vacuum. `vacuumQueueTables`
 * removes them once a table has enough dead rows, one process at a time.
 */
import { afterAll, beforeAll, expect, it } from 'vitest';
import { silentLogger } from '../../src/log.js';
import type { Sql } from '../../src/persistence/db.js';
import {
  ANALYZE_LOCK_ID,
  analyzeGrownTables,
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

/**
 * The plan a prepared statement of the driver's runs on now, read on its own connection:
 * `explain execute` of it by name, with `params` (nothing runs).
 */
async function planOf(conn: Sql, marker: string, params: string): Promise<string> {
  const [stmt] = await conn<{ name: string }[]>`
    select name from pg_prepared_statements
    where statement like ${`%${marker}%`} and statement not like '%pg_prepared_statements%'`;
  if (!stmt) throw new Error(`no prepared statement with ${marker}`);
  const rows = await conn.unsafe<{ 'QUERY PLAN': string }[]>(
    `explain (costs off) execute "${stmt.name.replaceAll('"', '""')}"(${params})`,
  );
  return rows.map((r) => r['QUERY PLAN']).join('\n');
}

it('a table whose rows doubled is analyzed, and what was prepared while it was small is planned again', async () => {
  const one = db.pool(1);
  await db.sql`insert into tickets (id, state, phase, title, machine_version, snapshot, version,
      seq, created_at, updated_at)
    values ('tkt_grow', 'backlog', 'backlog', 'grow', 1, '{}', 1, 1, now(), now())`;
  const addTasks = (from: number, to: number) => db.sql`
    insert into tasks (id, ticket_id, type, phase, state, executor, priority, attempt,
      machine_version, snapshot, version, seq, created_at, updated_at)
    select 'tsk_grow_' || g, 'tkt_grow', 'b', 'backlog', 'pending', 'sleep', 0, 0, 1, '{}', 1, 1,
      now(), now()
    from generate_series(${from}::int, ${to}::int) g`;
  await addTasks(1, 8);
  // A batch of ids joined to the tasks, as the task rows' write joins its batch: run enough
  // times on 8 rows for Postgres to settle on its generic plan, a scan of the small table.
  const byIds = (ids: string[]) => one`
    select t.id from jsonb_to_recordset(${JSON.stringify(ids.map((id) => ({ id })))}::text::jsonb)
      as x(id text) join tasks t on t.id = x.id`;
  for (let i = 1; i <= 8; i++) expect(await byIds([`tsk_grow_${i}`])).toHaveLength(1);
  const marker = 'as x(id text) join tasks t';
  const param = `'[{"id":"tsk_grow_1"}]'`;
  expect(await planOf(one, marker, param)).toMatch(/Seq Scan on tasks/);

  await addTasks(9, 100_000);
  // Below the minimum nothing is analyzed; the statistics reach the shared view late.
  expect(await analyzeGrownTables(db.sql, 1_000_000)).toEqual([]);
  const analyzed = await eventually(
    async () => {
      const tables = await analyzeGrownTables(db.sql);
      return tables.includes('tasks') ? tables : false;
    },
    15_000,
    'tasks analyzed',
  );
  expect(analyzed).toContain('tasks');
  const plan = await planOf(one, marker, param);
  expect(plan).not.toMatch(/Seq Scan on tasks/);
  expect(plan).toMatch(/tasks_pkey/);
  expect(await byIds(['tsk_grow_5000', 'tsk_grow_1'])).toHaveLength(2);

  // Not doubled since: nothing to do. And one process at a time: while another holds the
  // lock, a grown table waits for the next run.
  expect(await analyzeGrownTables(db.sql)).not.toContain('tasks');
  await db.sql`insert into events (event_id, entity_type, entity_id, seq, type, data, at)
    select gen_random_uuid(), 'ticket', 'tkt_grow', g, 'ticket.noted', '{}', now()
    from generate_series(1, 2000) g`;
  await eventually(
    async () => {
      const [r] = await db.sql<{ n: number }[]>`
      select n_live_tup::int as n from pg_stat_user_tables where relname = 'events'`;
      return (r?.n ?? 0) >= 2000;
    },
    15_000,
    'the inserted events in the statistics',
  );
  await db.sql.begin(async (tx) => {
    await tx`select pg_advisory_xact_lock(${ANALYZE_LOCK_ID})`;
    expect(await analyzeGrownTables(db.sql)).toEqual([]);
  });
  await eventually(
    async () => (await analyzeGrownTables(db.sql)).includes('events'),
    15_000,
    'events analyzed once the lock is free',
  );
});

it('an analyze builds no statistics of the JSON documents, only of the columns statements filter on', async () => {
  await db.sql`insert into events (event_id, entity_type, entity_id, seq, type, data, at)
    select gen_random_uuid(), 'task', 'tsk_docs_' || g, 1, 'task.claimed',
      jsonb_build_object('ticketId', 'tkt_docs', 'attempt', g), now()
    from generate_series(1, 500) g`;
  await db.sql`analyze events, tasks, tickets, timers`;
  const stats = await db.sql<{ t: string; c: string }[]>`
    select tablename::text as t, attname::text as c from pg_stats
    where schemaname = current_schema() and tablename in ('events', 'tasks', 'tickets', 'timers')`;
  const has = (t: string, c: string) => stats.some((s) => s.t === t && s.c === c);
  for (const [t, c] of [
    ['events', 'data'],
    ['tasks', 'snapshot'],
    ['tasks', 'feedback'],
    ['tickets', 'snapshot'],
    ['timers', 'event'],
  ] as const) {
    expect(has(t, c), `${t}.${c}`).toBe(false);
  }
  expect(has('events', 'type')).toBe(true);
  expect(has('events', 'entity_id')).toBe(true);
});
