/**
 * The `shell` executor: runs `payload.command` with `sh -c` in a process group of its own.
 * Exit 0 is a result with the stdout and stderr tails; anything else is an `ExecutionFailed`
 * carrying them. On a timeout (`payload.timeoutMs` or `SHELL_TIMEOUT_MS`) or an abort (lease
 * lost, shutdown) the whole group gets SIGTERM, then SIGKILL, and the run settles only once
 * the shell is gone, so a task is never claimed again while its processes still run. If the
 * worker process itself dies, a watchdog in the group kills it (see WATCHDOG).
 *
 * What a command gets is bounded, because whatever it prints becomes the task's result, and
 * results travel to `GET /tasks`, the event log, NATS and SSE: its environment is an
 * allowlist (never this process's secrets such as DATABASE_URL or API_TOKEN), its working
 * directory resolves inside SHELL_CWD_ROOT, and it never runs as root unless allowed. This
 * is not a sandbox: the command may still `cd` anywhere this user may go.
 */
import { spawn } from 'node:child_process';
import { realpath, stat } from 'node:fs/promises';
import { isAbsolute, resolve, sep } from 'node:path';
import { StringDecoder } from 'node:string_decoder';
import type { TaskView } from '../../actors/views.js';
import { type ExecutionContext, ExecutionFailed, type Executor, timerMs } from './executor.js';
import { Tail } from './tail.js';

export interface ShellExecutorOptions {
  /** Default time limit of one run (`SHELL_TIMEOUT_MS`). */
  timeoutMs: number;
  /** `SHELL_ALLOW_ROOT`: without it the executor cannot be built by uid 0. */
  allowRoot?: boolean;
  /** `SHELL_ENV_PASSTHROUGH`: variables of this process a command sees, besides BASE_ENV. */
  envPassthrough?: readonly string[];
  /** `SHELL_CWD_ROOT`: where `payload.cwd` must resolve (default: this process's cwd). */
  cwdRoot?: string;
  /** Bytes of stdout and of stderr kept (the last ones). */
  tailBytes?: number;
  /** Between SIGTERM and SIGKILL to the process group. */
  killGraceMs?: number;
}

/** Variables every command gets from this process, when set. */
const BASE_ENV = ['PATH', 'HOME', 'LANG'];
/** Linux's PATH_MAX: a longer `payload.cwd` cannot name a directory. */
const MAX_CWD_LENGTH = 4_096;

export class ShellExecutor implements Executor {
  readonly name = 'shell';
  private readonly cwdRoot: string;

  constructor(private readonly options: ShellExecutorOptions) {
    if (process.getuid?.() === 0 && !options.allowRoot) {
      throw new Error(
        'the shell executor will not run tasks as root (uid 0); run as an unprivileged user, or set SHELL_ALLOW_ROOT=1 to accept it',
      );
    }
    this.cwdRoot = resolve(options.cwdRoot ?? process.cwd());
  }

  async run(task: TaskView, ctx: ExecutionContext) {
    const payload = (
      typeof task.payload === 'object' && task.payload !== null ? task.payload : {}
    ) as { command?: unknown; timeoutMs?: unknown; cwd?: unknown };
    const { command } = payload;
    if (typeof command !== 'string' || command.length === 0) {
      throw new ExecutionFailed('payload.command must be a non-empty string');
    }
    if (command.includes('\0')) {
      throw new ExecutionFailed('payload.command must not contain NUL characters');
    }
    const timeoutMs =
      payload.timeoutMs === undefined || payload.timeoutMs === null
        ? this.options.timeoutMs
        : timerMs('payload.timeoutMs', payload.timeoutMs, 1);
    return runShell(command, {
      env: this.env(task, ctx),
      cwd: await this.workingDirectory(payload.cwd),
      timeoutMs,
      tailBytes: this.options.tailBytes ?? 4096,
      killGraceMs: this.options.killGraceMs ?? 2_000,
      signal: ctx.signal,
      output: ctx.output,
    });
  }

  private env(task: TaskView, ctx: ExecutionContext): NodeJS.ProcessEnv {
    const env: NodeJS.ProcessEnv = {};
    for (const name of [...BASE_ENV, ...(this.options.envPassthrough ?? [])]) {
      const value = process.env[name];
      if (value !== undefined) env[name] = value;
    }
    env.TASK_ID = task.id;
    env.TASK_ATTEMPT = String(ctx.attempt);
    env.TICKET_ID = task.ticketId;
    return env;
  }

  /**
   * The real path of `cwd` (relative to the root; the root itself when unset), refused
   * unless it is a directory inside the root once every symlink is followed. The command
   * is started in that real path, so a link swapped after this check cannot redirect it.
   *
   * A refusal is an ordinary failure, retried like any other within the task's attempts:
   * the check spawns nothing, and the retries are spaced by the backoff, so a bad cwd costs
   * little; a directory that is missing now may be created by another task meanwhile.
   */
  private async workingDirectory(cwd: unknown): Promise<string> {
    let root: string;
    try {
      root = await realpath(this.cwdRoot);
    } catch (error) {
      throw new ExecutionFailed(
        `SHELL_CWD_ROOT ${this.cwdRoot} is not usable: ${(error as Error).message}`,
      );
    }
    if (cwd === undefined || cwd === null) return root;
    if (typeof cwd !== 'string' || cwd.length === 0 || cwd.length > MAX_CWD_LENGTH) {
      throw new ExecutionFailed(
        `payload.cwd must be a path of 1 to ${MAX_CWD_LENGTH} characters inside the shell root`,
      );
    }
    if (cwd.includes('\0')) {
      throw new ExecutionFailed('payload.cwd must not contain NUL characters');
    }
    const shown = JSON.stringify(cwd.length > 200 ? `${cwd.slice(0, 200)}…` : cwd);
    let real: string;
    try {
      real = await realpath(isAbsolute(cwd) ? cwd : resolve(root, cwd));
    } catch {
      throw new ExecutionFailed(`payload.cwd ${shown} does not exist`);
    }
    if (real !== root && !real.startsWith(root.endsWith(sep) ? root : root + sep)) {
      throw new ExecutionFailed(
        `payload.cwd ${shown} resolves to ${real}, outside the shell root ${root} (SHELL_CWD_ROOT)`,
      );
    }
    if (!(await stat(real).catch(() => null))?.isDirectory()) {
      throw new ExecutionFailed(`payload.cwd ${shown} is not a directory`);
    }
    return real;
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
  cwd: string;
  timeoutMs: number;
  tailBytes: number;
  killGraceMs: number;
  signal: AbortSignal;
  output?: ExecutionContext['output'];
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
    // Decoded per stream, so a character split across two reads arrives whole.
    const decoders = { stdout: new StringDecoder('utf8'), stderr: new StringDecoder('utf8') };
    const emit = (stream: 'stdout' | 'stderr', text: string) => {
      if (text !== '') o.output?.(stream, text);
    };
    child.stdout.on('data', (b: Buffer) => {
      stdout.push(b);
      if (o.output) emit('stdout', decoders.stdout.write(b));
    });
    child.stderr.on('data', (b: Buffer) => {
      stderr.push(b);
      if (o.output) emit('stderr', decoders.stderr.write(b));
    });

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
      if (o.output) {
        emit('stdout', decoders.stdout.end());
        emit('stderr', decoders.stderr.end());
      }
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
