/**
 * Reactions keeping up with completions: the task_state reaction (relay → JetStream →
 * consumer → TASK_STATE to the ticket) against the highest completion rate this process
 * sustains.
 *
 * Setup: tickets of TASKS_PER_TICKET tasks, every task claimed and started (one transaction
 * per ticket), and the setup's news relayed and reacted to before anything is timed.
 * - Alone: one COMPLETE at a time, each waiting for its reaction.
 * - Under load: `concurrency` loops send COMPLETE back to back for `seconds`, taking the
 *   tasks ticket by ticket (as a worker draining tickets does), without waiting for the
 *   reactions. Completions/s and reactions/s over that window, their ratio, the backlog
 *   (completions committed and not yet reacted to, read every 100 ms) as means over the
 *   seconds before half time and before the end and as its trend over the second half, and the
 *   latency from the completion's commit (host.onCommit) to the commit of the reaction that
 *   applied it (the consumer's or the early path's onApplied), until the backlog is gone.
 * Each pass runs with early reactions (the default), then with the consumers alone.
 * With BENCH_REACTION_BASELINE=1 the load runs a second time with batches of one message
 * (each message its own transaction, as before batching) for a before/after figure.
 */
import { jetstreamManager } from '@nats-io/jetstream';
import { Commands } from '../src/actors/commands.js';
import { ActorHost } from '../src/actors/host.js';
import { configWith } from '../src/config.js';
import { silentLogger } from '../src/log.js';
import type { EventEntry } from '../src/persistence/event-log.js';
import { QueueVacuum } from '../src/persistence/queue-vacuum.js';
import { Transport } from '../src/transport/index.js';
import { benchTransportOptions } from './fixtures.js';
import { benchNames, dropStreams, type Scratch, scratchDatabase } from './scratch.js';
import { ms, n0, pool, print, ratio, summarize, table, until } from './stats.js';

const TASK_DEFAULTS = { maxAttempts: 3, leaseMs: 3_600_000, retryBaseMs: 1_000 };
const TASKS_PER_TICKET = 20;
/** The runtime's defaults (VACUUM_INTERVAL_MS, VACUUM_DEAD_ROWS; VACUUM_INTERVAL_MS=0 turns it off). */
const config = configWith(
  process.env.VACUUM_INTERVAL_MS ? { VACUUM_INTERVAL_MS: process.env.VACUUM_INTERVAL_MS } : {},
);

export interface ReactionsOptions {
  seconds: number;
  /** Loops sending COMPLETE at once. */
  concurrency: number;
  /** Tasks made ready for the loaded run (it ends early, and says so, if they run out). */
  tasks: number;
  /** Completions timed one at a time. */
  alone: number;
}

interface Work {
  taskId: string;
  token: string;
}

interface Run {
  label: string;
  completions: number;
  seconds: number;
  reactions: number;
  /** Mean backlog over the window before half time, and over the last window. */
  backlogHalf: number;
  backlogEnd: number;
  /** Least-squares change of the backlog over the second half (its slope times its length). */
  backlogTrend: number;
  drainSeconds: number;
  p50: number;
  p99: number;
  /** p50, p99 of commit → on the stream, and of on the stream → reaction committed. */
  toStream: [number, number];
  fromStream: [number, number];
  transactions: number;
  applied: number;
  /** Of `applied`, the ones the committing process applied early. */
  early: number;
  ranOut: boolean;
  alone: Alone;
}

export async function reactionsSection(o: ReactionsOptions): Promise<void> {
  print('## Reactions keeping up with completions');
  // The default, then the consumers alone (EARLY_REACTIONS=0) for 20 s: the path every
  // event still takes, and the figure before early reactions.
  const passes: { label: string; maxPerTransaction?: number; early: boolean; seconds: number }[] = [
    { label: 'early + consumers (default)', early: true, seconds: o.seconds },
    { label: 'consumers only (EARLY_REACTIONS=0)', early: false, seconds: Math.min(20, o.seconds) },
  ];
  if (process.env.BENCH_REACTION_BASELINE === '1') {
    passes.push({
      label: 'consumers only, one message per transaction',
      maxPerTransaction: 1,
      early: false,
      seconds: Math.min(20, o.seconds),
    });
  }
  const runs: Run[] = [];
  for (const pass of passes) {
    const db = await scratchDatabase('reactions', { max: 24 });
    const names = benchNames();
    let t: Transport | null = null;
    let vacuum: QueueVacuum | null = null;
    try {
      const host = new ActorHost(db.sql, { taskDefaults: TASK_DEFAULTS });
      // As the runtime runs it beside every host: the setup's burst leaves dead rows.
      vacuum = new QueueVacuum(db.sql, silentLogger(), {
        intervalMs: config.VACUUM_INTERVAL_MS,
        deadRows: config.VACUUM_DEAD_ROWS,
      });
      vacuum.start();
      const tasks = Math.ceil((o.tasks * pass.seconds) / o.seconds);
      const work = await prepare(host, tasks + o.alone);
      t = await Transport.start(
        benchTransportOptions(db.sql, host, names, {
          earlyReactions: pass.early,
          ...(pass.maxPerTransaction !== undefined
            ? { consumer: { maxPerTransaction: pass.maxPerTransaction } }
            : {}),
        }),
      );
      await settle(db, t, names.stream);
      const reacted = reactionsOf(t);
      const onStream = `${names.prefix}.events.task.>`;
      const alone = await timeAlone(host, reacted, t, onStream, work.slice(tasks));
      runs.push({
        ...(await underLoad(pass.label, host, reacted, t, onStream, work.slice(0, tasks), {
          ...o,
          seconds: pass.seconds,
        })),
        alone,
      });
    } finally {
      await t?.stop().catch(() => {});
      await vacuum?.stop();
      await dropStreams(names).catch(() => {});
      await db.drop();
    }
  }
  print(
    `\nrunning tasks in tickets of ${TASKS_PER_TICKET} (${n0(o.tasks)} for ${o.seconds}s, as many per second for the shorter passes); ${o.concurrency} loops send COMPLETE for each pass's seconds, taking the tasks ticket by ticket; latency = completion's commit → commit of the TASK_STATE that applied it\n`,
  );
  print(
    table(
      [
        'run',
        'completions/s',
        'reactions/s',
        'ratio',
        'backlog at half',
        'at end',
        'last-half trend',
        'drained in s',
        'p50 ms',
        'p99 ms',
        'messages/tx',
        'applied early',
      ],
      [
        ...runs.flatMap((r) => [
          [
            `${r.label}${r.ranOut ? ' (ran out of tasks)' : ''}`,
            n0(r.completions / r.seconds),
            n0(r.reactions / r.seconds),
            ratio(r.reactions, r.completions),
            n0(r.backlogHalf),
            n0(r.backlogEnd),
            `${r.backlogTrend >= 0 ? '+' : ''}${n0(r.backlogTrend)}`,
            r.drainSeconds.toFixed(1),
            ms(r.p50),
            ms(r.p99),
            (r.applied / Math.max(1, r.transactions)).toFixed(1),
            `${((100 * r.early) / Math.max(1, r.applied)).toFixed(0)}%`,
          ],
          [
            `${r.label}: alone (one at a time)`,
            '-',
            '-',
            '-',
            '-',
            '-',
            '-',
            '-',
            ms(r.alone.total.p50),
            ms(r.alone.total.p99),
            '-',
            '-',
          ],
        ]),
      ],
    ),
  );
  print(
    '\nwhere the time goes (p50 / p99 ms; a reaction applied early, before its event reached the stream, has no second figure):\n',
  );
  const split = (to: [number, number], from: [number, number]) => [
    `${ms(to[0])} / ${ms(to[1])}`,
    `${ms(from[0])} / ${ms(from[1])}`,
  ];
  print(
    table(
      ['run', 'commit → on stream (relay)', 'on stream → reaction committed'],
      [
        ...runs.flatMap((r) => [
          [r.label, ...split(r.toStream, r.fromStream)],
          [`${r.label}: alone`, ...split(r.alone.toStream, r.alone.fromStream)],
        ]),
      ],
    ),
  );
  print(
    `\nbacklog: completions committed and not yet reacted to, read every ${BACKLOG_SAMPLE_MS} ms; at half and at end are means over the ${BACKLOG_WINDOW_S} s before each point; the trend is the least-squares change over the second half\n`,
  );
  print(
    `targets: reactions/s ≥ 0.95 × completions/s; backlog at end ≤ at half; p99 < 50 ms under load, < 10 ms alone`,
  );
}

const BACKLOG_SAMPLE_MS = 100;
/** Seconds of samples averaged for the backlog at half time and at the end (less on short runs). */
const BACKLOG_WINDOW_S = 5;

/** The backlog at half time and at the end (window means) and its trend over the second half. */
function backlogFigures(
  samples: readonly { at: number; backlog: number }[],
  seconds: number,
): { backlogHalf: number; backlogEnd: number; backlogTrend: number } {
  const window = Math.min(BACKLOG_WINDOW_S, seconds / 4);
  const mean = (from: number, to: number) => {
    const xs = samples.filter((s) => s.at > from && s.at <= to).map((s) => s.backlog);
    return xs.length === 0 ? 0 : xs.reduce((a, b) => a + b, 0) / xs.length;
  };
  const half = seconds / 2;
  const late = samples.filter((s) => s.at > half);
  let trend = 0;
  if (late.length >= 2) {
    const mx = late.reduce((a, s) => a + s.at, 0) / late.length;
    const my = late.reduce((a, s) => a + s.backlog, 0) / late.length;
    let num = 0;
    let den = 0;
    for (const s of late) {
      num += (s.at - mx) * (s.backlog - my);
      den += (s.at - mx) ** 2;
    }
    trend = den === 0 ? 0 : (num / den) * (seconds - half);
  }
  return {
    backlogHalf: mean(half - window, half),
    backlogEnd: mean(seconds - window, seconds),
    backlogTrend: trend,
  };
}

/** Tickets of TASKS_PER_TICKET tasks, started, every task claimed and started. */
async function prepare(host: ActorHost, n: number): Promise<Work[]> {
  const commands = new Commands(host, { stuckAfterMs: 3_600_000, diagnosticCooldownMs: 3_600_000 });
  const tickets = Math.ceil(n / TASKS_PER_TICKET);
  const byTicket: Work[][] = new Array(tickets);
  await pool(tickets, 4, async (i) => {
    const { value } = await host.transact(async (uow) => {
      const t = await commands.createTicket(uow, { title: 'bench' });
      const ids: string[] = [];
      for (let k = 0; k < TASKS_PER_TICKET; k++) {
        ids.push((await commands.addTask(uow, t.id, { type: 'bench' })).id);
      }
      await uow.send('ticket', t.id, { type: 'START' });
      const out: Work[] = [];
      for (const id of ids) {
        const claimed = await uow.send('task', id, { type: 'CLAIM', workerId: 'bench' });
        const token = (claimed.snapshot.context as { token: string }).token;
        await uow.send('task', id, { type: 'START', token });
        out.push({ taskId: id, token });
      }
      return out;
    });
    byTicket[i] = value;
  });
  return byTicket.flat().slice(0, n);
}

/** The task_state reaction's applications, by its consumer and by the early path. */
interface Reacted {
  onApplied(listener: (entries: EventEntry[]) => void): () => void;
  counts(): { transactions: number; applied: number; early: number };
}

function reactionsOf(t: Transport): Reacted {
  const runner = t.runners.find((r) => r.name === 'task_state');
  if (!runner) throw new Error('bench: no task_state consumer');
  const early = t.early.get('task_state');
  return {
    onApplied(listener) {
      const offs = [runner.onApplied(listener), early?.onApplied(listener)];
      return () => {
        for (const off of offs) off?.();
      };
    },
    counts() {
      const e = early?.stats ?? { transactions: 0, applied: 0 };
      return {
        transactions: runner.stats.transactions + e.transactions,
        applied: runner.stats.applied + e.applied,
        early: e.applied,
      };
    },
  };
}

/** Waits until the relay has published everything and every consumer has acked it. */
async function settle(db: Scratch, t: Transport, stream: string): Promise<void> {
  const jsm = await jetstreamManager(t.nc);
  await until(
    async () => {
      if ((await t.relay.lag()).count > 0) return false;
      for (const r of t.runners) {
        const info = await jsm.consumers.info(stream, r.name);
        if (info.num_pending + info.num_ack_pending > 0) return false;
      }
      return true;
    },
    600_000,
    `the setup's news to settle (${db.name})`,
    100,
  );
}

interface Alone {
  total: ReturnType<typeof summarize>;
  toStream: [number, number];
  fromStream: [number, number];
}

/** Reaction latency of completions sent one at a time, and its two halves. */
async function timeAlone(
  host: ActorHost,
  runner: Reacted,
  t: Transport,
  streamSubjects: string,
  work: Work[],
): Promise<Alone> {
  const committedAt = new Map<string, { eventId: string; at: number }>();
  const reactedAt = new Map<string, number>();
  const streamAt = new Map<string, number>();
  const waiters = new Map<string, () => void>();
  const sub = t.nc.subscribe(streamSubjects, {
    callback: (_err, m) => {
      if (m.subject.endsWith('.completed')) {
        streamAt.set((m.json() as { eventId: string }).eventId, performance.now());
      }
    },
  });
  await t.nc.flush();
  const stopCommits = host.onCommit((applied) => {
    const now = performance.now();
    for (const a of applied) {
      for (const e of a.events) {
        if (e.type === 'task.completed') committedAt.set(a.id, { eventId: e.eventId, at: now });
      }
    }
  });
  const stopApplied = runner.onApplied((entries) => {
    const now = performance.now();
    for (const e of entries) {
      if (e.type !== 'task.completed') continue;
      reactedAt.set(e.eventId, now);
      waiters.get(e.eventId)?.();
    }
  });
  const samples: number[] = [];
  const toStream: number[] = [];
  const fromStream: number[] = [];
  try {
    for (const w of work) {
      await host.send('task', w.taskId, { type: 'COMPLETE', token: w.token });
      const c = committedAt.get(w.taskId);
      if (!c) throw new Error(`bench: no completion committed for ${w.taskId}`);
      if (!reactedAt.has(c.eventId)) {
        await new Promise<void>((resolve) => waiters.set(c.eventId, resolve));
      }
      const reacted = reactedAt.get(c.eventId) as number;
      samples.push(reacted - c.at);
      const seen = streamAt.get(c.eventId);
      if (seen !== undefined) {
        toStream.push(seen - c.at);
        fromStream.push(reacted - seen);
      }
    }
  } finally {
    stopCommits();
    stopApplied();
    sub.unsubscribe();
  }
  const a = summarize(toStream, 0);
  const b = summarize(fromStream, 0);
  return { total: summarize(samples, 0), toStream: [a.p50, a.p99], fromStream: [b.p50, b.p99] };
}

async function underLoad(
  label: string,
  host: ActorHost,
  runner: Reacted,
  t: Transport,
  streamSubjects: string,
  work: Work[],
  o: ReactionsOptions,
): Promise<Omit<Run, 'alone'>> {
  const committedAt = new Map<string, number>();
  const latencies: number[] = [];
  /** When each completion reached the stream (a core subscriber sees what the server took). */
  const streamAt = new Map<string, number>();
  const toStream: number[] = [];
  const fromStream: number[] = [];
  const sub = t.nc.subscribe(streamSubjects, {
    callback: (_err, m) => {
      if (!m.subject.endsWith('.completed')) return;
      const id = (m.json() as { eventId: string }).eventId;
      const at = committedAt.get(id);
      if (at === undefined) return;
      const now = performance.now();
      streamAt.set(id, now);
      toStream.push(now - at);
    },
  });
  await t.nc.flush();
  let completions = 0;
  let reactions = 0;
  let windowOpen = true;
  let reactionsInWindow = 0;
  const stopCommits = host.onCommit((applied) => {
    const now = performance.now();
    for (const a of applied) {
      if (a.entityType !== 'task') continue;
      for (const e of a.events) {
        if (e.type !== 'task.completed') continue;
        committedAt.set(e.eventId, now);
        completions++;
      }
    }
  });
  const stopApplied = runner.onApplied((entries: EventEntry[]) => {
    const now = performance.now();
    for (const e of entries) {
      const at = committedAt.get(e.eventId);
      if (at === undefined) continue;
      committedAt.delete(e.eventId);
      latencies.push(now - at);
      const seen = streamAt.get(e.eventId);
      if (seen !== undefined) fromStream.push(now - seen);
      streamAt.delete(e.eventId);
      reactions++;
      if (windowOpen) reactionsInWindow++;
    }
  });
  const before = runner.counts();
  let next = 0;
  let ranOut = false;
  const started = performance.now();
  const end = started + o.seconds * 1000;
  // The backlog every 100 ms: one reading at an instant is whatever batch is in flight then.
  const samples: { at: number; backlog: number }[] = [];
  const sampler = setInterval(() => {
    samples.push({ at: (performance.now() - started) / 1000, backlog: completions - reactions });
  }, BACKLOG_SAMPLE_MS);
  await Promise.all(
    Array.from({ length: o.concurrency }, async () => {
      while (performance.now() < end) {
        const w = work[next++];
        if (!w) {
          ranOut = true;
          return;
        }
        await host.send('task', w.taskId, { type: 'COMPLETE', token: w.token });
      }
    }),
  );
  clearInterval(sampler);
  windowOpen = false;
  const seconds = (performance.now() - started) / 1000;
  const completed = completions;
  const backlog = backlogFigures(samples, seconds);
  const drainStart = performance.now();
  await until(() => committedAt.size === 0, 600_000, 'every completion reacted to', 10);
  const drainSeconds = (performance.now() - drainStart) / 1000;
  stopCommits();
  stopApplied();
  sub.unsubscribe();
  const s = summarize(latencies, 0);
  const a = summarize(toStream, 0);
  const b = summarize(fromStream, 0);
  return {
    label,
    completions: completed,
    seconds,
    reactions: reactionsInWindow,
    ...backlog,
    drainSeconds,
    p50: s.p50,
    p99: s.p99,
    toStream: [a.p50, a.p99],
    fromStream: [b.p50, b.p99],
    transactions: runner.counts().transactions - before.transactions,
    applied: runner.counts().applied - before.applied,
    early: runner.counts().early - before.early,
    ranOut,
  };
}
