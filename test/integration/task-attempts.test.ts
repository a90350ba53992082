/**
 * Attempt numbers and the attempt budget (CONTRACT 1): every claim is a new attempt number,
 * so two executions never share one; a RELEASE on clean shutdown does not count against
 * `maxAttempts`; REQUEUE gives a fresh budget while the numbers keep counting up. Checked
 * through the HTTP claim answer and through `TASK_ATTEMPT` as a shell task sees it.
 */
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ShellExecutor, SleepExecutor } from '../../src/workers/executors/index.js';
import { createTestApp, type TestApp } from '../support/http-app.js';
import { testTempDir } from '../support/temp-dir.js';
import {
  eventTypes,
  type TestProcess,
  taskRow,
  testProcess,
  until,
} from '../support/worker-process.js';

let t: TestApp;
let p: TestProcess;
beforeAll(async () => {
  t = await createTestApp('task_attempts');
  p = testProcess(t.db.pool(6), { taskDefaults: { maxAttempts: 1, leaseMs: 30_000 } });
});
afterAll(async () => {
  await p.close();
  await t.close();
});

async function newTask(type: string, maxAttempts: number): Promise<string> {
  const ticket = await t.call('POST', '/tickets', { title: type });
  await t.call('POST', `/tickets/${ticket.body.id}/events`, { type: 'START' });
  const task = await t.call('POST', `/tickets/${ticket.body.id}/tasks`, { type, maxAttempts });
  expect(task.status).toBe(201);
  return task.body.id as string;
}

async function claim(type: string): Promise<{ id: string; attempt: number; token: string }> {
  const r = await t.call('POST', '/tasks/claim', { workerId: 'agent', types: [type] });
  expect(r.status).toBe(200);
  return { id: r.body.task.id, attempt: r.body.task.attempt, token: r.body.token };
}

const send = (id: string, event: Record<string, unknown>) =>
  t.call('POST', `/tasks/${id}/events`, event);

describe('attempt numbers over HTTP', () => {
  it('claimed, released, claimed again: attempt 2; with maxAttempts 1 it still runs', async () => {
    const id = await newTask('attempts_http', 1);
    const first = await claim('attempts_http');
    expect(first).toMatchObject({ id, attempt: 1 });
    expect((await send(id, { type: 'START', token: first.token })).status).toBe(200);
    const released = await send(id, { type: 'RELEASE', token: first.token, reason: 'shutdown' });
    expect(released.body).toMatchObject({
      state: 'pending',
      attempt: 1,
      attemptsUsed: 0,
      maxAttempts: 1,
    });

    const second = await claim('attempts_http');
    expect(second).toMatchObject({ id, attempt: 2 });
    expect(second.token).not.toBe(first.token);
    // The first execution's token is dead: its late COMPLETE cannot land on attempt 2.
    const late = await send(id, { type: 'COMPLETE', token: first.token });
    expect(late.status).toBe(409);
    expect(late.body).toMatchObject({ error: 'stale_token', attempt: 2 });
    expect((await send(id, { type: 'START', token: second.token })).status).toBe(200);
    const done = await send(id, { type: 'COMPLETE', token: second.token, result: 'ok' });
    expect(done.body).toMatchObject({ state: 'completed', attempt: 2, result: 'ok' });

    const claimed = (await eventTypes(t.db.sql, id)).filter((e) => e === 'task.claimed');
    expect(claimed).toHaveLength(2);
    const attempts = await t.db.sql<{ attempt: number }[]>`
      select (data->>'attempt')::int as attempt from events
      where entity_id = ${id} and type = 'task.claimed' order by seq`;
    expect(attempts.map((r) => r.attempt)).toEqual([1, 2]);
  });

  it('releases never use up the budget; a failure does; REQUEUE renews it, numbers go on', async () => {
    const id = await newTask('attempts_budget', 2);
    for (let n = 1; n <= 4; n++) {
      const c = await claim('attempts_budget');
      expect(c.attempt).toBe(n);
      expect((await send(id, { type: 'RELEASE', token: c.token })).body.state).toBe('pending');
    }
    // Two charged attempts remain after four releases: the first failure is retried.
    const c5 = await claim('attempts_budget');
    expect(c5.attempt).toBe(5);
    await send(id, { type: 'START', token: c5.token });
    const retry = await send(id, { type: 'FAIL', token: c5.token, error: 'boom' });
    expect(retry.body.state).toBe('retry_wait');
    await t.host.send('task', id, { type: 'RETRY' });
    const c6 = await claim('attempts_budget');
    expect(c6.attempt).toBe(6);
    await send(id, { type: 'START', token: c6.token });
    const failed = await send(id, { type: 'FAIL', token: c6.token, error: 'boom again' });
    expect(failed.body).toMatchObject({ state: 'failed', attempt: 6, attemptsUsed: 2 });

    const requeued = await send(id, { type: 'REQUEUE', maxAttempts: 1 });
    expect(requeued.body).toMatchObject({
      state: 'pending',
      attempt: 6,
      attemptsUsed: 0,
      maxAttempts: 1,
    });
    const c7 = await claim('attempts_budget');
    expect(c7.attempt).toBe(7);
    await send(id, { type: 'START', token: c7.token });
    const again = await send(id, { type: 'FAIL', token: c7.token, error: 'still' });
    expect(again.body).toMatchObject({ state: 'failed', attempt: 7 });
  });
});

describe('TASK_ATTEMPT through the worker pool', () => {
  it('a shell task released at shutdown runs again as attempt 2, with maxAttempts 1', async () => {
    const file = join(testTempDir('orch-attempt-'), 'attempts');
    const ticket = await p.ticket();
    // The first run records its attempt and waits to be stopped; the second one finishes.
    const id = await p.task(ticket, {
      type: 'attempts_shell',
      executor: 'shell',
      payload: {
        command: `echo "$TASK_ATTEMPT" >> ${file}; [ "$TASK_ATTEMPT" = 1 ] && sleep 30; exit 0`,
      },
    });
    expect((await taskRow(t.db.sql, id)).ctx.maxAttempts).toBe(1);
    const executors = () => [
      new SleepExecutor(),
      new ShellExecutor({ timeoutMs: 60_000, allowRoot: true }),
    ];
    const lines = async () => (await readFile(file, 'utf8').catch(() => '')).split('\n');

    const leaving = p.pool({ workerId: 'leaving', concurrency: 1 }, executors());
    await until(async () => (await lines()).includes('1'), 10_000, 'first run started');
    await leaving.stop(100);
    expect(leaving.stats()).toMatchObject({ releases: 1, completions: 0 });
    expect(await taskRow(t.db.sql, id)).toMatchObject({ state: 'pending', attempt: 1 });

    const next = p.pool({ workerId: 'next', concurrency: 1 }, executors());
    await until(async () => (await taskRow(t.db.sql, id)).state === 'completed', 10_000, 'done');
    await next.stop(1_000);
    expect((await lines()).filter(Boolean)).toEqual(['1', '2']);
    expect(await taskRow(t.db.sql, id)).toMatchObject({ state: 'completed', attempt: 2 });
  });
});
