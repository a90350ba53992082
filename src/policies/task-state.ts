/**
 * Rule: a task changed state → its ticket learns the task's state and seq (`TASK_STATE`),
 * read from Postgres at that moment (never a state a message claims). The ticket refuses
 * news older than what it knows, so redeliveries, reordering and the reconciler never
 * double-count; its own guards advance or block it, exactly once. Across transactions only:
 * the ticket's row is not locked by the task's transition, which keeps claims and
 * completions from queueing on their ticket.
 */
import type { Applied, UnitOfWork } from '../actors/host.js';
import { taskProgress } from '../persistence/reaction-rows.js';
import { sendIfAccepted } from './send.js';

export async function forwardTaskState(uow: UnitOfWork, taskId: string): Promise<Applied | null> {
  const task = await taskProgress(uow.tx, taskId);
  if (!task) return null;
  return sendIfAccepted(uow, 'ticket', task.ticketId, {
    type: 'TASK_STATE',
    taskId,
    state: task.state,
    seq: task.seq,
    // A failure's reason is what an onFail send-back hands the phase's next tasks.
    ...(task.state === 'failed' && task.error !== null ? { error: task.error } : {}),
  });
}
