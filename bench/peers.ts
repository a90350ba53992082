/**
 * Issue 8: the same job through three queues on the same Postgres server. Enqueue N jobs
 * (8 at a time, one transaction each), then 8 concurrent workers claim and complete them
 * all (the handler does nothing):
 *
 * - ours: `commands.addTask` (the ticket learns of the task in the same transaction), then
 *   `ClaimService.claimOnce` + START + COMPLETE through the actor host: three transitions,
 *   each with its snapshot CAS (carrying the lease deadline) and event-log row.
 * - graphile-worker: `addJob`, then its runner (`run`, concurrency 8): get_job + complete.
 * - pg-boss: `send`, then 8 loops of `fetch` (batch 1) + `complete`. pg-boss's own `work()`
 *   sleeps its polling interval (>= 0.5 s) between fetches, so it is driven directly here.
 *
 * Each phase runs on pools of its own, closed before pg_stat_database is read (a backend
 * flushes its statistics when it exits), so the commits and rows written per job are the
 * database's own count for that phase.
 */
import { Commands } from '../src/actors/commands.js';
import { ActorHost } from '../src/actors/host.js';
import type { Sql } from '../src/persistence/db.js';
import { ClaimService } from '../src/workers/claims.js';
import { Wakeups } from '../src/workers/wakeups.js';
import { type Scratch, scratchDatabase } from './scratch.js';
import { n0, pool, print, ratio, sleep, table, until } from './stats.js';

const TASK_DEFAULTS = { maxAttempts: 3, leaseMs: 600_000, retryBaseMs: 1_000 };

interface DbStats {
  commits: number;
  rows: number;
}
interface Phase {
  seconds: number;
  commitsPerJob: number;
  rowsPerJob: number;
}
interface PeerResult {
  name: string;
  enqueue: Phase;
  work: Phase;
  note: string;
}

export async function peersSection(o: { jobs: number; concurrency: number }): Promise<void> {
  print('## The same job through our claim protocol, graphile-worker and pg-boss (issue 8)');
  print(
    `\n${n0(o.jobs)} jobs enqueued ${o.concurrency} at a time, then ${o.concurrency} workers claim and complete them (empty handler); one scratch database each\n`,
  );
  const results: PeerResult[] = [];
  results.push(await peer('ours', o, ours));
  results.push(await peer('graphile-worker', o, graphile));
  results.push(await peer('pg-boss', o, pgBoss));
  const ref = results[0] as PeerResult;
  print(
    table(
      [
        'queue',
        'enqueue jobs/s',
        'commits/job',
        'rows written/job*',
        'claim+complete jobs/s',
        'commits/job',
        'rows written/job*',
        'ours / this (jobs/s)',
      ],
      results.map((r) => [
        r.name,
        n0(o.jobs / r.enqueue.seconds),
        r.enqueue.commitsPerJob.toFixed(1),
        r.enqueue.rowsPerJob.toFixed(1),
        n0(o.jobs / r.work.seconds),
        r.work.commitsPerJob.toFixed(1),
        r.work.rowsPerJob.toFixed(1),
        ratio(o.jobs / ref.work.seconds, o.jobs / r.work.seconds),
      ]),
    ),
  );
  print(
    '* pg_stat_database tup_inserted + tup_updated + tup_deleted: rows written by attempts that a conflict rolled back count too',
  );
  print();
  for (const r of results) print(`- ${r.name}: ${r.note}`);
}

type Runner = (
  db: Scratch,
  o: { jobs: number; concurrency: number },
  measure: <T>(phase: () => Promise<T>) => Promise<Phase>,
) => Promise<{ enqueue: Phase; work: Phase; note: string }>;

async function peer(
  name: string,
  o: { jobs: number; concurrency: number },
  run: Runner,
): Promise<PeerResult> {
  const db = await scratchDatabase(`peer_${name.replace(/-/g, '_')}`, {
    max: 2,
    migrate: name === 'ours',
  });
  try {
    const measure = async <T>(phase: () => Promise<T>): Promise<Phase> => {
      const before = await dbStats(db.sql);
      const started = performance.now();
      await phase();
      const seconds = (performance.now() - started) / 1000;
      // The phase's pools are closed: their backends flush their statistics as they exit.
      const after = await settledStats(db.sql);
      return {
        seconds,
        commitsPerJob: (after.commits - before.commits) / o.jobs,
        rowsPerJob: (after.rows - before.rows) / o.jobs,
      };
    };
    return { name, ...(await run(db, o, measure)) };
  } finally {
    await db.drop();
  }
}

/** pg_stat_database once two readings 300 ms apart agree (exiting backends have flushed). */
async function settledStats(sql: Sql): Promise<DbStats> {
  let last = await dbStats(sql);
  for (let i = 0; i < 20; i++) {
    await sleep(300);
    const next = await dbStats(sql);
    // Our own two reading queries commit too: allow for them.
    if (next.rows === last.rows && next.commits - last.commits <= 2) return next;
    last = next;
  }
  return last;
}

async function dbStats(sql: Sql): Promise<DbStats> {
  await sql`select pg_stat_clear_snapshot()`;
  const [r] = await sql<{ commits: number; rows: number }[]>`
    select xact_commit::bigint as commits,
      (tup_inserted + tup_updated + tup_deleted)::bigint as rows
    from pg_stat_database where datname = current_database()`;
  return { commits: r?.commits ?? 0, rows: r?.rows ?? 0 };
}

const ours: Runner = async (db, o, measure) => {
  const ticketCount = Math.max(1, Math.ceil(o.jobs / 10));
  const tickets: string[] = [];
  {
    const sql = db.pool(o.concurrency + 2);
    const host = new ActorHost(sql, { taskDefaults: TASK_DEFAULTS });
    const commands = new Commands(host, {
      stuckAfterMs: 3_600_000,
      diagnosticCooldownMs: 3_600_000,
    });
    await pool(ticketCount, o.concurrency, async () => {
      const { value } = await host.transact((uow) =>
        commands.createTicket(uow, { title: 'bench' }),
      );
      tickets.push(value.id);
    });
    await sql.end();
  }
  const enqueue = await measure(async () => {
    const sql = db.pool(o.concurrency + 2);
    const host = new ActorHost(sql, { taskDefaults: TASK_DEFAULTS });
    const commands = new Commands(host, {
      stuckAfterMs: 3_600_000,
      diagnosticCooldownMs: 3_600_000,
    });
    await pool(o.jobs, o.concurrency, async (i) => {
      const ticketId = tickets[i % tickets.length] as string;
      await host.transact((uow) => commands.addTask(uow, ticketId, { type: 'bench' }));
    });
    await sql.end();
  });
  const work = await measure(async () => {
    const sql = db.pool(o.concurrency + 2);
    const host = new ActorHost(sql, { taskDefaults: TASK_DEFAULTS });
    const claims = new ClaimService(host, new Wakeups(), { typeLimits: {}, maxWaitMs: 0 });
    let claimed = 0;
    await Promise.all(
      Array.from({ length: o.concurrency }, async (_, w) => {
        while (claimed < o.jobs) {
          const c = await claims.claimOnce({ workerId: `bench-${w}`, executors: ['external'] });
          if (!c) {
            await sleep(1); // the rest are locked by other claimers right now
            continue;
          }
          claimed++;
          await host.send('task', c.task.id, { type: 'START', token: c.token });
          await host.send('task', c.task.id, { type: 'COMPLETE', token: c.token });
        }
      }),
    );
    claims.close();
    await sql.end();
  });
  const [left] = await db.sql<{ n: number }[]>`
    select count(*)::int as n from tasks where state <> 'completed'`;
  if ((left?.n ?? 1) !== 0) throw new Error(`bench: ${left?.n} tasks not completed`);
  return {
    enqueue,
    work,
    note: 'enqueue = one transaction: TASK_ADDED on the ticket (snapshot CAS, event) + its ticket_tasks row + the task row and its task.created event. Per job then CLAIM, START, COMPLETE: three transactions, each a snapshot CAS (the lease deadline is a column of it) and an event-log row (the event log is the outbox). Nothing is ever deleted here.',
  };
};

const graphile: Runner = async (db, o, measure) => {
  const { Logger, makeWorkerUtils, run } = await import('graphile-worker');
  const logger = new Logger(() => () => {});
  {
    const utils = await makeWorkerUtils({ connectionString: db.url, logger });
    await utils.migrate();
    await utils.release();
  }
  const enqueue = await measure(async () => {
    const utils = await makeWorkerUtils({ connectionString: db.url, logger });
    await pool(o.jobs, o.concurrency, async (i) => {
      await utils.addJob('bench', { i });
    });
    await utils.release();
  });
  let done = 0;
  const work = await measure(async () => {
    const runner = await run({
      connectionString: db.url,
      concurrency: o.concurrency,
      maxPoolSize: o.concurrency + 2,
      noHandleSignals: true,
      pollInterval: 1_000,
      logger,
      taskList: {
        bench: async () => {
          done++;
        },
      },
    });
    await until(() => done >= o.jobs, 300_000, 'graphile-worker to run every job', 2);
    await until(
      async () => {
        const [r] = await db.sql<
          { n: number }[]
        >`select count(*)::int as n from graphile_worker.jobs`;
        return r?.n === 0;
      },
      60_000,
      'graphile-worker to complete every job',
      5,
    );
    await runner.stop();
  });
  return {
    enqueue,
    work,
    note: 'enqueue = add_job (one insert, plus its task identifier row once). Per job: get_job (an UPDATE ... FOR UPDATE SKIP LOCKED returning the job) and complete_job (a DELETE). No history is kept.',
  };
};

const pgBoss: Runner = async (db, o, measure) => {
  const { default: PgBoss } = await import('pg-boss');
  const make = () =>
    new PgBoss({
      connectionString: db.url,
      max: o.concurrency + 2,
      supervise: false,
      schedule: false,
    });
  {
    const boss = make();
    await boss.start();
    await boss.createQueue('bench');
    await boss.stop({ graceful: false, close: true });
  }
  const enqueue = await measure(async () => {
    const boss = make();
    await boss.start();
    await pool(o.jobs, o.concurrency, async (i) => {
      await boss.send('bench', { i });
    });
    await boss.stop({ graceful: false, close: true, wait: true });
  });
  const work = await measure(async () => {
    const boss = make();
    await boss.start();
    let claimed = 0;
    await Promise.all(
      Array.from({ length: o.concurrency }, async () => {
        while (claimed < o.jobs) {
          const [job] = await boss.fetch<{ i: number }>('bench', { batchSize: 1 });
          if (!job) {
            await sleep(1);
            continue;
          }
          claimed++;
          await boss.complete('bench', job.id);
        }
      }),
    );
    await boss.stop({ graceful: false, close: true, wait: true });
  });
  const [r] = await db.sql<{ n: number }[]>`
    select count(*)::int as n from pgboss.job where name = 'bench' and state = 'completed'`;
  if (r?.n !== o.jobs) throw new Error(`bench: pg-boss completed ${r?.n} of ${o.jobs}`);
  return {
    enqueue,
    work,
    note: 'enqueue = one insert into its partitioned job table. Per job: fetch (an UPDATE ... SKIP LOCKED setting state active) and complete (an UPDATE to completed; the row stays until its archive/retention maintenance, off here).',
  };
};
