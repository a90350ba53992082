/**
 * Registration checks (CONTRACT 5): the schema, `verifyWorkflow` on definitions the schema
 * lets through, and the graph check itself on machines with a dead end and an unreachable
 * state (a definition compiled by the factory cannot have either: every phase advances to the
 * next and backlog starts the first, so those are checked on hand-built machines).
 */
import { readFileSync } from 'node:fs';
import { describe, expect, it } from 'vitest';
import { createMachine } from 'xstate';
import { compileWorkflow } from '../../src/machines/workflow.js';
import {
  DEFAULT_WORKFLOW,
  parseWorkflowDefinition,
  parseWorkflowJson,
  WORKFLOW_BODY_LIMIT_BYTES,
  type WorkflowDefinition,
} from '../../src/workflows/definition.js';
import { graphFindings, verifyWorkflow } from '../../src/workflows/verify.js';

function parsed(value: unknown): WorkflowDefinition {
  const r = parseWorkflowDefinition(value);
  if (!r.ok) throw new Error(JSON.stringify(r.findings));
  return r.definition;
}

const paths = (def: WorkflowDefinition) => verifyWorkflow(def).map((f) => f.path);

describe('workflow schema', () => {
  it('names the path of every malformed field', () => {
    const r = parseWorkflowDefinition({
      name: 'Bad@1',
      phases: [
        { name: 'done' },
        { name: 'gate', approval: { timeoutMs: 2 ** 31, onTimeout: 'later' }, tasks: [] },
        { name: 'w', onFail: { sendBackTo: 'w', maxLoops: 0 }, extra: 1 },
      ],
    });
    expect(r.ok).toBe(false);
    const found = r.ok ? [] : r.findings.map((f) => f.path);
    expect(found).toEqual(
      expect.arrayContaining([
        'name',
        'phases[0].name',
        'phases[1].approval.timeoutMs',
        'phases[1].approval.onTimeout',
        'phases[1]',
        'phases[2].onFail.maxLoops',
        'phases[2]',
      ]),
    );
  });

  it('bounds phases, templates and the body size', () => {
    const many = Array.from({ length: 33 }, (_, i) => ({ name: `p${i}` }));
    expect(parseWorkflowDefinition({ name: 'x', phases: many }).ok).toBe(false);
    expect(parseWorkflowDefinition({ name: 'x', phases: [] }).ok).toBe(false);
    const tasks = Array.from({ length: 33 }, (_, i) => ({ key: `k${i}`, type: 't' }));
    expect(parseWorkflowDefinition({ name: 'x', phases: [{ name: 'a', tasks }] }).ok).toBe(false);
    const big = JSON.stringify({
      name: 'x',
      description: 'y'.repeat(WORKFLOW_BODY_LIMIT_BYTES),
      phases: [{ name: 'a' }],
    });
    const r = parseWorkflowJson(big);
    expect(r.ok).toBe(false);
  });
});

describe('verifyWorkflow', () => {
  it('accepts the default workflow and the contract example', () => {
    expect(verifyWorkflow(DEFAULT_WORKFLOW)).toEqual([]);
    const feature = parseWorkflowJson(readFileSync('examples/workflows/feature.json', 'utf8'));
    expect(feature.ok && verifyWorkflow(feature.definition)).toEqual([]);
  });

  it('refuses a dependency cycle, naming the template', () => {
    const def = parsed({
      name: 'cycle',
      phases: [
        {
          name: 'build',
          tasks: [
            { key: 'a', type: 't', dependsOn: ['c'] },
            { key: 'b', type: 't', dependsOn: ['a'] },
            { key: 'c', type: 't', dependsOn: ['b'] },
          ],
        },
      ],
    });
    const findings = verifyWorkflow(def);
    expect(findings).toHaveLength(1);
    expect(findings[0]!.path).toMatch(/^phases\[0\]\.tasks\[\d\]\.dependsOn$/);
    expect(findings[0]!.message).toContain('cycle');
  });

  it('refuses a dependency on another phase, a duplicate key and a self-dependency', () => {
    const def = parsed({
      name: 'deps',
      phases: [
        { name: 'a', tasks: [{ key: 'x', type: 't' }] },
        {
          name: 'b',
          tasks: [
            { key: 'y', type: 't', dependsOn: ['x'] },
            { key: 'y', type: 't' },
            { key: 'z', type: 't', dependsOn: ['z'] },
          ],
        },
      ],
    });
    expect(paths(def)).toEqual([
      'phases[1].tasks[1].key',
      'phases[1].tasks[0].dependsOn[0]',
      'phases[1].tasks[2].dependsOn[0]',
    ]);
  });

  it('refuses a send-back to a later or unknown phase, and duplicate phases', () => {
    const def = parsed({
      name: 'loops',
      phases: [
        { name: 'plan', onFail: { sendBackTo: 'review', maxLoops: 1 } },
        { name: 'review', approval: {}, onReject: { sendBackTo: 'nowhere', maxLoops: 1 } },
        { name: 'review', approval: {} },
      ],
    });
    expect(paths(def)).toEqual([
      'phases[2].name',
      'phases[0].onFail.sendBackTo',
      'phases[1].onReject.sendBackTo',
    ]);
  });
});

describe('graph check', () => {
  it('names a state done cannot be reached from (a dead end)', () => {
    const machine = createMachine({
      id: 'ticket',
      initial: 'backlog',
      states: {
        backlog: { on: { START: 'a' } },
        a: { on: { ADVANCE: 'done', TRAP: 'pit' } },
        pit: { on: { POKE: 'pit' } },
        done: { type: 'final' },
      },
    });
    expect(graphFindings(machine, ['a', 'pit'])).toEqual([
      { path: 'phases[1]', message: 'done is not reachable from pit' },
    ]);
  });

  it('names a state that cannot be reached from backlog', () => {
    const machine = createMachine({
      id: 'ticket',
      initial: 'backlog',
      on: { CANCEL: '.cancelled' },
      states: {
        backlog: { on: { START: 'a' } },
        a: { on: { ADVANCE: 'done' } },
        island: { on: { ADVANCE: 'done' } },
        done: { type: 'final' },
        cancelled: { type: 'final' },
      },
    });
    expect(graphFindings(machine, ['a', 'island'])).toEqual([
      { path: 'phases[1]', message: 'island is not reachable from backlog' },
    ]);
  });

  it('finds nothing in compiled workflows: every phase advances and is entered', () => {
    const def = parsed({
      name: 'g',
      phases: [
        { name: 'a', onFail: { sendBackTo: 'a', maxLoops: 1 } },
        { name: 'g', approval: { timeoutMs: 5, onTimeout: 'block' } },
      ],
    });
    const c = compileWorkflow(def, 1);
    expect(graphFindings(c.machine as never, c.phases)).toEqual([]);
  });
});
