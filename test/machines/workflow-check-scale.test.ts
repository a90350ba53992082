/**
 * `orchestrator workflow check` on large and loop-heavy workflows the server accepts: the model
 * run finishes with full coverage (its walk is over an abstraction of the ticket, not its full
 * context), and a run that cannot finish says so as inconclusive, never as findings.
 */
import { execFile } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { describe, expect, it } from 'vitest';
import { compileWorkflow } from '../../src/machines/workflow.js';
import { DEFAULT_WORKFLOW, parseWorkflowJson } from '../../src/workflows/definition.js';
import { modelSummary, runWorkflowModel } from '../../src/workflows/model-run.js';
import { tempDir } from '../support/temp-dir.js';

const run = promisify(execFile);
const dir = tempDir('wf-scale-');

/** 32 phases: every 4th a timed gate whose onReject goes back (to p0 every 8th), work phases with two templates, every 3rd with an onFail going back. */
function thirtyTwo() {
  const phases: unknown[] = [];
  for (let i = 0; i < 32; i++) {
    if (i % 4 === 3) {
      phases.push({
        name: `g${i}`,
        approval: { timeoutMs: 1000 * (i + 1), onTimeout: ['block', 'reject', 'approve'][i % 3] },
        onReject: { sendBackTo: i % 8 === 7 ? 'p0' : `p${i - 2}`, maxLoops: 3 },
      });
    } else {
      const back = Math.max(0, i - 5 - (i % 2));
      phases.push({
        name: `p${i}`,
        tasks: [
          { key: 'a', type: 'work' },
          { key: 'b', type: 'test', dependsOn: ['a'] },
        ],
        ...(i % 3 === 0
          ? { onFail: { sendBackTo: `p${back % 4 === 3 ? back - 1 : back}`, maxLoops: 2 } }
          : {}),
      });
    }
  }
  return { name: 'thirty-two', phases };
}

/** Four phases: templates, a gate rejecting back to the first, a rule failing back to it. */
const FOUR = {
  name: 'four',
  phases: [
    { name: 'a', tasks: [{ key: 'x', type: 'work' }] },
    {
      name: 'b',
      tasks: [
        { key: 'y', type: 'work' },
        { key: 'z', type: 'test', dependsOn: ['y'] },
      ],
    },
    {
      name: 'c',
      approval: { timeoutMs: 5000, onTimeout: 'reject' },
      onReject: { sendBackTo: 'a', maxLoops: 3 },
    },
    { name: 'd', tasks: [{ key: 'w', type: 'work' }], onFail: { sendBackTo: 'a', maxLoops: 5 } },
  ],
};

function file(def: unknown): string {
  const path = join(dir, `${(def as { name: string }).name}.json`);
  writeFileSync(path, JSON.stringify(def));
  return path;
}

describe('workflow check at scale', () => {
  for (const [label, def] of [
    ['32 phases', thirtyTwo()],
    ['4 phases with a far rework rule and a gate', FOUR],
  ] as const) {
    it(`${label}: exits 0 with full coverage`, { timeout: 120_000 }, async () => {
      const { stdout } = await run('bin/orchestrator', ['workflow', 'check', file(def)]);
      const m = /(\d+)\/(\d+) states, (\d+)\/(\d+) transitions/.exec(stdout);
      expect(m, stdout).not.toBeNull();
      expect(m![1]).toBe(m![2]);
      expect(m![3]).toBe(m![4]);
      expect(stdout).not.toContain('never');
      expect(stdout).toContain(': ok');
    });
  }

  it('the default workflow keeps full coverage', () => {
    const report = runWorkflowModel(compileWorkflow(DEFAULT_WORKFLOW, 1));
    console.log(modelSummary('default', report));
    expect(report.findings).toEqual([]);
    expect(report.inconclusive).toBeUndefined();
    expect(report.states[0]).toBe(report.states[1]);
    expect(report.transitions[0]).toBe(report.transitions[1]);
  });

  it('a run that cannot finish is inconclusive, not a finding', { timeout: 60_000 }, async () => {
    const parsed = parseWorkflowJson(JSON.stringify(FOUR));
    if (!parsed.ok) throw new Error('FOUR is valid');
    const report = runWorkflowModel(compileWorkflow(parsed.definition, 1), { maxVertices: 5 });
    expect(report.inconclusive).toMatch(/5 abstract vertices/);
    expect(report.findings).toEqual([]);
    expect(report.missingStates.length).toBeGreaterThan(0);

    const error = await run('bin/orchestrator', [
      'workflow',
      'check',
      '--max-vertices',
      '5',
      file(FOUR),
    ]).catch((e) => e);
    expect(error.code).toBe(3);
    expect(error.stdout).toContain('inconclusive');
    expect(error.stdout).not.toContain('never reached');
    expect(error.stdout).not.toContain('finding');
  });

  it('refuses a bad --max-vertices', { timeout: 60_000 }, async () => {
    const error = await run('bin/orchestrator', [
      'workflow',
      'check',
      '--max-vertices',
      '0',
      file(FOUR),
    ]).catch((e) => e);
    expect(error.code).toBe(2);
  });
});
