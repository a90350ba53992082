/**
 * Rule: a task is added to a ticket → the ticket records it (`TASK_ADDED`), in the same
 * transaction, before the task is created. Strict on purpose: a ticket that refuses it (a
 * final one) throws IllegalTransition and the task is never created, so no task exists that
 * its ticket does not know. The ticket counts it; its row beside the ticket (`ticket_tasks`)
 * records its phase, round and type, against which its news is told. Tasks the ticket
 * creates itself (diagnostics) are counted by the transition that asks for them and do not
 * come through here (`spawnDiagnostics` writes their row).
 */
import type { UnitOfWork } from '../actors/host.js';
import { roundOf, type TicketContext } from '../machines/workflow.js';
import { insertTicketTask } from '../persistence/ticket-task-rows.js';

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
  const ticket = await uow.send('ticket', ticketId, { type: 'TASK_ADDED', ...task });
  // The task joined the current round of its phase: its row says which, for its news.
  const context = ticket.snapshot.context as unknown as TicketContext;
  await insertTicketTask(uow.tx, {
    taskId: task.taskId,
    ticketId,
    phase: task.phase,
    round: roundOf(context, task.phase),
    type: task.taskType,
  });
}
