/**
 * `bin/orchestrator agent [options] -- COMMAND [ARGS...]`: any program that runs from a
 * command line becomes a worker. Built on the client's agent loop (claim, START,
 * heartbeats, output, COMPLETE/FAIL); for each claimed task it runs COMMAND in the task's
 * git worktree (or a temporary directory) with the task in its environment, streams its
 * stdout/stderr into the task's output, and turns its exit into the outcome:
 * exit 0 → COMPLETE with the JSON of `TASK_RESULT_FILE` (else `{exitCode, stdoutTail}`),
 * anything else → FAIL with the stderr tail. Cancel or a lost lease stops the command's
 * whole process group. SIGTERM/SIGINT: no new claims; after SHUTDOWN_GRACE_MS the commands
 * still running are stopped and, once they are gone, their tasks RELEASEd (a second signal
 * does that at once).
 */
import { constants } from 'node:fs';
import { access, mkdtemp, readFile, rm, stat } from 'node:fs/promises';
import { hostname, tmpdir } from 'node:os';
import { delimiter, isAbsolute, join, resolve } from 'node:path';
import {
  type AgentTask,
  IllegalTransitionError,
  OrchestratorClient,
  OrchestratorClientError,
  StaleTokenError,
  type TaskContext,
} from '../client/index.js';
import { CommandStartError, type RunningCommand, startCommand } from './command.js';
import { WorkdirError, Workdirs } from './workdirs.js';

export const AGENT_USAGE = `usage: orchestrator agent [options] -- COMMAND [ARGS...]

Claims tasks from the orchestrator and runs COMMAND (no shell) for each one, in a git
worktree of --repo named after the task's "worktree" (else a temporary directory).

options:
  --types a,b          task types to claim (default: any external task)
  --concurrency N      tasks run at once (default 1, at most 256)
  --repo DIR           git repository whose worktrees tasks run in
  --worktrees DIR      where the worktrees go (default: <repo>.worktrees beside the repo)
  --env NAME[,NAME]    more variables of this process the command sees (repeatable)
  --pass-token         give the command API_TOKEN too, so it can call the API itself

the command's environment: PATH, HOME, LANG, the --env names, and TASK_ID, TICKET_ID,
TASK_TYPE, TASK_ATTEMPT, TASK_PAYLOAD (JSON), TASK_FEEDBACK (JSON or empty),
TASK_RESULT_FILE, ORCHESTRATOR_URL.
exit 0: COMPLETE with the JSON written to TASK_RESULT_FILE, else {exitCode, stdoutTail};
otherwise FAIL with the stderr tail.

environment: ORCHESTRATOR_URL (default http://127.0.0.1:3000), API_TOKEN, WORKER_ID,
SHUTDOWN_GRACE_MS (default 10000: grace after SIGTERM, and from SIGTERM to SIGKILL of a
stopped command)`;

/** A result file larger than this is refused (the server's body limit is 1 MiB by default). */
export const RESULT_MAX_BYTES = 1_048_576;
const BASE_ENV = ['PATH', 'HOME', 'LANG'];
/** The longest delay a timer holds: the CLI, not the client, decides when to give work back. */
const NEVER_MS = 2_147_483_647;

export interface AgentArgs {
  types?: string[];
  concurrency: number;
  repo: string | null;
  worktrees: string | null;
  env: string[];
  passToken: boolean;
  command: string;
  args: string[];
}

export class UsageError extends Error {}

export function parseAgentArgs(argv: string[]): AgentArgs | 'help' {
  const out: Omit<AgentArgs, 'command' | 'args'> = {
    concurrency: 1,
    repo: null,
    worktrees: null,
    env: [],
    passToken: false,
  };
  let i = 0;
  const value = (flag: string): string => {
    const v = argv[++i];
    if (v === undefined || v === '--') throw new UsageError(`${flag} needs a value`);
    return v;
  };
  for (; i < argv.length; i++) {
    const a = argv[i]!;
    if (a === '--') {
      i++;
      break;
    }
    if (a === '-h' || a === '--help') return 'help';
    if (!a.startsWith('-')) break;
    const [flag, inline] = a.includes('=')
      ? [a.slice(0, a.indexOf('=')), a.slice(a.indexOf('=') + 1)]
      : [a, undefined];
    const get = () => inline ?? value(flag);
    if (flag === '--types') {
      out.types = get()
        .split(',')
        .map((t) => t.trim())
        .filter(Boolean);
    } else if (flag === '--concurrency') {
      const raw = get();
      const n = Number(raw);
      if (!/^\d+$/.test(raw) || n < 1 || n > 256) {
        throw new UsageError(`--concurrency ${raw}: an integer from 1 to 256`);
      }
      out.concurrency = n;
    } else if (flag === '--repo') out.repo = resolve(get());
    else if (flag === '--worktrees') out.worktrees = resolve(get());
    else if (flag === '--env') {
      for (const name of get()
        .split(',')
        .map((n) => n.trim())
        .filter(Boolean)) {
        if (!/^[A-Za-z_][A-Za-z0-9_]{0,127}$/.test(name)) {
          throw new UsageError(`--env ${name}: not a variable name`);
        }
        out.env.push(name);
      }
    } else if (flag === '--pass-token') out.passToken = true;
    else throw new UsageError(`unknown option ${a}`);
  }
  const command = argv[i];
  if (command === undefined || command === '') throw new UsageError('no COMMAND given');
  return { ...out, command, args: argv.slice(i + 1) };
}

/** COMMAND as it will be exec'd from any directory: a path made absolute, checked to run. */
async function resolveCommand(command: string, path: string): Promise<string> {
  const candidates = command.includes('/')
    ? [resolve(command)]
    : path
        .split(delimiter)
        .filter((d) => isAbsolute(d))
        .map((d) => join(d, command));
  for (const c of candidates) {
    const ok = await access(c, constants.X_OK)
      .then(() => stat(c))
      .then((s) => s.isFile())
      .catch(() => false);
    if (ok) return command.includes('/') ? c : command;
  }
  throw new UsageError(
    command.includes('/') ? `${command}: not an executable file` : `${command}: not found on PATH`,
  );
}

function envInt(name: string, def: number): number {
  const raw = process.env[name];
  if (raw === undefined || raw === '') return def;
  if (!/^\d{1,10}$/.test(raw) || Number(raw) > NEVER_MS) {
    throw new UsageError(`${name}=${JSON.stringify(raw)}: an integer of milliseconds`);
  }
  return Number(raw);
}

/** One task being run: what shutdown needs to stop it and give it back. */
interface Run {
  task: AgentTask;
  token: string;
  /** Aborted at the end of the shutdown grace. */
  shutdown: AbortController;
  command: RunningCommand | null;
}

class CommandFailed extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'CommandFailed';
  }
}

/** Given back on shutdown: the client's FAIL after this is refused, and expected to be. */
class Released extends Error {}

function say(line: string): void {
  process.stderr.write(`[agent] ${line}\n`);
}

export async function runAgentCli(argv: string[]): Promise<number> {
  let parsed: AgentArgs | 'help';
  let graceMs: number;
  let command: string;
  let workdirs: Workdirs;
  try {
    parsed = parseAgentArgs(argv);
    if (parsed === 'help') {
      process.stdout.write(`${AGENT_USAGE}\n`);
      return 0;
    }
    graceMs = envInt('SHUTDOWN_GRACE_MS', 10_000);
    command = await resolveCommand(parsed.command, process.env.PATH ?? '');
    workdirs = await Workdirs.open(parsed.repo, parsed.worktrees);
  } catch (error) {
    if (error instanceof UsageError || error instanceof WorkdirError) {
      process.stderr.write(`orchestrator agent: ${error.message}\n${AGENT_USAGE}\n`);
      return 2;
    }
    throw error;
  }
  const a = parsed;
  const url = process.env.ORCHESTRATOR_URL || 'http://127.0.0.1:3000';
  const token = process.env.API_TOKEN || undefined;
  const client = new OrchestratorClient({ url, token });
  const workerId = process.env.WORKER_ID || `agent-${hostname()}-${process.pid}`;
  const runs = new Set<Run>();
  const released = new Set<string>();

  const agent = client.agent({
    workerId,
    types: a.types,
    concurrency: a.concurrency,
    // The CLI owns shutdown: commands are stopped, and gone, before their tasks go back.
    handleSignals: false,
    shutdownGraceMs: NEVER_MS,
    onError: (error, taskId) => {
      const refused = error instanceof IllegalTransitionError || error instanceof StaleTokenError;
      if (taskId && released.has(taskId) && refused) return;
      say(
        `${taskId ? `task ${taskId}: ` : ''}${error instanceof Error ? error.message : String(error)}`,
      );
    },
  });

  const commandEnv = (task: AgentTask, resultFile: string): NodeJS.ProcessEnv => {
    const env: NodeJS.ProcessEnv = {};
    for (const name of [...BASE_ENV, ...a.env]) {
      const v = process.env[name];
      if (v !== undefined) env[name] = v;
    }
    if (a.passToken && token) env.API_TOKEN = token;
    env.TASK_ID = task.id;
    env.TICKET_ID = task.ticketId;
    env.TASK_TYPE = task.type;
    env.TASK_ATTEMPT = String(task.attempt);
    env.TASK_PAYLOAD = JSON.stringify(task.payload ?? null);
    env.TASK_FEEDBACK = task.feedback ? JSON.stringify(task.feedback) : '';
    env.TASK_RESULT_FILE = resultFile;
    env.ORCHESTRATOR_URL = client.url;
    return env;
  };

  const handler = async (task: AgentTask, ctx: TaskContext): Promise<unknown> => {
    const run: Run = { task, token: ctx.token, shutdown: new AbortController(), command: null };
    runs.add(run);
    const stop = AbortSignal.any([ctx.signal, run.shutdown.signal]);
    const label = `task ${task.id} (${task.type}, attempt ${task.attempt})`;
    let workdir: Awaited<ReturnType<Workdirs['acquire']>> | null = null;
    /** RELEASE, now that no command of this task runs any more. */
    const giveBack = async (): Promise<never> => {
      await ctx.flush();
      released.add(task.id);
      await client.release(task.id, ctx.token, 'agent shutting down').catch((error: unknown) => {
        if (!(error instanceof OrchestratorClientError)) throw error;
      });
      say(`${label}: released (the agent is stopping)`);
      throw new Released('released');
    };
    const scratch = await mkdtemp(join(tmpdir(), 'orchestrator-agent-'));
    try {
      workdir = await workdirs.acquire(task.worktree);
      if (ctx.signal.aborted) throw ctx.signal.reason;
      if (run.shutdown.signal.aborted) return await giveBack();
      const resultFile = join(scratch, 'result.json');
      say(`${label}: running in ${workdir.dir}`);
      ctx.log(`[agent ${workerId}] ${[a.command, ...a.args].join(' ')} (in ${workdir.dir})\n`);
      run.command = startCommand(command, a.args, {
        cwd: workdir.dir,
        env: commandEnv(task, resultFile),
        killGraceMs: graceMs,
        onOutput: (stream, text) => ctx.log(text, stream),
      });
      const onStop = () => void run.command?.stop();
      stop.addEventListener('abort', onStop, { once: true });
      const exit = await run.command.exited.finally(() =>
        stop.removeEventListener('abort', onStop),
      );
      if (ctx.signal.aborted) {
        say(`${label}: stopped (${(ctx.signal.reason as Error)?.message ?? 'aborted'})`);
        throw ctx.signal.reason;
      }
      if (run.shutdown.signal.aborted) return await giveBack();
      if (exit.code !== 0) {
        const why = exit.signal ? `was killed by ${exit.signal}` : `exited with code ${exit.code}`;
        say(`${label}: failed, ${why}`);
        throw new CommandFailed(
          `${a.command} ${why}${exit.stderrTail ? `\n--- stderr (tail) ---\n${exit.stderrTail}` : ''}`,
        );
      }
      const result = await readResult(resultFile);
      say(`${label}: completed`);
      return result === undefined ? { exitCode: 0, stdoutTail: exit.stdoutTail } : result.value;
    } catch (error) {
      if (error instanceof CommandStartError || error instanceof WorkdirError) {
        say(`${label}: ${error.message}`);
      }
      throw error;
    } finally {
      runs.delete(run);
      await workdir?.release().catch(() => {});
      await rm(scratch, { recursive: true, force: true }).catch(() => {});
    }
  };

  let graceTimer: NodeJS.Timeout | undefined;
  let stopping = false;
  const stopAll = () => {
    for (const run of runs) run.shutdown.abort(new Error('agent shutting down'));
  };
  const onSignal = (signal: NodeJS.Signals) => {
    if (stopping) {
      say(`${signal} again: stopping the commands now`);
      stopAll();
      return;
    }
    stopping = true;
    say(`${signal}: no new claims; ${runs.size} running, stopped in ${graceMs} ms unless done`);
    void agent.stop();
    graceTimer = setTimeout(stopAll, graceMs);
  };
  process.on('SIGTERM', onSignal);
  process.on('SIGINT', onSignal);

  process.stdout.write(
    `orchestrator agent ${workerId} working for ${client.url} (types=${a.types?.join(',') || 'any'} concurrency=${a.concurrency} dir=${workdirs.repo ? `worktrees of ${workdirs.repo} in ${workdirs.root}` : 'temporary'})\n`,
  );
  try {
    await agent.work(handler);
    return 0;
  } catch (error) {
    process.stderr.write(
      `orchestrator agent: ${error instanceof Error ? error.message : String(error)}\n`,
    );
    return 1;
  } finally {
    clearTimeout(graceTimer);
    process.off('SIGTERM', onSignal);
    process.off('SIGINT', onSignal);
  }
}

/** The JSON the command wrote, undefined when it wrote none; a throw FAILs the task. */
async function readResult(file: string): Promise<{ value: unknown } | undefined> {
  const s = await stat(file).catch(() => null);
  if (!s) return undefined;
  if (!s.isFile()) throw new CommandFailed('TASK_RESULT_FILE is not a regular file');
  if (s.size > RESULT_MAX_BYTES) {
    throw new CommandFailed(
      `TASK_RESULT_FILE holds ${s.size} bytes, over the ${RESULT_MAX_BYTES}-byte limit`,
    );
  }
  const text = await readFile(file, 'utf8');
  try {
    return { value: JSON.parse(text) };
  } catch (error) {
    throw new CommandFailed(
      `TASK_RESULT_FILE is not valid JSON (${(error as Error).message}): ${JSON.stringify(text.slice(0, 200))}`,
    );
  }
}
