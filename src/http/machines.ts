/**
 * The machine catalog behind `/machines` and the dashboard's statecharts, read from the
 * machines themselves: the Stately-loadable definition (`machine.toJSON()`), a summary,
 * and Mermaid `stateDiagram-v2` text with the current state highlighted.
 */
import { machineDefinition, toMermaid } from '../machines/export.js';
import { ENTITY_TYPES, type EntityType, MACHINES } from '../machines/index.js';
import type { MachineCatalog } from './services.js';

interface StateJson {
  on?: Record<string, unknown>;
  states?: Record<string, StateJson>;
}

const isEntity = (name: string): name is EntityType => (ENTITY_TYPES as string[]).includes(name);
const definitionOf = (name: EntityType) => machineDefinition(name) as StateJson;

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
    mermaid: (name, current) =>
      isEntity(name) ? toMermaid(name, current, { compact: true }) : undefined,
  };
}
