/**
 * Compiled workflows: the default is today's ticket machine, the examples pass the model run
 * at full coverage, gates and rework loops behave as CONTRACT 5 says through decide(), and
 * `orchestrator workflow check` exits 0 on an example and 1 on a finding.
 */
import { execFile } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { describe, expect, it } from 'vitest';
import { type Decision, decide, decideInitial } from '../../src/actors/decide.js';
import { workflowMachineEntry } from '../../src/machines/index.js';
import { ticketMachine } from '../../src/machines/ticket.js';
import { compileWorkflow } from '../../src/machines/workflow.js';
import { DEFAULT_WORKFLOW, parseWorkflowJson } from '../../src/workflows/definition.js';
import { modelSummary, runWorkflowModel } from '../../src/workflows/model-run.js';

/** A task's news as the runtime sends it: from pending (its recorded state) to `state`. */
function news(taskId: string, phase: string, taskType: string, state: string, round = 0) {
  return { type: 'TASK_STATE', taskId, phase, round, taskType, from: 'pending', state, seq: 1 };
}

function example(name: string) {
  const r = parseWorkflowJson(readFileSync(`examples/workflows/${name}.json`, 'utf8'));
  if (!r.ok) throw new Error(JSON.stringify(r.findings));
  return compileWorkflow(r.definition, 1);
}

describe('compiled workflows', () => {
  it('the default workflow compiles to the ticket machine', () => {
    const compiled = compileWorkflow(DEFAULT_WORKFLOW, 1);
    expect(JSON.stringify(compiled.machine)).toBe(JSON.stringify(ticketMachine));
    expect(compiled.ref).toBe('default@1');
  });

  for (const name of ['feature', 'review-loop']) {
    it(`${name}: every path replays through decide() and every other event is refused`, {
      timeout: 120_000,
    }, () => {
      const report = runWorkflowModel(example(name));
      console.log(modelSummary(name, report));
      expect(report.findings).toEqual([]);
      expect(report.states[0]).toBe(report.states[1]);
      expect(report.transitions[0]).toBe(report.transitions[1]);
      expect(report.rejectedPairs).toBeGreaterThan(0);
    });
  }
});

describe('gates and rework loops', () => {
  const compiled = example('feature');
  const entry = workflowMachineEntry(compiled);
  const input = { id: 't1', title: 't', stuckAfterMs: 60_000, diagnosticCooldownMs: 1_000 };
  const step = (d: Decision, event: { type: string; [k: string]: unknown }) =>
    decide('ticket', 't1', d.snapshot, event, undefined, entry);
  const types = (d: Decision) => d.emitted.map((e) => e.type);

  function atGate(): Decision {
    let d = decideInitial('ticket', input, entry);
    d = step(d, { type: 'START' });
    d = step(d, { type: 'TASK_ADDED', taskId: 's1', phase: 'plan', taskType: 'write_spec' });
    d = step(d, news('s1', 'plan', 'write_spec', 'completed'));
    expect(d.state).toBe('plan_review');
    return d;
  }

  it('a gate schedules its durable timeout and APPROVE moves on', () => {
    const d = atGate();
    expect(d.schedule).toEqual([
      expect.objectContaining({
        key: 'xstate.after.approvalTimeout.ticket.plan_review',
        delayMs: 86_400_000,
      }),
    ]);
    const a = step(d, { type: 'APPROVE', by: 'ann', comment: 'fine' });
    expect(a.state).toBe('build');
    expect(types(a)).toEqual(['ticket.approved', 'ticket.phase_changed']);
    expect(a.emitted[0]!.data).toEqual({ phase: 'plan_review', by: 'ann', comment: 'fine' });
  });

  it('REJECT sends back to plan within maxLoops, then blocks', () => {
    let d = atGate();
    for (let loop = 1; loop <= 3; loop++) {
      d = step(d, { type: 'REJECT', by: 'ann', reason: `no ${loop}` });
      expect(d.state).toBe('plan');
      expect(types(d)).toEqual(['ticket.rejected', 'ticket.sent_back']);
      expect(d.emitted[1]!.data).toEqual({
        from: 'plan_review',
        to: 'plan',
        reason: `no ${loop}`,
        loop,
        cause: 'reject',
      });
      // The old round's completed task no longer completes the phase.
      expect(() => step(d, { type: 'ADVANCE' })).toThrow();
      d = step(d, { type: 'TASK_ADDED', taskId: `s${loop + 1}`, phase: 'plan', taskType: 'w' });
      d = step(d, news(`s${loop + 1}`, 'plan', 'w', 'completed', loop));
      expect(d.state).toBe('plan_review');
    }
    d = step(d, { type: 'REJECT', by: 'ann', reason: 'enough' });
    expect(d.state).toBe('blocked');
    expect(types(d)).toEqual(['ticket.rejected', 'ticket.blocked']);
  });

  it('a failed task of an onFail phase sends the ticket back with its error, then blocks', () => {
    let d = step(atGate(), { type: 'APPROVE', by: 'ann' });
    for (let loop = 1; loop <= 3; loop++) {
      const id = `c${loop}`;
      d = step(d, { type: 'TASK_ADDED', taskId: id, phase: 'build', taskType: 'implement' });
      d = step(d, { ...news(id, 'build', 'implement', 'failed', loop - 1), error: 'red' });
      if (loop <= 2) {
        expect(d.state).toBe('build');
        expect(types(d)).toEqual(['ticket.sent_back']);
        expect(d.emitted[0]!.data).toMatchObject({
          from: 'build',
          to: 'build',
          reason: 'red',
          loop,
          taskId: id,
        });
      }
    }
    expect(d.state).toBe('blocked');
    expect(types(d)).toEqual(['ticket.blocked']);
  });

  it('a phase with templates is not skipped for its earlier, completed tasks', () => {
    // A review task added and completed while the ticket was still in build.
    let d = step(atGate(), { type: 'APPROVE', by: 'ann' });
    d = step(d, { type: 'TASK_ADDED', taskId: 'early', phase: 'review', taskType: 'code_review' });
    d = step(d, news('early', 'review', 'code_review', 'completed'));
    d = step(d, { type: 'TASK_ADDED', taskId: 'c1', phase: 'build', taskType: 'implement' });
    d = step(d, news('c1', 'build', 'implement', 'completed'));
    // build completed: the automatic advance enters review, whose templates are yet to come.
    expect(d.state).toBe('review');
    expect(types(d)).toEqual(['ticket.phase_changed']);
    expect(d.snapshot.context.templatesPending).toBe(true);
    expect(() => step(d, { type: 'ADVANCE' })).toThrow(/guard refused/);
    // The first template task arrives: the phase waits for it.
    d = step(d, { type: 'TASK_ADDED', taskId: 'r1', phase: 'review', taskType: 'code_review' });
    expect(d.state).toBe('review');
    expect(d.snapshot.context.templatesPending).toBeUndefined();
    d = step(d, news('r1', 'review', 'code_review', 'completed'));
    expect(d.state).toBe('done');
    expect(types(d)).toEqual(['ticket.done']);
  });

  it('START and UNBLOCK into a phase whose tasks finished meanwhile advance at once', () => {
    let d = decideInitial('ticket', input, entry);
    d = step(d, { type: 'TASK_ADDED', taskId: 's1', phase: 'plan', taskType: 'write_spec' });
    d = step(d, news('s1', 'plan', 'write_spec', 'completed'));
    expect(d.state).toBe('backlog');
    d = step(d, { type: 'START' });
    // plan has templates: START waits for them (the runtime creates them in this transaction).
    expect(d.state).toBe('plan');
    d = step(d, { type: 'TASK_ADDED', taskId: 's2', phase: 'plan', taskType: 'write_spec' });
    d = step(d, { type: 'BLOCK', reason: 'hold' });
    d = step(d, news('s2', 'plan', 'write_spec', 'completed'));
    expect(d.state).toBe('blocked');
    d = step(d, { type: 'UNBLOCK' });
    expect(d.state).toBe('plan_review');
    expect(types(d)).toEqual(['ticket.unblocked', 'ticket.phase_changed']);
    expect(d.emitted[1]!.data).toEqual({ from: 'plan', to: 'plan_review' });

    // The default workflow has no templates: START into a finished phase moves on at once.
    let t = decideInitial('ticket', input);
    const send = (x: Decision, e: { type: string; [k: string]: unknown }) =>
      decide('ticket', 't1', x.snapshot, e);
    t = send(t, { type: 'TASK_ADDED', taskId: 'q', phase: 'requirements', taskType: 'w' });
    t = send(t, news('q', 'requirements', 'w', 'completed'));
    t = send(t, { type: 'START' });
    expect(t.state).toBe('design');
    expect(types(t)).toEqual(['ticket.phase_changed', 'ticket.phase_changed']);
    expect(t.emitted.map((e) => e.data)).toEqual([
      { from: 'backlog', to: 'requirements' },
      { from: 'requirements', to: 'design' },
    ]);
    // requirements' stuck check was set and cleared in the same step: only design's remains.
    expect(t.schedule.map((x) => x.key)).toEqual(['xstate.after.stuckCheck.ticket.design']);
  });

  it('SEND_BACK goes to an earlier phase only', () => {
    const d = atGate();
    expect(() => step(d, { type: 'SEND_BACK', toPhase: 'build', reason: 'x' })).toThrow();
    expect(() => step(d, { type: 'SEND_BACK', toPhase: 'plan_review', reason: 'x' })).toThrow();
    const b = step(d, { type: 'SEND_BACK', toPhase: 'plan', reason: 'redo' });
    expect(b.state).toBe('plan');
    expect(b.emitted[0]!.data).toMatchObject({
      from: 'plan_review',
      to: 'plan',
      loop: 1,
      cause: 'operator',
    });
  });

  it('news of a task of an older round counts for nothing, a failure included', () => {
    let d = step(atGate(), { type: 'REJECT', by: 'ann', reason: 'again' });
    expect(d.state).toBe('plan');
    expect(d.snapshot.context.rounds).toEqual({ plan: 1, plan_review: 1 });
    expect(d.snapshot.context.counts).toEqual({});
    d = step(d, { type: 'TASK_ADDED', taskId: 's2', phase: 'plan', taskType: 'write_spec' });
    // s1 belongs to plan's round 0: its late failure neither blocks nor sends back.
    d = step(d, { ...news('s1', 'plan', 'write_spec', 'failed'), from: 'completed' });
    expect(d.state).toBe('plan');
    expect(types(d)).toEqual([]);
    expect(d.snapshot.context.counts).toEqual({ plan: { work: { pending: 1 } } });
    d = step(d, news('s2', 'plan', 'write_spec', 'completed', 1));
    expect(d.state).toBe('plan_review');
  });
});

describe('orchestrator workflow check', () => {
  const run = promisify(execFile);
  it('exits 1 and names the path of each finding', { timeout: 60_000 }, async () => {
    const file = join(tmpdir(), `wf-${process.pid}.json`);
    writeFileSync(
      file,
      JSON.stringify({
        name: 'bad',
        phases: [
          { name: 'a', tasks: [{ key: 'x', type: 't', dependsOn: ['x'] }] },
          { name: 'g', approval: {}, onReject: { sendBackTo: 'later', maxLoops: 1 } },
        ],
      }),
    );
    const error = await run('bin/orchestrator', ['workflow', 'check', file]).catch((e) => e);
    expect(error.code).toBe(1);
    expect(error.stdout).toContain('phases[0].tasks[0].dependsOn[0]');
    expect(error.stdout).toContain('phases[1].onReject.sendBackTo');
  });

  it('exits 0 on the review-loop example and prints its coverage', {
    timeout: 120_000,
  }, async () => {
    const { stdout } = await run('bin/orchestrator', [
      'workflow',
      'check',
      'examples/workflows/review-loop.json',
    ]);
    expect(stdout).toMatch(/review-loop machine: 6\/6 states, (\d+)\/\1 transitions/);
    expect(stdout).toContain('review-loop.json: ok');
  });
});
