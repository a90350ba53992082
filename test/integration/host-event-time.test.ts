/**
 * A unit of work stamps its events with the time it starts to run in its transaction, not
 * the time it was submitted: a unit that waited for a lane must not stamp its events before
 * those of a transaction that committed while it waited.
 */
import { afterAll, beforeAll, expect, it } from 'vitest';
import { ActorHost } from '../../src/actors/host.js';
import { entityEvents } from '../../src/persistence/event-log.js';
import { createTestDatabase, type TestDatabase } from '../support/database.js';
import { TASK_DEFAULTS, ticketInput } from '../support/fixtures.js';

let db: TestDatabase;
beforeAll(async () => {
  db = await createTestDatabase('host_event_time');
});
afterAll(() => db.drop());

it('stamps the events of a unit that waited for a lane when it runs', async () => {
  let now = 1_000_000;
  // One lane, no batching: the second unit waits while the first holds the lane.
  const host = new ActorHost(db.sql, {
    taskDefaults: TASK_DEFAULTS,
    clock: () => now,
    commitLanes: 1,
    commitBatchMax: 1,
  });
  const first = await host.create('ticket', ticketInput());
  const second = await host.create('ticket', ticketInput());
  let release!: () => void;
  const held = new Promise<void>((resolve) => {
    release = resolve;
  });
  const holding = host.transact(async (uow) => {
    await uow.send('ticket', first.id, { type: 'START' });
    await held;
  });
  const waiting = host.send('ticket', second.id, { type: 'START' });
  await new Promise((r) => setTimeout(r, 50));
  now += 10_000; // the time passes while the second unit waits
  release();
  await holding;
  await waiting;
  const started = (await entityEvents(db.sql, second.id)).find(
    (e) => e.type === 'ticket.phase_changed',
  );
  expect(started).toBeDefined();
  expect(new Date(started?.at as unknown as string).getTime()).toBe(1_010_000);
});
