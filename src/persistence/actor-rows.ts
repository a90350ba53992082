/**
 * SQL for actor rows. A row holds the persisted XState snapshot plus columns projected from
 * its context in the same statement (state, phase, worktree...), so every API lookup is an
 * index scan and never parses jsonb.
 */
import type { PersistedSnapshot } from '../actors/decide.js';
import type { EntityType } from '../machines/index.js';
import {
  Bindings,
  checkInSql,
  checkInText,
  type Db,
  failedCheck,
  sqlState,
  UNIQUE_VIOLATION,
} from './db.js';
import { type EventEntry, eventsParam, type NewEvent, writtenEntry } from './event-log.js';
import { type TimerRow, timerWriteParts } from './timer-rows.js';

export interface ActorRow {
  entityType: EntityType;
  id: string;
  machineVersion: number;
  snapshot: PersistedSnapshot;
  version: number;
  seq: number;
  /** Tickets: the workflow (`NAME@VERSION`) whose machine the snapshot belongs to. */
  workflow?: string;
  /** Tasks: why the task was created by a re-entry into its phase; fixed at creation. */
  feedback?: TaskFeedback | null;
}

/** What a task created by a ticket's re-entry into its phase carries (CONTRACT 5). */
export interface TaskFeedback {
  fromPhase: string;
  reason: string;
  loop: number;
}

/** The workflow of tickets stored before workflows existed, and of the built-in machine. */
export const DEFAULT_WORKFLOW_REF = 'default@1';

/** An actor row's columns as selected (`select id, machine_version, snapshot, ...`). */
export interface RawRow {
  id: string;
  machine_version: number;
  snapshot: PersistedSnapshot;
  version: number;
  seq: number;
  workflow?: string;
  feedback?: TaskFeedback | null;
}

export function toRow(entityType: EntityType, r: RawRow): ActorRow {
  return {
    ...(r.workflow !== undefined ? { workflow: r.workflow } : {}),
    ...(r.feedback !== undefined ? { feedback: r.feedback } : {}),
    entityType,
    id: r.id,
    machineVersion: r.machine_version,
    snapshot: r.snapshot,
    version: r.version,
    seq: r.seq,
  };
}

export async function loadActorRow(
  db: Db,
  entityType: EntityType,
  id: string,
  options: { forUpdate?: boolean } = {},
): Promise<ActorRow | null> {
  const lock = options.forUpdate ? db`for update` : db``;
  const rows =
    entityType === 'ticket'
      ? await db<RawRow[]>`select id, machine_version, snapshot, version, seq, workflow from tickets
          where id = ${id} ${lock}`
      : await db<RawRow[]>`select id, machine_version, snapshot, version, seq, feedback from tasks
          where id = ${id} ${lock}`;
  const r = rows[0];
  return r ? toRow(entityType, r) : null;
}

/** The projected columns of a ticket or task row, read from the snapshot's context. */
function ticketColumns(s: PersistedSnapshot) {
  const c = s.context as {
    title: string;
    phase: string | null;
    createdAt: number;
    updatedAt: number;
  };
  return { state: s.value, phase: c.phase, title: c.title, updated_at: new Date(c.updatedAt) };
}

function taskColumns(s: PersistedSnapshot) {
  const c = s.context as {
    ticketId: string;
    type: string;
    phase: string;
    executor: string;
    worktree: string | null;
    priority: number;
    attempt: number;
    workerId: string | null;
    updatedAt: number;
  };
  return {
    state: s.value,
    phase: c.phase,
    executor: c.executor,
    worktree: c.worktree,
    priority: c.priority,
    attempt: c.attempt,
    worker_id: c.workerId,
    updated_at: new Date(c.updatedAt),
  };
}

/** Thrown when an insert or update would break a unique constraint (e.g. a held worktree). */
export class UniqueViolation extends Error {
  constructor(
    readonly constraint: string,
    options?: ErrorOptions,
  ) {
    super(`unique constraint ${constraint} violated`, options);
    this.name = 'UniqueViolation';
  }
}

async function guardUnique<T>(run: () => Promise<T>): Promise<T> {
  try {
    return await run();
  } catch (error) {
    if (sqlState(error) === UNIQUE_VIOLATION) {
      const constraint = (error as { constraint_name?: string }).constraint_name ?? 'unknown';
      throw new UniqueViolation(constraint, { cause: error });
    }
    throw error;
  }
}

/**
 * The snapshot as the JSON Postgres stores, serialized once: the same string is the row's
 * size for the actor cache, so a transition never serializes its snapshot twice. It is
 * bound as `::text::jsonb`: bound as jsonb, the driver would serialize the string again.
 */
function snapshotJson(s: PersistedSnapshot): { json: string; bytes: number } {
  const json = JSON.stringify(s);
  return { json, bytes: Buffer.byteLength(json) };
}

/**
 * The machine's deadline (`MachineEntry.deadline`, epoch ms): a number sets it, null clears
 * it, undefined leaves it as it is. Only tasks have one: `tasks.lease_expires_at`.
 */
export type Deadline = number | null | undefined;

/** Inserts the row; returns the byte length of its snapshot JSON. */
export async function insertActorRow(
  db: Db,
  row: ActorRow,
  createdAt: number,
  deadline: Deadline = null,
): Promise<number> {
  const s = row.snapshot;
  const { json, bytes } = snapshotJson(s);
  await guardUnique(async () => {
    if (row.entityType === 'ticket') {
      const p = ticketColumns(s);
      await db`insert into tickets (id, state, phase, title, machine_version, snapshot, version, seq,
        created_at, updated_at, workflow)
        values (${row.id}, ${p.state}, ${p.phase}, ${p.title}, ${row.machineVersion},
          ${json}::text::jsonb, ${row.version}, ${row.seq}, ${new Date(createdAt)}, ${p.updated_at},
          ${row.workflow ?? DEFAULT_WORKFLOW_REF})`;
    } else {
      const p = taskColumns(s);
      const c = s.context as { ticketId: string; type: string };
      await db`insert into tasks (id, ticket_id, type, phase, state, executor, worktree, priority,
        attempt, worker_id, lease_expires_at, machine_version, snapshot, version, seq,
        created_at, updated_at, feedback)
        values (${row.id}, ${c.ticketId}, ${c.type}, ${p.phase}, ${p.state}, ${p.executor},
          ${p.worktree}, ${p.priority}, ${p.attempt}, ${p.worker_id},
          ${deadline == null ? null : new Date(deadline)},
          ${row.machineVersion}, ${json}::text::jsonb, ${row.version}, ${row.seq},
          ${new Date(createdAt)}, ${p.updated_at},
          ${row.feedback ? db.json(row.feedback as never) : null})`;
    }
  });
  return bytes;
}

/** What one write of an actor's row carries besides the row itself. */
export interface RowWrite {
  /** The machine's deadline: set (epoch ms), cleared (null) or left alone (undefined). */
  deadline: Deadline;
  /**
   * Events to append, in seq order (the stored entries come back in it), all of this row's
   * entity and of one moment (the first's `at`).
   */
  events: NewEvent[];
  /** This entity's timers to delete, by key. */
  cancelTimers: string[];
  /** Timers to upsert (new token each). */
  timers: TimerRow[];
  /**
   * A lost compare-and-set fails the statement (and its transaction) in Postgres instead of
   * answering null: for a write the transaction's COMMIT may already follow (`commitAhead`).
   * The failure is `casLost(error)`.
   */
  failIfLost?: boolean;
  /**
   * A task's settling write: fails the statement (and its transaction) in Postgres when some
   * task depends on this one (`tasks.has_dependents`, read on the row version the update
   * writes), so that a write with nothing to release may end its transaction. The failure
   * is `dependentsFound(error)`.
   */
  failIfDependents?: boolean;
}

/** The message of the failure of a write with `failIfLost` whose compare-and-set was lost. */
const CAS_LOST = 'compare-and-set lost: the row is not at the expected version';
/** The message of the failure of a write with `failIfDependents` on a task with dependents. */
const HAS_DEPENDENTS = 'the task has dependents to release';

/** Whether `error` is the failure of a `failIfLost` write whose compare-and-set was lost. */
export function casLost(error: unknown): boolean {
  return failedCheck(error, CAS_LOST);
}

/** Whether `error` is the failure of a `failIfDependents` write on a task with dependents. */
export function dependentsFound(error: unknown): boolean {
  return failedCheck(error, HAS_DEPENDENTS);
}

/**
 * Compare-and-set: writes only if the row is still at `expectedVersion`, and in the same
 * statement appends its events and changes its timers, only if the row was written: one
 * statement per transition, where it used to be one per table. Returns the byte length of
 * the snapshot JSON written and the stored events in seq order, or null when the row had
 * moved on (nothing written).
 */
export async function updateActorRow(
  db: Db,
  row: ActorRow,
  expectedVersion: number,
  write: RowWrite,
): Promise<{ bytes: number; entries: EventEntry[] } | null> {
  const s = row.snapshot;
  const { json, bytes } = snapshotJson(s);
  // Written as text (see `Bindings`): this is the statement of every single-actor transition.
  const b = new Bindings();
  const set =
    row.entityType === 'ticket'
      ? ticketSet(b, row, s, json)
      : taskSet(b, row, s, json, write.deadline);
  const table = row.entityType === 'ticket' ? 'tickets' : 'tasks';
  const where = `id = ${b.add(row.id)} and version = ${b.add(expectedVersion)}`;
  const { events } = write;
  const written = 'exists (select 1 from w)';
  const parts = timerWriteParts(b, row.id, write.cancelTimers, write.timers, written);
  const deps = write.failIfDependents === true && row.entityType === 'task';
  // Each statement is handed to the connection at once (`execute()`), not when awaited: the
  // transaction's COMMIT may be sent right behind it (see `commitAhead` in db.ts).
  const pos = await guardUnique(async () => {
    if (events.length === 0 && parts.length === 0 && !write.failIfLost && !deps) {
      const r = await b.query(db, `update ${table} set ${set} where ${where}`).execute();
      return r.count === 1 ? [] : null;
    }
    if (events.length > 0) {
      const at = new Date((events[0] as NewEvent).at);
      parts.unshift(`e as (
        insert into events (event_id, entity_type, entity_id, seq, type, data, at)
        select x.event_id, ${b.add(row.entityType)}, ${b.add(row.id)}, x.seq, x.type, x.data, ${b.add(at)}
        from jsonb_to_recordset(${b.add(eventsParam(events))}::text::jsonb)
          as x(event_id uuid, seq int, type text, data jsonb)
        where ${written}
        returning pos, seq)`);
    }
    const rest = parts.length > 0 ? `, ${parts.join(', ')}` : '';
    const check =
      (write.failIfLost
        ? `, ${checkInText(b, written, CAS_LOST, '(select count(*) from w)')} as ok`
        : '') +
      (deps
        ? `, ${checkInText(b, 'not exists (select 1 from w where deps)', HAS_DEPENDENTS, '(select count(*) from w)')} as free`
        : '');
    const positions =
      events.length > 0 ? 'array(select pos from e order by seq)' : "'{}'::bigint[]";
    const r = await b
      .query<{ written: number; pos: number[] }[]>(
        db,
        `with w as (update ${table} set ${set} where ${where}
          returning ${deps ? 'has_dependents as deps' : '1'})${rest}
        select (select count(*) from w)::int as written${check}, ${positions} as pos`,
      )
      .execute();
    const out = r[0];
    return out && out.written === 1 ? out.pos : null;
  });
  if (pos === null) return null;
  return { bytes, entries: events.map((e, i) => writtenEntry(e, Number(pos[i]))) };
}

/** One task's compare-and-set in `updateTaskRows`: the row after, with its events. */
export interface TaskRowWrite {
  row: ActorRow;
  expectedVersion: number;
  deadline: Deadline;
  /** In seq order, at least one, all of this task. */
  events: NewEvent[];
  /** As `RowWrite.failIfDependents`, for this task. */
  failIfDependents?: boolean;
}

/**
 * `updateActorRow` for several tasks in ONE statement (their events inserted by the same
 * statement, in the order given): what a transaction that settles or claims several tasks
 * at once sends instead of one statement each. For writes without timers. Returns, in the
 * order of `writes`, each one's snapshot byte length and stored events, or null for a row
 * that had moved on (nothing of it written; the others are). With `failIfLost`, any lost
 * compare-and-set fails the statement instead (`casLost`); a task written with
 * `failIfDependents` that has dependents fails it too (`dependentsFound`).
 */
export async function updateTaskRows(
  db: Db,
  writes: readonly TaskRowWrite[],
  options: { failIfLost?: boolean } = {},
): Promise<({ bytes: number; entries: EventEntry[] } | null)[]> {
  const bytes: number[] = [];
  const rows = writes.map((w, i) => {
    const { json, bytes: size } = snapshotJson(w.row.snapshot);
    bytes.push(size);
    const p = taskColumns(w.row.snapshot);
    const head = JSON.stringify({
      i,
      id: w.row.id,
      expected: w.expectedVersion,
      state: p.state,
      phase: p.phase,
      executor: p.executor,
      worktree: p.worktree,
      priority: p.priority,
      attempt: p.attempt,
      worker_id: p.worker_id,
      set_lease: w.deadline !== undefined,
      lease: w.deadline == null ? null : new Date(w.deadline).toISOString(),
      version: w.row.version,
      seq: w.row.seq,
      updated_at: p.updated_at.toISOString(),
      check_deps: w.failIfDependents === true,
    });
    // The snapshot goes in as the JSON already made of it (its size is the cache's measure).
    return `${head.slice(0, -1)},"snapshot":${json}}`;
  });
  let order = 0;
  const events = writes.flatMap((w) =>
    w.events.map((e) => ({
      n: order++,
      event_id: e.eventId,
      entity_id: e.entityId,
      seq: e.seq,
      type: e.type,
      data: e.data,
      at: new Date(e.at).toISOString(),
    })),
  );
  const n = writes.length;
  const check = options.failIfLost
    ? db`, ${checkInSql(db, db`(select count(*) from w) = ${n}`, CAS_LOST, db`(select count(*) from w)`)} as ok`
    : db``;
  const depsCheck = writes.some((w) => w.failIfDependents)
    ? db`, ${checkInSql(db, db`not exists (select 1 from w where deps)`, HAS_DEPENDENTS, db`(select count(*) from w)`)} as free`
    : db``;
  const result = await guardUnique(() =>
    db<{ written: string[]; pos: [string, number, number][] }[]>`
      with x as (
        select * from jsonb_to_recordset(${`[${rows.join(',')}]`}::text::jsonb) as x(
          i int, id text, expected int, state text, phase text, executor text, worktree text,
          priority int, attempt int, worker_id text, set_lease boolean, lease timestamptz,
          version int, seq int, updated_at timestamptz, check_deps boolean, snapshot jsonb)
      ), w as (
        update tasks t set state = x.state, phase = x.phase, executor = x.executor,
          worktree = x.worktree, priority = x.priority, attempt = x.attempt,
          worker_id = x.worker_id,
          lease_expires_at = case when x.set_lease then x.lease else t.lease_expires_at end,
          snapshot = x.snapshot, version = x.version, seq = x.seq, updated_at = x.updated_at
        -- The ids again as an array: the planner counts a JSON document's rows as 100, and
        -- below a few thousand tasks it then read the whole table for them (3 ms at 2,000).
        from x where t.id = x.id and t.id = any(${writes.map((w) => w.row.id)}::text[])
          and t.version = x.expected
        returning t.id, t.has_dependents and x.check_deps as deps
      ), e as (
        insert into events (event_id, entity_type, entity_id, seq, type, data, at)
        select y.event_id, 'task', y.entity_id, y.seq, y.type, y.data, y.at
        from jsonb_to_recordset(${JSON.stringify(events)}::text::jsonb)
          as y(n int, event_id uuid, entity_id text, seq int, type text, data jsonb, at timestamptz)
        where y.entity_id in (select id from w)
        order by y.n
        returning pos, entity_id, seq
      )
      select array(select id from w) as written${check}${depsCheck},
        coalesce((select json_agg(json_build_array(entity_id, seq, pos)) from e), '[]') as pos`.execute(),
  );
  const out = result[0];
  const written = new Set(out?.written ?? []);
  const pos = new Map((out?.pos ?? []).map(([id, seq, p]) => [`${id}:${seq}`, Number(p)]));
  return writes.map((w, i) =>
    written.has(w.row.id)
      ? {
          bytes: bytes[i] as number,
          entries: w.events.map((e) =>
            writtenEntry(e, pos.get(`${e.entityId}:${e.seq}`) as number),
          ),
        }
      : null,
  );
}

function ticketSet(b: Bindings, row: ActorRow, s: PersistedSnapshot, json: string): string {
  const p = ticketColumns(s);
  return `state = ${b.add(p.state)}, phase = ${b.add(p.phase)},
    machine_version = ${b.add(row.machineVersion)}, snapshot = ${b.add(json)}::text::jsonb,
    version = ${b.add(row.version)}, seq = ${b.add(row.seq)}, updated_at = ${b.add(p.updated_at)}`;
}

function taskSet(
  b: Bindings,
  row: ActorRow,
  s: PersistedSnapshot,
  json: string,
  deadline: Deadline,
): string {
  const p = taskColumns(s);
  const lease =
    deadline === undefined
      ? ''
      : `lease_expires_at = ${b.add(deadline === null ? null : new Date(deadline))},`;
  return `state = ${b.add(p.state)}, phase = ${b.add(p.phase)},
    executor = ${b.add(p.executor)}, worktree = ${b.add(p.worktree)},
    priority = ${b.add(p.priority)}, attempt = ${b.add(p.attempt)},
    worker_id = ${b.add(p.worker_id)}, ${lease}
    snapshot = ${b.add(json)}::text::jsonb, version = ${b.add(row.version)},
    seq = ${b.add(row.seq)}, updated_at = ${b.add(p.updated_at)}`;
}
