/**
 * One statement per transition: the row's compare-and-set, its events and its timer changes
 * go out as one statement, and the events and timers are written only when the row was. A
 * lost compare-and-set leaves the event log and the timers exactly as they were.
 */
import { randomUUID } from 'node:crypto';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { ActorHost } from '../../src/actors/host.js';
import { loadActorRow, updateActorRow } from '../../src/persistence/actor-rows.js';
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
