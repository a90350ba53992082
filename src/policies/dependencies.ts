/**
 * Rules between a task and the tasks that depend on it (CONTRACT 5):
 * - it completed → each waiting dependent whose dependencies are now all completed gets
 *   `DEPS_MET`;
 * - it was cancelled → each waiting dependent is cancelled (and so on down the chain, each
 *   cancellation running this rule again).
 * In the transaction of the dependency's transition (its dependents are few and bounded),
 * and again from the reconciler for what a crash between the two left undone. Idempotent:
 * the task machine refuses a repeated DEPS_MET or CANCEL.
 */
import type { Applied, UnitOfWork } from '../actors/host.js';
import { waitingDependents } from '../persistence/dependency-rows.js';
import { sendIfAccepted } from './send.js';

export async function releaseDependents(uow: UnitOfWork, task: Applied): Promise<void> {
  const completed = task.events.some((e) => e.type === 'task.completed');
  const cancelled = task.events.some((e) => e.type === 'task.cancelled');
  if (!completed && !cancelled) return;
  for (const dep of await waitingDependents(uow.tx, task.id)) {
    if (cancelled) {
      await sendIfAccepted(uow, 'task', dep.id, {
        type: 'CANCEL',
        reason: `dependency ${task.id} was cancelled`,
      });
    } else if (dep.ready) {
      await sendIfAccepted(uow, 'task', dep.id, { type: 'DEPS_MET' });
    }
  }
}

/** The reconciler's half: a waiting task whose dependencies settled, re-decided from Postgres. */
export async function settleWaitingTask(
  uow: UnitOfWork,
  taskId: string,
  depCancelled: string | null,
): Promise<Applied | null> {
  return depCancelled !== null
    ? sendIfAccepted(uow, 'task', taskId, {
        type: 'CANCEL',
        reason: `dependency ${depCancelled} was cancelled`,
      })
    : sendIfAccepted(uow, 'task', taskId, { type: 'DEPS_MET' });
}
