/**
 * SQL for the live event feed: the event log read in `pos` order, with what is needed to
 * tell a position that is still in flight from one that will never exist.
 *
 * `pos` is drawn from a sequence at insert, not at commit, so a later position can become
 * visible before an earlier one. A missing position is either held by a transaction still
 * running or was lost with a rollback. Every transaction that appends events writes its actor
 * row first, so it has a transaction id before it draws a position; a position missing from
 * a snapshot in which a higher one was visible therefore belongs to a transaction that was
 * running when that snapshot was taken, so it is among the transactions of this database
 * running right after (read in the same statement). Once none of those is still running, the
 * position is gone for good. (Not the snapshot's `xmax`: that is one past the newest
 * *completed* transaction, and a running one can be above it.)
 */
import type { Db } from './db.js';
import { type EventEntry, toEntry } from './event-log.js';

/**
 * The newest transaction id of this database running when a read was made, or null when none
 * was. Transactions of other databases on the same server are not counted: they cannot write
 * this database's event log.
 */
export type Horizon = string | null;

const YOUNGEST_RUNNING = `(select backend_xid::text from pg_stat_activity
  where datname = current_database() and backend_xid is not null
  order by age(backend_xid) limit 1)`;

export interface FeedPage {
  entries: EventEntry[];
  /** Read after the page's snapshot, in the same statement. */
  horizon: Horizon;
}

/** Up to `limit` events after `afterPos`, in `pos` order, with the horizon. */
export async function readFeedPage(db: Db, afterPos: number, limit: number): Promise<FeedPage> {
  const rows = await db<
    (Record<string, unknown> & { horizon: string | null; pos: number | null })[]
  >`
    select h.horizon, e.pos, e.event_id, e.seq, e.entity_id, e.entity_type, e.type, e.data, e.at
    from (select ${db.unsafe(YOUNGEST_RUNNING)} as horizon) h
    left join lateral (
      select pos, event_id, seq, entity_id, entity_type, type, data, at from events
      where pos > ${afterPos} order by pos limit ${limit}
    ) e on true
    order by e.pos`;
  const horizon = rows[0]?.horizon ?? null;
  const entries = rows.filter((r) => r.pos !== null).map((r) => toEntry(r as never));
  return { entries, horizon };
}

/**
 * The highest position and the horizon: where a feed that starts now begins, once
 * `runningUpTo(horizon)` is false.
 */
export async function feedHead(db: Db): Promise<{ pos: number; horizon: Horizon }> {
  const rows = await db<{ pos: number | null; horizon: string | null }[]>`
    select (select max(pos) from events) as pos, ${db.unsafe(YOUNGEST_RUNNING)} as horizon`;
  return { pos: rows[0]?.pos ?? 0, horizon: rows[0]?.horizon ?? null };
}

/** True while a transaction of this database at or older than the horizon still runs. */
export async function runningUpTo(db: Db, horizon: Horizon): Promise<boolean> {
  if (horizon === null) return false;
  const rows = await db<{ busy: boolean }[]>`
    select exists (
      select 1 from pg_stat_activity
      where datname = current_database() and backend_xid is not null
        and age(backend_xid) >= age(${horizon}::xid)
    ) as busy`;
  return rows[0]?.busy ?? true;
}

/**
 * Events in `(afterPos, upToPos]`, in `pos` order, optionally of one entity: the catch-up of
 * a feed client below a position the feed has already passed (every event there is visible).
 */
export async function readFeedRange(
  db: Db,
  afterPos: number,
  upToPos: number,
  entityId: string | undefined,
  limit: number,
): Promise<EventEntry[]> {
  const rows = entityId
    ? await db`
        select pos, event_id, seq, entity_id, entity_type, type, data, at from events
        where entity_id = ${entityId} and pos > ${afterPos} and pos <= ${upToPos}
        order by seq limit ${limit}`
    : await db`
        select pos, event_id, seq, entity_id, entity_type, type, data, at from events
        where pos > ${afterPos} and pos <= ${upToPos}
        order by pos limit ${limit}`;
  return rows.map((r) => toEntry(r as never));
}
