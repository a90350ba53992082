/**
 * Shared machinery of the model-based machine tests: the transitions a machine defines, the
 * transition a step of a generated path took, a graph serialization that keeps every
 * transition reachable as its own vertex, and the replay of a path through `decide()`.
 */
import { getShortestPaths } from '@xstate/graph';
import { expect } from 'vitest';
import {
  type AnyMachineSnapshot,
  type AnyStateMachine,
  type AnyStateNode,
  type EventObject,
  getInitialMicrosteps,
  getMicrosteps,
  initialTransition,
  transition,
} from 'xstate';
import {
  allowedEvents,
  allowedEventsOf,
  type DecideEvent,
  type Decision,
  decide,
  decideInitial,
  type EntityInput,
  type PersistedSnapshot,
  restore,
} from '../../src/actors/decide.js';
import { IllegalTransition, StaleToken } from '../../src/errors.js';
import type { DomainEventType } from '../../src/machines/domain-events.js';
import { type EntityType, MACHINES } from '../../src/machines/index.js';

/**
 * One transition of the definition: a state, an event descriptor and a guarded branch. An
 * eventless (`always`) transition has the event type `always`.
 */
export interface TransitionRef {
  /** `state: EVENT#branch`, e.g. `running: FAIL#1`, `design: always#0`. */
  key: string;
  source: string;
  eventType: string;
  branch: number;
  /** The target state, or null for a transition that only runs actions. */
  target: string | null;
  reenter: boolean;
}

interface TransitionDef {
  source: AnyStateNode;
  eventType: string;
  target?: readonly AnyStateNode[];
  reenter: boolean;
}

/** The event type a model test names an eventless transition by. */
export const ALWAYS = 'always';

function refOf(sourceState: string, t: TransitionDef): TransitionRef {
  const eventless = (t.source.always ?? []).includes(t as never);
  const eventType = eventless ? ALWAYS : t.eventType;
  const branch = eventless
    ? (t.source.always ?? []).indexOf(t as never)
    : (t.source.transitions.get(t.eventType) ?? []).indexOf(t as never);
  return {
    key: `${sourceState}: ${eventType}#${branch}`,
    source: sourceState,
    eventType,
    branch,
    target: t.target?.[0]?.key ?? null,
    reenter: t.reenter,
  };
}

/** Every top-level state of the machine. */
export function definedStates(machine: AnyStateMachine): string[] {
  return Object.keys(machine.root.states);
}

export function finalStates(machine: AnyStateMachine): string[] {
  return Object.values(machine.root.states)
    .filter((n) => n.type === 'final')
    .map((n) => n.key);
}

/**
 * Every transition the definition offers: for each non-final state, each event descriptor it
 * or an ancestor handles (the nearest handler wins, as in XState), each guarded branch of it.
 * `after` transitions appear under their `xstate.after.<delay>.<id>` descriptor, eventless
 * ones under `always`.
 */
export function definedTransitions(machine: AnyStateMachine): Map<string, TransitionRef> {
  const out = new Map<string, TransitionRef>();
  for (const node of Object.values(machine.root.states)) {
    if (node.type === 'final') continue;
    for (const def of node.always ?? []) {
      const ref = refOf(node.key, def as unknown as TransitionDef);
      out.set(ref.key, ref);
    }
    const seen = new Set<string>();
    for (let n: AnyStateNode | undefined = node; n; n = n.parent) {
      for (const [eventType, defs] of n.transitions) {
        if (seen.has(eventType)) continue;
        seen.add(eventType);
        for (const def of defs) {
          const ref = refOf(node.key, def as unknown as TransitionDef);
          out.set(ref.key, ref);
        }
      }
    }
  }
  return out;
}

/**
 * Transitions no state at rest can take: an event's branch guarded by the very guard of an
 * eventless transition of the same state (the ticket's manual ADVANCE, guarded like the
 * automatic advance). Guards read only the context, and the eventless transition leaves the
 * state in the step that would make that guard true, so the branch is never enabled at rest;
 * the model checks instead that the event is refused in every reached vertex of the state.
 */
export function shadowedTransitions(machine: AnyStateMachine): Map<string, TransitionRef> {
  const out = new Map<string, TransitionRef>();
  const guardName = (g: unknown): string | undefined =>
    typeof g === 'string' ? g : (g as { type?: string } | undefined)?.type;
  for (const node of Object.values(machine.root.states)) {
    const eventless = new Set(
      (node.always ?? []).map((t) => guardName(t.guard)).filter((g) => g !== undefined),
    );
    if (eventless.size === 0) continue;
    for (const [eventType, defs] of node.transitions) {
      for (const def of defs) {
        if (!eventless.has(guardName(def.guard) ?? '')) continue;
        const ref = refOf(node.key, def as unknown as TransitionDef);
        out.set(ref.key, { ...ref, eventType });
      }
    }
  }
  return out;
}

/**
 * The eventless transitions taken after an event's own microstep (or after creation), in
 * order: each microstep after the first is one eventless step (the machines raise nothing).
 * A state's eventless branch is the first whose target is where the step went.
 */
function eventlessTaken(
  machine: AnyStateMachine,
  microsteps: readonly [AnyMachineSnapshot, unknown][],
): TransitionRef[] {
  const out: TransitionRef[] = [];
  for (let i = 1; i < microsteps.length; i++) {
    const from = microsteps[i - 1]![0];
    const to = String(microsteps[i]![0].value);
    const node = machine.root.states[String(from.value)];
    const defs = node?.always ?? [];
    const def = defs.find((t) => t.target?.[0]?.key === to) ?? defs[0];
    if (def) out.push(refOf(String(from.value), def as unknown as TransitionDef));
  }
  return out;
}

/** The eventless transitions creation takes (after entering the initial state). */
export function initialEventless(machine: AnyStateMachine, input: unknown): TransitionRef[] {
  const steps = getInitialMicrosteps(machine, input as never) as unknown as [
    AnyMachineSnapshot,
    unknown,
  ][];
  return eventlessTaken(machine, steps);
}

/** What an event sets off: its own transition, then every eventless one it leads to. */
export function takenChain(
  machine: AnyStateMachine,
  snapshot: AnyMachineSnapshot,
  event: EventObject,
): TransitionRef[] {
  const own = takenTransition(machine, snapshot, event);
  if (own === null) return [];
  const steps = getMicrosteps(machine, snapshot as never, event as never) as unknown as [
    AnyMachineSnapshot,
    unknown,
  ][];
  return [own, ...eventlessTaken(machine, steps)];
}

/** Every event type the machine knows, `xstate.after.*` included. */
export function eventTypes(machine: AnyStateMachine): string[] {
  return [...(machine as unknown as { events: string[] }).events].sort();
}

/** The transition `event` takes from `snapshot`, or null when the machine refuses it. */
export function takenTransition(
  machine: AnyStateMachine,
  snapshot: AnyMachineSnapshot,
  event: EventObject,
): TransitionRef | null {
  // A machine that reached a final state takes nothing, as a live actor would (the pure
  // transition() does not check and would take a root-level transition out of it).
  if (snapshot.status !== 'active') return null;
  const [next] = transition(machine, snapshot as never, event as never);
  if (next === snapshot) return null;
  const taken = machine.getTransitionData(snapshot as never, event as never);
  expect(taken, `exactly one transition for ${event.type}`).toHaveLength(1);
  return refOf(String(snapshot.value), taken[0] as unknown as TransitionDef);
}

/**
 * A state serialization for the graph in which a vertex is "this state, reached by this
 * transition". Every transition the model can take then leads to a vertex of its own, so
 * the shortest paths to all vertices traverse every transition (self-loops such as a
 * HEARTBEAT included). `core` keeps only what matters, so the graph stays finite. An event
 * the machine ignores returns the same snapshot object, which keeps its first serialization.
 */
export function transitionSerializer(
  machine: AnyStateMachine,
  core: (s: AnyMachineSnapshot) => string,
) {
  const seen = new WeakMap<object, string>();
  return (state: AnyMachineSnapshot, event?: EventObject, prev?: AnyMachineSnapshot): string => {
    const known = seen.get(state);
    if (known !== undefined) return known;
    const via = event && prev ? (takenTransition(machine, prev, event)?.key ?? 'none') : 'init';
    const serialized = `${core(state)} <- ${via}`;
    seen.set(state, serialized);
    return serialized;
  };
}

export interface Timed {
  /** The delay name of the state's `after` transition. */
  delay: string;
  /** The delay in ms, from the context the state is entered with. */
  ms: (context: Record<string, unknown>) => number;
}

export interface ModelSpec<T extends EntityType> {
  entityType: T;
  input: EntityInput<T>;
  events: (s: AnyMachineSnapshot) => DecideEvent[];
  core: (s: AnyMachineSnapshot) => string;
  /** The domain events a transition must emit. */
  emits: (ref: TransitionRef, before: AnyMachineSnapshot) => DomainEventType[];
  /** States with an `after` timer. */
  timed: Record<string, Timed>;
  /** Event types that carry a fencing token. */
  tokenEvents: readonly string[];
  /** What creation emits; `<entityType>.created` alone unless given. */
  initialEmits?: DomainEventType[];
  /**
   * Further checks of one step: `before` is the model's state before the event, `chain` the
   * event's transition followed by the eventless ones it led to.
   */
  check?: (
    ref: TransitionRef,
    event: DecideEvent,
    before: AnyMachineSnapshot,
    d: Decision,
    chain: readonly TransitionRef[],
  ) => void;
}

export interface ModelReport {
  states: [number, number];
  transitions: [number, number];
  paths: number;
  /** Paths that are not the prefix of another. */
  replayed: number;
  rejectedPairs: number;
  rejectionChecks: number;
  staleChecks: number;
  missingStates: string[];
  missingTransitions: string[];
  /** Transitions left out of the count as never enabled at rest (`shadowedTransitions`). */
  shadowed: string[];
}

function timerKey(machine: AnyStateMachine, state: string, delay: string): string {
  return `xstate.after.${delay}.${machine.id}.${state}`;
}

/**
 * The timers a chain of transitions leaves: each move cancels the timer of the state it
 * leaves, then schedules the one of the state it enters (what `decide()` folds them into).
 */
function checkTimers<T extends EntityType>(
  spec: ModelSpec<T>,
  machine: AnyStateMachine,
  chain: readonly TransitionRef[],
  decision: Decision,
  where: string,
): void {
  const schedule = new Map<string, { key: string; event: { type: string }; delayMs: number }>();
  const cancel = new Set<string>();
  // The machine's deadline delay (a task's lease) is a column, not a timer row.
  const deadlineDelay = MACHINES[spec.entityType].deadline?.delay;
  let deadline: number | null | undefined;
  for (const ref of chain) {
    const moved = ref.target !== null && (ref.target !== ref.source || ref.reenter);
    if (!moved) continue;
    const left = spec.timed[ref.source];
    if (left) {
      if (left.delay === deadlineDelay) {
        deadline = null;
      } else {
        const key = timerKey(machine, ref.source, left.delay);
        schedule.delete(key);
        cancel.add(key);
      }
    }
    const entered = spec.timed[ref.target!];
    if (entered) {
      if (entered.delay === deadlineDelay) {
        deadline = entered.ms(decision.snapshot.context);
      } else {
        const key = timerKey(machine, ref.target!, entered.delay);
        schedule.set(key, {
          key,
          event: { type: key },
          delayMs: entered.ms(decision.snapshot.context),
        });
        cancel.delete(key);
      }
    }
  }
  expect(decision.deadline, `${where}: deadline`).toEqual(deadline);
  expect(decision.schedule, `${where}: timers scheduled`).toEqual([...schedule.values()]);
  expect(decision.cancel, `${where}: timers cancelled`).toEqual([...cancel]);
}

function clone<T>(value: T): T {
  return JSON.parse(JSON.stringify(value)) as T;
}

/**
 * Generates the shortest paths of the model, replays each through `decideInitial()` and
 * `decide()` checking every step, then checks that every event each reachable state does not
 * accept is refused with nothing changed. Returns the coverage numbers.
 */
export function runModel<T extends EntityType>(spec: ModelSpec<T>): ModelReport {
  const machine = MACHINES[spec.entityType].machine as AnyStateMachine;
  const paths = getShortestPaths(machine, {
    // A done actor takes no events; decide() refuses them (checked below with the rest).
    events: ((s: AnyMachineSnapshot) => (s.status === 'active' ? spec.events(s) : [])) as never,
    input: spec.input,
    serializeState: transitionSerializer(machine, spec.core) as never,
  });

  const statesSeen = new Set<string>();
  const transitionsSeen = new Set<string>();
  /** One persisted snapshot per reachable core state, as decide() produced it. */
  const reachable = new Map<string, PersistedSnapshot>();
  const entityId = (spec.input as { id: string }).id;

  interface Replayed {
    decision: Decision;
    /** The machine itself stepped with the path's events: the graph merges states with the
     * same `core`, so its snapshot for a vertex may carry another path's context. */
    model: AnyMachineSnapshot;
  }
  const expectSame = (where: string, r: Replayed, graphState: AnyMachineSnapshot) => {
    expect(r.decision.state, `${where}: state`).toBe(String(graphState.value));
    expect(spec.core(restore(spec.entityType, r.decision.snapshot)), `${where}: core`).toBe(
      spec.core(graphState),
    );
    expect(r.decision.snapshot.status, `${where}: status`).toBe(r.model.status);
    expect(r.decision.snapshot.context, `${where}: context`).toEqual(clone(r.model.context));
    statesSeen.add(r.decision.state);
    if (!reachable.has(spec.core(graphState))) {
      reachable.set(spec.core(graphState), r.decision.snapshot);
    }
  };

  // Shortest paths form a tree (each is its parent's path plus one step) and decide() is
  // pure, so each path is replayed from its parent's result: every step is checked once.
  const keyOf = (steps: readonly { event: EventObject }[]) =>
    steps.map((st) => JSON.stringify(st.event)).join(' > ');
  const replayed = new Map<string, Replayed>();
  const byLength = [...paths].sort((x, y) => x.steps.length - y.steps.length);
  let leaves = 0;
  const parents = new Set(paths.map((p) => keyOf(p.steps.slice(0, -1))));
  for (const path of byLength) {
    const key = keyOf(path.steps);
    if (!parents.has(key)) leaves++;
    const step = path.steps.at(-1)!;
    const graphState = step.state as AnyMachineSnapshot;
    if (path.steps.length === 1) {
      expect(step.event.type).toBe('xstate.init');
      const init: Replayed = {
        decision: decideInitial(spec.entityType, spec.input),
        model: initialTransition(machine, spec.input)[0] as AnyMachineSnapshot,
      };
      expectSame('xstate.init', init, graphState);
      expect(init.decision.emitted.map((e) => e.type)).toEqual(
        spec.initialEmits ?? [`${spec.entityType}.created`],
      );
      expect(init.decision.schedule).toEqual([]);
      for (const ref of initialEventless(machine, spec.input)) transitionsSeen.add(ref.key);
      replayed.set(key, init);
      continue;
    }
    const parent = replayed.get(keyOf(path.steps.slice(0, -1)));
    expect(parent, `the parent of ${key} was replayed`).toBeDefined();
    const { decision, model } = parent!;
    const event = step.event as unknown as DecideEvent;
    const where = path.steps.map((st) => st.event.type).join(' > ');
    const chain = takenChain(machine, model, event);
    const ref = chain[0];
    expect(ref, `${where}: a path step is a transition`).toBeDefined();
    const before = clone(decision.snapshot);
    const next = decide(spec.entityType, entityId, decision.snapshot, event);
    expect(decision.snapshot, `${where}: decide() does not mutate its input`).toEqual(before);
    // Each eventless step's domain events follow the event's own, judged from the snapshot
    // the step started from.
    const steps = getMicrosteps(machine, model as never, event as never) as unknown as [
      AnyMachineSnapshot,
      unknown,
    ][];
    const expected = chain.flatMap((r, i) => spec.emits(r, i === 0 ? model : steps[i - 1]![0]));
    expect(
      next.emitted.map((e) => e.type),
      `${where}: emitted`,
    ).toEqual(expected);
    checkTimers(spec, machine, chain, next, where);
    spec.check?.(ref!, event, model, next, chain);
    for (const r of chain) transitionsSeen.add(r.key);
    const r: Replayed = {
      decision: next,
      model: transition(machine, model as never, event as never)[0] as AnyMachineSnapshot,
    };
    expectSame(where, r, graphState);
    replayed.set(key, r);
  }

  // The complement: every event a reachable state does not take is refused, nothing written.
  const types = eventTypes(machine);
  const rejectedPairs = new Set<string>();
  let rejectionChecks = 0;
  let staleChecks = 0;
  for (const [core, persisted] of reachable) {
    const snapshot = restore(spec.entityType, persisted);
    // The allowed events looked up by state are those of the rebuilt snapshot, whatever its
    // context (the lookup is filled by the first snapshot of each state).
    expect(allowedEventsOf(spec.entityType, persisted), `${core}: allowed events`).toEqual(
      allowedEvents(spec.entityType, snapshot),
    );
    const generated = spec.events(snapshot);
    const claimLive = spec.tokenEvents.some((t) =>
      definedTransitions(machine).has(`${String(snapshot.value)}: ${t}#0`),
    );
    for (const type of types) {
      const candidates = generated.filter((e) => e.type === type);
      if (candidates.length === 0) candidates.push({ type });
      const stale = spec.tokenEvents.includes(type) ? [{ ...candidates[0]!, token: 'stale' }] : [];
      for (const event of [...candidates, ...stale]) {
        const isStale = event.token === 'stale';
        if (!isStale && takenTransition(machine, snapshot, event) !== null) continue;
        const before = clone(persisted);
        const where = `${core} + ${JSON.stringify(event)}`;
        let error: unknown;
        try {
          decide(spec.entityType, entityId, persisted, event);
        } catch (e) {
          error = e;
        }
        const expected = isStale && claimLive ? StaleToken : IllegalTransition;
        expect(error, `${where}: refused`).toBeInstanceOf(expected);
        if (error instanceof IllegalTransition) {
          expect(error.state).toBe(String(snapshot.value));
          expect(error.event).toBe(type);
        }
        expect(persisted, `${where}: snapshot unchanged`).toEqual(before);
        if (isStale) staleChecks++;
        else rejectedPairs.add(`${String(snapshot.value)}|${type}`);
        rejectionChecks++;
      }
    }
  }

  // A shadowed transition is never taken; its event must have been refused in its state.
  const shadowed = shadowedTransitions(machine);
  for (const ref of shadowed.values()) {
    if (!statesSeen.has(ref.source)) continue;
    expect(rejectedPairs, `${ref.key}: refused at rest`).toContain(
      `${ref.source}|${ref.eventType}`,
    );
  }
  const allStates = definedStates(machine);
  const allTransitions = [...definedTransitions(machine).keys()].filter((t) => !shadowed.has(t));
  return {
    states: [allStates.filter((s) => statesSeen.has(s)).length, allStates.length],
    transitions: [
      allTransitions.filter((t) => transitionsSeen.has(t)).length,
      allTransitions.length,
    ],
    paths: paths.length,
    replayed: leaves,
    rejectedPairs: rejectedPairs.size,
    rejectionChecks,
    staleChecks,
    missingStates: allStates.filter((s) => !statesSeen.has(s)),
    missingTransitions: allTransitions.filter((t) => !transitionsSeen.has(t)),
    shadowed: [...shadowed.keys()],
  };
}

export function summary(name: string, r: ModelReport): string {
  return (
    `${name} machine: ${r.states[0]}/${r.states[1]} states, ` +
    `${r.transitions[0]}/${r.transitions[1]} transitions, ${r.paths} paths (${r.replayed} maximal), ` +
    `${r.rejectedPairs} rejected (state,event) pairs (${r.rejectionChecks} refusals checked, ${r.staleChecks} with a stale token)` +
    (r.shadowed.length > 0
      ? `; ${r.shadowed.length} transitions shadowed by an eventless one (not counted, refused at rest)`
      : '')
  );
}
