/**
 * The per-entity event log and the outbox. Both are written in the transition's own
 * transaction; a NOTIFY (delivered at commit) wakes the outbox relay.
 */
import type { EntityType } from '../machines/index.js';
import type { Db } from './db.js';

export const OUTBOX_CHANNEL = 'orchestrator_outbox';

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

/** Appends events and their outbox rows; returns the stored entries. */
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
  const inserted = await db<EventRaw[]>`
    insert into events ${db(rows as never, 'event_id', 'entity_type', 'entity_id', 'seq', 'type', 'data', 'at')}
    returning pos, event_id, seq, entity_id, entity_type, type, data, at`;
  await db`insert into outbox ${db(
    inserted.map((r) => ({ pos: r.pos, entity_id: r.entity_id })) as never,
    'pos',
    'entity_id',
  )}`;
  await db`select pg_notify(${OUTBOX_CHANNEL}, '')`;
  return inserted.map(toEntry).sort((a, b) => a.seq - b.seq);
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

/** The stored entry with this event id, or null (a made-up id). */
export async function findEvent(db: Db, eventId: string): Promise<EventEntry | null> {
  const rows = await db<EventRaw[]>`
    select pos, event_id, seq, entity_id, entity_type, type, data, at from events
    where event_id = ${eventId}`;
  const r = rows[0];
  return r ? toEntry(r) : null;
}

/**
 * The stored entries with these event ids, by id (a made-up id has none). The ids must be
 * UUIDs: they are compared as such.
 */
export async function findEvents(db: Db, eventIds: string[]): Promise<Map<string, EventEntry>> {
  const found = new Map<string, EventEntry>();
  if (eventIds.length === 0) return found;
  const rows = await db<EventRaw[]>`
    select pos, event_id, seq, entity_id, entity_type, type, data, at from events
    where event_id = any(${eventIds}::uuid[])`;
  for (const r of rows) found.set(r.event_id, toEntry(r));
  return found;
}
