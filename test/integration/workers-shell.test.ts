/**
 * The shell executor, directly and through a worker pool: TASK_ID / TASK_ATTEMPT /
 * TICKET_ID in the environment, output tails in the result or the error, and a timeout or
 * an abort that kills the whole process group (children included) before the run settles.
 */
import { spawn } from 'node:child_process';
import { mkdtempSync, readFileSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { TaskView } from '../../src/actors/views.js';
import { configWith } from '../../src/config.js';
import { silentLogger } from '../../src/log.js';
import {
  createExecutors,
  ExecutionFailed,
  ShellExecutor,
} from '../../src/workers/executors/index.js';
import { createTestDatabase, type TestDatabase } from '../support/database.js';
import { type TestProcess, taskRow, testProcess, until } from '../support/worker-process.js';

let db: TestDatabase;
let p: TestProcess;
const dir = mkdtempSync(join(tmpdir(), 'orch-shell-'));
beforeAll(async () => {
  db = await createTestDatabase('workers_shell');
  p = testProcess(db.pool(10), { taskDefaults: { retryBaseMs: 20 } });
});
afterAll(async () => {
  await p.close();
  await db.drop();
});

/** True while the process exists and is not a zombie waiting to be reaped. */
function alive(pid: number): boolean {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    return stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3) !== 'Z';
  } catch {
    return false;
  }
}

async function pidsIn(file: string): Promise<number[]> {
  const text = await readFile(file, 'utf8');
  return text.split(/\s+/).filter(Boolean).map(Number);
}

function view(payload: TaskView['payload']): TaskView {
  return { id: 'ts-1', ticketId: 'tk-1', payload } as TaskView;
}

const ctx = (signal = new AbortController().signal) => ({
  signal,
  attempt: 1,
  token: 't',
  log: silentLogger(),
});

/** A command that records its shell's pid and two children's, then waits on them. */
const tree = (file: string) =>
  `echo $$ > ${file}; sleep 30 & echo $! >> ${file}; sleep 30 & echo $! >> ${file}; wait`;

describe('shell executor', () => {
  it('is registered only with ENABLE_SHELL_EXECUTOR, and never for external tasks', () => {
    expect(createExecutors(configWith({})).names()).toEqual(['sleep']);
    expect(createExecutors(configWith({ ENABLE_SHELL_EXECUTOR: '1' })).names()).toEqual([
      'sleep',
      'shell',
    ]);
  });

  it('runs through a worker with TASK_ID, TASK_ATTEMPT and TICKET_ID; stdout tail in the result', async () => {
    const marker = join(dir, 'env.txt');
    const ticket = await p.ticket();
    const id = await p.task(ticket, {
      type: 'x',
      executor: 'shell',
      payload: {
        command: `echo "$TASK_ID $TASK_ATTEMPT $TICKET_ID" > ${marker}; head -c 6000 /dev/zero | tr '\\0' a; echo; echo END`,
      },
    });
    const pool = p.pool({ workerId: 'sh', concurrency: 1 }, [
      new ShellExecutor({ timeoutMs: 5_000 }),
    ]);
    await until(async () => (await taskRow(db.sql, id)).state === 'completed', 5_000);
    await pool.stop(0);
    expect((await readFile(marker, 'utf8')).trim()).toBe(`${id} 1 ${ticket}`);
    const result = (await taskRow(db.sql, id)).ctx.result as { stdout: string; exitCode: number };
    expect(result.exitCode).toBe(0);
    expect(result.stdout.length).toBe(4096);
    expect(result.stdout.endsWith('a\nEND\n')).toBe(true);
  });

  it('a failing command FAILs with its stderr and stdout tails', async () => {
    const ticket = await p.ticket();
    const id = await p.task(ticket, {
      type: 'x',
      executor: 'shell',
      maxAttempts: 1,
      payload: { command: 'echo to-stdout; echo to-stderr >&2; exit 3' },
    });
    const pool = p.pool({ workerId: 'shf', concurrency: 1 }, [
      new ShellExecutor({ timeoutMs: 5_000 }),
    ]);
    await until(async () => (await taskRow(db.sql, id)).state === 'failed', 5_000);
    await pool.stop(0);
    const error = (await taskRow(db.sql, id)).ctx.error as string;
    expect(error).toContain('exit code 3');
    expect(error).toContain('to-stderr');
    expect(error).toContain('to-stdout');
  });

  it('a timeout kills the process group, children included', async () => {
    const file = join(dir, 'timeout-pids.txt');
    const shell = new ShellExecutor({ timeoutMs: 60_000, killGraceMs: 500 });
    const started = Date.now();
    const error = await shell
      .run(view({ command: tree(file), timeoutMs: 300 }), ctx())
      .catch((e: unknown) => e);
    expect(error).toBeInstanceOf(ExecutionFailed);
    expect((error as ExecutionFailed).timedOut).toBe(true);
    expect((error as ExecutionFailed).message).toContain('timed out after 300 ms');
    expect(Date.now() - started).toBeLessThan(3_000);
    const pids = await pidsIn(file);
    expect(pids).toHaveLength(3);
    await until(() => pids.every((pid) => !alive(pid)), 2_000, 'process group gone');
  });

  it('an abort (lease lost, shutdown) kills the process group before the run settles', async () => {
    const file = join(dir, 'abort-pids.txt');
    const shell = new ShellExecutor({ timeoutMs: 60_000 });
    const abort = new AbortController();
    const run = shell.run(view({ command: tree(file) }), ctx(abort.signal)).catch((e) => e);
    await until(async () => (await pidsIn(file).catch(() => [])).length === 3, 2_000);
    abort.abort('lease lost');
    const error = (await run) as ExecutionFailed;
    expect(error.aborted).toBe(true);
    expect(error.message).toBe('aborted: lease lost');
    const pids = await pidsIn(file);
    await until(() => pids.every((pid) => !alive(pid)), 2_000, 'process group gone');
  });

  it('a worker killed with SIGKILL takes the process group of its command with it', async () => {
    const file = join(dir, 'orphan-pids.txt');
    const script = fileURLToPath(new URL('../support/run-shell-executor.ts', import.meta.url));
    const worker = spawn(process.execPath, ['--import', 'tsx', script, tree(file)], {
      stdio: 'ignore',
    });
    await until(async () => (await pidsIn(file).catch(() => [])).length === 3, 10_000);
    const pids = await pidsIn(file);
    expect(pids.every(alive)).toBe(true);
    worker.kill('SIGKILL');
    await until(() => pids.every((pid) => !alive(pid)), 2_000, 'orphaned group gone');
  });

  it('a background child left behind by a finished command is killed with its group', async () => {
    const file = join(dir, 'leftover-pids.txt');
    const shell = new ShellExecutor({ timeoutMs: 5_000 });
    const { result } = await shell.run(
      view({ command: `sleep 30 & echo $! > ${file}; echo done` }),
      ctx(),
    );
    expect(result).toMatchObject({ exitCode: 0, stdout: 'done\n' });
    const pids = await pidsIn(file);
    await until(() => pids.every((pid) => !alive(pid)), 2_000, 'leftover child gone');
  });
});
