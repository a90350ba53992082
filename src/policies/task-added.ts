/**
 * Rule: a task is added to a ticket → the ticket records it (`TASK_ADDED`), in the same
 * transaction, before the task is created. Strict on purpose: a ticket that refuses it (a
 * final one) throws IllegalTransition and the task is never created, so no task exists that
 * its ticket does not know. Tasks the ticket creates itself (diagnostics) are recorded by
 * the transition that asks for them and do not come through here.
 */
import type { UnitOfWork } from '../actors/host.js';

export interface AddedTask {
  taskId: string;
  phase: string;
  taskType: string;
}

export async function recordTaskAdded(
  uow: UnitOfWork,
  ticketId: string,
  task: AddedTask,
): Promise<void> {
  await uow.send('ticket', ticketId, { type: 'TASK_ADDED', ...task });
}
