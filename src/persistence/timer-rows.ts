/**
 * Durable timers: the machines' `after` delays as rows. Scheduling upserts a row with a new
 * token; cancelling deletes it; firing deletes it only if the token is still the one the
 * poller claimed, so a timer that was replaced or cancelled meanwhile does nothing.
 */
import type { EntityType } from '../machines/index.js';
import type { Bindings, Db } from './db.js';

export const TIMER_CHANNEL = 'orchestrator_timers';

export interface TimerRow {
  entityType: EntityType;
  entityId: string;
  key: string;
  event: { type: string };
  dueAt: number;
  token: string;
}

export async function upsertTimers(db: Db, timers: TimerRow[]): Promise<void> {
  if (timers.length === 0) return;
  const rows = timers.map((t) => ({
    entity_type: t.entityType,
    entity_id: t.entityId,
    key: t.key,
    event: t.event,
    due_at: new Date(t.dueAt),
    token: t.token,
  }));
  await db`insert into timers ${db(rows as never, 'entity_type', 'entity_id', 'key', 'event', 'due_at', 'token')}
    ${db.unsafe(REPLACE_TIMER)}`;
}

/** A timer scheduled again replaces the row: its event, due time and token, unclaimed. */
const REPLACE_TIMER = `on conflict (entity_id, key) do update set event = excluded.event,
    due_at = excluded.due_at, token = excluded.token, locked_until = null`;

/**
 * Tells every process's poller that a timer falls due at `dueAt`. Sent after the commit, in a
 * statement of its own: a NOTIFY inside a write transaction would take Postgres's
 * database-wide notify lock at its commit and serialize every writer behind it.
 */
export async function notifyTimer(db: Db, dueAt: number): Promise<void> {
  await db`select pg_notify(${TIMER_CHANNEL}, ${String(dueAt)})`;
}

/**
 * The timer changes of one transition as parts of the statement that writes the entity's
 * row (actor-rows.ts, written as text with `b`), each run only when `written` (an SQL
 * condition) holds: `cancel` deletes this entity's timers by key, `schedule` upserts timers
 * with new tokens. Empty when there is nothing to change.
 */
export function timerWriteParts(
  b: Bindings,
  entityId: string,
  cancel: string[],
  schedule: TimerRow[],
  written: string,
): string[] {
  const parts: string[] = [];
  if (cancel.length > 0) {
    parts.push(`cancelled as (
      delete from timers where entity_id = ${b.add(entityId)} and key = any(${b.add(cancel)}::text[])
        and ${written})`);
  }
  if (schedule.length > 0) {
    const rows = JSON.stringify(
      schedule.map((t) => ({
        entity_type: t.entityType,
        entity_id: t.entityId,
        key: t.key,
        event: t.event,
        due_at: new Date(t.dueAt).toISOString(),
        token: t.token,
      })),
    );
    parts.push(`scheduled as (
      insert into timers (entity_type, entity_id, key, event, due_at, token)
      select x.entity_type, x.entity_id, x.key, x.event, x.due_at, x.token
      from jsonb_to_recordset(${b.add(rows)}::text::jsonb)
        as x(entity_type text, entity_id text, key text, event jsonb, due_at timestamptz, token uuid)
      where ${written}
      ${REPLACE_TIMER})`);
  }
  return parts;
}

/**
 * Claims up to `limit` due timers for `leaseMs`: rows locked by another poller are skipped,
 * and a claim whose poller died is taken over once its lease passes.
 */
export async function claimDueTimers(db: Db, limit: number, leaseMs: number): Promise<TimerRow[]> {
  const rows = await db<
    {
      entity_type: EntityType;
      entity_id: string;
      key: string;
      event: { type: string };
      due_at: Date;
      token: string;
    }[]
  >`
    update timers t set locked_until = now() + ${leaseMs} * interval '1 millisecond'
    from (
      select entity_id, key from timers
      where due_at <= now() and (locked_until is null or locked_until < now())
      order by due_at limit ${limit} for update skip locked
    ) due
    where t.entity_id = due.entity_id and t.key = due.key
    returning t.entity_type, t.entity_id, t.key, t.event, t.due_at, t.token`;
  return rows.map((r) => ({
    entityType: r.entity_type,
    entityId: r.entity_id,
    key: r.key,
    event: r.event,
    dueAt: r.due_at.getTime(),
    token: r.token,
  }));
}

/**
 * Hands back a claimed timer whose fire failed (a dropped connection, a Postgres restart), to
 * be claimed again after `afterMs` instead of after the whole claim lease. Only the claim
 * with `token` is touched: a timer replaced meanwhile keeps its new row as it is.
 */
export async function releaseTimer(
  db: Db,
  timer: { entityId: string; key: string; token: string },
  afterMs: number,
): Promise<void> {
  await db`update timers set locked_until = now() + ${afterMs} * interval '1 millisecond'
    where entity_id = ${timer.entityId} and key = ${timer.key} and token = ${timer.token}
      and locked_until is not null`;
}

/** Removes a fired timer if it is still the claimed one; false means it changed meanwhile. */
export async function consumeTimer(
  db: Db,
  entityId: string,
  key: string,
  token: string,
): Promise<boolean> {
  const r =
    await db`delete from timers where entity_id = ${entityId} and key = ${key} and token = ${token}`;
  return r.count === 1;
}

/** Milliseconds until the next timer is due (null when none), to size the poller's sleep. */
export async function nextTimerDelay(db: Db): Promise<number | null> {
  const rows = await db<{ ms: number | null }[]>`
    select (extract(epoch from (min(due_at) - now())) * 1000)::float8 as ms from timers
    where locked_until is null or locked_until < now()`;
  const v = rows[0]?.ms;
  return v === null || v === undefined ? null : Math.max(0, v);
}
