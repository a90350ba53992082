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
  const sql = postgres(url, {
    max: options.max ?? 10,
    connect_timeout: options.connectTimeoutSec ?? 10,
    idle_timeout: 30,
    onnotice: () => {},
    connection: { application_name: options.applicationName ?? 'orchestrator' },
    // bigint columns (pos, stream_seq, counts) arrive as JS numbers: they stay far below 2^53.
    types: {
      bigint: {
        to: 20,
        from: [20],
        serialize: (x: number) => String(x),
        parse: (x: string) => Number(x),
      },
    },
  }) as unknown as Sql;
  const end = sql.end.bind(sql);
  sql.end = (o?: { timeout?: number | undefined }) => {
    ending.add(sql);
    return end(o);
  };
  return sql;
}

const ending = new WeakSet<Sql>();

/**
 * `end()` was called on this pool (one made by `createSql`). postgres.js 3.4.9 does not say so,
 * and its `reserve()` opens a connection of an ended pool again; a connection reserved while it
 * ends is not to be handed back either, or `end()` waits for it forever.
 */
export function poolEnding(sql: Sql): boolean {
  return ending.has(sql);
}

/** SQLSTATE of a Postgres error, if it is one. */
export function sqlState(error: unknown): string | undefined {
  const code = (error as { code?: unknown } | null)?.code;
  return typeof code === 'string' ? code : undefined;
}

export const UNIQUE_VIOLATION = '23505';
