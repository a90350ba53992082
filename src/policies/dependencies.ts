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
import { type Dependent, waitingDependents } from '../persistence/dependency-rows.js';
import { sendIfAccepted } from './send.js';

/**
 * Dependents read ahead, by unit of work and task id (see `prefetchDependents`), or known to
 * be none (`dependentsChecked`).
 */
const readAhead = new WeakMap<UnitOfWork, Map<string, Promise<Dependent[]>>>();

const settles = (types: readonly string[]) =>
  types.includes('task.completed') || types.includes('task.cancelled');

/** Whether a task's write that emitted `types` has dependents to read and release after it. */
export function releasesDependents(types: readonly string[]): boolean {
  return settles(types);
}

/**
 * Sends the read `releaseDependents` will make right behind the task's writes, before they
 * are answered: Postgres runs it after them (one connection runs its statements in order),
 * so it sees the task settled, and both share one round trip. If a write before it fails,
 * the unit of work fails with that error and this read is never used.
 */
export function prefetchDependents(
  uow: UnitOfWork,
  taskId: string,
  emitted: readonly string[],
): void {
  if (!settles(emitted)) return;
  const read = waitingDependents(uow.tx, taskId);
  read.catch(() => {});
  readAheadOf(uow).set(taskId, read);
}

/**
 * The task's settling write checks in its own statement that no task depends on it
 * (`failIfDependents`; it fails the transaction otherwise): its read is answered already,
 * with none, and this rule releases nothing for it.
 */
export function dependentsChecked(uow: UnitOfWork, taskId: string): void {
  readAheadOf(uow).set(taskId, Promise.resolve([]));
}

function readAheadOf(uow: UnitOfWork): Map<string, Promise<Dependent[]>> {
  let byTask = readAhead.get(uow);
  if (!byTask) {
    byTask = new Map();
    readAhead.set(uow, byTask);
  }
  return byTask;
}

function dependentsOf(uow: UnitOfWork, taskId: string): Promise<Dependent[]> {
  const byTask = readAhead.get(uow);
  const read = byTask?.get(taskId);
  if (!byTask || !read) return waitingDependents(uow.tx, taskId);
  byTask.delete(taskId);
  return read;
}

export async function releaseDependents(uow: UnitOfWork, task: Applied): Promise<void> {
  // The same test as the read-ahead's: a read sent ahead is a read this rule makes.
  const types = task.events.map((e) => e.type);
  if (!settles(types)) return;
  const cancelled = types.includes('task.cancelled');
  for (const dep of await dependentsOf(uow, task.id)) {
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
