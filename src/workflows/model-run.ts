/**
 * A model-based run of a compiled workflow: a breadth-first walk of the ticket machine under a
 * generated event set, every step sent through `decide()` (the server's own step, with the
 * workflow's machine) as well as the machine, and every event a reached state does not take
 * sent to `decide()`, which must refuse it with nothing changed. Used by
 * `orchestrator workflow check` and by the tests.
 *
 * The walk keys its vertices by an abstraction of the ticket (`abstractKey`), not by its full
 * context: loop counters, task ids and sequence numbers would otherwise multiply into a graph
 * that no 32-phase workflow can finish. Events stay concrete, taken from the first ticket that
 * reached each vertex. Loop limits are walked with at most `MODEL_MAX_LOOPS` (the transitions
 * are the same for any limit; only the count differs), an operator SEND_BACK is tried once per
 * ticket, and each phase round gets one work task.
 */
import {
  type AnyMachineSnapshot,
  type AnyStateMachine,
  type AnyStateNode,
  type EventObject,
  getMicrosteps,
  initialTransition,
  transition,
} from 'xstate';
import {
  type DecideEvent,
  type Decision,
  decide,
  decideInitial,
  type PersistedSnapshot,
} from '../actors/decide.js';
import { IllegalTransition } from '../errors.js';
import { workflowMachineEntry } from '../machines/index.js';
import type { TaskState } from '../machines/task.js';
import {
  APPROVAL_TIMEOUT_DELAY,
  type CompiledWorkflow,
  compileWorkflow,
  DIAGNOSTIC_TASK_TYPE,
  roundOf,
  type TaskKind,
  type TicketContext,
  type TicketInput,
} from '../machines/workflow.js';
import { isGate, type WorkflowDefinition } from '../machines/workflow-definition.js';
import type { Finding } from './definition.js';

export const MODEL_MAX_LOOPS = 2;
/**
 * The walk stops past this many abstract vertices and reports itself inconclusive; a 32-phase
 * workflow with loops everywhere needs a few thousand.
 */
export const MODEL_MAX_VERTICES = 100_000;
const NEWS: readonly TaskState[] = ['running', 'completed', 'failed', 'cancelled'];
/** Task states the ticket's guards do not tell apart: not final. */
const OPEN: readonly TaskState[] = ['waiting', 'pending', 'claimed', 'running', 'retry_wait'];
const KINDS: readonly TaskKind[] = ['work', 'diagnostic'];

export interface ModelRunReport {
  states: [number, number];
  /** Taken of defined; the shadowed ones (`shadowedTransitions`) are not counted. */
  transitions: [number, number];
  /** Transitions never enabled at rest, whose events the walk saw refused instead. */
  shadowed: number;
  /** Abstract vertices the walk reached. */
  vertices: number;
  /** Transitions replayed through decide() (every taken event from every vertex). */
  steps: number;
  /** The longest shortest path to a vertex, in events. */
  depth: number;
  rejectedPairs: number;
  rejectionChecks: number;
  missingStates: string[];
  missingTransitions: string[];
  /** Findings about the workflow (never about the walk itself). */
  findings: Finding[];
  /** Set when the walk could not finish: the coverage above is then no verdict. */
  inconclusive?: string;
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
  /** The target state, or null for a transition that only runs actions. */
  target: string | null;
}

function refOf(
  source: string,
  t: { source: AnyStateNode; eventType: string; target?: readonly AnyStateNode[] },
): TransitionRef {
  const target = t.target?.[0]?.key ?? null;
  const always = t.source.always ?? [];
  if (always.includes(t as never)) {
    return { key: `${source}: always#${always.indexOf(t as never)}`, source, target };
  }
  const branch = (t.source.transitions.get(t.eventType) ?? []).indexOf(t as never);
  return { key: `${source}: ${t.eventType}#${branch}`, source, target };
}

const guardName = (g: unknown): string | undefined =>
  typeof g === 'string' ? g : (g as { type?: string } | undefined)?.type;

/**
 * Transitions no ticket at rest can take, with their event type: an event's branch guarded by
 * the guard of an eventless transition of the same state (the manual ADVANCE, guarded like
 * the automatic advance). Guards read only the context and the eventless transition leaves
 * the state in the step that makes that guard true, so the branch is never enabled at rest.
 * They are not counted as transitions; the walk checks the event is refused instead.
 */
export function shadowedTransitions(machine: AnyStateMachine): Map<string, string> {
  const out = new Map<string, string>();
  for (const node of Object.values(machine.root.states) as AnyStateNode[]) {
    const eventless = new Set((node.always ?? []).map((t) => guardName(t.guard)));
    eventless.delete(undefined);
    if (eventless.size === 0) continue;
    for (const [eventType, defs] of node.transitions) {
      for (const def of defs) {
        if (eventless.has(guardName(def.guard))) {
          out.set(refOf(node.key, def as never).key, eventType);
        }
      }
    }
  }
  return out;
}

/**
 * Every transition the definition offers, per non-final state (nearest handler wins), the
 * eventless ones (`state: always#n`) included and the shadowed ones left out.
 */
export function definedTransitions(machine: AnyStateMachine): string[] {
  const out: string[] = [];
  const shadowed = shadowedTransitions(machine);
  for (const node of Object.values(machine.root.states) as AnyStateNode[]) {
    if (node.type === 'final') continue;
    for (const def of node.always ?? []) out.push(refOf(node.key, def as never).key);
    const seen = new Set<string>();
    for (let n: AnyStateNode | undefined = node; n; n = n.parent) {
      for (const [eventType, defs] of n.transitions) {
        if (seen.has(eventType)) continue;
        seen.add(eventType);
        for (const def of defs) {
          const key = refOf(node.key, def as never).key;
          if (!shadowed.has(key)) out.push(key);
        }
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

/**
 * The eventless transitions an event led to after its own (the automatic advance): each
 * microstep after the first is one (the machine raises nothing); a state's eventless branch
 * is the first whose target is where the step went.
 */
function eventlessAfter(
  machine: AnyStateMachine,
  snapshot: AnyMachineSnapshot,
  event: EventObject,
): TransitionRef[] {
  const steps = getMicrosteps(machine, snapshot as never, event as never) as unknown as [
    AnyMachineSnapshot,
    unknown,
  ][];
  const out: TransitionRef[] = [];
  for (let i = 1; i < steps.length; i++) {
    const from = String(steps[i - 1]![0].value);
    const to = String(steps[i]![0].value);
    const defs = (machine.root.states[from] as AnyStateNode | undefined)?.always ?? [];
    const def = defs.find((t) => t.target?.[0]?.key === to) ?? defs[0];
    if (def) out.push(refOf(from, def as never));
  }
  return out;
}

function ctx(s: AnyMachineSnapshot): TicketContext {
  return s.context as TicketContext;
}

/**
 * JSON with sorted keys: a context restored from JSON and the machine's own may hold the same
 * fields in another order (a field cleared to undefined and set again).
 */
function canonical(value: unknown): string {
  return JSON.stringify(value, (_, v: unknown) =>
    v && typeof v === 'object' && !Array.isArray(v)
      ? Object.fromEntries(Object.entries(v).sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0)))
      : v,
  );
}

export interface ModelRunOptions {
  /** Stop (inconclusive) past this many abstract vertices; default MODEL_MAX_VERTICES. */
  maxVertices?: number;
}

/** A loop rule of the definition: `phase` sends the ticket back to `to`. */
interface Rule {
  phase: string;
  lo: number;
  hi: number;
}

/** One vertex of the walk: an abstract state and the first concrete ticket that reached it. */
interface Vertex {
  key: string;
  depth: number;
  decision: PersistedSnapshot;
  model: AnyMachineSnapshot;
}

/**
 * Runs the model of `compiled` (its definition with loop limits clamped).
 *
 * The walk is a breadth-first search over abstract vertices (see `abstractKey`), each holding
 * the first concrete ticket that reached it. From every vertex the generated concrete events
 * go through the machine and through `decide()`, which must agree; an event the machine
 * takes is a covered transition, one it does not take must be refused by `decide()` with
 * nothing changed. A concrete successor whose abstraction is new becomes a vertex.
 */
export function runWorkflowModel(
  compiled: CompiledWorkflow,
  options: ModelRunOptions = {},
): ModelRunReport {
  const maxVertices = options.maxVertices ?? MODEL_MAX_VERTICES;
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
  const rules: Rule[] = [];
  for (const p of compiled.definition.phases) {
    const rule = isGate(p) ? p.onReject : p.onFail;
    if (rule) {
      rules.push({
        phase: p.name,
        lo: phases.indexOf(rule.sendBackTo),
        hi: phases.indexOf(p.name),
      });
    }
  }
  const findings: Finding[] = [];

  /** The rules whose rework span (their target up to their phase) holds the ticket's phase. */
  const inSpan = (c: TicketContext): Rule[] => {
    const at = c.phase === null ? -1 : phases.indexOf(c.phase);
    return rules.filter((r) => r.lo <= at && at <= r.hi);
  };

  const events = (s: AnyMachineSnapshot): DecideEvent[] => {
    if (s.status !== 'active') return [];
    const c = ctx(s);
    const phase = c.phase ?? phases[0]!;
    const current = c.counts[phase] ?? {};
    const round = roundOf(c, phase);
    const out: DecideEvent[] = [
      { type: 'START' },
      { type: 'ADVANCE' },
      { type: 'BLOCK', reason: 'model' },
      { type: 'UNBLOCK' },
      { type: 'CANCEL', reason: 'model' },
      { type: 'APPROVE', by: 'model' },
    ];
    if (current.work === undefined) {
      out.push({ type: 'TASK_ADDED', taskId: `${phase}-${round}`, phase, taskType: 'work' });
    }
    // One rule's rework at a time: a second rule may fire only on a ticket no other rule sent
    // back, so counts never combine (each rule still fires up to its limit and then blocks).
    const rule = rules.find((r) => r.phase === phase);
    const otherFired = Object.entries(c.loops ?? {}).some(([p, n]) => p !== phase && n > 0);
    const mayLoop = !(rule && otherFired && (c.loops?.[phase] ?? 0) < MODEL_MAX_LOOPS);
    // News of an open task of the current round, as the runtime sends it (once per change of
    // the task's recorded state; a task in a final state has no news left).
    for (const kind of KINDS) {
      for (const from of OPEN) {
        if ((current[kind]?.[from] ?? 0) === 0) continue;
        const taskType = kind === 'work' ? 'work' : DIAGNOSTIC_TASK_TYPE;
        for (const state of NEWS) {
          if (state === 'failed' && !mayLoop) continue;
          const taskId = `${phase}-${round}-${kind}`;
          out.push({ type: 'TASK_STATE', taskId, phase, round, taskType, from, state, seq: 1 });
        }
      }
    }
    // An operator SEND_BACK from a phase just entered: every branch is then reachable.
    if (Object.keys(current).length === 0) {
      for (const p of phases) out.push({ type: 'SEND_BACK', toPhase: p, reason: 'model' });
    }
    if (mayLoop) {
      out.push({ type: 'REJECT', by: 'model', reason: 'model' });
      // Timers of other phases are probed as bare events with the refusals.
      if (timedGates.includes(phase)) {
        out.push({ type: `xstate.after.${APPROVAL_TIMEOUT_DELAY}.ticket.${phase}` });
      }
    }
    // Stuck checks outside rework rounds only: the diagnostic then multiplies no loop counts.
    if (workPhases.includes(phase) && inSpan(c).every((r) => (c.loops?.[r.phase] ?? 0) === 0)) {
      out.push({ type: `xstate.after.stuckCheck.ticket.${phase}` });
    }
    return out;
  };

  /**
   * What the guards and the event generator read of a ticket, and nothing that only grows
   * (task ids, `returns` counts, times): the state; the current (or blocked-from) phase; its
   * current round's task counts by kind and state class (the final state, or open); and the
   * count of every loop rule whose rework span
   * holds the phase. A rule's count matters again only once the ticket is back inside its
   * span, so leaving the others out keeps the graph linear in the phases rather than
   * exponential in the rules. A final state takes nothing: its context is left out.
   *
   * Two things guards read are left out on purpose: the diagnostic counter and a diagnostic
   * open in another round. They only decide which branch of a stuck check is taken, both
   * branches are reached in the round that spawned the diagnostic, and a ticket without
   * them is always reached first (it needs fewer events), so merging loses no transition.
   */
  const abstractKey = (s: AnyMachineSnapshot): string => {
    if (s.status !== 'active') return `${s.status}:${String(s.value)}`;
    const c = ctx(s);
    const phase = c.phase ?? phases[0]!;
    const counts = c.counts[phase] ?? {};
    const tasks = KINDS.flatMap((kind) =>
      Object.entries(counts[kind] ?? {}).flatMap(([state, n]) => {
        const cls = OPEN.includes(state as TaskState) ? 'open' : state;
        return Array.from({ length: n ?? 0 }, () => `${kind[0]}:${cls}`);
      }),
    )
      .sort()
      .join(',');
    const loops = inSpan(c)
      .map((r) => `${r.phase}=${c.loops?.[r.phase] ?? 0}`)
      .join(',');
    // The automatic advance's guard reads whether the phase's templates are still to come.
    const pending = c.templatesPending ? ' t' : '';
    return `${String(s.value)} ${c.phase ?? '-'} {${loops}} [${tasks}]${pending}`;
  };

  const fail = (where: string, message: string) => {
    if (findings.length < 50) findings.push({ path: '(model)', message: `${where}: ${message}` });
  };

  const statesSeen = new Set<string>();
  const transitionsSeen = new Set<string>();
  const types = [...(machine as unknown as { events: string[] }).events].sort();
  const handledBy = new Map<string, Set<string>>();
  for (const node of Object.values(machine.root.states) as AnyStateNode[]) {
    const own = new Set<string>();
    for (let n: AnyStateNode | undefined = node; n; n = n.parent) {
      for (const type of n.transitions.keys()) own.add(type);
    }
    handledBy.set(node.key, own);
  }
  const probed = new Set<string>();
  const rejectedPairs = new Set<string>();
  let rejectionChecks = 0;
  let steps = 0;
  let inconclusive: string | undefined;

  const initial = decideInitial('ticket', INPUT, entry);
  const start: Vertex = {
    key: '',
    depth: 0,
    decision: initial.snapshot,
    model: initialTransition(machine, INPUT)[0] as AnyMachineSnapshot,
  };
  start.key = abstractKey(start.model);
  if (initial.state !== String(start.model.value)) {
    fail(
      '(initial)',
      `decide() reached ${initial.state}, the machine ${String(start.model.value)}`,
    );
  }
  const vertices = new Map<string, Vertex>([[start.key, start]]);
  const queue: Vertex[] = [start];

  // Breadth-first, so each vertex's representative is a ticket of a shortest path to it.
  for (let head = 0; head < queue.length; head++) {
    const v = queue[head]!;
    statesSeen.add(String(v.model.value));
    const value = String(v.model.value);
    const generated = events(v.model);
    const byType = new Set(generated.map((e) => e.type));
    // decide() refuses an event type the state does not handle whatever the context, so those
    // are probed on the first vertex of each state; the handled ones, whose guards read the
    // context, on every vertex.
    const handled = handledBy.get(value) ?? new Set<string>();
    const probeAll = !probed.has(value);
    probed.add(value);
    const probes = types
      .filter(
        (t) => !byType.has(t) && (probeAll || (v.model.status === 'active' && handled.has(t))),
      )
      .map((type) => ({ type }));
    const before = JSON.stringify(v.decision);
    for (const event of [...generated, ...probes]) {
      const where = `${v.key} + ${JSON.stringify(event)}`;
      const ref = taken(machine, v.model, event);
      let decision: Decision | undefined;
      let error: unknown;
      try {
        decision = decide('ticket', INPUT.id, v.decision, event, undefined, entry);
      } catch (e) {
        error = e;
      }
      if (ref === null) {
        if (!(error instanceof IllegalTransition)) {
          fail(where, 'an event the state does not take was not refused');
        }
        rejectedPairs.add(`${String(v.model.value)}|${event.type}`);
        rejectionChecks++;
        continue;
      }
      // An event type with no generated instance only probes the refusal; one the machine
      // takes anyway is not part of the model.
      if (!byType.has(event.type)) continue;
      steps++;
      if (!decision) {
        fail(where, `decide() refused a transition the machine takes: ${String(error)}`);
        continue;
      }
      transitionsSeen.add(ref.key);
      const next = transition(machine, v.model as never, event as never)[0] as AnyMachineSnapshot;
      // Ended elsewhere than the event's own target: eventless steps followed (the automatic
      // advance only moves forward, so it never ends where it started).
      if (String(next.value) !== (ref.target ?? ref.source)) {
        for (const r of eventlessAfter(machine, v.model, event)) transitionsSeen.add(r.key);
      }
      if (decision.state !== String(next.value)) {
        fail(where, `decide() reached ${decision.state}, the machine ${String(next.value)}`);
      }
      if (canonical(decision.snapshot.context) !== canonical(next.context)) {
        fail(where, 'decide() and the machine disagree on the context');
      }
      statesSeen.add(decision.state);
      const key = abstractKey(next);
      if (vertices.has(key)) continue;
      if (vertices.size >= maxVertices) {
        inconclusive = `the walk passed ${maxVertices} abstract vertices and stopped`;
        break;
      }
      const w: Vertex = { key, depth: v.depth + 1, decision: decision.snapshot, model: next };
      vertices.set(key, w);
      queue.push(w);
    }
    if (JSON.stringify(v.decision) !== before) fail(v.key, 'decide() changed its input');
    if (inconclusive) break;
  }

  // A shadowed transition is never taken: its event must be refused wherever its state rests.
  for (const [key, eventType] of shadowedTransitions(machine)) {
    const state = key.slice(0, key.indexOf(':'));
    if (statesSeen.has(state) && !rejectedPairs.has(`${state}|${eventType}`)) {
      fail(key, `${eventType} was not refused in ${state}`);
    }
  }
  const allStates = Object.keys(machine.root.states);
  const allTransitions = definedTransitions(machine);
  const missingStates = allStates.filter((s) => !statesSeen.has(s));
  const missingTransitions = allTransitions.filter((t) => !transitionsSeen.has(t));
  // An unfinished walk says nothing about what it did not reach.
  if (!inconclusive) {
    for (const s of missingStates) {
      findings.push({ path: '(model)', message: `state ${s} was never reached` });
    }
    for (const t of missingTransitions) {
      findings.push({ path: '(model)', message: `transition ${t} was never taken` });
    }
  }
  return {
    states: [allStates.length - missingStates.length, allStates.length],
    transitions: [allTransitions.length - missingTransitions.length, allTransitions.length],
    shadowed: shadowedTransitions(machine).size,
    vertices: vertices.size,
    steps,
    depth: queue.at(-1)?.depth ?? 0,
    rejectedPairs: rejectedPairs.size,
    rejectionChecks,
    missingStates,
    missingTransitions,
    findings,
    ...(inconclusive ? { inconclusive } : {}),
  };
}

export function modelSummary(name: string, r: ModelRunReport): string {
  return (
    `${name} machine: ${r.states[0]}/${r.states[1]} states, ` +
    `${r.transitions[0]}/${r.transitions[1]} transitions, ${r.vertices} abstract vertices ` +
    `(depth ${r.depth}), ${r.steps} transitions replayed, ` +
    `${r.rejectedPairs} rejected (state,event) pairs (${r.rejectionChecks} refusals checked)` +
    (r.shadowed > 0
      ? `; ${r.shadowed} manual ADVANCE transitions shadowed by the automatic advance (refused at rest, not counted)`
      : '')
  );
}
