/**
 * The peers as a user runs them: N no-op jobs waiting, then each queue's own worker drains
 * them, on the same Postgres server (one scratch database each), all through TCP to
 * 127.0.0.1.
 *
 * - ours: a real `bin/orchestrator worker` process (WORKER_CONCURRENCY=8, WORKER_CLAIM_AHEAD
 *   at its default, `sleep` tasks of 0 ms, tickets of 50 tasks each, every ticket started).
 *   Per task: CLAIM, START, COMPLETE
 *   with its fencing token, the relay publishes the events and the task_state reaction tells
 *   the ticket, which advances once its 50 tasks are complete. Counted from the first claim
 *   to the last ticket's phase change (both from the event log), and until then nothing
 *   else runs: the setup's events are relayed and reacted to before the worker starts.
 * - graphile-worker: its runner, `run()` with default settings and concurrency 8 and 32, and
 *   x8 once more with its local queue and batched completions on (GRAPHILE_LIKE_OURS).
 * - pg-boss: 8 `work()` workers, each fetching a batch (see PG_BOSS_BATCH below), the
 *   shortest polling interval it accepts.
 *
 * Ours and graphile-worker x8 (the ratio the figures are read by) each run TURNS times,
 * taking turns, and are reported by their median run; the others run once.
 *
 * The same connection type and pool size for all three: TCP to 127.0.0.1 (BENCH_DATABASE_URL),
 * at most POOL_MAX connections each. That is graphile-worker's default `maxPoolSize`,
 * node-postgres's default pool `max` (pg-boss's), and our `DB_POOL_MAX` default, all 10;
 * it is still passed explicitly to the two that take it, so that a changed default shows.
 */
import { type ChildProcess, spawn } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { Commands } from '../src/actors/commands.js';
import { ActorHost } from '../src/actors/host.js';
import type { Sql } from '../src/persistence/db.js';
import { cpuSince, readCpu } from './cpu.js';
import { settleSetup } from './fixtures.js';
import {
  benchNames,
  dropStreams,
  NATS_URL,
  scratchDatabase,
  waitForConnections,
} from './scratch.js';
import { inTurns, n0, pool, print, ratio, sleep, table, until } from './stats.js';

const TASKS_PER_TICKET = 50;
const POOL_MAX = 10;
/**
 * pg-boss `work()` batch size. pg-boss 10.4.2 ships no docs in its package (the README
 * points at its site); its docs for 10.x (docs/readme.md, `work()`) say only "The default
 * options for `work()` is 1 job every 2 seconds" and give `batchSize` (default 1, "Same as
 * in fetch()") and `pollingIntervalSeconds` (default 2, at least 0.5) as the two knobs; no
 * number is recommended. Its source shows what bounds throughput: `src/worker.js` fetches,
 * awaits the handler, then sleeps `interval - duration` whenever more than 100 ms of the
 * interval is left, so one worker runs at most `batchSize` jobs per interval; `src/manager.js`
 * (`watch`) completes the whole batch in one `complete(name, jobIds)`. The only batch size
 * pg-boss itself passes to `work()` is 50 (its cron worker, `src/timekeeper.js`). 100 at the
 * 0.5 s minimum lets 8 workers reach 1,600 jobs/s, above graphile-worker's figures here,
 * so the polling ceiling is not what this figure measures.
 */
const PG_BOSS_BATCH = 100;
const PG_BOSS_WORKERS = 8;
/**
 * Our worker claims ahead by default (WORKER_CLAIM_AHEAD, 8 per slot) and settles what its
 * slots finish together. graphile-worker has both, off by default: a local queue of jobs
 * fetched and locked ahead (`localQueue.size`, its docs: "A good starting point is often
 * `concurrentJobs + 1`") and batched completions (`completeJobBatchDelay`, "Even setting
 * this to `0` can be impactful"). This row turns them on with as many jobs held as ours
 * holds (8 running + 64 ahead), beside the default run the ratio is read against.
 */
const GRAPHILE_LIKE_OURS = { localQueueSize: 72, completeJobBatchDelay: 0 };

interface Figure {
  name: string;
  jobs: number;
  seconds: number;
  note: string;
  /**
   * CPU ms per job of the queue's own process (its worker), of Postgres and of nats-server
   * (null for a queue that does not use NATS); null: unknown.
   */
  cpu: { queue: number; postgres: number; nats: number | null } | null;
  /** Bytes of write-ahead log per job over the drain: what the queue made Postgres write. */
  walPerJob: number | null;
}

/** Where the server's write-ahead log is now. */
async function walNow(sql: Sql): Promise<string> {
  const [r] = await sql<{ l: string }[]>`select pg_current_wal_lsn()::text as l`;
  return r?.l ?? '0/0';
}

/** Bytes of write-ahead log written on the server since `lsn`, per job. */
async function walPerJob(sql: Sql, lsn: string, jobs: number): Promise<number> {
  const [r] = await sql<{ b: string }[]>`
    select pg_wal_lsn_diff(pg_current_wal_lsn(), ${lsn}::pg_lsn)::text as b`;
  return Number(r?.b ?? 0) / jobs;
}

/**
 * CPU seconds this (the bench's) process used since `since`: where graphile-worker and
 * pg-boss run their workers. Its own polling for the end is in it too (a count every few ms).
 */
function ownSeconds(since: NodeJS.CpuUsage): number {
  const u = process.cpuUsage(since);
  return (u.user + u.system) / 1e6;
}

/** CPU ms per job from a measured window, or null when /proc was not readable. */
function perJob(
  used: Record<string, number>,
  queueKey: string,
  jobs: number,
  usesNats = false,
): Figure['cpu'] {
  const queue = used[queueKey];
  const postgres = used.postgres;
  if (queue === undefined || postgres === undefined) return null;
  const nats = used['nats-server'];
  return {
    queue: (queue * 1000) / jobs,
    postgres: (postgres * 1000) / jobs,
    nats: usesNats && nats !== undefined ? (nats * 1000) / jobs : null,
  };
}

export async function drainSection(o: { jobs: number }): Promise<void> {
  print('## Draining N no-op jobs through each queue’s own worker');
  print(
    `\n${n0(o.jobs)} jobs waiting; each queue's own worker drains them; one scratch database each on the same server\n`,
  );
  const figures: Figure[] = [];
  // BENCH_DRAIN_OURS=1: our worker alone, for before/after comparisons of it.
  const oursOnly = process.env.BENCH_DRAIN_OURS === '1';
  // Ours and graphile-worker x8, the ratio the issue sets, take turns: this machine's speed
  // drifts by a fifth within minutes, and one run of each, a minute apart, put that drift
  // into the ratio. Each is reported by its median run; every turn is listed below.
  const turns = await inTurns({
    ours: async () => perSecond(await ours(o.jobs)),
    ...(oursOnly ? {} : { graphile8: async () => perSecond(await graphile(o.jobs, 8)) }),
  });
  figures.push(turns.median.ours.figure);
  if (!oursOnly) {
    const g = turns.median as Record<string, { figure: Figure }>;
    figures.push((g.graphile8 as { figure: Figure }).figure);
    figures.push(await graphile(o.jobs, 32));
    figures.push(await graphile(o.jobs, 8, GRAPHILE_LIKE_OURS));
    figures.push(await pgBoss(o.jobs));
  }
  const g8 = (figures[1] ?? figures[0]) as Figure;
  print(
    table(
      [
        'queue',
        'jobs',
        'seconds',
        'jobs/s',
        'vs graphile-worker x8',
        'CPU ms/job: its process',
        'CPU ms/job: Postgres',
        'CPU ms/job: nats-server',
        'WAL bytes/job',
      ],
      figures.map((f) => [
        f.name,
        n0(f.jobs),
        f.seconds.toFixed(2),
        n0(f.jobs / f.seconds),
        ratio(f.jobs / f.seconds, g8.jobs / g8.seconds),
        f.cpu ? f.cpu.queue.toFixed(2) : '-',
        f.cpu ? f.cpu.postgres.toFixed(2) : '-',
        f.cpu?.nats != null ? f.cpu.nats.toFixed(2) : '-',
        f.walPerJob != null ? n0(f.walPerJob) : '-',
      ]),
    ),
  );
  print();
  const rows = turns.runs as Record<string, { perSecond: number }[]>;
  const ourTurns = rows.ours ?? [];
  const theirTurns = rows.graphile8 ?? [];
  print(
    `Turns (ours${oursOnly ? '' : ' / graphile-worker x8 = ratio'}, jobs/s): ${ourTurns
      .map((r, i) => {
        const g = theirTurns[i];
        return g
          ? `${n0(r.perSecond)} / ${n0(g.perSecond)} = ${ratio(r.perSecond, g.perSecond)}`
          : n0(r.perSecond);
      })
      .join('; ')}. Each queue's row above is its median turn.\n`,
  );
  print(
    'CPU ms/job: user + system CPU time (from /proc) of the process that runs the jobs, of every Postgres process and of nats-server (for the queue that uses NATS: ours relays every event to JetStream and reacts to them from it), over the drain, divided by the jobs; two cores serve all of them. WAL bytes/job: the server’s write-ahead log written over the same span (pg_current_wal_lsn), divided by the jobs: what each queue’s writes cost Postgres, the same on a fast machine and a slow one.\n',
  );
  for (const f of figures) print(`- ${f.name}: ${f.note}`);
}

function perSecond(figure: Figure): { perSecond: number; figure: Figure } {
  return { perSecond: figure.jobs / figure.seconds, figure };
}

async function ours(jobs: number): Promise<Figure> {
  const db = await scratchDatabase('drain_ours', { max: POOL_MAX });
  const names = benchNames();
  let child: ChildProcess | null = null;
  try {
    const tickets = Math.max(1, Math.ceil(jobs / TASKS_PER_TICKET));
    const host = new ActorHost(db.sql, {
      taskDefaults: { maxAttempts: 3, leaseMs: 30_000, retryBaseMs: 1_000 },
    });
    const commands = new Commands(host, {
      stuckAfterMs: 3_600_000,
      diagnosticCooldownMs: 3_600_000,
    });
    let left = jobs;
    await pool(tickets, 4, async () => {
      const n = Math.min(TASKS_PER_TICKET, left);
      left -= n;
      // Started first, so that its tasks belong to the phase it is in and complete it.
      await host.transact(async (uow) => {
        const t = await commands.createTicket(uow, { title: 'bench' });
        await uow.send('ticket', t.id, { type: 'START' });
        for (let i = 0; i < n; i++) {
          await commands.addTask(uow, t.id, {
            type: 'bench',
            executor: 'sleep',
            payload: { ms: 0 },
          });
        }
      });
    });
    // Relay the setup's events and let every reaction settle before the worker starts.
    await settleSetup(db.sql, host, names);

    const phases = await db.sql<{ phase: string }[]>`select distinct phase from tickets`;
    const phase = phases[0]?.phase;
    if (phases.length !== 1 || !phase) throw new Error('bench: tickets not in one phase');
    await sleep(500);
    await db.sql`select pg_stat_clear_snapshot()`;
    const [st0] = await db.sql<{ c: number; r: number }[]>`
      select xact_commit::int as c, xact_rollback::int as r
      from pg_stat_database where datname = current_database()`;
    const commitsBefore = st0?.c ?? 0;
    // Only BENCH_DEBUG reports rows per task: the plain run reads no table statistics.
    const rowsBefore: Rows = process.env.BENCH_DEBUG ? await tableRows(db.sql) : {};
    const rollbacksBefore = st0?.r ?? 0;
    // Its pool comes on top of ours: a shared server may not have the room at once.
    await waitForConnections(POOL_MAX + 10, 'drain_ours worker');
    const bin = fileURLToPath(new URL('../bin/orchestrator', import.meta.url));
    const spawned = performance.now();
    const nodeArgs = (process.env.BENCH_WORKER_NODE_ARGS ?? '').split(' ').filter(Boolean);
    child = spawn(process.execPath, [...nodeArgs, bin, 'worker'], {
      env: {
        ...process.env,
        DATABASE_URL: db.url,
        NATS_URL,
        NATS_PREFIX: names.prefix,
        NATS_STREAM: names.stream,
        WORKER_CONCURRENCY: '8',
        DB_POOL_MAX: String(POOL_MAX),
        LOG_LEVEL: process.env.BENCH_WORKER_LOG_LEVEL ?? 'warn',
      },
      stdio: ['ignore', process.env.BENCH_DEBUG ? 'inherit' : 'ignore', 'inherit'],
    });
    const exited = new Promise<number | null>((resolve) => child?.once('exit', resolve));
    let dead = false;
    void exited.then(() => {
      dead = true;
    });
    const pid = child.pid as number;
    // CPU from the first claim on: the process's start-up is not a job's cost.
    await until(
      async () => {
        if (dead) throw new Error('bench: the worker process exited');
        return (await db.sql`select 1 from tasks where state <> 'pending' limit 1`).length > 0;
      },
      120_000,
      'the worker to claim its first task',
      10,
    );
    const cpu0 = readCpu(pid);
    const wal0 = await walNow(db.sql);
    // Polls the tickets only (a few hundred rows): a ticket leaves its phase once all its
    // tasks are complete. Counting the tasks (a scan of all of them, 8 ms at 10,000) every
    // 100 ms took a tenth of a core from the server the worker was measured on; counting the
    // tickets, whose every version stays until a vacuum, still read 840 buffers a poll (1.7%
    // of Postgres's time per task, pg_stat_statements): the poll stops at the first one left.
    await until(
      async () => {
        if (dead) throw new Error('bench: the worker process exited');
        const left = await db.sql`select 1 from tickets where phase = ${phase} limit 1`;
        return left.length === 0;
      },
      1_800_000,
      'the worker to complete every task and every ticket to advance',
      100,
    );
    const used = cpuSince(cpu0, readCpu(pid));
    const wal = await walPerJob(db.sql, wal0, jobs);
    const wall = (performance.now() - spawned) / 1000;
    const [open] = await db.sql<{ n: number }[]>`
      select count(*)::int as n from tasks where state <> 'completed'`;
    if (open?.n !== 0) throw new Error(`bench: ${open?.n} tasks not completed`);
    child.kill('SIGTERM');
    await Promise.race([exited, sleep(15_000)]);
    const [span] = await db.sql<{ first: Date; last: Date; claims: number }[]>`
      select (select min(at) from events where type = 'task.claimed') as first,
        (select max(at) from events where type = 'ticket.phase_changed') as last,
        (select count(*)::int from events where type = 'task.claimed') as claims`;
    if (!span) throw new Error('bench: no events');
    if (process.env.BENCH_DEBUG) {
      const gaps = await db.sql`
        with e as (
          select entity_id, type, at, data->>'workerId' as w,
            lag(at) over (partition by entity_id order by seq) as prev
          from events where entity_type = 'task' and type like 'task.%')
        select type, count(*)::int as n,
          percentile_cont(0.5) within group (order by extract(epoch from at - prev) * 1000) as p50,
          avg(extract(epoch from at - prev) * 1000) as avg
        from e where prev is not null group by type`;
      process.stderr.write(`${JSON.stringify(gaps)}\n`);
      // Per slot: a task's claim to its completion, and the slot's last completion to its
      // next claim (time spent between tasks: the COMPLETE's commit to the next claim's).
      const slots = await db.sql`
        with c as (
          select e.entity_id, e.data->>'workerId' as w, e.at as claimed,
            (select d.at from events d where d.entity_id = e.entity_id
              and d.type = 'task.completed') as completed
          from events e where e.type = 'task.claimed'),
        s as (
          select w, claimed, completed,
            lag(completed) over (partition by w order by claimed) as prev_done
          from c)
        select
          percentile_cont(0.5) within group (order by extract(epoch from completed - claimed) * 1000) as claim_to_done_p50,
          avg(extract(epoch from completed - claimed) * 1000) as claim_to_done_avg,
          percentile_cont(0.5) within group (order by extract(epoch from claimed - prev_done) * 1000) as done_to_next_claim_p50,
          avg(extract(epoch from claimed - prev_done) * 1000) as done_to_next_claim_avg,
          count(distinct w)::int as slots
        from s`;
      process.stderr.write(`${JSON.stringify(slots)}\n`);
      // Whether the worker or the ticket's reactions set the figure: the worker is done at
      // its last completion; the count ends when the last ticket has heard of it.
      const ends = await db.sql`
        select extract(epoch from (select max(at) from events where type = 'task.completed')
            - (select min(at) from events where type = 'task.claimed')) as worker_seconds,
          extract(epoch from (select max(at) from events where type = 'ticket.phase_changed')
            - (select max(at) from events where type = 'task.completed')) as reactions_behind_seconds`;
      process.stderr.write(`${JSON.stringify(ends)}\n`);
      const tk = await db.sql`
        select type, count(*)::int as n from events where entity_type = 'ticket' group by type`;
      process.stderr.write(`${JSON.stringify(tk)}\n`);
      await sleep(500);
      await db.sql`select pg_stat_clear_snapshot()`;
      const st = await db.sql`
        select xact_commit - ${commitsBefore} as commits, xact_rollback - ${rollbacksBefore} as rollbacks
        from pg_stat_database where datname = current_database()`;
      process.stderr.write(`${JSON.stringify(st)}\n`);
      // Rows written per task, by table: what a task's life costs the database.
      const rowsAfter = await tableRows(db.sql);
      const perTask = Object.entries(rowsAfter).map(([t, a]) => {
        const b = rowsBefore[t] ?? { ins: 0, upd: 0, hot: 0, del: 0 };
        const per = (k: keyof typeof a) => ((a[k] - b[k]) / jobs).toFixed(2);
        return `${t} ins ${per('ins')} upd ${per('upd')} (hot ${per('hot')}) del ${per('del')}`;
      });
      process.stderr.write(`rows per task:\n  ${perTask.join('\n  ')}\n`);
    }
    if (span.claims !== jobs) throw new Error(`bench: ${span.claims} claims for ${jobs} tasks`);
    const seconds = (span.last.getTime() - span.first.getTime()) / 1000;
    return {
      name: 'ours (worker process x8)',
      jobs,
      seconds,
      cpu: perJob(used, `pid:${pid}`, jobs, true),
      walPerJob: wal,
      note: `a \`bin/orchestrator worker\` process, WORKER_CONCURRENCY=8, WORKER_CLAIM_AHEAD ${process.env.WORKER_CLAIM_AHEAD ?? 'default (8)'}, ${n0(tickets)} tickets of up to ${TASKS_PER_TICKET} \`sleep\` tasks (ms 0). Counted from the first claim to the last ticket's phase change (${wall.toFixed(1)} s from spawning the process, start-up included); ${n0(span.claims)} claims, one per task.`,
    };
  } finally {
    if (child && child.exitCode === null) child.kill('SIGKILL');
    await dropStreams(names).catch(() => {});
    await db.drop();
  }
}

type Rows = Record<string, { ins: number; upd: number; hot: number; del: number }>;

async function tableRows(sql: Sql): Promise<Rows> {
  await sql`select pg_stat_clear_snapshot()`;
  const rows = await sql<{ t: string; ins: number; upd: number; hot: number; del: number }[]>`
    select relname as t, n_tup_ins::int as ins, n_tup_upd::int as upd,
      n_tup_hot_upd::int as hot, n_tup_del::int as del
    from pg_stat_user_tables order by relname`;
  return Object.fromEntries(rows.map((r) => [r.t, r]));
}

async function graphile(
  jobs: number,
  concurrency: number,
  batching?: { localQueueSize: number; completeJobBatchDelay: number },
): Promise<Figure> {
  const db = await scratchDatabase(`drain_graphile${concurrency}${batching ? 'b' : ''}`, {
    max: 4,
    migrate: false,
  });
  try {
    const { Logger, makeWorkerUtils, run } = await import('graphile-worker');
    const logger = new Logger(() => () => {});
    const utils = await makeWorkerUtils({ connectionString: db.url, logger });
    await utils.migrate();
    // One statement for the backlog: its enqueue is not what is measured.
    await db.sql`
      select graphile_worker.add_jobs(
        array(select row('bench', json_build_object('i', i), null, null, null, null, null, null)::graphile_worker.job_spec
          from generate_series(1, ${jobs}) i))`;
    await utils.release();
    let done = 0;
    await waitForConnections(POOL_MAX + 10, `drain_graphile${concurrency} runner`);
    const started = performance.now();
    const cpu0 = readCpu();
    const own0 = process.cpuUsage();
    const wal0 = await walNow(db.sql);
    const runner = await run({
      connectionString: db.url,
      concurrency,
      maxPoolSize: POOL_MAX,
      noHandleSignals: true,
      logger,
      ...(batching
        ? {
            preset: {
              worker: {
                localQueue: { size: batching.localQueueSize },
                completeJobBatchDelay: batching.completeJobBatchDelay,
              },
            },
          }
        : {}),
      taskList: {
        bench: async () => {
          done++;
        },
      },
    });
    await until(() => done >= jobs, 1_800_000, 'graphile-worker to run every job', 2);
    await until(
      async () => {
        const [r] = await db.sql<{ n: number }[]>`
          select count(*)::int as n from graphile_worker.jobs`;
        return r?.n === 0;
      },
      60_000,
      'graphile-worker to complete every job',
      5,
    );
    const seconds = (performance.now() - started) / 1000;
    const used = { ...cpuSince(cpu0, readCpu()), own: ownSeconds(own0) };
    const wal = await walPerJob(db.sql, wal0, jobs);
    await runner.stop();
    return {
      name: `graphile-worker run() x${concurrency}${batching ? ', local queue + batched completes' : ''}`,
      jobs,
      seconds,
      cpu: perJob(used, 'own', jobs),
      walPerJob: wal,
      note: batching
        ? `its runner as above with \`localQueue: { size: ${batching.localQueueSize} }\` and \`completeJobBatchDelay: ${batching.completeJobBatchDelay}\` (both off by default): as many jobs held ahead as ours holds, completions batched as ours are.`
        : `its runner, \`run({ concurrency: ${concurrency} })\`, \`maxPoolSize\` ${POOL_MAX} (its default), every other setting default (poll interval, LISTEN/NOTIFY); counted from calling run() until its jobs table is empty.`,
    };
  } finally {
    await db.drop();
  }
}

async function pgBoss(jobs: number): Promise<Figure> {
  const db = await scratchDatabase('drain_pgboss', { max: 4, migrate: false });
  try {
    const { default: PgBoss } = await import('pg-boss');
    await waitForConnections(POOL_MAX + 10, 'drain_pgboss');
    const boss = new PgBoss({
      connectionString: db.url,
      max: POOL_MAX,
      supervise: false,
      schedule: false,
    });
    boss.on('error', () => {});
    await boss.start();
    await boss.createQueue('bench');
    for (let i = 0; i < jobs; i += 1_000) {
      await boss.insert(
        Array.from({ length: Math.min(1_000, jobs - i) }, (_, k) => ({
          name: 'bench',
          data: { i: i + k },
        })),
      );
    }
    let done = 0;
    const started = performance.now();
    const cpu0 = readCpu();
    const own0 = process.cpuUsage();
    const wal0 = await walNow(db.sql);
    for (let w = 0; w < PG_BOSS_WORKERS; w++) {
      await boss.work<{ i: number }>(
        'bench',
        { batchSize: PG_BOSS_BATCH, pollingIntervalSeconds: 0.5 },
        async (batch) => {
          done += batch.length;
        },
      );
    }
    const count = async () => {
      const [r] = await db.sql<{ n: number }[]>`
        select count(*)::int as n from pgboss.job where name = 'bench' and state = 'completed'`;
      return r?.n ?? 0;
    };
    await until(() => done >= jobs, 1_800_000, 'pg-boss to run every job', 2);
    await until(async () => (await count()) === jobs, 60_000, 'pg-boss to complete every job', 5);
    const seconds = (performance.now() - started) / 1000;
    const used = { ...cpuSince(cpu0, readCpu()), own: ownSeconds(own0) };
    const wal = await walPerJob(db.sql, wal0, jobs);
    await boss.stop({ graceful: false, close: true, wait: true });
    return {
      name: `pg-boss work() x${PG_BOSS_WORKERS}, batch ${PG_BOSS_BATCH}`,
      jobs,
      seconds,
      cpu: perJob(used, 'own', jobs),
      walPerJob: wal,
      note: `${PG_BOSS_WORKERS} \`work()\` workers, batchSize ${PG_BOSS_BATCH}, pollingIntervalSeconds 0.5 (its minimum; a worker sleeps what is left of the interval after every batch, so past its first batches, which come at once, it runs at most ${n0((PG_BOSS_WORKERS * PG_BOSS_BATCH) / 0.5)} jobs/s; its docs recommend no batch size), pool max ${POOL_MAX}; the batch is completed in one statement; counted until every job is completed.`,
    };
  } finally {
    await db.drop();
  }
}
