/**
 * Task leases as a column: `tasks.lease_expires_at` is written by the same update as the
 * snapshot (set by a claim, start or heartbeat, cleared when the task leaves claimed and
 * running) and found by the partial index `tasks_lease_due`. A lease is expired by locking
 * its row while the deadline is still past, so a heartbeat that extended it meanwhile wins
 * and two pollers never expire it twice.
 */
import type { Db } from './db.js';

/** Ids of tasks whose lease has passed, soonest first (no lock: the firing re-checks). */
export async function dueLeases(db: Db, limit: number): Promise<string[]> {
  const rows = await db<{ id: string }[]>`
    select id from tasks where lease_expires_at <= now()
    order by lease_expires_at limit ${limit}`;
  return rows.map((r) => r.id);
}

/**
 * Locks the task's row if its lease has still passed. False when another transaction holds
 * the row (a poller firing it, or a heartbeat; the next poll looks again) or the lease was
 * extended or cleared meanwhile.
 */
export async function lockExpiredLease(db: Db, id: string): Promise<boolean> {
  const rows = await db`select 1 from tasks where id = ${id} and lease_expires_at <= now()
    for update skip locked`;
  return rows.length === 1;
}

/** Clears a deadline the task's state does not take (it would otherwise be found forever). */
export async function clearLease(db: Db, id: string): Promise<void> {
  await db`update tasks set lease_expires_at = null where id = ${id}`;
}

/** Milliseconds until the next lease passes (null when none), to size the poller's sleep. */
export async function nextLeaseDelay(db: Db): Promise<number | null> {
  const rows = await db<{ ms: number | null }[]>`
    select (extract(epoch from (min(lease_expires_at) - now())) * 1000)::float8 as ms
    from tasks where lease_expires_at is not null`;
  const v = rows[0]?.ms;
  return v === null || v === undefined ? null : Math.max(0, v);
}
