/**
 * The machine catalog behind `/machines` and the dashboard's statecharts, read from the
 * machines themselves: the Stately-loadable definition (`machine.toJSON()`), a summary,
 * and Mermaid `stateDiagram-v2` text with the current state highlighted.
 */
import { ENTITY_TYPES, type EntityType, MACHINES } from '../machines/index.js';
import type { MachineCatalog } from './services.js';

interface TransitionJson {
  target?: string[];
  eventType?: string | null;
  guard?: unknown;
}
interface StateJson {
  key: string;
  type: string;
  on?: Record<string, TransitionJson[]>;
  states?: Record<string, StateJson>;
}

const isEntity = (name: string): name is EntityType => (ENTITY_TYPES as string[]).includes(name);
const definitionOf = (name: EntityType) =>
  JSON.parse(JSON.stringify(MACHINES[name].machine)) as StateJson & {
    initial?: { target?: string[] };
  };
const leaf = (target: string) => target.slice(target.lastIndexOf('.') + 1);

function label(event: string): string {
  const delayed = /^xstate\.after\.([^.]+)\./.exec(event);
  return delayed ? `after ${delayed[1]}` : event;
}

export function toMermaid(name: EntityType, current?: string): string {
  const def = definitionOf(name);
  const system = MACHINES[name].systemEvents;
  const states = Object.values(def.states ?? {});
  const lines = ['stateDiagram-v2', '  direction LR'];
  const initial = def.initial?.target?.[0];
  if (initial) lines.push(`  [*] --> ${leaf(initial)}`);
  // One arrow per (from, to), its events joined: parallel arrows make the chart unreadable.
  const edges = new Map<string, Set<string>>();
  const add = (from: string, on: Record<string, TransitionJson[]>) => {
    for (const [event, ts] of Object.entries(on)) {
      for (const t of ts) {
        for (const target of t.target ?? []) {
          const to = leaf(target);
          // Bookkeeping self-loops of system events would only clutter the chart.
          if (to === from && system.includes(event)) continue;
          const key = `${from} --> ${to}`;
          edges.set(key, (edges.get(key) ?? new Set()).add(label(event)));
        }
      }
    }
  };
  for (const s of states) add(s.key, s.on ?? {});
  // Root transitions (CANCEL from anywhere) apply to every non-final state.
  for (const s of states) if (s.type !== 'final') add(s.key, def.on ?? {});
  for (const [key, events] of edges) lines.push(`  ${key}: ${[...events].join(', ')}`);
  for (const s of states) if (s.type === 'final') lines.push(`  ${s.key} --> [*]`);
  if (current && states.some((s) => s.key === current)) {
    lines.push('  classDef current fill:#ffd54f,stroke:#e65100,stroke-width:3px,color:#000');
    lines.push(`  class ${current} current`);
  }
  return `${lines.join('\n')}\n`;
}

export function machineCatalog(): MachineCatalog {
  return {
    list: () =>
      ENTITY_TYPES.map((name) => {
        const entry = MACHINES[name];
        const def = definitionOf(name);
        const events = new Set<string>();
        for (const s of [def, ...Object.values(def.states ?? {})]) {
          for (const e of Object.keys(s.on ?? {})) if (!e.startsWith('xstate.')) events.add(e);
        }
        return {
          name,
          version: entry.version,
          states: Object.keys(def.states ?? {}),
          events: [...events].filter((e) => !entry.systemEvents.includes(e)).sort(),
          systemEvents: [...entry.systemEvents],
        };
      }),
    definition: (name) => (isEntity(name) ? definitionOf(name) : undefined),
    mermaid: (name, current) => (isEntity(name) ? toMermaid(name, current) : undefined),
  };
}
