/**
 * Reactions as durable consumers against a real NATS and Postgres: a redelivered event
 * applies once, a handler that always throws ends in the dead letters and the DLQ stream,
 * task completions advance each ticket exactly once with two transports on two pools, a
 * cancelled ticket cancels its tasks, the reconciler repairs what no reaction did, dispatch
 * wake-ups, the event feed from a stream sequence, and messages published by hand that are
 * not events of the event log (acked, counted as forged, never acted on).
 */

import { randomUUID } from 'node:crypto';
import { AckPolicy, jetstream } from '@nats-io/jetstream';
import { describe, expect, it } from 'vitest';
import type { Commands } from '../../src/actors/commands.js';
import { ActorHost } from '../../src/actors/host.js';
import type { Sql } from '../../src/persistence/db.js';
import { toEntry } from '../../src/persistence/event-log.js';
import { recordInboxMany } from '../../src/persistence/inbox-rows.js';
import { loadMigrations, migrate } from '../../src/persistence/migrate.js';
import { unpublishedCount } from '../../src/persistence/outbox-rows.js';
import { driftedTasks } from '../../src/persistence/reaction-rows.js';
import type { DispatchMessage } from '../../src/transport/dispatch.js';
import type { LiveMessage, Transport } from '../../src/transport/index.js';
import { type Reaction, taskStateReaction } from '../../src/transport/reactions.js';
import { ensureStreams } from '../../src/transport/streams.js';
import { eventSubject, type TransportNames } from '../../src/transport/subjects.js';
import { createTestDatabase, type TestDatabase } from '../support/database.js';
import { TASK_DEFAULTS } from '../support/fixtures.js';
import {
  claimAndStart,
  completeTask as complete,
  ticketWithTasks,
} from '../support/ticket-tasks.js';
import {
  commandsFor,
  eventually,
  startTransport,
  transportFixtures,
} from '../support/transport.js';

// Each test's transports stop and its database goes before the next: Postgres connections
// are shared with other suites.
const fx = transportFixtures();

interface Env {
  db: TestDatabase;
  names: TransportNames;
  /** A "process": its own pool, host and commands. */
  proc(): { sql: Sql; host: ActorHost; commands: Commands };
  start(
    p: { sql: Sql; host: ActorHost },
    over?: Parameters<typeof startTransport>[3],
  ): Promise<Transport>;
}

/** A database and a stream of their own (a database records one stream's sequences). */
async function env(label: string): Promise<Env> {
  const db = await fx.database(label);
  const names = fx.names();
  return {
    db,
    names,
    proc() {
      const sql = db.pool(6);
      const host = new ActorHost(sql, { taskDefaults: { ...TASK_DEFAULTS, retryBaseMs: 20 } });
      return { sql, host, commands: commandsFor(host) };
    },
    async start(p, over = {}) {
      const t = await startTransport(p.sql, p.host, names, over);
      fx.keep(t);
      return t;
    },
  };
}

async function stateOf(sql: Sql, table: 'tickets' | 'tasks', id: string): Promise<string> {
  const rows =
    table === 'tickets'
      ? await sql<{ state: string }[]>`select state from tickets where id = ${id}`
      : await sql<{ state: string }[]>`select state from tasks where id = ${id}`;
  return rows[0]?.state ?? 'missing';
}

async function countEvents(sql: Sql, entityId: string, type: string): Promise<number> {
  const rows = await sql<{ n: number }[]>`
    select count(*)::int as n from events where entity_id = ${entityId} and type = ${type}`;
  return rows[0]?.n ?? 0;
}

describe('reactions', () => {
  it('the same event handled twice (a redelivery) applies once', async () => {
    const e = await env('reactions_dup');
    const p = e.proc();
    // No relay: nothing reaches the consumers, the test drives the handler itself.
    const t = await e.start(p, { enableRelay: false, enableReconciler: false });
    const { ticketId, taskIds } = await ticketWithTasks(p, 1, { maxAttempts: 2 });
    const taskId = taskIds[0]!;
    const token = await claimAndStart(p.host, taskId);
    await p.host.send('task', taskId, { type: 'FAIL', token, error: 'x' }); // retry_wait
    // Open to open: no news for the ticket, so the message is not even looked up.
    const [retry] = await p.sql<Parameters<typeof toEntry>[0][]>`
      select pos, event_id, seq, entity_id, entity_type, type, data, at from events
      where entity_id = ${taskId} and type = 'task.retry_scheduled'`;
    const runner = t.runners.find((r) => r.name === taskStateReaction.name)!;
    const before = await p.sql`select version from tickets where id = ${ticketId}`;
    expect(await runner.process(toEntry(retry!))).toBe('ignored');
    expect(await p.sql`select version from tickets where id = ${ticketId}`).toEqual(before);
    await p.host.send('task', taskId, { type: 'RETRY' });
    const again = await claimAndStart(p.host, taskId);
    await p.host.send('task', taskId, { type: 'FAIL', token: again, error: 'x' }); // failed
    const rows = await p.sql<Parameters<typeof toEntry>[0][]>`
      select pos, event_id, seq, entity_id, entity_type, type, data, at from events
      where entity_id = ${taskId} and type = 'task.failed'`;
    const entry = toEntry(rows[0]!);

    const ticketRow = async () =>
      (
        await p.sql<{ version: number; seq: number }[]>`
          select version, seq from tickets where id = ${ticketId}`
      )[0];
    expect(await runner.process(entry)).toBe('applied');
    const once = await ticketRow();
    // The policy finds the ticket told already: the repeat writes nothing.
    expect(await runner.process(entry)).toBe('applied');
    expect(await ticketRow()).toEqual(once);
    const told = await p.sql<{ state: string; seq: number }[]>`
      select state, seq from ticket_tasks where task_id = ${taskId}`;
    expect(told[0]).toEqual({ state: 'failed', seq: entry.seq });
    // No inbox row: a task's every event would otherwise leave one for good.
    const inbox = await p.sql`select 1 from inbox where event_id = ${entry.eventId}`;
    expect(inbox).toHaveLength(0);
  });

  it('the upgrade deletes the inbox rows earlier versions left for task news and cancellations, and no others', async () => {
    const old = await createTestDatabase('reactions_inbox_upgrade', { migrate: false });
    try {
      const all = await loadMigrations();
      await migrate(
        old.sql,
        all.filter((m) => m.name < '0012'),
      );
      const kept = [randomUUID(), randomUUID()];
      await recordInboxMany(old.sql, 'task_state', [randomUUID(), randomUUID(), randomUUID()]);
      await recordInboxMany(old.sql, 'ticket_cancel', [randomUUID(), randomUUID()]);
      await recordInboxMany(old.sql, 'audit', kept);
      const applied = await migrate(old.sql);
      expect(applied).toContain('0012-task-news-inbox.sql');
      expect(applied).toContain('0020-ticket-cancel-inbox.sql');
      const rows = await old.sql<{ consumer: string; event_id: string }[]>`
        select consumer, event_id from inbox order by event_id`;
      expect(rows).toEqual([...kept].sort().map((id) => ({ consumer: 'audit', event_id: id })));
    } finally {
      await old.drop();
    }
  });

  it('a cancellation applied twice cancels the open tasks once and keeps no inbox row', async () => {
    const e = await env('reactions_cancel_twice');
    const p = e.proc();
    const t = await e.start(p, { enableRelay: false, enableReconciler: false });
    const { ticketId, taskIds } = await ticketWithTasks(p, 2);
    await p.host.send('ticket', ticketId, { type: 'CANCEL', reason: 'x' });
    const rows = await p.sql<Parameters<typeof toEntry>[0][]>`
      select pos, event_id, seq, entity_id, entity_type, type, data, at from events
      where entity_id = ${ticketId} and type = 'ticket.cancelled'`;
    const entry = toEntry(rows[0]!);
    const runner = t.runners.find((r) => r.name === 'ticket_cancel')!;
    const taskEvents = async () =>
      (
        await p.sql<{ n: number }[]>`
          select count(*)::int as n from events where entity_id in ${p.sql(taskIds)}`
      )[0]?.n;

    expect(await runner.process(entry)).toBe('applied');
    for (const id of taskIds) expect(await stateOf(p.sql, 'tasks', id)).toBe('cancelled');
    const once = await taskEvents();
    // The policy finds no open task left: the repeat writes nothing.
    expect(await runner.process(entry)).toBe('applied');
    expect(await taskEvents()).toBe(once);
    expect(await p.sql`select 1 from inbox`).toHaveLength(0);
  });

  it('a reaction with an inbox applies a redelivered event once', async () => {
    const e = await env('reactions_dup_inbox');
    const p = e.proc();
    let applied = 0;
    // Not idempotent by itself: only the inbox row stands between a redelivery and a repeat.
    const counting: Reaction = {
      kind: 'transactional',
      name: 'counting',
      filterSubject: (n) => `${n.prefix}.events.ticket.*.created`,
      accepts: (entry) => entry.type === 'ticket.created',
      apply: async () => {
        applied++;
      },
    };
    const t = await e.start(p, {
      reactions: () => [counting],
      enableRelay: false,
      enableReconciler: false,
    });
    const { ticketId } = await ticketWithTasks(p, 0);
    const rows = await p.sql<Parameters<typeof toEntry>[0][]>`
      select pos, event_id, seq, entity_id, entity_type, type, data, at from events
      where entity_id = ${ticketId} and type = 'ticket.created'`;
    const entry = toEntry(rows[0]!);
    const runner = t.runners.find((r) => r.name === 'counting')!;

    expect(await runner.process(entry)).toBe('applied');
    expect(await runner.process(entry)).toBe('duplicate');
    expect(applied).toBe(1);
    const inbox = await p.sql`select consumer from inbox where event_id = ${entry.eventId}`;
    expect(inbox).toEqual([{ consumer: 'counting' }]);
  });

  it('a handler that always throws is retried, then dead-lettered with its error', async () => {
    const e = await env('reactions_dlq');
    const p = e.proc();
    let calls = 0;
    const failing: Reaction = {
      kind: 'transactional',
      name: 'always_fails',
      filterSubject: (n) => `${n.prefix}.events.ticket.*.created`,
      accepts: () => true,
      apply: async () => {
        calls++;
        throw new Error('boom: the handler failed');
      },
    };
    const t = await e.start(p, { reactions: () => [failing], enableReconciler: false });
    const { ticketId } = await ticketWithTasks(p, 0);

    const dead = await eventually(async () => (await t.deadLetters(10))[0], 15_000, 'dead letter');
    expect(dead.consumer).toBe('always_fails');
    expect(dead.error).toContain('boom');
    expect(dead.deliveries).toBe(3);
    expect((dead.data as { entityId: string }).entityId).toBe(ticketId);
    expect(calls).toBe(3);
    const dlq = await fx.admin.jsm.streams.info(e.names.dlqStream);
    expect(dlq.state.messages).toBe(1);
    const msg = await fx.admin.jsm.streams.getMessage(e.names.dlqStream, {
      seq: dlq.state.first_seq,
    });
    expect(msg?.header.get('Orch-Error')).toContain('boom');
    const m = await t.metrics();
    expect(m.deadLetters).toBe(1);
    expect(m.reactions.always_fails?.redeliveries).toBe(2);
    expect(m.redeliveries).toBe(2);
    const text = await t.prometheus();
    expect(text).toContain('orch_dead_letters 1');
    expect(text).toContain(
      'orch_reaction_messages_total{consumer="always_fails",outcome="failures"} 3',
    );
    // term(): no further deliveries
    await new Promise((r) => setTimeout(r, 1_500));
    expect(calls).toBe(3);
    // nothing changed in Postgres: the failed transactions left no inbox row
    expect(await p.sql`select 1 from inbox where consumer = 'always_fails'`).toHaveLength(0);
  });

  it('1,000 task completions advance each ticket exactly once with two transports on two pools', {
    timeout: 120_000,
  }, async () => {
    const e = await env('reactions_advance');
    const a = e.proc();
    const b = e.proc();
    const ta = await e.start(a);
    const tb = await e.start(b);
    const tickets = await Promise.all(Array.from({ length: 250 }, () => ticketWithTasks(a, 4)));
    // Complete every task, alternating hosts, all at once.
    await Promise.all(
      tickets.flatMap((t, i) =>
        t.taskIds.map((id, j) => complete((i + j) % 2 === 0 ? a.host : b.host, id)),
      ),
    );
    await eventually(
      async () => {
        const rows = await a.sql<{ n: number }[]>`
          select count(*)::int as n from tickets where state = 'design'
            and id in ${a.sql(tickets.map((t) => t.ticketId))}`;
        return rows[0]?.n === tickets.length;
      },
      45_000,
      'every ticket in design',
    );
    await new Promise((r) => setTimeout(r, 500)); // late redeliveries, if any, would land here
    const changes = await a.sql<{ entity_id: string; n: number }[]>`
      select entity_id, count(*)::int as n from events
      where type = 'ticket.phase_changed' and entity_id in ${a.sql(tickets.map((t) => t.ticketId))}
      group by entity_id`;
    expect(changes).toHaveLength(tickets.length);
    expect(changes.every((c) => c.n === 2)).toBe(true); // START + one ADVANCE, never two
    const applied = [ta, tb].map(
      (t) => t.runners.find((r) => r.name === 'task_state')!.stats.applied,
    );
    // One durable consumer shared by both: each process took part of the messages.
    expect(applied[0]! > 0 && applied[1]! > 0).toBe(true);
  });

  it('a task that fails for good blocks its ticket once', async () => {
    const e = await env('reactions_block');
    const p = e.proc();
    await e.start(p);
    const { ticketId, taskIds } = await ticketWithTasks(p, 2, { maxAttempts: 1 });
    const token = await claimAndStart(p.host, taskIds[0]!);
    await p.host.send('task', taskIds[0]!, { type: 'FAIL', token, error: 'broken' });
    await eventually(async () => (await stateOf(p.sql, 'tickets', ticketId)) === 'blocked');
    expect(await countEvents(p.sql, ticketId, 'ticket.blocked')).toBe(1);
  });

  it('a cancelled ticket cancels its open tasks', async () => {
    const e = await env('reactions_cancel');
    const p = e.proc();
    await e.start(p);
    const { ticketId, taskIds } = await ticketWithTasks(p, 3);
    await claimAndStart(p.host, taskIds[0]!); // running
    await complete(p.host, taskIds[1]!); // completed: stays completed
    await p.host.send('ticket', ticketId, { type: 'CANCEL', reason: 'no longer needed' });
    await eventually(
      async () =>
        (await stateOf(p.sql, 'tasks', taskIds[0]!)) === 'cancelled' &&
        (await stateOf(p.sql, 'tasks', taskIds[2]!)) === 'cancelled',
      10_000,
      'open tasks cancelled',
    );
    expect(await stateOf(p.sql, 'tasks', taskIds[1]!)).toBe('completed');
  });

  it('hand-published forged messages change nothing and are counted; the genuine path still works', async () => {
    const e = await env('reactions_forged');
    const p = e.proc();
    const t = await e.start(p, { enableReconciler: false });
    const { ticketId, taskIds } = await ticketWithTasks(p, 2);
    const running = taskIds[0]!;
    await claimAndStart(p.host, running);
    const dispatched: DispatchMessage[] = [];
    const sub = t.subscribeDispatch((m) => dispatched.push(m));
    await t.nc.flush();
    await eventually(async () => {
      return (await unpublishedCount(p.sql)) === 0;
    });
    const forged = () => Object.fromEntries(t.runners.map((r) => [r.name, r.stats.forged]));
    const before = forged();
    const created = (
      await p.sql<{ event_id: string; pos: number }[]>`
        select event_id, pos from events where entity_id = ${ticketId} and type = 'ticket.created'`
    )[0]!;
    const at = new Date().toISOString();
    const cancelSubject = eventSubject(e.names, 'ticket', ticketId, 'ticket.cancelled');
    const completedSubject = eventSubject(e.names, 'task', running, 'task.completed');
    const ghost = `${ticketId}-ghost`;
    const forgeries: [string, unknown][] = [
      // A live ticket "cancelled", with a made-up event id.
      [
        cancelSubject,
        {
          pos: 1,
          eventId: randomUUID(),
          seq: 9,
          entityId: ticketId,
          entityType: 'ticket',
          type: 'ticket.cancelled',
          data: {},
          at,
        },
      ],
      // A genuine event id passed off as the cancellation.
      [
        cancelSubject,
        {
          pos: created.pos,
          eventId: created.event_id,
          seq: 1,
          entityId: ticketId,
          entityType: 'ticket',
          type: 'ticket.cancelled',
          data: {},
          at,
        },
      ],
      // A running task "completed".
      [
        completedSubject,
        {
          pos: 1,
          eventId: randomUUID(),
          seq: 4,
          entityId: running,
          entityType: 'task',
          type: 'task.completed',
          data: { ticketId },
          at,
        },
      ],
      // A task that does not exist "created" (no consumer turns it into a wake-up).
      [
        eventSubject(e.names, 'task', ghost, 'task.created'),
        {
          pos: 1,
          eventId: randomUUID(),
          seq: 1,
          entityId: ghost,
          entityType: 'task',
          type: 'task.created',
          data: { executor: 'x' },
          at,
        },
      ],
      // Not JSON, and JSON that is not an event.
      [cancelSubject, '{"eventId": nope'],
      [completedSubject, 'null'],
    ];
    const js = jetstream(fx.admin.nc);
    for (const [subject, body] of forgeries) {
      await js.publish(subject, typeof body === 'string' ? body : JSON.stringify(body));
    }
    // ticket_cancel: two cancellations and the bad JSON; task_state: the completion and the
    // null (it ignores task.created: the ghost's creation is acked untouched).
    await eventually(
      () => {
        const now = forged();
        return (
          now.ticket_cancel! - before.ticket_cancel! === 3 &&
          now.task_state! - before.task_state! === 2
        );
      },
      10_000,
      'forged messages counted',
    );
    await new Promise((r) => setTimeout(r, 300));
    expect(await stateOf(p.sql, 'tickets', ticketId)).toBe('requirements');
    expect(await stateOf(p.sql, 'tasks', running)).toBe('running');
    expect(await stateOf(p.sql, 'tasks', taskIds[1]!)).toBe('pending');
    const told = await p.sql<{ state: string }[]>`
      select state from ticket_tasks where task_id = ${running}`;
    expect(told[0]?.state).not.toBe('completed');
    expect(dispatched.some((m) => m.taskId === ghost)).toBe(false);
    expect(await t.deadLetters(10)).toHaveLength(0);
    expect(await p.sql`select 1 from tasks where id = ${ghost}`).toHaveLength(0);
    expect(await t.prometheus()).toMatch(
      /orch_reaction_messages_total\{consumer="ticket_cancel",outcome="forged"\} [1-9]/,
    );

    // The genuine cancellation still acts.
    await p.host.send('ticket', ticketId, { type: 'CANCEL', reason: 'for real' });
    await eventually(
      async () =>
        (await stateOf(p.sql, 'tasks', running)) === 'cancelled' &&
        (await stateOf(p.sql, 'tasks', taskIds[1]!)) === 'cancelled',
      10_000,
      'open tasks cancelled',
    );
    expect(forged().ticket_cancel! - before.ticket_cancel!).toBe(3);
    sub.unsubscribe();
  });

  it('the reconciler applies what no reaction did (reactions off)', async () => {
    const e = await env('reactions_reconcile');
    const p = e.proc();
    const t = await e.start(p, { reactions: () => [], enableReconciler: false });
    const first = await ticketWithTasks(p, 2);
    for (const id of first.taskIds) await complete(p.host, id);
    const second = await ticketWithTasks(p, 2);
    await p.host.send('ticket', second.ticketId, { type: 'CANCEL' });
    // Claimed and started long ago, its ticket told nothing since it was added: still open
    // as told, so no drift (open to open is never news).
    const third = await ticketWithTasks(p, 1);
    const runningId = third.taskIds[0]!;
    await claimAndStart(p.host, runningId);
    await p.sql`update tasks set updated_at = now() - interval '1 hour' where id = ${runningId}`;
    const [thirdBefore] = await p.sql`select version from tickets where id = ${third.ticketId}`;
    expect(await driftedTasks(p.sql, [third.ticketId], 0)).toEqual([]);
    expect(await stateOf(p.sql, 'tickets', first.ticketId)).toBe('requirements');
    expect(await stateOf(p.sql, 'tasks', second.taskIds[0]!)).toBe('pending');

    const result = await t.reconciler.runOnce();
    expect(result.ticketsFixed).toBeGreaterThanOrEqual(1);
    expect(result.tasksCancelled).toBe(2);
    expect(await stateOf(p.sql, 'tickets', first.ticketId)).toBe('design');
    expect(await countEvents(p.sql, first.ticketId, 'ticket.phase_changed')).toBe(2);
    for (const id of second.taskIds) expect(await stateOf(p.sql, 'tasks', id)).toBe('cancelled');
    expect(await p.sql`select version from tickets where id = ${third.ticketId}`).toEqual([
      thirdBefore,
    ]);
    const told = await p.sql`select state from ticket_tasks where task_id = ${runningId}`;
    expect(told).toEqual([{ state: 'pending' }]);
    // A second run finds nothing left to do.
    const again = await t.reconciler.runOnce();
    expect(again.ticketsFixed + again.tasksCancelled).toBe(0);
  });

  it('a created task is dispatched to every subscriber by the relay, with no consumer of its own', async () => {
    const e = await env('reactions_dispatch');
    const p = e.proc();
    // A stream that an earlier version ran a `dispatch` consumer on: it is gone after start.
    await ensureStreams(fx.admin.jsm, e.names);
    await fx.admin.jsm.consumers.add(e.names.stream, {
      durable_name: 'dispatch',
      ack_policy: AckPolicy.Explicit,
      filter_subject: `${e.names.prefix}.events.task.*.*`,
    });
    const t = await e.start(p, { enableReconciler: false });
    const names = (await fx.admin.jsm.consumers.list(e.names.stream).next()).map((c) => c.name);
    expect(names.sort()).toEqual(['task_state', 'ticket_cancel']);
    const got: DispatchMessage[] = [];
    const other: DispatchMessage[] = [];
    const sub = t.subscribeDispatch((m) => got.push(m));
    const sub2 = t.subscribeDispatch((m) => other.push(m));
    await t.nc.flush();
    const { ticketId, taskIds } = await ticketWithTasks(p, 1);
    const created = (m: DispatchMessage) => m.taskId === taskIds[0] && m.event === 'task.created';
    await eventually(() => got.some(created) && other.some(created));
    // Exactly one wake-up per claimable event, and none for the ticket's or a claim's events.
    await claimAndStart(p.host, taskIds[0]!);
    await eventually(async () => {
      return (await unpublishedCount(p.sql)) === 0;
    });
    await t.nc.flush();
    await new Promise((r) => setTimeout(r, 200));
    expect(got.filter(created)).toHaveLength(1);
    expect(got.map((m) => m.event)).toEqual(['task.created']);
    expect(got.some((m) => m.taskId === ticketId)).toBe(false);
    sub.unsubscribe();
    sub2.unsubscribe();
  });

  it('the event feed resumes after a log position, optionally for one entity', async () => {
    const e = await env('reactions_feed');
    const p = e.proc();
    const t = await e.start(p, { reactions: () => [], enableReconciler: false });
    const { ticketId } = await ticketWithTasks(p, 2);
    await p.host.send('ticket', ticketId, { type: 'BLOCK', reason: 'x' });
    await eventually(async () => {
      return (await unpublishedCount(p.sql)) === 0;
    });
    const all: LiveMessage[] = [];
    const feed = await t.subscribeEvents(0, undefined, (m) => {
      all.push(m);
    });
    // ticket: created, task_added ×0 (no event), phase_changed, blocked; tasks: created ×2
    const total = (await p.sql<{ n: number }[]>`select count(*)::int as n from events`)[0]!.n;
    await eventually(() => all.length === total);
    expect(all.map((m) => m.position)).toEqual(all.map((_, i) => i + 1));
    expect(all.map((m) => m.position)).toEqual(all.map((m) => m.entry.pos));
    await feed.close();

    const mine: LiveMessage[] = [];
    const afterFirst = all.find((m) => m.entry.entityId === ticketId)!.position;
    const filtered = await t.subscribeEvents(afterFirst, ticketId, (m) => {
      mine.push(m);
    });
    const later = await p.sql<{ n: number }[]>`
      select count(*)::int as n from events where entity_id = ${ticketId} and seq > 1`;
    await eventually(() => mine.length === later[0]!.n);
    expect(mine.every((m) => m.entry.entityId === ticketId && m.position > afterFirst)).toBe(true);
    expect(mine.map((m) => m.entry.seq)).toEqual(mine.map((_, i) => i + 2));
    // live: a new event arrives on the open feed
    await p.host.send('ticket', ticketId, { type: 'UNBLOCK' });
    await eventually(() => mine.some((m) => m.entry.type === 'ticket.unblocked'));
    await filtered.close();
  });
});
