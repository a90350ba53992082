/**
 * How every task but a diagnostic comes to exist (the API's and a phase's templates): its
 * dependencies checked and locked, its ticket told (`TASK_ADDED`), the task created in
 * `waiting` when a dependency is unfinished, its dependency rows and feedback written, all
 * in the caller's transaction.
 */
import type { Applied, UnitOfWork } from '../actors/host.js';
import { InvalidInput } from '../errors.js';
import type { Json } from '../machines/domain-events.js';
import type { Phase } from '../machines/phases.js';
import type { TaskFeedback } from '../persistence/actor-rows.js';
import { insertDependencies, lockTicketTaskStates } from '../persistence/dependency-rows.js';
import { recordTaskAdded } from './task-added.js';

export interface TaskSpec {
  id: string;
  type: string;
  phase: string;
  executor?: string | undefined;
  worktree?: string | null | undefined;
  payload?: Json | undefined;
  priority?: number | undefined;
  maxAttempts?: number | undefined;
  /** Tasks of the same ticket that must complete first. */
  dependsOn?: readonly string[] | undefined;
  feedback?: TaskFeedback | null | undefined;
}

export async function addTask(uow: UnitOfWork, ticketId: string, spec: TaskSpec): Promise<Applied> {
  const deps = [...new Set(spec.dependsOn ?? [])];
  let waiting = false;
  if (deps.length > 0) {
    const states = await lockTicketTaskStates(uow.tx, ticketId, deps);
    for (const [i, dep] of deps.entries()) {
      const state = states.get(dep);
      if (state === undefined) {
        throw new InvalidInput(`dependsOn: ${dep} is not a task of ticket ${ticketId}`, [
          { path: `dependsOn[${i}]`, message: `${dep} is not a task of this ticket` },
        ]);
      }
      // A cancelled dependency would cancel the task at once: refuse it instead.
      if (state === 'cancelled') {
        throw new InvalidInput(`dependsOn: ${dep} is cancelled`, [
          { path: `dependsOn[${i}]`, message: `${dep} is cancelled` },
        ]);
      }
      if (state !== 'completed') waiting = true;
    }
  }
  await recordTaskAdded(uow, ticketId, { taskId: spec.id, phase: spec.phase, taskType: spec.type });
  const d = uow.host.taskDefaults;
  const applied = await uow.create(
    'task',
    {
      id: spec.id,
      ticketId,
      type: spec.type,
      phase: spec.phase as Phase,
      executor: spec.executor ?? 'external',
      worktree: spec.worktree ?? null,
      payload: spec.payload ?? null,
      priority: spec.priority ?? 0,
      maxAttempts: spec.maxAttempts ?? d.maxAttempts,
      leaseMs: d.leaseMs,
      retryBaseMs: d.retryBaseMs,
      ...(deps.length > 0 ? { dependsOn: deps } : {}),
      ...(waiting ? { waiting: true } : {}),
    },
    { feedback: spec.feedback ?? null },
  );
  await insertDependencies(uow.tx, spec.id, deps);
  return applied;
}
