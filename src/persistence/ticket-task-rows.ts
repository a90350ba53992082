/**
 * What a ticket knows of each of its tasks (`ticket_tasks`, migration 0008): one row per task,
 * written in the ticket's transaction, so the ticket's snapshot carries counts only. The row
 * is where late or repeated news is recognised: a task's news is sent to its ticket only when
 * its seq is above the row's, and the row remembers the state the counts hold for the task.
 */
import type { TaskState } from '../machines/task.js';
import type { Db } from './db.js';

export interface TicketTaskRow {
  taskId: string;
  ticketId: string;
  phase: string;
  /** The round of the phase the task was added in (the ticket's `rounds[phase]` then). */
  round: number;
  type: string;
}

/** A new task of the ticket, pending and told nothing yet (seq 0). */
export async function insertTicketTask(db: Db, row: TicketTaskRow): Promise<void> {
  await db`insert into ticket_tasks (task_id, ticket_id, phase, round, type, state, seq)
    values (${row.taskId}, ${row.ticketId}, ${row.phase}, ${row.round}, ${row.type},
      'pending', 0)`;
}

export interface TaskNews {
  phase: string;
  round: number;
  type: string;
  /** The state the ticket's counts held for the task before this news. */
  from: TaskState;
}

/** One task's news, for `recordTasksNews`. */
export interface NewsItem {
  taskId: string;
  state: TaskState;
  seq: number;
}

/**
 * Records that the ticket is told each task is in `state` as of `seq`, only where that is
 * newer than what it was told, in one statement: by task id, the row's previous state (and
 * its phase, round and type); stale news and tasks without a row are absent (nothing is to be
 * sent for them). The rows are locked until commit, in task id order, so two transactions
 * never both take the same news nor wait on each other in a cycle.
 */
export async function recordTasksNews(
  db: Db,
  items: readonly NewsItem[],
): Promise<Map<string, TaskNews>> {
  const found = new Map<string, TaskNews>();
  if (items.length === 0) return found;
  const ids = items.map((i) => i.taskId);
  const rows = await db<
    { task_id: string; phase: string; round: number; type: string; from: TaskState }[]
  >`
    update ticket_tasks t set state = n.state, seq = n.seq
    from (select task_id, state from ticket_tasks where task_id = any(${ids}::text[])
            order by task_id for update) old,
      unnest(${ids}::text[], ${items.map((i) => i.state)}::text[],
        ${items.map((i) => i.seq)}::int[]) as n(task_id, state, seq)
    where t.task_id = old.task_id and n.task_id = t.task_id and t.seq < n.seq
    returning t.task_id, t.phase, t.round, t.type, old.state as "from"`;
  for (const r of rows) {
    found.set(r.task_id, { phase: r.phase, round: r.round, type: r.type, from: r.from });
  }
  return found;
}

/**
 * Records news decided from rows read under the ticket's lock (every writer of a task's row
 * holds its ticket's lock, so the rows are still as read): plain updates, sent with the
 * ticket's transition instead of a round trip before it. Returns how many rows it changed.
 */
export async function writeTasksNews(db: Db, items: readonly NewsItem[]): Promise<number> {
  if (items.length === 0) return 0;
  const rows = await db`
    update ticket_tasks t set state = n.state, seq = n.seq
    from unnest(${items.map((i) => i.taskId)}::text[], ${items.map((i) => i.state)}::text[],
      ${items.map((i) => i.seq)}::int[]) as n(task_id, state, seq)
    where t.task_id = n.task_id and t.seq < n.seq`;
  return rows.count;
}
