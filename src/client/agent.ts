/**
 * The agent loop: claim (long poll), START, heartbeats at a third of the lease, the
 * handler's return value → COMPLETE, a throw → FAIL, and on `stop()` or SIGTERM: no new
 * claims, in-flight work finishes within the grace or is RELEASEd. `ctx.signal` aborts when
 * the task is cancelled, its lease is lost, or the grace ran out; a HEARTBEAT or output
 * answer says so within one heartbeat, the live event stream (when reachable) sooner.
 */
import type { OrchestratorClient } from './client.js';
import {
  IllegalTransitionError,
  InternalError,
  NetworkError,
  NotFoundError,
  OrchestratorClientError,
  PayloadTooLargeError,
  StaleTokenError,
  UnavailableError,
  ValidationError,
} from './errors.js';
import type { ClaimedTask, OutputChunkIn, OutputStream } from './types.js';

/** A claimed task as the handler sees it. `feedback` says why a reworked task came back. */
export type AgentTask = ClaimedTask['task'] & {
  feedback?: { fromPhase: string; reason: string; loop: number } | null;
};

/** Why `ctx.signal` aborted: `signal.reason` is a `TaskAbortedError` whose `reason` is one of these. */
export type AbortCause = 'cancelled' | 'lease_lost' | 'shutdown';

export class TaskAbortedError extends Error {
  constructor(
    readonly reason: AbortCause,
    readonly taskId: string,
  ) {
    super(
      reason === 'cancelled'
        ? `task ${taskId} was cancelled`
        : reason === 'lease_lost'
          ? `task ${taskId}: the lease was lost (another worker may hold it now)`
          : `task ${taskId}: the agent is shutting down`,
    );
    this.name = 'TaskAbortedError';
  }
}

export interface TaskContext {
  task: AgentTask;
  /** This attempt's fencing token (for calls the handler makes itself). */
  token: string;
  attempt: number;
  /** Aborts on cancel, lost lease or shutdown; `signal.reason` is a `TaskAbortedError`. */
  signal: AbortSignal;
  /** Appends to the task's output, batched (every `logFlushMs` or `logFlushBytes`). */
  log(text: string, stream?: OutputStream): void;
  /** Sends what `log` has buffered now. */
  flush(): Promise<void>;
}

export type TaskHandler = (task: AgentTask, ctx: TaskContext) => unknown;

export interface AgentOptions {
  /** Default: `WORKER_ID`, else `agent-<random>`. */
  workerId?: string;
  /** Task types to claim; default: any. */
  types?: string[];
  /** Tasks run at once. Default 1, at most 256. */
  concurrency?: number;
  /** Claim long poll per request (the server caps it). Default 20000. */
  waitMs?: number;
  /** After `stop()`: how long in-flight handlers may run before RELEASE. Default: `SHUTDOWN_GRACE_MS`, else 10000. */
  shutdownGraceMs?: number;
  /** `stop()` on SIGTERM and SIGINT while `work()` runs (Node). Default true. */
  handleSignals?: boolean;
  /** Follow each task on `GET /events/stream` to abort sooner than the next heartbeat. Default true. */
  live?: boolean;
  /** Default 200. */
  logFlushMs?: number;
  /** Default 16384. */
  logFlushBytes?: number;
  /** Problems the loop survives (a failed heartbeat, refused output). Default: `console.warn`. */
  onError?: (error: unknown, taskId?: string) => void;
}

const MAX_FAIL_CHARS = 20_000;
/** 3 UTF-8 bytes a UTF-16 unit at most: under the server's 64 KiB a chunk. */
const MAX_CHUNK_CHARS = 16_384;
/** Under the server's 1 MiB body limit even when every character takes 6 bytes of JSON. */
const MAX_REQUEST_CHARS = 128 * 1024;
/** The server takes at most 1,000 chunks a request. */
const MAX_REQUEST_CHUNKS = 500;
const MAX_BUFFERED_CHARS = 1024 * 1024;
const DEFAULT_LEASE_MS = 30_000;

function env(name: string): string | undefined {
  const p = (globalThis as { process?: { env?: Record<string, string | undefined> } }).process;
  return p?.env?.[name] || undefined;
}

type NodeProcess = {
  on(event: string, fn: () => void): unknown;
  off(event: string, fn: () => void): unknown;
};
const nodeProcess = (globalThis as { process?: Partial<NodeProcess> }).process;

/** A request that failed for a reason that will not go away by trying again. */
function isFatal(error: unknown): boolean {
  if (!(error instanceof OrchestratorClientError)) return false;
  return !(
    error instanceof NetworkError ||
    error instanceof UnavailableError ||
    error instanceof InternalError ||
    error.status === 409
  );
}

export class Agent {
  readonly workerId: string;
  readonly #client: OrchestratorClient;
  readonly #o: Required<Omit<AgentOptions, 'workerId' | 'types'>> & { types?: string[] };
  #working: Promise<void> | null = null;
  #stopping = false;
  #fatal: unknown = null;
  /** Aborts the claims in flight when the agent stops. */
  readonly #claims = new AbortController();
  readonly #runs = new Set<Run>();
  #graceTimer: ReturnType<typeof setTimeout> | undefined;

  constructor(client: OrchestratorClient, o: AgentOptions = {}) {
    this.#client = client;
    this.workerId = o.workerId ?? env('WORKER_ID') ?? `agent-${globalThis.crypto.randomUUID()}`;
    this.#o = {
      types: o.types,
      concurrency: Math.min(Math.max(Math.trunc(o.concurrency ?? 1), 1), 256),
      waitMs: Math.min(Math.max(o.waitMs ?? 20_000, 0), 3_600_000),
      shutdownGraceMs: Math.max(o.shutdownGraceMs ?? Number(env('SHUTDOWN_GRACE_MS') ?? 10_000), 0),
      handleSignals: o.handleSignals ?? true,
      live: o.live ?? true,
      logFlushMs: Math.max(o.logFlushMs ?? 200, 1),
      logFlushBytes: Math.max(o.logFlushBytes ?? 16_384, 1),
      onError:
        o.onError ??
        ((error, taskId) =>
          console.warn(`agent ${this.workerId}${taskId ? ` task ${taskId}` : ''}:`, error)),
    };
  }

  /** Tasks being run now. */
  get running(): number {
    return this.#runs.size;
  }

  /**
   * Claims and runs tasks until `stop()` (or SIGTERM/SIGINT). Resolves once every task it
   * held is finished or released, with no timer or request of its own left running;
   * rejects when the server refuses the agent itself (a wrong token, a bad `types`).
   */
  work(handler: TaskHandler): Promise<void> {
    if (this.#working) throw new Error('this agent is already working; make another');
    const onSignal = () => void this.stop();
    const signals = this.#o.handleSignals && nodeProcess?.on ? ['SIGTERM', 'SIGINT'] : [];
    for (const s of signals) nodeProcess?.on?.(s, onSignal);
    const slots = Array.from({ length: this.#o.concurrency }, () => this.#slot(handler));
    this.#working = Promise.all(slots).then(() => {
      clearTimeout(this.#graceTimer);
      for (const s of signals) nodeProcess?.off?.(s, onSignal);
      if (this.#fatal) throw this.#fatal;
    });
    return this.#working;
  }

  /**
   * Stops claiming; in-flight handlers get `shutdownGraceMs` to finish, then their
   * `ctx.signal` aborts and their tasks are RELEASEd. Resolves when `work()` does.
   */
  stop(): Promise<void> {
    if (!this.#stopping) {
      this.#stopping = true;
      this.#claims.abort(new Error('agent stopping'));
      if (this.#runs.size > 0) {
        this.#graceTimer = setTimeout(() => {
          for (const run of this.#runs) void run.giveBack();
        }, this.#o.shutdownGraceMs);
      }
    }
    return (this.#working ?? Promise.resolve()).catch(() => {});
  }

  async #slot(handler: TaskHandler): Promise<void> {
    let failures = 0;
    while (!this.#stopping) {
      let claimed: ClaimedTask | null;
      try {
        claimed = await this.#client.claim(
          { workerId: this.workerId, types: this.#o.types, waitMs: this.#o.waitMs },
          { signal: this.#claims.signal },
        );
        failures = 0;
      } catch (error) {
        if (this.#stopping) return;
        if (isFatal(error)) {
          this.#fatal ??= error;
          void this.stop();
          return;
        }
        this.#o.onError(error);
        const delay = Math.min(100 * 2 ** Math.min(++failures, 6), 5_000);
        await sleepUnless(delay, this.#claims.signal);
        continue;
      }
      if (!claimed) continue;
      const run = new Run(this.#client, claimed, this.#o);
      this.#runs.add(run);
      try {
        // Claimed as the agent stopped: give it straight back.
        if (this.#stopping) await run.giveBack();
        else await run.execute(handler);
      } finally {
        this.#runs.delete(run);
      }
    }
  }
}

/** One claimed task: its heartbeats, its output buffer, its end. */
class Run {
  readonly task: AgentTask;
  readonly token: string;
  readonly #controller = new AbortController();
  /** Stops the heartbeat timers and the live stream. */
  readonly #done = new AbortController();
  readonly #leaseMs: number;
  #phase: 'starting' | 'running' | 'finishing' | 'done' = 'starting';
  #heartbeat: ReturnType<typeof setTimeout> | undefined;
  #deadline: ReturnType<typeof setTimeout> | undefined;
  #given: Promise<void> | null = null;
  #resolveGiven: (() => void) | null = null;
  readonly #givenBack = new Promise<void>((r) => {
    this.#resolveGiven = r;
  });
  // output
  #buffer: OutputChunkIn[] = [];
  #buffered = 0;
  #dropped = 0;
  #flushTimer: ReturnType<typeof setTimeout> | undefined;
  #flushing: Promise<void> = Promise.resolve();
  #outputOff = false;

  constructor(
    private readonly client: OrchestratorClient,
    claimed: ClaimedTask,
    private readonly o: Required<Omit<AgentOptions, 'workerId' | 'types'>>,
  ) {
    this.task = claimed.task as AgentTask;
    this.token = claimed.token;
    this.#leaseMs = leaseOf(claimed.task);
  }

  get #id() {
    return this.task.id;
  }

  abort(cause: AbortCause): void {
    if (this.#controller.signal.aborted || this.#phase === 'done') return;
    if (this.#phase === 'finishing' && cause !== 'shutdown') return;
    this.#controller.abort(new TaskAbortedError(cause, this.#id));
  }

  async execute(handler: TaskHandler): Promise<void> {
    try {
      await this.client.start(this.#id, this.token);
    } catch (error) {
      // Cancelled or reclaimed before it started: not ours to run.
      if (!(error instanceof IllegalTransitionError || error instanceof StaleTokenError)) {
        this.o.onError(error, this.#id);
      }
      this.#finish();
      return;
    }
    this.#phase = 'running';
    this.#renewed(Date.now());
    this.#scheduleHeartbeat(this.#leaseMs / 3);
    if (this.o.live) void this.#follow();
    const ctx: TaskContext = {
      task: this.task,
      token: this.token,
      attempt: this.task.attempt,
      signal: this.#controller.signal,
      log: (text, stream = 'log') => this.#log(text, stream),
      flush: () => this.#flush(),
    };
    let outcome: { ok: true; value: unknown } | { ok: false; error: unknown };
    const running = (async () => handler(this.task, ctx))().then(
      (value) => ({ ok: true as const, value }),
      (error: unknown) => ({ ok: false as const, error }),
    );
    const raced = await Promise.race([running, this.#givenBack.then(() => null)]);
    if (raced === null) return; // released at the end of the grace; the handler is on its own
    outcome = raced;
    if (this.#controller.signal.aborted) {
      await this.#flush();
      this.#finish();
      return;
    }
    this.#phase = 'finishing';
    await this.#flush();
    try {
      if (outcome.ok) await this.#complete(outcome.value);
      else await this.client.fail(this.#id, this.token, failureText(outcome.error));
    } catch (error) {
      this.o.onError(error, this.#id);
    } finally {
      this.#finish();
    }
  }

  /** RELEASE the task (at most once), and let `execute` return without its handler. */
  giveBack(): Promise<void> {
    if (this.#given) return this.#given;
    if (this.#phase === 'finishing' || this.#phase === 'done') return Promise.resolve();
    this.abort('shutdown');
    this.#given = (async () => {
      await this.#flush();
      try {
        await this.client.release(this.#id, this.token, 'agent shutting down');
      } catch (error) {
        if (!(error instanceof IllegalTransitionError || error instanceof StaleTokenError)) {
          this.o.onError(error, this.#id);
        }
      } finally {
        this.#finish();
        this.#resolveGiven?.();
      }
    })();
    return this.#given;
  }

  async #complete(value: unknown): Promise<void> {
    let result: unknown;
    try {
      result = value === undefined ? undefined : JSON.parse(JSON.stringify(value));
    } catch (error) {
      await this.client.fail(this.#id, this.token, `the result is not JSON: ${failureText(error)}`);
      return;
    }
    try {
      await this.client.complete(this.#id, this.token, result);
    } catch (error) {
      // A result the server refuses would otherwise leave the task running until its lease.
      if (error instanceof PayloadTooLargeError || error instanceof ValidationError) {
        await this.client.fail(this.#id, this.token, `the result was refused: ${error.message}`);
        return;
      }
      throw error;
    }
  }

  #finish(): void {
    this.#phase = 'done';
    clearTimeout(this.#heartbeat);
    clearTimeout(this.#deadline);
    clearTimeout(this.#flushTimer);
    this.#done.abort();
  }

  // ---- the lease ----------------------------------------------------------------------

  /**
   * The lease is ours until `sentAt + lease` at the latest (the server measures from when
   * it applied the claim or heartbeat, which is later). Past 90% of that with no renewal,
   * another worker may soon hold the task: abort before it can.
   */
  #renewed(sentAt: number): void {
    clearTimeout(this.#deadline);
    const left = sentAt + this.#leaseMs * 0.9 - Date.now();
    this.#deadline = setTimeout(() => this.abort('lease_lost'), Math.max(left, 0));
  }

  #scheduleHeartbeat(ms: number): void {
    clearTimeout(this.#heartbeat);
    if (this.#phase !== 'running') return;
    this.#heartbeat = setTimeout(() => void this.#beat(), Math.max(ms, 10));
  }

  async #beat(): Promise<void> {
    if (this.#phase !== 'running' || this.#controller.signal.aborted) return;
    const sentAt = Date.now();
    try {
      await this.client.heartbeat(this.#id, this.token, { signal: this.#done.signal });
      if (this.#phase !== 'running') return;
      this.#renewed(sentAt);
      this.#scheduleHeartbeat(this.#leaseMs / 3);
    } catch (error) {
      if (this.#phase !== 'running') return;
      if (this.#refused(error)) return;
      this.o.onError(error, this.#id);
      this.#scheduleHeartbeat(this.#leaseMs / 6);
    }
  }

  /** Aborts on an answer that says the task is no longer this attempt's; true if so. */
  #refused(error: unknown): boolean {
    if (error instanceof IllegalTransitionError) {
      this.abort(error.state === 'cancelled' ? 'cancelled' : 'lease_lost');
      return true;
    }
    if (error instanceof StaleTokenError || error instanceof NotFoundError) {
      this.abort('lease_lost');
      return true;
    }
    return false;
  }

  /** The live stream says it sooner than a heartbeat; a stream that fails changes nothing. */
  async #follow(): Promise<void> {
    try {
      const events = this.client.streamEvents({
        entityId: this.#id,
        after: 'new',
        signal: this.#done.signal,
      });
      for await (const e of events) {
        const attempt = (e.entry.data as { attempt?: unknown }).attempt;
        if (e.type === 'task.cancelled') this.abort('cancelled');
        else if (e.type === 'task.lease_expired' && attempt === this.task.attempt) {
          this.abort('lease_lost');
        } else if (e.type === 'task.claimed' && typeof attempt === 'number') {
          if (attempt > this.task.attempt) this.abort('lease_lost');
        }
        if (this.#controller.signal.aborted) return;
      }
    } catch {
      // Optional by design: the heartbeats still find out.
    }
  }

  // ---- output -------------------------------------------------------------------------

  #log(text: string, stream: OutputStream): void {
    if (this.#phase === 'done' || this.#outputOff || text === '') return;
    for (let i = 0; i < text.length; i += MAX_CHUNK_CHARS) {
      const piece = text.slice(i, i + MAX_CHUNK_CHARS);
      const last = this.#buffer.at(-1);
      if (last && last.stream === stream && last.text.length + piece.length <= MAX_CHUNK_CHARS) {
        last.text += piece;
      } else {
        this.#buffer.push({ stream, text: piece });
      }
      this.#buffered += piece.length;
    }
    // Bounded: a handler that logs faster than the server takes it loses the oldest lines.
    while (this.#buffered > MAX_BUFFERED_CHARS && this.#buffer.length > 1) {
      const gone = this.#buffer.shift()!;
      this.#buffered -= gone.text.length;
      this.#dropped += gone.text.length;
    }
    if (this.#buffered >= this.o.logFlushBytes) void this.#flush();
    else this.#flushTimer ??= setTimeout(() => void this.#flush(), this.o.logFlushMs);
  }

  /** Sends the buffer, one request at a time, in order. */
  #flush(): Promise<void> {
    clearTimeout(this.#flushTimer);
    this.#flushTimer = undefined;
    if (this.#buffer.length === 0) return this.#flushing;
    const chunks = this.#buffer;
    if (this.#dropped > 0) {
      chunks.unshift({ stream: 'log', text: `[${this.#dropped} characters of output dropped]\n` });
      this.#dropped = 0;
    }
    this.#buffer = [];
    this.#buffered = 0;
    this.#flushing = this.#flushing.then(() => this.#send(chunks));
    return this.#flushing;
  }

  async #send(chunks: OutputChunkIn[]): Promise<void> {
    let batch: OutputChunkIn[] = [];
    let size = 0;
    const batches: OutputChunkIn[][] = [];
    for (const c of chunks) {
      const full = size + c.text.length > MAX_REQUEST_CHARS || batch.length >= MAX_REQUEST_CHUNKS;
      if (full && batch.length > 0) {
        batches.push(batch);
        batch = [];
        size = 0;
      }
      batch.push(c);
      size += c.text.length;
    }
    if (batch.length > 0) batches.push(batch);
    for (const b of batches) {
      if (this.#outputOff) return;
      try {
        await this.client.appendOutput(this.#id, this.token, b);
      } catch (error) {
        // The task is ours (the lease says so): a 404 is a server without the output route.
        if (error instanceof NotFoundError || this.#refused(error)) {
          this.#outputOff = true;
          return;
        }
        this.o.onError(error, this.#id);
      }
    }
  }
}

/** The lease length: what the claim granted, measured on the server's own clock. */
function leaseOf(task: ClaimedTask['task']): number {
  const expires = task.leaseExpiresAt ? Date.parse(task.leaseExpiresAt) : Number.NaN;
  const from = Date.parse(task.updatedAt);
  const lease = expires - from;
  return Number.isFinite(lease) && lease > 0 ? lease : DEFAULT_LEASE_MS;
}

function failureText(error: unknown): string {
  const text =
    error instanceof Error ? `${error.name}: ${error.message}` : String(error ?? 'failed');
  return (text.trim() || 'failed').slice(0, MAX_FAIL_CHARS);
}

async function sleepUnless(ms: number, signal: AbortSignal): Promise<void> {
  if (signal.aborted) return;
  await new Promise<void>((resolve) => {
    const done = () => {
      clearTimeout(timer);
      signal.removeEventListener('abort', done);
      resolve();
    };
    const timer = setTimeout(done, ms);
    signal.addEventListener('abort', done, { once: true });
  });
}
