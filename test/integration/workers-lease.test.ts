/**
 * Leases and fencing: a worker that stops heartbeating loses its task to its durable lease
 * timer and to another worker, and its late COMPLETE is `stale_token` and changes nothing;
 * a completed task stays completed whatever its old lease timer does (seed 003); a pool
 * whose heartbeat is refused aborts its executor; heartbeats keep a long task alive.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { IllegalTransition, StaleToken } from '../../src/errors.js';
import { createTestDatabase, type TestDatabase } from '../support/database.js';
import {
  eventTypes,
  type TestProcess,
  taskRow,
  testProcess,
  until,
} from '../support/worker-process.js';

let db: TestDatabase;
let p: TestProcess;
beforeAll(async () => {
  db = await createTestDatabase('workers_lease');
  p = testProcess(db.pool(10), { taskDefaults: { leaseMs: 300, retryBaseMs: 20 } });
});
afterAll(async () => {
  await p.close();
  await db.drop();
});

const tokenOf = (a: { snapshot: { context: Record<string, unknown> } }) =>
  a.snapshot.context.token as string;

describe('leases', () => {
  it('no heartbeat: lease expires, another worker claims with a new token, the old COMPLETE is stale', async () => {
    const ticket = await p.ticket();
    const id = await p.task(ticket, { type: 'x', executor: 'sleep' });
    const first = await p.claims.claim({ workerId: 'dead#1', executors: ['sleep'] });
    expect(first?.task.id).toBe(id);
    await p.host.send('task', id, { type: 'START', token: first!.token });
    await p.poller.start();
    // The lease (300 ms) runs out, the retry backoff passes: pending again, claimable.
    const second = await p.claims.claim({
      workerId: 'live#1',
      executors: ['sleep'],
      waitMs: 5_000,
    });
    await p.poller.stop();
    expect(second?.task.id).toBe(id);
    expect(second?.token).not.toBe(first?.token);
    expect(second?.task.attempt).toBe(2);

    const before = await db.sql`select version, seq from tasks where id = ${id}`;
    await expect(
      p.host.send('task', id, { type: 'COMPLETE', token: first!.token, result: 'late' }),
    ).rejects.toBeInstanceOf(StaleToken);
    expect(await db.sql`select version, seq from tasks where id = ${id}`).toEqual(before);

    await p.host.send('task', id, { type: 'START', token: second!.token });
    await p.host.send('task', id, { type: 'COMPLETE', token: second!.token, result: 'ok' });
    const row = await taskRow(db.sql, id);
    expect(row.state).toBe('completed');
    expect(row.workerId).toBe('live#1');
    expect(row.ctx.result).toBe('ok');
    expect(await eventTypes(db.sql, id)).toEqual([
      'task.created',
      'task.claimed',
      'task.started',
      'task.lease_expired',
      'task.retry_scheduled',
      'task.retried',
      'task.claimed',
      'task.started',
      'task.completed',
    ]);
  });

  it('a completed task is never failed later by its old lease', async () => {
    const ticket = await p.ticket();
    const id = await p.task(ticket, { type: 'x', executor: 'sleep', maxAttempts: 1 });
    const claimed = await p.host.send('task', id, { type: 'CLAIM', workerId: 'w#1' });
    const token = tokenOf(claimed);
    await p.host.send('task', id, { type: 'START', token });
    const [held] = await db.sql<{ lease: Date | null }[]>`
      select lease_expires_at as lease from tasks where id = ${id}`;
    expect(held?.lease).toBeInstanceOf(Date);
    await p.host.send('task', id, { type: 'COMPLETE', token });
    const [done] = await db.sql<{ lease: Date | null }[]>`
      select lease_expires_at as lease from tasks where id = ${id}`;
    expect(done?.lease).toBeNull();

    // A poller that found the lease passed before the completion fires late: nothing happens.
    expect(await p.host.expireLease(id)).toBeNull();
    // Even resurrected as a passed deadline and fired by the poller: the completed state
    // refuses it, and the moot deadline is cleared rather than found by every poll.
    await db.sql`update tasks set lease_expires_at = now() - interval '1 second' where id = ${id}`;
    await p.poller.tick();
    await expect(p.host.send('task', id, { type: 'LEASE_EXPIRED' })).rejects.toBeInstanceOf(
      IllegalTransition,
    );
    const [row] = await db.sql<{ state: string; lease: Date | null }[]>`
      select state, lease_expires_at as lease from tasks where id = ${id}`;
    expect(row).toEqual({ state: 'completed', lease: null });
    expect(await eventTypes(db.sql, id)).toEqual([
      'task.created',
      'task.claimed',
      'task.started',
      'task.completed',
    ]);
  });

  it('COMPLETE racing the lease timer: completed is always the last word', async () => {
    const ticket = await p.ticket();
    const ids: string[] = [];
    for (let i = 0; i < 20; i++) ids.push(await p.task(ticket, { type: 'x', maxAttempts: 1 }));
    const tokens = await Promise.all(
      ids.map(async (id) => {
        const c = await p.host.send('task', id, { type: 'CLAIM', workerId: 'w', leaseMs: 150 });
        await p.host.send('task', id, { type: 'START', token: tokenOf(c) });
        return tokenOf(c);
      }),
    );
    await p.poller.start();
    // Completions spread over 0-285 ms against leases that end at ~150 ms: early ones win,
    // late ones lose, and the ones in between race the timer poller.
    const outcomes = await Promise.allSettled(
      ids.map(async (id, i) => {
        await new Promise((r) => setTimeout(r, i * 15));
        return p.host.send('task', id, { type: 'COMPLETE', token: tokens[i] });
      }),
    );
    await new Promise((r) => setTimeout(r, 100));
    await p.poller.stop();
    const states = new Set<string>();
    for (const [i, id] of ids.entries()) {
      const types = await eventTypes(db.sql, id);
      const state = (await taskRow(db.sql, id)).state;
      states.add(state);
      if (outcomes[i]?.status === 'fulfilled') {
        expect(types.at(-1)).toBe('task.completed');
        expect(state).toBe('completed');
      } else {
        expect(types).not.toContain('task.completed');
        expect(types.slice(-2)).toEqual(['task.lease_expired', 'task.failed']);
        expect(state).toBe('failed');
      }
    }
    expect(states).toEqual(new Set(['completed', 'failed']));
  });

  it('a pool whose heartbeat is refused aborts its executor and reports nothing', async () => {
    const ticket = await p.ticket();
    const id = await p.task(ticket, {
      type: 'x',
      executor: 'sleep',
      maxAttempts: 1,
      payload: { ms: 5_000 },
    });
    await p.poller.start();
    // Heartbeats come too late for the 300 ms lease: the timer fails the task first.
    const pool = p.pool({ workerId: 'slow', concurrency: 1, heartbeatMs: 600 });
    await until(() => pool.stats().leaseLosses === 1, 5_000, 'lease loss');
    await until(() => pool.stats().running === 0, 1_000, 'executor aborted');
    await pool.stop(0);
    await p.poller.stop();
    expect(pool.stats()).toMatchObject({ claims: 1, completions: 0, failures: 0 });
    expect((await taskRow(db.sql, id)).state).toBe('failed');
    expect((await eventTypes(db.sql, id)).slice(-2)).toEqual(['task.lease_expired', 'task.failed']);
  });

  it('heartbeats keep a task longer than its lease alive', async () => {
    const ticket = await p.ticket();
    const id = await p.task(ticket, { type: 'x', executor: 'sleep', payload: { ms: 1_000 } });
    await p.poller.start();
    const pool = p.pool({ workerId: 'steady', concurrency: 1, heartbeatMs: 80 });
    await until(async () => (await taskRow(db.sql, id)).state === 'completed', 5_000);
    await pool.stop(0);
    await p.poller.stop();
    const row = await taskRow(db.sql, id);
    expect(row.attempt).toBe(1);
    expect(row.workerId).toBe('steady#1');
    expect(await eventTypes(db.sql, id)).not.toContain('task.lease_expired');
    expect(pool.stats()).toMatchObject({ completions: 1, leaseLosses: 0 });
  });
});
