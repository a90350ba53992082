/**
 * The task machine (CONTRACT section 1): one unit of work of a ticket's phase, claimed by
 * one worker at a time under a lease and a fencing token, retried with backoff until its
 * attempts run out. Pure: tokens, times and ids arrive in the events and the input.
 */
import { assign, emit, setup } from 'xstate';
import type { DomainEvent, Json } from './domain-events.js';
import { timeOf } from './domain-events.js';

export type TaskState =
  | 'waiting'
  | 'pending'
  | 'claimed'
  | 'running'
  | 'retry_wait'
  | 'completed'
  | 'failed'
  | 'cancelled';

export const TASK_STATES: readonly TaskState[] = [
  'waiting',
  'pending',
  'claimed',
  'running',
  'retry_wait',
  'completed',
  'failed',
  'cancelled',
];
/** States that hold a worktree: at most one task per worktree may be in one (guarantee 5). */
export const ACTIVE_TASK_STATES: readonly TaskState[] = ['claimed', 'running'];
/** States a task never leaves. `failed` is settled but not final: REQUEUE leaves it. */
export const FINAL_TASK_STATES: readonly TaskState[] = ['completed', 'cancelled'];

/**
 * What a ticket's rules can see of a task: still open (any state from which it may yet
 * complete on its own), or settled, and how. Its guards read nothing finer, so a task moving
 * between open states (claimed, started, retried...) is no news to its ticket.
 */
export type TaskSettlement = 'open' | 'completed' | 'failed' | 'cancelled';

/** States from which a task may yet complete on its own (what a cancelled ticket cancels). */
export const OPEN_TASK_STATES: readonly TaskState[] = [
  'waiting',
  'pending',
  'claimed',
  'running',
  'retry_wait',
];

export function settlementOf(state: TaskState): TaskSettlement {
  return OPEN_TASK_STATES.includes(state) ? 'open' : (state as TaskSettlement);
}

/**
 * The task events of exactly the transitions that change a task's settlement (checked
 * against every transition of the machine by its model-based test): the only task events
 * whose news a ticket needs.
 */
export const TASK_SETTLEMENT_EVENTS = [
  'task.completed',
  'task.failed',
  'task.cancelled',
  'task.requeued',
] as const;

export interface TaskInput {
  id: string;
  ticketId: string;
  type: string;
  phase: string;
  executor?: string;
  worktree?: string | null;
  payload?: Json;
  priority?: number;
  maxAttempts: number;
  leaseMs: number;
  retryBaseMs: number;
  /**
   * Ids of the tasks this one waits for (same ticket). With `waiting`, the task is created
   * in `waiting` and leaves it on DEPS_MET; without, it starts `pending` as always.
   */
  dependsOn?: string[];
  /** Some dependency is not completed yet: start in `waiting` (CONTRACT 5). */
  waiting?: boolean;
  at?: number;
}

export interface TaskContext {
  id: string;
  ticketId: string;
  type: string;
  phase: string;
  executor: string;
  worktree: string | null;
  payload: Json;
  priority: number;
  /** The number of the latest claim: every CLAIM takes the next one, nothing gives one back. */
  attempt: number;
  /**
   * Claims charged against `maxAttempts` since creation or the last REQUEUE: every claim,
   * less the ones given back by RELEASE. Absent in snapshots stored before it existed; their
   * `attempt` was then refunded by RELEASE and reset by REQUEUE, so it equals this count
   * (see `attemptsCharged`).
   */
  attemptsUsed?: number;
  maxAttempts: number;
  /** The live claim's fencing token; null while no claim is live, kept after completion. */
  token: string | null;
  workerId: string | null;
  leaseMs: number;
  leaseExpiresAt: number | null;
  retryBaseMs: number;
  retryDelayMs: number;
  retryAt: number | null;
  result: Json;
  error: string | null;
  createdAt: number;
  updatedAt: number;
  /** The tasks it depends on, as created (absent: none). */
  dependsOn?: string[];
  /** True while it waits in `waiting` for DEPS_MET (absent: it never waited). */
  awaitingDeps?: boolean;
}

/** Events a worker or operator sends; `at` is stamped by the host, `token` checked by it. */
export type TaskEvent =
  | { type: 'CLAIM'; workerId: string; token: string; leaseMs?: number; at?: number }
  | { type: 'START'; token: string; at?: number }
  | { type: 'HEARTBEAT'; token: string; at?: number }
  | { type: 'COMPLETE'; token: string; result?: Json; at?: number }
  | { type: 'FAIL'; token: string; error: string; at?: number }
  | { type: 'LEASE_EXPIRED'; at?: number }
  | { type: 'RETRY'; at?: number }
  | { type: 'CANCEL'; reason?: string; at?: number }
  /** A worker gives the task back unfinished (clean shutdown): pending at once, not charged. */
  | { type: 'RELEASE'; token: string; reason?: string; at?: number }
  | { type: 'REQUEUE'; maxAttempts?: number; at?: number }
  /** System: every dependency is completed (the runtime's DEPS_MET rule). */
  | { type: 'DEPS_MET'; at?: number };

/** Events only the system sends (timers, runtime); the public events route refuses them. */
export const TASK_SYSTEM_EVENTS = ['LEASE_EXPIRED', 'RETRY', 'DEPS_MET'] as const;
/** Events that carry a fencing token; a token that is not the live one is `stale_token`. */
export const TASK_TOKEN_EVENTS = ['START', 'HEARTBEAT', 'COMPLETE', 'FAIL', 'RELEASE'] as const;

const MAX_RETRY_DELAY_MS = 5 * 60_000;

/** Deterministic jitter in [0.5, 1): spreads retries without a random source in the machine. */
function jitterFactor(id: string, attempt: number): number {
  let h = 2166136261;
  for (const ch of `${id}#${attempt}`) h = Math.imul(h ^ ch.charCodeAt(0), 16777619);
  return 0.5 + ((h >>> 0) % 1000) / 2000;
}

/** Claims charged against the budget; a snapshot stored before the count existed derives it. */
export function attemptsCharged(ctx: Pick<TaskContext, 'attempt' | 'attemptsUsed'>): number {
  return ctx.attemptsUsed ?? ctx.attempt;
}

/** Backoff grows with the failures of the current budget (a REQUEUE starts it over). */
export function retryDelay(
  ctx: Pick<TaskContext, 'id' | 'attempt' | 'attemptsUsed' | 'retryBaseMs'>,
): number {
  const charged = attemptsCharged(ctx);
  const exp = Math.min(ctx.retryBaseMs * 2 ** Math.max(0, charged - 1), MAX_RETRY_DELAY_MS);
  return Math.max(1, Math.round(exp * jitterFactor(ctx.id, ctx.attempt)));
}

const leaveClaim = {
  token: null,
  workerId: null,
  leaseExpiresAt: null,
} as const;

export const taskMachine = setup({
  types: {} as {
    context: TaskContext;
    events: TaskEvent;
    input: TaskInput;
    emitted: DomainEvent;
  },
  delays: {
    lease: ({ context }) => context.leaseMs,
    retryBackoff: ({ context }) => context.retryDelayMs,
  },
  guards: {
    awaitingDeps: ({ context }) => context.awaitingDeps === true,
    tokenMatches: ({ context, event }) =>
      'token' in event && context.token !== null && event.token === context.token,
    attemptsLeft: ({ context }) => attemptsCharged(context) < context.maxAttempts,
    tokenMatchesAndAttemptsLeft: ({ context, event }) =>
      'token' in event &&
      context.token !== null &&
      event.token === context.token &&
      attemptsCharged(context) < context.maxAttempts,
    requeueValid: ({ event }) =>
      event.type === 'REQUEUE' &&
      (event.maxAttempts === undefined ||
        (Number.isInteger(event.maxAttempts) && event.maxAttempts >= 1)),
  },
  actions: {
    recordClaim: assign(({ context, event }) => {
      if (event.type !== 'CLAIM') return {};
      const leaseMs = event.leaseMs ?? context.leaseMs;
      return {
        attempt: context.attempt + 1,
        attemptsUsed: attemptsCharged(context) + 1,
        token: event.token,
        workerId: event.workerId,
        leaseMs,
        leaseExpiresAt: timeOf(event) + leaseMs,
        retryAt: null,
        error: null,
        updatedAt: timeOf(event),
      };
    }),
    extendLease: assign(({ context, event }) => ({
      leaseExpiresAt: timeOf(event) + context.leaseMs,
      updatedAt: timeOf(event),
    })),
    touch: assign(({ event }) => ({ updatedAt: timeOf(event) })),
    recordResult: assign(({ event }) => ({
      result: event.type === 'COMPLETE' ? (event.result ?? null) : null,
      leaseExpiresAt: null,
      updatedAt: timeOf(event),
    })),
    recordError: assign(({ event }) => ({
      error: event.type === 'FAIL' ? event.error : 'failed',
      updatedAt: timeOf(event),
    })),
    recordLeaseExpiry: assign(({ context, event }) => ({
      error: `lease expired (attempt ${context.attempt}, worker ${context.workerId})`,
      updatedAt: timeOf(event),
    })),
    scheduleRetry: assign(({ context, event }) => {
      const delay = retryDelay(context);
      return { ...leaveClaim, retryDelayMs: delay, retryAt: timeOf(event) + delay };
    }),
    clearClaim: assign(leaveClaim),
    recordRelease: assign(({ context, event }) => ({
      ...leaveClaim,
      attemptsUsed: Math.max(0, attemptsCharged(context) - 1),
      error: event.type === 'RELEASE' ? (event.reason ?? 'released by its worker') : null,
      updatedAt: timeOf(event),
    })),
    recordDepsMet: assign(({ event }) => ({ awaitingDeps: false, updatedAt: timeOf(event) })),
    recordRetry: assign(({ event }) => ({ retryAt: null, updatedAt: timeOf(event) })),
    recordRequeue: assign(({ context, event }) => ({
      attemptsUsed: 0,
      maxAttempts:
        event.type === 'REQUEUE' ? (event.maxAttempts ?? context.maxAttempts) : context.maxAttempts,
      error: null,
      retryAt: null,
      updatedAt: timeOf(event),
    })),
    recordCancel: assign(({ event }) => ({
      ...leaveClaim,
      retryAt: null,
      error: event.type === 'CANCEL' ? (event.reason ?? null) : null,
      updatedAt: timeOf(event),
    })),
    emitCreated: emit(({ context }) => ({
      type: 'task.created' as const,
      data: {
        ticketId: context.ticketId,
        type: context.type,
        phase: context.phase,
        executor: context.executor,
        worktree: context.worktree,
        priority: context.priority,
        maxAttempts: context.maxAttempts,
      },
    })),
    emitWaiting: emit(({ context }) => ({
      type: 'task.waiting' as const,
      data: {
        ticketId: context.ticketId,
        phase: context.phase,
        dependsOn: context.dependsOn ?? [],
      },
    })),
    emitReady: emit(({ context }) => ({
      type: 'task.ready' as const,
      data: { ticketId: context.ticketId, phase: context.phase },
    })),
    emitClaimed: emit(({ context }) => ({
      type: 'task.claimed' as const,
      data: {
        ticketId: context.ticketId,
        workerId: context.workerId,
        attempt: context.attempt,
        leaseExpiresAt: context.leaseExpiresAt,
      },
    })),
    emitReleased: emit(({ context }) => ({
      type: 'task.released' as const,
      data: { ticketId: context.ticketId, reason: context.error, attempt: context.attempt },
    })),
    emitStarted: emit(({ context }) => ({
      type: 'task.started' as const,
      data: { ticketId: context.ticketId, workerId: context.workerId, attempt: context.attempt },
    })),
    emitCompleted: emit(({ context }) => ({
      type: 'task.completed' as const,
      data: {
        ticketId: context.ticketId,
        phase: context.phase,
        workerId: context.workerId,
        attempt: context.attempt,
        result: context.result,
      },
    })),
    emitLeaseExpired: emit(({ context }) => ({
      type: 'task.lease_expired' as const,
      data: { ticketId: context.ticketId, workerId: context.workerId, attempt: context.attempt },
    })),
    emitRetryScheduled: emit(({ context }) => ({
      type: 'task.retry_scheduled' as const,
      data: {
        ticketId: context.ticketId,
        attempt: context.attempt,
        error: context.error,
        retryAt: context.retryAt,
        delayMs: context.retryDelayMs,
      },
    })),
    emitFailed: emit(({ context }) => ({
      type: 'task.failed' as const,
      data: {
        ticketId: context.ticketId,
        phase: context.phase,
        attempt: context.attempt,
        error: context.error,
      },
    })),
    emitRetried: emit(({ context }) => ({
      type: 'task.retried' as const,
      data: { ticketId: context.ticketId, attempt: context.attempt },
    })),
    emitRequeued: emit(({ context }) => ({
      type: 'task.requeued' as const,
      data: { ticketId: context.ticketId, maxAttempts: context.maxAttempts },
    })),
    emitCancelled: emit(({ context }) => ({
      type: 'task.cancelled' as const,
      data: { ticketId: context.ticketId, phase: context.phase, reason: context.error },
    })),
  },
}).createMachine({
  id: 'task',
  description: 'One unit of work of a ticket phase, held by at most one worker at a time.',
  context: ({ input }) => ({
    id: input.id,
    ticketId: input.ticketId,
    type: input.type,
    phase: input.phase,
    executor: input.executor ?? 'external',
    worktree: input.worktree ?? null,
    payload: input.payload ?? null,
    priority: input.priority ?? 0,
    attempt: 0,
    attemptsUsed: 0,
    maxAttempts: input.maxAttempts,
    token: null,
    workerId: null,
    leaseMs: input.leaseMs,
    leaseExpiresAt: null,
    retryBaseMs: input.retryBaseMs,
    retryDelayMs: 0,
    retryAt: null,
    result: null,
    error: null,
    createdAt: input.at ?? 0,
    updatedAt: input.at ?? 0,
    // Only present on tasks with dependencies, so other snapshots stay as they were.
    ...(input.dependsOn?.length ? { dependsOn: [...input.dependsOn] } : {}),
    ...(input.waiting ? { awaitingDeps: true } : {}),
  }),
  entry: 'emitCreated',
  initial: 'pending',
  states: {
    waiting: {
      description: 'Created with a dependency not yet completed; not claimable.',
      on: {
        DEPS_MET: {
          target: 'pending',
          description: 'Every dependency completed: claimable now.',
          actions: ['recordDepsMet', 'emitReady'],
        },
        CANCEL: { target: 'cancelled', actions: ['recordCancel', 'emitCancelled'] },
      },
    },
    pending: {
      description: 'Waiting for a worker to claim it.',
      // A task created with unfinished dependencies goes on to `waiting` at once (XState
      // has no input-dependent initial state); DEPS_MET clears the flag before coming back.
      always: {
        guard: 'awaitingDeps',
        target: 'waiting',
        actions: 'emitWaiting',
      },
      on: {
        CLAIM: {
          target: 'claimed',
          description:
            'A worker takes the task: the next attempt number (charged against maxAttempts), a new fencing token, a lease.',
          actions: ['recordClaim', 'emitClaimed'],
        },
        CANCEL: { target: 'cancelled', actions: ['recordCancel', 'emitCancelled'] },
      },
    },
    claimed: {
      description: 'Held by a worker that has not started yet; the lease runs.',
      after: {
        lease: [
          {
            guard: 'attemptsLeft',
            target: 'retry_wait',
            description: 'No heartbeat within the lease; attempts remain.',
            actions: [
              'recordLeaseExpiry',
              'emitLeaseExpired',
              'scheduleRetry',
              'emitRetryScheduled',
            ],
          },
          {
            target: 'failed',
            description: 'No heartbeat within the lease; no attempts remain.',
            actions: ['recordLeaseExpiry', 'emitLeaseExpired', 'clearClaim', 'emitFailed'],
          },
        ],
      },
      on: {
        START: { guard: 'tokenMatches', target: 'running', actions: ['touch', 'emitStarted'] },
        HEARTBEAT: {
          guard: 'tokenMatches',
          target: 'claimed',
          reenter: true,
          description: 'Extends the lease: re-entering restarts the lease timer.',
          actions: 'extendLease',
        },
        LEASE_EXPIRED: [
          {
            guard: 'attemptsLeft',
            target: 'retry_wait',
            actions: [
              'recordLeaseExpiry',
              'emitLeaseExpired',
              'scheduleRetry',
              'emitRetryScheduled',
            ],
          },
          {
            target: 'failed',
            actions: ['recordLeaseExpiry', 'emitLeaseExpired', 'clearClaim', 'emitFailed'],
          },
        ],
        RELEASE: {
          guard: 'tokenMatches',
          target: 'pending',
          description:
            'The worker gives the task back unfinished (shutdown): claimable at once, the claim not charged.',
          actions: ['recordRelease', 'emitReleased'],
        },
        CANCEL: { target: 'cancelled', actions: ['recordCancel', 'emitCancelled'] },
      },
    },
    running: {
      description: 'Executing; the worker heartbeats to keep its lease.',
      after: {
        lease: [
          {
            guard: 'attemptsLeft',
            target: 'retry_wait',
            description: 'No heartbeat within the lease; attempts remain.',
            actions: [
              'recordLeaseExpiry',
              'emitLeaseExpired',
              'scheduleRetry',
              'emitRetryScheduled',
            ],
          },
          {
            target: 'failed',
            description: 'No heartbeat within the lease; no attempts remain.',
            actions: ['recordLeaseExpiry', 'emitLeaseExpired', 'clearClaim', 'emitFailed'],
          },
        ],
      },
      on: {
        HEARTBEAT: {
          guard: 'tokenMatches',
          target: 'running',
          reenter: true,
          description: 'Extends the lease: re-entering restarts the lease timer.',
          actions: 'extendLease',
        },
        COMPLETE: {
          guard: 'tokenMatches',
          target: 'completed',
          actions: ['recordResult', 'emitCompleted'],
        },
        FAIL: [
          {
            guard: 'tokenMatchesAndAttemptsLeft',
            target: 'retry_wait',
            actions: ['recordError', 'scheduleRetry', 'emitRetryScheduled'],
          },
          {
            guard: 'tokenMatches',
            target: 'failed',
            actions: ['recordError', 'clearClaim', 'emitFailed'],
          },
        ],
        LEASE_EXPIRED: [
          {
            guard: 'attemptsLeft',
            target: 'retry_wait',
            actions: [
              'recordLeaseExpiry',
              'emitLeaseExpired',
              'scheduleRetry',
              'emitRetryScheduled',
            ],
          },
          {
            target: 'failed',
            actions: ['recordLeaseExpiry', 'emitLeaseExpired', 'clearClaim', 'emitFailed'],
          },
        ],
        RELEASE: {
          guard: 'tokenMatches',
          target: 'pending',
          description:
            'The worker gives the task back unfinished (shutdown): claimable at once, the claim not charged.',
          actions: ['recordRelease', 'emitReleased'],
        },
        CANCEL: { target: 'cancelled', actions: ['recordCancel', 'emitCancelled'] },
      },
    },
    retry_wait: {
      description: 'Backing off before the next attempt.',
      after: {
        retryBackoff: { target: 'pending', actions: ['recordRetry', 'emitRetried'] },
      },
      on: {
        RETRY: { target: 'pending', actions: ['recordRetry', 'emitRetried'] },
        CANCEL: { target: 'cancelled', actions: ['recordCancel', 'emitCancelled'] },
      },
    },
    completed: { type: 'final', description: 'Done; completed exactly once.' },
    failed: {
      description: 'Out of attempts. Only an operator REQUEUE leaves it.',
      on: {
        REQUEUE: {
          guard: 'requeueValid',
          target: 'pending',
          description: 'A fresh budget of maxAttempts; attempt numbers keep counting up.',
          actions: ['recordRequeue', 'emitRequeued'],
        },
      },
    },
    cancelled: { type: 'final', description: 'Cancelled by an operator or with its ticket.' },
  },
});
