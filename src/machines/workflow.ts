/**
 * The ticket-machine factory (CONTRACT sections 1 and 5): a workflow definition in, an XState
 * machine out. The built-in `ticketMachine` is `compileWorkflow(DEFAULT_WORKFLOW, 1).machine`.
 * Pure: ids and times arrive in the events; nothing here reads a clock or does I/O.
 *
 * Every compiled machine has id `ticket`, the states `backlog`, one per phase, `blocked`,
 * `done` and `cancelled`, and the same event vocabulary (section 1's, plus APPROVE, REJECT
 * and SEND_BACK). A ticket learns about its tasks through system events (TASK_ADDED,
 * TASK_STATE), so its guards read only its own context, and it advances, sends itself back or
 * blocks in the same transition that records the task news that decides it.
 *
 * The automatic advance is an eventless (`always`) transition of every work phase, guarded by
 * `phaseComplete`: whatever made the phase complete (the last task's news, START or UNBLOCK
 * into a phase whose tasks finished meanwhile, an entry into a phase whose tasks are done),
 * the ticket leaves it in the same step, so a complete phase is never a resting state and
 * the advance happens exactly once (the host's compare-and-set). A phase with templates is
 * entered with `templatesPending` set, cleared by the first TASK_ADDED of the phase (the
 * templates are created after the entering transition, in its transaction): until then the
 * tasks of the phase that already exist cannot complete it. A manual ADVANCE keeps the same
 * guard, so it is accepted only when the phase is complete, which no state at rest is: it is
 * refused in practice (CONTRACT section 1's 409 `illegal_transition`).
 *
 * Emitted domain events and what the runtime must do for each, in the transaction that
 * applies the transition:
 * - `ticket.phase_changed {from, to}` (START, ADVANCE, the automatic advance, APPROVE, a
 *   gate timeout with onTimeout `approve`): the ticket entered phase `to` going forward. One
 *   event may carry several (the automatic advance runs after the event's own transition).
 *   Create one task per template of `to` (see `phaseEntry`, `templatesOf`), no feedback.
 * - `ticket.done {from, to: 'done'}`: the last phase completed. Nothing to create.
 * - `ticket.sent_back {from, to, reason, loop, cause, taskId?}`: the ticket went back from
 *   `from` to the earlier (or same) phase `to`. `cause` is `operator` (SEND_BACK), `reject`
 *   (REJECT or a timeout with onTimeout `reject`, after `ticket.rejected`) or `task_failed`
 *   (onFail; `taskId` names the failed task, `reason` is its error). `loop` counts the times
 *   this ticket was sent back into `to`, this one included (1, 2, ...). The runtime must
 *   cancel every open task (waiting, pending, claimed, running, retry_wait) of phase `from`,
 *   and create one task per template of `to` carrying `feedback {fromPhase: from, reason,
 *   loop}`. The machine has already started a new round of every phase the send-back
 *   crossed (`rounds`), so the phase's new round is judged on its new tasks only.
 * - `ticket.approved {phase, by, comment}`: a gate was approved (by `timeout` on an
 *   onTimeout `approve`); followed by `ticket.phase_changed` or `ticket.done`. Log only.
 * - `ticket.rejected {phase, by, reason}`: a gate was rejected; followed by
 *   `ticket.sent_back` (within onReject's maxLoops) or `ticket.blocked`. Log only.
 * - `ticket.blocked {phase, reason}`, `ticket.unblocked {phase}`: as before. An unblock into a
 *   phase that is already complete is followed at once by the automatic advance.
 * - `ticket.cancelled {phase, reason}`: cancel every non-final task of the ticket.
 * - `ticket.diagnostic_spawned {taskId, phase, n}`: create the diagnostic task.
 *
 * A gate's `approval.timeoutMs` is the named delay `approvalTimeout`; like `stuckCheck`, the
 * runtime keeps it as a durable timer row (`xstate.after.approvalTimeout.ticket.<phase>`).
 */
import { assign, emit, setup } from 'xstate';
import type { DomainEvent } from './domain-events.js';
import { timeOf } from './domain-events.js';
import { OPEN_TASK_STATES, type TaskState } from './task.js';
import {
  isGate,
  type LoopRule,
  type PhaseDefinition,
  type TaskTemplate,
  type WorkflowDefinition,
} from './workflow-definition.js';

/** The task type the stuck check spawns. */
export const DIAGNOSTIC_TASK_TYPE = 'diagnostic';

/** Whether a task is a diagnostic (the stuck check's) or work that can finish a phase. */
export type TaskKind = 'work' | 'diagnostic';
/** Tasks by state; a state with none is absent, so equal counts are equal JSON. */
export type TaskCounts = Partial<Record<TaskState, number>>;
/** The current round's tasks of one phase, by kind and state. */
export type PhaseCounts = Partial<Record<TaskKind, TaskCounts>>;

/**
 * A version-1 ticket's record of one task (the whole list lived in its snapshot). Read only
 * by `upgradeTicketContext`; the runtime now keeps one row per task beside the ticket.
 */
export interface LegacyTicketTask {
  phase: string;
  type: string;
  state: TaskState;
  seq: number;
  superseded?: true;
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
  phase: string | null;
  /**
   * The current round's tasks of each phase, by kind and state: what the automatic advance
   * and the failure rules read. The snapshot stays this size however many tasks the ticket
   * has; each task's own state and seq live in a row beside the ticket (the runtime's).
   */
  counts: Record<string, PhaseCounts>;
  /**
   * The current round of each phase (absent: 0): a send-back starts a new round of every
   * phase it crosses, and news of a task of an older round changes no count.
   */
  rounds?: Record<string, number>;
  /** Diagnostic tasks not yet final, of any phase and round: the stuck check waits for them. */
  openDiagnostics: number;
  blockedReason: string | null;
  cancelReason: string | null;
  stuckAfterMs: number;
  diagnosticCooldownMs: number;
  lastDiagnosticAt: number | null;
  diagnostics: number;
  createdAt: number;
  updatedAt: number;
  /** Times each phase's onFail/onReject rule sent the ticket back (absent: none yet). */
  loops?: Record<string, number>;
  /** Times the ticket was sent back into each phase, by any cause (absent: none yet). */
  returns?: Record<string, number>;
  /**
   * Set by the transition entering a phase that has templates, cleared by the first
   * TASK_ADDED of that phase: the phase cannot complete before its templates exist.
   */
  templatesPending?: true;
}

export type TicketEvent =
  | { type: 'START'; at?: number }
  | { type: 'ADVANCE'; at?: number }
  | { type: 'BLOCK'; reason: string; at?: number }
  | { type: 'UNBLOCK'; at?: number }
  | { type: 'CANCEL'; reason?: string; at?: number }
  | { type: 'APPROVE'; by: string; comment?: string; at?: number }
  | { type: 'REJECT'; by: string; reason: string; at?: number }
  | { type: 'SEND_BACK'; toPhase: string; reason: string; at?: number }
  /**
   * System: a task was created for this ticket (same transaction as the task's creation). It
   * joins the current round of its phase, pending.
   */
  | { type: 'TASK_ADDED'; taskId: string; phase: string; taskType: string; at?: number }
  /**
   * System: a task of this ticket went from `from` (the state the ticket last counted it in)
   * to `state`. The runtime sends it only for news newer than what it recorded of the task
   * (`seq`) that changes the task's settlement (open, completed, failed, cancelled: all the
   * guards read), exactly once per change, with the phase, round and type it recorded: the
   * machine trusts it and only counts. So an open task stays counted under the open state it
   * was last told in (pending, mostly) while it is claimed and run.
   */
  | {
      type: 'TASK_STATE';
      taskId: string;
      phase: string;
      round: number;
      taskType: string;
      from: TaskState;
      state: TaskState;
      seq: number;
      /** The task's error when it failed: becomes the feedback of an onFail send-back. */
      error?: string;
      at?: number;
    };

/** Events only the runtime sends; the public events route refuses them. */
export const TICKET_SYSTEM_EVENTS = ['TASK_ADDED', 'TASK_STATE'] as const;
/** Every public ticket event type, for every workflow. */
export const TICKET_PUBLIC_EVENTS = [
  'START',
  'ADVANCE',
  'BLOCK',
  'UNBLOCK',
  'CANCEL',
  'APPROVE',
  'REJECT',
  'SEND_BACK',
] as const;
/** The states every compiled ticket machine has besides its phases. */
export const FIXED_TICKET_STATES = ['backlog', 'done', 'blocked', 'cancelled'] as const;
export const FINAL_TICKET_STATE_NAMES = ['done', 'cancelled'] as const;
/** The name of a gate's approval-timeout delay (a durable timer, like stuckCheck). */
export const APPROVAL_TIMEOUT_DELAY = 'approvalTimeout';
/** Who a timed-out gate is approved or rejected by, in `ticket.approved`/`ticket.rejected`. */
export const TIMEOUT_ACTOR = 'timeout';

const UNSETTLED_TASK_STATES: readonly TaskState[] = [...OPEN_TASK_STATES, 'failed'];

export function kindOf(taskType: string): TaskKind {
  return taskType === DIAGNOSTIC_TASK_TYPE ? 'diagnostic' : 'work';
}

/**
 * Every current task of `phase` is final, none is failed, and at least one non-diagnostic
 * task completed. A diagnostic task must be settled like any other, but cannot finish a phase
 * alone. Tasks of an earlier round of the phase are not counted.
 */
export function phaseComplete(ctx: Pick<TicketContext, 'counts'>, phase: string): boolean {
  const c = ctx.counts[phase];
  if (!c) return false;
  for (const kind of ['work', 'diagnostic'] as const) {
    for (const s of UNSETTLED_TASK_STATES) if ((c[kind]?.[s] ?? 0) > 0) return false;
  }
  return (c.work?.completed ?? 0) > 0;
}

/** The current round of `phase`. */
export function roundOf(ctx: Pick<TicketContext, 'rounds'>, phase: string): number {
  return ctx.rounds?.[phase] ?? 0;
}

/** `counts` with `delta` added to one (phase, kind, state), zero counts dropped. */
function bump(
  counts: Record<string, PhaseCounts>,
  phase: string,
  kind: TaskKind,
  state: TaskState,
  delta: number,
): Record<string, PhaseCounts> {
  const byKind = { ...counts[phase]?.[kind] };
  const n = (byKind[state] ?? 0) + delta;
  if (n === 0) delete byKind[state];
  else byKind[state] = n;
  const phaseCounts: PhaseCounts = { ...counts[phase] };
  if (Object.keys(byKind).length === 0) delete phaseCounts[kind];
  else phaseCounts[kind] = byKind;
  const out = { ...counts };
  if (Object.keys(phaseCounts).length === 0) delete out[phase];
  else out[phase] = phaseCounts;
  return out;
}

const isOpen = (state: TaskState): boolean => OPEN_TASK_STATES.includes(state);

/**
 * A version-1 context (every task in `tasks`) as this version's: the counts of each phase's
 * current tasks, the open diagnostics of any round. Version 1 marked an earlier round's tasks
 * `superseded`; their rows get round -1 (migration 0008), below every current round, so no
 * round is recorded here. Pure.
 */
export function upgradeTicketContext(old: Record<string, unknown>): Record<string, unknown> {
  const { tasks, ...rest } = old as { tasks?: Record<string, LegacyTicketTask> };
  let counts: Record<string, PhaseCounts> = {};
  let openDiagnostics = 0;
  for (const t of Object.values(tasks ?? {})) {
    const kind = kindOf(t.type);
    if (kind === 'diagnostic' && isOpen(t.state)) openDiagnostics++;
    if (!t.superseded) counts = bump(counts, t.phase, kind, t.state, 1);
  }
  return { ...rest, counts, openDiagnostics };
}

export function diagnosticTaskId(ticketId: string, n: number): string {
  return `${ticketId}-diagnostic-${n}`;
}

/** The domain event a transition into a phase emits, seen from the runtime. */
export interface PhaseEntry {
  phase: string;
  /** Set when the ticket was sent back into the phase: what the new tasks must carry. */
  feedback: { fromPhase: string; reason: string; loop: number } | null;
}

/**
 * Whether a domain event means "create the templates of a phase now", and with what
 * feedback: `ticket.phase_changed` (forward) and `ticket.sent_back` (rework). Null otherwise.
 */
export function phaseEntry(event: DomainEvent): PhaseEntry | null {
  const d = event.data as Record<string, unknown>;
  if (event.type === 'ticket.phase_changed' && typeof d.to === 'string') {
    return { phase: d.to, feedback: null };
  }
  if (event.type === 'ticket.sent_back' && typeof d.to === 'string') {
    return {
      phase: d.to,
      feedback: { fromPhase: String(d.from), reason: String(d.reason), loop: Number(d.loop) },
    };
  }
  return null;
}

/** The templates of a phase of a definition (none for a gate or an unknown phase). */
export function templatesOf(def: WorkflowDefinition, phase: string): TaskTemplate[] {
  const p = def.phases.find((x) => x.name === phase);
  return p && !isGate(p) ? (p.tasks ?? []) : [];
}

/** Whether news is about a task of its phase's current round (older rounds count nothing). */
function ofCurrentRound(ctx: TicketContext, event: { phase: string; round: number }): boolean {
  return event.round === roundOf(ctx, event.phase);
}

function withTaskState(
  ctx: TicketContext,
  event: Extract<TicketEvent, { type: 'TASK_STATE' }>,
): Pick<TicketContext, 'counts' | 'openDiagnostics'> {
  const kind = kindOf(event.taskType);
  const openDiagnostics =
    kind === 'diagnostic'
      ? ctx.openDiagnostics + (isOpen(event.state) ? 1 : 0) - (isOpen(event.from) ? 1 : 0)
      : ctx.openDiagnostics;
  if (!ofCurrentRound(ctx, event)) return { counts: ctx.counts, openDiagnostics };
  const less = bump(ctx.counts, event.phase, kind, event.from, -1);
  return { counts: bump(less, event.phase, kind, event.state, 1), openDiagnostics };
}

/**
 * A send-back: the counters it bumps, and a new round of every phase it crosses (their tasks
 * so far no longer count). Pure helper of `recordSendBack`.
 */
function sentBack(
  ctx: TicketContext,
  order: readonly string[],
  to: string,
  rule: boolean,
): Pick<TicketContext, 'counts' | 'rounds' | 'loops' | 'returns'> {
  const from = ctx.phase ?? order[0]!;
  const lo = order.indexOf(to);
  const hi = order.indexOf(from);
  const counts = { ...ctx.counts };
  const rounds = { ...ctx.rounds };
  for (const p of order.slice(lo, hi + 1)) {
    delete counts[p];
    rounds[p] = roundOf(ctx, p) + 1;
  }
  const loops = rule ? { ...ctx.loops, [from]: (ctx.loops?.[from] ?? 0) + 1 } : ctx.loops;
  const returns = { ...ctx.returns, [to]: (ctx.returns?.[to] ?? 0) + 1 };
  return loops === undefined ? { counts, rounds, returns } : { counts, rounds, loops, returns };
}

export interface CompiledWorkflow {
  name: string;
  version: number;
  /** `name@version`. */
  ref: string;
  definition: WorkflowDefinition;
  machine: ReturnType<typeof buildMachine>;
  /** The phase names, in order. */
  phases: string[];
  /** Every state of the machine: backlog, the phases, done, blocked, cancelled. */
  states: string[];
}

export function workflowRef(name: string, version: number): string {
  return `${name}@${version}`;
}

/**
 * Compiles a definition into a ticket machine. The definition is assumed schema-valid
 * (`parseWorkflowDefinition`); `verifyWorkflow` checks the machine's graph afterwards.
 */
export function compileWorkflow(def: WorkflowDefinition, version: number): CompiledWorkflow {
  const phases = def.phases.map((p) => p.name);
  return {
    name: def.name,
    version,
    ref: workflowRef(def.name, version),
    definition: def,
    machine: buildMachine(def),
    phases,
    states: ['backlog', ...phases, 'done', 'blocked', 'cancelled'],
  };
}

type TaskStateEvent = Extract<TicketEvent, { type: 'TASK_STATE' }>;

export type SendBackCause = 'operator' | 'reject' | 'task_failed';
interface SendBackParams {
  to: string;
  cause: SendBackCause;
}

/**
 * A send-back's actions: `ticket.sent_back` is emitted from the context before the move
 * (`phase` is still the phase left), then the counters and the crossed phases' new rounds;
 * the target's `enterPhase` runs after both.
 */
function sendBackActions(to: string, cause: SendBackCause, templates: boolean) {
  return [
    { type: 'emitSentBack' as const, params: { to, cause } },
    { type: 'recordSendBack' as const, params: { to, cause } },
    ...(templates ? ['expectTemplates' as const] : []),
  ];
}

function buildMachine(def: WorkflowDefinition) {
  const order = def.phases.map((p) => p.name);
  const byName = new Map<string, PhaseDefinition>(def.phases.map((p) => [p.name, p]));
  /** Entering `to` (forward or back): wait for its templates, if it has any. */
  const awaitTemplates = (to: string) =>
    templatesOf(def, to).length > 0 ? ['expectTemplates' as const] : [];
  const next = (phase: string): string => order[order.indexOf(phase) + 1] ?? 'done';
  const ruleOf = (phase: string): LoopRule | undefined => {
    const p = byName.get(phase);
    if (!p) return undefined;
    return isGate(p) ? p.onReject : p.onFail;
  };
  const loopsLeft = (ctx: TicketContext, phase: string): boolean => {
    const rule = ruleOf(phase);
    return rule !== undefined && (ctx.loops?.[phase] ?? 0) < rule.maxLoops;
  };
  const timeoutOf = (phase: string | null): number => {
    const p = phase === null ? undefined : byName.get(phase);
    return p && isGate(p) ? (p.approval.timeoutMs ?? 0) : 0;
  };
  const failedNews = (ctx: TicketContext, event: TicketEvent): event is TaskStateEvent =>
    event.type === 'TASK_STATE' && event.state === 'failed' && ofCurrentRound(ctx, event);

  const forward = (to: string) => [
    'touch' as const,
    { type: 'emitPhaseChanged' as const, params: { to } },
    ...awaitTemplates(to),
  ];

  const workState = (phase: string, onFail: LoopRule | undefined) => {
    const to = next(phase);
    const failBranches = onFail
      ? [
          {
            guard: { type: 'failedWithLoopsLeft' as const, params: { phase } },
            target: onFail.sendBackTo,
            reenter: true,
            description: `A task of the phase failed: back to ${onFail.sendBackTo} (at most ${onFail.maxLoops} times).`,
            actions: [
              'recordTaskState' as const,
              ...sendBackActions(
                onFail.sendBackTo,
                'task_failed',
                awaitTemplates(onFail.sendBackTo).length > 0,
              ),
            ],
          },
        ]
      : [];
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
      always: {
        guard: 'phaseComplete' as const,
        target: to,
        description:
          'Every current task of the phase is final, one completed, none failed: advance, exactly once.',
        actions: forward(to),
      },
      on: {
        ADVANCE: {
          guard: 'phaseComplete' as const,
          target: to,
          description:
            'Accepted only when the phase is complete, which the automatic advance never leaves it.',
          actions: forward(to),
        },
        TASK_STATE: [
          ...failBranches,
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
            target: phase,
            reenter: true,
            description: 'A task made progress: record it; the stuck check starts over.',
            actions: 'recordTaskState' as const,
          },
        ],
        TASK_ADDED: {
          target: phase,
          reenter: true,
          actions: 'recordTaskAdded' as const,
        },
        BLOCK: {
          target: 'blocked' as const,
          actions: ['recordBlock' as const, 'emitBlocked' as const],
        },
        ...sendBackOn(phase),
      },
    };
  };

  const gateState = (phase: string, gate: Extract<PhaseDefinition, { approval: object }>) => {
    const to = next(phase);
    const rejectBranches = (by: 'event' | 'timeout') => [
      ...(gate.onReject
        ? [
            {
              guard: { type: 'loopsLeft' as const, params: { phase } },
              target: gate.onReject.sendBackTo,
              reenter: true,
              description: `Rejected: back to ${gate.onReject.sendBackTo} (at most ${gate.onReject.maxLoops} times).`,
              actions: [
                { type: 'emitRejected' as const, params: { by } },
                ...sendBackActions(
                  gate.onReject.sendBackTo,
                  'reject',
                  awaitTemplates(gate.onReject.sendBackTo).length > 0,
                ),
              ],
            },
          ]
        : []),
      {
        target: 'blocked' as const,
        description: gate.onReject ? 'Rejected once too often: block.' : 'Rejected: block.',
        actions: [
          { type: 'emitRejected' as const, params: { by } },
          { type: 'blockForReject' as const, params: { by } },
          'emitBlocked' as const,
        ],
      },
    ];
    const approve = (by: 'event' | 'timeout') => ({
      target: to,
      actions: [
        'touch' as const,
        { type: 'emitApproved' as const, params: { by } },
        { type: 'emitPhaseChanged' as const, params: { to } },
        ...awaitTemplates(to),
      ],
    });
    const onTimeout = gate.approval.onTimeout ?? 'block';
    const timeout =
      onTimeout === 'approve'
        ? [{ ...approve('timeout'), description: 'No decision in time: approved.' }]
        : onTimeout === 'reject'
          ? rejectBranches('timeout')
          : [
              {
                target: 'blocked' as const,
                description: 'No decision in time: block.',
                actions: ['blockForTimeout' as const, 'emitBlocked' as const],
              },
            ];
    return {
      description: `Waiting at the ${phase} gate for APPROVE or REJECT.`,
      entry: { type: 'enterPhase' as const, params: { phase } },
      ...(gate.approval.timeoutMs !== undefined
        ? { after: { [APPROVAL_TIMEOUT_DELAY]: timeout } }
        : {}),
      on: {
        APPROVE: { ...approve('event'), description: 'Approved: on to the next phase.' },
        REJECT: rejectBranches('event'),
        TASK_ADDED: { actions: 'recordTaskAdded' as const },
        TASK_STATE: { actions: 'recordTaskState' as const },
        BLOCK: {
          target: 'blocked' as const,
          actions: ['recordBlock' as const, 'emitBlocked' as const],
        },
        ...sendBackOn(phase),
      },
    };
  };

  /** SEND_BACK from `phase`: one guarded branch per earlier phase (none from the first). */
  function sendBackOn(phase: string) {
    const earlier = order.slice(0, order.indexOf(phase));
    if (earlier.length === 0) return {};
    return {
      SEND_BACK: earlier.map((to) => ({
        guard: { type: 'sendBackTo' as const, params: { to } },
        target: to,
        description: `An operator sends the ticket back to ${to}.`,
        actions: sendBackActions(to, 'operator', awaitTemplates(to).length > 0),
      })),
    };
  }

  const phaseStates = Object.fromEntries(
    def.phases.map((p) => [p.name, isGate(p) ? gateState(p.name, p) : workState(p.name, p.onFail)]),
  );
  const first = order[0]!;

  return setup({
    types: {} as {
      context: TicketContext;
      events: TicketEvent;
      input: TicketInput;
      emitted: DomainEvent;
    },
    delays: {
      stuckCheck: ({ context }) => context.stuckAfterMs,
      [APPROVAL_TIMEOUT_DELAY]: ({ context }) => timeoutOf(context.phase),
    },
    guards: {
      phaseComplete: ({ context }) =>
        context.phase !== null &&
        context.templatesPending !== true &&
        phaseComplete(context, context.phase),
      failedWithLoopsLeft: ({ context, event }, params: { phase: string }) =>
        failedNews(context, event) &&
        event.phase === params.phase &&
        loopsLeft(context, params.phase),
      taskFailedForGood: ({ context, event }) => failedNews(context, event),
      loopsLeft: ({ context }, params: { phase: string }) => loopsLeft(context, params.phase),
      sendBackTo: ({ event }, params: { to: string }) =>
        event.type === 'SEND_BACK' && event.toPhase === params.to,
      mayDiagnose: ({ context, event }) => {
        if (context.openDiagnostics > 0) return false;
        return (
          context.lastDiagnosticAt === null ||
          timeOf(event) - context.lastDiagnosticAt >= context.diagnosticCooldownMs
        );
      },
      blockedInPhase: ({ context }, params: { phase: string }) => context.phase === params.phase,
    },
    actions: {
      touch: assign(({ event }) => ({ updatedAt: timeOf(event) })),
      enterPhase: assign((_, params: { phase: string }) => ({ phase: params.phase })),
      recordTaskAdded: assign(({ context, event }) => {
        if (event.type !== 'TASK_ADDED') return {};
        const kind = kindOf(event.taskType);
        const counts = bump(context.counts, event.phase, kind, 'pending', 1);
        const openDiagnostics = context.openDiagnostics + (kind === 'diagnostic' ? 1 : 0);
        // The first template task of the phase entered: the phase may complete from now on.
        if (context.templatesPending && event.phase === context.phase) {
          return { counts, openDiagnostics, templatesPending: undefined, updatedAt: timeOf(event) };
        }
        return { counts, openDiagnostics, updatedAt: timeOf(event) };
      }),
      expectTemplates: assign({ templatesPending: true as const }),
      recordTaskState: assign(({ context, event }) => {
        if (event.type !== 'TASK_STATE') return {};
        return { ...withTaskState(context, event), updatedAt: timeOf(event) };
      }),
      recordBlock: assign(({ event }) => ({
        blockedReason: event.type === 'BLOCK' ? event.reason : null,
        updatedAt: timeOf(event),
      })),
      blockForFailedTask: assign(({ event }) => ({
        blockedReason: event.type === 'TASK_STATE' ? `task ${event.taskId} failed` : null,
      })),
      blockForReject: assign(({ context, event }, params: { by: 'event' | 'timeout' }) => ({
        blockedReason:
          params.by === 'timeout'
            ? `${context.phase}: rejected (no decision in time)`
            : `${context.phase}: rejected${event.type === 'REJECT' ? `: ${event.reason}` : ''}`,
        updatedAt: timeOf(event),
      })),
      blockForTimeout: assign(({ context, event }) => ({
        blockedReason: `${context.phase}: no decision in time`,
        updatedAt: timeOf(event),
      })),
      recordUnblock: assign(({ event }) => ({ blockedReason: null, updatedAt: timeOf(event) })),
      recordCancel: assign(({ event }) => ({
        cancelReason: event.type === 'CANCEL' ? (event.reason ?? null) : null,
        updatedAt: timeOf(event),
      })),
      recordDiagnostic: assign(({ context, event }) => {
        const n = context.diagnostics + 1;
        const phase = context.phase ?? first;
        return {
          diagnostics: n,
          lastDiagnosticAt: timeOf(event),
          counts: bump(context.counts, phase, 'diagnostic', 'pending', 1),
          openDiagnostics: context.openDiagnostics + 1,
          updatedAt: timeOf(event),
        };
      }),
      emitSentBack: emit(({ context, event }, params: SendBackParams) => ({
        type: 'ticket.sent_back' as const,
        data: {
          from: context.phase,
          to: params.to,
          reason: sendBackReason(event, context),
          loop: (context.returns?.[params.to] ?? 0) + 1,
          cause: params.cause,
          ...(event.type === 'TASK_STATE' ? { taskId: event.taskId } : {}),
        },
      })),
      recordSendBack: assign(({ context, event }, params: SendBackParams) => ({
        ...sentBack(context, order, params.to, params.cause !== 'operator'),
        updatedAt: timeOf(event),
      })),
      emitCreated: emit(({ context }) => ({
        type: 'ticket.created' as const,
        data: { title: context.title, description: context.description },
      })),
      emitPhaseChanged: emit(({ context }, params: { to: string }) => ({
        type: params.to === 'done' ? ('ticket.done' as const) : ('ticket.phase_changed' as const),
        data: { from: context.phase ?? 'backlog', to: params.to },
      })),
      emitApproved: emit(({ context, event }, params: { by: 'event' | 'timeout' }) => ({
        type: 'ticket.approved' as const,
        data: {
          phase: context.phase,
          by: params.by === 'timeout' || event.type !== 'APPROVE' ? TIMEOUT_ACTOR : event.by,
          comment: event.type === 'APPROVE' ? (event.comment ?? null) : null,
        },
      })),
      emitRejected: emit(({ context, event }, params: { by: 'event' | 'timeout' }) => ({
        type: 'ticket.rejected' as const,
        data: {
          phase: context.phase,
          by: params.by === 'timeout' || event.type !== 'REJECT' ? TIMEOUT_ACTOR : event.by,
          reason: event.type === 'REJECT' ? event.reason : 'no decision in time',
        },
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
    description: `A unit of delivery moving through ${order.join(', ')}.`,
    context: ({ input }) => ({
      id: input.id,
      title: input.title,
      description: input.description ?? null,
      phase: null,
      counts: {},
      openDiagnostics: 0,
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
            target: first,
            actions: [
              'touch',
              { type: 'emitPhaseChanged', params: { to: first } },
              ...awaitTemplates(first),
            ],
          },
          TASK_ADDED: { actions: 'recordTaskAdded' },
          TASK_STATE: { actions: 'recordTaskState' },
        },
      },
      ...(phaseStates as Record<string, ReturnType<typeof workState>>),
      done: { type: 'final', description: 'Every phase completed.' },
      blocked: {
        description: 'Halted; remembers its phase and returns to it on UNBLOCK.',
        on: {
          UNBLOCK: order.map((phase) => ({
            guard: { type: 'blockedInPhase' as const, params: { phase } },
            target: phase,
            actions: ['recordUnblock' as const, 'emitUnblocked' as const],
          })),
          TASK_ADDED: { actions: 'recordTaskAdded' },
          TASK_STATE: { actions: 'recordTaskState' },
        },
      },
      cancelled: { type: 'final', description: 'Cancelled; its open tasks are cancelled too.' },
    },
  });
}

function sendBackReason(event: TicketEvent, ctx: TicketContext): string {
  switch (event.type) {
    case 'SEND_BACK':
    case 'REJECT':
      return event.reason;
    case 'TASK_STATE':
      return event.error ?? `task ${event.taskId} failed`;
    default:
      return `${ctx.phase}: no decision in time`;
  }
}
