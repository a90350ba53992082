/**
 * The shell executor, directly and through a worker pool: TASK_ID / TASK_ATTEMPT /
 * TICKET_ID in the environment, output tails in the result or the error, and a timeout or
 * an abort that kills the whole process group (children included) before the run settles.
 * What a command gets is bounded: an allowlisted environment (none of this process's
 * secrets), a working directory inside the shell root, timer values a timer can hold, and
 * no root without SHELL_ALLOW_ROOT. The sleep executor bounds its timer the same way.
 */
import { spawn } from 'node:child_process';
import { mkdirSync, readFileSync, realpathSync, symlinkSync, writeFileSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { TaskView } from '../../src/actors/views.js';
import { configWith, MAX_TIMER_MS } from '../../src/config.js';
import { silentLogger } from '../../src/log.js';
import type { Json } from '../../src/machines/domain-events.js';
import {
  createExecutors,
  ExecutionFailed,
  ShellExecutor,
  type ShellExecutorOptions,
  SleepExecutor,
} from '../../src/workers/executors/index.js';
import { createTestDatabase, type TestDatabase } from '../support/database.js';
import { tempDir } from '../support/temp-dir.js';
import { type TestProcess, taskRow, testProcess, until } from '../support/worker-process.js';

let db: TestDatabase;
let p: TestProcess;
const dir = tempDir('orch-shell-');
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

const asRoot = process.getuid?.() === 0;
/** Tests run as root in CI: the executor they build opts in, as SHELL_ALLOW_ROOT=1 would. */
const shellExecutor = (o: ShellExecutorOptions) => new ShellExecutor({ allowRoot: true, ...o });

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
    expect(
      createExecutors(configWith({ ENABLE_SHELL_EXECUTOR: '1', SHELL_ALLOW_ROOT: '1' })).names(),
    ).toEqual(['sleep', 'shell']);
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
    const pool = p.pool({ workerId: 'sh', concurrency: 1 }, [shellExecutor({ timeoutMs: 5_000 })]);
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
    const pool = p.pool({ workerId: 'shf', concurrency: 1 }, [shellExecutor({ timeoutMs: 5_000 })]);
    await until(async () => (await taskRow(db.sql, id)).state === 'failed', 5_000);
    await pool.stop(0);
    const error = (await taskRow(db.sql, id)).ctx.error as string;
    expect(error).toContain('exit code 3');
    expect(error).toContain('to-stderr');
    expect(error).toContain('to-stdout');
  });

  it('a timeout kills the process group, children included', async () => {
    const file = join(dir, 'timeout-pids.txt');
    const shell = shellExecutor({ timeoutMs: 60_000, killGraceMs: 500 });
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
    const shell = shellExecutor({ timeoutMs: 60_000 });
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
    const shell = shellExecutor({ timeoutMs: 5_000 });
    const { result } = await shell.run(
      view({ command: `sleep 30 & echo $! > ${file}; echo done` }),
      ctx(),
    );
    expect(result).toMatchObject({ exitCode: 0, stdout: 'done\n' });
    const pids = await pidsIn(file);
    await until(() => pids.every((pid) => !alive(pid)), 2_000, 'leftover child gone');
  });
});

describe('what a shell command gets', () => {
  it.runIf(asRoot)('as root, refuses to exist without SHELL_ALLOW_ROOT', () => {
    expect(() => new ShellExecutor({ timeoutMs: 1_000 })).toThrow(/SHELL_ALLOW_ROOT=1/);
    expect(() => createExecutors(configWith({ ENABLE_SHELL_EXECUTOR: '1' }))).toThrow(
      /as root \(uid 0\)/,
    );
    expect(() => shellExecutor({ timeoutMs: 1_000 })).not.toThrow();
  });

  it("only an allowlisted environment: none of this process's secrets reach the task's result", async () => {
    const planted = {
      DATABASE_URL: 'postgres://app:db-password-1234@db.internal/app',
      API_TOKEN: 'api-token-5678',
      ORCH_TEST_SECRET: 'planted-secret-9012',
      ORCH_TEST_PASS: 'passed-through',
    };
    const saved = Object.fromEntries(Object.keys(planted).map((k) => [k, process.env[k]]));
    Object.assign(process.env, planted);
    try {
      const executors = createExecutors(
        configWith({
          ENABLE_SHELL_EXECUTOR: '1',
          SHELL_ALLOW_ROOT: '1',
          SHELL_ENV_PASSTHROUGH: 'ORCH_TEST_PASS',
        }),
      );
      const ticket = await p.ticket();
      const id = await p.task(ticket, {
        type: 'x',
        executor: 'shell',
        payload: {
          command:
            "env | cut -d= -f1 | sort | tr '\\n' ' '; echo; " +
            'echo "pass=$ORCH_TEST_PASS secret=$ORCH_TEST_SECRET db=$DATABASE_URL token=$API_TOKEN"; env',
        },
      });
      const pool = p.pool({ workerId: 'shenv', concurrency: 1 }, [
        executors.get('shell') as ShellExecutor,
      ]);
      await until(async () => (await taskRow(db.sql, id)).state === 'completed', 5_000);
      await pool.stop(0);
      const { stdout } = (await taskRow(db.sql, id)).ctx.result as { stdout: string };
      const [names, values] = stdout.split('\n');
      const seen = (names ?? '').trim().split(' ');
      expect(seen).toEqual(expect.arrayContaining(['PATH', 'TASK_ID', 'TASK_ATTEMPT']));
      expect(seen).toEqual(expect.arrayContaining(['TICKET_ID', 'ORCH_TEST_PASS']));
      for (const secret of ['DATABASE_URL', 'API_TOKEN', 'ORCH_TEST_SECRET']) {
        expect(seen).not.toContain(secret);
      }
      expect(values).toBe('pass=passed-through secret= db= token=');
      for (const value of ['db-password-1234', 'api-token-5678', 'planted-secret-9012']) {
        expect(stdout).not.toContain(value);
      }
    } finally {
      for (const [k, v] of Object.entries(saved)) {
        if (v === undefined) delete process.env[k];
        else process.env[k] = v;
      }
    }
  });

  describe('payload.cwd stays inside SHELL_CWD_ROOT', () => {
    const base = realpathSync(tempDir('orch-cwd-'));
    const root = join(base, 'root');
    const outside = join(base, 'outside');
    mkdirSync(join(root, 'sub', 'deeper'), { recursive: true });
    mkdirSync(outside);
    writeFileSync(join(root, 'file.txt'), 'not a directory');
    symlinkSync(outside, join(root, 'escape'));
    symlinkSync(join(root, 'sub'), join(root, 'inner-link'));
    const rooted = shellExecutor({ timeoutMs: 5_000, cwdRoot: root });
    const pwd = async (cwd?: string) => {
      const { result } = await rooted.run(
        view(cwd === undefined ? { command: 'pwd -P' } : { command: 'pwd -P', cwd }),
        ctx(),
      );
      return (result as { stdout: string }).stdout.trim();
    };
    const refusal = (cwd: Json) =>
      rooted.run(view({ command: 'pwd', cwd }), ctx()).then(
        () => 'ran',
        (e: unknown) => (e instanceof ExecutionFailed ? e.message : `not ExecutionFailed: ${e}`),
      );

    it('runs in the root by default, and resolves a relative cwd against it', async () => {
      expect(await pwd()).toBe(root);
      expect(await pwd('sub/deeper')).toBe(join(root, 'sub', 'deeper'));
      expect(await pwd('sub/deeper/..')).toBe(join(root, 'sub'));
      expect(await pwd(join(root, 'sub'))).toBe(join(root, 'sub'));
      expect(await pwd('inner-link')).toBe(join(root, 'sub'));
    });

    it('refuses a cwd that escapes the root by "..", by an absolute path or by a symlink', async () => {
      expect(await refusal('../outside')).toMatch(/outside the shell root/);
      expect(await refusal('sub/../../outside')).toMatch(/outside the shell root/);
      expect(await refusal('..')).toMatch(/outside the shell root/);
      expect(await refusal(outside)).toMatch(/outside the shell root/);
      expect(await refusal('/')).toMatch(/outside the shell root/);
      expect(await refusal('escape')).toMatch(
        /"escape" resolves to .*outside, outside the shell root/,
      );
    });

    it('refuses a missing directory, a file, a non-string and an overlong path', async () => {
      expect(await refusal('nope')).toMatch(/payload.cwd "nope" does not exist/);
      expect(await refusal('file.txt')).toMatch(/is not a directory/);
      expect(await refusal(42)).toMatch(/payload.cwd must be a path/);
      expect(await refusal('')).toMatch(/payload.cwd must be a path/);
      expect(await refusal('a/'.repeat(2_049))).toMatch(/payload.cwd must be a path/);
      expect(await refusal('sub\0')).toMatch(/NUL/);
    });

    it('through a worker: a task with an escaping cwd FAILs with the reason, and the pool goes on', async () => {
      const ticket = await p.ticket();
      const bad = await p.task(ticket, {
        type: 'x',
        executor: 'shell',
        maxAttempts: 1,
        payload: { command: 'touch escaped', cwd: 'escape' },
      });
      const good = await p.task(ticket, {
        type: 'x',
        executor: 'shell',
        payload: { command: 'pwd -P', cwd: 'sub' },
      });
      const pool = p.pool({ workerId: 'shcwd', concurrency: 1 }, [rooted]);
      await until(async () => (await taskRow(db.sql, bad)).state === 'failed', 5_000);
      await until(async () => (await taskRow(db.sql, good)).state === 'completed', 5_000);
      await pool.stop(0);
      expect((await taskRow(db.sql, bad)).ctx.error).toMatch(/outside the shell root/);
      expect(() => readFileSync(join(outside, 'escaped'))).toThrow();
      expect((await taskRow(db.sql, good)).ctx.result).toMatchObject({
        stdout: `${join(root, 'sub')}\n`,
      });
    });
  });

  it('payload.timeoutMs must fit a timer: 2^31, negative, fractional and non-numbers are refused', async () => {
    const shell = shellExecutor({ timeoutMs: 5_000 });
    for (const timeoutMs of [2 ** 31, 1e12, -5, 0, 1.5, '100', Number.NaN]) {
      const started = Date.now();
      const error = await shell
        .run(view({ command: 'sleep 1; echo ran', timeoutMs }), ctx())
        .catch((e: unknown) => e);
      expect(error, String(timeoutMs)).toBeInstanceOf(ExecutionFailed);
      expect((error as ExecutionFailed).message).toMatch(
        `payload.timeoutMs must be an integer from 1 to ${MAX_TIMER_MS}`,
      );
      expect((error as ExecutionFailed).timedOut).toBe(false);
      expect(Date.now() - started).toBeLessThan(900);
    }
    const { result } = await shell.run(
      view({ command: 'echo ok', timeoutMs: MAX_TIMER_MS }),
      ctx(),
    );
    expect(result).toMatchObject({ exitCode: 0, stdout: 'ok\n' });
  });
});

describe('sleep executor', () => {
  const sleep = new SleepExecutor();

  it('payload.ms must fit a timer: 2^31, negative, fractional and non-numbers are refused', async () => {
    for (const ms of [2 ** 31, 1e12, -1, 1.5, '10', Number.POSITIVE_INFINITY]) {
      const error = await sleep.run(view({ ms }), ctx()).catch((e: unknown) => e);
      expect(error, String(ms)).toBeInstanceOf(ExecutionFailed);
      expect((error as ExecutionFailed).message).toMatch(
        `payload.ms must be an integer from 0 to ${MAX_TIMER_MS}`,
      );
    }
    expect(await sleep.run(view({}), ctx())).toEqual({ result: { sleptMs: 0 } });
    expect(await sleep.run(view({ ms: 20 }), ctx())).toEqual({ result: { sleptMs: 20 } });
  });

  it('the longest wait a timer holds really waits (until aborted)', async () => {
    const abort = new AbortController();
    const run = sleep.run(view({ ms: MAX_TIMER_MS }), ctx(abort.signal)).catch((e: unknown) => e);
    const early = await Promise.race([
      run,
      new Promise((r) => setTimeout(() => r('waiting'), 200)),
    ]);
    expect(early).toBe('waiting');
    abort.abort('test over');
    expect(await run).toMatchObject({ aborted: true });
  });
});
