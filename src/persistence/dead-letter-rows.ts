/** Messages a reaction gave up on after `max_deliver` attempts, with their last error. */
import type { Db } from './db.js';

export interface DeadLetter {
  id: number;
  consumer: string;
  eventId: string | null;
  subject: string;
  data: unknown;
  error: string;
  deliveries: number;
  at: string;
}

export interface NewDeadLetter {
  consumer: string;
  eventId: string | null;
  subject: string;
  data: unknown;
  error: string;
  deliveries: number;
}

interface DeadLetterRaw {
  id: number;
  consumer: string;
  event_id: string | null;
  subject: string;
  data: unknown;
  error: string;
  deliveries: number;
  at: Date;
}

/** Records a dead letter; the same (consumer, event) failing again updates its row. */
export async function insertDeadLetter(db: Db, d: NewDeadLetter): Promise<void> {
  await db`insert into dead_letters (consumer, event_id, subject, data, error, deliveries)
    values (${d.consumer}, ${d.eventId}, ${d.subject}, ${db.json((d.data ?? null) as never)},
      ${d.error.slice(0, 4000)}, ${d.deliveries})
    on conflict (consumer, event_id) do update set error = excluded.error,
      deliveries = excluded.deliveries, at = now()`;
}

export async function hasDeadLetter(db: Db, consumer: string, eventId: string): Promise<boolean> {
  const rows = await db`select 1 from dead_letters
    where consumer = ${consumer} and event_id = ${eventId}`;
  return rows.length > 0;
}

export async function listDeadLetters(db: Db, limit = 100): Promise<DeadLetter[]> {
  const rows = await db<DeadLetterRaw[]>`
    select id, consumer, event_id, subject, data, error, deliveries, at from dead_letters
    order by at desc, id desc limit ${limit}`;
  return rows.map((r) => ({
    id: r.id,
    consumer: r.consumer,
    eventId: r.event_id,
    subject: r.subject,
    data: r.data,
    error: r.error,
    deliveries: r.deliveries,
    at: r.at.toISOString(),
  }));
}

export async function countDeadLetters(db: Db): Promise<number> {
  const rows = await db<{ n: number }[]>`select count(*)::int as n from dead_letters`;
  return rows[0]?.n ?? 0;
}
