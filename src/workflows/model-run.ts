/**
 * A model-based run of a compiled workflow: XState's graph walker generates the shortest
 * path to every (state, transition) the machine can take under a generated event set, each
 * path is replayed through `decide()` (the server's own step, with the workflow's machine),
 * and every event a reached state does not take is sent to `decide()` and must be refused
 * with nothing changed. Used by `orchestrator workflow check` and by the tests.
 *
 * To keep the graph finite and small, loop limits are walked with at most
 * `MODEL_MAX_LOOPS` (the transitions are the same for any limit; only the count differs),
 * an operator SEND_BACK is tried once per path, and each phase round gets one work task.
 */
import {
  type AnyMachineSnapshot,
  type AnyStateMachine,
  type AnyStateNode,
  type EventObject,
  initialTransition,
  transition,
} from 'xstate';
import { getShortestPaths } from 'xstate/graph';
import {
  type DecideEvent,
  type Decision,
  decide,
  decideInitial,
  type PersistedSnapshot,
  restore,
} from '../actors/decide.js';
import { IllegalTransition } from '../errors.js';
import { workflowMachineEntry } from '../machines/index.js';
import type { TaskState } from '../machines/task.js';
import {
  APPROVAL_TIMEOUT_DELAY,
  type CompiledWorkflow,
  compileWorkflow,
  DIAGNOSTIC_TASK_TYPE,
  type TicketContext,
  type TicketInput,
} from '../machines/workflow.js';
import { isGate, type WorkflowDefinition } from '../machines/workflow-definition.js';
import type { Finding } from './definition.js';

export const MODEL_MAX_LOOPS = 2;
/** The graph walk stops (and says so) past this many vertices. */
export const MODEL_MAX_VERTICES = 200_000;
const MAX_SEQ = 2;
const NEWS: readonly TaskState[] = ['running', 'completed', 'failed', 'cancelled'];

export interface ModelRunReport {
  states: [number, number];
  transitions: [number, number];
  paths: number;
  /** Paths that are not the prefix of another. */
  maximal: number;
  rejectedPairs: number;
  rejectionChecks: number;
  missingStates: string[];
  missingTransitions: string[];
  findings: Finding[];
}

const INPUT: TicketInput = {
  id: 'model-ticket',
  title: 'model run',
  description: null,
  stuckAfterMs: 60_000,
  // Events carry no time: one diagnostic may spawn, the cooldown keeps out a second.
  diagnosticCooldownMs: 1_000,
  at: 0,
};

/** The same definition with every loop limit at most MODEL_MAX_LOOPS. */
function clampLoops(def: WorkflowDefinition): WorkflowDefinition {
  const clamp = <T extends { maxLoops: number }>(r: T | undefined) =>
    r && { ...r, maxLoops: Math.min(r.maxLoops, MODEL_MAX_LOOPS) };
  return {
    ...def,
    phases: def.phases.map((p) =>
      isGate(p)
        ? { ...p, ...(p.onReject ? { onReject: clamp(p.onReject) } : {}) }
        : { ...p, ...(p.onFail ? { onFail: clamp(p.onFail) } : {}) },
    ),
  };
}

interface TransitionRef {
  key: string;
  source: string;
}

function refOf(source: string, t: { source: AnyStateNode; eventType: string }): TransitionRef {
  const branch = (t.source.transitions.get(t.eventType) ?? []).indexOf(t as never);
  return { key: `${source}: ${t.eventType}#${branch}`, source };
}

/** Every transition the definition offers, per non-final state (nearest handler wins). */
export function definedTransitions(machine: AnyStateMachine): string[] {
  const out: string[] = [];
  for (const node of Object.values(machine.root.states) as AnyStateNode[]) {
    if (node.type === 'final') continue;
    const seen = new Set<string>();
    for (let n: AnyStateNode | undefined = node; n; n = n.parent) {
      for (const [eventType, defs] of n.transitions) {
        if (seen.has(eventType)) continue;
        seen.add(eventType);
        for (const def of defs) out.push(refOf(node.key, def as never).key);
      }
    }
  }
  return out;
}

function taken(
  machine: AnyStateMachine,
  snapshot: AnyMachineSnapshot,
  event: EventObject,
): TransitionRef | null {
  if (snapshot.status !== 'active') return null;
  const [next] = transition(machine, snapshot as never, event as never);
  if (next === snapshot) return null;
  const data = machine.getTransitionData(snapshot as never, event as never);
  return data[0] ? refOf(String(snapshot.value), data[0] as never) : null;
}

function ctx(s: AnyMachineSnapshot): TicketContext {
  return s.context as TicketContext;
}

function clone<T>(value: T): T {
  return JSON.parse(JSON.stringify(value)) as T;
}

/** Runs the model of `compiled` (its definition with loop limits clamped). */
export function runWorkflowModel(compiled: CompiledWorkflow): ModelRunReport {
  const model = compileWorkflow(clampLoops(compiled.definition), compiled.version);
  const machine = model.machine as unknown as AnyStateMachine;
  const entry = workflowMachineEntry(model);
  const { phases } = model;
  const gates = compiled.definition.phases.filter(isGate).map((p) => p.name);
  const timedGates = compiled.definition.phases
    .filter(isGate)
    .filter((p) => p.approval.timeoutMs !== undefined)
    .map((p) => p.name);
  const workPhases = phases.filter((p) => !gates.includes(p));
  const findings: Finding[] = [];

  const events = (s: AnyMachineSnapshot): DecideEvent[] => {
    if (s.status !== 'active') return [];
    const c = ctx(s);
    const phase = c.phase ?? phases[0]!;
    const current = Object.entries(c.tasks).filter(([, t]) => t.phase === phase && !t.superseded);
    const out: DecideEvent[] = [
      { type: 'START' },
      { type: 'ADVANCE' },
      { type: 'BLOCK', reason: 'model' },
      { type: 'UNBLOCK' },
      { type: 'CANCEL', reason: 'model' },
      { type: 'APPROVE', by: 'model' },
      { type: 'REJECT', by: 'model', reason: 'model' },
    ];
    if (!current.some(([, t]) => t.type !== DIAGNOSTIC_TASK_TYPE)) {
      const n = Object.values(c.tasks).filter((t) => t.phase === phase).length;
      out.push({ type: 'TASK_ADDED', taskId: `${phase}-${n}`, phase, taskType: 'work' });
    }
    for (const [taskId, task] of current) {
      out.push({ type: 'TASK_STATE', taskId, state: 'running', seq: task.seq });
      if (task.seq >= MAX_SEQ) continue;
      for (const state of NEWS) out.push({ type: 'TASK_STATE', taskId, state, seq: task.seq + 1 });
    }
    if (c.returns === undefined && current.length === 0 && c.diagnostics === 0) {
      for (const p of phases) out.push({ type: 'SEND_BACK', toPhase: p, reason: 'model' });
    }
    if (c.loops === undefined) {
      for (const p of workPhases) out.push({ type: `xstate.after.stuckCheck.ticket.${p}` });
    }
    for (const p of timedGates) {
      out.push({ type: `xstate.after.${APPROVAL_TIMEOUT_DELAY}.ticket.${p}` });
    }
    return out;
  };

  const core = (s: AnyMachineSnapshot): string => {
    const c = ctx(s);
    const phase = c.phase ?? phases[0]!;
    const tasks = Object.entries(c.tasks)
      .filter(([, t]) => t.phase === phase && !t.superseded)
      .sort(([a], [b]) => a.localeCompare(b))
      .map(([id, t]) => `${id}=${t.state}@${t.seq}`)
      .join(',');
    const openDiag = Object.values(c.tasks).some(
      (t) => t.type === DIAGNOSTIC_TASK_TYPE && t.state !== 'completed' && t.state !== 'cancelled',
    );
    return `${String(s.value)} ${c.phase ?? '-'} d${c.diagnostics}${openDiag ? '!' : ''} L${JSON.stringify(c.loops ?? {})} ${c.returns ? 'R' : ''} [${tasks}]`;
  };

  const seen = new WeakMap<object, string>();
  const serialize = (s: AnyMachineSnapshot, e?: EventObject, prev?: AnyMachineSnapshot) => {
    const known = seen.get(s);
    if (known !== undefined) return known;
    const via = e && prev ? (taken(machine, prev, e)?.key ?? 'none') : 'init';
    const out = `${core(s)} <- ${via}`;
    seen.set(s, out);
    return out;
  };

  let paths: ReturnType<typeof getShortestPaths>;
  try {
    paths = getShortestPaths(machine, {
      events: events as never,
      input: INPUT,
      serializeState: serialize as never,
      limit: MODEL_MAX_VERTICES,
    });
  } catch (error) {
    findings.push({
      path: '(model)',
      message: `the model run did not finish: ${(error as Error).message}`,
    });
    paths = [];
  }

  const statesSeen = new Set<string>();
  const transitionsSeen = new Set<string>();
  const reachable = new Map<string, PersistedSnapshot>();
  const fail = (where: string, message: string) => {
    if (findings.length < 50) findings.push({ path: '(model)', message: `${where}: ${message}` });
  };
  const keyOf = (steps: readonly { event: EventObject }[]) =>
    steps.map((st) => JSON.stringify(st.event)).join(' > ');
  const parents = new Set(paths.map((p) => keyOf(p.steps.slice(0, -1))));
  const replayed = new Map<string, { decision: Decision; model: AnyMachineSnapshot }>();
  let maximal = 0;
  for (const path of [...paths].sort((a, b) => a.steps.length - b.steps.length)) {
    const key = keyOf(path.steps);
    if (!parents.has(key)) maximal++;
    const step = path.steps.at(-1)!;
    const graphState = step.state as AnyMachineSnapshot;
    let r: { decision: Decision; model: AnyMachineSnapshot };
    const where = path.steps.map((st) => st.event.type).join(' > ');
    if (path.steps.length === 1) {
      r = {
        decision: decideInitial('ticket', INPUT, entry),
        model: initialTransition(machine, INPUT)[0] as AnyMachineSnapshot,
      };
    } else {
      const parent = replayed.get(keyOf(path.steps.slice(0, -1)));
      if (!parent) {
        fail(where, 'its parent path was not replayed');
        continue;
      }
      const event = step.event as unknown as DecideEvent;
      const ref = taken(machine, parent.model, event);
      if (!ref) {
        fail(where, 'a generated step is not a transition');
        continue;
      }
      const before = clone(parent.decision.snapshot);
      let decision: Decision;
      try {
        decision = decide('ticket', INPUT.id, parent.decision.snapshot, event, undefined, entry);
      } catch (error) {
        fail(where, `decide() refused a transition the machine takes: ${String(error)}`);
        continue;
      }
      if (JSON.stringify(parent.decision.snapshot) !== JSON.stringify(before)) {
        fail(where, 'decide() changed its input');
      }
      transitionsSeen.add(ref.key);
      r = {
        decision,
        model: transition(machine, parent.model as never, event as never)[0] as AnyMachineSnapshot,
      };
    }
    if (r.decision.state !== String(graphState.value)) {
      fail(where, `decide() reached ${r.decision.state}, the machine ${String(graphState.value)}`);
    }
    if (JSON.stringify(r.decision.snapshot.context) !== JSON.stringify(clone(r.model.context))) {
      fail(where, 'decide() and the machine disagree on the context');
    }
    statesSeen.add(r.decision.state);
    const c = core(graphState);
    if (!reachable.has(c)) reachable.set(c, r.decision.snapshot);
    replayed.set(key, r);
  }

  // The complement: every event a reachable state does not take is refused, nothing written.
  const types = [...(machine as unknown as { events: string[] }).events].sort();
  const rejectedPairs = new Set<string>();
  let rejectionChecks = 0;
  for (const [c, persisted] of reachable) {
    const snapshot = restore('ticket', persisted, entry);
    const generated = events(snapshot);
    for (const type of types) {
      const candidates = generated.filter((e) => e.type === type);
      if (candidates.length === 0) candidates.push({ type });
      for (const event of candidates) {
        if (taken(machine, snapshot, event) !== null) continue;
        const before = JSON.stringify(persisted);
        let error: unknown;
        try {
          decide('ticket', INPUT.id, persisted, event, undefined, entry);
        } catch (e) {
          error = e;
        }
        if (!(error instanceof IllegalTransition)) {
          fail(`${c} + ${type}`, 'an event the state does not take was not refused');
        }
        if (JSON.stringify(persisted) !== before) fail(`${c} + ${type}`, 'a refusal changed state');
        rejectedPairs.add(`${String(snapshot.value)}|${type}`);
        rejectionChecks++;
      }
    }
  }

  const allStates = Object.keys(machine.root.states);
  const allTransitions = definedTransitions(machine);
  const missingStates = allStates.filter((s) => !statesSeen.has(s));
  const missingTransitions = allTransitions.filter((t) => !transitionsSeen.has(t));
  for (const s of missingStates) {
    findings.push({ path: '(model)', message: `state ${s} was never reached` });
  }
  for (const t of missingTransitions) {
    findings.push({ path: '(model)', message: `transition ${t} was never taken` });
  }
  return {
    states: [allStates.length - missingStates.length, allStates.length],
    transitions: [allTransitions.length - missingTransitions.length, allTransitions.length],
    paths: paths.length,
    maximal,
    rejectedPairs: rejectedPairs.size,
    rejectionChecks,
    missingStates,
    missingTransitions,
    findings,
  };
}

export function modelSummary(name: string, r: ModelRunReport): string {
  return (
    `${name} machine: ${r.states[0]}/${r.states[1]} states, ` +
    `${r.transitions[0]}/${r.transitions[1]} transitions, ${r.paths} paths (${r.maximal} maximal), ` +
    `${r.rejectedPairs} rejected (state,event) pairs (${r.rejectionChecks} refusals checked)`
  );
}
