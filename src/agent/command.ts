/**
 * One run of the agent's COMMAND: exec'd with its arguments as given (never parsed by a
 * shell), in a process group of its own, its output streamed as it comes and its last
 * bytes kept. Stopping it signals the whole group (grandchildren included): SIGTERM, then
 * SIGKILL after the grace. A run settles only once the command is gone, so its task is
 * never given back while it still works in the directory.
 */
import { spawn } from 'node:child_process';
import { StringDecoder } from 'node:string_decoder';
import { Tail } from '../workers/executors/tail.js';

/**
 * A tiny sh in front of the command, then `exec "$@"` (the command keeps sh's pid, so it
 * leads the group). A watchdog beside it holds the write end of our stdin pipe: if the
 * agent dies, even by SIGKILL, the pipe closes and the watchdog kills the group, so no
 * orphan goes on working on a task that will be claimed again after its lease. The
 * command's own stdin is /dev/null.
 */
const WATCHDOG =
  'exec 3<&0 </dev/null; { cat <&3 >/dev/null 2>&1; kill -9 0; } & exec 3<&-; exec "$@"';

export interface CommandOptions {
  cwd: string;
  env: NodeJS.ProcessEnv;
  /** Between SIGTERM and SIGKILL. */
  killGraceMs: number;
  /** Bytes kept of the end of stdout and of stderr. */
  tailBytes?: number;
  onOutput(stream: 'stdout' | 'stderr', text: string): void;
}

export interface CommandExit {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdoutTail: string;
  stderrTail: string;
  /** Set when `stop()` was called before it exited. */
  stopped: boolean;
}

export interface RunningCommand {
  pid: number | undefined;
  /** Resolves once the command (and what it left in its group) is gone. */
  exited: Promise<CommandExit>;
  /** SIGTERM to the group, SIGKILL after the grace; resolves with `exited`. */
  stop(): Promise<CommandExit>;
}

export class CommandStartError extends Error {
  constructor(command: string, cause: Error) {
    super(`could not start ${command}: ${cause.message}`, { cause });
    this.name = 'CommandStartError';
  }
}

export function startCommand(command: string, args: string[], o: CommandOptions): RunningCommand {
  const child = spawn('sh', ['-c', WATCHDOG, 'sh', command, ...args], {
    cwd: o.cwd,
    env: o.env,
    detached: true,
    stdio: ['pipe', 'pipe', 'pipe'],
  });
  const tailBytes = o.tailBytes ?? 4_096;
  const tails = { stdout: new Tail(tailBytes), stderr: new Tail(tailBytes) };
  const decoders = { stdout: new StringDecoder('utf8'), stderr: new StringDecoder('utf8') };
  const emit = (stream: 'stdout' | 'stderr', text: string) => {
    if (text !== '') o.onOutput(stream, text);
  };
  // Never written: it exists only to close when the agent dies (see WATCHDOG).
  child.stdin.on('error', () => {});
  for (const stream of ['stdout', 'stderr'] as const) {
    child[stream].on('data', (b: Buffer) => {
      tails[stream].push(b);
      emit(stream, decoders[stream].write(b));
    });
  }

  const killGroup = (sig: NodeJS.Signals) => {
    if (child.pid === undefined) return;
    try {
      process.kill(-child.pid, sig);
    } catch {
      // ESRCH: the group is already gone.
    }
  };

  let stopped = false;
  let settled = false;
  let killTimer: NodeJS.Timeout | undefined;
  const exited = new Promise<CommandExit>((resolve, reject) => {
    let exit: { code: number | null; signal: NodeJS.Signals | null } | null = null;
    let closeTimer: NodeJS.Timeout | undefined;
    const finish = () => {
      if (settled) return;
      settled = true;
      clearTimeout(killTimer);
      clearTimeout(closeTimer);
      emit('stdout', decoders.stdout.end());
      emit('stderr', decoders.stderr.end());
      resolve({
        code: exit?.code ?? null,
        signal: exit?.signal ?? null,
        stdoutTail: tails.stdout.text(),
        stderrTail: tails.stderr.text(),
        stopped,
      });
    };
    child.once('error', (error) => {
      if (child.pid === undefined && !settled) {
        settled = true;
        reject(new CommandStartError(command, error));
      }
    });
    child.once('exit', (code, signal) => {
      // `exec "$@"` failing (no such command) is sh's 126/127 with its message on stderr.
      exit = { code, signal };
      // What the command left behind in its group dies with it (the watchdog among them).
      killGroup('SIGKILL');
      // A process that left the group may still hold a pipe: do not wait for it forever.
      closeTimer = setTimeout(() => {
        child.stdout.destroy();
        child.stderr.destroy();
        finish();
      }, 1_000);
    });
    child.once('close', finish);
  });

  return {
    pid: child.pid,
    exited,
    stop() {
      // Once settled the group is gone, and its id may be another's by now.
      if (!stopped && !settled) {
        stopped = true;
        killGroup('SIGTERM');
        killTimer = setTimeout(() => killGroup('SIGKILL'), o.killGraceMs);
      }
      return exited;
    },
  };
}
