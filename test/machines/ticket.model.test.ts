/**
 * Model-based tests of the ticket machine: @xstate/graph walks the machine with the events
 * below (one work task per phase, the task news the runtime would send about it, the stuck
 * checks), and every shortest path is replayed through decide(). See model-support.ts.
 */
import { describe, expect, it } from 'vitest';
import type { AnyMachineSnapshot } from 'xstate';
import type { DecideEvent } from '../../src/actors/decide.js';
import type { DomainEventType } from '../../src/machines/domain-events.js';
import { nextPhaseState, PHASES, type Phase } from '../../src/machines/phases.js';
import type { TaskState } from '../../src/machines/task.js';
import {
  diagnosticTaskId,
  phaseComplete,
  roundOf,
  type TicketContext,
  type TicketInput,
} from '../../src/machines/ticket.js';
import type { TaskKind } from '../../src/machines/workflow.js';
import { ALWAYS, type ModelSpec, runModel, summary, type TransitionRef } from './model-support.js';

const INPUT: TicketInput = {
  id: 'ticket-1',
  title: 'Model ticket',
  description: null,
  stuckAfterMs: 60_000,
  // Events carry no `at` (time 0): one diagnostic may spawn, the cooldown keeps out a second.
  diagnosticCooldownMs: 1_000,
  at: 0,
};

/** Task states the ticket's guards do not tell apart: not final. */
const OPEN: readonly TaskState[] = ['waiting', 'pending', 'claimed', 'running', 'retry_wait'];
const KINDS: readonly TaskKind[] = ['work', 'diagnostic'];
const NEWS: readonly TaskState[] = ['running', 'completed', 'failed', 'cancelled'];

function ctx(s: AnyMachineSnapshot): TicketContext {
  return s.context as TicketContext;
}

function isPhase(state: string): state is Phase {
  return (PHASES as readonly string[]).includes(state);
}

function events(s: AnyMachineSnapshot): DecideEvent[] {
  const c = ctx(s);
  const phase = c.phase ?? 'requirements';
  const out: DecideEvent[] = [
    { type: 'START' },
    { type: 'ADVANCE' },
    { type: 'BLOCK', reason: 'waiting for a decision' },
    { type: 'UNBLOCK' },
    { type: 'CANCEL', reason: 'dropped' },
  ];
  const current = c.counts[phase] ?? {};
  const round = roundOf(c, phase);
  // One work task per round of a phase keeps the graph finite.
  if (current.work === undefined) {
    out.push({ type: 'TASK_ADDED', taskId: `${phase}-${round}`, phase, taskType: 'work' });
  }
  // The news the runtime sends about an open task of the current round (it refuses late or
  // repeated news itself, before the machine: see forwardTaskState).
  for (const kind of KINDS) {
    const taskType = kind === 'work' ? 'work' : 'diagnostic';
    // Open states are one class to the guards: news from one of them is enough.
    const from = OPEN.find((st) => (current[kind]?.[st] ?? 0) > 0);
    if (from !== undefined) {
      for (const state of NEWS) {
        out.push({
          type: 'TASK_STATE',
          taskId: `${phase}-${round}-${kind}`,
          phase,
          round,
          taskType,
          from,
          state,
          seq: 1,
        });
      }
    }
  }
  // A late failure of a task of the phase's previous round: it counts for nothing.
  if (round > 0) {
    out.push({
      type: 'TASK_STATE',
      taskId: `${phase}-old`,
      phase,
      round: round - 1,
      taskType: 'work',
      from: 'running',
      state: 'failed',
      seq: 9,
    });
  }
  for (const p of PHASES) out.push({ type: `xstate.after.stuckCheck.ticket.${p}` });
  // SEND_BACK only on entering a phase, once per path: enough to take every branch, and the
  // graph stays small.
  const fresh = c.counts[phase] === undefined && c.diagnostics === 0;
  if (fresh && c.returns === undefined) {
    for (const p of PHASES) out.push({ type: 'SEND_BACK', toPhase: p, reason: 'rework' });
  }
  return out;
}

function advanceEmits(from: Phase): DomainEventType[] {
  return nextPhaseState(from) === 'done' ? ['ticket.done'] : ['ticket.phase_changed'];
}

/** CONTRACT 1 and the README's system events, per transition: target and domain events. */
function emits(ref: TransitionRef, before: AnyMachineSnapshot): DomainEventType[] {
  const src = ref.source;
  const target = (to: string | null) => expect(ref.target, `${ref.key}: target`).toBe(to);
  if (ref.eventType === ALWAYS) {
    // The automatic advance (CONTRACT 1): out of a complete phase, in the step that made it so.
    expect(phaseComplete(ctx(before), src)).toBe(true);
    target(nextPhaseState(src as Phase));
    return advanceEmits(src as Phase);
  }
  if (ref.eventType.startsWith('xstate.after.stuckCheck.')) {
    target(src);
    return ref.branch === 0 ? ['ticket.diagnostic_spawned'] : [];
  }
  switch (ref.eventType) {
    case 'START':
      target('requirements');
      return ['ticket.phase_changed'];
    case 'ADVANCE':
      // Shadowed by the automatic advance (model-support `shadowedTransitions`): never taken.
      throw new Error(`${ref.key}: a manual ADVANCE was taken at rest`);
    case 'BLOCK':
      target('blocked');
      return ['ticket.blocked'];
    case 'UNBLOCK':
      target(ctx(before).phase);
      return ['ticket.unblocked'];
    case 'CANCEL':
      target('cancelled');
      return ['ticket.cancelled'];
    case 'SEND_BACK':
      // CONTRACT 1 and 5: from a phase after the first to an earlier one.
      expect(PHASES.indexOf(ref.target as Phase)).toBeLessThan(PHASES.indexOf(src as Phase));
      return ['ticket.sent_back'];
    case 'TASK_ADDED':
      target(isPhase(src) ? src : null);
      return [];
    case 'TASK_STATE':
      if (!isPhase(src)) {
        target(null);
        return [];
      }
      // The news is recorded; a completion that finishes the phase is the automatic advance's.
      if (ref.branch === 0) {
        target('blocked');
        return ['ticket.blocked'];
      }
      target(src);
      return [];
    default:
      throw new Error(`${ref.key} is not in the contract`);
  }
}

const spec: ModelSpec<'ticket'> = {
  entityType: 'ticket',
  input: INPUT,
  events,
  core: (s) => {
    const c = ctx(s);
    const current = c.phase ?? 'requirements';
    const rounds = JSON.stringify(c.rounds ?? {});
    // Open states are one class to the guards (and news from any of them reaches the same
    // transitions): counting them as one keeps the graph small.
    const counts = Object.entries(c.counts)
      .map(([p, byKind]) => {
        const kinds = KINDS.map((k) => {
          const n = byKind?.[k] ?? {};
          const open = OPEN.reduce((sum, st) => sum + (n[st] ?? 0), 0);
          const rest = Object.entries(n).filter(([st]) => !OPEN.includes(st as TaskState));
          return `${k[0]}:${open}o${rest.map(([st, x]) => `${x}${st[0]}${st[1]}`).join('')}`;
        });
        return `${p}=${kinds.join('/')}`;
      })
      .sort()
      .join(',');
    return `${String(s.value)} ${c.phase ?? '-'} d${c.diagnostics}/${c.openDiagnostics} r${rounds} ${counts}${current === c.phase ? '' : '?'}`;
  },
  emits,
  timed: Object.fromEntries(
    PHASES.map((p) => [p, { delay: 'stuckCheck', ms: (c) => c.stuckAfterMs as number }]),
  ),
  tokenEvents: [],
  check: (ref, event, before, d, chain) => {
    const was = ctx(before);
    const now = d.snapshot.context as unknown as TicketContext;
    const changed = d.emitted.filter(
      (e) => e.type === 'ticket.phase_changed' || e.type === 'ticket.done',
    );
    // START moves one phase; each automatic advance one more, each once, in phase order.
    const advances = chain.filter((r) => r.eventType === ALWAYS);
    expect(changed).toHaveLength(advances.length + (ref.eventType === 'START' ? 1 : 0));
    let from = ref.eventType === 'START' ? 'backlog' : ref.target;
    for (const e of changed) {
      const to = from === 'backlog' ? 'requirements' : nextPhaseState(from as Phase);
      expect(e.data).toEqual({ from, to });
      from = to;
    }
    if (changed.length > 0) expect(from).toBe(d.state);
    if (d.state === 'blocked') expect(now.phase).toBe(was.phase);
    // UNBLOCK returns to the phase it left (which the automatic advance may leave at once).
    if (ref.eventType === 'UNBLOCK') expect(ref.target).toBe(was.phase);
    // No state at rest is a complete phase.
    if (isPhase(d.state)) expect(phaseComplete(now, d.state)).toBe(false);
    if (ref.branch === 0 && ref.eventType.startsWith('xstate.after.stuckCheck.')) {
      expect(d.emitted[0]?.data.taskId).toBe(diagnosticTaskId(INPUT.id, now.diagnostics));
      const phase = was.phase!;
      expect(now.counts[phase]?.diagnostic?.pending).toBe(
        (was.counts[phase]?.diagnostic?.pending ?? 0) + 1,
      );
      expect(now.openDiagnostics).toBe(1);
    }
    // News of an older round changes no count.
    if (event.type === 'TASK_STATE' && event.round !== roundOf(was, String(event.phase))) {
      expect(now.counts).toEqual(was.counts);
      expect(d.emitted).toEqual([]);
    }
    if (event.type === 'TASK_STATE' && ref.target !== 'blocked') {
      expect(d.state).toBe(chain.at(-1)!.target ?? ref.source);
    }
  },
};

describe('ticket machine, model-based', () => {
  it('every path replays through decide() and every other event is refused', {
    timeout: 240_000,
  }, () => {
    const report = runModel(spec);
    console.log(summary('ticket', report));
    expect(report.missingStates).toEqual([]);
    expect(report.missingTransitions).toEqual([]);
    expect(report.states[0]).toBe(8);
    expect(report.transitions[0]).toBe(report.transitions[1]);
    expect(report.rejectedPairs).toBeGreaterThan(0);
  });
});
