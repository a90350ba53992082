/**
 * The executor seam: what a built-in worker runs for a claimed task, chosen by the task's
 * `executor` field. An executor is one small interface, so a new kind (an AI agent, a
 * container) is one file and one `register` call; the worker pool does claims, leases,
 * heartbeats and fencing around it.
 */
import type { TaskView } from '../../actors/views.js';
import { MAX_TIMER_MS } from '../../config.js';
import type { Logger } from '../../log.js';
import type { Json } from '../../machines/domain-events.js';

export interface ExecutionContext {
  /**
   * Aborted when the work must stop now: the lease was lost, or the process is shutting down
   * and its grace period is over. An executor must stop every side effect it started (kill
   * its processes) before it settles, because the task may be claimed again right after.
   */
  signal: AbortSignal;
  /** The claim's attempt number (1 for the first claim); `TASK_ATTEMPT` for a shell. */
  attempt: number;
  /** The claim's fencing token, for executors that report to the API themselves. */
  token: string;
  log: Logger;
  /**
   * Streams what the task prints into its output (`GET /tasks/:id/output`), batched; cheap
   * and never throws. Absent when the process has no output store.
   */
  output?: (stream: 'stdout' | 'stderr' | 'log', text: string) => void;
}

export interface ExecutionResult {
  /** Stored as the task's `result` on COMPLETE. */
  result: Json;
}

export interface Executor {
  /** The `executor` value of the tasks it runs, e.g. `sleep` or `shell`. */
  readonly name: string;
  /**
   * Runs the task once. Resolves with its result (the worker sends COMPLETE), or throws;
   * an `ExecutionFailed` carries output tails, anything else becomes its message in FAIL.
   */
  run(task: TaskView, ctx: ExecutionContext): Promise<ExecutionResult>;
}

export interface ExecutionFailedDetails {
  stdout?: string;
  stderr?: string;
  exitCode?: number | null;
  signal?: string | null;
  timedOut?: boolean;
  /** True when it stopped because `ctx.signal` aborted. */
  aborted?: boolean;
}

/** A failed run: the task's FAIL error is built from the message and the output tails. */
export class ExecutionFailed extends Error {
  readonly code = 'execution_failed';
  readonly stdout: string;
  readonly stderr: string;
  readonly exitCode: number | null;
  readonly signal: string | null;
  readonly timedOut: boolean;
  readonly aborted: boolean;

  constructor(message: string, details: ExecutionFailedDetails = {}, options?: ErrorOptions) {
    super(message, options);
    this.name = 'ExecutionFailed';
    this.stdout = details.stdout ?? '';
    this.stderr = details.stderr ?? '';
    this.exitCode = details.exitCode ?? null;
    this.signal = details.signal ?? null;
    this.timedOut = details.timedOut ?? false;
    this.aborted = details.aborted ?? false;
  }
}

/**
 * A payload number that ends up in a timer: an integer from `min` to MAX_TIMER_MS. Beyond
 * 2^31-1 ms Node's timers overflow and fire at once, so a task asked to wait 25 days would
 * finish (or time out) immediately instead.
 */
export function timerMs(field: string, value: unknown, min: number): number {
  if (
    typeof value === 'number' &&
    Number.isInteger(value) &&
    value >= min &&
    value <= MAX_TIMER_MS
  ) {
    return value;
  }
  const shown = typeof value === 'number' ? String(value) : JSON.stringify(value)?.slice(0, 40);
  throw new ExecutionFailed(
    `${field} must be an integer from ${min} to ${MAX_TIMER_MS} (milliseconds), not ${shown}`,
  );
}

/** The `error` string a FAIL carries for whatever an executor threw. */
export function failureText(error: unknown): string {
  if (!(error instanceof ExecutionFailed)) {
    return error instanceof Error ? error.message : String(error);
  }
  let text = error.message;
  if (error.stderr) text += `\n--- stderr (tail) ---\n${error.stderr}`;
  if (error.stdout) text += `\n--- stdout (tail) ---\n${error.stdout}`;
  return text;
}

/** The executors a process runs; their names are what its workers claim. */
export class ExecutorRegistry {
  private readonly byName = new Map<string, Executor>();

  register(executor: Executor): this {
    if (executor.name === 'external') {
      throw new Error('"external" tasks are left to agents; no built-in executor may take them');
    }
    if (this.byName.has(executor.name)) {
      throw new Error(`an executor named ${executor.name} is already registered`);
    }
    this.byName.set(executor.name, executor);
    return this;
  }

  get(name: string): Executor | undefined {
    return this.byName.get(name);
  }

  names(): string[] {
    return [...this.byName.keys()];
  }
}
