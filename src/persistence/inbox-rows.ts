/**
 * The consumer inbox: a reaction records (consumer, event id) in the same transaction as its
 * effect, so a redelivered message finds its row and changes nothing.
 */
import type { Db } from './db.js';

/** True when this is the first time `consumer` handles `eventId`. */
export async function recordInbox(db: Db, consumer: string, eventId: string): Promise<boolean> {
  return (await recordInboxMany(db, consumer, [eventId])).size === 1;
}

/**
 * Records several events for `consumer` at once; returns the ids handled for the first time
 * (a repeated id, in the list or from an earlier transaction, is not among them).
 */
export async function recordInboxMany(
  db: Db,
  consumer: string,
  eventIds: string[],
): Promise<Set<string>> {
  if (eventIds.length === 0) return new Set();
  // In one order everywhere: two transactions inserting overlapping ids (a redelivery taken
  // by another process) then wait for each other instead of deadlocking.
  const sorted = [...eventIds].sort();
  const rows = await db<{ event_id: string }[]>`
    insert into inbox (consumer, event_id)
    select ${consumer}, id from unnest(${sorted}::uuid[]) as id
    on conflict do nothing returning event_id`;
  return new Set(rows.map((r) => r.event_id));
}
