/**
 * What the reactions and the reconciler read before they act: Postgres is the truth, a
 * message only says where to look.
 */
import { OPEN_TASK_STATES, type TaskState } from '../machines/task.js';
import type { Db } from './db.js';

export interface TaskProgress {
  ticketId: string;
  state: TaskState;
  seq: number;
  /** The task's error (a failure's reason), null when none. */
  error: string | null;
}

/** What a ticket was last told of a task (its `ticket_tasks` row). */
export interface TaskTold {
  phase: string;
  round: number;
  type: string;
  state: TaskState;
  seq: number;
}

/**
 * Each task's ticket, current state and the seq of its last event, with what its ticket was
 * last told of it (null when the ticket has no row for it), in one read, by task id (a
 * missing task has none).
 */
export async function tasksProgressTold(
  db: Db,
  taskIds: string[],
): Promise<Map<string, TaskProgress & { told: TaskTold | null }>> {
  const found = new Map<string, TaskProgress & { told: TaskTold | null }>();
  if (taskIds.length === 0) return found;
  // The ids name ticket_tasks' rows too: through the join alone, the generic plan a prepared
  // statement moves to counts the array as 10 rows and read a small ticket_tasks whole.
  const rows = await db<
    {
      id: string;
      ticket_id: string;
      state: TaskState;
      seq: number;
      error: string | null;
      phase: string | null;
      round: number | null;
      type: string | null;
      told_state: TaskState | null;
      told_seq: number | null;
    }[]
  >`
    select t.id, t.ticket_id, t.state, t.seq, t.snapshot -> 'context' ->> 'error' as error,
      r.phase, r.round, r.type, r.state as told_state, r.seq as told_seq
    from tasks t left join ticket_tasks r
      on r.task_id = t.id and r.task_id = any(${taskIds}::text[])
    where t.id = any(${taskIds}::text[])`;
  for (const r of rows) {
    const told =
      r.phase === null || r.round === null || r.type === null || r.told_state === null
        ? null
        : {
            phase: r.phase,
            round: r.round,
            type: r.type,
            state: r.told_state,
            seq: r.told_seq ?? 0,
          };
    found.set(r.id, { ticketId: r.ticket_id, state: r.state, seq: r.seq, error: r.error, told });
  }
  return found;
}

/** The ticket of each of these tasks, by task id (a missing task has none). */
export async function ticketIdsOfTasks(db: Db, taskIds: string[]): Promise<Map<string, string>> {
  const found = new Map<string, string>();
  if (taskIds.length === 0) return found;
  const rows = await db<{ id: string; ticket_id: string }[]>`
    select id, ticket_id from tasks where id = any(${taskIds}::text[])`;
  for (const r of rows) found.set(r.id, r.ticket_id);
  return found;
}

/** Open tasks of the ticket, only if the ticket really is cancelled (else none). */
export async function openTasksOfCancelledTicket(db: Db, ticketId: string): Promise<string[]> {
  const rows = await db<{ id: string }[]>`
    select t.id from tasks t join tickets k on k.id = t.ticket_id
    where t.ticket_id = ${ticketId} and k.state = 'cancelled'
      and t.state in ${db(OPEN_TASK_STATES as string[])}
    order by t.id`;
  return rows.map((r) => r.id);
}

/** Ids of tickets not done or cancelled, after `after` in id order (keyset). */
export async function openTicketIdsAfter(db: Db, after: string, limit: number): Promise<string[]> {
  const rows = await db<{ id: string }[]>`
    select id from tickets where state not in ('done', 'cancelled') and id > ${after}
    order by id limit ${limit}`;
  return rows.map((r) => r.id);
}

/**
 * Tasks of these open tickets whose ticket records an older seq and another settlement than
 * the task has (open, or which final state: the policy tells nothing finer), untouched for
 * `graceMs` (a reaction in flight is not drift).
 */
export async function driftedTasks(
  db: Db,
  ticketIds: string[],
  graceMs: number,
): Promise<string[]> {
  const rows = await db<{ task_id: string }[]>`
    select t.id as task_id
    from tickets k join tasks t on t.ticket_id = k.id
      join ticket_tasks r on r.task_id = t.id
    where k.id = any(${ticketIds}::text[])
      and k.state not in ('done', 'cancelled')
      and t.updated_at < now() - make_interval(secs => ${graceMs / 1000})
      and r.seq < t.seq
      and (case when r.state in ${db(OPEN_TASK_STATES as string[])} then 'open' else r.state end)
        is distinct from
        (case when t.state in ${db(OPEN_TASK_STATES as string[])} then 'open' else t.state end)`;
  return rows.map((r) => r.task_id);
}

export interface OpenTask {
  ticketId: string;
  id: string;
  ticketCancelled: boolean;
}

/** Open tasks after the (ticket id, task id) cursor, in that order (keyset). */
export async function openTasksAfter(
  db: Db,
  after: [string, string],
  limit: number,
): Promise<OpenTask[]> {
  const rows = await db<{ ticket_id: string; id: string; cancelled: boolean }[]>`
    select t.ticket_id, t.id, k.state = 'cancelled' as cancelled
    from tasks t join tickets k on k.id = t.ticket_id
    where t.state in ${db(OPEN_TASK_STATES as string[])}
      and (t.ticket_id, t.id) > (${after[0]}, ${after[1]})
    order by t.ticket_id, t.id
    limit ${limit}`;
  return rows.map((r) => ({ ticketId: r.ticket_id, id: r.id, ticketCancelled: r.cancelled }));
}

/** A pending task untouched for `graceMs`, if any. */
export async function stalePendingTask(db: Db, graceMs: number): Promise<string | null> {
  const rows = await db<{ id: string }[]>`
    select id from tasks where state = 'pending'
      and updated_at < now() - make_interval(secs => ${graceMs / 1000})
    limit 1`;
  return rows[0]?.id ?? null;
}
