/**
 * The claim protocol under contention, with two hosts on two pools (two "processes"): 50
 * claimers and 20 tasks (each claimed once, no claimer holds two), tasks sharing a worktree
 * (never two active, the rest wait pending and are claimed later), and a cluster-wide cap
 * per task type (never more than 2 active across both processes).
 */
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import type { Sql } from '../../src/persistence/db.js';
import { SleepExecutor } from '../../src/workers/executors/index.js';
import { createTestDatabase, type TestDatabase } from '../support/database.js';
import { type TestProcess, testProcess, until } from '../support/worker-process.js';

let db: TestDatabase;
const procs: { p: TestProcess; sql: Sql }[] = [];
beforeAll(async () => {
  db = await createTestDatabase('claims');
});
// Each test's two processes end with it: the Postgres server is shared and its clients few.
afterEach(async () => {
  const done = procs.splice(0);
  await Promise.all(done.map(({ p }) => p.close()));
  await Promise.all(done.map(({ sql }) => sql.end({ timeout: 1 })));
});
afterAll(() => db.drop());

function twoProcesses(typeLimits: Record<string, number> = {}) {
  const made = [db.pool(8), db.pool(8)].map((sql) => ({
    p: testProcess(sql, { typeLimits }),
    sql,
  }));
  procs.push(...made);
  return made.map((m) => m.p) as [TestProcess, TestProcess];
}

const ACTIVE_END = [
  'task.completed',
  'task.failed',
  'task.retry_scheduled',
  'task.released',
  'task.cancelled',
];

/**
 * Replays the event log in position order and returns the most tasks ever active at once
 * per key. Sound because a claim reads committed state: a claim that depends on another
 * task's end is inserted after that end committed, so it gets a later position.
 */
async function maxActive(sql: Sql, ids: string[], key: (id: string) => string) {
  const rows = await sql<{ entity_id: string; type: string }[]>`
    select entity_id, type from events where entity_id in ${sql(ids)} order by pos`;
  const active = new Map<string, number>();
  const max = new Map<string, number>();
  for (const r of rows) {
    const k = key(r.entity_id);
    if (r.type === 'task.claimed') active.set(k, (active.get(k) ?? 0) + 1);
    else if (ACTIVE_END.includes(r.type)) active.set(k, (active.get(k) ?? 0) - 1);
    max.set(k, Math.max(max.get(k) ?? 0, active.get(k) ?? 0));
  }
  return max;
}

async function countEvents(sql: Sql, ids: string[], type: string) {
  const rows = await sql<{ entity_id: string; n: number }[]>`
    select entity_id, count(*)::int as n from events
    where entity_id in ${sql(ids)} and type = ${type} group by entity_id`;
  return new Map(rows.map((r) => [r.entity_id, r.n]));
}

describe('claims', () => {
  it('50 concurrent claimers in two processes, 20 tasks: each task claimed exactly once', async () => {
    const [a, b] = twoProcesses();
    const ticket = await a.ticket();
    const ids: string[] = [];
    for (let i = 0; i < 20; i++) ids.push(await a.task(ticket, { type: 'x', executor: 'sleep' }));

    const results = await Promise.all(
      Array.from({ length: 50 }, (_, i) =>
        (i % 2 ? a : b).claims.claim({ workerId: `c${i}`, executors: ['sleep'], waitMs: 1_500 }),
      ),
    );
    const won = results.filter((r) => r !== null);
    expect(won).toHaveLength(20);
    expect(new Set(won.map((r) => r.task.id)).size).toBe(20);
    expect(new Set(won.map((r) => r.token)).size).toBe(20);

    const rows = await db.sql<{ id: string; state: string; attempt: number; worker_id: string }[]>`
      select id, state, attempt, worker_id from tasks where id in ${db.sql(ids)}`;
    expect(rows.every((r) => r.state === 'claimed' && r.attempt === 1)).toBe(true);
    // No claimer holds two tasks.
    expect(new Set(rows.map((r) => r.worker_id)).size).toBe(20);
    const claimed = await countEvents(db.sql, ids, 'task.claimed');
    expect(ids.map((id) => claimed.get(id))).toEqual(ids.map(() => 1));
  });

  it('two pools of 25 slots run 20 tasks: each completed once, one claim per attempt', async () => {
    const [a, b] = twoProcesses();
    const ticket = await a.ticket();
    const ids: string[] = [];
    for (let i = 0; i < 20; i++) {
      ids.push(await a.task(ticket, { type: 'x', executor: 'sleep', payload: { ms: 10 } }));
    }
    const pools = [
      a.pool({ workerId: 'pa', concurrency: 25 }),
      b.pool({ workerId: 'pb', concurrency: 25 }),
    ];
    await until(async () => {
      const [r] = await db.sql<{ n: number }[]>`select count(*)::int as n from tasks
        where id in ${db.sql(ids)} and state = 'completed'`;
      return r?.n === 20;
    });
    await Promise.all(pools.map((p) => p.stop(1_000)));
    const completed = await countEvents(db.sql, ids, 'task.completed');
    const claimed = await countEvents(db.sql, ids, 'task.claimed');
    expect(ids.map((id) => [completed.get(id), claimed.get(id)])).toEqual(ids.map(() => [1, 1]));
    const stats = pools.map((p) => p.stats());
    expect(stats.reduce((n, s) => n + s.completions, 0)).toBe(20);
    expect(stats.reduce((n, s) => n + s.leaseLosses + s.failures, 0)).toBe(0);
    // A slot runs one task at a time: the log never shows a worker id holding two.
    const holders = await db.sql<{ worker: string; type: string; entity_id: string }[]>`
      select data->>'workerId' as worker, type, entity_id from events
      where entity_id in ${db.sql(ids)} and type in ('task.claimed', 'task.completed')
      order by pos`;
    const held = new Map<string, string>();
    for (const h of holders) {
      if (h.type === 'task.claimed') {
        expect(held.has(h.worker)).toBe(false);
        held.set(h.worker, h.entity_id);
      } else {
        expect(held.get(h.worker)).toBe(h.entity_id);
        held.delete(h.worker);
      }
    }
  });

  it('tasks sharing a worktree: never two active at once; the rest wait pending', async () => {
    const [a, b] = twoProcesses();
    const ticket = await a.ticket();
    const shared: string[] = [];
    const free: string[] = [];
    for (let i = 0; i < 12; i++) {
      shared.push(
        await a.task(ticket, {
          type: 'x',
          executor: 'sleep',
          worktree: 'wt-shared',
          payload: { ms: 15 },
        }),
      );
      if (i % 3 === 0) {
        free.push(await a.task(ticket, { type: 'x', executor: 'sleep', payload: { ms: 15 } }));
      }
    }
    const all = [...shared, ...free];
    // Many concurrent claimers first: exactly one of the shared tasks is taken.
    const raced = await Promise.all(
      Array.from({ length: 30 }, (_, i) =>
        (i % 2 ? a : b).claims.claim({ workerId: `r${i}`, executors: ['sleep'], waitMs: 300 }),
      ),
    );
    const got = raced.filter((r) => r !== null);
    expect(got.filter((r) => r.task.worktree === 'wt-shared')).toHaveLength(1);
    expect(got).toHaveLength(1 + free.length);
    const pendingShared = await db.sql<{ n: number }[]>`select count(*)::int as n from tasks
      where id in ${db.sql(shared)} and state = 'pending'`;
    expect(pendingShared[0]?.n).toBe(shared.length - 1);
    // Finish the raced claims, then let two pools drain the rest while a monitor watches.
    for (const g of got) {
      await a.host.send('task', g.task.id, { type: 'START', token: g.token });
      await a.host.send('task', g.task.id, { type: 'COMPLETE', token: g.token });
    }
    let violations = 0;
    let failedSeen = 0;
    let watching = true;
    const monitor = (async () => {
      while (watching) {
        const rows = await db.sql<{ active: number; failed: number }[]>`
          select count(*) filter (where state in ('claimed', 'running'))::int as active,
            count(*) filter (where state in ('failed', 'retry_wait'))::int as failed
          from tasks where id in ${db.sql(shared)}`;
        if ((rows[0]?.active ?? 0) > 1) violations++;
        failedSeen += rows[0]?.failed ?? 0;
        await new Promise((r) => setTimeout(r, 2));
      }
    })();
    const pools = [
      a.pool({ workerId: 'wa', concurrency: 4 }),
      b.pool({ workerId: 'wb', concurrency: 4 }),
    ];
    await until(async () => {
      const [r] = await db.sql<{ n: number }[]>`select count(*)::int as n from tasks
        where id in ${db.sql(all)} and state = 'completed'`;
      return r?.n === all.length;
    });
    watching = false;
    await monitor;
    await Promise.all(pools.map((p) => p.stop(1_000)));
    expect(violations).toBe(0);
    expect(failedSeen).toBe(0);
    const max = await maxActive(db.sql, shared, () => 'wt-shared');
    expect(max.get('wt-shared')).toBe(1);
    const claimed = await countEvents(db.sql, all, 'task.claimed');
    expect(all.map((id) => claimed.get(id))).toEqual(all.map(() => 1));
  });

  it('a cap of 2 implement_feature tasks holds across two processes', async () => {
    const [a, b] = twoProcesses({ implement_feature: 2 });
    const ticket = await a.ticket();
    const capped: string[] = [];
    const other: string[] = [];
    for (let i = 0; i < 10; i++) {
      capped.push(
        await a.task(ticket, {
          type: 'implement_feature',
          executor: 'sleep',
          payload: { ms: 30 },
        }),
      );
      if (i % 2 === 0) {
        other.push(await a.task(ticket, { type: 'x', executor: 'sleep', payload: { ms: 30 } }));
      }
    }
    let maxSeen = 0;
    let watching = true;
    const monitor = (async () => {
      while (watching) {
        const [r] = await db.sql<{ n: number }[]>`select count(*)::int as n from tasks
          where id in ${db.sql(capped)} and state in ('claimed', 'running')`;
        maxSeen = Math.max(maxSeen, r?.n ?? 0);
        await new Promise((r) => setTimeout(r, 2));
      }
    })();
    const pools = [
      a.pool({ workerId: 'ka', concurrency: 6 }, [new SleepExecutor()]),
      b.pool({ workerId: 'kb', concurrency: 6 }, [new SleepExecutor()]),
    ];
    const all = [...capped, ...other];
    await until(async () => {
      const [r] = await db.sql<{ n: number }[]>`select count(*)::int as n from tasks
        where id in ${db.sql(all)} and state = 'completed'`;
      return r?.n === all.length;
    });
    watching = false;
    await monitor;
    await Promise.all(pools.map((p) => p.stop(1_000)));
    expect(maxSeen).toBeLessThanOrEqual(2);
    const max = await maxActive(db.sql, capped, () => 'implement_feature');
    expect(max.get('implement_feature')).toBe(2);
    const maxOther = await maxActive(db.sql, other, () => 'x');
    expect(maxOther.get('x')).toBeGreaterThanOrEqual(1);
  });
});
