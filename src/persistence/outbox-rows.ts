/**
 * SQL for the outbox relay: claim rows under a lease in per-entity order, record the stream
 * sequence JetStream acknowledged, and put events back in the outbox when the stream turns
 * out to have lost them (guarantee 8).
 */
import type { EntityType } from '../machines/index.js';
import { type Db, type Sql, sqlState, UNIQUE_VIOLATION } from './db.js';

/** Serialises claims across processes, so none takes an entity's later row while another holds its earlier one. */
const CLAIM_LOCK_ID = 7_402_615_002;

export interface OutboxItem {
  pos: number;
  eventId: string;
  entityType: EntityType;
  entityId: string;
  seq: number;
  type: string;
  data: Record<string, unknown>;
  at: Date;
  /** Claims of this row so far, this one included. */
  attempts: number;
  /** Publishes of this row the server refused. */
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
 * Leases up to `limit` rows, oldest first. A row is skipped while an earlier row of its
 * entity is leased by someone else, so each entity's events are published by one relay at a
 * time, in `pos` order. Returned in `pos` order.
 */
export async function claimOutbox(sql: Sql, limit: number, leaseMs: number): Promise<OutboxItem[]> {
  const rows = await sql.begin(async (tx) => {
    await tx`select pg_advisory_xact_lock(${CLAIM_LOCK_ID})`;
    return tx<OutboxRaw[]>`
      with picked as (
        select o.pos from outbox o
        where (o.locked_until is null or o.locked_until < now())
          and not exists (
            select 1 from outbox p
            where p.entity_id = o.entity_id and p.pos < o.pos and p.locked_until >= now())
        order by o.pos
        limit ${limit}
        for update skip locked
      ), claimed as (
        update outbox o
        set locked_until = now() + make_interval(secs => ${leaseMs / 1000}),
            attempts = o.attempts + 1
        from picked where o.pos = picked.pos
        returning o.pos, o.attempts, o.rejections
      )
      select e.pos, e.event_id, e.entity_type, e.entity_id, e.seq, e.type, e.data, e.at,
        c.attempts, c.rejections
      from claimed c join events e on e.pos = c.pos
      order by e.pos`;
  });
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
}

/**
 * Records the acknowledged stream sequences and deletes the rows. Returns how many events
 * were put back in the outbox because another event already held an acknowledged
 * sequence (the stream lost it).
 */
export async function markPublished(sql: Sql, acks: Ack[]): Promise<number> {
  if (acks.length === 0) return 0;
  try {
    await sql.begin(async (tx) => {
      await tx`update events e set stream_seq = a.seq
        from unnest(${acks.map((a) => a.pos)}::bigint[], ${acks.map((a) => a.streamSeq)}::bigint[])
          as a(pos, seq)
        where e.pos = a.pos`;
      await tx`delete from outbox where pos = any(${acks.map((a) => a.pos)}::bigint[])`;
    });
    return 0;
  } catch (error) {
    if (sqlState(error) !== UNIQUE_VIOLATION) throw error;
  }
  let requeued = 0;
  for (const ack of acks) requeued += await markOne(sql, ack);
  return requeued;
}

async function markOne(sql: Sql, ack: Ack): Promise<number> {
  return sql.begin(async (tx) => {
    const taken = await tx<{ pos: number }[]>`
      select pos from events where stream_seq = ${ack.streamSeq} and pos <> ${ack.pos}`;
    let requeued = 0;
    // Another event holds this sequence: the stream lost it and every event recorded after it.
    if (taken.length > 0) requeued = await requeue(tx, ack.streamSeq - 1, ack.pos);
    await tx`update events set stream_seq = ${ack.streamSeq} where pos = ${ack.pos}`;
    await tx`delete from outbox where pos = ${ack.pos}`;
    return requeued;
  });
}

/**
 * Puts every event recorded at a stream sequence above `afterStreamSeq` back in the outbox
 * and forgets its sequence. Set-based and atomic: each lost event is queued once.
 */
export async function requeue(db: Db, afterStreamSeq: number, exceptPos = -1): Promise<number> {
  const rows = await db<{ pos: number }[]>`
    with lost as (
      update events set stream_seq = null
      where stream_seq > ${afterStreamSeq} and pos <> ${exceptPos}
      returning pos, entity_id
    )
    insert into outbox (pos, entity_id) select pos, entity_id from lost
    on conflict (pos) do nothing
    returning pos`;
  return rows.length;
}

/** Gives leased rows back after a failed publish, with the error, for the next attempt. */
export async function releaseOutbox(db: Db, positions: number[], error: string): Promise<void> {
  if (positions.length === 0) return;
  await db`update outbox set locked_until = null, last_error = ${error.slice(0, 2000)}
    where pos = any(${positions}::bigint[])`;
}

/**
 * A failed publish of one row: it (and, through the claim's per-entity rule, every later row
 * of its entity) waits `delayMs` before the next attempt; other entities are not held.
 */
export async function backOffOutbox(
  db: Db,
  pos: number,
  delayMs: number,
  error: string,
  rejected: boolean,
): Promise<void> {
  await db`update outbox
    set locked_until = now() + make_interval(secs => ${Math.max(0, delayMs) / 1000}),
      last_error = ${error.slice(0, 2000)},
      rejections = rejections + ${rejected ? 1 : 0}
    where pos = ${pos}`;
}

/** The highest stream sequence any event recorded (0 when none). */
export async function maxStreamSeq(db: Db): Promise<number> {
  const rows = await db<{ max: number | null }[]>`select max(stream_seq) as max from events`;
  return rows[0]?.max ?? 0;
}

export interface OutboxLag {
  /** Rows committed but not yet acknowledged by JetStream. */
  count: number;
  /** Age of the oldest such row in ms (0 when empty). */
  oldestMs: number;
}

export async function outboxLag(db: Db): Promise<OutboxLag> {
  const rows = await db<{ n: number; age: number | null }[]>`
    select count(*)::int as n,
      (extract(epoch from now() - min(created_at)) * 1000)::float8 as age
    from outbox`;
  const r = rows[0];
  return { count: r?.n ?? 0, oldestMs: Math.max(0, Math.round(r?.age ?? 0)) };
}
