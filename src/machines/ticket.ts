/**
 * The ticket machine (CONTRACT section 1): a ticket moves through the phases in order. It
 * learns about its tasks through system events, so its `ADVANCE` guard reads only its own
 * context, and it advances or blocks itself in the same transition that records the task
 * that completed or failed its phase. Pure: ids and times arrive in the events.
 */
import { assign, emit, setup } from 'xstate';
import type { DomainEvent } from './domain-events.js';
import { timeOf } from './domain-events.js';
import { nextPhaseState, PHASES, type Phase } from './phases.js';
import type { TaskState } from './task.js';

export type TicketState = 'backlog' | Phase | 'done' | 'blocked' | 'cancelled';

export const TICKET_STATES: readonly TicketState[] = [
  'backlog',
  ...PHASES,
  'done',
  'blocked',
  'cancelled',
];
export const FINAL_TICKET_STATES: readonly TicketState[] = ['done', 'cancelled'];

/** The task type the stuck check spawns. */
export const DIAGNOSTIC_TASK_TYPE = 'diagnostic';

/** What a ticket knows of one of its tasks: enough for the ADVANCE guard and the stuck check. */
export interface TicketTask {
  phase: Phase;
  type: string;
  state: TaskState;
  /** The task's event-log seq this record reflects; older news is refused. */
  seq: number;
}

export interface TicketInput {
  id: string;
  title: string;
  description?: string | null;
  stuckAfterMs: number;
  diagnosticCooldownMs: number;
  at?: number;
}

export interface TicketContext {
  id: string;
  title: string;
  description: string | null;
  /** The current phase; while blocked, the phase to return to. Null in backlog. */
  phase: Phase | null;
  tasks: Record<string, TicketTask>;
  blockedReason: string | null;
  cancelReason: string | null;
  stuckAfterMs: number;
  diagnosticCooldownMs: number;
  lastDiagnosticAt: number | null;
  diagnostics: number;
  createdAt: number;
  updatedAt: number;
}

export type TicketEvent =
  | { type: 'START'; at?: number }
  | { type: 'ADVANCE'; at?: number }
  | { type: 'BLOCK'; reason: string; at?: number }
  | { type: 'UNBLOCK'; at?: number }
  | { type: 'CANCEL'; reason?: string; at?: number }
  /** System: a task was created for this ticket (same transaction as the task's creation). */
  | { type: 'TASK_ADDED'; taskId: string; phase: Phase; taskType: string; at?: number }
  /** System: a task of this ticket changed state; `seq` orders news that may arrive late. */
  | { type: 'TASK_STATE'; taskId: string; state: TaskState; seq: number; at?: number };

/** Events only the runtime sends; the public events route refuses them. */
export const TICKET_SYSTEM_EVENTS = ['TASK_ADDED', 'TASK_STATE'] as const;

const OPEN_TASK_STATES: readonly TaskState[] = ['pending', 'claimed', 'running', 'retry_wait'];

/**
 * Every task of `phase` is final, none is failed, and at least one non-diagnostic task
 * completed. A diagnostic task must be settled like any other, but cannot finish a phase alone.
 */
export function phaseComplete(tasks: Record<string, TicketTask>, phase: Phase): boolean {
  const inPhase = Object.values(tasks).filter((t) => t.phase === phase);
  if (inPhase.some((t) => t.state !== 'completed' && t.state !== 'cancelled')) return false;
  return inPhase.some((t) => t.state === 'completed' && t.type !== DIAGNOSTIC_TASK_TYPE);
}

function withTaskState(
  ctx: TicketContext,
  event: Extract<TicketEvent, { type: 'TASK_STATE' }>,
): Record<string, TicketTask> {
  const known = ctx.tasks[event.taskId];
  if (!known) return ctx.tasks;
  return { ...ctx.tasks, [event.taskId]: { ...known, state: event.state, seq: event.seq } };
}

export function diagnosticTaskId(ticketId: string, n: number): string {
  return `${ticketId}-diagnostic-${n}`;
}

const phaseStates = Object.fromEntries(PHASES.map((phase) => [phase, phaseState(phase)])) as Record<
  Phase,
  ReturnType<typeof phaseState>
>;

function phaseState(phase: Phase) {
  const next = nextPhaseState(phase);
  return {
    description: `Working on the ${phase} phase; ADVANCE when its tasks allow it.`,
    entry: { type: 'enterPhase' as const, params: { phase } },
    after: {
      stuckCheck: [
        {
          guard: 'mayDiagnose' as const,
          target: phase,
          reenter: true,
          description: 'No task changed state for STUCK_AFTER_MS: spawn one diagnostic task.',
          actions: ['recordDiagnostic' as const, 'emitDiagnosticSpawned' as const],
        },
        {
          target: phase,
          reenter: true,
          description: 'Stuck, but a diagnostic is open or in cooldown: check again later.',
        },
      ],
    },
    on: {
      ADVANCE: {
        guard: 'phaseComplete' as const,
        target: next,
        actions: ['touch' as const, { type: 'emitPhaseChanged' as const, params: { to: next } }],
      },
      TASK_STATE: [
        {
          guard: 'completesPhase' as const,
          target: next,
          description: 'The last open task of the phase completed: advance, exactly once.',
          actions: [
            'recordTaskState' as const,
            { type: 'emitPhaseChanged' as const, params: { to: next } },
          ],
        },
        {
          guard: 'taskFailedForGood' as const,
          target: 'blocked',
          description: 'A task of the ticket failed for good: block.',
          actions: [
            'recordTaskState' as const,
            'blockForFailedTask' as const,
            'emitBlocked' as const,
          ],
        },
        {
          guard: 'newerTaskState' as const,
          target: phase,
          reenter: true,
          description: 'A task made progress: record it; the stuck check starts over.',
          actions: 'recordTaskState' as const,
        },
      ],
      TASK_ADDED: {
        guard: 'unknownTask' as const,
        target: phase,
        reenter: true,
        actions: 'recordTaskAdded' as const,
      },
      BLOCK: {
        target: 'blocked' as const,
        actions: ['recordBlock' as const, 'emitBlocked' as const],
      },
    },
  };
}

export const ticketMachine = setup({
  types: {} as {
    context: TicketContext;
    events: TicketEvent;
    input: TicketInput;
    emitted: DomainEvent;
  },
  delays: {
    stuckCheck: ({ context }) => context.stuckAfterMs,
  },
  guards: {
    phaseComplete: ({ context }) =>
      context.phase !== null && phaseComplete(context.tasks, context.phase),
    completesPhase: ({ context, event }) =>
      event.type === 'TASK_STATE' &&
      isNewer(context, event) &&
      event.state === 'completed' &&
      context.phase !== null &&
      phaseComplete(withTaskState(context, event), context.phase),
    taskFailedForGood: ({ context, event }) =>
      event.type === 'TASK_STATE' && isNewer(context, event) && event.state === 'failed',
    newerTaskState: ({ context, event }) => event.type === 'TASK_STATE' && isNewer(context, event),
    unknownTask: ({ context, event }) =>
      event.type === 'TASK_ADDED' && context.tasks[event.taskId] === undefined,
    mayDiagnose: ({ context, event }) => {
      const open = Object.values(context.tasks).some(
        (t) => t.type === DIAGNOSTIC_TASK_TYPE && OPEN_TASK_STATES.includes(t.state),
      );
      if (open) return false;
      return (
        context.lastDiagnosticAt === null ||
        timeOf(event) - context.lastDiagnosticAt >= context.diagnosticCooldownMs
      );
    },
    blockedInPhase: ({ context }, params: { phase: Phase }) => context.phase === params.phase,
  },
  actions: {
    touch: assign(({ event }) => ({ updatedAt: timeOf(event) })),
    enterPhase: assign((_, params: { phase: Phase }) => ({ phase: params.phase })),
    recordTaskAdded: assign(({ context, event }) => {
      if (event.type !== 'TASK_ADDED') return {};
      const task: TicketTask = {
        phase: event.phase,
        type: event.taskType,
        state: 'pending',
        seq: 0,
      };
      return { tasks: { ...context.tasks, [event.taskId]: task }, updatedAt: timeOf(event) };
    }),
    recordTaskState: assign(({ context, event }) => {
      if (event.type !== 'TASK_STATE') return {};
      return { tasks: withTaskState(context, event), updatedAt: timeOf(event) };
    }),
    recordBlock: assign(({ event }) => ({
      blockedReason: event.type === 'BLOCK' ? event.reason : null,
      updatedAt: timeOf(event),
    })),
    blockForFailedTask: assign(({ event }) => ({
      blockedReason: event.type === 'TASK_STATE' ? `task ${event.taskId} failed` : null,
    })),
    recordUnblock: assign(({ event }) => ({ blockedReason: null, updatedAt: timeOf(event) })),
    recordCancel: assign(({ event }) => ({
      cancelReason: event.type === 'CANCEL' ? (event.reason ?? null) : null,
      updatedAt: timeOf(event),
    })),
    recordDiagnostic: assign(({ context, event }) => {
      const n = context.diagnostics + 1;
      const phase = context.phase ?? 'requirements';
      const task: TicketTask = { phase, type: DIAGNOSTIC_TASK_TYPE, state: 'pending', seq: 0 };
      return {
        diagnostics: n,
        lastDiagnosticAt: timeOf(event),
        tasks: { ...context.tasks, [diagnosticTaskId(context.id, n)]: task },
        updatedAt: timeOf(event),
      };
    }),
    emitCreated: emit(({ context }) => ({
      type: 'ticket.created' as const,
      data: { title: context.title, description: context.description },
    })),
    emitPhaseChanged: emit(({ context }, params: { to: Phase | 'done' }) => ({
      type: params.to === 'done' ? ('ticket.done' as const) : ('ticket.phase_changed' as const),
      data: { from: context.phase ?? 'backlog', to: params.to },
    })),
    emitBlocked: emit(({ context }) => ({
      type: 'ticket.blocked' as const,
      data: { phase: context.phase, reason: context.blockedReason },
    })),
    emitUnblocked: emit(({ context }) => ({
      type: 'ticket.unblocked' as const,
      data: { phase: context.phase },
    })),
    emitCancelled: emit(({ context }) => ({
      type: 'ticket.cancelled' as const,
      data: { phase: context.phase, reason: context.cancelReason },
    })),
    emitDiagnosticSpawned: emit(({ context }) => ({
      type: 'ticket.diagnostic_spawned' as const,
      data: {
        taskId: diagnosticTaskId(context.id, context.diagnostics),
        phase: context.phase,
        n: context.diagnostics,
      },
    })),
  },
}).createMachine({
  id: 'ticket',
  description: 'A unit of delivery moving through requirements, design, implementation, testing.',
  context: ({ input }) => ({
    id: input.id,
    title: input.title,
    description: input.description ?? null,
    phase: null,
    tasks: {},
    blockedReason: null,
    cancelReason: null,
    stuckAfterMs: input.stuckAfterMs,
    diagnosticCooldownMs: input.diagnosticCooldownMs,
    lastDiagnosticAt: null,
    diagnostics: 0,
    createdAt: input.at ?? 0,
    updatedAt: input.at ?? 0,
  }),
  entry: 'emitCreated',
  initial: 'backlog',
  on: {
    CANCEL: { target: '.cancelled', actions: ['recordCancel', 'emitCancelled'] },
  },
  states: {
    backlog: {
      description: 'Created, not started. Tasks may be added for the first phase.',
      on: {
        START: {
          target: 'requirements',
          actions: ['touch', { type: 'emitPhaseChanged', params: { to: 'requirements' } }],
        },
        TASK_ADDED: { guard: 'unknownTask', actions: 'recordTaskAdded' },
        TASK_STATE: { guard: 'newerTaskState', actions: 'recordTaskState' },
      },
    },
    ...phaseStates,
    done: { type: 'final', description: 'Every phase completed.' },
    blocked: {
      description: 'Halted; remembers its phase and returns to it on UNBLOCK.',
      on: {
        UNBLOCK: PHASES.map((phase) => ({
          guard: { type: 'blockedInPhase' as const, params: { phase } },
          target: phase,
          actions: ['recordUnblock' as const, 'emitUnblocked' as const],
        })),
        TASK_ADDED: { guard: 'unknownTask', actions: 'recordTaskAdded' },
        TASK_STATE: { guard: 'newerTaskState', actions: 'recordTaskState' },
      },
    },
    cancelled: { type: 'final', description: 'Cancelled; its open tasks are cancelled too.' },
  },
});

function isNewer(ctx: TicketContext, event: { taskId: string; seq: number }): boolean {
  const known = ctx.tasks[event.taskId];
  return known !== undefined && event.seq > known.seq;
}
