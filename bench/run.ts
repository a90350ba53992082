/**
 * `npm run bench`: every figure beside its raw baseline from the same run.
 *
 * Sections (default all, in this order): decide, host, relay, reactions, http, sse, peers, drain,
 * bigticket, growth, scrape, output, workflows. Choose with
 * `npm run bench -- --only relay,http` or BENCH_ONLY=relay,http. Each section creates its
 * own scratch database (and NATS streams) and drops them afterwards.
 *
 * Environment: BENCH_DATABASE_URL (an admin URL of the server to use; default the local
 * PostgreSQL), BENCH_NATS_URL (default nats://127.0.0.1:4222), BENCH_SECONDS (duration of
 * each timed measurement, default 3), BENCH_CONCURRENCY (host section, default 1,8,64),
 * BENCH_JOBS (peers section, default 1000), BENCH_PEER_JOBS (drain section, default 20000), BENCH_GROWTH_TICKETS (default 100000),
 * BENCH_GROWTH_TASKS (tasks on the large ticket of the growth section, default 2000),
 * BENCH_SCRAPE_TASKS (tasks stored for the scrape section's second figure, default 100000),
 * BENCH_REACTION_SECONDS (the reactions section's loaded run, default 60),
 * BENCH_REACTION_CONCURRENCY (its COMPLETE loops, default 16), BENCH_REACTION_TASKS (tasks
 * made ready for it, default 1,600 per second of the run), BENCH_REACTION_BASELINE=1 (run it
 * again with one message per transaction), VACUUM_INTERVAL_MS (the queue vacuum beside the
 * reactions section's host, as in the runtime; 0 turns it off), BENCH_SSE_CLIENTS (sse section, default 1000),
 * BENCH_BIG_TICKET_TASKS (tasks of the ticket the bigticket section reads while it drains,
 * default 5000), BENCH_BIG_TICKET_SPLIT=1 (its reads from an `api` process, its draining in a
 * `worker` process, instead of one `all` process).
 */
import { readFileSync } from 'node:fs';
import os from 'node:os';
import { connect } from '@nats-io/transport-node';
import postgres from 'postgres';
import { bigTicketSection } from './bigticket.js';
import { decideSection } from './decide.js';
import { drainSection } from './drain.js';
import { growthSection } from './growth.js';
import { benchHost, benchRaw, benchRawMinimal, prepareHostBatched } from './host-vs-raw.js';
import { httpSection } from './http.js';
import { outputSection } from './output.js';
import { peersSection } from './peers.js';
import { reactionsSection } from './reactions.js';
import { relaySection } from './relay.js';
import { scrapeSection } from './scrape.js';
import { ADMIN_URL, NATS_URL, scratchDatabase } from './scratch.js';
import { sseSection } from './sse.js';
import { fmt, inTurns, print, TURNS } from './stats.js';
import { workflowsSection } from './workflows.js';

const SECTIONS = [
  'decide',
  'host',
  'relay',
  'reactions',
  'http',
  'sse',
  'peers',
  'drain',
  'bigticket',
  'growth',
  'scrape',
  'output',
  'workflows',
] as const;
type Section = (typeof SECTIONS)[number];

const seconds = Number(process.env.BENCH_SECONDS ?? 3);
const concurrencies = (process.env.BENCH_CONCURRENCY ?? '1,8,64').split(',').map(Number);
const jobs = Number(process.env.BENCH_JOBS ?? 1000);
const peerJobs = Number(process.env.BENCH_PEER_JOBS ?? 20_000);
const growthTickets = Number(process.env.BENCH_GROWTH_TICKETS ?? 100_000);
const scrapeTasks = Number(process.env.BENCH_SCRAPE_TASKS ?? 100_000);
const reactionSeconds = Number(process.env.BENCH_REACTION_SECONDS ?? 60);
const reactionConcurrency = Number(process.env.BENCH_REACTION_CONCURRENCY ?? 16);
const reactionTasks = Number(process.env.BENCH_REACTION_TASKS ?? reactionSeconds * 1_600);
const sseClients = Number(process.env.BENCH_SSE_CLIENTS ?? 1_000);
const bigTicketTasks = Number(process.env.BENCH_BIG_TICKET_TASKS ?? 5_000);

function selected(): Section[] {
  const argv = process.argv.slice(2);
  let only = process.env.BENCH_ONLY ?? '';
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i] as string;
    if (a === '--only') only = argv[i + 1] ?? '';
    else if (a.startsWith('--only=')) only = a.slice('--only='.length);
  }
  if (!only.trim()) return [...SECTIONS];
  const names = only
    .split(',')
    .map((s) => s.trim())
    .filter(Boolean);
  const unknown = names.filter((n) => !(SECTIONS as readonly string[]).includes(n));
  if (unknown.length > 0) {
    throw new Error(
      `unknown bench section(s): ${unknown.join(', ')} (known: ${SECTIONS.join(', ')})`,
    );
  }
  return SECTIONS.filter((s) => names.includes(s));
}

function pkgVersion(name: string): string {
  try {
    const url = new URL(`../node_modules/${name}/package.json`, import.meta.url);
    return (JSON.parse(readFileSync(url, 'utf8')) as { version: string }).version;
  } catch {
    return '?';
  }
}

async function machine(): Promise<void> {
  const admin = postgres(ADMIN_URL, { max: 1, onnotice: () => {} });
  const [pg] = await admin<{ v: string }[]>`select current_setting('server_version') as v`;
  await admin.end();
  const nc = await connect({ servers: NATS_URL });
  const natsVersion = nc.info?.version ?? '?';
  await nc.close();
  const cpus = os.cpus();
  print('# npm run bench');
  print(
    `machine: ${cpus.length} cores, ${cpus[0]?.model ?? '?'}, ${(os.totalmem() / 2 ** 30).toFixed(1)} GiB RAM; load average ${os
      .loadavg()
      .map((l) => l.toFixed(2))
      .join(' ')}`,
  );
  print(`node ${process.version}; PostgreSQL ${pg?.v ?? '?'}; nats-server ${natsVersion}`);
  print(
    `packages: ${[
      'xstate',
      'postgres',
      '@nats-io/jetstream',
      '@nats-io/transport-node',
      'hono',
      '@hono/node-server',
      'graphile-worker',
      'pg-boss',
      'pg',
    ]
      .map((p) => `${p} ${pkgVersion(p)}`)
      .join(', ')}`,
  );
  print(`each timed figure: ${seconds}s`);
}

async function hostSection(): Promise<void> {
  print('## Actor host vs raw SQL (issue 3)');
  print(
    `entities alternate BLOCK/UNBLOCK (1 event-log row and a timer upsert or delete per transition); raw = the same statements by hand; min = only the snapshot compare-and-set and the event insert; at each concurrency raw, min and host take turns, ${TURNS} runs each, and each row shows each one's median run\n`,
  );
  const db = await scratchDatabase('host', { max: 70 });
  try {
    print(
      'concurrency |  host tx/s |   raw tx/s |  ratio | min tx/s | vs min | host p50 ms | raw p50 ms | min p50 ms | host p99 ms | raw p99 ms | min p99 ms',
    );
    print(
      '------------|------------|------------|--------|----------|--------|-------------|------------|------------|-------------|------------|-----------',
    );
    let raw64: number | null = null;
    for (const c of concurrencies) {
      // The three take turns, TURNS runs each, and each reports its median run.
      const { raw, min, host } = (
        await inTurns({
          raw: () => benchRaw(db.sql, c, seconds * 1000),
          min: () => benchRawMinimal(db.sql, c, seconds * 1000),
          host: () => benchHost(db.sql, c, seconds * 1000),
        })
      ).median;
      print(
        `${String(c).padStart(11)} | ${fmt(host.perSecond, 0)}  | ${fmt(raw.perSecond, 0)}  | ${(host.perSecond / raw.perSecond).toFixed(2).padStart(6)} | ${fmt(min.perSecond, 0).padStart(8)} | ${(host.perSecond / min.perSecond).toFixed(2).padStart(6)} | ${fmt(host.p50, 2)}   | ${fmt(raw.p50, 2)}  | ${fmt(min.p50, 2)}  | ${fmt(host.p99, 2)}   | ${fmt(raw.p99, 2)}  | ${fmt(min.p99, 2)}`,
      );
      if (c === 64) raw64 = raw.perSecond;
    }
    if (raw64 !== null) {
      // The same host with group commit off (a transaction per unit, as many as the callers).
      const alone = await benchHost(db.sql, 64, seconds * 1000, {
        commitLanes: 64,
        commitBatchMax: 1,
      });
      print(
        `64, no group | ${fmt(alone.perSecond, 0)}  | ${fmt(raw64, 0)}  | ${(alone.perSecond / raw64).toFixed(2).padStart(6)} |        - |      - | ${fmt(alone.p50, 2)}   |          - |          - | ${fmt(alone.p99, 2)}   |          - |          -`,
      );
      // Issue 3's experiment: 64 entities, 8 of them per transaction (p50/p99 per transaction).
      const batched = await (await prepareHostBatched(db.sql, 64, 8))(seconds * 1000);
      print(
        `   64, 8/tx | ${fmt(batched.perSecond, 0)}  | ${fmt(raw64, 0)}  | ${(batched.perSecond / raw64).toFixed(2).padStart(6)} |        - |      - | ${fmt(batched.p50, 2)}   |          - |          - | ${fmt(batched.p99, 2)}   |          - |          -`,
      );
    }
  } finally {
    await db.drop();
  }
}

async function main(): Promise<void> {
  const sections = selected();
  const started = performance.now();
  await machine();
  for (const s of sections) {
    print();
    const t0 = performance.now();
    if (s === 'decide') decideSection({ iterations: 5_000 });
    if (s === 'host') await hostSection();
    if (s === 'relay') {
      await relaySection({ seconds, events: 20_000, reactionsAlone: 100, reactionsLoaded: 400 });
    }
    if (s === 'reactions') {
      await reactionsSection({
        seconds: reactionSeconds,
        concurrency: reactionConcurrency,
        tasks: reactionTasks,
        alone: 200,
      });
    }
    if (s === 'http') await httpSection({ seconds, sseClients: 100 });
    if (s === 'sse') await sseSection({ clients: sseClients, samples: 100 });
    if (s === 'peers') await peersSection({ jobs, concurrency: 8 });
    if (s === 'drain') await drainSection({ jobs: peerJobs });
    if (s === 'bigticket') await bigTicketSection({ tasks: bigTicketTasks, seconds });
    if (s === 'growth')
      await growthSection({
        seconds,
        tickets: growthTickets,
        cachedActors: 10_000,
        tasksPerTicket: Number(process.env.BENCH_GROWTH_TASKS ?? 2_000),
      });
    if (s === 'scrape') await scrapeSection({ sizes: [1_000, scrapeTasks], reads: 200 });
    if (s === 'output') await outputSection({ seconds });
    if (s === 'workflows') await workflowsSection({ seconds, concurrency: 8 });
    print(`\n(${s}: ${((performance.now() - t0) / 1000).toFixed(0)}s)`);
  }
  print(
    `\ntotal ${((performance.now() - started) / 1000).toFixed(0)}s; load average now ${os
      .loadavg()
      .map((l) => l.toFixed(2))
      .join(' ')}`,
  );
}

await main();
