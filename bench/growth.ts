/**
 * How cost grows.
 * - Tasks per ticket: adding a task to a ticket (its TASK_ADDED and the task's creation, one
 *   transaction) and applying a task's news to it (TASK_STATE, `forwardTaskState`), on a
 *   ticket with 10 tasks and on one with BENCH_GROWTH_TASKS (2,000): the cost must not grow
 *   with the tasks the ticket holds.
 * - Command latency with 1,000 and then N (100,000) tickets stored: the tickets (and two
 *   event-log rows each) bulk-inserted with `insert ... select generate_series`, their
 *   snapshots copies of a real one. At each size, at concurrency 1: a transition on a cached
 *   actor (hot), on a random stored ticket loaded from Postgres (cold: the cache forgotten),
 *   and the raw-SQL statements of host-vs-raw.ts.
 * - Memory per cached actor: a child process (--expose-gc) caches 10,000 stored tickets in
 *   an ActorHost; heap growth after a full GC / actors cached.
 * - Throughput as processes are added: 1, 2, 4 child processes each running the host
 *   workload of host-vs-raw.ts (concurrency 8 each) against the same database, started
 *   together; beside the raw-SQL workload in as many processes.
 */
import type { ChildProcess } from 'node:child_process';
import { Commands } from '../src/actors/commands.js';
import { ActorHost } from '../src/actors/host.js';
import type { Sql } from '../src/persistence/db.js';
import { forwardTaskState } from '../src/policies/index.js';
import { prepareRaw } from './host-vs-raw.js';
import {
  forkTs,
  isType,
  nextMessage,
  type Scratch,
  scratchDatabase,
  waitForConnections,
} from './scratch.js';
import { type LatencyStats, loop, ms, n0, print, ratio, summarize, table } from './stats.js';

const TASK_DEFAULTS = { maxAttempts: 3, leaseMs: 600_000, retryBaseMs: 1_000 };

export interface GrowthOptions {
  seconds: number;
  tickets: number;
  cachedActors: number;
  /** Tasks on the large ticket of the tasks-per-ticket figure. */
  tasksPerTicket: number;
}

export async function growthSection(o: GrowthOptions): Promise<void> {
  print('## How cost grows (issue 8)');
  const db = await scratchDatabase('growth', { max: 12 });
  try {
    await tasksPerTicket(db, o);
    await latencyBySize(db, o);
    await memoryPerActor(db, o);
    await processes(db, o);
  } finally {
    await db.drop();
  }
}

/**
 * One ticket with 10 tasks, one with `o.tasksPerTicket`: on each, SAMPLES times, a task added
 * (timed), cancelled (untimed, its own transaction), and the news of it applied to the ticket
 * (timed), as the reactions do. Both tickets are cached in the host, as a busy ticket is.
 */
async function tasksPerTicket(db: Scratch, o: GrowthOptions): Promise<void> {
  const SAMPLES = 200;
  const host = new ActorHost(db.sql, { taskDefaults: TASK_DEFAULTS });
  const commands = new Commands(host, { stuckAfterMs: 3_600_000, diagnosticCooldownMs: 0 });
  const rows: (string | number)[][] = [];
  const medians: { add: number; news: number }[] = [];
  for (const size of [10, o.tasksPerTicket]) {
    const { value: ticket } = await host.transact((u) =>
      commands.createTicket(u, { title: `tasks-${size}` }),
    );
    await host.send('ticket', ticket.id, { type: 'START' });
    const t0 = performance.now();
    // The first task stays open, so the phase never completes and the ticket stays put.
    for (let i = 0; i < size; i++) {
      await host.transact((u) => commands.addTask(u, ticket.id, { type: 'bench' }));
    }
    const fillSeconds = (performance.now() - t0) / 1000;
    const add: number[] = [];
    const news: number[] = [];
    for (let i = 0; i < SAMPLES; i++) {
      const a0 = performance.now();
      const { value: task } = await host.transact((u) =>
        commands.addTask(u, ticket.id, { type: 'bench' }),
      );
      add.push(performance.now() - a0);
      await host.send('task', task.id, { type: 'CANCEL', reason: 'bench' });
      const s0 = performance.now();
      await host.transact((u) => forwardTaskState(u, task.id));
      news.push(performance.now() - s0);
    }
    const a = summarize(add, 0);
    const n = summarize(news, 0);
    medians.push({ add: a.p50, news: n.p50 });
    rows.push([n0(size), ms(a.p50), ms(a.p99), ms(n.p50), ms(n.p99), fillSeconds.toFixed(1)]);
  }
  const [small, large] = medians;
  print(`\n### Tasks per ticket (${SAMPLES} adds and news on each ticket, concurrency 1)\n`);
  print(
    table(
      [
        'tasks on the ticket',
        'add p50 ms',
        'add p99 ms',
        'news p50 ms',
        'news p99 ms',
        'filled in s',
      ],
      rows,
    ),
  );
  if (small && large) {
    print(
      `\nlarge / small, p50: add ${ratio(large.add, small.add)}x, news ${ratio(large.news, small.news)}x`,
    );
  }
}

/** Adds stored tickets `from`..`to`-1 (ids growth-<i>), copies of a real one. */
async function bulkTickets(sql: Sql, template: string, from: number, to: number): Promise<void> {
  const chunk = 25_000;
  for (let start = from; start < to; start += chunk) {
    const end = Math.min(to, start + chunk);
    await sql`insert into tickets (id, state, phase, title, machine_version, snapshot, version, seq, created_at, updated_at)
      select 'growth-' || i, t.state, t.phase, t.title, t.machine_version,
        jsonb_set(t.snapshot, '{context,id}', to_jsonb('growth-' || i)), 2, 2,
        now() - make_interval(secs => i), now() - make_interval(secs => i)
      from tickets t, generate_series(${start}::int, ${end - 1}::int) as i where t.id = ${template}`;
    await sql`insert into events (event_id, entity_type, entity_id, seq, type, data, at)
      select gen_random_uuid(), 'ticket', 'growth-' || i, s.seq, s.type, s.data, now() - make_interval(secs => i)
      from generate_series(${start}::int, ${end - 1}::int) as i,
        (select seq, type, data from events where entity_id = ${template}) as s`;
  }
  await sql`analyze tickets`;
  await sql`analyze events`;
}

async function latencyBySize(db: Scratch, o: GrowthOptions): Promise<void> {
  const host = new ActorHost(db.sql, { taskDefaults: TASK_DEFAULTS });
  const template = 'growth-template';
  await host.create('ticket', {
    id: template,
    title: 'bench',
    stuckAfterMs: 3_600_000,
    diagnosticCooldownMs: 0,
  });
  await host.send('ticket', template, { type: 'START' });
  // Warm-up outside the timing: JIT, pool connections, prepared statements.
  const warmId = 'growth-warm-up';
  await host.create('ticket', {
    id: warmId,
    title: 'bench',
    stuckAfterMs: 3_600_000,
    diagnosticCooldownMs: 0,
  });
  await host.send('ticket', warmId, { type: 'START' });
  let warm = false;
  await loop(1, 1_000, async () => {
    warm = !warm;
    await host.send('ticket', warmId, warm ? { type: 'BLOCK', reason: 'w' } : { type: 'UNBLOCK' });
  });
  await (await prepareRaw(db.sql, 1))(500);
  const sizes = [1_000, o.tickets];
  const rows: (string | number)[][] = [];
  const results: { hot: LatencyStats; cold: LatencyStats; raw: LatencyStats }[] = [];
  let stored = 0;
  const blocked = new Set<string>();
  for (const size of sizes) {
    const t0 = performance.now();
    await bulkTickets(db.sql, template, stored, size);
    const insertSeconds = (performance.now() - t0) / 1000;
    stored = size;
    const durationMs = o.seconds * 1000;
    // Hot: one cached ticket (first touch outside the timing).
    const hotId = `growth-${size - 1}`;
    await host.send('ticket', hotId, { type: 'BLOCK', reason: 'bench' });
    blocked.add(hotId);
    const hot = await loop(1, durationMs, async () => {
      const b = blocked.has(hotId);
      if (b) blocked.delete(hotId);
      else blocked.add(hotId);
      await host.send(
        'ticket',
        hotId,
        b ? { type: 'UNBLOCK' } : { type: 'BLOCK', reason: 'bench' },
      );
    });
    // Cold: a random stored ticket each time, read from Postgres.
    const cold = await loop(1, durationMs, async () => {
      const id = `growth-${Math.floor(Math.random() * size)}`;
      const b = blocked.has(id);
      if (b) blocked.delete(id);
      else blocked.add(id);
      host.forget('ticket', id);
      await host.send('ticket', id, b ? { type: 'UNBLOCK' } : { type: 'BLOCK', reason: 'bench' });
    });
    const raw = await (await prepareRaw(db.sql, 1))(durationMs);
    results.push({ hot, cold, raw });
    rows.push([
      `${n0(size)} (+${insertSeconds.toFixed(1)}s to insert)`,
      ms(hot.p50),
      ms(hot.p99),
      ms(cold.p50),
      ms(cold.p99),
      ms(raw.p50),
      ms(raw.p99),
      ratio(hot.p50, raw.p50),
    ]);
  }
  const [small, big] = results;
  if (small && big) {
    rows.push([
      `${n0(o.tickets)} / 1,000`,
      ratio(big.hot.p50, small.hot.p50),
      ratio(big.hot.p99, small.hot.p99),
      ratio(big.cold.p50, small.cold.p50),
      ratio(big.cold.p99, small.cold.p99),
      ratio(big.raw.p50, small.raw.p50),
      ratio(big.raw.p99, small.raw.p99),
      '',
    ]);
  }
  print(
    '\n### Command latency by tickets stored (BLOCK/UNBLOCK, concurrency 1; each ticket has 2 event-log rows)\n',
  );
  print(
    table(
      [
        'tickets stored',
        'hot p50 ms',
        'hot p99 ms',
        'cold p50 ms',
        'cold p99 ms',
        'raw SQL p50 ms',
        'raw p99 ms',
        'hot / raw p50',
      ],
      rows,
    ),
  );
  print('hot: the actor is cached; cold: a random stored ticket, read (FOR UPDATE) from Postgres');
}

async function memoryPerActor(db: Scratch, o: GrowthOptions): Promise<void> {
  await waitForConnections(10, 'memory');
  const child = forkTs('./growth-child.ts', [], ['--expose-gc']);
  try {
    // Tickets from the middle of the stored range (the latency runs touched few of them).
    const first = Math.floor(o.tickets / 2) - o.cachedActors;
    const ids = Array.from({ length: o.cachedActors }, (_, i) => `growth-${first + i}`);
    child.send({ type: 'memory', url: db.url, ids });
    type Memory = { type: 'memory'; cached: number; bytes: number; snapshotJson: number };
    const m = await nextMessage<Memory>(child, isType<Memory>('memory'), 300_000);
    print(`\n### Memory per cached actor (${n0(m.cached)} tickets cached in one ActorHost)\n`);
    print(
      table(
        ['measure', 'value'],
        [
          ['heap growth after full GC', `${(m.bytes / 2 ** 20).toFixed(1)} MiB`],
          ['per cached actor', `${n0(m.bytes / Math.max(1, m.cached))} bytes`],
          ['its snapshot as JSON text (for scale)', `${n0(m.snapshotJson)} bytes`],
        ],
      ),
    );
  } finally {
    child.kill();
  }
}

type Done = { type: 'done'; stats: LatencyStats; samples: number[] };

async function processes(db: Scratch, o: GrowthOptions): Promise<void> {
  const counts = [1, 2, 4];
  const concurrency = 8;
  const measure = async (mode: 'host' | 'raw', n: number) => {
    const children: ChildProcess[] = [];
    await waitForConnections(n * (concurrency + 2) + 5, `${n} processes`);
    try {
      for (let i = 0; i < n; i++) children.push(forkTs('./growth-child.ts'));
      await Promise.all(
        children.map(async (c) => {
          c.send({ type: 'load', url: db.url, mode, concurrency });
          await nextMessage(c, isType('ready'));
        }),
      );
      const done = await Promise.all(
        children.map(async (c) => {
          c.send({ type: 'go', seconds: o.seconds });
          return nextMessage<Done>(c, isType<Done>('done'));
        }),
      );
      const perSecond = done.reduce((a, d) => a + d.stats.perSecond, 0);
      const merged = summarize(
        done.flatMap((d) => d.samples),
        o.seconds,
      );
      return { perSecond, p50: merged.p50, p99: merged.p99 };
    } finally {
      for (const c of children) c.kill();
    }
  };
  const rows: (string | number)[][] = [];
  let base = 0;
  for (const n of counts) {
    const host = await measure('host', n);
    const raw = await measure('raw', n);
    if (n === 1) base = host.perSecond;
    rows.push([
      n,
      n0(host.perSecond),
      ratio(host.perSecond, base),
      ms(host.p50),
      ms(host.p99),
      n0(raw.perSecond),
      ms(raw.p99),
      ratio(host.perSecond, raw.perSecond),
    ]);
  }
  print(
    `\n### Throughput as processes are added (each: the host workload at concurrency ${concurrency}, own pool, same database)\n`,
  );
  print(
    table(
      [
        'processes',
        'host tx/s (sum)',
        'vs 1 process',
        'p50 ms',
        'p99 ms',
        'raw SQL tx/s (same processes)',
        'raw p99 ms',
        'host / raw',
      ],
      rows,
    ),
  );
}
