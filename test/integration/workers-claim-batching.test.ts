/**
 * How a worker pool's claims share transactions: a slot settles its task and claims its
 * next in one transaction, and the idle slots of a pool claim together, each task in the
 * name of the slot that runs it. Which events share a transaction is read from Postgres
 * itself (`xmin` of the event rows), so this does not depend on timing.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { Executor } from '../../src/workers/executors/index.js';
import { createTestDatabase, type TestDatabase } from '../support/database.js';
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

interface Row {
  entity_id: string;
  type: string;
  xid: string;
  worker: string | null;
}

/** The task events of `ids`, each with the transaction that wrote it. */
async function events(ids: string[]): Promise<Row[]> {
  return db.sql<Row[]>`
    select entity_id, type, xmin::text as xid, data->>'workerId' as worker
    from events where entity_id in ${db.sql(ids)} and type like 'task.%' order by pos`;
}

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
    const gate = new GateExecutor();
    const pool = p.pool({ workerId: 'idle', concurrency: 4, claimWaitMs: 30_000 }, [gate]);
    await new Promise((r) => setTimeout(r, 200)); // every slot is idle and waiting
    const ticket = await p.ticket();
    // One transaction, one wake-up: the polling slot claims for every idle slot.
    const { value: ids } = await p.host.transact(async (u) => {
      const out: string[] = [];
      for (let i = 0; i < 4; i++) {
        out.push((await p.commands.addTask(u, ticket, { type: 'x', executor: 'gate' })).id);
      }
      return out;
    });
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
});
