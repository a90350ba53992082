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

/** SQLSTATE of a Postgres error, if it is one. */
export function sqlState(error: unknown): string | undefined {
  const code = (error as { code?: unknown } | null)?.code;
  return typeof code === 'string' ? code : undefined;
}

export const UNIQUE_VIOLATION = '23505';
