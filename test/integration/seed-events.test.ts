/**
 * Seed regression tests, events (issue 8, item 2): the bugs of ../shared/seeds/ that came
 * from how events reached their handlers, each replayed against real Postgres and JetStream
 * with two "processes" (two pools, two hosts, two transports) and shown not to happen here.
 *
 * - Duplicate handlers (seed 000, issue 1).
 * - Subscriptions that never fire (seed 000, issue 2; seed 004).
 */
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import type { Commands } from '../../src/actors/commands.js';
import { ActorHost } from '../../src/actors/host.js';
import { PHASES, type Phase } from '../../src/machines/phases.js';
import type { Sql } from '../../src/persistence/db.js';
import type { EventEntry } from '../../src/persistence/event-log.js';
import { unpublishedCount } from '../../src/persistence/outbox-rows.js';
import { forwardTaskState } from '../../src/policies/index.js';
import type { Transport } from '../../src/transport/index.js';
import { taskStateReaction } from '../../src/transport/reactions.js';
import type { TransportNames } from '../../src/transport/subjects.js';
import { createTestDatabase, type TestDatabase } from '../support/database.js';
import { TASK_DEFAULTS } from '../support/fixtures.js';
import {
  commandsFor,
  eventually,
  type NatsAdmin,
  natsAdmin,
  startTransport,
  testNames,
} from '../support/transport.js';
import { type TestProcess, testProcess } from '../support/worker-process.js';

let admin: NatsAdmin;
const allNames: TransportNames[] = [];
const dbs: TestDatabase[] = [];
const transports: Transport[] = [];
const procs: TestProcess[] = [];

beforeAll(async () => {
  admin = await natsAdmin();
});
afterEach(async () => {
  await Promise.all(procs.splice(0).map((p) => p.close()));
  await Promise.all(transports.splice(0).map((t) => t.stop()));
});
afterAll(async () => {
  await admin.close(allNames);
  await Promise.all(dbs.map((d) => d.drop()));
});

interface Proc {
  sql: Sql;
  host: ActorHost;
  commands: Commands;
}

/** A database and stream names of their own, and "processes" on their own pools. */
async function env(label: string) {
  const db = await createTestDatabase(label);
  dbs.push(db);
  const names = testNames();
  allNames.push(names);
  return {
    db,
    names,
    proc(): Proc {
      const sql = db.pool(5);
      const host = new ActorHost(sql, { taskDefaults: TASK_DEFAULTS });
      return { sql, host, commands: commandsFor(host) };
    },
    async start(p: Proc, over: Parameters<typeof startTransport>[3] = {}): Promise<Transport> {
      const t = await startTransport(p.sql, p.host, names, over);
      transports.push(t);
      return t;
    },
  };
}

/** A started ticket with `perPhase` tasks in each phase, created up front. */
async function ticketThroughPhases(p: Proc, perPhase: number) {
  const { value } = await p.host.transact(async (uow) => {
    const t = await p.commands.createTicket(uow, { title: 'seed' });
    const tasks: Record<Phase, string[]> = {
      requirements: [],
      design: [],
      implementation: [],
      testing: [],
    };
    for (const phase of PHASES) {
      for (let i = 0; i < perPhase; i++) {
        tasks[phase].push((await p.commands.addTask(uow, t.id, { type: 'x', phase })).id);
      }
    }
    return { ticketId: t.id, tasks };
  });
  await p.host.send('ticket', value.ticketId, { type: 'START' });
  return value;
}

/** Claim, start, complete; returns the task.completed event as the stream carries it. */
async function complete(host: ActorHost, taskId: string): Promise<EventEntry> {
  const claimed = await host.send('task', taskId, { type: 'CLAIM', workerId: 'agent' });
  const token = (claimed.snapshot.context as { token: string }).token;
  await host.send('task', taskId, { type: 'START', token });
  const done = await host.send('task', taskId, { type: 'COMPLETE', token });
  const entry = done.events.find((e) => e.type === 'task.completed');
  if (!entry) throw new Error(`no task.completed for ${taskId}`);
  return entry;
}

async function ticketsIn(sql: Sql, ids: string[], state: string): Promise<number> {
  const [r] = await sql<{ n: number }[]>`select count(*)::int as n from tickets
    where id in ${sql(ids)} and state = ${state}`;
  return r?.n ?? 0;
}

describe('seed regressions: events', () => {
  /*
   * Seed 000 (OmoiOS parallel systems analysis), CRITICAL issue 1, "Duplicate Event Handlers
   * for Phase Transitions": the API server (PhaseManager._handle_task_completed) and the
   * orchestrator worker (PhaseProgressionService._handle_task_completed) both subscribed to
   * TASK_COMPLETED and both ran `ticket.status = "done"` on the same ticket: "Both API Server
   * and Worker receive the event ... RACE CONDITION: Last write wins".
   *
   * Here every TASK_COMPLETED-style event is handled by FOUR handlers at once: the durable
   * consumer shared by both processes' transports, each process's reaction runner invoked
   * directly on the same event (as if both had received it), the bare handler without its
   * inbox from both hosts, and both reconcilers sweeping meanwhile. The ticket still
   * advances exactly once per phase.
   */
  it('duplicate handlers: two processes both handling every TASK_COMPLETED advance each ticket once per phase', {
    timeout: 90_000,
  }, async () => {
    const e = await env('seed_dup_handlers');
    const a = e.proc();
    const b = e.proc();
    const ta = await e.start(a);
    const tb = await e.start(b);
    const runners = [ta, tb].map((t) => t.runners.find((r) => r.name === taskStateReaction.name)!);
    const tickets = await Promise.all(Array.from({ length: 20 }, () => ticketThroughPhases(a, 2)));
    const ids = tickets.map((t) => t.ticketId);
    expect(await ticketsIn(a.sql, ids, 'requirements')).toBe(ids.length);

    let handlerCalls = 0;
    for (const [i, phase] of PHASES.entries()) {
      const next = PHASES[i + 1] ?? 'done';
      // Both reconcilers sweep the whole time: a third and fourth handler of the same facts.
      let sweeping = true;
      const sweeps = [ta, tb].map(async (t) => {
        while (sweeping) {
          await t.reconciler.runOnce();
          await new Promise((r) => setTimeout(r, 20));
        }
      });
      await Promise.all(
        tickets.flatMap((t, ti) =>
          t.tasks[phase].map(async (taskId, j) => {
            const [mine, theirs] = (ti + j) % 2 === 0 ? [a, b] : [b, a];
            const entry = await complete(mine.host, taskId);
            // Both processes "receive" the same TASK_COMPLETED and run their handler on it.
            await Promise.all([
              runners[0]!.process(entry),
              runners[1]!.process(entry),
              mine.host.transact((uow) => forwardTaskState(uow, taskId)),
              theirs.host.transact((uow) => forwardTaskState(uow, taskId)),
            ]);
            handlerCalls += 4;
          }),
        ),
      );
      await eventually(
        async () => (await ticketsIn(a.sql, ids, next)) === ids.length,
        30_000,
        `every ticket in ${next}`,
      );
      sweeping = false;
      await Promise.all(sweeps);
    }
    // Late redeliveries and sweeps, if they were to double anything, would land by now.
    await Promise.all([ta.reconciler.runOnce(), tb.reconciler.runOnce()]);
    await eventually(async () => {
      return (await unpublishedCount(a.sql)) === 0;
    });

    const changes = await a.sql<{ entity_id: string; type: string; to: string; n: number }[]>`
      select entity_id, type, data->>'to' as to, count(*)::int as n from events
      where entity_id in ${a.sql(ids)} and type in ('ticket.phase_changed', 'ticket.done')
      group by entity_id, type, data->>'to'`;
    // Per ticket: one phase_changed to each phase (START, then three advances), one done.
    expect(changes).toHaveLength(ids.length * (PHASES.length + 1));
    expect(changes.filter((c) => c.n !== 1)).toEqual([]);
    for (const id of ids) {
      const mine = changes.filter((c) => c.entity_id === id);
      expect(mine.map((c) => c.to).sort()).toEqual([...PHASES, 'done'].sort());
    }
    expect(handlerCalls).toBe(ids.length * PHASES.length * 2 * 4);
    // Every handler ran on every completion (no inbox stood between them: the policy's own
    // check of what the ticket was told turned each repeat into a no-op).
    const ran = runners.reduce((n, r) => n + r.stats.applied, 0);
    expect(ran).toBeGreaterThanOrEqual(ids.length * PHASES.length * 2 * 2);
    // And nothing a handler did failed or ended in the dead letters.
    expect(await ta.deadLetters(10)).toEqual([]);
  });

  /*
   * Seed 000, CRITICAL issue 2, "Redis Pub/Sub Subscriptions Don't Fire in Worker": the
   * worker called `event_bus.subscribe(...)` but never `listen()`, so "All event
   * subscriptions in the worker are dead code"; seed 004 counts "153 published vs 18
   * subscribed". Pub/sub is fire-and-forget: a message published while nobody listens is
   * gone. Here reactions are durable JetStream consumers and the claim is a Postgres query,
   * so a handler or a worker that starts AFTER the events still gets all of them.
   */
  it('subscriptions that never fire: reactions started after the events were published still apply them', {
    timeout: 60_000,
  }, async () => {
    const e = await env('seed_late_reactions');
    const p = e.proc();
    // A process that publishes (outbox relay) but runs no reaction at all.
    const publisher = await e.start(p, { reactions: () => [], enableReconciler: false });
    const tickets = await Promise.all(Array.from({ length: 8 }, () => ticketThroughPhases(p, 2)));
    const ids = tickets.map((t) => t.ticketId);
    await Promise.all(
      tickets.flatMap((t) => t.tasks.requirements.map((id) => complete(p.host, id))),
    );
    const published = await eventually(async () => {
      if ((await unpublishedCount(p.sql)) !== 0) return false;
      return (await admin.jsm.streams.info(e.names.stream)).state.messages;
    });
    expect(published).toBeGreaterThan(0);
    // No consumer exists yet; nothing advanced the tickets.
    await expect(admin.jsm.consumers.info(e.names.stream, 'task_state')).rejects.toThrow();
    expect(await ticketsIn(p.sql, ids, 'requirements')).toBe(ids.length);

    // A process starts late, with its reactions and without the reconciler that would
    // otherwise repair this from Postgres: the durable consumer delivers the backlog.
    const late = e.proc();
    const t1 = await e.start(late, { enableReconciler: false, enableRelay: false });
    await eventually(
      async () => (await ticketsIn(p.sql, ids, 'design')) === ids.length,
      20_000,
      'tickets advanced by the late reaction',
    );
    expect(t1.runners.find((r) => r.name === 'task_state')!.stats.applied).toBeGreaterThan(0);

    // It stops; more events are published while no process consumes; another starts later.
    await t1.stop();
    await Promise.all(tickets.flatMap((t) => t.tasks.design.map((id) => complete(p.host, id))));
    await eventually(async () => {
      return (await unpublishedCount(p.sql)) === 0;
    });
    const waiting = await admin.jsm.consumers.info(e.names.stream, 'task_state');
    expect(waiting.num_pending).toBeGreaterThan(0);
    expect(await ticketsIn(p.sql, ids, 'design')).toBe(ids.length);
    const t2 = await e.start(e.proc(), { enableReconciler: false, enableRelay: false });
    await eventually(
      async () => (await ticketsIn(p.sql, ids, 'implementation')) === ids.length,
      20_000,
      'tickets advanced after the restart',
    );
    expect(t2.runners.find((r) => r.name === 'task_state')!.stats.applied).toBeGreaterThan(0);
    const changes = await p.sql<{ n: number }[]>`select count(*)::int as n from events
      where entity_id in ${p.sql(ids)} and type = 'ticket.phase_changed'`;
    expect(changes[0]?.n).toBe(ids.length * 3);
    await publisher.stop();
  });

  /*
   * Seed 000, issue 2, the other half: "The worker relies on its 1-second polling fallback",
   * and seed 001's cascade starts with "EventBus emits TASK_CREATED → Orchestrator receives
   * wakeup signal". Here a dispatch wake-up is only a latency hint: tasks created while no
   * worker runs (their wake-ups published to nobody) are claimed by a worker process that
   * starts later, each exactly once.
   */
  it('subscriptions that never fire: a worker process that starts late still claims all pending work', async () => {
    const e = await env('seed_late_worker');
    const p = e.proc();
    const t = await e.start(p, { enableReconciler: false });
    let wakes = 0;
    const heard = t.subscribeDispatch(() => {
      wakes++;
    });
    await t.nc.flush();
    const { value } = await p.host.transact(async (uow) => {
      const ticket = await p.commands.createTicket(uow, { title: 'late worker' });
      const ids: string[] = [];
      for (let i = 0; i < 12; i++) {
        const task = await p.commands.addTask(uow, ticket.id, {
          type: 'x',
          executor: 'sleep',
          payload: { ms: 20 },
        });
        ids.push(task.id);
      }
      return ids;
    });
    // Every task.created went out as a wake-up, heard by no claimer.
    await eventually(() => wakes >= value.length, 15_000, 'wake-ups sent');
    heard.unsubscribe();
    const pending = async () => {
      const [r] = await p.sql<{ n: number }[]>`select count(*)::int as n from tasks
        where id in ${p.sql(value)} and state = 'pending'`;
      return r?.n ?? 0;
    };
    expect(await pending()).toBe(value.length);

    // The worker process starts now, on its own pool, subscribed to nothing.
    const worker = testProcess(e.db.pool(6));
    procs.push(worker);
    const pool = worker.pool({ workerId: 'late', concurrency: 3 });
    await eventually(
      async () => {
        const [r] = await p.sql<{ n: number }[]>`select count(*)::int as n from tasks
          where id in ${p.sql(value)} and state = 'completed'`;
        return r?.n === value.length;
      },
      20_000,
      'late worker completed every task',
    );
    expect(pool.stats().completions).toBe(value.length);
    const claims = await p.sql<{ n: number }[]>`select count(*)::int as n from events
      where entity_id in ${p.sql(value)} and type = 'task.claimed'`;
    expect(claims[0]?.n).toBe(value.length);
  });
});
