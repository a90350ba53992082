/**
 * Model-based tests of the task machine: @xstate/graph walks the machine with the events
 * below (payloads included, tokens taken from the state reached), and every shortest path is
 * replayed through decide(). See model-support.ts for what each step checks.
 */
import { describe, expect, it } from 'vitest';
import type { AnyMachineSnapshot } from 'xstate';
import type { DecideEvent, Decision } from '../../src/actors/decide.js';
import type { DomainEventType } from '../../src/machines/domain-events.js';
import {
  attemptsCharged,
  settlementOf,
  TASK_SETTLEMENT_EVENTS,
  TASK_TOKEN_EVENTS,
  type TaskContext,
  type TaskInput,
  type TaskState,
} from '../../src/machines/task.js';
import { type ModelSpec, runModel, summary, type TransitionRef } from './model-support.js';

const INPUT: TaskInput = {
  id: 'task-1',
  ticketId: 'ticket-1',
  type: 'implement_feature',
  phase: 'design',
  // Two attempts: enough to reach both the "attempts left" and the "out of attempts" branches.
  maxAttempts: 2,
  leaseMs: 30_000,
  retryBaseMs: 1_000,
  // CONTRACT 5: created with an unfinished dependency, so it starts in `waiting`; DEPS_MET
  // leads into the rest of the machine.
  dependsOn: ['task-0'],
  waiting: true,
  at: 0,
};

const LEASE_CLAIMED = 'xstate.after.lease.task.claimed';
const LEASE_RUNNING = 'xstate.after.lease.task.running';
const BACKOFF = 'xstate.after.retryBackoff.task.retry_wait';

function ctx(s: AnyMachineSnapshot): TaskContext {
  return s.context as TaskContext;
}

/** The events offered in a state; token events carry the live token, as a worker would. */
function events(s: AnyMachineSnapshot): DecideEvent[] {
  const c = ctx(s);
  const token = c.token ?? 'no-live-token';
  return [
    { type: 'DEPS_MET' },
    { type: 'CLAIM', workerId: 'w1#1', token: `tok-${c.attempt + 1}` },
    { type: 'START', token },
    { type: 'HEARTBEAT', token },
    { type: 'COMPLETE', token, result: { ok: true } },
    { type: 'FAIL', token, error: 'boom' },
    { type: 'RELEASE', token, reason: 'shutting down' },
    { type: 'LEASE_EXPIRED' },
    { type: 'RETRY' },
    { type: 'CANCEL', reason: 'not needed' },
    { type: 'REQUEUE' },
    { type: 'REQUEUE', maxAttempts: 3 },
    // Refused by the requeueValid guard.
    { type: 'REQUEUE', maxAttempts: 0 },
    { type: LEASE_CLAIMED },
    { type: LEASE_RUNNING },
    { type: BACKOFF },
  ];
}

/** CONTRACT 1, per transition: where it goes and what it emits. */
const EXPECTED: Record<string, { to: string; emits: DomainEventType[] }> = {
  'DEPS_MET#0': { to: 'pending', emits: ['task.ready'] },
  'CLAIM#0': { to: 'claimed', emits: ['task.claimed'] },
  'START#0': { to: 'running', emits: ['task.started'] },
  'HEARTBEAT#0': { to: 'same', emits: [] },
  'COMPLETE#0': { to: 'completed', emits: ['task.completed'] },
  'FAIL#0': { to: 'retry_wait', emits: ['task.retry_scheduled'] },
  'FAIL#1': { to: 'failed', emits: ['task.failed'] },
  'LEASE_EXPIRED#0': { to: 'retry_wait', emits: ['task.lease_expired', 'task.retry_scheduled'] },
  'LEASE_EXPIRED#1': { to: 'failed', emits: ['task.lease_expired', 'task.failed'] },
  'RELEASE#0': { to: 'pending', emits: ['task.released'] },
  'RETRY#0': { to: 'pending', emits: ['task.retried'] },
  'CANCEL#0': { to: 'cancelled', emits: ['task.cancelled'] },
  'REQUEUE#0': { to: 'pending', emits: ['task.requeued'] },
};

/** The `after` timers fire the same transitions as the system events they stand for. */
function logicalEvent(eventType: string): string {
  if (eventType.startsWith('xstate.after.lease.')) return 'LEASE_EXPIRED';
  if (eventType.startsWith('xstate.after.retryBackoff.')) return 'RETRY';
  return eventType;
}

function emits(ref: TransitionRef): DomainEventType[] {
  const expected = EXPECTED[`${logicalEvent(ref.eventType)}#${ref.branch}`];
  expect(expected, `${ref.key} is in the contract table`).toBeDefined();
  expect(ref.target, `${ref.key}: target`).toBe(
    expected!.to === 'same' ? ref.source : expected!.to,
  );
  return expected!.emits;
}

/**
 * CONTRACT 1, attempts: every CLAIM takes the next attempt number and nothing else changes it;
 * the budget (`attemptsUsed`) counts claims, less those given back by RELEASE, and REQUEUE
 * empties it. Only a charged claim that fails or expires can make the task `failed`.
 */
function checkAttempts(
  ref: TransitionRef,
  event: DecideEvent,
  model: AnyMachineSnapshot,
  d: Decision,
) {
  const was = ctx(model);
  const now = d.snapshot.context as unknown as TaskContext;
  const where = `${ref.key}`;
  const logical = logicalEvent(ref.eventType);
  expect(now.attempt, `${where}: attempt`).toBe(
    logical === 'CLAIM' ? was.attempt + 1 : was.attempt,
  );
  const used = attemptsCharged(was);
  const expectedUsed =
    logical === 'CLAIM'
      ? used + 1
      : logical === 'RELEASE'
        ? used - 1
        : logical === 'REQUEUE'
          ? 0
          : used;
  expect(now.attemptsUsed, `${where}: attemptsUsed`).toBe(expectedUsed);
  expect(now.attemptsUsed, `${where}: within the budget`).toBeLessThanOrEqual(now.maxAttempts);
  if (logical === 'RELEASE') expect(d.state, `${where}: a release never fails`).toBe('pending');
  if (d.state === 'failed') expect(now.attemptsUsed).toBe(now.maxAttempts);
  if (logical === 'REQUEUE') {
    const requested = (event as { maxAttempts?: number }).maxAttempts;
    expect(now.maxAttempts).toBe(requested ?? was.maxAttempts);
  }
  checkSettlementNews(ref, model, d);
}

/**
 * The task_state reaction reads only `TASK_SETTLEMENT_EVENTS`: a transition that changes the
 * task's settlement must emit one, or its ticket would wait for the reconciler; one that does
 * not must emit none, or the reaction would read Postgres for nothing.
 */
function checkSettlementNews(ref: TransitionRef, model: AnyMachineSnapshot, d: Decision) {
  const settles = (TASK_SETTLEMENT_EVENTS as readonly string[]).includes.bind(
    TASK_SETTLEMENT_EVENTS,
  );
  const changed =
    settlementOf(String(model.value) as TaskState) !== settlementOf(d.state as TaskState);
  const told = d.emitted.filter((e) => settles(e.type));
  expect(told.length, `${ref.key}: settlement events`).toBe(changed ? 1 : 0);
}

const spec: ModelSpec<'task'> = {
  entityType: 'task',
  input: INPUT,
  initialEmits: ['task.created', 'task.waiting'],
  events,
  core: (s) => {
    const c = ctx(s);
    // The budget, not the attempt number: the number grows without bound (claim, release,
    // claim...), the budget is what decides where the task can go.
    return `${String(s.value)} u${attemptsCharged(c)}/${c.maxAttempts} ${c.token === null ? '-' : 'T'}`;
  },
  emits,
  timed: {
    claimed: { delay: 'lease', ms: (c) => c.leaseMs as number },
    running: { delay: 'lease', ms: (c) => c.leaseMs as number },
    retry_wait: { delay: 'retryBackoff', ms: (c) => c.retryDelayMs as number },
  },
  tokenEvents: TASK_TOKEN_EVENTS,
  check: checkAttempts,
};

describe('task machine, model-based', () => {
  it('every path replays through decide() and every other event is refused', () => {
    const report = runModel(spec);
    console.log(summary('task', report));
    expect(report.missingStates).toEqual([]);
    expect(report.missingTransitions).toEqual([]);
    expect(report.states[0]).toBe(8);
    expect(report.transitions[0]).toBe(report.transitions[1]);
    expect(report.rejectedPairs).toBeGreaterThan(0);
    expect(report.staleChecks).toBeGreaterThan(0);
  });
});
