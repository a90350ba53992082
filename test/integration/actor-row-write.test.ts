/**
 * One statement per transition: the row's compare-and-set, its events and its timer changes
 * go out as one statement, and the events and timers are written only when the row was. A
 * lost compare-and-set leaves the event log and the timers exactly as they were.
 */
import { randomUUID } from 'node:crypto';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { Commands } from '../../src/actors/commands.js';
import { ActorHost } from '../../src/actors/host.js';
import {
  casLost,
  dependentsFound,
  loadActorRow,
  updateActorRow,
  updateTaskRows,
} from '../../src/persistence/actor-rows.js';
import { createTestDatabase, type TestDatabase } from '../support/database.js';

let db: TestDatabase;
let host: ActorHost;
beforeAll(async () => {
  db = await createTestDatabase('actor_row_write');
  host = new ActorHost(db.sql, {
    taskDefaults: { maxAttempts: 3, leaseMs: 30_000, retryBaseMs: 1_000 },
  });
});
afterAll(() => db.drop());

async function startedTicket(): Promise<string> {
  const t = await host.create('ticket', {
    id: `tkt_${randomUUID()}`,
    title: 'row write',
    stuckAfterMs: 3_600_000,
    diagnosticCooldownMs: 0,
  });
  await host.send('ticket', t.id, { type: 'START' });
  return t.id;
}

async function stateOf(id: string) {
  const events = await db.sql<{ seq: number; type: string }[]>`
    select seq, type from events where entity_id = ${id} order by seq`;
  const timers = await db.sql<{ key: string; token: string }[]>`
    select key, token::text as token from timers where entity_id = ${id} order by key`;
  const [row] = await db.sql<{ version: number; state: string }[]>`
    select version, state from tickets where id = ${id}`;
  return { events, timers, row };
}

function write(id: string, seq: number, at: number) {
  return {
    deadline: undefined,
    events: [
      {
        eventId: randomUUID(),
        seq: seq + 1,
        entityId: id,
        entityType: 'ticket' as const,
        type: 'ticket.blocked',
        data: { phase: 'requirements', reason: 'test' },
        at,
      },
    ],
    cancelTimers: ['xstate.after.stuckCheck.ticket.requirements'],
    timers: [
      {
        entityType: 'ticket' as const,
        entityId: id,
        key: 'test.timer',
        event: { type: 'UNBLOCK' },
        dueAt: at + 60_000,
        token: randomUUID(),
      },
    ],
  };
}

it('a lost compare-and-set writes no event and changes no timer', async () => {
  const id = await startedTicket();
  const before = await stateOf(id);
  expect(before.timers.map((t) => t.key)).toEqual(['xstate.after.stuckCheck.ticket.requirements']);
  const row = await loadActorRow(db.sql, 'ticket', id);
  if (!row) throw new Error('no row');
  const next = { ...row, version: row.version + 1, seq: row.seq + 1 };
  const stale = await db.sql.begin((tx) =>
    updateActorRow(tx, next, row.version - 1, write(id, row.seq, Date.now())),
  );
  expect(stale).toBeNull();
  expect(await stateOf(id)).toEqual(before);
});

it('a won compare-and-set writes the row, its events and its timers together', async () => {
  const id = await startedTicket();
  const row = await loadActorRow(db.sql, 'ticket', id);
  if (!row) throw new Error('no row');
  const next = { ...row, version: row.version + 1, seq: row.seq + 1 };
  const w = write(id, row.seq, Date.now());
  const done = await db.sql.begin((tx) => updateActorRow(tx, next, row.version, w));
  expect(done?.bytes).toBeGreaterThan(0);
  const after = await stateOf(id);
  expect(after.row?.version).toBe(row.version + 1);
  expect(after.events.at(-1)).toEqual({ seq: row.seq + 1, type: 'ticket.blocked' });
  // The stuck timer went, the new one came, with the token sent.
  expect(after.timers).toEqual([{ key: 'test.timer', token: w.timers[0]?.token }]);
  // The entry answered is the stored one.
  const [stored] = await db.sql<{ pos: number; event_id: string }[]>`
    select pos, event_id::text from events where entity_id = ${id} and seq = ${row.seq + 1}`;
  expect(done?.entries).toEqual([
    {
      pos: stored?.pos,
      eventId: stored?.event_id,
      seq: row.seq + 1,
      entityId: id,
      entityType: 'ticket',
      type: 'ticket.blocked',
      data: { phase: 'requirements', reason: 'test' },
      at: new Date(w.events[0]?.at as number).toISOString(),
    },
  ]);
});

it('through the host: 40 concurrent BLOCKs of one ticket apply once; the log stays gap-free', async () => {
  const id = await startedTicket();
  const results = await Promise.allSettled(
    Array.from({ length: 40 }, () =>
      new ActorHost(db.sql, {
        taskDefaults: { maxAttempts: 3, leaseMs: 30_000, retryBaseMs: 1_000 },
      }).send('ticket', id, { type: 'BLOCK', reason: 'race' }),
    ),
  );
  expect(results.filter((r) => r.status === 'fulfilled')).toHaveLength(1);
  const { events, timers, row } = await stateOf(id);
  expect(row?.state).toBe('blocked');
  expect(events.map((e) => e.seq)).toEqual(events.map((_, i) => i + 1));
  expect(events.filter((e) => e.type === 'ticket.blocked')).toHaveLength(1);
  // Blocked: the stuck check is cancelled once, never scheduled again by a loser.
  expect(timers).toEqual([]);
});

it('with failIfLost, a lost compare-and-set fails the statement in Postgres and writes nothing', async () => {
  const id = await startedTicket();
  const before = await stateOf(id);
  const row = await loadActorRow(db.sql, 'ticket', id);
  if (!row) throw new Error('no row');
  const next = { ...row, version: row.version + 1, seq: row.seq + 1 };
  const failed = await db.sql
    .begin((tx) =>
      updateActorRow(tx, next, row.version - 1, {
        ...write(id, row.seq, Date.now()),
        failIfLost: true,
      }),
    )
    .then(
      () => null,
      (error: unknown) => error,
    );
  expect(casLost(failed)).toBe(true);
  expect(await stateOf(id)).toEqual(before);
  // The same write at the right version goes through: the check fails only a lost one.
  const won = await db.sql.begin((tx) =>
    updateActorRow(tx, next, row.version, { ...write(id, row.seq, Date.now()), failIfLost: true }),
  );
  expect(won?.entries.map((e) => e.seq)).toEqual([row.seq + 1]);
});

it("a task's write sets, clears or leaves its lease column, with or without events", async () => {
  const commands = new Commands(host, { stuckAfterMs: 3_600_000, diagnosticCooldownMs: 0 });
  const { value: taskId } = await host.transact(async (uow) => {
    const t = await commands.createTicket(uow, { title: 'lease column' });
    await uow.send('ticket', t.id, { type: 'START' });
    return (await commands.addTask(uow, t.id, { type: 'x' })).id;
  });
  const lease = async () =>
    (
      await db.sql<{ lease: Date | null; version: number }[]>`
        select lease_expires_at as lease, version from tasks where id = ${taskId}`
    )[0];
  const rewrite = async (deadline: number | null | undefined, withEvent: boolean) => {
    const row = await loadActorRow(db.sql, 'task', taskId);
    if (!row) throw new Error('no row');
    const next = { ...row, version: row.version + 1, seq: row.seq + (withEvent ? 1 : 0) };
    const events = withEvent
      ? [
          {
            eventId: randomUUID(),
            seq: row.seq + 1,
            entityId: taskId,
            entityType: 'task' as const,
            type: 'task.test',
            data: {},
            at: Date.now(),
          },
        ]
      : [];
    const r = await db.sql.begin((tx) =>
      updateActorRow(tx, next, row.version, { deadline, events, cancelTimers: [], timers: [] }),
    );
    expect(r).not.toBeNull();
  };
  const due = Date.now() + 60_000;
  await rewrite(due, false);
  expect((await lease())?.lease?.getTime()).toBe(due);
  await rewrite(undefined, true);
  expect((await lease())?.lease?.getTime()).toBe(due);
  await rewrite(null, true);
  expect((await lease())?.lease).toBeNull();
  await rewrite(due + 1, true);
  expect((await lease())?.lease?.getTime()).toBe(due + 1);
  await rewrite(undefined, false);
  expect(await lease()).toEqual({ lease: new Date(due + 1), version: expect.any(Number) });
});

it('with failIfDependents, a write of a task something depends on fails in Postgres, alone or in a batch', async () => {
  const commands = new Commands(host, { stuckAfterMs: 3_600_000, diagnosticCooldownMs: 0 });
  const { value: ids } = await host.transact(async (uow) => {
    const t = await commands.createTicket(uow, { title: 'dependents' });
    await uow.send('ticket', t.id, { type: 'START' });
    const a = await commands.addTask(uow, t.id, { type: 'a' });
    const b = await commands.addTask(uow, t.id, { type: 'b' });
    await commands.addTask(uow, t.id, { type: 'c', dependsOn: [a.id] });
    return { a: a.id, b: b.id };
  });
  const flags = await db.sql<{ id: string; has_dependents: boolean }[]>`
    select id, has_dependents from tasks where id in (${ids.a}, ${ids.b}) order by id = ${ids.a} desc`;
  expect(flags).toEqual([
    { id: ids.a, has_dependents: true },
    { id: ids.b, has_dependents: false },
  ]);
  const rewrite = async (id: string) => {
    const row = await loadActorRow(db.sql, 'task', id);
    if (!row) throw new Error('no row');
    return {
      row: { ...row, version: row.version + 1, seq: row.seq + 1 },
      expectedVersion: row.version,
      deadline: undefined,
      events: [
        {
          eventId: randomUUID(),
          seq: row.seq + 1,
          entityId: id,
          entityType: 'task' as const,
          type: 'task.test',
          data: {},
          at: Date.now(),
        },
      ],
    };
  };
  const versions = async () =>
    (
      await db.sql<{ version: number }[]>`
        select version from tasks where id in (${ids.a}, ${ids.b}) order by id = ${ids.a} desc`
    ).map((r) => r.version);
  const before = await versions();
  const fails = (p: Promise<unknown>) =>
    p.then(
      () => null,
      (error: unknown) => error,
    );
  const one = await rewrite(ids.a);
  const alone = await fails(
    db.sql.begin((tx) =>
      updateActorRow(tx, one.row, one.expectedVersion, {
        ...one,
        cancelTimers: [],
        timers: [],
        failIfDependents: true,
      }),
    ),
  );
  expect(dependentsFound(alone)).toBe(true);
  // In a batch the one task with dependents fails the statement, and nothing of it is written.
  const batch = [
    { ...(await rewrite(ids.b)), failIfDependents: true },
    { ...(await rewrite(ids.a)), failIfDependents: true },
  ];
  expect(dependentsFound(await fails(db.sql.begin((tx) => updateTaskRows(tx, batch))))).toBe(true);
  expect(await versions()).toEqual(before);
  // Without the check on the task that has dependents, the same batch is written.
  const [first, second] = batch;
  const written = await db.sql.begin((tx) =>
    updateTaskRows(tx, [
      first as (typeof batch)[0],
      { ...(second as (typeof batch)[0]), failIfDependents: false },
    ]),
  );
  expect(written.every((w) => w !== null)).toBe(true);
  expect(await versions()).toEqual(before.map((v) => v + 1));
});
