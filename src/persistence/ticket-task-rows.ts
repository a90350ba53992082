/**
 * What a ticket knows of each of its tasks (`ticket_tasks`, migration 0008): one row per task,
 * written in the ticket's transaction, so the ticket's snapshot carries counts only. The row
 * is where late or repeated news is recognised: a task's news is sent to its ticket only when
 * its seq is above the row's, and the row remembers the state the counts hold for the task.
 */
import type { TaskState } from '../machines/task.js';
import { checkInSql, type Db, failedCheck } from './db.js';

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

/** One task's news, for `writeTasksNews`. */
export interface NewsItem {
  taskId: string;
  state: TaskState;
  seq: number;
}

/** The message of `writeTasksNews`'s failure when a row was not as read. */
const NEWS_ROWS_CHANGED = 'ticket_tasks rows changed after they were read';

/**
 * Records news decided from rows read under the ticket's lock (every writer of a task's row
 * holds its ticket's lock, so the rows are still as read): plain updates, sent with the
 * ticket's transition instead of a round trip before it. A row that is not as read fails the
 * statement, and with it the transaction, in Postgres (`checkInSql`; `newsRowsChanged`
 * recognises it): the COMMIT may already be on its way behind it. Handed to the connection at
 * once (`execute()`), ahead of anything sent after this call.
 */
export async function writeTasksNews(db: Db, items: readonly NewsItem[]): Promise<void> {
  if (items.length === 0) return;
  const ids = items.map((i) => i.taskId);
  // The ids again as an array, an index condition: an unnest alone counts as 10 rows in a
  // generic plan, and below a few thousand rows that plan read ticket_tasks whole.
  await db`
    with u as (
      update ticket_tasks t set state = n.state, seq = n.seq
      from unnest(${ids}::text[], ${items.map((i) => i.state)}::text[],
        ${items.map((i) => i.seq)}::int[]) as n(task_id, state, seq)
      where t.task_id = n.task_id and t.task_id = any(${ids}::text[])
        and t.seq < n.seq
      returning 1
    )
    select ${checkInSql(db, db`count(*) = ${items.length}`, NEWS_ROWS_CHANGED, db`count(*)`)} as ok
    from u`.execute();
}

/** Whether `error` is `writeTasksNews` finding a row not as read. */
export function newsRowsChanged(error: unknown): boolean {
  return failedCheck(error, NEWS_ROWS_CHANGED);
}
