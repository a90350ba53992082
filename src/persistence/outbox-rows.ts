/**
 * SQL for the outbox relay. The event log is the outbox: an event whose `stream_seq` is null
 * is unpublished, found through a partial index. A relay round runs in one transaction: it
 * locks the events it will publish (`FOR UPDATE SKIP LOCKED`), publishes them, records the
 * stream sequences JetStream acknowledged and commits. The row locks are the claim: another
 * relay skips them, and a relay that dies releases them with its connection, so its events
 * are published again at once (deduplicated by JetStream on the event id). Events the stream
 * turns out to have lost go back to unpublished (guarantee 8).
 */
import type { EntityType } from '../machines/index.js';
import type { Db, Tx } from './db.js';

/** Serialises requeues (rare: the stream lost events), so two cannot deadlock. */
const REQUEUE_LOCK_ID = 7_402_615_002;

export interface OutboxItem {
  pos: number;
  eventId: string;
  entityType: EntityType;
  entityId: string;
  seq: number;
  type: string;
  data: Record<string, unknown>;
  at: Date;
  /** Attempts to publish this event so far, this one included. */
  attempts: number;
  /** Publishes of this event the server refused. */
  rejections: number;
}

interface OutboxRaw {
  pos: number;
  event_id: string;
  entity_type: EntityType;
  entity_id: string;
  seq: number;
  type: string;
  data: Record<string, unknown>;
  at: Date;
  attempts: number;
  rejections: number;
}

/**
 * Locks up to `limit` unpublished events, oldest first, in the caller's transaction, and
 * returns those it may publish, in `pos` order. Per-entity order: an entity's events are
 * returned only as a prefix of its unpublished events, so an event waits while an earlier
 * one of its entity is held by another relay (or another round of this one), or backs off
 * after a failed publish. Events of `exceptEntities` (the round still in flight) are not even
 * locked. Locked events that are not returned stay unpublished; the commit releases them.
 */
export async function claimUnpublished(
  tx: Tx,
  limit: number,
  exceptEntities: readonly string[] = [],
): Promise<OutboxItem[]> {
  const rows = await tx<OutboxRaw[]>`
    with cand as materialized (
      select e.pos, e.event_id, e.entity_type, e.entity_id, e.seq, e.type, e.data, e.at,
        coalesce(r.attempts, 0) + 1 as attempts, coalesce(r.rejections, 0) as rejections
      from events e
      left join relay_retries r on r.pos = e.pos
      where e.stream_seq is null
        and e.entity_id <> all(${exceptEntities as string[]}::text[])
        and (r.retry_at is null or r.retry_at <= now())
      order by e.pos
      limit ${limit}
      for update of e skip locked
    ), w as (
      select c.*,
        min(c.pos) over (partition by c.entity_id) as first,
        max(c.pos) over (partition by c.entity_id) as last,
        count(*) over (partition by c.entity_id) as n
      from cand c
    )
    select w.pos, w.event_id, w.entity_type, w.entity_id, w.seq, w.type, w.data, w.at,
      w.attempts, w.rejections
    from w
    -- The entity's earliest unpublished event is ours, and nothing unpublished of it lies
    -- between ours (held elsewhere, or backing off): then ours are a prefix.
    where not exists (
        select 1 from events p
        where p.entity_id = w.entity_id and p.stream_seq is null and p.pos < w.first)
      and (w.n = 1 or (select count(*) from events p
        where p.entity_id = w.entity_id and p.stream_seq is null
          and p.pos between w.first and w.last) = w.n)
    order by w.pos`;
  return rows.map((r) => ({
    pos: r.pos,
    eventId: r.event_id,
    entityType: r.entity_type,
    entityId: r.entity_id,
    seq: r.seq,
    type: r.type,
    data: r.data,
    at: r.at,
    attempts: r.attempts,
    rejections: r.rejections,
  }));
}

export interface Ack {
  pos: number;
  streamSeq: number;
  /** The event had failed before: its backoff row goes. */
  retried?: boolean;
}

/**
 * Records the acknowledged stream sequences in the round's transaction. Returns how many
 * events were set back to unpublished because another event already held an acknowledged
 * sequence (the stream lost it).
 */
export async function markPublished(tx: Tx, acks: Ack[]): Promise<number> {
  if (acks.length === 0) return 0;
  const retried = acks.filter((a) => a.retried).map((a) => a.pos);
  if (retried.length > 0) {
    await tx`delete from relay_retries where pos = any(${retried}::bigint[])`;
  }
  // A sequence another event already holds is left for the loop below, not written: a
  // unique violation would abort the round's transaction, and every other ack and backoff it
  // records with it. (That needs the stream to have lost events and two relays to record the
  // same reused sequence at once; then the round fails and its events go out again.) No
  // savepoint: it cost the round two more round trips, one after the other.
  const written = await tx<{ pos: number }[]>`
    update events e set stream_seq = a.seq
    from unnest(${acks.map((a) => a.pos)}::bigint[], ${acks.map((a) => a.streamSeq)}::bigint[])
      as a(pos, seq)
    where e.pos = a.pos
      and not exists (select 1 from events x where x.stream_seq = a.seq and x.pos <> a.pos)
    returning e.pos`;
  if (written.length === acks.length) return 0;
  // In sequence order, every ack again (those written above are written again, unchanged): a
  // requeue from a lost sequence sets back the events recorded after it, this round's too.
  let requeued = 0;
  for (const ack of [...acks].sort((a, b) => a.streamSeq - b.streamSeq)) {
    const taken = await tx<{ pos: number }[]>`
      select pos from events where stream_seq = ${ack.streamSeq} and pos <> ${ack.pos}`;
    // Another event holds this sequence: the stream lost it and every event recorded after it.
    if (taken.length > 0) requeued += await requeue(tx, ack.streamSeq - 1, ack.pos);
    await tx`update events set stream_seq = ${ack.streamSeq} where pos = ${ack.pos}`;
  }
  return requeued;
}

/**
 * Sets every event recorded at a stream sequence above `afterStreamSeq` back to unpublished
 * (the relay publishes it again). Set-based and atomic: each lost event is queued once.
 */
export async function requeue(db: Db, afterStreamSeq: number, exceptPos = -1): Promise<number> {
  const run = async (tx: Tx) => {
    await tx`select pg_advisory_xact_lock(${REQUEUE_LOCK_ID})`;
    const rows = await tx<{ pos: number }[]>`
      update events set stream_seq = null
      where stream_seq > ${afterStreamSeq} and pos <> ${exceptPos}
      returning pos`;
    return rows.length;
  };
  // In a transaction already (a relay round), or one of its own.
  if ('savepoint' in db) return run(db);
  return db.begin(run);
}

/**
 * A failed publish of one event: it (and, through the claim's per-entity rule, every later
 * event of its entity) waits `delayMs` before the next attempt; other entities are not held.
 */
export async function backOffEvent(
  db: Db,
  pos: number,
  delayMs: number,
  error: string,
  rejected: boolean,
): Promise<void> {
  const rejections = rejected ? 1 : 0;
  await db`insert into relay_retries as r (pos, attempts, rejections, retry_at, last_error)
    values (${pos}, 1, ${rejections},
      now() + make_interval(secs => ${Math.max(0, delayMs) / 1000}), ${error.slice(0, 2000)})
    on conflict (pos) do update set
      attempts = r.attempts + 1,
      rejections = r.rejections + excluded.rejections,
      retry_at = excluded.retry_at,
      last_error = excluded.last_error`;
}

/** The highest stream sequence any event recorded (0 when none). */
export async function maxStreamSeq(db: Db): Promise<number> {
  const rows = await db<{ max: number | null }[]>`select max(stream_seq) as max from events`;
  return rows[0]?.max ?? 0;
}

export interface OutboxLag {
  /** Events committed but not yet acknowledged by JetStream. */
  count: number;
  /** Age of the oldest such event in ms (0 when none). */
  oldestMs: number;
}

export async function outboxLag(db: Db): Promise<OutboxLag> {
  const rows = await db<{ n: number; age: number | null }[]>`
    select count(*)::int as n,
      (extract(epoch from now() - min(at)) * 1000)::float8 as age
    from events where stream_seq is null`;
  const r = rows[0];
  return { count: r?.n ?? 0, oldestMs: Math.max(0, Math.round(r?.age ?? 0)) };
}
