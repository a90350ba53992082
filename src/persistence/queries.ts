/**
 * Read models for the API and the dashboard: tickets and tasks from their projected columns
 * (index scans, newest first, keyset cursor on `(created_at, id)`), an entity's event log,
 * and the figures `/metrics` reports. Reads only; every write goes through the actor host.
 *
 * Every answer is bounded: lists and a ticket's tasks are pages of summaries, whose
 * snapshots Postgres strips of a task's `payload` and `result` (and a ticket of its task
 * table) before they leave it; only `getTask` returns a whole task.
 */
import type postgres from 'postgres';
import { allowedEventsOf, type PersistedSnapshot } from '../actors/decide.js';
import {
  type TaskSummary,
  type TaskView,
  type TicketView,
  taskSummary,
  taskView,
  ticketView,
} from '../actors/views.js';
import { InvalidInput, UnknownWorkflow } from '../errors.js';
import { type EntityType, MACHINES, type MachineEntry } from '../machines/index.js';
import { TASK_STATES } from '../machines/task.js';
import { TICKET_STATES } from '../machines/ticket.js';
import { DEFAULT_WORKFLOW_REF, type TaskFeedback } from './actor-rows.js';
import type { Db } from './db.js';
import { countDeadLetters, type DeadLetter, listDeadLetters } from './dead-letter-rows.js';
import { outboxLag as outboxRowsLag } from './outbox-rows.js';
import { readStateCounts, type StateCount } from './state-counts.js';

export interface WithAllowed {
  /** The public events the current state accepts (buttons on the dashboard). */
  allowedEvents: string[];
}

export type TaskDetail = TaskView & WithAllowed;
/** A task as a ticket lists it: its summary and the events its state accepts. */
export type TicketTask = TaskSummary & WithAllowed;
export type TicketDetail = TicketView &
  WithAllowed & {
    /** The ticket's first tasks, oldest first. */
    tasks: TicketTask[];
    /** Cursor for `ticketTasks` (GET /tickets/:id/tasks) to the rest; null when none. */
    tasksNext: string | null;
  };

/** The tasks `GET /tickets/:id` carries; the rest are paged. */
export const TICKET_TASKS_PAGE = 100;

export interface Page<T> {
  items: T[];
  /** Pass as `cursor` for the next page; null on the last one. */
  nextCursor: string | null;
}

export interface ListOptions {
  state?: string | undefined;
  limit: number;
  cursor?: string | undefined;
}

export interface TicketListOptions extends ListOptions {
  /** `NAME` (every version) or `NAME@VERSION`. */
  workflow?: string | undefined;
}

export interface TaskListOptions extends ListOptions {
  ticketId?: string | undefined;
}

/** The event log entry of CONTRACT section 2. */
export interface LogEntry {
  seq: number;
  entityId: string;
  entityType: EntityType;
  type: string;
  data: Record<string, unknown>;
  at: string;
}

export interface OutboxLag {
  /** Events committed but not yet acknowledged by JetStream. */
  pending: number;
  /** Age of the oldest of them, 0 when none. */
  oldestSeconds: number;
}

interface SnapshotRaw {
  snapshot: PersistedSnapshot;
  version: number;
  created_at: Date;
  id: string;
}

interface TaskRaw extends SnapshotRaw {
  feedback: TaskFeedback | null;
}

interface TicketRaw extends SnapshotRaw {
  workflow: string;
}

/**
 * The ticket machine a workflow ref names (the actor host's `machineOf`): a ticket's state
 * only means something to its own workflow's machine.
 */
export type TicketMachineOf = (workflow: string) => Promise<MachineEntry>;

interface Cursor {
  createdAt: Date;
  id: string;
}

export function encodeCursor(c: Cursor): string {
  return Buffer.from(JSON.stringify([c.createdAt.toISOString(), c.id])).toString('base64url');
}

/**
 * A task summary's columns, of the tasks row (or page of rows) named `t`: the snapshot without
 * the payload and the result, which may be large and which a summary does not show.
 */
const SUMMARY_COLUMNS = `t.id, t.snapshot #- '{context,payload}' #- '{context,result}' as snapshot,
  t.version, t.created_at, t.feedback`;

/** What `encodeCursor` can have written: an entity id (no NUL, bounded), a 4-digit year. */
const CURSOR_ID = /^[A-Za-z0-9_.:#-]{1,200}$/;
const CURSOR_AT = /^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$/;

/**
 * Throws `validation_failed` naming `cursor` for anything this module did not write, so no
 * id or date the text and timestamptz parameters would refuse reaches the query.
 */
export function decodeCursor(raw: string): Cursor {
  try {
    const parsed: unknown = JSON.parse(Buffer.from(raw, 'base64url').toString('utf8'));
    if (Array.isArray(parsed) && parsed.length === 2) {
      const [at, id] = parsed as unknown[];
      if (typeof at === 'string' && CURSOR_AT.test(at) && typeof id === 'string') {
        const createdAt = new Date(at);
        const roundTrips = !Number.isNaN(createdAt.getTime()) && createdAt.toISOString() === at;
        if (roundTrips && CURSOR_ID.test(id)) return { createdAt, id };
      }
    }
  } catch {}
  throw new InvalidInput('cursor is not one this API returned', [
    { path: 'cursor', message: 'invalid cursor' },
  ]);
}

const withAllowed = <T extends object>(
  entityType: EntityType,
  s: PersistedSnapshot,
  view: T,
  entry: MachineEntry = MACHINES[entityType],
) => ({
  ...view,
  allowedEvents: allowedEventsOf(entityType, s, entry),
});

/** A ref matches itself; a bare name matches each of its versions. */
function workflowFilter(db: Db, workflow: string | undefined) {
  if (workflow === undefined) return db``;
  if (workflow.includes('@')) return db`and workflow = ${workflow}`;
  return db`and split_part(workflow, '@', 1) = ${workflow}`;
}

function page<R extends SnapshotRaw, T>(rows: R[], limit: number, view: (r: R) => T): Page<T> {
  const more = rows.length > limit;
  const kept = more ? rows.slice(0, limit) : rows;
  const last = kept[kept.length - 1];
  return {
    items: kept.map(view),
    nextCursor: more && last ? encodeCursor({ createdAt: last.created_at, id: last.id }) : null,
  };
}

/**
 * Up to `limit` of a ticket's tasks after `after`, oldest first, their snapshots without
 * `payload` and `result`. The snapshots are trimmed above the limit, for the page's rows
 * only: under a plan that sorts the ticket's remaining tasks (the one Postgres picks while
 * its statistics do not yet know the ticket is large), trimming below it would parse and
 * rewrite every one of those snapshots, some 5 µs each, to keep `limit` of them.
 */
export function ticketTaskPageRows(
  db: Db,
  ticketId: string,
  after: Cursor | null,
  limit: number,
): postgres.PendingQuery<TaskRaw[]> {
  return db<TaskRaw[]>`
    select ${db.unsafe(SUMMARY_COLUMNS)}
    from (
      select id, snapshot, version, created_at, feedback
      from tasks
      where ticket_id = ${ticketId}
        ${after ? db`and (created_at, id) > (${after.createdAt}, ${after.id})` : db``}
      order by created_at, id limit ${limit}) t
    order by created_at, id`;
}

export class Queries {
  constructor(
    private readonly db: Db,
    /** Without it, only tickets of the built-in workflow can be read with their events. */
    private readonly ticketMachineOf?: TicketMachineOf,
  ) {}

  /** The machine of a ticket's workflow; an unregistered one allows nothing (never a 500). */
  private async ticketMachine(workflow: string): Promise<MachineEntry | null> {
    if (workflow === DEFAULT_WORKFLOW_REF) return MACHINES.ticket;
    if (!this.ticketMachineOf) return null;
    try {
      return await this.ticketMachineOf(workflow);
    } catch (error) {
      if (error instanceof UnknownWorkflow) return null;
      throw error;
    }
  }

  /**
   * The ticket with its first TICKET_TASKS_PAGE tasks; `tasksNext` pages the rest. A ticket
   * stored by machine version 1 keeps its whole task list in its snapshot until its next
   * transition upgrades it: the list is left out of the read, as no view shows it.
   */
  async getTicket(id: string): Promise<TicketDetail | null> {
    const db = this.db;
    const rows = await db<TicketRaw[]>`
      select id, snapshot #- '{context,tasks}' as snapshot, version, created_at, workflow
      from tickets where id = ${id}`;
    const r = rows[0];
    if (!r) return null;
    const tasks = await this.ticketTaskPage(id, { limit: TICKET_TASKS_PAGE });
    const entry = await this.ticketMachine(r.workflow);
    const view = ticketView(r.snapshot, r.version, r.workflow);
    return {
      ...(entry ? withAllowed('ticket', r.snapshot, view, entry) : { ...view, allowedEvents: [] }),
      tasks: tasks.items,
      tasksNext: tasks.nextCursor,
    };
  }

  /**
   * A ticket's tasks oldest first, paged on `(created_at, id)`: every task exactly once,
   * in a stable order, however many it has. Null when the ticket does not exist.
   */
  async ticketTasks(
    ticketId: string,
    o: Omit<ListOptions, 'state'>,
  ): Promise<Page<TicketTask> | null> {
    const exists = await this.db`select 1 from tickets where id = ${ticketId}`;
    if (exists.length === 0) return null;
    return this.ticketTaskPage(ticketId, o);
  }

  private async ticketTaskPage(
    ticketId: string,
    o: Omit<ListOptions, 'state'>,
  ): Promise<Page<TicketTask>> {
    const after = o.cursor ? decodeCursor(o.cursor) : null;
    const rows = await ticketTaskPageRows(this.db, ticketId, after, o.limit + 1);
    return page(rows, o.limit, (t) =>
      withAllowed('task', t.snapshot, taskSummary(t.snapshot, t.version, t.feedback)),
    );
  }

  async getTask(id: string): Promise<TaskDetail | null> {
    const rows = await this.db<TaskRaw[]>`
      select id, snapshot, version, created_at, feedback from tasks where id = ${id}`;
    const r = rows[0];
    return r ? withAllowed('task', r.snapshot, taskView(r.snapshot, r.version, r.feedback)) : null;
  }

  async listTickets(o: TicketListOptions): Promise<Page<TicketView>> {
    const db = this.db;
    if (o.state !== undefined && !(await this.isTicketState(o.state))) {
      throw new InvalidInput(`state ${o.state} is not a state of any registered workflow`, [
        { path: 'state', message: 'a state of the default workflow or a registered phase' },
      ]);
    }
    const after = o.cursor ? decodeCursor(o.cursor) : null;
    const rows = await db<TicketRaw[]>`
      select id, snapshot #- '{context,tasks}' as snapshot, version, created_at, workflow
      from tickets
      where true
        ${o.state ? db`and state = ${o.state}` : db``}
        ${workflowFilter(db, o.workflow)}
        ${after ? db`and (created_at, id) < (${after.createdAt}, ${after.id})` : db``}
      order by created_at desc, id desc limit ${o.limit + 1}`;
    return page(rows, o.limit, (r) => ticketView(r.snapshot, r.version, r.workflow));
  }

  /** A state some ticket may be in: a built-in one or a phase of a registered workflow. */
  private async isTicketState(state: string): Promise<boolean> {
    if ((TICKET_STATES as readonly string[]).includes(state)) return true;
    const rows = await this.db`select 1 from workflows
      where definition -> 'phases' @> ${this.db.json([{ name: state }])} limit 1`;
    return rows.length > 0;
  }

  /** Summaries, newest first: a page never carries payloads or results. */
  async listTasks(o: TaskListOptions): Promise<Page<TaskSummary>> {
    const db = this.db;
    const after = o.cursor ? decodeCursor(o.cursor) : null;
    if (!o.state && !o.ticketId) return this.listAllTasks(o.limit, after);
    const rows = await db<TaskRaw[]>`
      select ${db.unsafe(SUMMARY_COLUMNS)}
      from tasks t
      where true
        ${o.state ? db`and state = ${o.state}` : db``}
        ${o.ticketId ? db`and ticket_id = ${o.ticketId}` : db``}
        ${after ? db`and (created_at, id) < (${after.createdAt}, ${after.id})` : db``}
      order by created_at desc, id desc limit ${o.limit + 1}`;
    return page(rows, o.limit, (r) => taskSummary(r.snapshot, r.version, r.feedback));
  }

  /**
   * Every task, newest first: the newest of each state (an index range of
   * `tasks_state_created` each, at most a page long), merged, then the page's rows read.
   * Why: an index on (created_at, id) alone would take an entry at every change of state of
   * every task, a tenth of a drained task's index writes, for this one listing.
   */
  private async listAllTasks(limit: number, after: Cursor | null): Promise<Page<TaskSummary>> {
    const db = this.db;
    const rows = await db<TaskRaw[]>`
      with newest as (
        select k.id, k.created_at
        from unnest(${TASK_STATES as string[]}::text[]) as s(state)
        cross join lateral (
          select id, created_at from tasks
          where state = s.state
            ${after ? db`and (created_at, id) < (${after.createdAt}, ${after.id})` : db``}
          order by created_at desc, id desc limit ${limit + 1}
        ) k
        order by k.created_at desc, k.id desc limit ${limit + 1}
      )
      select ${db.unsafe(SUMMARY_COLUMNS)}
      from newest join tasks t on t.id = newest.id
      order by newest.created_at desc, newest.id desc`;
    return page(rows, limit, (r) => taskSummary(r.snapshot, r.version, r.feedback));
  }

  /** The entity's log in `seq` order after `afterSeq`; null when the entity does not exist. */
  async entityEvents(
    entityType: EntityType,
    id: string,
    afterSeq = 0,
    limit = 1000,
  ): Promise<LogEntry[] | null> {
    const db = this.db;
    const exists =
      entityType === 'ticket'
        ? await db`select 1 from tickets where id = ${id}`
        : await db`select 1 from tasks where id = ${id}`;
    if (exists.length === 0) return null;
    const rows = await db<
      { seq: number; entity_id: string; type: string; data: Record<string, unknown>; at: Date }[]
    >`
      select seq, entity_id, type, data, at from events
      where entity_id = ${id} and entity_type = ${entityType} and seq > ${afterSeq}
      order by seq limit ${limit}`;
    return rows.map((r) => ({
      seq: r.seq,
      entityId: r.entity_id,
      entityType,
      type: r.type,
      data: r.data,
      at: r.at.toISOString(),
    }));
  }

  async outboxLag(): Promise<OutboxLag> {
    const lag = await outboxRowsLag(this.db);
    return { pending: lag.count, oldestSeconds: lag.oldestMs / 1000 };
  }

  /** The most recent dead letters, newest first. */
  deadLetters(limit: number): Promise<DeadLetter[]> {
    return listDeadLetters(this.db, limit);
  }

  deadLetterCount(): Promise<number> {
    return countDeadLetters(this.db);
  }

  /** Tickets and tasks per state, for gauges: exact, and never a scan of either table. */
  stateCounts(): Promise<StateCount[]> {
    return readStateCounts(this.db);
  }
}
