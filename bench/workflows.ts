/**
 * Workflows (CONTRACT 5): what a user-defined ticket machine costs.
 *
 * 1. Transitions: tickets of the built-in `default` and of a 12-phase workflow (gates,
 *    templates, rework rules) alternate BLOCK and UNBLOCK through the host, at the same
 *    concurrency, in alternating rounds of the same run; the ratio of their rates is the
 *    figure (the compiled machine is cached per process, so it should be 1).
 * 2. Registration of a 32-phase workflow: `WorkflowRegistry.register` (schema, verification,
 *    compile, store: what POST /workflows does), each time a new version; and apart from it
 *    the model run of `orchestrator workflow check`, which registration does not do.
 */
import { randomUUID } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { ActorHost } from '../src/actors/host.js';
import { workflowCompiler } from '../src/actors/workflow-compiler.js';
import { WorkflowRegistry } from '../src/actors/workflow-registry.js';
import { compileWorkflow } from '../src/machines/workflow.js';
import type { PhaseDefinition, WorkflowDefinition } from '../src/machines/workflow-definition.js';
import { parseWorkflowDefinition } from '../src/workflows/definition.js';
import { modelSummary, runWorkflowModel } from '../src/workflows/model-run.js';
import { verifyWorkflow } from '../src/workflows/verify.js';
import { scratchDatabase } from './scratch.js';
import { loop, ms, n0, percentile, print, ratio, table } from './stats.js';

const TASK_DEFAULTS = { maxAttempts: 3, leaseMs: 30_000, retryBaseMs: 1_000 };

/**
 * `n` phases: a template-free first phase (so a started ticket's context holds what a
 * default ticket's does), then work phases with two templates (one depending on the other)
 * and a rework rule, every third one a gate with onReject.
 */
export function syntheticWorkflow(name: string, n: number): WorkflowDefinition {
  const phases: PhaseDefinition[] = [{ name: 'p0' }];
  for (let i = 1; i < n; i++) {
    const back = `p${Math.max(0, i - 2)}`;
    phases.push(
      i % 3 === 2
        ? {
            name: `p${i}`,
            approval: { timeoutMs: 86_400_000, onTimeout: 'block' },
            onReject: { sendBackTo: back, maxLoops: 3 },
          }
        : {
            name: `p${i}`,
            tasks: [
              { key: 'code', type: 'implement', worktree: '{{ticket.id}}' },
              { key: 'tests', type: 'run_tests', dependsOn: ['code'] },
            ],
            onFail: { sendBackTo: back, maxLoops: 2 },
          },
    );
  }
  return { name, description: `${n} phases`, phases };
}

export async function workflowsSection(o: { seconds: number; concurrency: number }) {
  print('## Workflows');
  const db = await scratchDatabase('workflows', { max: o.concurrency + 4 });
  try {
    const registry = new WorkflowRegistry(db.sql, workflowCompiler());
    await registry.ensureBuiltIn();
    const host = new ActorHost(db.sql, { taskDefaults: TASK_DEFAULTS, workflows: registry });

    // ---- 1. the same transition on default and on a 12-phase workflow ------------------
    const wf12 = syntheticWorkflow('bench12', 12);
    const { workflow } = await registry.register(wf12);
    const ref = `${workflow.name}@${workflow.version}`;
    const started = async (wf: string | null) => {
      const ids: string[] = [];
      for (let i = 0; i < o.concurrency; i++) {
        const id = `bench-${randomUUID()}`;
        const input = { id, title: 'bench', stuckAfterMs: 3_600_000, diagnosticCooldownMs: 0 };
        await host.transact((uow) =>
          uow.create('ticket', input, wf === null ? {} : { workflow: wf }),
        );
        const t = { id };
        await host.send('ticket', t.id, { type: 'START' });
        ids.push(t.id);
      }
      return ids;
    };
    const kinds = [
      {
        label: 'default',
        ids: await started(null),
        samples: [] as number[],
        count: 0,
        s: 0,
        blocked: [] as boolean[],
      },
      {
        label: `${ref} (12 phases)`,
        ids: await started(ref),
        samples: [],
        count: 0,
        s: 0,
        blocked: [],
      },
    ];
    const round = async (k: (typeof kinds)[number], seconds: number) => {
      // Each ticket remembers where it is: a round may end on either transition.
      const r = await loop(o.concurrency, seconds * 1000, async (w) => {
        const blocked = k.blocked[w] === true;
        await host.send(
          'ticket',
          k.ids[w] as string,
          blocked ? { type: 'UNBLOCK' } : { type: 'BLOCK', reason: 'bench' },
        );
        k.blocked[w] = !blocked;
      });
      k.samples.push(...r.samples);
      k.count += r.count;
      k.s += r.count / r.perSecond;
    };
    // Warm-up (cache, JIT), then alternating rounds so drift on a shared machine hits both.
    for (const k of kinds) await round(k, 1);
    for (const k of kinds) {
      k.samples = [];
      k.count = 0;
      k.s = 0;
    }
    for (let r = 0; r < 4; r++) {
      for (const k of r % 2 === 0 ? kinds : [...kinds].reverse()) await round(k, o.seconds / 2);
    }
    const rows = kinds.map((k) => {
      k.samples.sort((a, b) => a - b);
      return {
        label: k.label,
        perSecond: k.count / k.s,
        p50: percentile(k.samples, 0.5),
        p99: percentile(k.samples, 0.99),
      };
    });
    const base = rows[0]!.perSecond;
    print(
      `BLOCK/UNBLOCK through the host, concurrency ${o.concurrency}, 4 alternating rounds of ${o.seconds / 2}s each\n`,
    );
    print(
      table(
        ['workflow', 'tx/s', 'p50 ms', 'p99 ms', 'default / this'],
        rows.map((r) => [r.label, n0(r.perSecond), ms(r.p50), ms(r.p99), ratio(base, r.perSecond)]),
      ),
    );

    // ---- 2. registering a 32-phase workflow ---------------------------------------------
    const wf32 = syntheticWorkflow('bench32', 32);
    const times = { register: [] as number[], verify: [] as number[], compile: [] as number[] };
    const reps = 20;
    for (let i = 0; i < reps; i++) {
      // A new description each time: a new version, so every run stores a row.
      const def = { ...wf32, description: `32 phases, run ${i}` };
      let t0 = performance.now();
      const parsed = parseWorkflowDefinition(def);
      if (!parsed.ok || verifyWorkflow(parsed.definition).length > 0) throw new Error('refused');
      times.verify.push(performance.now() - t0);
      t0 = performance.now();
      compileWorkflow(parsed.definition, 1);
      times.compile.push(performance.now() - t0);
      t0 = performance.now();
      const r = await registry.register(def);
      times.register.push(performance.now() - t0);
      if (!r.created) throw new Error('not a new version');
    }
    // The model run of `workflow check`, once each (it takes seconds): the shipped example
    // and the 32-phase workflow. Its verdict is shown as it is, finished or not.
    const feature = JSON.parse(
      readFileSync(new URL('../examples/workflows/feature.json', import.meta.url), 'utf8'),
    ) as WorkflowDefinition;
    const model: { label: string; ms: number; summary: string; first: string }[] = [];
    for (const [label, def] of [
      ['examples/workflows/feature.json (4 phases)', feature],
      ['bench32 (32 phases)', wf32],
    ] as const) {
      const t0 = performance.now();
      const report = runWorkflowModel(compileWorkflow(def, 1));
      model.push({
        label,
        ms: performance.now() - t0,
        summary: modelSummary(def.name, report),
        first: report.findings[0]?.message ?? 'no finding',
      });
    }
    const stat = (xs: number[]) => {
      const s = [...xs].sort((a, b) => a - b);
      return [ms(percentile(s, 0.5)), ms(s[s.length - 1] ?? 0)];
    };
    print(`\n32-phase workflow (${JSON.stringify(wf32).length} bytes), ${reps} registrations\n`);
    print(
      table(
        ['step', 'median ms', 'max ms'],
        [
          ['schema + verification (alone)', ...stat(times.verify)],
          ['compile (alone)', ...stat(times.compile)],
          [
            'register: schema + verify + compile + store (POST /workflows)',
            ...stat(times.register),
          ],
        ],
      ),
    );
    print('\nworkflow check: the model run of the compiled machine (once each)\n');
    print(
      table(
        ['workflow', 'ms', 'findings (first)', 'coverage'],
        model.map((m) => [m.label, n0(m.ms), m.first, m.summary]),
      ),
    );
  } finally {
    await db.drop();
  }
}
