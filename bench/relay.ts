/**
 * Issue 4: the outbox relay and the reactions, beside raw JetStream publishing.
 *
 * - Backlog drain: N committed, unpublished events (bulk-inserted with plain SQL; the event
 *   log is the outbox), then the relay woken: events/s from the log to JetStream ack (the
 *   cursor committed past them). A first, untimed backlog warms the relay, as the raw
 *   publishes after it run warm.
 * - Raw: the same number of `js.publish` calls with a msgID, awaiting each ack, on the same
 *   client and stream, one at a time and with 256 in flight. The relay's drain and raw
 *   publishing with 256 in flight take turns (TURNS each); the medians are compared.
 * - Steady state: the host commits transitions at concurrency C while the relay runs;
 *   latency from commit (host.onCommit) to the message on the stream (a core NATS
 *   subscriber on the stream's subjects, i.e. when the server received the publish).
 * - Reactions: tickets with one running task each; COMPLETE the task and time until the
 *   ticket's phase change (task.completed → relay → task_state consumer → TASK_STATE →
 *   ticket.phase_changed) is committed. Alone (one at a time) and under load.
 */

import { randomUUID } from 'node:crypto';
import { jetstreamManager } from '@nats-io/jetstream';
import { Commands } from '../src/actors/commands.js';
import { ActorHost } from '../src/actors/host.js';
import { anyUnpublished } from '../src/persistence/outbox-rows.js';
import { Transport } from '../src/transport/index.js';
import { RELAY_BATCH } from '../src/transport/outbox-relay.js';
import type { TransportNames } from '../src/transport/subjects.js';
import { benchTransportOptions } from './fixtures.js';
import { benchNames, dropStreams, type Scratch, scratchDatabase } from './scratch.js';
import { inTurns, ms, n0, pool, print, ratio, summarize, table, until } from './stats.js';

const TASK_DEFAULTS = { maxAttempts: 3, leaseMs: 600_000, retryBaseMs: 1_000 };

export interface RelayOptions {
  seconds: number;
  /** Events in the backlog (and raw publishes). */
  events: number;
  /** Tickets whose task completion is timed alone, then under load. */
  reactionsAlone: number;
  reactionsLoaded: number;
}

export async function relaySection(o: RelayOptions): Promise<void> {
  print('## Relay and reactions (issue 4)');
  const db = await scratchDatabase('relay', { max: 16 });
  const names = benchNames();
  const transports: Transport[] = [];
  try {
    await backlogAndRaw(db, names, o, transports);
    await steadyState(db, names, o, transports);
    await reactions(db, names, o, transports);
  } finally {
    await Promise.all(transports.map((t) => t.stop().catch(() => {})));
    await dropStreams(names).catch(() => {});
    await db.drop();
  }
}

/**
 * Whether the relay has anything left. The polls for a drain's end ask for the first such
 * event, not a count: counting a 20,000-event backlog every 10 ms took Postgres's CPU from
 * the relay being measured.
 */
async function outboxPending(db: Scratch): Promise<boolean> {
  return anyUnpublished(db.sql);
}

async function backlogAndRaw(
  db: Scratch,
  names: TransportNames,
  o: RelayOptions,
  transports: Transport[],
): Promise<void> {
  const host = new ActorHost(db.sql, { taskDefaults: TASK_DEFAULTS });
  // A transport whose relay we start by hand once the backlog is in place; no reactions.
  const t = await Transport.start(
    benchTransportOptions(db.sql, host, names, { enableRelay: false, reactions: () => [] }),
  );
  transports.push(t);
  const entities = 500;
  // N committed events of 500 tickets (ticket.blocked / ticket.unblocked, as the host bench
  // writes), unpublished: what a burst of commits leaves for the relay.
  const backlog = (n: number, prefix: string) => db.sql`
    insert into events (event_id, entity_type, entity_id, seq, type, data, at)
    select gen_random_uuid(), 'ticket', ${prefix} || (i % ${entities}), i / ${entities} + 1,
      case when (i / ${entities}) % 2 = 0 then 'ticket.blocked' else 'ticket.unblocked' end,
      '{"phase":"requirements","reason":"bench"}'::jsonb, now()
    from generate_series(0, ${n - 1}) as i`;
  // A first backlog, not timed: the relay's code and statements warm, as the raw publishes
  // below run warm after it.
  await backlog(2_000, 'warm-');
  await t.relay.start();
  await until(async () => !(await outboxPending(db)), 120_000, 'the outbox to drain', 10);

  // Raw: the same client and stream, a msgID each, every ack awaited.
  const payload = JSON.stringify({
    pos: 1,
    eventId: randomUUID(),
    seq: 1,
    entityId: 'relay-1',
    entityType: 'ticket',
    type: 'ticket.blocked',
    data: { phase: 'requirements', reason: 'bench' },
    at: new Date().toISOString(),
  });
  const raw = async (inFlight: number) => {
    const seconds = await pool(o.events, inFlight, async (i) => {
      await t.js.publish(`${names.prefix}.events.ticket.raw-${i % entities}.blocked`, payload, {
        msgID: randomUUID(),
        expect: { streamName: names.stream },
      });
    });
    return o.events / seconds;
  };
  let relayRuns = 0;
  const relay = async () => {
    await backlog(o.events, `relay${relayRuns++}-`);
    const started = performance.now();
    t.relay.wake();
    await until(async () => !(await outboxPending(db)), 120_000, 'the outbox to drain', 10);
    return o.events / ((performance.now() - started) / 1000);
  };
  // The relay and raw publishing take turns, TURNS times each, and each figure is the median
  // of its runs: measured one after the other only once, a ratio moved by a third between
  // runs of the section as the machine's speed drifted between its two halves.
  const turns = await inTurns({
    relay: async () => ({ perSecond: await relay() }),
    raw256: async () => ({ perSecond: await raw(256) }),
  });
  await t.relay.stop();
  const relayRate = turns.median.relay.perSecond;
  const raw256 = turns.median.raw256.perSecond;
  const relayRates = turns.runs.relay.map((r) => r.perSecond);
  const raw256Rates = turns.runs.raw256.map((r) => r.perSecond);
  const raw1 = await raw(1);
  print(
    `\n### Outbox relay: ${n0(o.events)} committed events of ${entities} entities drained to JetStream (batch ${RELAY_BATCH})\n`,
  );
  print(
    table(
      ['path', 'events/s (median)', 'runs', 'vs raw (256 in flight)'],
      [
        [
          'outbox relay (read after the cursor, publish with msgID, await ack, move the cursor)',
          n0(relayRate),
          relayRates.map(n0).join(' / '),
          ratio(relayRate, raw256),
        ],
        ['raw js.publish + msgID, 1 in flight', n0(raw1), '1', ratio(raw1, raw256)],
        [
          'raw js.publish + msgID, 256 in flight',
          n0(raw256),
          raw256Rates.map(n0).join(' / '),
          '1.00',
        ],
      ],
    ),
  );
}

async function steadyState(
  db: Scratch,
  names: TransportNames,
  o: RelayOptions,
  transports: Transport[],
): Promise<void> {
  const host = new ActorHost(db.sql, { taskDefaults: TASK_DEFAULTS });
  const t = await Transport.start(
    benchTransportOptions(db.sql, host, names, { reactions: () => [] }),
  );
  transports.push(t);
  const concurrency = 8;
  const ids: string[] = [];
  for (let w = 0; w < concurrency * 4; w++) {
    const a = await host.create('ticket', {
      id: `steady-${randomUUID()}`,
      title: 'bench',
      stuckAfterMs: 3_600_000,
      diagnosticCooldownMs: 0,
    });
    await host.send('ticket', a.id, { type: 'START' });
    ids.push(a.id);
  }
  await until(async () => !(await outboxPending(db)), 30_000, 'the outbox to drain', 10);

  const committedAt = new Map<string, number>();
  // A message can arrive before the host saw its own commit's answer (the commit is visible
  // to the relay's claim first): it counts as 0 ms rather than never.
  const arrivedFirst = new Set<string>();
  const samples: number[] = [];
  const stopListening = host.onCommit((applied) => {
    const now = performance.now();
    for (const a of applied) {
      for (const e of a.events) {
        if (arrivedFirst.delete(e.eventId)) samples.push(0);
        else committedAt.set(e.eventId, now);
      }
    }
  });
  const sub = t.nc.subscribe(`${names.prefix}.events.>`, {
    callback: (_err, m) => {
      const now = performance.now();
      const id = (m.json() as { eventId: string }).eventId;
      const at = committedAt.get(id);
      if (at !== undefined) {
        samples.push(now - at);
        committedAt.delete(id);
      } else {
        arrivedFirst.add(id);
      }
    },
  });
  await t.nc.flush();
  let commits = 0;
  const started = performance.now();
  const end = Date.now() + o.seconds * 1000;
  await Promise.all(
    Array.from({ length: concurrency }, async (_, w) => {
      for (let i = 0; Date.now() < end; i++) {
        // Each writer cycles over 4 tickets so the relay sees several entities per batch.
        const id = ids[w * 4 + (i % 4)] as string;
        const blocked = Math.floor(i / 4) % 2 === 0;
        await host.send(
          'ticket',
          id,
          blocked ? { type: 'BLOCK', reason: 'bench' } : { type: 'UNBLOCK' },
        );
        commits++;
      }
    }),
  );
  const writeSeconds = (performance.now() - started) / 1000;
  await until(() => committedAt.size === 0, 30_000, 'every event on the stream', 5);
  const relaySeconds = (performance.now() - started) / 1000;
  stopListening();
  sub.unsubscribe();
  const s = summarize(samples, relaySeconds);
  print(
    `\n### Steady state: the host commits at concurrency ${concurrency} for ${o.seconds}s while the relay runs\n`,
  );
  print(
    table(
      ['measure', 'value'],
      [
        ['commits/s (1 event each)', n0(commits / writeSeconds)],
        ['events on the stream/s (until the last arrived)', n0(s.perSecond)],
        ['commit → on stream p50 ms', ms(s.p50)],
        ['commit → on stream p99 ms', ms(s.p99)],
      ],
    ),
  );
  await t.stop();
}

async function reactions(
  db: Scratch,
  names: TransportNames,
  o: RelayOptions,
  transports: Transport[],
): Promise<void> {
  const host = new ActorHost(db.sql, { taskDefaults: TASK_DEFAULTS });
  const commands = new Commands(host, { stuckAfterMs: 3_600_000, diagnosticCooldownMs: 3_600_000 });
  const total = o.reactionsAlone + o.reactionsLoaded;
  // Each ticket: in its first phase, one task claimed and running.
  const work: { ticketId: string; taskId: string; token: string }[] = [];
  await pool(total, 16, async () => {
    const { value } = await host.transact(async (uow) => {
      const t = await commands.createTicket(uow, { title: 'bench' });
      const task = await commands.addTask(uow, t.id, { type: 'bench' });
      return { ticketId: t.id, taskId: task.id };
    });
    await host.send('ticket', value.ticketId, { type: 'START' });
    const claimed = await host.send('task', value.taskId, { type: 'CLAIM', workerId: 'bench' });
    const token = (claimed.snapshot.context as { token: string }).token;
    await host.send('task', value.taskId, { type: 'START', token });
    work.push({ ...value, token });
  });
  const t = await Transport.start(benchTransportOptions(db.sql, host, names, {}));
  transports.push(t);
  // Let the setup's events go through the relay and every reaction first.
  const jsm = await jetstreamManager(t.nc);
  const settled = async () => {
    if (await outboxPending(db)) return false;
    for (const r of t.runners) {
      const info = await jsm.consumers.info(names.stream, r.name);
      if (info.num_pending + info.num_ack_pending > 0) return false;
    }
    return true;
  };
  await until(settled, 60_000, 'the setup events to settle', 50);

  const advancedAt = new Map<string, number>();
  const waiting = new Map<string, () => void>();
  const stop = host.onCommit((applied) => {
    const now = performance.now();
    for (const a of applied) {
      if (a.entityType !== 'ticket') continue;
      if (!a.events.some((e) => e.type === 'ticket.phase_changed')) continue;
      advancedAt.set(a.id, now);
      waiting.get(a.id)?.();
    }
  });
  const complete = async (w: { ticketId: string; taskId: string; token: string }) => {
    await host.send('task', w.taskId, { type: 'COMPLETE', token: w.token });
    return performance.now();
  };

  // Alone: one completion at a time, waiting for its reaction.
  const alone: number[] = [];
  for (const w of work.slice(0, o.reactionsAlone)) {
    const reacted = new Promise<void>((resolve) => waiting.set(w.ticketId, resolve));
    const t0 = await complete(w);
    await reacted;
    waiting.delete(w.ticketId);
    alone.push((advancedAt.get(w.ticketId) ?? t0) - t0);
  }
  // Under load: completions at concurrency 16 without waiting for their reactions.
  const loaded = work.slice(o.reactionsAlone);
  const completedAt = new Map<string, number>();
  const started = performance.now();
  const writeSeconds = await pool(loaded.length, 16, async (i) => {
    const w = loaded[i] as (typeof loaded)[number];
    completedAt.set(w.ticketId, await complete(w));
  });
  await until(
    () => loaded.every((w) => advancedAt.has(w.ticketId)),
    120_000,
    'every ticket to advance',
    10,
  );
  const lastReaction = Math.max(...loaded.map((w) => advancedAt.get(w.ticketId) ?? 0));
  const latencies = loaded.map(
    (w) => (advancedAt.get(w.ticketId) ?? 0) - (completedAt.get(w.ticketId) ?? 0),
  );
  stop();
  const a = summarize(alone, 0);
  const l = summarize(latencies, (lastReaction - started) / 1000);
  const wrong = await db.sql<{ n: number }[]>`
    select count(*)::int as n from tickets
    where id = any(${work.map((w) => w.ticketId)}) and phase <> 'design'`;
  print(
    "\n### Reactions: COMPLETE a ticket's only task → its phase change committed (relay → task_state consumer → TASK_STATE → ADVANCE)\n",
  );
  print(
    table(
      ['run', 'completions', 'completions/s', 'reactions/s', 'p50 ms', 'p99 ms'],
      [
        ['alone (one at a time)', a.count, '-', '-', ms(a.p50), ms(a.p99)],
        [
          'under load (16 completing at once)',
          l.count,
          n0(loaded.length / writeSeconds),
          n0(l.perSecond),
          ms(l.p50),
          ms(l.p99),
        ],
      ],
    ),
  );
  if ((wrong[0]?.n ?? 0) > 0) print(`!! ${wrong[0]?.n} tickets not in phase design after the run`);
}
