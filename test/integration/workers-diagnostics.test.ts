/**
 * Stuck tickets (CONTRACT section 3, seed 001): a ticket whose phase makes no progress gets
 * one diagnostic task per stuck period; none while one is open; none within the cooldown
 * after it completes, with two processes' timer pollers racing, and after a restart (a new
 * host and poller on the same database), because the cooldown lives in the ticket's
 * persisted context and the stuck check is a durable timer, not process memory.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { diagnosticTaskId } from '../../src/machines/ticket.js';
import { forwardTaskState } from '../../src/policies/index.js';
import { createTestDatabase, type TestDatabase } from '../support/database.js';
import {
  type ProcessOptions,
  sleep,
  type TestProcess,
  testProcess,
  until,
} from '../support/worker-process.js';

const STUCK_MS = 150;

let db: TestDatabase;
const procs: TestProcess[] = [];
beforeAll(async () => {
  db = await createTestDatabase('workers_diagnostics');
});
afterAll(async () => {
  await Promise.all(procs.map((p) => p.close()));
  await db.drop();
});

async function start(o: ProcessOptions): Promise<TestProcess> {
  const p = testProcess(db.pool(6), { stuckAfterMs: STUCK_MS, ...o });
  procs.push(p);
  await p.poller.start();
  return p;
}

async function diagnostics(ticketId: string): Promise<{ tasks: number; spawned: number }> {
  const [t] = await db.sql<{ n: number }[]>`select count(*)::int as n from tasks
    where ticket_id = ${ticketId} and type = 'diagnostic'`;
  const [e] = await db.sql<{ n: number }[]>`select count(*)::int as n from events
    where entity_id = ${ticketId} and type = 'ticket.diagnostic_spawned'`;
  return { tasks: t?.n ?? 0, spawned: e?.n ?? 0 };
}

/** Runs the diagnostic to completion and tells its ticket (the reaction's job in production). */
async function completeDiagnostic(p: TestProcess, ticketId: string, n: number): Promise<void> {
  const id = diagnosticTaskId(ticketId, n);
  const claimed = await p.host.send('task', id, { type: 'CLAIM', workerId: 'agent' });
  const token = (claimed.snapshot.context as { token: string }).token;
  await p.host.send('task', id, { type: 'START', token });
  await p.host.send('task', id, { type: 'COMPLETE', token });
  await p.host.transact((uow) => forwardTaskState(uow, id));
}

async function stuckTicket(p: TestProcess): Promise<string> {
  const ticket = await p.ticket('stuck');
  await p.task(ticket, { type: 'implement_feature' }); // external: nobody here claims it
  return ticket;
}

describe('diagnostics', () => {
  it('one per stuck period, none while open; another once it is done (no cooldown)', async () => {
    const [a] = await Promise.all([
      start({ diagnosticCooldownMs: 0 }),
      start({ diagnosticCooldownMs: 0 }),
    ]);
    const ticket = await stuckTicket(a!);
    await until(async () => (await diagnostics(ticket)).tasks === 1, 5_000);
    await sleep(STUCK_MS * 5); // several stuck checks, by two racing pollers
    expect(await diagnostics(ticket)).toEqual({ tasks: 1, spawned: 1 });
    const [row] = await db.sql<{ state: string; executor: string }[]>`
      select state, executor from tasks where id = ${diagnosticTaskId(ticket, 1)}`;
    expect(row).toEqual({ state: 'pending', executor: 'external' });

    await completeDiagnostic(a!, ticket, 1);
    await until(async () => (await diagnostics(ticket)).tasks === 2, 5_000);
    await sleep(STUCK_MS * 3);
    expect(await diagnostics(ticket)).toEqual({ tasks: 2, spawned: 2 });
  });

  it('the cooldown holds across racing processes and a restart', async () => {
    const cooldown = { diagnosticCooldownMs: 60_000 };
    const first = [await start(cooldown), await start(cooldown)];
    const ticket = await stuckTicket(first[0]!);
    await until(async () => (await diagnostics(ticket)).tasks === 1, 5_000);
    await completeDiagnostic(first[1]!, ticket, 1);
    await sleep(STUCK_MS * 4);
    expect(await diagnostics(ticket)).toEqual({ tasks: 1, spawned: 1 });

    // "Restart": both processes stop, two new ones start on the same database.
    await Promise.all(first.map((p) => p.close()));
    const version = async () =>
      (await db.sql<{ v: number }[]>`select version as v from tickets where id = ${ticket}`)[0]?.v;
    const before = await version();
    await Promise.all([start(cooldown), start(cooldown)]);
    await sleep(STUCK_MS * 5);
    expect(await diagnostics(ticket)).toEqual({ tasks: 1, spawned: 1 });
    // The stuck check did run after the restart (each run re-enters the phase): it found
    // the ticket stuck and the cooldown, read from Postgres, said no.
    expect(await version()).toBeGreaterThan(before ?? 0);
  });
});
