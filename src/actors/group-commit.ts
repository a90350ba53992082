/**
 * Group commit: units of work that arrive while the host's transactions are in flight queue,
 * and the next free lane commits up to `maxUnits` of them in ONE Postgres transaction (one
 * commit, one WAL flush), answering each with its own result once that commit is done.
 *
 * A batch forms only from what queued meanwhile: a unit that finds a lane free starts at once,
 * alone, without a savepoint (no added latency or statements at low load). In a batch of
 * several, each unit runs in its own savepoint, one after another: a unit that throws is rolled
 * back to its savepoint and answered with its error right away, and the others go on. A failed
 * commit answers every unit still waiting with that failure; none is answered as a success.
 *
 * A batch runs on a connection reserved from the pool, not in `sql.begin`, which waits for
 * BEGIN's reply before the first statement: here BEGIN (and SET LOCAL, and each SAVEPOINT)
 * is sent without waiting and travels with the statement after it, one round trip less.
 */
import type postgres from 'postgres';
import { poolEnding, type Sql, sqlState, type Tx } from '../persistence/db.js';

export interface GroupCommitOptions {
  /** Units committed together at most (1: each unit in a transaction of its own). */
  maxUnits: number;
  /** Transactions in flight at once; units queue only while every lane is busy. */
  lanes: number;
  /**
   * How long a unit of a shared batch waits for a lock before it is rolled back to its
   * savepoint with SQLSTATE 55P03 (the caller retries it). A waiting unit stalls the whole
   * batch, and two batches that lock the same rows in opposite orders would otherwise wait
   * for Postgres's deadlock check (deadlock_timeout, 1 s by default).
   */
  lockTimeoutMs?: number;
}

/** Default of `lockTimeoutMs`. */
export const BATCH_LOCK_TIMEOUT_MS = 100;

/** One unit of work as the committer runs it. */
export interface GroupUnit<T, B> {
  /** The unit's statements; `tx` is its own savepoint when it shares the transaction. */
  run(tx: Tx, batch: B): Promise<T>;
  /** Its savepoint held: later units of the same batch may build on its writes. */
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
}

interface Queued<B> {
  unit: GroupUnit<unknown, B>;
  resolve: (value: unknown) => void;
  reject: (error: unknown) => void;
  settled: boolean;
}

export class GroupCommit<B> {
  readonly stats: GroupCommitStats = { commits: 0, units: 0, failedCommits: 0, largestBatch: 0 };
  private readonly queue: Queued<B>[] = [];
  private busy = 0;
  private scheduled = false;

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
      void this.commit(units).finally(() => {
        this.busy--;
        this.pump();
      });
    }
  }

  private async commit(units: Queued<B>[]): Promise<void> {
    const batch = this.newBatch();
    const kept: { q: Queued<B>; value: unknown }[] = [];
    let t: Transaction | undefined;
    try {
      // An ended pool answers CONNECTION_ENDED, as `sql.begin` does (its reserve() would
      // open a connection again).
      if (poolEnding(this.sql)) throw connectionEnded();
      t = new Transaction(await this.sql.reserve());
      const [only] = units;
      if (units.length === 1 && only) await this.runAlone(t, only, batch, kept);
      else await this.runShared(t, units, batch, kept);
      await t.commit();
    } catch (error) {
      await t?.end(false, poolEnding(this.sql));
      // Every unit answered already (a lone unit's own error) is no failed commit.
      if (units.some((q) => !q.settled)) this.stats.failedCommits++;
      for (const q of units) settle(q, error);
      return;
    }
    await t.end(true, poolEnding(this.sql));
    this.stats.commits++;
    this.stats.units += kept.length;
    this.stats.largestBatch = Math.max(this.stats.largestBatch, units.length);
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

  /** Alone: the transaction is the unit's; its error rolls all of it back. */
  private async runAlone(
    t: Transaction,
    q: Queued<B>,
    batch: B,
    kept: { q: Queued<B>; value: unknown }[],
  ): Promise<void> {
    t.sendAhead('begin');
    const scope = t.scope();
    try {
      const value = await t.run(() => q.unit.run(scope.tx, batch));
      scope.check();
      kept.push({ q, value });
    } catch (error) {
      // BEGIN's failure or the connection's is the batch's, not the unit's own.
      await t.check();
      const own = scope.cause(error);
      settle(q, own);
      throw own;
    }
  }

  /** Several: each unit in its own savepoint, one after another. */
  private async runShared(
    t: Transaction,
    units: Queued<B>[],
    batch: B,
    kept: { q: Queued<B>; value: unknown }[],
  ): Promise<void> {
    const lockTimeout = Math.max(
      1,
      Math.floor(this.options.lockTimeoutMs ?? BATCH_LOCK_TIMEOUT_MS),
    );
    t.sendAhead('begin');
    t.sendAhead(`set local lock_timeout = ${lockTimeout}`);
    for (const [i, q] of units.entries()) {
      // The transaction is sound here (the unit before held or was rolled back to its
      // savepoint), so this SAVEPOINT fails only with the connection or BEGIN, which fail the
      // batch: it can go out with the unit's first statement.
      t.sendAhead(`savepoint s${i}`);
      const scope = t.scope();
      try {
        const value = await t.run(() => q.unit.run(scope.tx, batch));
        scope.check();
        await t.check();
        q.unit.kept?.(value, batch);
        kept.push({ q, value });
      } catch (error) {
        await t.check();
        // Rolled back to its savepoint: only this unit's writes are gone.
        const own = scope.cause(error);
        if (brokenConnection(own)) throw own;
        // A unit that sent no statement left its savepoint empty.
        if (scope.sent > 0) await t.statement(`rollback to savepoint s${i}`);
        settle(q, own);
      }
    }
  }
}

function connectionEnded(): Error {
  return Object.assign(new Error('write CONNECTION_ENDED: the pool was ended'), {
    code: 'CONNECTION_ENDED',
  });
}

/** What postgres.js 3.4.9 keeps of one pooled connection (not part of its typed API). */
interface DriverConnection {
  /** Called by the pool once, when the connection closes (`sql.begin` watches it the same way). */
  onclose: ((error: unknown) => void) | null;
  reserved: unknown;
  terminate(): void;
}

/** One unit's view of the transaction: its statements, and the first of them that failed. */
interface Scope {
  tx: Tx;
  /** Statements the unit sent. */
  sent: number;
  /** Throws the first statement that failed, if the unit caught it and went on. */
  check(): void;
  /** The error to answer: as `sql.begin` does, a 25P02 is reported as the failure behind it. */
  cause(error: unknown): unknown;
}

/**
 * One batch's transaction on a connection of its own (`sql.reserve()`). postgres.js pipelines
 * the queries of one connection, so BEGIN, SET LOCAL and each SAVEPOINT go out with the
 * statement after them instead of waiting for their own reply, as `sql.begin` does for BEGIN.
 * A plain BEGIN on an idle pooled connection fails only when the connection does (or its
 * session is in an aborted transaction): every statement after it then fails too, and the
 * batch is answered with BEGIN's error.
 */
class Transaction {
  /** The connection closed: nothing more is sent on it, and it is never released. */
  private lost: unknown;
  private readonly onLost: Promise<never>;
  private lose!: (error: unknown) => void;
  private connection: DriverConnection | undefined;
  /** Statements of ours sent without awaiting: each settles to its error, or undefined. */
  private readonly ahead: Promise<unknown>[] = [];
  /** How many of them succeeded. */
  private confirmed = 0;
  /** Committed or rolled back: a unit's late statement must not run on the released connection. */
  private over = false;

  constructor(private readonly reserved: ReservedSql) {
    this.onLost = new Promise<never>((_, reject) => {
      this.lose = reject;
    });
    this.onLost.catch(() => {});
  }

  /** Sends `statement` now; `check()` reports its failure. */
  sendAhead(statement: string): void {
    if (this.lost !== undefined) return;
    const first = this.ahead.length === 0;
    const options = first ? { onexecute: (c: DriverConnection) => this.watch(c) } : {};
    const query = this.reserved.unsafe(statement, [], options as never).execute();
    this.ahead.push(
      query.then(
        () => undefined,
        (error: unknown) => {
          this.note(error);
          return error ?? new Error(`${statement} failed`);
        },
      ),
    );
  }

  /** Runs `statement` and waits for it. */
  async statement(statement: string): Promise<postgres.RowList<postgres.Row[]>> {
    if (this.lost !== undefined) throw this.lost;
    try {
      return await this.reserved.unsafe(statement);
    } catch (error) {
      this.note(error);
      throw error;
    }
  }

  /** Throws the first failure of the statements sent ahead, or the connection's loss. */
  async check(): Promise<void> {
    while (this.confirmed < this.ahead.length) {
      const error = await this.ahead[this.confirmed];
      if (error !== undefined) throw error;
      this.confirmed++;
    }
    if (this.lost !== undefined) throw this.lost;
  }

  /** Runs a unit; the connection's loss ends it at once, as it does `sql.begin`. */
  run<T>(unit: () => Promise<T>): Promise<T> {
    return Promise.race([new Promise<T>((resolve) => resolve(unit())), this.onLost]);
  }

  async commit(): Promise<void> {
    await this.check();
    const result = await this.statement('commit');
    // A transaction that failed meanwhile is rolled back by COMMIT, which answers ROLLBACK.
    if (result.command !== 'COMMIT') {
      throw new Error(`COMMIT answered ${result.command}: the transaction was rolled back`);
    }
  }

  /**
   * Hands the connection back to the pool: rolled back first unless committed. A connection
   * that closed is not released: the pool took it back when it closed, and `release()` would
   * put it among the idle ones with no socket.
   */
  async end(committed: boolean, poolEnding: boolean): Promise<void> {
    this.over = true;
    if (!committed && this.lost === undefined) {
      // Whatever state the session is in, ROLLBACK ends its transaction; if even that fails,
      // the connection is not to be trusted with another query.
      await this.statement('rollback').catch((error: unknown) => {
        this.lost ??= error;
      });
    }
    if (this.lost !== undefined) return;
    const c = this.connection;
    if (c) c.onclose = null;
    if (poolEnding && c) {
      c.reserved = null;
      c.terminate();
      return;
    }
    this.reserved.release();
  }

  /** The Sql a unit runs its statements on. */
  scope(): Scope {
    let failed: unknown;
    const scope: Scope = {
      tx: undefined as unknown as Tx,
      sent: 0,
      check() {
        if (failed !== undefined) throw failed;
      },
      cause(error) {
        return sqlState(error) === IN_FAILED_TRANSACTION && failed !== undefined ? failed : error;
      },
    };
    // Every query the unit runs is watched (as `sql.begin`'s own handler does): one that
    // failed fails the unit even if it was caught, and none is sent once the connection is gone
    // (the pool may have reconnected it for another caller).
    const watch = <T>(value: T): T => {
      if (!(value instanceof Promise)) return value; // identifiers, fragments
      const query = value as unknown as { handler: (q: PendingQuery) => void };
      const send = query.handler;
      query.handler = (q) => {
        q.catch((error: unknown) => {
          failed ??= error;
          this.note(error);
        });
        if (this.lost !== undefined) return q.reject(this.lost);
        if (this.over)
          return q.reject(new Error('the unit of work ran a query after its transaction ended'));
        scope.sent++;
        send(q);
      };
      return value;
    };
    const reserved = this.reserved;
    scope.tx = new Proxy(reserved, {
      apply: (target, self, args) => watch(Reflect.apply(target, self, args)),
      get: (target, key, receiver) => {
        if (key === 'unsafe' || key === 'file') {
          const fn = Reflect.get(target, key, receiver) as (...args: unknown[]) => unknown;
          return (...args: unknown[]) => watch(fn(...args));
        }
        if (key === 'release' || key === 'reserve' || key === 'begin' || key === 'end') {
          return undefined;
        }
        return Reflect.get(target, key, receiver);
      },
    }) as unknown as Tx;
    return scope;
  }

  private watch(c: DriverConnection): true {
    this.connection = c;
    c.onclose = (error) => {
      this.lost ??= error;
      this.lose(error);
    };
    return true;
  }

  private note(error: unknown): void {
    if (brokenConnection(error)) {
      this.lost ??= error;
      this.lose(error);
    }
  }
}

type ReservedSql = postgres.ReservedSql<Record<string, never>>;
type PendingQuery = Promise<unknown> & { reject(error: unknown): void };

/** SQLSTATE in_failed_transaction: a statement after one that failed. */
const IN_FAILED_TRANSACTION = '25P02';

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
