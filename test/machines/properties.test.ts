/**
 * Property tests: random event sequences through decide() on both machines. Refusals
 * (IllegalTransition, StaleToken) are part of the game; any other error fails the property.
 * Beside each persisted snapshot runs a live one, stepped with XState's `transition()` and
 * never serialized: the two must agree on every decision.
 */
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { type AnyMachineSnapshot, initialTransition, transition } from 'xstate';
import {
  type DecideEvent,
  type Decision,
  decide,
  decideInitial,
  type EntityInput,
  type PersistedSnapshot,
  restore,
} from '../../src/actors/decide.js';
import { IllegalTransition, StaleToken } from '../../src/errors.js';
import { type EntityType, MACHINES } from '../../src/machines/index.js';
import { PHASES, type Phase } from '../../src/machines/phases.js';
import {
  attemptsCharged,
  FINAL_TASK_STATES,
  TASK_STATES,
  TASK_TOKEN_EVENTS,
  type TaskContext,
  type TaskInput,
  type TaskState,
} from '../../src/machines/task.js';
import {
  FINAL_TICKET_STATES,
  phaseComplete,
  roundOf,
  type TicketContext,
  type TicketInput,
} from '../../src/machines/ticket.js';
import { upgradeTicketContext } from '../../src/machines/workflow.js';

const STALE = 'stale-token';

type Outcome =
  | { ok: true; decision: Decision }
  | { ok: false; error: IllegalTransition | StaleToken };

function attempt(
  entityType: EntityType,
  persisted: PersistedSnapshot,
  event: DecideEvent,
): Outcome {
  try {
    return { ok: true, decision: decide(entityType, 'e-1', persisted, event) };
  } catch (error) {
    if (error instanceof IllegalTransition || error instanceof StaleToken) {
      return { ok: false, error };
    }
    throw error;
  }
}

function clone<T>(value: T): T {
  return JSON.parse(JSON.stringify(value)) as T;
}

interface StepInfo {
  event: DecideEvent;
  before: PersistedSnapshot;
  outcome: Outcome;
}

/**
 * Runs `build(state)` events one by one and checks the properties both machines share; calls
 * `check` for the machine's own. Returns nothing: it throws on the first broken property.
 */
function run<T extends EntityType>(
  entityType: T,
  input: EntityInput<T>,
  builders: readonly ((s: PersistedSnapshot, i: number) => DecideEvent)[],
  finals: readonly string[],
  check: (step: StepInfo) => void,
): void {
  const { machine } = MACHINES[entityType];
  let persisted = decideInitial(entityType, input).snapshot;
  let live = initialTransition(machine as never, input as never)[0] as AnyMachineSnapshot;
  builders.forEach((build, i) => {
    const event = build(persisted, i);
    const before = clone(persisted);
    const outcome = attempt(entityType, persisted, event);
    // A snapshot that went through JSON decides exactly like the one in memory.
    const again = attempt(entityType, JSON.parse(JSON.stringify(persisted)), event);
    expect(again).toEqual(outcome);
    // Refused or not, decide() never writes to its input.
    expect(persisted).toEqual(before);
    if (finals.includes(before.value))
      expect(outcome.ok, `${event.type} left a final state`).toBe(false);
    if (event.token === STALE) expect(outcome.ok, `${event.type} with a stale token`).toBe(false);

    // The live snapshot: the same transition, or none.
    const [liveNext] = transition(machine as never, live as never, event as never);
    // A done actor takes nothing (the pure transition() leaves that check to the actor).
    const taken = live.status === 'active' && (liveNext as unknown) !== live;
    if (!(outcome.ok === false && outcome.error instanceof StaleToken)) {
      expect(outcome.ok, `${before.value} + ${event.type}: live and persisted agree`).toBe(taken);
    }
    check({ event, before, outcome });
    if (outcome.ok) {
      persisted = outcome.decision.snapshot;
      live = liveNext as AnyMachineSnapshot;
      expect(persisted.value).toBe(String(live.value));
      expect(persisted.context).toEqual(clone(live.context));
      expect(restore(entityType, persisted).status).toBe(live.status);
    }
  });
}

// ---------------------------------------------------------------------------------------- task

const TASK_INPUT: TaskInput = {
  id: 'e-1',
  ticketId: 'tk-1',
  type: 'implement_feature',
  phase: 'design',
  maxAttempts: 3,
  leaseMs: 30_000,
  retryBaseMs: 1_000,
  at: 0,
};

const token = fc.constantFrom('live', 'stale');
const taskContext = (s: PersistedSnapshot) => s.context as unknown as TaskContext;
const pick = (s: PersistedSnapshot, which: 'live' | 'stale') =>
  which === 'live' ? (taskContext(s).token ?? 'no-live-token') : STALE;

const taskEvent: fc.Arbitrary<(s: PersistedSnapshot, i: number) => DecideEvent> = fc.oneof(
  fc.tuple(fc.constantFrom('w1', 'w2#3'), fc.option(fc.integer({ min: 1, max: 60_000 }))).map(
    ([workerId, leaseMs]) =>
      (s: PersistedSnapshot, i: number): DecideEvent => ({
        type: 'CLAIM',
        workerId,
        token: `tok-${i}-${taskContext(s).attempt}`,
        ...(leaseMs === null ? {} : { leaseMs }),
        at: i * 1_000,
      }),
  ),
  fc
    .tuple(fc.constantFrom('START', 'HEARTBEAT', 'COMPLETE', 'FAIL', 'RELEASE'), token)
    .map(([type, which]) => (s: PersistedSnapshot, i: number) => ({
      type,
      token: pick(s, which),
      ...(type === 'FAIL' ? { error: 'boom' } : {}),
      ...(type === 'COMPLETE' ? { result: { n: i } } : {}),
      at: i * 1_000,
    })),
  fc
    .constantFrom(
      'LEASE_EXPIRED',
      'RETRY',
      'CANCEL',
      'xstate.after.lease.task.claimed',
      'xstate.after.lease.task.running',
      'xstate.after.retryBackoff.task.retry_wait',
    )
    .map((type) => (_s: PersistedSnapshot, i: number) => ({ type, at: i * 1_000 })),
  fc
    .option(fc.integer({ min: -1, max: 5 }))
    .map((maxAttempts) => (_s: PersistedSnapshot, i: number) => ({
      type: 'REQUEUE',
      ...(maxAttempts === null ? {} : { maxAttempts }),
      at: i * 1_000,
    })),
);

describe('task machine properties', () => {
  it('holds its invariants under random event sequences', () => {
    fc.assert(
      fc.property(fc.array(taskEvent, { maxLength: 40 }), (builders) => {
        // The budget as CONTRACT 1 counts it: claims since the last REQUEUE, less releases.
        let charged = 0;
        run('task', TASK_INPUT, builders, FINAL_TASK_STATES, ({ event, before, outcome }) => {
          const was = before.context as unknown as TaskContext;
          if (!outcome.ok) {
            // On a live claim the token is checked first: a stale one is always stale_token.
            if (
              event.token === STALE &&
              (before.value === 'claimed' || before.value === 'running')
            ) {
              expect(outcome.error).toBeInstanceOf(StaleToken);
              expect((outcome.error as StaleToken).attempt).toBe(was.attempt);
            }
            return;
          }
          const now = outcome.decision.snapshot.context as unknown as TaskContext;
          expect(TASK_STATES).toContain(outcome.decision.state);
          // Attempt numbers only grow, by one per claim: no two executions share one.
          if (event.type === 'CLAIM') {
            expect(now.attempt).toBe(was.attempt + 1);
            expect(now.token).toBe(event.token);
            charged++;
          } else {
            expect(now.attempt).toBe(was.attempt);
          }
          if (event.type === 'RELEASE') {
            charged--;
            expect(outcome.decision.state).toBe('pending');
          }
          if (event.type === 'REQUEUE') charged = 0;
          expect(now.attemptsUsed).toBe(charged);
          expect(now.attemptsUsed).toBeGreaterThanOrEqual(0);
          expect(now.attemptsUsed).toBeLessThanOrEqual(now.maxAttempts);
          // Only the live claim's worker moves a claimed or running task with a token event.
          if (TASK_TOKEN_EVENTS.includes(event.type as never)) expect(event.token).toBe(was.token);
          if (outcome.decision.state === 'failed') expect(now.attemptsUsed).toBe(now.maxAttempts);
        });
      }),
      { numRuns: 300 },
    );
  });
});

/** Steps `persisted` through one event; null when refused. */
function step(persisted: PersistedSnapshot, event: DecideEvent): PersistedSnapshot | null {
  const outcome = attempt('task', persisted, event);
  return outcome.ok ? outcome.decision.snapshot : null;
}

describe('task attempts and budget', () => {
  type Outcome = 'release' | 'fail' | 'expire' | 'requeue';
  it('claims number 1, 2, 3...; releases never exhaust the budget; REQUEUE renews it', () => {
    fc.assert(
      fc.property(
        fc.integer({ min: 1, max: 3 }),
        fc.array(fc.constantFrom<Outcome>('release', 'fail', 'expire', 'requeue'), {
          maxLength: 30,
        }),
        (maxAttempts, outcomes) => {
          let s: PersistedSnapshot = decideInitial('task', { ...TASK_INPUT, maxAttempts }).snapshot;
          let claims = 0;
          let charged = 0;
          const ctx = () => taskContext(s);
          for (const [i, outcome] of outcomes.entries()) {
            const at = i * 1_000;
            if (outcome === 'requeue') {
              const next = step(s, { type: 'REQUEUE', at });
              expect(next !== null).toBe(s.value === 'failed');
              if (next) {
                s = next;
                charged = 0;
                expect(ctx().attempt).toBe(claims);
              }
              continue;
            }
            if (s.value !== 'pending') continue;
            s = step(s, { type: 'CLAIM', workerId: 'w', token: `t${i}`, at })!;
            claims++;
            charged++;
            expect(ctx().attempt).toBe(claims);
            const token = ctx().token!;
            s = step(s, { type: 'START', token, at })!;
            const event: DecideEvent =
              outcome === 'release'
                ? { type: 'RELEASE', token, at }
                : outcome === 'fail'
                  ? { type: 'FAIL', token, error: 'boom', at }
                  : { type: 'LEASE_EXPIRED', at };
            s = step(s, event)!;
            if (outcome === 'release') {
              charged--;
              expect(s.value).toBe('pending');
            } else {
              expect(s.value).toBe(charged >= maxAttempts ? 'failed' : 'retry_wait');
              if (s.value === 'retry_wait') s = step(s, { type: 'RETRY', at })!;
            }
            expect(ctx().attemptsUsed).toBe(charged);
            expect(ctx().attempt).toBe(claims);
          }
        },
      ),
      { numRuns: 300 },
    );
  });

  it('a snapshot stored before attemptsUsed existed keeps its budget', () => {
    // Before, `attempt` was the budget count itself: RELEASE refunded it, REQUEUE reset it to
    // 0. Such a snapshot (no attemptsUsed) must decide exactly as the current one does.
    fc.assert(
      fc.property(fc.array(taskEvent, { maxLength: 40 }), fc.nat(40), (builders, cut) => {
        let current = decideInitial('task', TASK_INPUT).snapshot;
        let legacy = clone(current);
        builders.forEach((build, i) => {
          if (i === cut) {
            const { attemptsUsed, ...rest } = taskContext(current);
            legacy = { ...clone(current), context: { ...rest, attempt: attemptsUsed } };
            expect(attemptsCharged(taskContext(legacy))).toBe(attemptsUsed);
          }
          const a = attempt('task', current, build(current, i));
          const b = attempt('task', legacy, build(legacy, i));
          expect(b.ok).toBe(a.ok);
          if (a.ok && b.ok) {
            expect(b.decision.state).toBe(a.decision.state);
            expect(b.decision.emitted.map((e) => e.type)).toEqual(
              a.decision.emitted.map((e) => e.type),
            );
            expect(attemptsCharged(taskContext(b.decision.snapshot))).toBe(
              attemptsCharged(taskContext(a.decision.snapshot)),
            );
            current = a.decision.snapshot;
            legacy = b.decision.snapshot;
          }
        });
      }),
      { numRuns: 300 },
    );
  });
});

// -------------------------------------------------------------------------------------- ticket

const TICKET_INPUT: TicketInput = {
  id: 'e-1',
  title: 'Property ticket',
  stuckAfterMs: 60_000,
  diagnosticCooldownMs: 5_000,
  at: 0,
};
const TASK_IDS = ['a', 'b', 'c'];
const ticketContext = (s: PersistedSnapshot) => s.context as unknown as TicketContext;
const currentPhase = (s: PersistedSnapshot): Phase => ticketContext(s).phase ?? 'requirements';

/** What the runtime records of each task beside the ticket (`ticket_tasks`). */
interface TaskRow {
  phase: string;
  round: number;
  type: string;
  state: TaskState;
  seq: number;
}
type TaskTable = Map<string, TaskRow>;
/** Late or unknown news: the runtime sends nothing, which the model stands for by a refusal. */
const NOTHING: DecideEvent = { type: 'NOTHING_SENT' };

type TicketBuilder = (s: PersistedSnapshot, i: number, table: TaskTable) => DecideEvent;

const ticketEvent: fc.Arbitrary<TicketBuilder> = fc.oneof(
  {
    weight: 2,
    arbitrary: fc.constantFrom('START', 'ADVANCE', 'UNBLOCK', 'BLOCK', 'CANCEL').map(
      (type): TicketBuilder =>
        (_s, i) => ({
          type,
          ...(type === 'BLOCK' ? { reason: 'waiting' } : {}),
          at: i * 1_000,
        }),
    ),
  },
  {
    weight: 2,
    arbitrary: fc.tuple(fc.constantFrom(...TASK_IDS), fc.option(fc.constantFrom(...PHASES))).map(
      ([id, phase]): TicketBuilder =>
        (s, i, table) =>
          // A task id is created once (the task's primary key refuses a second).
          table.has(id)
            ? NOTHING
            : {
                type: 'TASK_ADDED',
                taskId: id,
                phase: phase ?? currentPhase(s),
                taskType: id === 'c' ? 'diagnostic' : 'work',
                at: i * 1_000,
              },
    ),
  },
  {
    weight: 5,
    arbitrary: fc
      .tuple(
        fc.constantFrom(...TASK_IDS, 'e-1-diagnostic-1'),
        // Completions weigh more: phases then finish, so send-backs cross finished rounds.
        fc.constantFrom<TaskState>(...TASK_STATES, 'completed', 'completed', 'completed'),
        fc.integer({ min: -1, max: 2 }),
      )
      .map(
        ([taskId, state, delta]): TicketBuilder =>
          (_s, i, table) => {
            // forwardTaskState: news older than (or as old as) the row's is not sent.
            const row = table.get(taskId);
            if (!row || delta <= 0) return NOTHING;
            return {
              type: 'TASK_STATE',
              taskId,
              phase: row.phase,
              round: row.round,
              taskType: row.type,
              from: row.state,
              state,
              seq: row.seq + delta,
              at: i * 1_000,
            };
          },
      ),
  },
  {
    weight: 1,
    arbitrary: fc.constantFrom(...PHASES).map(
      (p): TicketBuilder =>
        (_s, i) => ({
          type: `xstate.after.stuckCheck.ticket.${p}`,
          at: i * 1_000,
        }),
    ),
  },
  {
    // A send-back starts new rounds: the older rounds' news must then count for nothing.
    weight: 1,
    arbitrary: fc.constantFrom(...PHASES).map(
      (to): TicketBuilder =>
        (_s, i) => ({
          type: 'SEND_BACK',
          toPhase: to,
          reason: 'rework',
          at: i * 1_000,
        }),
    ),
  },
);

/** The counts the rows of the current rounds make: what the ticket's context must hold. */
function countsOf(
  table: TaskTable,
  c: TicketContext,
): Pick<TicketContext, 'counts' | 'openDiagnostics'> {
  const counts: Record<string, Record<string, Record<string, number>>> = {};
  let openDiagnostics = 0;
  for (const r of table.values()) {
    const kind = r.type === 'diagnostic' ? 'diagnostic' : 'work';
    const open = !['completed', 'failed', 'cancelled'].includes(r.state);
    if (kind === 'diagnostic' && open) openDiagnostics++;
    if (r.round !== roundOf(c, r.phase)) continue;
    const byKind = counts[r.phase] ?? {};
    const byState = byKind[kind] ?? {};
    byState[r.state] = (byState[r.state] ?? 0) + 1;
    byKind[kind] = byState;
    counts[r.phase] = byKind;
  }
  return { counts: counts as TicketContext['counts'], openDiagnostics };
}

describe('ticket machine properties', () => {
  it('holds its invariants under random event sequences, its counts exact', {
    timeout: 120_000,
  }, () => {
    fc.assert(
      fc.property(fc.array(ticketEvent, { minLength: 20, maxLength: 60 }), (generated) => {
        const table: TaskTable = new Map();
        const builders = generated.map((b) => (s: PersistedSnapshot, i: number) => b(s, i, table));
        run('ticket', TICKET_INPUT, builders, FINAL_TICKET_STATES, ({ event, before, outcome }) => {
          const was = before.context as unknown as TicketContext;
          if (!outcome.ok) return;
          const d = outcome.decision;
          const now = d.snapshot.context as unknown as TicketContext;
          // What the runtime writes beside the ticket in the same transaction.
          if (event.type === 'TASK_ADDED') {
            const phase = String(event.phase);
            table.set(String(event.taskId), {
              phase,
              round: roundOf(now, phase),
              type: String(event.taskType),
              state: 'pending',
              seq: 0,
            });
          }
          if (event.type === 'TASK_STATE') {
            const row = table.get(String(event.taskId))!;
            table.set(String(event.taskId), {
              ...row,
              state: event.state as TaskState,
              seq: Number(event.seq),
            });
          }
          for (const e of d.emitted) {
            if (e.type !== 'ticket.diagnostic_spawned') continue;
            const phase = String(e.data.phase);
            table.set(String(e.data.taskId), {
              phase,
              round: roundOf(now, phase),
              type: 'diagnostic',
              state: 'pending',
              seq: 0,
            });
          }
          // The guard is exact: the counts are those of the current rounds' rows.
          const expected = countsOf(table, now);
          expect(now.counts).toEqual(expected.counts);
          expect(now.openDiagnostics).toBe(expected.openDiagnostics);
          if (event.type === 'ADVANCE') {
            expect(was.phase).not.toBeNull();
            expect(phaseComplete(was, was.phase!)).toBe(true);
          }
          // Whatever moves a ticket forward (ADVANCE or the automatic one), its phase was done.
          if (
            d.emitted.some((e) => e.type === 'ticket.phase_changed' || e.type === 'ticket.done')
          ) {
            if (was.phase !== null) expect(phaseComplete(now, was.phase)).toBe(true);
          }
          if (d.state === 'blocked') expect(now.phase).toBe(was.phase);
          // UNBLOCK returns to the phase it left, which the automatic advance leaves at once
          // if its tasks finished meanwhile.
          const moved = d.emitted.find(
            (e) => e.type === 'ticket.phase_changed' || e.type === 'ticket.done',
          );
          if (before.value === 'blocked' && event.type === 'UNBLOCK') {
            if (moved) expect(moved.data.from).toBe(was.phase);
            else expect(d.state).toBe(was.phase);
          }
          if (before.value === 'blocked' && d.state !== 'blocked' && !moved) {
            expect(['cancelled', was.phase]).toContain(d.state);
          }
        });
      }),
      { numRuns: 500 },
    );
  });

  it('a phase with a failed or open task never advances', () => {
    // A focused property: the ADVANCE guard against random task tables.
    const taskTable = fc.dictionary(
      fc.constantFrom(...TASK_IDS),
      fc.record({
        phase: fc.constantFrom(...PHASES),
        type: fc.constantFrom('work', 'diagnostic'),
        state: fc.constantFrom(...TASK_STATES),
        seq: fc.nat(5),
      }),
    );
    fc.assert(
      fc.property(taskTable, fc.constantFrom(...PHASES), (tasks, phase) => {
        const base = decideInitial('ticket', TICKET_INPUT).snapshot;
        const persisted: PersistedSnapshot = {
          ...base,
          value: phase,
          context: { ...base.context, phase, ...upgradeTicketContext({ tasks }) },
        };
        const outcome = attempt('ticket', persisted, { type: 'ADVANCE' });
        const inPhase = Object.values(tasks).filter((t) => t.phase === phase);
        const expected =
          inPhase.every((t) => t.state === 'completed' || t.state === 'cancelled') &&
          inPhase.some((t) => t.state === 'completed' && t.type !== 'diagnostic');
        expect(outcome.ok).toBe(expected);
        if (!outcome.ok) {
          expect(outcome.error).toBeInstanceOf(IllegalTransition);
          expect((outcome.error as IllegalTransition).guarded).toBe(true);
        }
      }),
      { numRuns: 300 },
    );
  });
});
