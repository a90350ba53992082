/**
 * Group commit: units of work that arrive while the host's transactions are in flight queue,
 * and the next free lane commits up to `maxUnits` of them in ONE Postgres transaction (one
 * commit, one WAL flush), answering each with its own result once that commit is done.
 *
 * A batch forms only from what queued meanwhile: a unit that finds a lane free starts at once,
 * alone (no added latency or statements at low load). In a batch of several, the units with
 * distinct keys (see `GroupUnit.keys`) run side by side, their statements pipelined on the
 * transaction's connection, so a batch takes about one unit's round trips rather than the
 * sum of them; the others then run one after another, each seeing what the earlier ones
 * wrote. No savepoints: a savepoint per unit cost two statements and a subtransaction each,
 * about a fifth of a batched transition. A unit that
 * throws rolls the whole transaction back; it alone is answered with its error, and the units
 * that ran before or were still to run go back to the head of the queue and run again in the
 * next batch (a unit's `run` must be safe to repeat: it writes only through its transaction).
 * Each failure answers one unit, so a batch always makes progress. A failed commit answers
 * every unit still waiting with that failure; none is answered as a success.
 *
 * Once every unit has settled or said it is final (`GroupUnit.run`'s `final`), the COMMIT goes
 * out behind the statements still being answered (`commitAhead`), a round trip sooner. A
 * statement that fails makes the server roll back instead, and the batch is handled as any
 * failed one. A unit that fails in JS after saying it is final broke its word: the batch has
 * committed, so that unit is answered with its failure and nothing runs again.
 */
import { type CommitAnswer, commitAhead, type Sql, type Tx } from '../persistence/db.js';

export interface GroupCommitOptions {
  /** Units committed together at most (1: each unit in a transaction of its own). */
  maxUnits: number;
  /** Transactions in flight at once; units queue only while every lane is busy. */
  lanes: number;
  /**
   * How long a unit of a shared batch waits for a lock before it fails with SQLSTATE 55P03
   * (the caller retries it; the batch's other units run again). A waiting unit stalls the whole
   * batch, and two batches that lock the same rows in opposite orders would otherwise wait
   * for Postgres's deadlock check (deadlock_timeout, 1 s by default).
   */
  lockTimeoutMs?: number;
}

/** Default of `lockTimeoutMs`. */
export const BATCH_LOCK_TIMEOUT_MS = 100;

/** One unit of work as the committer runs it. */
export interface GroupUnit<T, B> {
  /**
   * What this unit holds to itself, if it is confined: the one actor it works on (with the
   * same-transaction rules of its transitions), then anything else no other unit of its
   * transaction may hold at once (an idempotency key, whose advisory lock does not hold off
   * another unit of the same transaction). Units whose keys do not overlap run side by side
   * in a shared transaction. That is safe because such a unit decides only on reads its
   * writes re-check (an actor's compare-and-set, a unique key): a unit whose read another
   * unit's write made stale fails and runs again, never writes on it. Units whose keys
   * overlap an earlier one's, and units without keys (a claim choosing among candidates it
   * did not lock against its own transaction), run in turn.
   */
  keys?: readonly string[];
  /**
   * The unit's statements in `tx`, which it may share with other units. Called again, with a
   * fresh `batch`, when another unit's failure rolled the shared transaction back. `final`:
   * the unit calls it once its last statement is sent and nothing it does with the answers can
   * fail or send more (a failure of the statements themselves may still come); once every unit
   * of the batch is final or done, the COMMIT goes out behind those statements instead of a
   * round trip after their answers.
   */
  run(tx: Tx, batch: B, final: () => void): Promise<T>;
  /** It ran in a shared batch: later units of the same batch may build on its writes. */
  kept?(value: T, batch: B): void;
  /**
   * The batch committed. Called synchronously, in the batch's order, before the unit's promise
   * resolves and before this lane starts another batch (the cache is updated here).
   */
  committed?(value: T): void;
}

export interface GroupCommitStats {
  /** Transactions committed. */
  commits: number;
  /** Units answered with success (committed). */
  units: number;
  /** Transactions whose commit (or BEGIN) failed. */
  failedCommits: number;
  /** The largest batch committed so far. */
  largestBatch: number;
  /** Units run again because another unit of their batch failed. */
  reruns: number;
}

interface LaneState {
  since: number;
  units: number;
  phase: 'connecting' | 'running' | 'committing';
}

interface Queued<B> {
  unit: GroupUnit<unknown, B>;
  resolve: (value: unknown) => void;
  reject: (error: unknown) => void;
  settled: boolean;
}

export class GroupCommit<B> {
  readonly stats: GroupCommitStats = {
    commits: 0,
    units: 0,
    failedCommits: 0,
    largestBatch: 0,
    reruns: 0,
  };
  private readonly queue: Queued<B>[] = [];
  private busy = 0;
  private scheduled = false;
  /** The transactions in flight, for `inFlight()`: where a stuck one is stuck. */
  private readonly lanes = new Set<LaneState>();

  constructor(
    private readonly sql: Sql,
    private readonly options: GroupCommitOptions,
    /** State shared by the units of one batch (the rows its earlier units wrote). */
    private readonly newBatch: () => B,
  ) {}

  /** Units waiting for a lane. */
  get waiting(): number {
    return this.queue.length;
  }

  /**
   * Each transaction in flight: how long it has run, its units, and its phase (`connecting`:
   * waiting for a connection and BEGIN; `running`: its units' statements; `committing`: the
   * COMMIT). Read when a shutdown waits on one (a log line), never on the hot path.
   */
  inFlight(): { ms: number; units: number; phase: LaneState['phase'] }[] {
    const now = performance.now();
    return [...this.lanes].map((l) => ({
      ms: Math.round(now - l.since),
      units: l.units,
      phase: l.phase,
    }));
  }

  /** Runs `unit` in the next transaction a lane commits; resolves after that commit. */
  submit<T>(unit: GroupUnit<T, B>): Promise<T> {
    return new Promise<T>((resolve, reject) => {
      this.queue.push({
        unit: unit as GroupUnit<unknown, B>,
        resolve: resolve as (value: unknown) => void,
        reject,
        settled: false,
      });
      // Units submitted in the same turn of the event loop (a burst) share a batch rather than
      // each taking a lane: the pump waits one microtask, never a timer.
      if (!this.scheduled) {
        this.scheduled = true;
        queueMicrotask(() => {
          this.scheduled = false;
          this.pump();
        });
      }
    });
  }

  private pump(): void {
    const lanes = Math.max(1, this.options.lanes);
    const max = Math.max(1, this.options.maxUnits);
    while (this.busy < lanes && this.queue.length > 0) {
      // Spread what waits over the free lanes, up to `maxUnits` each.
      const share = Math.min(max, Math.ceil(this.queue.length / (lanes - this.busy)));
      const units = this.queue.splice(0, share);
      this.busy++;
      const lane: LaneState = {
        since: performance.now(),
        units: units.length,
        phase: 'connecting',
      };
      this.lanes.add(lane);
      void this.commit(units, lane).finally(() => {
        this.lanes.delete(lane);
        this.busy--;
        this.pump();
      });
    }
  }

  private async commit(units: Queued<B>[], lane: LaneState): Promise<void> {
    const batch = this.newBatch();
    const kept: { q: Queued<B>; value: unknown }[] = [];
    /** How each unit's run settled in this transaction. */
    const outcomes = new Map<
      Queued<B>,
      { ok: true; value: unknown } | { ok: false; error: unknown }
    >();
    let failed: { q: Queued<B>; error: unknown } | null = null;
    let early: Promise<CommitAnswer> | null = null;
    try {
      await this.sql.begin(async (t) => {
        lane.phase = 'running';
        const tx = t as unknown as Tx;
        const shared = units.length > 1;
        if (shared) {
          const lockTimeout = Math.max(
            1,
            Math.floor(this.options.lockTimeoutMs ?? BATCH_LOCK_TIMEOUT_MS),
          );
          // Not awaited: it goes out ahead of the first unit's statements, in the same write.
          // Its failure (the connection lost under it) fails them too and is answered there;
          // left without a handler, it would be an unhandled rejection and end the process.
          tx.unsafe(`set local lock_timeout = ${lockTimeout}`)
            .execute()
            .catch(() => {});
        }
        // A unit is open until its run settles or it says it is final. Once every unit has
        // started and none is open, nothing more will be sent: the COMMIT goes out now. Never
        // after a unit failed: a failure in JS leaves the transaction committable, with that
        // unit's writes half done.
        let started = 0;
        let open = units.length;
        let refused = false;
        const run = (q: Queued<B>): Promise<unknown> => {
          started++;
          let closed = false;
          const close = () => {
            if (closed) return;
            closed = true;
            open--;
            if (early === null && !refused && open === 0 && started === units.length) {
              early = commitAhead(tx);
            }
          };
          return q.unit.run(tx, batch, close).then(
            (value) => {
              outcomes.set(q, { ok: true, value });
              close();
              return value;
            },
            (error) => {
              refused = true;
              outcomes.set(q, { ok: false, error });
              throw error;
            },
          );
        };
        const { together, inTurn } = shared ? sideBySide(units) : { together: [], inTurn: units };
        if (together.length > 0) {
          const settled = await Promise.allSettled(together.map(run));
          failed = failureToAnswer(together, settled);
          if (failed) throw failed.error;
          for (const [i, q] of together.entries()) {
            const value = (settled[i] as PromiseFulfilledResult<unknown>).value;
            q.unit.kept?.(value, batch);
            kept.push({ q, value });
          }
        }
        for (const q of inTurn) {
          try {
            const value = await run(q);
            if (shared) q.unit.kept?.(value, batch);
            kept.push({ q, value });
          } catch (error) {
            failed = { q, error };
            throw error;
          }
        }
        lane.phase = 'committing';
      });
    } catch (error) {
      const pipelined = early as Promise<CommitAnswer> | null;
      const answer = pipelined ? await pipelined.catch(() => null) : null;
      if (answer?.command === 'COMMIT') {
        // It committed at its pipelined COMMIT: every unit's work stands, and a unit that
        // failed after it said it was final is answered with its failure; none runs again.
        const done: { q: Queued<B>; value: unknown }[] = [];
        for (const q of units) {
          const o = outcomes.get(q);
          if (o?.ok) done.push({ q, value: o.value });
          else settle(q, o ? o.error : error);
        }
        this.answer(done, units.length);
        return;
      }
      const f = failed as { q: Queued<B>; error: unknown } | null;
      if (f) settle(f.q, f.error);
      // The others lost only the transaction they shared with the failed unit: they run again,
      // first in line. Not when the connection broke (the failure may be the commit's own).
      const again = units.filter((q) => !q.settled);
      if (f && again.length > 0 && !brokenConnection(error)) {
        this.stats.reruns += again.length;
        this.queue.unshift(...again);
        return;
      }
      if (again.length > 0) this.stats.failedCommits++;
      for (const q of units) settle(q, error);
      return;
    }
    this.answer(kept, units.length);
  }

  /** After the commit: each unit's `committed`, then its answer, in the batch's order. */
  private answer(kept: { q: Queued<B>; value: unknown }[], batchSize: number): void {
    this.stats.commits++;
    this.stats.units += kept.length;
    this.stats.largestBatch = Math.max(this.stats.largestBatch, batchSize);
    for (const { q, value } of kept) {
      if (q.settled) continue;
      try {
        q.unit.committed?.(value);
      } catch (error) {
        // A listener's failure is the caller's to see; the commit stands.
        settle(q, error);
        continue;
      }
      q.settled = true;
      q.resolve(value);
    }
  }
}

/**
 * The units of a batch that run side by side (each with keys no earlier one holds; at least
 * two, or none)
 * and those that run in turn after them, in batch order.
 */
function sideBySide<B>(units: Queued<B>[]): { together: Queued<B>[]; inTurn: Queued<B>[] } {
  const held = new Set<string>();
  const together: Queued<B>[] = [];
  const inTurn: Queued<B>[] = [];
  for (const q of units) {
    const keys = q.unit.keys ?? [];
    if (keys.length > 0 && !keys.some((k) => held.has(k))) {
      for (const k of keys) held.add(k);
      together.push(q);
    } else {
      inTurn.push(q);
    }
  }
  if (together.length < 2) return { together: [], inTurn: units };
  return { together, inTurn };
}

/**
 * The failure to answer among units that ran side by side: the first that is not only the
 * echo of another's (a statement refused because the transaction had already failed), or
 * else the first at all. The rest run again.
 */
function failureToAnswer<B>(
  units: Queued<B>[],
  outcomes: PromiseSettledResult<unknown>[],
): { q: Queued<B>; error: unknown } | null {
  let echo: { q: Queued<B>; error: unknown } | null = null;
  for (const [i, o] of outcomes.entries()) {
    if (o.status === 'fulfilled') continue;
    const q = units[i] as Queued<B>;
    if (sqlStateOf(o.reason) !== IN_FAILED_TRANSACTION) return { q, error: o.reason };
    echo ??= { q, error: o.reason };
  }
  return echo;
}

/** SQLSTATE of a statement sent after another of its transaction had failed. */
const IN_FAILED_TRANSACTION = '25P02';

function sqlStateOf(error: unknown): string | undefined {
  const code = (error as { code?: unknown } | null)?.code;
  return typeof code === 'string' ? code : undefined;
}

function settle<B>(q: Queued<B>, error: unknown): void {
  if (q.settled) return;
  q.settled = true;
  q.reject(error);
}

/** postgres.js's own codes for a connection that is gone: the transaction is lost with it. */
const CONNECTION_LOST = new Set(['CONNECTION_CLOSED', 'CONNECTION_ENDED', 'CONNECTION_DESTROYED']);

function brokenConnection(error: unknown): boolean {
  const code = (error as { code?: unknown } | null)?.code;
  if (typeof code !== 'string') return false;
  // 57P01..57P05: the backend was terminated; 08xxx: connection exceptions.
  return CONNECTION_LOST.has(code) || code.startsWith('57P') || code.startsWith('08');
}
