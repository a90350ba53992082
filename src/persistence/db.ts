/**
 * The Postgres connection: one postgres.js pool per process. Everything that touches SQL
 * takes a `Sql` (the pool or a transaction), so callers choose the transaction boundary.
 */
import postgres from 'postgres';

export type Sql = postgres.Sql<Record<string, never>>;
export type Tx = postgres.TransactionSql<Record<string, never>>;
/** Either the pool or an open transaction: queries work the same on both. */
export type Db = Sql | Tx;

export interface DbOptions {
  max?: number;
  /** Connection attempts time out instead of hanging on a missing server. */
  connectTimeoutSec?: number;
  applicationName?: string;
}

export function createSql(url: string, options: DbOptions = {}): Sql {
  return postgres(url, {
    max: options.max ?? 10,
    connect_timeout: options.connectTimeoutSec ?? 10,
    idle_timeout: 30,
    onnotice: () => {},
    // No JIT: every statement here is short. A plan whose estimate goes wrong (a table not
    // yet analyzed, as right after a burst) otherwise costs ~400 ms of compilation a call.
    connection: { application_name: options.applicationName ?? 'orchestrator', jit: 'off' },
    // bigint columns (pos, stream sequences, counts) arrive as JS numbers: they stay far below 2^53.
    types: {
      bigint: {
        to: 20,
        from: [20],
        serialize: (x: number) => String(x),
        parse: (x: string) => Number(x),
      },
    },
  }) as unknown as Sql;
}

/** The server's answer to a transaction's COMMIT: `COMMIT`, or `ROLLBACK` if it had failed. */
export interface CommitAnswer {
  command: string;
}

/**
 * Sends `tx`'s COMMIT now, behind the statements already sent, rather than after its callback
 * settles (scripts/patch-deps.mjs, pipelined-commit): the answers of those statements and of
 * the COMMIT come back together. Nothing may be sent in `tx` after it. Returns the COMMIT's
 * answer, or null where the driver lacks the patch (the transaction then commits as usual).
 */
export function commitAhead(tx: Tx): Promise<CommitAnswer> | null {
  const send = (tx as unknown as { commitAhead?: () => Promise<CommitAnswer> | null }).commitAhead;
  return typeof send === 'function' ? send() : null;
}

/**
 * Marks `query` to be written to its connection as soon as it is handed over (a microtask after
 * it is awaited or executed), with what the connection buffered before it, instead of at the end
 * of the turn (scripts/patch-deps.mjs, write-now): for a read asked for ahead of a stretch of
 * this thread's own work, so that Postgres runs it meanwhile. Without the patch it has no effect.
 */
export function writeNow<T extends object>(query: T): T {
  (query as { writeNow?: boolean }).writeNow = true;
  return query;
}

/**
 * A check that fails its statement, and so its transaction, in Postgres: for a statement the
 * transaction's COMMIT may already follow (`commitAhead`), where a check in JS on the answer
 * would come too late. The value is 1 when `ok` holds; otherwise the cast to int of `message`
 * joined to `detail` fails with SQLSTATE 22P02, recognised by `failedCheck`. `detail` must
 * not be a constant (a count, a subquery), or the planner could evaluate the cast ahead of
 * the CASE and fail every statement.
 */
export function checkInSql(
  db: Db,
  ok: postgres.Fragment,
  message: string,
  detail: postgres.Fragment,
): postgres.Fragment {
  return db`case when ${ok} then 1 else (${`${message}: `} || ${detail})::int end`;
}

/** `checkInSql` for a statement written as text (`Bindings`); `ok` and `detail` are SQL text. */
export function checkInText(b: Bindings, ok: string, message: string, detail: string): string {
  return `case when ${ok} then 1 else (${b.add(`${message}: `)} || ${detail})::int end`;
}

/**
 * The parameters of a statement written as text: `add` binds a value and answers its
 * placeholder. For the statement every single-actor transition sends: as a tagged template
 * it was a dozen nested fragments, each a query object of the driver built and walked again
 * for every call, and with their garbage a third of the host's CPU per transition (BENCHMARKS
 * section 27). The texts are a few fixed shapes, so the driver's prepared statements (keyed
 * by text and parameter types) still serve them. Values are bound exactly as in a tagged
 * template (the same type inference and serialization); only SQL text of this module's own
 * goes into the text, never a value.
 */
export class Bindings {
  readonly values: unknown[] = [];
  add(value: unknown): string {
    this.values.push(value);
    return `$${this.values.length}`;
  }
  /** The statement, prepared, with these values (not yet sent: await it or `execute()`). */
  query<T extends object[] = object[]>(db: Db, text: string): postgres.PendingQuery<T> {
    return db.unsafe<T>(text, this.values as postgres.ParameterOrJSON<never>[], { prepare: true });
  }
}

/** Whether `error` is the failure of a `checkInSql` check with `message`. */
export function failedCheck(error: unknown, message: string): boolean {
  return (
    sqlState(error) === '22P02' &&
    String((error as { message?: unknown }).message).includes(message)
  );
}

/** SQLSTATE of a Postgres error, if it is one. */
export function sqlState(error: unknown): string | undefined {
  const code = (error as { code?: unknown } | null)?.code;
  return typeof code === 'string' ? code : undefined;
}

export const UNIQUE_VIOLATION = '23505';
