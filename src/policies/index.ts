/**
 * Policies: the one home of the rules between actors ("when this happens to one actor, that
 * happens to another"). Machines decide one actor's transitions; a policy reads what a
 * transition emitted and sends or creates what follows.
 *
 * Each rule runs where it can:
 * - in the transaction of the transition that triggers it, called by the actor host's unit
 *   of work through `afterTransition` (the effect commits with its cause or not at all);
 * - across transactions, for effects that must not lock the other actor in the triggering
 *   transaction (`forwardTaskState`, `cancelOpenTasks`): called by the JetStream reactions
 *   and, for what a lost message left undone, by the reconciler. Those are idempotent: they
 *   read the truth from Postgres and the target machine refuses stale or repeated news.
 *
 * Layering (biome.json `noRestrictedImports`): policies import actors, machines, persistence
 * and errors; the actor host and commands call them; transport calls them and owns no rule
 * and no SQL; http and workers never call them directly. Their SQL lives in
 * `src/persistence/`.
 */
import type { Applied, UnitOfWork } from '../actors/host.js';
import type { EntityType } from '../machines/index.js';
import { prefetchDependents, releaseDependents, releasesDependents } from './dependencies.js';
import {
  cancelLeftPhase,
  createTemplateTasks,
  spawnDiagnostics,
  TICKET_RULE_EVENTS,
} from './phase-entered.js';

export {
  dependentsChecked,
  releaseDependents,
  releasesDependents,
  settleWaitingTask,
} from './dependencies.js';
export { addTask, type TaskSpec } from './new-task.js';
export { sendIfAccepted } from './send.js';
export { type AddedTask, recordTaskAdded } from './task-added.js';
export {
  forwardTaskState,
  forwardTaskStates,
  forwardTicketNews,
  ticketsOfTasks,
} from './task-state.js';
export { cancelOpenTasks } from './ticket-cancelled.js';

/**
 * The reads the same-transaction rules of a write will make, sent by the unit of work right
 * behind the write's statements (before they are answered), so that they share its round
 * trip. `emitted`: the types of the events the write records.
 */
export function readAheadFor(
  uow: UnitOfWork,
  entityType: EntityType,
  id: string,
  emitted: readonly string[],
): void {
  if (entityType === 'task') prefetchDependents(uow, id, emitted);
}

/**
 * Whether the same-transaction rules (`readAheadFor`, `afterTransition`) may send anything
 * after a write of `entityType` that emitted `emitted`. When not, that write can be the last
 * statement of its unit of work. A ticket's rules act only on the events they name
 * (`TICKET_RULE_EVENTS`); a task's only when it settled.
 */
export function rulesFollow(entityType: EntityType, emitted: readonly string[]): boolean {
  if (entityType === 'task') return releasesDependents(emitted);
  return emitted.some((type) => TICKET_RULE_EVENTS.includes(type));
}

/** The same-transaction rules, run by the unit of work after each transition it records. */
export async function afterTransition(uow: UnitOfWork, applied: Applied): Promise<void> {
  if (applied.entityType === 'task') {
    await releaseDependents(uow, applied);
    return;
  }
  await spawnDiagnostics(uow, applied);
  // The old round's tasks go before the new round's are created (a phase sent back to itself).
  await cancelLeftPhase(uow, applied);
  await createTemplateTasks(uow, applied);
}
