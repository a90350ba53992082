/**
 * `decide`: the one function that applies an event to a persisted snapshot. Every state
 * change in the system goes through it. It is pure (XState's `transition()`, which returns
 * the next snapshot and the actions without running them) and, unlike a live XState actor,
 * never ignores an event silently: an event the state does not accept, or whose guard
 * refuses it, is an `IllegalTransition`; a worker event with a token that is not the live
 * claim's is a `StaleToken`.
 */
import {
  type AnyMachineSnapshot,
  type AnyStateMachine,
  createActor,
  __unsafe_getAllOwnEventDescriptors as ownEventDescriptors,
} from 'xstate';
import { IllegalTransition, StaleToken, UnsupportedSnapshot } from '../errors.js';
import type { DomainEvent } from '../machines/domain-events.js';
import { type EntityType, MACHINES, type MachineEntry } from '../machines/index.js';
import type { TaskInput } from '../machines/task.js';
import type { TicketInput } from '../machines/ticket.js';

/** The JSON an actor persists: XState's persisted snapshot, minus nothing. */
export interface PersistedSnapshot {
  status: 'active' | 'done' | 'error' | 'stopped';
  value: string;
  context: Record<string, unknown>;
  [key: string]: unknown;
}

/** A delayed event (an `after` transition) to be kept as a durable timer row. */
export interface TimerSpec {
  /** XState's send id, e.g. `xstate.after.lease.task.running`; unique per entity. */
  key: string;
  event: { type: string };
  delayMs: number;
}

export interface Decision {
  state: string;
  snapshot: PersistedSnapshot;
  emitted: DomainEvent[];
  /** Timers to (re)schedule: an existing row with the same key is replaced. */
  schedule: TimerSpec[];
  /** Keys of timers this transition cancelled (it left the state that set them). */
  cancel: string[];
  /**
   * The machine's deadline delay (`MachineEntry.deadline`, kept in a column, never in
   * `schedule`/`cancel`): milliseconds until due when this transition (re)set it, null when it
   * cleared it, absent when it left it alone.
   */
  deadline?: number | null;
}

export type EntityInput<T extends EntityType> = T extends 'ticket' ? TicketInput : TaskInput;

export interface DecideEvent {
  type: string;
  [key: string]: unknown;
}

/** The initial snapshot of a new entity and what its creation emits and schedules. */
export function decideInitial<T extends EntityType>(
  entityType: T,
  input: EntityInput<T>,
  entry: MachineEntry = MACHINES[entityType],
): Decision {
  // XState's `initialTransition()` builds a throwaway actor, whose constructor evaluates the
  // context without input: a TypeError thrown and caught on every creation (about 50 µs).
  const inert = inertScope(entry);
  const logic = entry.machine as unknown as {
    getInitialSnapshot(scope: unknown, input: unknown): AnyMachineSnapshot;
  };
  const snapshot = logic.getInitialSnapshot(inert.scope, input);
  return toDecision(entry, entityType, snapshot, [...inert.actions]);
}

/**
 * Applies `event` to a persisted snapshot. Throws `IllegalTransition` or `StaleToken` and
 * then nothing may be written; otherwise returns everything the transition produced.
 * `entry` is the machine to apply it with: the entity type's registered one unless given
 * (a ticket of a user workflow runs its compiled machine, see `workflowMachineEntry`).
 */
export function decide(
  entityType: EntityType,
  entityId: string,
  persisted: PersistedSnapshot,
  event: DecideEvent,
  machineVersion?: number,
  entry: MachineEntry = MACHINES[entityType],
): Decision {
  if (machineVersion !== undefined && machineVersion !== entry.version) {
    throw new UnsupportedSnapshot(entityId, machineVersion, entry.version);
  }
  const current = restore(entityType, persisted, entry);
  // A final state takes nothing. XState's transition() does not check the status itself: it
  // would take a root-level transition (the ticket's CANCEL) out of `done` or `cancelled`.
  if (current.status !== 'active') {
    throw new IllegalTransition(entityId, stateOf(current), event.type, [], false, entityType);
  }
  // CONTRACT 1: only while a claim is live (a state that takes token events: claimed,
  // running) is the token checked before the event. Elsewhere (pending, retry_wait, final)
  // the event is checked first, so COMPLETE on a pending task is illegal, not stale.
  const claimLive = takesTokenEvents(entry, current);
  if (claimLive && entry.tokenEvents.includes(event.type)) {
    const token = (current.context as { token: string | null }).token;
    if (event.token !== token || token === null) {
      throw new StaleToken(entityId, (current.context as { attempt: number }).attempt);
    }
  }
  const [next, actions] = pureTransition(entry, current, event);
  if (next === current) {
    throw new IllegalTransition(
      entityId,
      stateOf(current),
      event.type,
      allowedEvents(entityType, current, entry),
      ownEventDescriptors(current).includes(event.type),
      entityType,
    );
  }
  return toDecision(entry, entityType, next as AnyMachineSnapshot, actions);
}

interface InertScope {
  actions: ExecutableAction[];
  scope: Record<string, unknown>;
}
/** Keyed by machine: compiled workflows each have their own. */
const scopes = new WeakMap<object, InertScope>();

/**
 * XState's `transition()`, minus its cost: it builds a throwaway actor per call, and the
 * actor's constructor evaluates the machine's initial context without input, which throws
 * and is caught inside XState on every call. One inert scope per machine, reused, collects
 * the actions the same way. Machines are pure (no children, no spawns), so reuse is safe.
 */
function pureTransition(
  entry: MachineEntry,
  snapshot: AnyMachineSnapshot,
  event: DecideEvent,
): [AnyMachineSnapshot, ExecutableAction[]] {
  const inert = inertScope(entry);
  const logic = entry.machine as unknown as {
    transition(s: unknown, e: unknown, scope: unknown): AnyMachineSnapshot;
  };
  const next = logic.transition(snapshot, event, inert.scope);
  return [next, [...inert.actions]];
}

/** The machine's reused inert scope, its collected actions emptied. */
function inertScope(entry: MachineEntry): InertScope {
  const { machine } = entry;
  let inert = scopes.get(machine);
  if (!inert) {
    const actions: ExecutableAction[] = [];
    const self = createActor(machine as AnyStateMachine);
    const scope = {
      self,
      defer: () => {},
      id: '',
      logger: () => {},
      sessionId: '',
      stopChild: () => {},
      system: self.system,
      emit: () => {},
      actionExecutor: (action: ExecutableAction) => {
        actions.push(action);
      },
    };
    inert = { actions, scope };
    scopes.set(machine, inert);
  }
  inert.actions.length = 0;
  return inert;
}

/**
 * A fact that depends on the machine and the state alone (never the context), computed once
 * per machine and state value and then looked up.
 */
class PerState<T> {
  private readonly byMachine = new WeakMap<object, Map<string, T>>();

  get(entry: MachineEntry, value: unknown, compute: () => T): T {
    const key = typeof value === 'string' ? value : JSON.stringify(value);
    let byState = this.byMachine.get(entry.machine);
    if (!byState) {
      byState = new Map();
      this.byMachine.set(entry.machine, byState);
    }
    let fact = byState.get(key);
    if (fact === undefined) {
      fact = compute();
      byState.set(key, fact);
    }
    return fact;
  }
}

const tokenStates = new PerState<boolean>();

/**
 * Whether a claim is live in `snapshot` (its state takes a token event). Listing a state's
 * events walks its state nodes' transitions, a tenth of a decide; the answer is looked up.
 */
function takesTokenEvents(entry: MachineEntry, snapshot: AnyMachineSnapshot): boolean {
  if (entry.tokenEvents.length === 0) return false;
  return tokenStates.get(entry, snapshot.value, () =>
    ownEventDescriptors(snapshot).some((e) => entry.tokenEvents.includes(e)),
  );
}

/** Rebuilds a live snapshot from its persisted JSON. */
export function restore(
  entityType: EntityType,
  persisted: PersistedSnapshot,
  entry: MachineEntry = MACHINES[entityType],
): AnyMachineSnapshot {
  return entry.machine.resolveState({
    value: persisted.value,
    context: persisted.context,
  } as never) as AnyMachineSnapshot;
}

/** The public events the snapshot's state accepts (system and delayed events left out). */
export function allowedEvents(
  entityType: EntityType,
  snapshot: AnyMachineSnapshot,
  entry: MachineEntry = MACHINES[entityType],
): string[] {
  if (snapshot.status !== 'active') return [];
  const system = entry.systemEvents;
  return ownEventDescriptors(snapshot)
    .filter((e) => !e.startsWith('xstate.') && !system.includes(e))
    .sort();
}

/** Allowed events by machine, then by state: they depend on the state alone (guards aside). */
const allowedByState = new PerState<readonly string[]>();

/**
 * `allowedEvents` of a persisted snapshot, without rebuilding it: the events a state takes
 * are those of its state nodes, whatever the context, so they are computed once per machine
 * and state and then looked up (a page of 100 tasks, or every command's response).
 */
export function allowedEventsOf(
  entityType: EntityType,
  persisted: PersistedSnapshot,
  entry: MachineEntry = MACHINES[entityType],
): string[] {
  if (persisted.status !== 'active') return [];
  const allowed = allowedByState.get(entry, persisted.value, () =>
    allowedEvents(entityType, restore(entityType, persisted, entry), entry),
  );
  return [...allowed];
}

function stateOf(snapshot: AnyMachineSnapshot): string {
  return String(snapshot.value);
}

interface ExecutableAction {
  type: string;
  params?: unknown;
}

function toDecision(
  entry: MachineEntry,
  entityType: EntityType,
  snapshot: AnyMachineSnapshot,
  actions: readonly ExecutableAction[],
): Decision {
  const emitted: DomainEvent[] = [];
  const schedule = new Map<string, TimerSpec>();
  const cancel = new Set<string>();
  let deadline: number | null | undefined;
  // XState names an `after` delay's send id `xstate.after.<delay>.<state id>`.
  const deadlinePrefix = entry.deadline ? `xstate.after.${entry.deadline.delay}.` : null;
  const isDeadline = (id: string) => deadlinePrefix !== null && id.startsWith(deadlinePrefix);
  for (const action of actions) {
    if (action.type === 'xstate.emit') {
      emitted.push((action.params as { event: DomainEvent }).event);
    } else if (action.type === 'xstate.raise') {
      const p = action.params as { event: { type: string }; id?: string; delay?: number };
      if (p.delay === undefined || p.id === undefined) {
        throw new Error(`${entityType}: an immediate raise reached the runtime (${p.event.type})`);
      }
      if (isDeadline(p.id)) {
        deadline = p.delay;
        continue;
      }
      schedule.set(p.id, { key: p.id, event: p.event, delayMs: p.delay });
      cancel.delete(p.id);
    } else if (action.type === 'xstate.cancel') {
      const id = (action.params as { sendId: string }).sendId;
      if (isDeadline(id)) {
        deadline = null;
        continue;
      }
      schedule.delete(id);
      cancel.add(id);
    } else {
      // Machines are pure: every action is an assign (already applied), an emit or a timer.
      throw new Error(`${entityType}: unexpected action ${action.type} from transition()`);
    }
  }
  const persisted = persistedOf(entry, snapshot);
  return {
    state: stateOf(snapshot),
    snapshot: persisted,
    emitted,
    schedule: [...schedule.values()],
    cancel: [...cancel],
    ...(deadline !== undefined ? { deadline } : {}),
  };
}

/**
 * What `getPersistedSnapshot()` and a JSON round trip give (the row stores JSON; the actor
 * cache holds this same object, so a cached snapshot and one read back must not differ),
 * built in one pass: the round trip was a third of a decide. A snapshot with children or
 * history, which our machines do not have, takes the long way.
 */
function persistedOf(entry: MachineEntry, snapshot: AnyMachineSnapshot): PersistedSnapshot {
  const { status, output, error, value, historyValue, context, children } = snapshot;
  if (!isEmpty(children) || !isEmpty(historyValue)) {
    return JSON.parse(
      JSON.stringify(entry.machine.getPersistedSnapshot(snapshot as never)),
    ) as PersistedSnapshot;
  }
  const persisted: Record<string, unknown> = { status };
  if (output !== undefined) persisted.output = jsonCopy(output);
  if (error !== undefined) persisted.error = jsonCopy(error);
  persisted.value = jsonCopy(value);
  persisted.historyValue = {};
  persisted.context = jsonCopy(context);
  persisted.children = {};
  return persisted as PersistedSnapshot;
}

function isEmpty(o: unknown): boolean {
  if (o === undefined || o === null) return true;
  for (const _ in o as object) return false;
  return true;
}

/**
 * `JSON.parse(JSON.stringify(v))` for the plain data a context holds: undefined members
 * dropped (null in arrays), non-finite numbers null, -0 as 0. Anything else (a Date, a class, a
 * `toJSON`) goes through JSON itself, so the result is always what a round trip gives.
 */
export function jsonCopy(v: unknown): unknown {
  if (v === null || typeof v === 'string' || typeof v === 'boolean') return v;
  if (typeof v === 'number') return Number.isFinite(v) ? (v === 0 ? 0 : v) : null;
  if (v === undefined || typeof v === 'function' || typeof v === 'symbol') return undefined;
  if (Array.isArray(v)) {
    const out = new Array<unknown>(v.length);
    for (let i = 0; i < v.length; i++) {
      const c = jsonCopy(v[i]);
      out[i] = c === undefined ? null : c;
    }
    return out;
  }
  if (
    typeof v === 'object' &&
    Object.getPrototypeOf(v) === Object.prototype &&
    typeof (v as { toJSON?: unknown }).toJSON !== 'function'
  ) {
    const out: Record<string, unknown> = {};
    for (const k in v) {
      // Assigned, an own `__proto__` (JSON.parse makes one) would set the copy's prototype.
      if (k === '__proto__') return JSON.parse(JSON.stringify(v));
      const c = jsonCopy((v as Record<string, unknown>)[k]);
      if (c !== undefined) out[k] = c;
    }
    return out;
  }
  const text = JSON.stringify(v);
  return text === undefined ? undefined : JSON.parse(text);
}
