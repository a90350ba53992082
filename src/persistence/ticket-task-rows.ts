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

/** A task's current state as the news statement read it, and what the ticket knew before. */
export interface RecordedNews extends TaskNews {
  state: TaskState;
  seq: number;
  /** The task's error (a failure's reason), null when none. */
  error: string | null;
}

/**
 * Reads each task's current state and the seq of its last event, and records in the
 * ticket's `ticket_tasks` rows that the ticket is told it, only where that seq is newer than
 * what it was told: one statement, so reading the truth and recording it cost one round
 * trip. By task id, the news to send (the state now, the row's previous state, its phase,
 * round and type); stale news, tasks of another ticket and tasks without a row are absent.
 * The rows are locked until commit, in task id order, so two transactions never both take
 * the same news nor wait on each other in a cycle.
 */
export async function recordCurrentNews(
  db: Db,
  ticketId: string,
  taskIds: readonly string[],
): Promise<Map<string, RecordedNews>> {
  const found = new Map<string, RecordedNews>();
  if (taskIds.length === 0) return found;
  const rows = await db<
    {
      task_id: string;
      state: TaskState;
      seq: number;
      error: string | null;
      phase: string;
      round: number;
      type: string;
      from: TaskState;
    }[]
  >`
    with cur as (
      select id, state, seq, snapshot -> 'context' ->> 'error' as error from tasks
      where id = any(${taskIds as string[]}::text[]) and ticket_id = ${ticketId}
    ), old as (
      select task_id, state from ticket_tasks
      where task_id in (select id from cur) order by task_id for update
    ), told as (
      update ticket_tasks t set state = cur.state, seq = cur.seq
      from old, cur
      where t.task_id = old.task_id and cur.id = t.task_id and t.seq < cur.seq
      returning t.task_id, t.phase, t.round, t.type, old.state as "from"
    )
    select told.task_id, cur.state, cur.seq, cur.error, told.phase, told.round, told.type,
      told."from"
    from told join cur on cur.id = told.task_id`;
  for (const r of rows) {
    found.set(r.task_id, {
      state: r.state,
      seq: r.seq,
      error: r.error,
      phase: r.phase,
      round: r.round,
      type: r.type,
      from: r.from,
    });
  }
  return found;
}
