/**
 * How a worker pool's claims share transactions: a slot settles its task and claims its
 * next in one transaction, slots that finish at once settle and claim together, and the idle
 * slots of a pool claim together, each task in the name of the slot that runs it. Which events share a transaction is read from Postgres
 * itself (`xmin` of the event rows), so this does not depend on timing.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { Executor } from '../../src/workers/executors/index.js';
import { createTestDatabase, type TestDatabase } from '../support/database.js';
import { taskEvents } from '../support/task-events.js';
import { type TestProcess, testProcess, until } from '../support/worker-process.js';

let db: TestDatabase;
let p: TestProcess;
beforeAll(async () => {
  db = await createTestDatabase('workers_claim_batching');
  p = testProcess(db.pool(10), { taskDefaults: { leaseMs: 30_000 } });
});
afterAll(async () => {
  await p.close();
  await db.drop();
});

const events = (ids: string[]) => taskEvents(db.sql, ids);

const completed = async (ids: string[]) =>
  (await events(ids)).filter((e) => e.type === 'task.completed').length === ids.length;

/** Runs a task by waiting for the test to let it finish. */
class GateExecutor implements Executor {
  readonly name = 'gate';
  private opened!: () => void;
  readonly gate = new Promise<void>((resolve) => {
    this.opened = resolve;
  });
  open(): void {
    this.opened();
  }
  async run() {
    await this.gate;
    return { result: {} };
  }
}

/** A pool of `concurrency` slots running the gate executor, once every slot is idle and waiting. */
async function gatedPool(workerId: string, concurrency: number) {
  const gate = new GateExecutor();
  const pool = p.pool({ workerId, concurrency, claimWaitMs: 30_000 }, [gate]);
  await new Promise((r) => setTimeout(r, 200));
  return { gate, pool };
}

/** `n` gate tasks added to a new ticket in one transaction (one wake-up for all of them). */
async function gatedTasks(n: number): Promise<string[]> {
  const ticket = await p.ticket();
  const { value } = await p.host.transact(async (u) => {
    const out: string[] = [];
    for (let i = 0; i < n; i++) {
      out.push((await p.commands.addTask(u, ticket, { type: 'x', executor: 'gate' })).id);
    }
    return out;
  });
  return value;
}

describe('worker pool claims', () => {
  it('one slot: each COMPLETE commits with the claim and START of the next task', async () => {
    const ticket = await p.ticket();
    const ids: string[] = [];
    for (let i = 0; i < 4; i++) ids.push(await p.task(ticket, { type: 'x', executor: 'sleep' }));
    const pool = p.pool({ workerId: 'one', concurrency: 1 });
    await until(() => completed(ids), 30_000);
    await pool.stop(5_000);
    const rows = await events(ids);
    const xid = (id: string, type: string) =>
      rows.find((r) => r.entity_id === id && r.type === type)?.xid;
    for (let i = 1; i < ids.length; i++) {
      const prev = ids[i - 1] as string;
      const id = ids[i] as string;
      expect(xid(id, 'task.claimed')).toBe(xid(prev, 'task.completed'));
      expect(xid(id, 'task.started')).toBe(xid(prev, 'task.completed'));
    }
    // The last COMPLETE found nothing to claim and still committed.
    expect(pool.stats()).toMatchObject({ claims: 4, completions: 4, failures: 0, releases: 0 });
  });

  it('idle slots: work that turns up is claimed for all of them in one transaction, each in its own name', async () => {
    const { gate, pool } = await gatedPool('idle', 4);
    // One transaction, one wake-up: the polling slot claims for every idle slot.
    const ids = await gatedTasks(4);
    await until(async () => pool.stats().running === 4, 30_000);
    const claimed = (await events(ids)).filter((e) => e.type === 'task.claimed');
    expect(claimed).toHaveLength(4);
    expect(new Set(claimed.map((e) => e.xid)).size).toBe(1);
    expect(new Set(claimed.map((e) => e.worker))).toEqual(
      new Set(['idle#1', 'idle#2', 'idle#3', 'idle#4']),
    );
    gate.open();
    await until(() => completed(ids), 30_000);
    await pool.stop(5_000);
    expect(pool.stats()).toMatchObject({ claims: 4, completions: 4, releases: 0 });
  });

  it('slots finishing at once: their COMPLETEs and their next claims share one transaction', async () => {
    const { gate, pool } = await gatedPool('many', 4);
    const ids = await gatedTasks(8);
    await until(async () => pool.stats().running === 4, 30_000);
    const first = (await events(ids))
      .filter((e) => e.type === 'task.claimed')
      .map((e) => e.entity_id);
    expect(first).toHaveLength(4);
    // The gate opens for all four at once: they settle together.
    gate.open();
    await until(() => completed(ids), 30_000);
    await pool.stop(5_000);
    const rows = await events(ids);
    const settled = rows.filter((e) => e.type === 'task.completed' && first.includes(e.entity_id));
    expect(new Set(settled.map((e) => e.xid)).size).toBe(1);
    const xid = settled[0]?.xid;
    const next = rows.filter((e) => e.type === 'task.claimed' && !first.includes(e.entity_id));
    expect(next).toHaveLength(4);
    for (const e of next) expect(e.xid).toBe(xid);
    // Each next task in the name of a slot that settled, one each.
    expect(new Set(next.map((e) => e.worker))).toEqual(
      new Set(['many#1', 'many#2', 'many#3', 'many#4']),
    );
    expect(pool.stats()).toMatchObject({ claims: 8, completions: 8, releases: 0, leaseLosses: 0 });
  });

  it('a COMPLETE refused in a shared settle: the others still complete, each alone, and nothing else is lost', async () => {
    const { gate, pool } = await gatedPool('refused', 3);
    const ids = await gatedTasks(3);
    await until(async () => pool.stats().running === 3, 30_000);
    // One of the running tasks is cancelled under its worker: its COMPLETE will be refused.
    const cancelled = ids[1] as string;
    await p.host.send('task', cancelled, { type: 'CANCEL', reason: 'test' });
    gate.open();
    const others = ids.filter((id) => id !== cancelled);
    await until(() => completed(others), 30_000);
    await until(async () => pool.stats().leaseLosses === 1, 30_000);
    await pool.stop(5_000);
    const states = await db.sql<{ id: string; state: string }[]>`
      select id, state from tasks where id in ${db.sql(ids)}`;
    const state = new Map(states.map((r) => [r.id, r.state]));
    expect(state.get(cancelled)).toBe('cancelled');
    for (const id of others) expect(state.get(id)).toBe('completed');
    expect(pool.stats()).toMatchObject({ completions: 2, leaseLosses: 1, releases: 0 });
  });

  it('two tasks one task depends on, settled in one transaction: it is released once and runs once', async () => {
    const { gate, pool } = await gatedPool('diamond', 2);
    const ticket = await p.ticket();
    const { value: ids } = await p.host.transact(async (u) => {
      const a = (await p.commands.addTask(u, ticket, { type: 'x', executor: 'gate' })).id;
      const b = (await p.commands.addTask(u, ticket, { type: 'x', executor: 'gate' })).id;
      const c = await p.commands.addTask(u, ticket, {
        type: 'x',
        executor: 'gate',
        dependsOn: [a, b],
      });
      return [a, b, c.id];
    });
    await until(async () => pool.stats().running === 2, 30_000);
    gate.open();
    await until(() => completed(ids), 30_000);
    await pool.stop(5_000);
    const rows = await events(ids);
    const [a, b, c] = ids as [string, string, string];
    const xidOf = (id: string) =>
      rows.find((e) => e.entity_id === id && e.type === 'task.completed')?.xid;
    // Both prerequisites settled together; the dependent was claimed and completed once.
    expect(xidOf(a)).toBe(xidOf(b));
    const ofC = rows.filter((e) => e.entity_id === c).map((e) => e.type);
    expect(ofC.filter((t) => t === 'task.claimed')).toHaveLength(1);
    expect(ofC.filter((t) => t === 'task.completed')).toHaveLength(1);
    expect(pool.stats()).toMatchObject({ claims: 3, completions: 3, leaseLosses: 0 });
  });
});
