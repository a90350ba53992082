import { readFileSync } from 'node:fs';
import { describe, expect, it } from 'vitest';
import { eventLabel, machineDefinitions, toMermaid } from '../../src/machines/export.js';
import { ENTITY_TYPES, MACHINES } from '../../src/machines/index.js';
import { definedStates, definedTransitions, finalStates } from './model-support.js';

describe('machineDefinitions', () => {
  it('is plain JSON of both machines, targets as #id.state strings', () => {
    const defs = machineDefinitions();
    expect(Object.keys(defs).sort()).toEqual(['task', 'ticket']);
    for (const name of ENTITY_TYPES) {
      const def = defs[name] as { id: string; states: Record<string, unknown> };
      expect(JSON.parse(JSON.stringify(def))).toEqual(def);
      expect(def.id).toBe(name);
      expect(Object.keys(def.states)).toEqual(definedStates(MACHINES[name].machine));
      const text = JSON.stringify(def);
      expect(text).toContain(`"#${name}.`);
      expect(text).not.toContain('[object Object]');
    }
    const task = JSON.stringify(defs.task);
    expect(task).toContain('"guard":"tokenMatches"');
    expect(task).toContain('xstate.after.lease.task.claimed');
  });

  it('is what docs/machines holds (run npm run machines:export after a machine change)', () => {
    const defs = machineDefinitions();
    for (const name of ENTITY_TYPES) {
      const url = new URL(`../../docs/machines/${name}.json`, import.meta.url);
      expect(JSON.parse(readFileSync(url, 'utf8'))).toEqual(defs[name]);
      const mmd = new URL(`../../docs/machines/${name}.mmd`, import.meta.url);
      expect(readFileSync(mmd, 'utf8')).toBe(toMermaid(name));
    }
  });
});

describe('toMermaid', () => {
  it('labels delays by name and keeps other events as they are', () => {
    expect(eventLabel('xstate.after.lease.task.claimed')).toBe('after lease');
    expect(eventLabel('xstate.after.stuckCheck.ticket.design')).toBe('after stuckCheck');
    expect(eventLabel('CLAIM')).toBe('CLAIM');
  });

  it('draws every state, the initial one, final states into [*], and every targeted transition', () => {
    for (const name of ENTITY_TYPES) {
      const machine = MACHINES[name].machine;
      const text = toMermaid(name);
      const lines = text.trimEnd().split('\n');
      expect(lines[0]).toBe('stateDiagram-v2');
      expect(lines).toContain(`  [*] --> ${name === 'task' ? 'pending' : 'backlog'}`);
      for (const s of finalStates(machine)) expect(lines).toContain(`  ${s} --> [*]`);
      for (const s of definedStates(machine)) expect(text).toMatch(new RegExp(`\\b${s}\\b`));
      const arrows = new Map<string, string>();
      for (const line of lines) {
        const m = /^ {2}(\w+) --> (\w+): (.+)$/.exec(line);
        if (m) arrows.set(`${m[1]}->${m[2]}`, m[3]!);
      }
      for (const t of definedTransitions(machine).values()) {
        if (t.target === null) continue;
        const label = arrows.get(`${t.source}->${t.target}`);
        expect(label, `${t.key} drawn`).toBeDefined();
        expect(label!.split(', ')).toContain(eventLabel(t.eventType));
      }
      expect(text).not.toContain('classDef');
    }
  });

  it('highlights the current state, and ignores an unknown one', () => {
    const text = toMermaid('task', 'running');
    expect(text).toContain('classDef current ');
    expect(text.trimEnd().split('\n').at(-1)).toBe('  class running current');
    expect(toMermaid('task', 'nonsense')).toBe(toMermaid('task'));
  });

  it('draws the ticket CANCEL from every non-final state, none from final ones', () => {
    const lines = toMermaid('ticket').split('\n');
    for (const s of ['backlog', 'requirements', 'design', 'implementation', 'testing', 'blocked']) {
      expect(lines.some((l) => l.startsWith(`  ${s} --> cancelled:`) && l.includes('CANCEL'))).toBe(
        true,
      );
    }
    expect(lines.some((l) => l.startsWith('  done --> cancelled'))).toBe(false);
    expect(lines.some((l) => l.startsWith('  cancelled --> cancelled'))).toBe(false);
  });

  it('is pure: the same text every time', () => {
    expect(toMermaid('ticket', 'design')).toBe(toMermaid('ticket', 'design'));
  });
});
