/**
 * Rule: a task changed state → its ticket learns the task's state and seq (`TASK_STATE`),
 * read from Postgres at that moment (never a state a message claims). News is sent only when
 * it is newer than what the ticket was told (its `ticket_tasks` row, updated in the same
 * transaction), so redeliveries, reordering and the reconciler never double-count; the
 * ticket's own guards advance or block it, exactly once. Across transactions only: the
 * ticket's row is not locked by the task's transition, which keeps claims and completions
 * from queueing on their ticket.
 */
import type { Applied, UnitOfWork } from '../actors/host.js';
import { NotFound } from '../errors.js';
import type { Db } from '../persistence/db.js';
import {
  type TaskProgress,
  taskProgress,
  tasksProgress,
  ticketIdsOfTasks,
} from '../persistence/reaction-rows.js';
import { recordTaskNews } from '../persistence/ticket-task-rows.js';
import { sendIfAccepted } from './send.js';

export async function forwardTaskState(uow: UnitOfWork, taskId: string): Promise<Applied | null> {
  const task = await taskProgress(uow.tx, taskId);
  if (!task) return null;
  return tell(uow, taskId, task);
}

/**
 * The news of several tasks (normally of one ticket, see `ticketsOfTasks`) in one unit of
 * work: each task's state is read once, however many of its events are listed (the state
 * read now is the latest, so older news of the same task adds nothing), and its ticket is
 * told in the order the tasks are first listed. Same outcome as `forwardTaskState` per task,
 * with one read and, for one ticket, one row lock instead of one per event.
 */
export async function forwardTaskStates(
  uow: UnitOfWork,
  taskIds: readonly string[],
): Promise<Applied[]> {
  const ids = [...new Set(taskIds)];
  const progress = await tasksProgress(uow.tx, ids);
  const out: Applied[] = [];
  for (const id of ids) {
    const task = progress.get(id);
    if (!task) continue;
    const applied = await tell(uow, id, task);
    if (applied) out.push(applied);
  }
  return out;
}

/**
 * The ticket each task reports to, by task id: the key the task_state reaction groups news
 * by. A task never changes ticket, so the answer may be kept.
 */
export function ticketsOfTasks(db: Db, taskIds: string[]): Promise<Map<string, string>> {
  return ticketIdsOfTasks(db, taskIds);
}

async function tell(uow: UnitOfWork, taskId: string, task: TaskProgress): Promise<Applied | null> {
  // The ticket's row first (loaded for update, never from the cache), then the task's row
  // beside it: every writer takes them in that order, so two never wait on each other.
  uow.host.forget('ticket', task.ticketId);
  try {
    await uow.load('ticket', task.ticketId);
  } catch (error) {
    if (error instanceof NotFound) return null;
    throw error;
  }
  const news = await recordTaskNews(uow.tx, taskId, task.state, task.seq);
  // Stale or repeated news: the ticket already counts it.
  if (!news) return null;
  return sendIfAccepted(uow, 'ticket', task.ticketId, {
    type: 'TASK_STATE',
    taskId,
    phase: news.phase,
    round: news.round,
    taskType: news.type,
    from: news.from,
    state: task.state,
    seq: task.seq,
    // A failure's reason is what an onFail send-back hands the phase's next tasks.
    ...(task.state === 'failed' && task.error !== null ? { error: task.error } : {}),
  });
}
