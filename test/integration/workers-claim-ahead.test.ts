/**
 * A worker pool claiming ahead (`claimAhead`): while its tasks are short it holds more tasks
 * `claimed` in its own name, its slots begin them without waiting for a claim and send their
 * START with the next transaction. What is claimed, started and completed in which
 * transaction is read from Postgres (`xmin` of the event rows), not from timing.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { Executor } from '../../src/workers/executors/index.js';
import { SleepExecutor } from '../../src/workers/executors/index.js';
import { createTestDatabase, type TestDatabase } from '../support/database.js';
import { taskEvents } from '../support/task-events.js';
import { type TestProcess, testProcess, until } from '../support/worker-process.js';

let db: TestDatabase;
let p: TestProcess;
beforeAll(async () => {
  db = await createTestDatabase('workers_claim_ahead');
  p = testProcess(db.pool(10), { taskDefaults: { leaseMs: 30_000 } });
});
afterAll(async () => {
  await p.close();
  await db.drop();
});

const events = (ids: string[]) => taskEvents(db.sql, ids);

async function states(ids: string[]): Promise<Map<string, string>> {
  const rows = await db.sql<{ id: string; state: string }[]>`
    select id, state from tasks where id in ${db.sql(ids)}`;
  return new Map(rows.map((r) => [r.id, r.state]));
}

const allIn = async (ids: string[], state: string) =>
  [...(await states(ids)).values()].filter((s) => s === state).length === ids.length;

/**
 * A short task that records how many of its kind run at once. Every other run ends within
 * the turn it began in (its COMPLETE then always finds its START not yet sent); the others
 * wait for the next turn of the event loop, so runs overlap.
 */
class CountingExecutor implements Executor {
  readonly name = 'count';
  running = 0;
  most = 0;
  private calls = 0;
  async run() {
    this.running++;
    this.most = Math.max(this.most, this.running);
    if (this.calls++ % 2 === 0) await new Promise((r) => setImmediate(r));
    else await Promise.resolve();
    this.running--;
    return { result: {} };
  }
}

/** Runs until the test opens the gate, or until aborted. */
class GateExecutor implements Executor {
  readonly name = 'gate';
  private opened!: () => void;
  private readonly gate = new Promise<void>((resolve) => {
    this.opened = resolve;
  });
  started = false;
  open(): void {
    this.opened();
  }
  async run(_task: unknown, ctx: { signal: AbortSignal }) {
    this.started = true;
    await Promise.race([
      this.gate,
      new Promise((_, reject) =>
        ctx.signal.addEventListener('abort', () => reject(new Error('aborted'))),
      ),
    ]);
    return { result: {} };
  }
}

/** Tasks added to a new ticket in one transaction, in this order (claims follow it). */
async function tasks(executors: string[], payload?: Record<string, number>): Promise<string[]> {
  const ticket = await p.ticket();
  const { value } = await p.host.transact(async (u) => {
    const out: string[] = [];
    for (const executor of executors) {
      out.push((await p.commands.addTask(u, ticket, { type: 'x', executor, payload })).id);
    }
    return out;
  });
  return value;
}

describe('worker pool claiming ahead', () => {
  it('short tasks: held claimed in the pool name, begun by the slots, never more running than its slots', async () => {
    const counting = new CountingExecutor();
    const ids = await tasks(Array.from({ length: 60 }, () => 'count'));
    const pool = p.pool({ workerId: 'short', concurrency: 2, claimAhead: 4 }, [counting]);
    await until(() => allIn(ids, 'completed'), 30_000);
    await pool.stop(5_000);
    expect(counting.most).toBeLessThanOrEqual(2);
    const rows = await events(ids);
    const of = (id: string, type: string) =>
      rows.filter((r) => r.entity_id === id && r.type === type);
    for (const id of ids) {
      for (const type of ['task.claimed', 'task.started', 'task.completed']) {
        expect(of(id, type)).toHaveLength(1);
      }
    }
    const ahead = ids.filter((id) => of(id, 'task.claimed')[0]?.worker === 'short#ahead');
    expect(ahead.length).toBeGreaterThan(ids.length / 2);
    for (const id of ahead) {
      // Held claimed: started in a later transaction than its claim.
      expect(of(id, 'task.started')[0]?.xid).not.toBe(of(id, 'task.claimed')[0]?.xid);
    }
    // A task that ends before its START went out: START and COMPLETE are one write of its row.
    const together = ahead.filter(
      (id) => of(id, 'task.started')[0]?.xid === of(id, 'task.completed')[0]?.xid,
    );
    expect(together.length).toBeGreaterThan(0);
    // More claims per transaction than slots: what claiming ahead is for.
    const perTx = new Map<string, number>();
    for (const r of rows)
      if (r.type === 'task.claimed') perTx.set(r.xid, (perTx.get(r.xid) ?? 0) + 1);
    expect(Math.max(...perTx.values())).toBeGreaterThan(2);
    expect(pool.stats()).toMatchObject({
      claims: 60,
      completions: 60,
      failures: 0,
      releases: 0,
      leaseLosses: 0,
    });
  });

  it('slow tasks: nothing is claimed ahead', async () => {
    const ids = await tasks(
      Array.from({ length: 4 }, () => 'sleep'),
      { ms: 80 },
    );
    const pool = p.pool({ workerId: 'slow', concurrency: 1, claimAhead: 4 }, [new SleepExecutor()]);
    await until(() => allIn(ids, 'completed'), 30_000);
    await pool.stop(5_000);
    const claimed = (await events(ids)).filter((r) => r.type === 'task.claimed');
    expect(claimed.map((r) => r.worker)).toEqual(['slow#1', 'slow#1', 'slow#1', 'slow#1']);
  });

  it('a task held ahead and cancelled before a slot begins it: refused, stopped, nothing else lost', async () => {
    const gate = new GateExecutor();
    const [first, gated, held, last] = (await tasks(['count', 'gate', 'count', 'count'])) as [
      string,
      string,
      string,
      string,
    ];
    const pool = p.pool({ workerId: 'cancel', concurrency: 1, claimAhead: 2 }, [
      new CountingExecutor(),
      gate,
    ]);
    // The first task settles with the claim of the gated one for the slot and of `held` ahead.
    await until(async () => gate.started, 30_000);
    await until(async () => (await states([held])).get(held) === 'claimed', 30_000);
    expect((await events([held])).find((r) => r.type === 'task.claimed')?.worker).toBe(
      'cancel#ahead',
    );
    await p.host.send('task', held, { type: 'CANCEL', reason: 'test' });
    gate.open();
    await until(() => allIn([first, gated, last], 'completed'), 30_000);
    await until(async () => pool.stats().leaseLosses === 1, 30_000);
    await pool.stop(5_000);
    expect((await states([held])).get(held)).toBe('cancelled');
    const ofHeld = (await events([held])).map((r) => r.type);
    expect(ofHeld).not.toContain('task.started');
    expect(ofHeld).not.toContain('task.completed');
    expect(pool.stats()).toMatchObject({ completions: 3, leaseLosses: 1, releases: 0 });
  });

  it('a task held while every slot runs past its lease is released before it expires, uncharged', async () => {
    const q = testProcess(db.pool(5), { taskDefaults: { leaseMs: 1_500 } });
    try {
      const gate = new GateExecutor();
      const ticket = await q.ticket();
      const { value: ids } = await q.host.transact(async (u) => {
        const out: string[] = [];
        for (const executor of ['count', 'gate', 'count']) {
          out.push((await q.commands.addTask(u, ticket, { type: 'x', executor })).id);
        }
        return out;
      });
      const [, gated, held] = ids as [string, string, string];
      const pool = q.pool({ workerId: 'sweep', concurrency: 1, claimAhead: 2, heartbeatMs: 400 }, [
        new CountingExecutor(),
        gate,
      ]);
      await until(async () => gate.started, 30_000);
      await until(async () => (await states([held])).get(held) === 'claimed', 5_000);
      // The slot's task outlives the held one's lease (heartbeats keep the running one's).
      await until(async () => (await states([held])).get(held) === 'pending', 5_000);
      const ofHeld = (await events([held])).map((r) => r.type);
      expect(ofHeld).toContain('task.released');
      expect(ofHeld).not.toContain('task.lease_expired');
      const [row] = await db.sql<{ used: number | null }[]>`
        select (snapshot->'context'->>'attemptsUsed')::int as used from tasks where id = ${held}`;
      expect(row?.used ?? 0).toBe(0);
      expect(pool.stats().held).toBe(0);
      gate.open();
      await until(() => allIn(ids, 'completed'), 30_000);
      await pool.stop(5_000);
      expect((await states([gated])).get(gated)).toBe('completed');
      expect(pool.stats()).toMatchObject({ completions: 3, releases: 1, leaseLosses: 0 });
    } finally {
      await q.close();
    }
  });

  it('shutdown gives back the tasks held ahead at once, uncharged', async () => {
    const gate = new GateExecutor();
    const ids = await tasks(['count', 'gate', 'count', 'count', 'count']);
    const [, gated, ...rest] = ids as [string, string, ...string[]];
    const pool = p.pool({ workerId: 'stop', concurrency: 1, claimAhead: 3 }, [
      new CountingExecutor(),
      gate,
    ]);
    await until(async () => gate.started, 30_000);
    const claimedAhead = async () =>
      (await events(rest)).filter((r) => r.type === 'task.claimed' && r.worker === 'stop#ahead');
    await until(async () => (await claimedAhead()).length >= 2, 30_000);
    const held = (await claimedAhead()).map((r) => r.entity_id);
    await until(async () => pool.stats().held === held.length, 5_000);
    await pool.stop(50);
    // The gated task was aborted after the grace and released; so was every task held ahead.
    expect((await states([gated, ...held])).get(gated)).toBe('pending');
    for (const id of held) expect((await states([id])).get(id)).toBe('pending');
    const rows = await db.sql<{ entity_id: string; attempts: number }[]>`
      select id as entity_id, (snapshot->'context'->>'attemptsUsed')::int as attempts
      from tasks where id in ${db.sql(held)}`;
    for (const r of rows) expect(r.attempts ?? 0).toBe(0);
    const released = (await events(held)).filter((r) => r.type === 'task.released');
    expect(released).toHaveLength(held.length);
    expect(pool.stats()).toMatchObject({ releases: held.length + 1, held: 0 });
  });
});
