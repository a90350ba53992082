/**
 * Task output: what a task's worker prints, kept per task beside (not inside) its actor.
 * A write is fenced like a worker event (the live claim's token, in claimed or running)
 * but is not a transition: it reads the task row under a share lock instead of deciding an
 * event, so it costs one small transaction, and concurrent writes in a process share one
 * (group commit). Readers follow a task's output live through `watch`: woken in memory by
 * writes in this process, by Postgres NOTIFY for writes in others, and by a periodic check
 * (one query for every watched task) that also notices a task settling.
 */
import { IllegalTransition, NotFound, StaleToken } from '../errors.js';
import type { Sql, Tx } from '../persistence/db.js';
import {
  appendOutput,
  lockTasksForOutput,
  notifyOutput,
  OUTPUT_CHANNEL,
  type OutputChunk,
  type OutputFence,
  type OutputHead,
  type OutputInsert,
  type OutputStream,
  outputHead,
  outputHeads,
  readOutput,
  trimOutput,
} from '../persistence/output-rows.js';
import { allowedEventsOf, type PersistedSnapshot } from './decide.js';
import type { ActorHost } from './host.js';

export type { OutputChunk, OutputHead, OutputStream };

/** States in which a task's worker may write output: a claim is live. */
const WRITABLE = new Set(['claimed', 'running']);
/**
 * States in which no output can arrive until something else happens: the live stream ends
 * there. `failed` is settled, not final: after a REQUEUE a new claim writes again, and a
 * client that wants it opens the stream again (resuming after its last id).
 */
export const SETTLED_TASK_STATES = new Set(['completed', 'cancelled', 'failed']);

/** Requests committed together at most (bounds a batch's statements and NOTIFY payloads). */
const MAX_BATCH_REQUESTS = 64;
/**
 * Transactions in flight at once per process: one more than one, so a batch fills while the
 * other commits; few, so writes share commits instead of taking a connection each.
 */
const MAX_COMMITTERS = 2;

export interface OutputWriteResult {
  /** Seqs the request's chunks got, in order: `firstSeq` .. `lastSeq`. */
  firstSeq: number;
  lastSeq: number;
  attempt: number;
}

interface Pending {
  taskId: string;
  token: string;
  chunks: { stream: OutputStream; text: string; bytes: number }[];
  resolve(result: OutputWriteResult): void;
  reject(error: unknown): void;
}

export interface TaskOutputOptions {
  /** OUTPUT_MAX_BYTES: bytes of text kept per task; the oldest chunks go beyond. */
  maxBytes: number;
  /** Task state changes in this process wake its watchers at once (others: `checkMs`). */
  host?: ActorHost;
  /** Interval of the watched tasks' check (new output NOTIFY missed, a task settled). */
  checkMs?: number;
  clock?: () => number;
}

type Waker = () => void;

export class TaskOutput {
  private readonly queue: Pending[] = [];
  private committers = 0;
  private readonly watchers = new Map<string, Set<Waker>>();
  private readonly known = new Map<string, OutputHead>();
  private unlisten: (() => Promise<void>) | null = null;
  private offCommit: (() => void) | null = null;
  private ticker: NodeJS.Timeout | null = null;
  private checking = false;
  private readonly clock: () => number;
  /** For /metrics and the bench: requests and chunks accepted, transactions used. */
  readonly stats = { requests: 0, chunks: 0, commits: 0 };

  constructor(
    private readonly sql: Sql,
    private readonly options: TaskOutputOptions,
  ) {
    this.clock = options.clock ?? Date.now;
  }

  get maxBytes(): number {
    return this.options.maxBytes;
  }

  /** LISTENs for other processes' writes and follows this process's task transitions. */
  async start(): Promise<void> {
    if (this.unlisten) return;
    const listener = await this.sql.listen(OUTPUT_CHANNEL, (payload) => {
      const cut = payload.lastIndexOf(':');
      if (cut > 0) this.wake(payload.slice(0, cut));
    });
    this.unlisten = listener.unlisten;
    this.offCommit =
      this.options.host?.onCommit((applied) => {
        for (const a of applied) if (a.entityType === 'task') this.wake(a.id);
      }) ?? null;
  }

  async stop(): Promise<void> {
    this.offCommit?.();
    this.offCommit = null;
    if (this.ticker) clearInterval(this.ticker);
    this.ticker = null;
    const unlisten = this.unlisten;
    this.unlisten = null;
    await unlisten?.().catch(() => {});
    for (const set of this.watchers.values()) for (const w of set) w();
  }

  /**
   * Appends chunks for the live claim `token` of task `taskId`. Throws NotFound, StaleToken
   * (claimed or running under another token) or IllegalTransition (any other state, e.g.
   * `cancelled`: how an agent learns that its task was cancelled); nothing is stored then.
   */
  write(
    taskId: string,
    token: string,
    chunks: { stream: OutputStream; text: string }[],
  ): Promise<OutputWriteResult> {
    const sized = chunks.map((c) => ({ ...c, bytes: Buffer.byteLength(c.text, 'utf8') }));
    return new Promise((resolve, reject) => {
      this.queue.push({ taskId, token, chunks: sized, resolve, reject });
      if (this.committers < MAX_COMMITTERS) void this.drain();
    });
  }

  /** One page of a task's output after `after`; null when there is no such task. */
  async read(
    taskId: string,
    after: number,
    limit: number,
  ): Promise<{ chunks: OutputChunk[]; truncated: boolean; state: string } | null> {
    const head = await outputHead(this.sql, taskId);
    if (head.state === null) return null;
    const chunks = head.lastSeq > after ? await readOutput(this.sql, taskId, after, limit) : [];
    return { chunks, truncated: head.truncated, state: head.state };
  }

  head(taskId: string): Promise<OutputHead> {
    return outputHead(this.sql, taskId);
  }

  /** Calls `onChange` when the task may have new output or a new state; returns the stop. */
  watch(taskId: string, onChange: Waker): () => void {
    let set = this.watchers.get(taskId);
    if (!set) {
      set = new Set();
      this.watchers.set(taskId, set);
    }
    set.add(onChange);
    const checkMs = this.options.checkMs ?? 1_000;
    if (!this.ticker) {
      this.ticker = setInterval(() => void this.check(), checkMs);
      this.ticker.unref();
    }
    return () => {
      const s = this.watchers.get(taskId);
      s?.delete(onChange);
      if (s && s.size === 0) {
        this.watchers.delete(taskId);
        this.known.delete(taskId);
      }
      if (this.watchers.size === 0 && this.ticker) {
        clearInterval(this.ticker);
        this.ticker = null;
      }
    };
  }

  private wake(taskId: string): void {
    const set = this.watchers.get(taskId);
    if (set) for (const w of set) w();
  }

  /** The fallback for a NOTIFY lost while the LISTEN connection reconnected, and for states. */
  private async check(): Promise<void> {
    if (this.checking || this.watchers.size === 0) return;
    this.checking = true;
    try {
      const heads = await outputHeads(this.sql, [...this.watchers.keys()]);
      for (const [id, head] of heads) {
        const before = this.known.get(id);
        this.known.set(id, head);
        if (
          !before ||
          before.lastSeq !== head.lastSeq ||
          before.state !== head.state ||
          SETTLED_TASK_STATES.has(head.state ?? '')
        ) {
          this.wake(id);
        }
      }
    } catch {
      // The database is away: the next tick tries again, and the streams' own reads fail.
    } finally {
      this.checking = false;
    }
  }

  /** Group commit: while transactions run, new writes queue and go in the next. */
  private async drain(): Promise<void> {
    this.committers++;
    try {
      while (this.queue.length > 0) {
        const batch = this.queue.splice(0, MAX_BATCH_REQUESTS);
        await this.commit(batch);
      }
    } finally {
      this.committers--;
    }
  }

  /**
   * The same write inside a caller's transaction (a keyed request: the Idempotency-Key's
   * record commits with the output, or neither does). Refusals throw, rolling it back.
   */
  async writeIn(
    tx: Tx,
    taskId: string,
    token: string,
    chunks: { stream: OutputStream; text: string }[],
  ): Promise<OutputWriteResult> {
    const sized = chunks.map((c) => ({ ...c, bytes: Buffer.byteLength(c.text, 'utf8') }));
    const p: Pending = { taskId, token, chunks: sized, resolve: () => {}, reject: () => {} };
    const outcome = (await this.apply(tx, [p])).get(p);
    if (outcome instanceof Error) throw outcome;
    this.stats.requests++;
    this.stats.chunks += chunks.length;
    return outcome!;
  }

  private async commit(batch: Pending[]): Promise<void> {
    let outcomes: Map<Pending, OutputWriteResult | Error>;
    try {
      outcomes = await this.sql.begin((tx) => this.apply(tx, batch));
    } catch (error) {
      for (const p of batch) p.reject(error);
      return;
    }
    this.stats.commits++;
    const written = new Set<string>();
    for (const p of batch) {
      const o = outcomes.get(p);
      if (o instanceof Error) p.reject(o);
      else if (o) {
        this.stats.requests++;
        this.stats.chunks += p.chunks.length;
        written.add(p.taskId);
        p.resolve(o);
      }
    }
    for (const id of written) this.wake(id);
  }

  /** Checks every request of the batch against its task, then writes the accepted ones. */
  private async apply(tx: Tx, batch: Pending[]): Promise<Map<Pending, OutputWriteResult | Error>> {
    const outcomes = new Map<Pending, OutputWriteResult | Error>();
    const ids = [...new Set(batch.map((p) => p.taskId))];
    const fences = new Map((await lockTasksForOutput(tx, ids)).map((f) => [f.id, f]));
    const rows: OutputInsert[] = [];
    const accepted: { p: Pending; from: number; attempt: number }[] = [];
    for (const p of batch) {
      const refused = refusal(p, fences.get(p.taskId));
      if (refused) {
        outcomes.set(p, refused);
        continue;
      }
      const attempt = fences.get(p.taskId)!.attempt;
      accepted.push({ p, from: rows.length, attempt });
      for (const c of p.chunks) rows.push({ taskId: p.taskId, attempt, ...c });
    }
    if (rows.length === 0) return outcomes;
    const { appends, seqs } = await appendOutput(tx, rows, new Date(this.clock()));
    for (const a of appends) await trimOutput(tx, a, this.options.maxBytes);
    await notifyOutput(tx, appends);
    for (const a of accepted) {
      outcomes.set(a.p, {
        firstSeq: seqs[a.from]!,
        lastSeq: seqs[a.from + a.p.chunks.length - 1]!,
        attempt: a.attempt,
      });
    }
    return outcomes;
  }

  /** A page of a task's output after `after`, oldest first (no state read). */
  page(taskId: string, after: number, limit: number): Promise<OutputChunk[]> {
    return readOutput(this.sql, taskId, after, limit);
  }
}

/** Why `p` may not write, as the error a worker event would get; null when it may. */
function refusal(p: Pending, fence: OutputFence | undefined): Error | null {
  if (!fence) return new NotFound('task', p.taskId);
  if (WRITABLE.has(fence.state)) {
    return fence.token !== null && fence.token === p.token
      ? null
      : new StaleToken(p.taskId, fence.attempt);
  }
  const allowed = fence.snapshot
    ? allowedEventsOf('task', fence.snapshot as PersistedSnapshot)
    : [];
  return new IllegalTransition(p.taskId, fence.state, 'OUTPUT', allowed, false, 'task');
}
