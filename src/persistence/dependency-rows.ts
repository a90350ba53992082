/**
 * Task dependencies (CONTRACT 5): which tasks a task waits for, and the reads the
 * dependency policy and the reconciler act on.
 */
import type { TaskState } from '../machines/task.js';
import type { Db } from './db.js';

/**
 * The states of those of `ids` that are tasks of `ticketId` (others are absent from the
 * map), each row locked (in id order) and marked `has_dependents`: a dependency cannot
 * complete or be cancelled between this read and the commit of the dependent's rows, so its
 * own transaction, which runs the dependency policy after it, sees the dependent; and its
 * settling write, which checks the mark on the row version it updates, knows to look.
 */
export async function lockTicketTaskStates(
  db: Db,
  ticketId: string,
  ids: readonly string[],
): Promise<Map<string, TaskState>> {
  const rows = await db<{ id: string; state: TaskState }[]>`
    with l as (
      select id from tasks
      where ticket_id = ${ticketId} and id = any(${ids as string[]}::text[])
      order by id for no key update)
    update tasks t set has_dependents = true from l where t.id = l.id
    returning t.id, t.state`;
  return new Map(rows.map((r) => [r.id, r.state]));
}

export async function insertDependencies(
  db: Db,
  taskId: string,
  dependsOn: readonly string[],
): Promise<void> {
  if (dependsOn.length === 0) return;
  const rows = dependsOn.map((d) => ({ task_id: taskId, depends_on: d }));
  await db`insert into task_dependencies ${db(rows, 'task_id', 'depends_on')}
    on conflict do nothing`;
}

export interface Dependent {
  id: string;
  state: TaskState;
  /** Every dependency of it is completed. */
  ready: boolean;
}

/** The waiting tasks that depend on `taskId`, and whether all their dependencies completed. */
export async function waitingDependents(db: Db, taskId: string): Promise<Dependent[]> {
  const rows = await db<{ id: string; state: TaskState; ready: boolean }[]>`
    select t.id, t.state,
      not exists (select 1 from task_dependencies o join tasks d on d.id = o.depends_on
        where o.task_id = t.id and d.state <> 'completed') as ready
    from task_dependencies td join tasks t on t.id = td.task_id
    where td.depends_on = ${taskId} and t.state = 'waiting'
    order by t.id`;
  return rows.map((r) => ({ id: r.id, state: r.state, ready: r.ready }));
}

export interface StuckWaiting {
  id: string;
  /** Some dependency ended cancelled: the task is to be cancelled. */
  depCancelled: string | null;
}

/**
 * Waiting tasks untouched for `graceMs` whose dependencies are all completed or one of which
 * is cancelled: what a lost reaction or a crash left undone (the reconciler's sweep).
 */
export async function settledWaitingTasks(
  db: Db,
  graceMs: number,
  limit: number,
): Promise<StuckWaiting[]> {
  const rows = await db<{ id: string; dep_cancelled: string | null }[]>`
    select t.id,
      min(d.id) filter (where d.state = 'cancelled') as dep_cancelled
    from tasks t
      join task_dependencies td on td.task_id = t.id
      join tasks d on d.id = td.depends_on
    where t.state = 'waiting'
      and t.updated_at < now() - make_interval(secs => ${graceMs / 1000})
    group by t.id
    having bool_or(d.state = 'cancelled') or bool_and(d.state = 'completed')
    order by t.id
    limit ${limit}`;
  return rows.map((r) => ({ id: r.id, depCancelled: r.dep_cancelled }));
}

/** Open tasks of one phase of a ticket (a send-back cancels them). */
export async function openTasksOfPhase(
  db: Db,
  ticketId: string,
  phase: string,
  openStates: readonly TaskState[],
): Promise<string[]> {
  const rows = await db<{ id: string }[]>`
    select id from tasks
    where ticket_id = ${ticketId} and phase = ${phase}
      and state in ${db(openStates as string[])}
    order by id`;
  return rows.map((r) => r.id);
}
