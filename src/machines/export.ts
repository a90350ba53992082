/**
 * The machines as documents: the JSON the Stately visualizer loads, and Mermaid
 * `stateDiagram-v2` text. Pure: read from the machine definitions, no I/O.
 */
import { type EntityType, MACHINES } from './index.js';
import type { CompiledWorkflow } from './workflow.js';

interface TransitionJson {
  target?: string[];
  eventType?: string;
  guard?: string | { type: string };
}
interface StateNodeJson {
  key: string;
  type: string;
  initial?: { target?: string[] };
  on?: Record<string, TransitionJson[]>;
  always?: TransitionJson[];
  states?: Record<string, StateNodeJson>;
}

/** The label an eventless transition is drawn with. */
export const EVENTLESS_LABEL = 'always';

/**
 * A machine as plain JSON. XState's own JSON leaves out eventless transitions (the ticket's
 * automatic advance, the task's move to `waiting`): they are added under `always`, as a
 * machine config writes them.
 */
function definitionOf(machine: typeof MACHINES.ticket.machine): Record<string, unknown> {
  const json = JSON.parse(JSON.stringify(machine)) as StateNodeJson;
  for (const [key, node] of Object.entries(machine.root.states)) {
    const always = (node as { always?: { toJSON(): unknown }[] }).always;
    const state = json.states?.[key];
    if (always && always.length > 0 && state) {
      state.always = JSON.parse(JSON.stringify(always.map((t) => t.toJSON())));
    }
  }
  return json as unknown as Record<string, unknown>;
}

/** A machine's definition as plain JSON, targets as `#id.state` strings (Stately format). */
export function machineDefinition(name: EntityType): Record<string, unknown> {
  return definitionOf(MACHINES[name].machine);
}

/**
 * A compiled workflow's machine as Stately-loadable JSON (`GET /machines/workflow:NAME@VERSION`).
 */
export function workflowMachineDefinition(compiled: CompiledWorkflow): Record<string, unknown> {
  return definitionOf(compiled.machine);
}

export function machineDefinitions(): Record<EntityType, Record<string, unknown>> {
  return { ticket: machineDefinition('ticket'), task: machineDefinition('task') };
}

const leaf = (target: string) => target.slice(target.lastIndexOf('.') + 1);

/** `xstate.after.lease.task.claimed` → `after lease`; other events keep their name. */
export function eventLabel(eventType: string): string {
  const delayed = /^xstate\.after\.([^.]+)\./.exec(eventType);
  return delayed ? `after ${delayed[1]}` : eventType;
}

/**
 * Mermaid `stateDiagram-v2` text of a machine: `[*]` into the initial state, one arrow per
 * (from, to) pair labelled with every event that takes it (guarded branches of one event
 * share its label; `after` transitions are labelled by delay name), final states into `[*]`,
 * and `current`, when given and known, highlighted with `classDef current`. Root-level
 * transitions (the ticket's CANCEL) are drawn from every non-final state. Transitions that
 * only run actions (no target) change no state and are left out.
 */
export interface MermaidOptions {
  /** Left to right, and without the self-loops of system events (bookkeeping that only
   * clutters a small chart): the dashboard's view. */
  compact?: boolean;
}

export function toMermaid(
  name: EntityType,
  currentState?: string,
  options: MermaidOptions = {},
): string {
  const def = machineDefinition(name) as unknown as StateNodeJson;
  const states = Object.values(def.states ?? {});
  const system = options.compact ? MACHINES[name].systemEvents : [];
  const lines = options.compact ? ['stateDiagram-v2', '  direction LR'] : ['stateDiagram-v2'];
  const initial = def.initial?.target?.[0];
  if (initial) lines.push(`  [*] --> ${leaf(initial)}`);
  const edges = new Map<string, string[]>();
  const add = (from: string, on: Record<string, TransitionJson[]>) => {
    for (const [event, branches] of Object.entries(on)) {
      for (const t of branches) {
        for (const target of t.target ?? []) {
          if (leaf(target) === from && system.includes(event)) continue;
          const key = `${from} --> ${leaf(target)}`;
          const labels = edges.get(key) ?? [];
          if (!labels.includes(eventLabel(event))) labels.push(eventLabel(event));
          edges.set(key, labels);
        }
      }
    }
  };
  for (const s of states) add(s.key, { ...(s.on ?? {}), [EVENTLESS_LABEL]: s.always ?? [] });
  for (const s of states) if (s.type !== 'final') add(s.key, def.on ?? {});
  for (const [key, labels] of edges) lines.push(`  ${key}: ${labels.join(', ')}`);
  for (const s of states) if (s.type === 'final') lines.push(`  ${s.key} --> [*]`);
  if (currentState !== undefined && states.some((s) => s.key === currentState)) {
    lines.push('  classDef current fill:#ffd54f,stroke:#e65100,stroke-width:3px,color:#000');
    lines.push(`  class ${currentState} current`);
  }
  return `${lines.join('\n')}\n`;
}
