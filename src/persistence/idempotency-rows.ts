/**
 * Stored HTTP responses by idempotency key, and their expiry.
 *
 * A key's response commits in the same transaction as its effect, so a retry finds either
 * both or neither. Keys are kept `IDEMPOTENCY_KEY_TTL_MS` (24 h by default) and then deleted:
 * clients that send a key with every POST (our SDK does) would otherwise grow the table by
 * several rows per task, each holding a whole response, for as long as the deployment runs.
 */
import type { Logger } from '../log.js';
import type { Sql, Tx } from './db.js';
import { Periodic } from './periodic.js';

/** Postgres's type oid of `json` (text kept as written; `jsonb` is 3802). */
const JSON_OID = 114;

/** Arbitrary, fixed: the advisory lock namespace of idempotency keys. */
const IDEMPOTENCY_LOCK_NS = 7_402_615;

export interface StoredResponseRow {
  request_hash: string;
  status: number;
  body: unknown;
}

/**
 * Holds the key for the rest of the transaction: a second request with the same key waits
 * here until the first one's response is stored (or rolled back), then finds it.
 */
export async function lockIdempotencyKey(tx: Tx, scope: string, key: string): Promise<void> {
  await tx`select pg_advisory_xact_lock(${IDEMPOTENCY_LOCK_NS}, hashtext(${`${scope}\n${key}`}))`;
}

export async function findStoredResponse(
  tx: Tx,
  scope: string,
  key: string,
): Promise<StoredResponseRow | undefined> {
  const rows = await tx<StoredResponseRow[]>`
    select request_hash, status, body from idempotency_keys
    where scope = ${scope} and key = ${key}`;
  return rows[0];
}

export async function storeResponse(
  tx: Tx,
  row: { scope: string; key: string; requestHash: string; status: number; body: unknown },
): Promise<void> {
  // Sent as `json` into a `json` column, which keeps the text as written: a replay is the
  // first answer byte for byte (`tx.json` sends jsonb, which orders an object's members its
  // own way).
  await tx`insert into idempotency_keys (scope, key, request_hash, status, body)
    values (${row.scope}, ${row.key}, ${row.requestHash}, ${row.status},
      ${tx.typed(row.body as never, JSON_OID)})`;
}

/** Rows one expiry statement deletes at most: each statement's locks and WAL stay small. */
export const EXPIRY_BATCH = 1_000;
/** Statements one run sends at most; what is left waits for the next run. */
export const EXPIRY_BATCHES_PER_RUN = 100;
/** How often each process looks for expired keys (the TTL if shorter). */
export const EXPIRY_CHECK_MS = 60_000;

/**
 * Deletes the keys stored more than `ttlMs` ago, `batch` at a time, until none is left or
 * `maxBatches` statements ran; returns how many it deleted. Rows another process is deleting
 * are skipped, not waited for, so every process may run it at once.
 */
export async function expireIdempotencyKeys(
  sql: Sql,
  ttlMs: number,
  o: { batch?: number; maxBatches?: number } = {},
): Promise<number> {
  const batch = o.batch ?? EXPIRY_BATCH;
  const maxBatches = o.maxBatches ?? EXPIRY_BATCHES_PER_RUN;
  let deleted = 0;
  for (let i = 0; i < maxBatches; i++) {
    const rows = await sql`
      with doomed as (
        select scope, key from idempotency_keys
        where created_at < now() - make_interval(secs => ${ttlMs / 1000})
        order by created_at
        limit ${batch}
        for update skip locked
      )
      delete from idempotency_keys k using doomed d
      where k.scope = d.scope and k.key = d.key`;
    deleted += rows.count;
    if (rows.count < batch) break;
  }
  return deleted;
}

/** Runs `expireIdempotencyKeys` in the background; a TTL of 0 keeps every key. */
export class IdempotencyExpiry {
  private readonly periodic: Periodic;
  /** Keys this process deleted since it started. */
  expired = 0;

  constructor(sql: Sql, log: Logger, options: { ttlMs: number; intervalMs?: number }) {
    const interval =
      options.ttlMs > 0 ? (options.intervalMs ?? Math.min(options.ttlMs, EXPIRY_CHECK_MS)) : 0;
    this.periodic = new Periodic(interval, async () => {
      try {
        const n = await expireIdempotencyKeys(sql, options.ttlMs);
        this.expired += n;
        if (n > 0) log.debug({ expired: n }, 'expired idempotency keys');
      } catch (err) {
        if (!this.periodic.stopping) log.warn({ err }, 'idempotency key expiry failed; retrying');
      }
    });
  }

  start(): void {
    this.periodic.start();
  }

  stop(): Promise<void> {
    return this.periodic.stop();
  }
}
