/**
 * Early reactions against a real NATS and Postgres: the process that commits a task's
 * settlement tells its ticket right after, without the consumer; its own consumer then acks
 * that delivery without a transaction, but only a delivery that names exactly the event it
 * committed; what fails early is left to the consumer; and two processes, each telling
 * early and each consuming the other's messages, advance every ticket exactly once.
 */
import { randomUUID } from 'node:crypto';
import { jetstream } from '@nats-io/jetstream';
import pino from 'pino';
import { describe, expect, it } from 'vitest';
import type { Commands } from '../../src/actors/commands.js';
import { ActorHost } from '../../src/actors/host.js';
import { silentLogger } from '../../src/log.js';
import type { Sql } from '../../src/persistence/db.js';
import type { ConsumerRunner } from '../../src/transport/consumer-runner.js';
import { EarlyReactions } from '../../src/transport/early-reactions.js';
import type { Transport, TransportOptions } from '../../src/transport/index.js';
import { taskStateReaction } from '../../src/transport/reactions.js';
import { eventSubject, type TransportNames } from '../../src/transport/subjects.js';
import type { TestDatabase } from '../support/database.js';
import { deferred } from '../support/deferred.js';
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

const fx = transportFixtures();

interface Proc {
  host: ActorHost;
  commands: Commands;
  transport: Transport;
  runner: ConsumerRunner;
  early: EarlyReactions;
}

/** One process: a host of its own on its own pool, and a transport on the shared names. */
async function proc(
  db: TestDatabase,
  names: TransportNames,
  over: Partial<TransportOptions> = {},
): Promise<Proc> {
  const sql = db.pool(8);
  const host = new ActorHost(sql, { taskDefaults: TASK_DEFAULTS });
  const transport = await startTransport(sql, host, names, { enableReconciler: false, ...over });
  fx.keep(transport);
  const runner = transport.runners.find((r) => r.name === 'task_state') as ConsumerRunner;
  const early = transport.early.get('task_state') as EarlyReactions;
  if (over.earlyReactions !== false) expect(early).toBeDefined();
  return { host, commands: commandsFor(host), transport, runner, early };
}

async function setup(label: string): Promise<{ db: TestDatabase; names: TransportNames }> {
  return { db: await fx.database(label), names: fx.names() };
}

async function ticketState(sql: Sql, id: string): Promise<string> {
  const rows = await sql<{ state: string }[]>`select state from tickets where id = ${id}`;
  return rows[0]?.state ?? 'missing';
}

/** Waits until the consumer has nothing pending or unacknowledged. */
async function consumerIdle(t: Transport, names: TransportNames): Promise<void> {
  await eventually(
    async () => {
      if ((await t.relay.lag()).count > 0) return false;
      const info = await t.jsm.consumers.info(names.stream, 'task_state');
      return info.num_pending + info.num_ack_pending === 0;
    },
    20_000,
    'the task_state consumer idle',
  );
}

describe('early reactions', () => {
  it("a task's completion reaches its ticket with no consumer running", async () => {
    const { db, names } = await setup('early_no_consumer');
    const p = await proc(db, names);
    await p.runner.stop();
    const { ticketId, taskIds } = await ticketWithTasks(p, 3);
    await Promise.all(taskIds.map((id) => complete(p.host, id)));
    await eventually(
      async () => (await ticketState(db.sql, ticketId)) === 'design',
      10_000,
      'the ticket advanced by its early news',
    );
    // Counted once the commits are answered, which may come just after the state is seen.
    await eventually(() => p.early.stats.applied === 3, 5_000, 'three applied early');
    expect(p.early.stats.failures).toBe(0);
    expect(await p.transport.prometheus()).toContain(
      'orch_early_reactions_total{reaction="task_state",outcome="applied"} 3',
    );
    expect(p.runner.stats.applied + p.runner.stats.appliedEarly).toBe(0);
    const told = await db.sql<{ n: number }[]>`
      select count(*)::int as n from ticket_tasks
      where task_id = any(${taskIds}::text[]) and state = 'completed'`;
    expect(told[0]?.n).toBe(3);
  });

  it('its own consumer acks what it applied early, without a transaction', async () => {
    const { db, names } = await setup('early_acked');
    const p = await proc(db, names);
    const tickets = await Promise.all([0, 1, 2].map(() => ticketWithTasks(p, 10)));
    await consumerIdle(p.transport, names);
    const before = { ...p.runner.stats };
    await Promise.all(tickets.flatMap((t) => t.taskIds.map((id) => complete(p.host, id))));
    for (const t of tickets) {
      await eventually(
        async () => (await ticketState(db.sql, t.ticketId)) === 'design',
        10_000,
        'every ticket advanced',
      );
    }
    await consumerIdle(p.transport, names);
    expect(p.early.stats.applied).toBe(30);
    // Each completion's delivery was acked on what this process committed: no transaction,
    // no check against the event log.
    expect(p.runner.stats.appliedEarly - before.appliedEarly).toBe(30);
    expect(p.runner.stats.transactions - before.transactions).toBe(0);
    expect(p.runner.stats.forged).toBe(0);
    expect(p.early.remembered).toBe(0);
  });

  it('a delivery naming an event applied early with other details is checked and found forged', async () => {
    const { db, names } = await setup('early_forged');
    // No relay: the test publishes what the stream gets.
    const p = await proc(db, names, { enableRelay: false });
    const { ticketId, taskIds } = await ticketWithTasks(p, 2);
    const [first] = taskIds as [string];
    await complete(p.host, first);
    await eventually(() => p.early.stats.applied === 1, 10_000, 'the early news');
    const [done] = await db.sql<{ event_id: string; seq: number }[]>`
      select event_id, seq from events where entity_id = ${first} and type = 'task.completed'`;
    const js = jetstream(fx.admin.nc);
    const message = (seq: number, eventId: string) =>
      JSON.stringify({
        pos: 1,
        eventId,
        seq,
        entityId: first,
        entityType: 'task',
        type: 'task.completed',
        data: { ticketId },
        at: new Date().toISOString(),
      });
    const subject = eventSubject(names, 'task', first, 'task.completed');
    // The genuine event's id with another seq: not the event this process committed.
    await js.publish(subject, message(done!.seq + 1, done!.event_id));
    await eventually(() => p.runner.stats.forged === 1, 10_000, 'the forged delivery counted');
    expect(p.runner.stats.appliedEarly).toBe(0);
    // The genuine message still has its effect (already there): checked against Postgres.
    await js.publish(subject, message(done!.seq, done!.event_id.toUpperCase()), {
      msgID: randomUUID(),
    });
    await eventually(() => p.runner.stats.applied === 1, 10_000, 'the genuine delivery checked');
    expect(p.runner.stats.forged).toBe(1);
    expect(await ticketState(db.sql, ticketId)).toBe('requirements');
  });

  it('news that fails early is left to the consumer, which applies it once the fault is gone', async () => {
    const { db, names } = await setup('early_failed');
    const p = await proc(db, names, {
      consumer: { ackWaitMs: 2_000, maxDeliver: 20, retryBaseMs: 50, maxRetryDelayMs: 200 },
    });
    // One task: one early transaction, so nothing early can run after the fault is gone.
    const { ticketId, taskIds } = await ticketWithTasks(p, 1);
    await db.sql.unsafe(`
      create function refuse_ticket() returns trigger language plpgsql as $$
      begin raise exception 'injected fault for %', old.id; end $$;
      create trigger refuse_ticket before update on tickets for each row
        when (old.id = '${ticketId}') execute function refuse_ticket();`);
    await Promise.all(taskIds.map((id) => complete(p.host, id)));
    await eventually(() => p.early.stats.failures >= 1, 10_000, 'the early news failed');
    await eventually(() => p.runner.stats.failures >= 1, 10_000, 'the consumer tried it too');
    expect(p.early.stats.failures).toBe(1);
    expect(await ticketState(db.sql, ticketId)).toBe('requirements');
    await db.sql.unsafe('drop trigger refuse_ticket on tickets');
    await eventually(
      async () => (await ticketState(db.sql, ticketId)) === 'design',
      15_000,
      'the consumer applied it once the fault was gone',
    );
    expect(p.early.stats.applied).toBe(0);
    expect(p.runner.stats.applied).toBeGreaterThanOrEqual(1);
    const changes = await db.sql<{ n: number }[]>`
      select count(*)::int as n from events
      where entity_id = ${ticketId} and type = 'ticket.phase_changed'`;
    expect(changes[0]?.n).toBe(2);
  });

  it('two processes telling early and consuming each other’s news advance each ticket once', {
    timeout: 60_000,
  }, async () => {
    const { db, names } = await setup('early_two');
    const a = await proc(db, names);
    const b = await proc(db, names);
    const tickets = await Promise.all(Array.from({ length: 20 }, () => ticketWithTasks(a, 10)));
    // Each ticket's tasks completed half in one process, half in the other, all at once.
    await Promise.all(
      tickets.flatMap((t) => t.taskIds.map((id, i) => complete((i % 2 === 0 ? a : b).host, id))),
    );
    const ids = tickets.map((t) => t.ticketId);
    await eventually(
      async () => {
        const r = await db.sql<{ n: number }[]>`
          select count(*)::int as n from tickets where state = 'design' and id in ${db.sql(ids)}`;
        return r[0]?.n === ids.length;
      },
      30_000,
      'every ticket advanced',
    );
    await consumerIdle(a.transport, names);
    const changes = await db.sql<{ entity_id: string; n: number }[]>`
      select entity_id, count(*)::int as n from events
      where type = 'ticket.phase_changed' and entity_id in ${db.sql(ids)}
      group by entity_id`;
    expect(changes).toHaveLength(20);
    for (const c of changes) expect(c.n).toBe(2);
    // Every task told once, at its completion's seq.
    const told = await db.sql<{ n: number }[]>`
      select count(*)::int as n from ticket_tasks tt join tasks t on t.id = tt.task_id
      where tt.ticket_id in ${db.sql(ids)} and tt.state = 'completed' and tt.seq = t.seq`;
    expect(told[0]?.n).toBe(200);
    expect(a.early.stats.applied + b.early.stats.applied).toBeGreaterThan(0);
  });

  it('leaves to the consumer what waits beyond its bound', async () => {
    const { db, names } = await setup('early_bound');
    const p = await proc(db, names, { earlyReactions: false });
    await p.runner.stop();
    const early = new EarlyReactions({
      host: p.host,
      log: silentLogger(),
      reaction: taskStateReaction,
      maxPending: 4,
    });
    const off = p.host.onCommit((applied) => early.committed(applied));
    try {
      const { taskIds } = await ticketWithTasks(p, 12);
      const tokens = await Promise.all(
        taskIds.map(async (id) => {
          const c = await p.host.send('task', id, { type: 'CLAIM', workerId: 'w1' });
          const token = (c.snapshot.context as { token: string }).token;
          await p.host.send('task', id, { type: 'START', token });
          return token;
        }),
      );
      // Twelve completions in one transaction: four wait for the early one, eight are left.
      await p.host.transact(async (uow) => {
        for (const [i, id] of taskIds.entries()) {
          await uow.send('task', id, { type: 'COMPLETE', token: tokens[i] as string });
        }
      });
      await eventually(() => early.stats.applied === 4, 10_000, 'the four within the bound');
      expect(early.stats.dropped).toBe(8);
    } finally {
      off();
      await early.stop();
    }
  });

  it('a transaction that does not end does not hold the shutdown: its news goes to the consumer', async () => {
    const { db, names } = await setup('early_stuck');
    const p = await proc(db, names, { earlyReactions: false });
    await p.runner.stop();
    const lines: string[] = [];
    const log = pino({ level: 'warn' }, { write: (line: string) => lines.push(line) });
    const early = new EarlyReactions({ host: p.host, log, reaction: taskStateReaction });
    const off = p.host.onCommit((applied) => early.committed(applied));
    const { ticketId, taskIds } = await ticketWithTasks(p, 1);
    const token = await claimAndStart(p.host, taskIds[0] as string);
    // Another session holds the ticket's row: the early transaction, alone in its batch and so
    // without a lock timeout, waits on it for as long as that session lasts.
    const held = deferred();
    const locked = deferred();
    const holder = db.sql.begin(async (tx) => {
      await tx`select 1 from tickets where id = ${ticketId} for update`;
      locked.resolve();
      await held.promise;
    });
    try {
      await locked.promise;
      await p.host.send('task', taskIds[0] as string, { type: 'COMPLETE', token });
      await eventually(
        async () => {
          const r = await db.sql<{ n: number }[]>`select count(*)::int as n from pg_stat_activity
            where datname = current_database() and wait_event_type = 'Lock'`;
          return (r[0]?.n ?? 0) > 0;
        },
        10_000,
        'the early transaction waiting on the lock',
      );
      const [completed] = await db.sql<{ event_id: string }[]>`select event_id from events
        where entity_id = ${taskIds[0] as string} and type = 'task.completed'`;
      const taken = early.take(completed?.event_id as string);
      expect(taken).toBeInstanceOf(Promise);

      const started = performance.now();
      await early.stop(300);
      expect(performance.now() - started).toBeLessThan(2_000);
      // The delivery that waited for it is told to apply it itself.
      expect(await taken).toBeUndefined();
      const warning = lines.map((l) => JSON.parse(l)).find((l) => l.reaction === 'task_state');
      expect(warning?.msg).toBe('early reactions still running at shutdown: left to the consumers');
      expect(warning?.running).toEqual([{ key: ticketId, events: 1, ms: expect.any(Number) }]);
      expect(warning?.commits).toEqual([{ ms: expect.any(Number), units: 1, phase: 'running' }]);
    } finally {
      off();
      held.resolve();
      await holder;
    }
  });
});
