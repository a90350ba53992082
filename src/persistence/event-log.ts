/**
 * The per-entity event log, written in the transition's own transaction. It is also the
 * outbox: the relay follows it with a cursor over (writing transaction, pos) (outbox-rows.ts),
 * so a transition writes no row for the relay, nothing is updated when it is published, and
 * no NOTIFY is sent. A NOTIFY in the write transaction would take Postgres's global notify
 * lock at commit and serialise every writer; the relay is woken after commit instead
 * (in-process, or over NATS by a process that runs none: transport/index.ts).
 */
import type { EntityType } from '../machines/index.js';
import type { Db } from './db.js';

export interface EventEntry {
  /** Global position, assigned at insert (used by the stream and the relay). */
  pos: number;
  eventId: string;
  seq: number;
  entityId: string;
  entityType: EntityType;
  type: string;
  data: Record<string, unknown>;
  at: string;
}

export interface NewEvent {
  eventId: string;
  seq: number;
  entityId: string;
  entityType: EntityType;
  type: string;
  data: Record<string, unknown>;
  at: number;
}

interface EventRaw {
  pos: number;
  event_id: string;
  seq: number;
  entity_id: string;
  entity_type: EntityType;
  type: string;
  data: Record<string, unknown>;
  at: Date;
}

export function toEntry(r: EventRaw): EventEntry {
  return {
    pos: r.pos,
    eventId: r.event_id,
    seq: r.seq,
    entityId: r.entity_id,
    entityType: r.entity_type,
    type: r.type,
    data: r.data,
    at: r.at.toISOString(),
  };
}

/**
 * The stored entry of an event just written at position `pos`: what a read of the row would
 * return, built from what was sent instead of parsed back from Postgres.
 */
export function writtenEntry(e: NewEvent, pos: number): EventEntry {
  return {
    pos,
    eventId: e.eventId,
    seq: e.seq,
    entityId: e.entityId,
    entityType: e.entityType,
    type: e.type,
    data: e.data,
    at: new Date(e.at).toISOString(),
  };
}

/**
 * The events of one entity as one JSON parameter, for an insert from `jsonb_to_recordset`
 * in the statement that writes the entity's row (actor-rows.ts): one statement, not two.
 */
export function eventsParam(events: NewEvent[]): string {
  return JSON.stringify(
    events.map((e) => ({ event_id: e.eventId, seq: e.seq, type: e.type, data: e.data })),
  );
}

/** Appends events (unpublished until the relay records their stream sequence); returns the stored entries. */
export async function appendEvents(db: Db, events: NewEvent[]): Promise<EventEntry[]> {
  if (events.length === 0) return [];
  const rows = events.map((e) => ({
    event_id: e.eventId,
    entity_type: e.entityType,
    entity_id: e.entityId,
    seq: e.seq,
    type: e.type,
    data: e.data,
    at: new Date(e.at),
  }));
  const inserted = await db<{ pos: number; seq: number }[]>`
    insert into events ${db(rows as never, 'event_id', 'entity_type', 'entity_id', 'seq', 'type', 'data', 'at')}
    returning pos, seq`;
  const pos = new Map(inserted.map((r) => [r.seq, r.pos]));
  return events.map((e) => writtenEntry(e, pos.get(e.seq) as number)).sort((a, b) => a.seq - b.seq);
}

export async function entityEvents(
  db: Db,
  entityId: string,
  afterSeq = 0,
  limit = 1000,
): Promise<EventEntry[]> {
  const rows = await db<EventRaw[]>`
    select pos, event_id, seq, entity_id, entity_type, type, data, at from events
    where entity_id = ${entityId} and seq > ${afterSeq} order by seq limit ${limit}`;
  return rows.map(toEntry);
}

/** Where a message says its event is: the entity and its seq, with the event's id. */
export interface EventRef {
  eventId: string;
  entityId: string;
  seq: number;
}

/**
 * The stored entry at the place `ref` names (its entity's `seq`), or null when there is none.
 * The caller compares the ids: an entry with another id means the message is not that event.
 * Found by the (entity_id, seq) key the log keeps anyway, so `event_id` needs no index of its
 * own: a random UUID's index took an insert at a random leaf for every event written.
 */
export async function findEvent(db: Db, ref: EventRef): Promise<EventEntry | null> {
  const rows = await db<EventRaw[]>`
    select pos, event_id, seq, entity_id, entity_type, type, data, at from events
    where entity_id = ${ref.entityId} and seq = ${ref.seq}`;
  const r = rows[0];
  return r ? toEntry(r) : null;
}

/**
 * The stored entries at the places `refs` name, as `findEvent` finds each, by the id each ref
 * states (lower case). A place with no event has none.
 */
export async function findEvents(
  db: Db,
  refs: readonly EventRef[],
): Promise<Map<string, EventEntry>> {
  const found = new Map<string, EventEntry>();
  if (refs.length === 0) return found;
  const rows = await db<EventRaw[]>`
    select e.pos, e.event_id, e.seq, e.entity_id, e.entity_type, e.type, e.data, e.at
    from unnest(${refs.map((r) => r.entityId)}::text[], ${refs.map((r) => r.seq)}::int[])
      as c(entity_id, seq)
    join events e on e.entity_id = c.entity_id and e.seq = c.seq`;
  const byPlace = new Map<string, EventRaw>();
  for (const r of rows) byPlace.set(`${r.seq}:${r.entity_id}`, r);
  for (const ref of refs) {
    const r = byPlace.get(`${ref.seq}:${ref.entityId}`);
    if (r) found.set(ref.eventId.toLowerCase(), toEntry(r));
  }
  return found;
}
