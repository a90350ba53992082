/**
 * The per-state counts behind /metrics (migration 0005): exact at every moment, whoever
 * writes and whoever folds, and read without scanning tickets or tasks. Each check compares
 * the counts with a group-by over the tables in the SAME snapshot (one repeatable-read
 * transaction), so even mid-flight they must agree to the unit.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { silentLogger } from '../../src/log.js';
import type { Sql, Tx } from '../../src/persistence/db.js';
import { loadMigrations, migrate } from '../../src/persistence/migrate.js';
import { Queries } from '../../src/persistence/queries.js';
import {
  foldBatch,
  foldStateCounts,
  readStateCounts,
  STATE_COUNTS_SQL,
  type StateCount,
  StateCountFolder,
} from '../../src/persistence/state-counts.js';
import { createTestDatabase, type TestDatabase } from '../support/database.js';
import { type TestProcess, testProcess, until } from '../support/worker-process.js';

let db: TestDatabase;
let a: TestProcess;
let b: TestProcess;
beforeAll(async () => {
  db = await createTestDatabase('state_counts');
  a = testProcess(db.pool(8));
  b = testProcess(db.pool(8));
});
afterAll(async () => {
  await Promise.all([a.close(), b.close()]);
  await db.drop();
});

type Counts = Record<string, number>;
const key = (c: { entityType: string; state: string }) => `${c.entityType}:${c.state}`;

function nonZero(rows: StateCount[]): Counts {
  const out: Counts = {};
  for (const r of rows) if (r.n !== 0) out[key(r)] = r.n;
  return out;
}

/** The counts as read, and the truth from the tables, in one snapshot. */
async function countsAndTruth(sql: Sql): Promise<{ counts: Counts; truth: Counts }> {
  return sql.begin('isolation level repeatable read', async (tx) => {
    const counts = nonZero(await readStateCounts(tx));
    const truth: Counts = {};
    const rows = await tx<{ entityType: string; state: string; n: number }[]>`
      select 'ticket' as "entityType", state, count(*)::int as n from tickets group by state
      union all
      select 'task' as "entityType", state, count(*)::int as n from tasks group by state`;
    for (const r of rows) truth[key(r)] = r.n;
    return { counts, truth };
  });
}

async function expectExact(sql: Sql = db.sql): Promise<Counts> {
  const { counts, truth } = await countsAndTruth(sql);
  expect(counts).toEqual(truth);
  return counts;
}

const pendingDeltas = async () =>
  (await db.sql<{ n: number }[]>`select count(*)::int as n from state_count_deltas`)[0]?.n;

/** One task's life through a process: claim, start, then complete, fail or release. */
async function churn(p: TestProcess, ticketId: string, i: number): Promise<void> {
  const id = await p.task(ticketId, { type: `churn-${i % 3}`, executor: 'sleep' });
  const claimed = await p.host.send('task', id, { type: 'CLAIM', workerId: `w${i}` });
  const token = (claimed.snapshot.context as { token: string }).token;
  await p.host.send('task', id, { type: 'START', token });
  if (i % 4 === 0) await p.host.send('task', id, { type: 'COMPLETE', token });
  else if (i % 4 === 1) await p.host.send('task', id, { type: 'FAIL', token, error: 'x' });
  else if (i % 4 === 2) await p.host.send('task', id, { type: 'RELEASE', token });
  // i % 4 === 3 stays running
}

describe('state counts', () => {
  it('stay exact under concurrent transitions from two pools, with folds racing them', async () => {
    const tickets = [await a.ticket('counts a'), await b.ticket('counts b')];
    let writing = true;
    const writers = [a, b].map(async (p, w) => {
      const jobs = Array.from({ length: 60 }, (_, i) => i);
      // Eight at a time per pool: transitions of different tasks commit concurrently.
      for (let k = 0; k < jobs.length; k += 8) {
        await Promise.all(jobs.slice(k, k + 8).map((i) => churn(p, tickets[w]!, i)));
      }
    });
    const folders = [a, b].map(async (p) => {
      let folded = 0;
      while (writing) {
        folded += await foldStateCounts(p.host.sql, 7);
        await new Promise((r) => setTimeout(r, 5));
      }
      return folded;
    });
    let samples = 0;
    const sampler = (async () => {
      while (writing) {
        await expectExact();
        samples++;
      }
    })();
    await Promise.all(writers);
    writing = false;
    const folded = await Promise.all(folders);
    await sampler;
    expect(samples).toBeGreaterThan(3);
    expect(folded[0]! + folded[1]!).toBeGreaterThan(0);

    const before = await expectExact();
    expect(before['task:completed']).toBe(30);
    expect(before['task:retry_wait']).toBe(30);
    expect(before['task:pending']).toBe(30);
    expect(before['task:running']).toBe(30);
    // Across a fold: the same figures, now from the totals alone.
    await foldStateCounts(db.sql);
    expect(await pendingDeltas()).toBe(0);
    expect(await expectExact()).toEqual(before);
  });

  it('a fold or a write that rolls back changes nothing', async () => {
    const ticket = await a.ticket('rollback');
    await a.task(ticket, { type: 'rb', executor: 'sleep' });
    const before = await expectExact();
    const pending = await pendingDeltas();
    expect(pending).toBeGreaterThan(0);
    // A fold that dies after its statement (a crash before commit) leaves the deltas.
    await expect(
      db.sql.begin(async (tx) => {
        expect(await foldBatch(tx as unknown as Tx)).toBe(pending);
        throw new Error('crash before commit');
      }),
    ).rejects.toThrow('crash before commit');
    expect(await pendingDeltas()).toBe(pending);
    expect(await expectExact()).toEqual(before);
    // A state change whose transaction aborts leaves no delta.
    await expect(
      db.sql.begin(async (tx) => {
        await tx`update tasks set state = 'cancelled' where ticket_id = ${ticket}`;
        throw new Error('abort');
      }),
    ).rejects.toThrow('abort');
    expect(await pendingDeltas()).toBe(pending);
    expect(await expectExact()).toEqual(before);
  });

  it('the scrape query reads no ticket or task row, however many are stored', async () => {
    await db.sql`insert into tickets (id, state, phase, title, machine_version, snapshot,
        version, seq, created_at, updated_at)
      select 'bulk-' || g, 'backlog', null, 'bulk', 1, '{}', 1, 0, now(), now()
      from generate_series(1, 20000) g`;
    await foldStateCounts(db.sql);
    const counts = await expectExact();
    expect(counts['ticket:backlog']).toBeGreaterThanOrEqual(20_000);
    const [plan] = await db.sql.unsafe<{ 'QUERY PLAN': unknown }[]>(
      `explain (analyze, format json) ${STATE_COUNTS_SQL}`,
    );
    const relations = JSON.stringify(plan?.['QUERY PLAN']).match(/"Relation Name":"[^"]+"/g);
    expect(new Set(relations)).toEqual(
      new Set(['"Relation Name":"state_counts"', '"Relation Name":"state_count_deltas"']),
    );
  });

  it('a /metrics read of the counts touches neither tickets nor tasks', async () => {
    await a.task(await a.ticket('scanned?'), { type: 'scan', executor: 'sleep' });
    // pg_stat_xact_user_tables holds this backend's scans not yet reported, which includes
    // the current transaction's: the difference around the read is the read's own.
    const scans = await db.sql.begin(async (tx) => {
      const read = () => tx<{ relname: string; scans: number }[]>`
        select relname, (coalesce(seq_scan, 0) + coalesce(idx_scan, 0))::int as scans
        from pg_stat_xact_user_tables where relname in ('tickets', 'tasks') order by relname`;
      const before = await read();
      const counts = await new Queries(tx).stateCounts();
      expect(counts.length).toBeGreaterThan(0);
      const after = await read();
      return after.map((r, i) => ({
        relname: r.relname,
        scans: r.scans - (before[i]?.scans ?? 0),
      }));
    });
    expect(scans).toEqual([
      { relname: 'tasks', scans: 0 },
      { relname: 'tickets', scans: 0 },
    ]);
  });

  it('the background folder empties the deltas and stops cleanly', async () => {
    await a.task(await a.ticket('folded'), { type: 'fold', executor: 'sleep' });
    expect(await pendingDeltas()).toBeGreaterThan(0);
    const before = await expectExact();
    const folder = new StateCountFolder(db.pool(2), silentLogger(), 20);
    folder.start();
    try {
      await until(async () => (await pendingDeltas()) === 0, 5_000, 'deltas folded');
    } finally {
      await folder.stop();
    }
    expect(await expectExact()).toEqual(before);
  });

  it('the migration starts the totals from the rows already stored', async () => {
    const old = await createTestDatabase('state_counts_init', { migrate: false });
    try {
      const all = await loadMigrations();
      // Every other migration, so today's code can write rows; the counts come last.
      await migrate(
        old.sql,
        all.filter((m) => m.name !== '0005-state-counts.sql'),
      );
      const p = testProcess(old.pool(4));
      try {
        const ticket = await p.ticket('before the counts');
        for (let i = 0; i < 5; i++) {
          const id = await p.task(ticket, { type: 'old', executor: 'sleep' });
          if (i < 2) await p.host.send('task', id, { type: 'CANCEL' });
        }
        expect(await migrate(old.sql)).toContain('0005-state-counts.sql');
        const { counts, truth } = await countsAndTruth(old.sql);
        expect(counts).toEqual(truth);
        expect(counts).toMatchObject({ 'ticket:requirements': 1, 'task:pending': 3 });
        // And from there on, the trigger keeps them.
        await p.task(ticket, { type: 'new', executor: 'sleep' });
        expect(nonZero(await readStateCounts(old.sql))['task:pending']).toBe(4);
      } finally {
        await p.close();
      }
    } finally {
      await old.drop();
    }
  });
});
