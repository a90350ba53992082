/**
 * `npm run soak -- --minutes 10`: a long, steady load on one `all` and one `worker` process
 * (a nats-server and a database of its own, the chaos run's mixed load without its faults),
 * sampling what grows when a process leaks: each process's resident memory, open
 * descriptors, V8 heap, active handles and event-loop delay (from its /metrics: the API's,
 * and the worker's OPS_PORT), the JetStream consumers, and the tables that must stay bounded. It prints the
 * samples, then judges the second half of the run against its first half (after a warm-up)
 * and exits 1 on a slope: a map keyed by ticket that is never pruned, a socket, timer or
 * consumer kept per request, a table that only grows.
 *
 * Flags: --minutes M (10) --rate TICKETS_PER_S (3) --sample-s S (10) --cache-mb MB (1: the
 * processes' ACTOR_CACHE_MAX_BYTES) --keep (keep the temp dir with logs and the database)
 * --log-level L (warn). Postgres: SOAK_DATABASE_URL or
 * TEST_DATABASE_URL (an admin URL), default postgres://postgres@127.0.0.1:5432/postgres.
 */
import { randomBytes } from 'node:crypto';
import { mkdtemp, readdir, readFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { jetstreamManager } from '@nats-io/jetstream';
import { connect } from '@nats-io/transport-node';
import { freePort } from '../src/infra/free-port.js';
import { createSql } from '../src/persistence/db.js';
import { migrate } from '../src/persistence/migrate.js';
import { unpublishedCount } from '../src/persistence/outbox-rows.js';
import {
  Database,
  harnessCleanup,
  Nats,
  type Orchestrator,
  orchestrators,
  type Sql,
} from './chaos/cluster.js';
import { Api, mixedLoad } from './chaos/load.js';
import { errorText, note, noteAs, Rng, sleep, waitUntil } from './chaos/util.js';

const { values: args } = parseArgs({
  options: {
    minutes: { type: 'string', default: '10' },
    rate: { type: 'string', default: '3' },
    'sample-s': { type: 'string', default: '10' },
    'cache-mb': { type: 'string', default: '1' },
    'log-level': { type: 'string', default: 'warn' },
    keep: { type: 'boolean', default: false },
  },
});

const num = (name: string, v: string | undefined, min: number, max: number): number => {
  const n = Number(v);
  if (!Number.isFinite(n) || n < min || n > max) {
    process.stderr.write(`--${name} must be a number from ${min} to ${max} (got ${String(v)})\n`);
    process.exit(2);
  }
  return n;
};

noteAs('soak');
const minutes = num('minutes', args.minutes, 1, 7 * 24 * 60);
const rate = num('rate', args.rate, 0.05, 100);
const sampleS = num('sample-s', args['sample-s'], 1, 3_600);
const cacheMb = num('cache-mb', args['cache-mb'], 0, 4_096);
const adminUrl =
  process.env.SOAK_DATABASE_URL ??
  process.env.TEST_DATABASE_URL ??
  'postgres://postgres@127.0.0.1:5432/postgres';

/** One sample of the run. Per process: memory (MB), descriptors, handles, event-loop delay. */
interface Sample {
  at: number;
  tickets: number;
  events: number;
  /** Tickets and tasks not yet in a final state, and the timer rows. */
  open: number;
  timers: number;
  rssMb: { all: number; worker: number };
  fds: { all: number; worker: number };
  heapMb: { all: number; worker: number };
  handles: { all: number; worker: number };
  loopP99Ms: { all: number; worker: number };
  consumers: number;
  /** Rows of the tables that must not grow with the work done. */
  bounded: Record<string, number>;
}

// ---- everything started here, for cleanup -------------------------------------------------

let dir: string | null = null;
let db: Database | null = null;
let nats: Nats | null = null;
let procs: Orchestrator[] = [];

const cleanup = harnessCleanup(() => ({ dir, db, nats, procs }), args.keep === true);

// ---- sampling ------------------------------------------------------------------------------

async function procStatus(pid: number | undefined): Promise<{ rssMb: number; fds: number }> {
  if (pid === undefined) return { rssMb: Number.NaN, fds: Number.NaN };
  try {
    const status = await readFile(`/proc/${pid}/status`, 'utf8');
    const kb = Number(/^VmRSS:\s+(\d+)/m.exec(status)?.[1]);
    const fds = (await readdir(`/proc/${pid}/fd`)).length;
    return { rssMb: kb / 1024, fds };
  } catch {
    return { rssMb: Number.NaN, fds: Number.NaN };
  }
}

function metric(text: string, name: string): number {
  return Number(new RegExp(`^${name} (\\S+)$`, 'm').exec(text)?.[1]);
}

/**
 * Tables whose rows must not follow the work done. (The timers follow the open work, and are
 * judged per open ticket or task; relay checkpoints and idempotency keys are kept for a day
 * by design, so a run shorter than that sees them grow.)
 */
const BOUNDED = ['inbox', 'relay_held', 'state_count_deltas', 'dead_letters'] as const;

const scrape = (p: Orchestrator, api: Api): Promise<string> =>
  fetch(`${p.opsUrl}/metrics`, { headers: api.auth(), signal: AbortSignal.timeout(10_000) }).then(
    (r) => r.text(),
  );

async function sample(
  sql: Sql,
  all: Orchestrator,
  worker: Orchestrator,
  api: Api,
  consumers: () => Promise<number>,
): Promise<Sample> {
  const [a, w, [ma, mw], [counts], bounded, unpublished, nConsumers] = await Promise.all([
    procStatus(all.child?.pid),
    procStatus(worker.child?.pid),
    Promise.all([scrape(all, api), scrape(worker, api)]),
    sql<{ tickets: number; events: number; open: number; timers: number }[]>`
      select (select count(*) from tickets)::int as tickets,
        (select count(*) from events)::int as events,
        ((select count(*) from tickets where state not in ('done', 'cancelled'))
          + (select count(*) from tasks
             where state not in ('completed', 'cancelled', 'failed')))::int as open,
        (select count(*) from timers)::int as timers`,
    Promise.all(
      BOUNDED.map(
        async (t) =>
          [
            t,
            (await sql<{ n: number }[]>`select count(*)::int as n from ${sql(t)}`)[0]?.n ?? 0,
          ] as const,
      ),
    ),
    unpublishedCount(sql),
    consumers(),
  ]);
  return {
    at: Date.now(),
    tickets: counts?.tickets ?? 0,
    events: counts?.events ?? 0,
    open: counts?.open ?? 0,
    timers: counts?.timers ?? 0,
    rssMb: { all: a.rssMb, worker: w.rssMb },
    fds: { all: a.fds, worker: w.fds },
    heapMb: {
      all: metric(ma, 'nodejs_heap_size_used_bytes') / 2 ** 20,
      worker: metric(mw, 'nodejs_heap_size_used_bytes') / 2 ** 20,
    },
    handles: {
      all: metric(ma, 'nodejs_active_resources'),
      worker: metric(mw, 'nodejs_active_resources'),
    },
    loopP99Ms: {
      all: metric(ma, 'nodejs_eventloop_lag_p99_seconds') * 1000,
      worker: metric(mw, 'nodejs_eventloop_lag_p99_seconds') * 1000,
    },
    consumers: nConsumers,
    bounded: { ...Object.fromEntries(bounded), unpublished },
  };
}

// ---- the verdict ---------------------------------------------------------------------------

const median = (xs: number[]): number => {
  const s = xs.filter(Number.isFinite).sort((x, y) => x - y);
  return s.length === 0 ? Number.NaN : (s[Math.floor((s.length - 1) / 2)] as number);
};
const min = (xs: number[]): number => Math.min(...xs.filter(Number.isFinite));

interface Judged {
  name: string;
  first: number;
  last: number;
  allowed: number;
  ok: boolean;
}

/**
 * The run after its warm-up (the first fifth) is split in halves: a figure whose second half
 * ends above what its first half allows grew with the work done. Heap is judged by its floor
 * (the lowest sample of each half: what is left after collections), the rest by medians.
 */
function judge(samples: Sample[]): Judged[] {
  const settled = samples.slice(Math.floor(samples.length / 5));
  const half = Math.floor(settled.length / 2);
  const one = settled.slice(0, half);
  const two = settled.slice(half);
  const out: Judged[] = [];
  const add = (
    name: string,
    pick: (s: Sample) => number,
    agg: (xs: number[]) => number,
    allow: (first: number) => number,
  ) => {
    const first = agg(one.map(pick));
    const last = agg(two.map(pick));
    const allowed = allow(first);
    // No figure (no samples, a process gone) is a finding too.
    out.push({ name, first, last, allowed, ok: Number.isFinite(last) && last <= allowed });
  };
  for (const p of ['all', 'worker'] as const) {
    add(
      `heap floor, ${p} (MB)`,
      (s) => s.heapMb[p],
      min,
      (f) => f * 1.25 + 8,
    );
  }
  add(
    'resident memory, all (MB)',
    (s) => s.rssMb.all,
    median,
    (f) => f * 1.25 + 16,
  );
  add(
    'resident memory, worker (MB)',
    (s) => s.rssMb.worker,
    median,
    (f) => f * 1.25 + 16,
  );
  add(
    'open descriptors, all',
    (s) => s.fds.all,
    median,
    (f) => f * 1.25 + 10,
  );
  add(
    'open descriptors, worker',
    (s) => s.fds.worker,
    median,
    (f) => f * 1.25 + 10,
  );
  for (const p of ['all', 'worker'] as const) {
    add(
      `active handles, ${p}`,
      (s) => s.handles[p],
      median,
      (f) => f * 1.25 + 10,
    );
  }
  add(
    'JetStream consumers',
    (s) => s.consumers,
    median,
    (f) => f + 2,
  );
  add(
    'timers per open ticket or task',
    (s) => s.timers / Math.max(1, s.open),
    median,
    (f) => f * 1.5 + 0.5,
  );
  for (const t of [...BOUNDED, 'unpublished']) {
    add(
      `rows: ${t}`,
      (s) => s.bounded[t] ?? 0,
      median,
      (f) => f * 1.5 + 50,
    );
  }
  return out;
}

// ---- the run -------------------------------------------------------------------------------

async function run(): Promise<number> {
  dir = await mkdtemp(join(tmpdir(), 'orch-soak-'));
  note(`dir ${dir}`);
  db = await Database.create(adminUrl);
  {
    const admin = createSql(db.url, { max: 1, applicationName: 'soak-harness' });
    await migrate(admin);
    await admin.end({ timeout: 1 });
  }
  const sql: Sql = db.pool(3);
  nats = new Nats(await freePort(), join(dir, 'nats'), join(dir, 'nats.log'));
  await nats.start();
  const hex = randomBytes(3).toString('hex');
  const stream = `SOAK_${hex.toUpperCase()}`;
  const apiToken = randomBytes(16).toString('hex');
  note(`database ${db.name}, nats-server on ${nats.url}`);

  procs = await orchestrators(
    {
      dir,
      adminUrl,
      leaseMs: 5_000,
      heartbeatMs: 1_250,
      workerConcurrency: 4,
      logLevel: args['log-level'] ?? 'warn',
      // A small actor cache fills within the warm-up: what the heap gains after it is not
      // the cache. (At 4 MiB it took about 7 minutes at 2 tickets/s, the heap of an entry
      // being several times its JSON; at the default 64 MiB, hours.)
      env: { ACTOR_CACHE_MAX_BYTES: String(cacheMb * 2 ** 20) },
    },
    { databaseUrl: db.url, natsUrl: nats.url, prefix: `soak${hex}`, stream, apiToken },
    { alls: 1, workers: 1 },
    (e) => {
      note(`UNEXPECTED EXIT of ${e.workerId}: code ${e.code} signal ${e.signal}`);
      exits.push(`${e.workerId} exited on its own (code ${e.code}, signal ${e.signal})`);
    },
  );
  const exits: string[] = [];
  await Promise.all(procs.map((p) => p.start(90_000)));
  const all = procs.find((p) => p.role === 'all') as Orchestrator;
  const worker = procs.find((p) => p.role === 'worker') as Orchestrator;
  note('cluster up');

  const api = new Api(() => [all.url as string], apiToken);
  const { load } = await mixedLoad(api, new Rng(randomBytes(4).readUInt32BE()), {
    markerFile: join(dir, 'executions.log'),
    rate,
  });

  const nc = await connect({ servers: nats.url, timeout: 5_000 });
  const jsm = await jetstreamManager(nc);
  const consumers = async () => (await jsm.streams.info(stream)).state.consumer_count;

  const samples: Sample[] = [];
  load.start();
  note(`load: ${rate} tickets/s, 2 agents, 2 SSE readers, for ${minutes} min`);
  const end = Date.now() + minutes * 60_000;
  const header =
    'min  tickets   events   open  rss all/worker MB  heap all/worker MB  fds all/worker  handles all/worker  loop p99 ms all/worker  consumers  timers  unpublished';
  note(header);
  while (Date.now() < end) {
    await sleep(Math.min(sampleS * 1_000, end - Date.now()));
    const s = await sample(sql, all, worker, api, consumers).catch((error: unknown) => {
      note(`sample failed: ${errorText(error)}`);
      return null;
    });
    if (s === null) continue;
    samples.push(s);
    note(
      [
        ((s.at - (end - minutes * 60_000)) / 60_000).toFixed(1).padStart(4),
        String(s.tickets).padStart(8),
        String(s.events).padStart(8),
        String(s.open).padStart(6),
        `${s.rssMb.all.toFixed(0)} / ${s.rssMb.worker.toFixed(0)}`.padStart(17),
        `${s.heapMb.all.toFixed(1)} / ${s.heapMb.worker.toFixed(1)}`.padStart(18),
        `${s.fds.all} / ${s.fds.worker}`.padStart(14),
        `${s.handles.all} / ${s.handles.worker}`.padStart(18),
        `${s.loopP99Ms.all.toFixed(1)} / ${s.loopP99Ms.worker.toFixed(1)}`.padStart(22),
        String(s.consumers).padStart(10),
        String(s.timers).padStart(7),
        String(s.bounded.unpublished).padStart(12),
      ].join(' '),
    );
  }

  note('load over: no new tickets; settling');
  load.stopCreating();
  const driversDone = await load.driversDone(120_000);
  const drained = await waitUntil(
    async () => {
      const [r] = await sql<{ open: number }[]>`
        select (select count(*) from tickets where state not in ('done', 'cancelled'))::int as open`;
      return r?.open === 0 && (await unpublishedCount(sql)) === 0;
    },
    60_000,
    250,
  );
  await load.stop();
  const [left] = await sql<{ timers: number }[]>`select count(*)::int as timers from timers`;
  await nc.close();
  const codes = await Promise.all(procs.map(async (p) => [p.workerId, await p.stop()] as const));

  const verdict = judge(samples);
  const failures: string[] = [...exits];
  if (!driversDone || !drained) failures.push('did not settle within 3 minutes of the load');
  if ((left?.timers ?? 0) > 0) failures.push(`${left?.timers} timers left once all was done`);
  for (const [id, code] of codes) if (code !== 0) failures.push(`${id} exited ${code} on SIGTERM`);
  for (const j of verdict) {
    if (!j.ok)
      failures.push(
        `${j.name} grew: ${j.first.toFixed(1)} → ${j.last.toFixed(1)} (allowed ${j.allowed.toFixed(1)})`,
      );
  }
  const done = samples[samples.length - 1];
  process.stdout.write(
    [
      '',
      `SOAK REPORT  (${minutes} min at ${rate} tickets/s: ${done?.tickets ?? 0} tickets, ${done?.events ?? 0} events, ${api.stats.ok} requests; ${load.counters.ticketsDone} done, ${load.counters.ticketsCancelled} cancelled, ${load.counters.sseSessions} SSE sessions)`,
      '',
      'figure (after the warm-up)            first half  second half  allowed  ok',
      ...verdict.map(
        (j) =>
          `${j.name.padEnd(36)} ${j.first.toFixed(1).padStart(10)} ${j.last.toFixed(1).padStart(12)} ${j.allowed.toFixed(1).padStart(8)}  ${j.ok ? 'yes' : 'NO'}`,
      ),
      '',
      failures.length === 0 ? 'RESULT: no growth found' : `RESULT: ${failures.length} finding(s)`,
      ...failures.map((f) => `  - ${f}`),
      '',
    ].join('\n'),
  );
  return failures.length === 0 ? 0 : 1;
}

let code = 1;
try {
  code = await run();
} catch (error) {
  process.stderr.write(
    `soak run failed: ${error instanceof Error ? (error.stack ?? error.message) : String(error)}\n`,
  );
} finally {
  await cleanup();
}
process.exit(code);
