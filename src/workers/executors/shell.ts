/**
 * The `shell` executor: runs `payload.command` with `sh -c` in a process group of its own,
 * with `TASK_ID`, `TASK_ATTEMPT` and `TICKET_ID` in its environment. Exit 0 is a result with
 * the stdout and stderr tails; anything else is an `ExecutionFailed` carrying them. On a
 * timeout (`payload.timeoutMs` or `SHELL_TIMEOUT_MS`) or an abort (lease lost, shutdown) the
 * whole group gets SIGTERM, then SIGKILL, and the run settles only once the shell is gone,
 * so a task is never claimed again while its processes still run. If the worker process
 * itself dies, a watchdog in the group kills it (see WATCHDOG).
 */
import { spawn } from 'node:child_process';
import type { TaskView } from '../../actors/views.js';
import { type ExecutionContext, ExecutionFailed, type Executor } from './executor.js';

export interface ShellExecutorOptions {
  /** Default time limit of one run (`SHELL_TIMEOUT_MS`). */
  timeoutMs: number;
  /** Bytes of stdout and of stderr kept (the last ones). */
  tailBytes?: number;
  /** Between SIGTERM and SIGKILL to the process group. */
  killGraceMs?: number;
}

export class ShellExecutor implements Executor {
  readonly name = 'shell';

  constructor(private readonly options: ShellExecutorOptions) {}

  run(task: TaskView, ctx: ExecutionContext) {
    const payload = (task.payload ?? {}) as {
      command?: unknown;
      timeoutMs?: unknown;
      cwd?: unknown;
    };
    if (typeof payload.command !== 'string' || payload.command.length === 0) {
      return Promise.reject(new ExecutionFailed('payload.command must be a non-empty string'));
    }
    const timeoutMs =
      typeof payload.timeoutMs === 'number' && payload.timeoutMs > 0
        ? payload.timeoutMs
        : this.options.timeoutMs;
    return runShell(payload.command, {
      env: {
        ...process.env,
        TASK_ID: task.id,
        TASK_ATTEMPT: String(ctx.attempt),
        TICKET_ID: task.ticketId,
      },
      cwd: typeof payload.cwd === 'string' ? payload.cwd : undefined,
      timeoutMs,
      tailBytes: this.options.tailBytes ?? 4096,
      killGraceMs: this.options.killGraceMs ?? 2_000,
      signal: ctx.signal,
    });
  }
}

/**
 * Runs `$1` as the group's leader (same pid) with a watchdog beside it that holds the write
 * end of our stdin pipe: if this process dies, even by SIGKILL, the pipe closes and the
 * watchdog kills the whole group, so no orphan keeps working on a task that will be
 * claimed again after its lease.
 */
const WATCHDOG =
  'exec 3<&0 </dev/null; { cat <&3 >/dev/null 2>&1; kill -9 0; } & exec 3<&-; exec sh -c "$1"';

interface RunOptions {
  env: NodeJS.ProcessEnv;
  cwd: string | undefined;
  timeoutMs: number;
  tailBytes: number;
  killGraceMs: number;
  signal: AbortSignal;
}

function runShell(
  command: string,
  o: RunOptions,
): Promise<{ result: { [k: string]: string | number } }> {
  return new Promise((resolve, reject) => {
    if (o.signal.aborted) {
      return reject(new ExecutionFailed(`aborted: ${String(o.signal.reason)}`, { aborted: true }));
    }
    const child = spawn('sh', ['-c', WATCHDOG, 'sh', command], {
      detached: true,
      env: o.env,
      cwd: o.cwd,
      stdio: ['pipe', 'pipe', 'pipe'],
    });
    const stdout = new Tail(o.tailBytes);
    const stderr = new Tail(o.tailBytes);
    // Never written: it exists only to close when this process dies (see WATCHDOG).
    child.stdin.on('error', () => {});
    child.stdout.on('data', (b: Buffer) => stdout.push(b));
    child.stderr.on('data', (b: Buffer) => stderr.push(b));

    let stopReason: { timedOut: boolean; message: string } | null = null;
    let killTimer: NodeJS.Timeout | undefined;
    const killGroup = (sig: NodeJS.Signals) => {
      if (child.pid === undefined) return;
      try {
        process.kill(-child.pid, sig);
      } catch {
        // ESRCH: the group is already gone.
      }
    };
    const stop = (timedOut: boolean, message: string) => {
      if (stopReason) return;
      stopReason = { timedOut, message };
      killGroup('SIGTERM');
      killTimer = setTimeout(() => killGroup('SIGKILL'), o.killGraceMs);
    };
    const timeout = setTimeout(() => stop(true, `timed out after ${o.timeoutMs} ms`), o.timeoutMs);
    const onAbort = () => stop(false, `aborted: ${String(o.signal.reason)}`);
    o.signal.addEventListener('abort', onAbort, { once: true });

    let exit: { code: number | null; signal: NodeJS.Signals | null } | null = null;
    let closeTimer: NodeJS.Timeout | undefined;
    let settled = false;
    const finish = (spawnError?: Error) => {
      if (settled) return;
      settled = true;
      clearTimeout(timeout);
      clearTimeout(killTimer);
      clearTimeout(closeTimer);
      o.signal.removeEventListener('abort', onAbort);
      const out = { stdout: stdout.text(), stderr: stderr.text() };
      if (spawnError) {
        return reject(new ExecutionFailed(`could not start sh: ${spawnError.message}`, out));
      }
      const code = exit?.code ?? null;
      const sig = exit?.signal ?? null;
      if (stopReason) {
        const { timedOut, message } = stopReason;
        return reject(
          new ExecutionFailed(message, {
            ...out,
            exitCode: code,
            signal: sig,
            timedOut,
            aborted: !timedOut,
          }),
        );
      }
      if (code === 0) return resolve({ result: { exitCode: 0, ...out } });
      const why = sig ? `killed by ${sig}` : `exit code ${code}`;
      reject(
        new ExecutionFailed(`command failed: ${why}`, { ...out, exitCode: code, signal: sig }),
      );
    };
    child.once('error', (error) => {
      if (child.pid === undefined) finish(error);
    });
    child.once('exit', (code, sig) => {
      exit = { code, signal: sig };
      // Whatever the shell left behind in its group dies with it (it would hold the pipes
      // open, and the task may be claimed again).
      killGroup('SIGKILL');
      // A process that left the group may still hold a pipe: do not wait for it forever.
      closeTimer = setTimeout(() => {
        child.stdout.destroy();
        child.stderr.destroy();
        finish();
      }, 1_000);
    });
    child.once('close', () => finish());
  });
}

/** The last `max` bytes written to it. */
class Tail {
  private chunks: Buffer[] = [];
  private size = 0;

  constructor(private readonly max: number) {}

  push(chunk: Buffer): void {
    this.chunks.push(chunk);
    this.size += chunk.length;
    while (this.chunks.length > 1 && this.size - (this.chunks[0]?.length ?? 0) >= this.max) {
      this.size -= this.chunks.shift()?.length ?? 0;
    }
  }

  text(): string {
    const all = Buffer.concat(this.chunks);
    return all.subarray(Math.max(0, all.length - this.max)).toString('utf8');
  }
}
