/**
 * One transaction on a connection reserved from the pool, for the actor host's group commit
 * (src/actors/group-commit.ts). postgres.js's `sql.begin` waits for BEGIN's reply before the
 * first statement; here BEGIN, SET LOCAL and each SAVEPOINT are sent without waiting and
 * travel with the statement after them, one round trip less per transaction.
 *
 * It leans on postgres.js 3.4.9 internals that `sql.begin` itself uses (the `onexecute` query
 * option, a connection's `onclose`, a query's `handler`), so a driver upgrade must run
 * test/integration/group-commit-pipeline.test.ts and driver-kill.test.ts.
 */
import type postgres from 'postgres';
import { sqlState, type Tx } from './db.js';

export function connectionEnded(): Error {
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
export class Transaction {
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

/** postgres.js's own codes for a connection that is gone: the transaction is lost with it. */
const CONNECTION_LOST = new Set(['CONNECTION_CLOSED', 'CONNECTION_ENDED', 'CONNECTION_DESTROYED']);

export function brokenConnection(error: unknown): boolean {
  const code = (error as { code?: unknown } | null)?.code;
  if (typeof code !== 'string') return false;
  // 57P01..57P05: the backend was terminated; 08xxx: connection exceptions.
  return CONNECTION_LOST.has(code) || code.startsWith('57P') || code.startsWith('08');
}
