/**
 * Retries and dead letters: a failing task goes to retry_wait with a growing backoff (a
 * durable timer), is retried until its attempts run out, ends `failed`, and an operator's
 * REQUEUE sends it back to pending with fresh attempts, after which a worker completes it.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { TaskView } from '../../src/actors/views.js';
import { IllegalTransition, InvalidInput } from '../../src/errors.js';
import {
  ExecutionFailed,
  type Executor,
  SleepExecutor,
} from '../../src/workers/executors/index.js';
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
  db = await createTestDatabase('workers_retries');
  p = testProcess(db.pool(10), { taskDefaults: { retryBaseMs: 20, leaseMs: 5_000 } });
  await p.poller.start();
});
afterAll(async () => {
  await p.close();
  await db.drop();
});

/** An executor that fails while `broken` is set: the small interface is all a worker needs. */
class FlakyExecutor implements Executor {
  readonly name = 'flaky';
  broken = true;
  runs: number[] = [];
  async run(task: TaskView, ctx: { attempt: number }) {
    this.runs.push(ctx.attempt);
    if (this.broken)
      throw new ExecutionFailed('still broken', { stderr: `attempt ${ctx.attempt}` });
    return { result: { fixed: task.id } };
  }
}

describe('retries', () => {
  it('a failing task is retried with growing backoff until its attempts run out', async () => {
    const ticket = await p.ticket();
    const id = await p.task(ticket, {
      type: 'x',
      executor: 'sleep',
      maxAttempts: 3,
      payload: { ms: 1, fail: 'boom' },
    });
    const pool = p.pool({ workerId: 'r', concurrency: 2 }, [new SleepExecutor()]);
    await until(async () => (await taskRow(db.sql, id)).state === 'failed', 5_000);
    await pool.stop(0);
    const row = await taskRow(db.sql, id);
    expect(row.attempt).toBe(3);
    expect(row.ctx.error).toBe('boom');
    const types = await eventTypes(db.sql, id);
    expect(types.filter((t) => t === 'task.claimed')).toHaveLength(3);
    expect(types.filter((t) => t === 'task.retry_scheduled')).toHaveLength(2);
    expect(types.at(-1)).toBe('task.failed');
    const delays = await db.sql<{ ms: number }[]>`select (data->>'delayMs')::int as ms from events
      where entity_id = ${id} and type = 'task.retry_scheduled' order by seq`;
    expect(delays[0]!.ms).toBeLessThan(delays[1]!.ms);
    expect(pool.stats()).toMatchObject({ claims: 3, failures: 3, completions: 0 });
  });

  it('REQUEUE sends a failed task back with fresh attempts; a worker then completes it', async () => {
    const ticket = await p.ticket();
    const id = await p.task(ticket, { type: 'x', executor: 'flaky', maxAttempts: 2 });
    const flaky = new FlakyExecutor();
    const pool = p.pool({ workerId: 'q', concurrency: 1 }, [flaky]);
    await until(async () => (await taskRow(db.sql, id)).state === 'failed', 5_000);
    expect(flaky.runs).toEqual([1, 2]);
    const failed = await taskRow(db.sql, id);
    expect(failed.ctx.error).toContain('still broken');
    expect(failed.ctx.error).toContain('attempt 2');

    // Only an operator's REQUEUE leaves `failed`; system events are refused from outside.
    await expect(
      p.host.transact((u) => p.commands.sendPublic(u, 'task', id, { type: 'RETRY' })),
    ).rejects.toBeInstanceOf(InvalidInput);
    flaky.broken = false;
    await p.host.transact((u) =>
      p.commands.sendPublic(u, 'task', id, { type: 'REQUEUE', maxAttempts: 5 }),
    );
    await until(async () => (await taskRow(db.sql, id)).state === 'completed', 5_000);
    await pool.stop(0);
    const done = await taskRow(db.sql, id);
    // A fresh budget, but the numbers go on: this was the third execution.
    expect(done.attempt).toBe(3);
    expect(done.ctx.attemptsUsed).toBe(1);
    expect(done.ctx.maxAttempts).toBe(5);
    expect(done.ctx.result).toEqual({ fixed: id });
    expect(flaky.runs).toEqual([1, 2, 3]);
    const types = await eventTypes(db.sql, id);
    expect(types.slice(-5)).toEqual([
      'task.failed',
      'task.requeued',
      'task.claimed',
      'task.started',
      'task.completed',
    ]);
    // A completed task cannot be requeued.
    await expect(
      p.host.transact((u) => p.commands.sendPublic(u, 'task', id, { type: 'REQUEUE' })),
    ).rejects.toBeInstanceOf(IllegalTransition);
  });
});
