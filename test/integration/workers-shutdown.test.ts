/**
 * Clean shutdown: `stop(grace)` stops claiming at once, waits for short tasks to COMPLETE,
 * and RELEASEs the ones still running after the grace period (pending again, the attempt
 * not charged) so another worker claims them at once instead of after a lease. An executor
 * that ignores its abort is never released while it may still be working.
 */
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { type Executor, ShellExecutor, SleepExecutor } from '../../src/workers/executors/index.js';
import { createTestDatabase, type TestDatabase } from '../support/database.js';
import { testTempDir } from '../support/temp-dir.js';
import {
  eventTypes,
  type TestProcess,
  taskRow,
  testProcess,
  until,
} from '../support/worker-process.js';

let db: TestDatabase;
let p: TestProcess;
let other: TestProcess;
beforeAll(async () => {
  db = await createTestDatabase('workers_shutdown');
  p = testProcess(db.pool(10), { taskDefaults: { leaseMs: 30_000 } });
  other = testProcess(db.pool(4));
});
afterAll(async () => {
  await Promise.all([p.close(), other.close()]);
  await db.drop();
});

const running = async (id: string) => (await taskRow(db.sql, id)).state === 'running';

describe('clean shutdown', () => {
  it('an idle pool stops at once: its long polls are aborted', async () => {
    const pool = p.pool({ workerId: 'idle', concurrency: 4, claimWaitMs: 30_000 });
    await new Promise((r) => setTimeout(r, 50));
    const started = Date.now();
    await pool.stop(5_000);
    expect(Date.now() - started).toBeLessThan(300);
    const ticket = await p.ticket();
    const id = await p.task(ticket, { type: 'x', executor: 'sleep' });
    await new Promise((r) => setTimeout(r, 100));
    expect((await taskRow(db.sql, id)).state).toBe('pending');
    await p.host.send('task', id, { type: 'CANCEL' });
  });

  it('a task still running after the grace is released and claimable by another worker at once', async () => {
    const ticket = await p.ticket();
    const id = await p.task(ticket, { type: 'x', executor: 'sleep', payload: { ms: 30_000 } });
    const pool = p.pool({ workerId: 'leaving', concurrency: 2 });
    await until(() => running(id));
    const started = Date.now();
    await pool.stop(200);
    expect(Date.now() - started).toBeLessThan(1_000);
    expect(pool.stats()).toMatchObject({ running: 0, releases: 1, completions: 0 });
    const row = await taskRow(db.sql, id);
    expect(row).toMatchObject({ state: 'pending', attempt: 1, workerId: null });
    expect(row.ctx.attemptsUsed).toBe(0);
    expect((await eventTypes(db.sql, id)).at(-1)).toBe('task.released');
    // Another process takes it right away, as attempt 2 (a new number) with a new token.
    const next = await other.claims.claimOnce({ workerId: 'next#1', executors: ['sleep'] });
    expect(next?.task).toMatchObject({ id, attempt: 2, workerId: 'next#1' });
    await other.host.send('task', id, { type: 'CANCEL' });
  });

  it('a short task finishes within the grace: stop waits for its COMPLETE', async () => {
    const ticket = await p.ticket();
    const id = await p.task(ticket, { type: 'x', executor: 'sleep', payload: { ms: 400 } });
    const pool = p.pool({ workerId: 'finishing', concurrency: 2 });
    await until(() => running(id));
    await pool.stop(5_000);
    expect(pool.stats()).toMatchObject({ running: 0, releases: 0, completions: 1 });
    const row = await taskRow(db.sql, id);
    expect(row).toMatchObject({ state: 'completed', attempt: 1 });
  });

  it('a shell task at shutdown: its process group is killed, then the task released', async () => {
    const file = join(testTempDir('orch-stop-'), 'pid');
    const ticket = await p.ticket();
    const id = await p.task(ticket, {
      type: 'x',
      executor: 'shell',
      payload: { command: `echo $$ > ${file}; sleep 30` },
    });
    const pool = p.pool({ workerId: 'shell', concurrency: 1 }, [
      new SleepExecutor(),
      // Tests run as root in CI: opt in, as SHELL_ALLOW_ROOT=1 would.
      new ShellExecutor({ timeoutMs: 60_000, allowRoot: true }),
    ]);
    await until(async () => (await readFile(file, 'utf8').catch(() => '')).trim() !== '');
    const pid = Number((await readFile(file, 'utf8')).trim());
    await pool.stop(100);
    expect(() => process.kill(pid, 0)).toThrow();
    expect((await taskRow(db.sql, id)).state).toBe('pending');
    await p.host.send('task', id, { type: 'CANCEL' });
  });

  it('an executor that ignores its abort is left to its lease, never released under it', async () => {
    const stuck: Executor = { name: 'stuck', run: () => new Promise(() => {}) };
    const ticket = await p.ticket();
    const id = await p.task(ticket, { type: 'x', executor: 'stuck' });
    const pool = p.pool({ workerId: 'stuck', concurrency: 1, abortWaitMs: 100 }, [stuck]);
    await until(() => running(id));
    const started = Date.now();
    await pool.stop(50);
    expect(Date.now() - started).toBeLessThan(1_000);
    expect((await taskRow(db.sql, id)).state).toBe('running');
    expect(pool.stats().releases).toBe(0);
    await p.host.send('task', id, { type: 'CANCEL' });
  });
});
