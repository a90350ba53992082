/**
 * The JSON shapes of CONTRACT section 2, built from an actor's persisted snapshot: what
 * the API returns, what a claim hands a worker, what the dashboard draws.
 */
import type { Json } from '../machines/domain-events.js';
import { attemptsCharged, type TaskContext } from '../machines/task.js';
import type { TicketContext } from '../machines/ticket.js';
import type { TaskFeedback } from '../persistence/actor-rows.js';
import type { PersistedSnapshot } from './decide.js';

export interface TaskView {
  id: string;
  ticketId: string;
  type: string;
  phase: string;
  state: string;
  /** The latest claim's number: 1, 2, 3... one per claim, never reused. */
  attempt: number;
  /** Claims charged against `maxAttempts` since creation or the last REQUEUE. */
  attemptsUsed: number;
  maxAttempts: number;
  executor: string;
  worktree: string | null;
  workerId: string | null;
  leaseExpiresAt: string | null;
  priority: number;
  payload: Json;
  result: Json;
  error: string | null;
  /** The tasks of the same ticket this one waits for (CONTRACT 5); empty: none. */
  dependsOn: string[];
  /** Why a re-entry into the phase created it; null for any other task. */
  feedback: TaskFeedback | null;
  version: number;
  createdAt: string;
  updatedAt: string;
}

/**
 * A task in lists: every field but `payload` and `result`, which may each be megabytes;
 * `GET /tasks/:id` has them.
 */
export type TaskSummary = Omit<TaskView, 'payload' | 'result'>;

export interface TicketView {
  id: string;
  title: string;
  description: string | null;
  state: string;
  phase: string | null;
  blockedReason: string | null;
  diagnostics: number;
  /** The workflow the ticket runs, `NAME@VERSION`. */
  workflow: string;
  version: number;
  createdAt: string;
  updatedAt: string;
}

const iso = (ms: number | null): string | null => (ms === null ? null : new Date(ms).toISOString());

export function taskView(
  snapshot: PersistedSnapshot,
  version: number,
  feedback: TaskFeedback | null,
): TaskView {
  const c = snapshot.context as unknown as TaskContext;
  return {
    id: c.id,
    ticketId: c.ticketId,
    type: c.type,
    phase: c.phase,
    state: String(snapshot.value),
    attempt: c.attempt,
    attemptsUsed: attemptsCharged(c),
    maxAttempts: c.maxAttempts,
    executor: c.executor,
    worktree: c.worktree,
    workerId: c.workerId,
    leaseExpiresAt: iso(c.leaseExpiresAt),
    priority: c.priority,
    payload: c.payload,
    result: c.result,
    error: c.error,
    dependsOn: c.dependsOn ?? [],
    feedback,
    version,
    createdAt: new Date(c.createdAt).toISOString(),
    updatedAt: new Date(c.updatedAt).toISOString(),
  };
}

export function taskSummary(
  snapshot: PersistedSnapshot,
  version: number,
  feedback: TaskFeedback | null,
): TaskSummary {
  const { payload: _payload, result: _result, ...summary } = taskView(snapshot, version, feedback);
  return summary;
}

export function ticketView(
  snapshot: PersistedSnapshot,
  version: number,
  workflow: string,
): TicketView {
  const c = snapshot.context as unknown as TicketContext;
  return {
    id: c.id,
    title: c.title,
    description: c.description,
    state: String(snapshot.value),
    phase: c.phase,
    blockedReason: c.blockedReason,
    diagnostics: c.diagnostics,
    workflow,
    version,
    createdAt: new Date(c.createdAt).toISOString(),
    updatedAt: new Date(c.updatedAt).toISOString(),
  };
}
