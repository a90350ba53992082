/**
 * The task_state reaction in batches, against a real NATS and Postgres. Its consumer is
 * stopped while the news piles up on the stream, then started, so one pull brings it all:
 * many completions of one ticket's tasks advance it once in fewer transactions than
 * messages; a ticket whose transaction fails (a trigger refuses its update) is retried while
 * the other tickets of the same batch commit; a forged message inside a batch is acked,
 * counted and never reaches the inbox.
 */
import { randomUUID } from 'node:crypto';
import { jetstream } from '@nats-io/jetstream';
import { describe, expect, it } from 'vitest';
import type { Commands } from '../../src/actors/commands.js';
import { ActorHost } from '../../src/actors/host.js';
import type { Sql } from '../../src/persistence/db.js';
import type { ConsumerRunner, ConsumerSettings } from '../../src/transport/consumer-runner.js';
import type { Transport, TransportOptions } from '../../src/transport/index.js';
import { defaultReactions, taskStateReaction } from '../../src/transport/reactions.js';
import { eventSubject, type TransportNames } from '../../src/transport/subjects.js';
import type { TestDatabase } from '../support/database.js';
import { TASK_DEFAULTS } from '../support/fixtures.js';
import { recordingSql, type Sent } from '../support/statement-log.js';
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

const fx = transportFixtures();

interface Env {
  sql: Sql;
  host: ActorHost;
  commands: Commands;
  names: TransportNames;
  transport: Transport;
  /** The task_state runner, stopped: news waits on the stream until `runner.start()`. */
  runner: ConsumerRunner;
}

async function env(
  label: string,
  consumer: Partial<ConsumerSettings> = {},
  /** The pool everything runs on (default: 8 connections to the test database). */
  pool: (db: TestDatabase) => Sql = (db) => db.pool(8),
  /** Transport options besides the consumer's (the reactions it runs, say). */
  over: Partial<TransportOptions> = {},
): Promise<Env> {
  const db = await fx.database(label);
  const names = fx.names();
  const sql = pool(db);
  const host = new ActorHost(sql, { taskDefaults: { ...TASK_DEFAULTS, retryBaseMs: 20 } });
  const transport = await startTransport(sql, host, names, {
    enableReconciler: false,
    // The consumer's batches are what is tested: nothing is applied before it takes them.
    earlyReactions: false,
    consumer: {
      ackWaitMs: 2_000,
      maxDeliver: 3,
      retryBaseMs: 50,
      maxRetryDelayMs: 200,
      ...consumer,
    },
    ...over,
  });
  fx.keep(transport);
  const runner = transport.runners.find((r) => r.name === 'task_state')!;
  await runner.stop();
  return { sql, host, commands: commandsFor(host), names, transport, runner };
}

/** Waits until every task event so far (plus `extra` messages) waits on the stopped consumer. */
async function newsOnStream(e: Env, extra = 0): Promise<number> {
  const [r] = await e.sql<{ n: number }[]>`
    select count(*)::int as n from events where entity_type = 'task'`;
  const expected = (r?.n ?? 0) + extra;
  await eventually(
    async () =>
      (await e.transport.jsm.consumers.info(e.names.stream, 'task_state')).num_pending === expected,
    15_000,
    `${expected} messages waiting`,
  );
  return expected;
}

async function ticketState(sql: Sql, id: string): Promise<string> {
  const rows = await sql<{ state: string }[]>`select state from tickets where id = ${id}`;
  return rows[0]?.state ?? 'missing';
}

async function phaseChanges(sql: Sql, ticketId: string): Promise<number> {
  const rows = await sql<{ n: number }[]>`
    select count(*)::int as n from events
    where entity_id = ${ticketId} and type = 'ticket.phase_changed'`;
  return rows[0]?.n ?? 0;
}

/** Every delivery of the consumer settled (acked or termed), none waiting. */
async function consumerSettled(e: Env): Promise<void> {
  await eventually(
    async () => {
      const info = await e.transport.jsm.consumers.info(e.names.stream, 'task_state');
      return info.num_pending === 0 && info.num_ack_pending === 0;
    },
    15_000,
    'the consumer to settle',
  );
}

describe('task_state reaction in batches', () => {
  it("many completions of one ticket's tasks in one batch advance the ticket exactly once", async () => {
    const e = await env('batches_one_ticket');
    const { ticketId, taskIds } = await ticketWithTasks(e, 30);
    await Promise.all(taskIds.map((id) => complete(e.host, id)));
    const messages = await newsOnStream(e);

    await e.runner.start();
    await eventually(
      async () => (await ticketState(e.sql, ticketId)) === 'design',
      20_000,
      'the ticket in design',
    );
    await consumerSettled(e);
    expect(await phaseChanges(e.sql, ticketId)).toBe(2); // START and one ADVANCE
    const s = e.runner.stats;
    // created, claimed, started ×30 ignored (no news to the ticket); completed ×30 applied
    expect(s.ignored + s.applied + s.duplicates).toBe(messages);
    expect(s.ignored).toBe(90);
    expect(s.applied).toBe(30);
    expect(s.failures + s.forged).toBe(0);
    // The point of batching: far fewer transactions than messages applied.
    expect(s.transactions).toBeGreaterThan(0);
    expect(s.transactions).toBeLessThan(s.applied / 3);
    // The policy's own check makes repeats harmless: no inbox row per event piles up.
    const inbox = await e.sql<{ n: number }[]>`
      select count(*)::int as n from inbox where consumer = 'task_state'`;
    expect(inbox[0]?.n).toBe(0);
  });

  /**
   * A ticket's `n` tasks completed while the consumer is stopped, then the consumer started
   * on a pool that records every statement: the statements sent until the ticket advanced.
   */
  async function recordedNews(label: string, n: number, over: Partial<TransportOptions> = {}) {
    const pools: Sql[] = [];
    let sent: Sent[] = [];
    const e = await env(
      label,
      {},
      (db) => {
        const recording = recordingSql(db.url, 8);
        pools.push(recording.sql);
        sent = recording.sent;
        return recording.sql;
      },
      over,
    );
    try {
      const { ticketId, taskIds } = await ticketWithTasks(e, n);
      await Promise.all(taskIds.map((id) => complete(e.host, id)));
      await newsOnStream(e);
      sent.length = 0;
      await e.runner.start();
      await eventually(
        async () => (await ticketState(e.sql, ticketId)) === 'design',
        20_000,
        'the ticket in design',
      );
      await consumerSettled(e);
      return {
        sent: [...sent],
        stats: { ...e.runner.stats },
        phaseChanges: await phaseChanges(e.sql, ticketId),
      };
    } finally {
      await e.runner.stop();
      await e.transport.stop();
      await Promise.all(pools.map((p) => p.end({ timeout: 1 })));
    }
  }

  /** The check of a batch against the event log, at the places its messages name. */
  const isCheck = (s: Sent) => /join events e on e\.entity_id = c\.entity_id/i.test(s.query);
  const keyLookup = (s: Sent) => /select id, ticket_id from tasks/i.test(s.query);

  it('without a key in its events, a reaction looks the keys up once and still batches by them', async () => {
    // The task news as a reaction whose events would not name their key.
    const { keyOf: _named, ...group } = taskStateReaction.group ?? {};
    const lookedUp = {
      ...taskStateReaction,
      group: group as NonNullable<typeof taskStateReaction.group>,
    };
    const r = await recordedNews('batches_keys_looked_up', 12, {
      reactions: (nc, n) =>
        defaultReactions(nc, n).map((x) => (x.name === lookedUp.name ? lookedUp : x)),
    });
    const lookups = r.sent.filter(keyLookup);
    // At most one lookup per batch holding tasks not seen before, so at most one per task:
    // a redelivered message (none here) is keyed from memory.
    expect(lookups.length).toBeGreaterThan(0);
    expect(lookups.length).toBeLessThanOrEqual(12);
    expect(r.stats.applied).toBe(12);
    expect(r.stats.transactions).toBeLessThan(12);
    expect(r.phaseChanges).toBe(2);
  });

  it('keys a batch by the tickets its stored events name, with no lookup of its own', async () => {
    const r = await recordedNews('batches_keys_named', 3);
    // The runner has never seen these tasks, yet reads no key: every task event in the
    // event log names its ticket, and the check against the log reads the events anyway.
    expect(r.sent.some(isCheck)).toBe(true);
    expect(r.sent.some(keyLookup)).toBe(false);
    expect(r.stats.applied).toBe(3);
  });

  it('checks the messages inside the transaction that applies them, not in one before it', async () => {
    const r = await recordedNews('batches_check_in_tx', 6);
    // Per connection, whether a transaction is open when each check goes out.
    const open = new Map<number, boolean>();
    let checks = 0;
    for (const s of r.sent) {
      const q = s.query.trim().toLowerCase();
      if (q.startsWith('begin')) open.set(s.connection, true);
      else if (q === 'commit' || q === 'rollback') open.set(s.connection, false);
      else if (isCheck(s)) {
        checks++;
        expect(open.get(s.connection)).toBe(true);
      }
    }
    expect(checks).toBeGreaterThan(0);
    expect(r.stats.applied).toBe(6);
    expect(r.stats.forged).toBe(0);
    expect(r.phaseChanges).toBe(2);
  });

  it('a message whose body names another ticket than its event is forged and tells neither ticket', async () => {
    const e = await env('batches_forged_key');
    const a = await ticketWithTasks(e, 2);
    const b = await ticketWithTasks(e, 1);
    const [done, other] = a.taskIds as [string, string];
    await complete(e.host, done);
    await newsOnStream(e);
    // The genuine completion event of a's task, its body passed off as news for ticket b.
    const [stored] = await e.sql<{ event_id: string; seq: number }[]>`
      select event_id, seq from events where entity_id = ${done} and type = 'task.completed'`;
    const js = jetstream(fx.admin.nc);
    await js.publish(
      eventSubject(e.names, 'task', done, 'task.completed'),
      JSON.stringify({
        pos: 1,
        eventId: stored!.event_id,
        seq: stored!.seq,
        entityId: done,
        entityType: 'task',
        type: 'task.completed',
        data: { ticketId: b.ticketId },
        at: new Date().toISOString(),
      }),
    );
    await newsOnStream(e, 1);
    const eventsOfB = async () =>
      (
        await e.sql<{ n: number }[]>`
          select count(*)::int as n from events where entity_id = ${b.ticketId}`
      )[0]?.n;
    const bBefore = await eventsOfB();

    await e.runner.start();
    await consumerSettled(e);
    const s = e.runner.stats;
    expect(s.forged).toBe(1);
    expect(s.failures).toBe(0);
    // b was told nothing of a's task; a learned its completion from the genuine message.
    const toldB = await e.sql<{ n: number }[]>`
      select count(*)::int as n from ticket_tasks where ticket_id = ${b.ticketId} and task_id = ${done}`;
    expect(toldB[0]?.n).toBe(0);
    const toldA = await e.sql<{ state: string }[]>`
      select state from ticket_tasks where task_id = ${done}`;
    expect(toldA[0]?.state).toBe('completed');
    expect(await eventsOfB()).toBe(bBefore);
    await complete(e.host, other);
    await eventually(
      async () => (await ticketState(e.sql, a.ticketId)) === 'design',
      20_000,
      'ticket a in design',
    );
    expect(await ticketState(e.sql, b.ticketId)).toBe('requirements');
  });

  it('a ticket whose transaction fails is redelivered while the other tickets of the batch commit', async () => {
    // Enough deliveries that the failing ticket is not dead-lettered before the fault is gone.
    const e = await env('batches_one_fails', {
      maxDeliver: 50,
      retryBaseMs: 100,
      maxRetryDelayMs: 300,
    });
    const tickets = await Promise.all([0, 1, 2].map(() => ticketWithTasks(e, 3)));
    const [bad, ...good] = tickets as [(typeof tickets)[0], ...typeof tickets];
    for (const t of tickets) await Promise.all(t.taskIds.map((id) => complete(e.host, id)));
    await newsOnStream(e);
    // Postgres refuses any write to the bad ticket's row while the fault is in place.
    await e.sql.unsafe(`
      create function refuse_ticket() returns trigger language plpgsql as $$
      begin raise exception 'injected fault for %', old.id; end $$;
      create trigger refuse_ticket before update on tickets for each row
        when (old.id = '${bad.ticketId}') execute function refuse_ticket();`);

    await e.runner.start();
    for (const t of good) {
      await eventually(
        async () => (await ticketState(e.sql, t.ticketId)) === 'design',
        20_000,
        'the good tickets in design',
      );
    }
    // The bad ticket's news failed and came back (redelivered), and is still not applied.
    await eventually(
      () => e.runner.stats.redeliveries >= 2 && e.runner.stats.failures >= 4,
      20_000,
      'the failed messages redelivered',
    );
    expect(await ticketState(e.sql, bad.ticketId)).toBe('requirements');
    // Its failed transactions left nothing behind: the ticket was told none of the news.
    const badTold = await e.sql<{ n: number }[]>`
      select count(*)::int as n from ticket_tasks
      where task_id = any(${bad.taskIds}::text[]) and state <> 'pending'`;
    expect(badTold[0]?.n).toBe(0);

    await e.sql.unsafe('drop trigger refuse_ticket on tickets');
    await eventually(
      async () => (await ticketState(e.sql, bad.ticketId)) === 'design',
      20_000,
      'the bad ticket in design once the fault is gone',
    );
    await consumerSettled(e);
    for (const t of tickets) expect(await phaseChanges(e.sql, t.ticketId)).toBe(2);
    expect(await e.transport.deadLetters(10)).toHaveLength(0);
    const s = e.runner.stats;
    expect(s.applied).toBe(9);
    expect(s.transactions).toBeLessThan(s.applied);
  });

  it('a message whose subject names no news is acked with its body unread', async () => {
    const e = await env('batches_unread');
    const { ticketId, taskIds } = await ticketWithTasks(e, 1);
    const taskId = taskIds[0]!;
    const js = jetstream(fx.admin.nc);
    // Not even JSON. On a claim's subject it is acked as no news, unread; on a completion's
    // subject the same body is read, and refused as not an event.
    await js.publish(eventSubject(e.names, 'task', taskId, 'task.claimed'), 'not json');
    await js.publish(eventSubject(e.names, 'task', taskId, 'task.completed'), 'not json');
    const waiting = await newsOnStream(e, 2);

    await e.runner.start();
    await consumerSettled(e);
    const s = e.runner.stats;
    expect(s.forged).toBe(1);
    // The task's own events so far (its creation) and the body on the claim's subject.
    expect(s.ignored).toBe(waiting - 1);
    expect(s.applied).toBe(0);
    expect(s.failures).toBe(0);
    expect(await ticketState(e.sql, ticketId)).toBe('requirements');
    expect(await e.transport.deadLetters(10)).toHaveLength(0);
  });

  it('a forged message inside a batch is acked and counted, and never applied', async () => {
    const e = await env('batches_forged');
    const { ticketId, taskIds } = await ticketWithTasks(e, 4);
    const [running, first, ...rest] = taskIds as [string, string, ...string[]];
    await claimAndStart(e.host, running);
    await complete(e.host, first);
    await newsOnStream(e);
    // Between the genuine news: a made-up completion of the running task, and a genuine
    // event id passed off as that completion.
    const [claimed] = await e.sql<{ event_id: string; seq: number }[]>`
      select event_id, seq from events where entity_id = ${running} and type = 'task.claimed'`;
    const subject = eventSubject(e.names, 'task', running, 'task.completed');
    const forgedIds = [randomUUID(), claimed!.event_id];
    const js = jetstream(fx.admin.nc);
    // A genuine completion's every detail but its id: the place it names holds another event.
    const [done] = await e.sql<{ seq: number }[]>`
      select seq from events where entity_id = ${first} and type = 'task.completed'`;
    await js.publish(
      eventSubject(e.names, 'task', first, 'task.completed'),
      JSON.stringify({
        pos: 1,
        eventId: randomUUID(),
        seq: done!.seq,
        entityId: first,
        entityType: 'task',
        type: 'task.completed',
        data: { ticketId },
        at: new Date().toISOString(),
      }),
    );
    for (const eventId of forgedIds) {
      await js.publish(
        subject,
        JSON.stringify({
          pos: 1,
          eventId,
          seq: 9,
          entityId: running,
          entityType: 'task',
          type: 'task.completed',
          data: { ticketId },
          at: new Date().toISOString(),
        }),
      );
    }
    await Promise.all(rest.map((id) => complete(e.host, id)));
    await newsOnStream(e, forgedIds.length + 1);

    await e.runner.start();
    await consumerSettled(e);
    const s = e.runner.stats;
    expect(s.forged).toBe(3);
    // The three completions; every claim and start is no news to the ticket.
    expect(s.applied).toBe(3);
    expect(s.ignored).toBeGreaterThanOrEqual(4 + 4 + 3);
    expect(s.transactions).toBeLessThan(s.applied);
    expect(s.failures).toBe(0);
    // Neither forgery told the ticket a completion: it knows the task as open, as created.
    const told = await e.sql<{ state: string }[]>`
      select state from ticket_tasks where task_id = ${running}`;
    expect(told[0]?.state).toBe('pending');
    expect(await ticketState(e.sql, ticketId)).toBe('requirements');
    expect(await e.transport.deadLetters(10)).toHaveLength(0);

    // The genuine completion still advances the ticket, once.
    const token = (
      await e.sql<{ token: string }[]>`
        select snapshot -> 'context' ->> 'token' as token from tasks where id = ${running}`
    )[0]!.token;
    await e.host.send('task', running, { type: 'COMPLETE', token });
    await eventually(
      async () => (await ticketState(e.sql, ticketId)) === 'design',
      20_000,
      'the ticket in design',
    );
    expect(await phaseChanges(e.sql, ticketId)).toBe(2);
  });
});
