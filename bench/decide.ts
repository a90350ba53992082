/**
 * What one decide costs, beside XState's public API doing the same work: the baseline is
 * `initialTransition()` / `transition()` on a snapshot restored with `resolveState()`, then
 * `getPersistedSnapshot()` and a JSON round trip, the plain way to apply an event to a stored
 * snapshot and get the JSON back. Ours (`decide`, `decideInitial`) must give the same
 * snapshot (the property tests hold it to that) and costs what a transition adds in every
 * process: three per drained task, about one more on its ticket.
 *
 * No I/O: this is the machine step alone, in this process, best of 5 rounds.
 */
import { type AnyMachineSnapshot, initialTransition, transition } from 'xstate';
import { decide, decideInitial, type PersistedSnapshot } from '../src/actors/decide.js';
import { taskMachine, ticketMachine } from '../src/machines/index.js';
import type { TaskInput } from '../src/machines/task.js';
import { print, ratio, table } from './stats.js';

type Machine = typeof taskMachine | typeof ticketMachine;

const TASK: TaskInput = {
  id: 't-0',
  ticketId: 'tk-1',
  type: 'build',
  phase: 'requirements',
  maxAttempts: 3,
  leaseMs: 30_000,
  retryBaseMs: 1_000,
  at: 0,
};

/** XState's public API: restore, transition, persist, round trip. */
function plainStep(
  machine: Machine,
  persisted: PersistedSnapshot,
  event: object,
): PersistedSnapshot {
  const current = machine.resolveState({
    value: persisted.value,
    context: persisted.context,
  } as never) as AnyMachineSnapshot;
  const [next] = transition(machine as never, current as never, event as never);
  return JSON.parse(JSON.stringify(machine.getPersistedSnapshot(next as never)));
}

function plainInitial(machine: Machine, input: object): PersistedSnapshot {
  const [s] = initialTransition(machine as never, input as never);
  return JSON.parse(JSON.stringify(machine.getPersistedSnapshot(s as never)));
}

/** µs per operation: best of 5 rounds of `n`. */
function best(n: number, op: (i: number) => void): number {
  for (let i = 0; i < Math.min(n, 2_000); i++) op(i);
  let min = Number.POSITIVE_INFINITY;
  for (let r = 0; r < 5; r++) {
    const t0 = performance.now();
    for (let i = 0; i < n; i++) op(i);
    min = Math.min(min, ((performance.now() - t0) * 1000) / n);
  }
  return min;
}

export function decideSection(o: { iterations: number }): void {
  print('## One decide beside XState’s public API');
  const n = o.iterations;
  const created = decideInitial('task', TASK).snapshot;
  const taskEvents = [
    { type: 'CLAIM', workerId: 'w-1', token: 'tok', at: 1 },
    { type: 'START', token: 'tok', at: 2 },
    { type: 'COMPLETE', token: 'tok', result: { ok: true }, at: 3 },
  ];
  const states: PersistedSnapshot[] = [created];
  for (const e of taskEvents.slice(0, -1)) {
    states.push(decide('task', 't-0', states.at(-1) as PersistedSnapshot, e).snapshot);
  }
  // A started ticket with 50 pending tasks; the news of one moving to running.
  let ticket = decideInitial('ticket', {
    id: 'tk-1',
    title: 'bench',
    stuckAfterMs: 60_000,
    diagnosticCooldownMs: 5_000,
    at: 0,
  }).snapshot;
  ticket = decide('ticket', 'tk-1', ticket, { type: 'START', at: 1 }).snapshot;
  for (let j = 0; j < 50; j++) {
    ticket = decide('ticket', 'tk-1', ticket, {
      type: 'TASK_ADDED',
      taskId: `t-${j}`,
      phase: 'requirements',
      taskType: 'build',
      at: 2,
    }).snapshot;
  }
  const news = (j: number) => ({
    type: 'TASK_STATE',
    taskId: `t-${j % 50}`,
    phase: 'requirements',
    round: 1,
    taskType: 'build',
    from: 'pending',
    state: 'running',
    seq: 3,
    at: 3,
  });
  const rows: [string, number, number][] = [
    [
      'task: create (initial snapshot)',
      best(n, (i) => decideInitial('task', { ...TASK, id: `t-${i}` })),
      best(n, (i) => plainInitial(taskMachine, { ...TASK, id: `t-${i}` })),
    ],
    [
      'task: CLAIM, START, COMPLETE (per event)',
      best(n, (i) => {
        const e = taskEvents[i % 3] as { type: string };
        decide('task', 't-0', states[i % 3] as PersistedSnapshot, e);
      }),
      best(n, (i) =>
        plainStep(taskMachine, states[i % 3] as PersistedSnapshot, taskEvents[i % 3] as object),
      ),
    ],
    [
      'ticket of 50 tasks: TASK_STATE',
      best(n, (i) => decide('ticket', 'tk-1', ticket, news(i))),
      best(n, (i) => plainStep(ticketMachine, ticket, news(i))),
    ],
  ];
  print(`\n${n.toLocaleString('en-US')} per round, best of 5 rounds; µs per operation\n`);
  print(
    table(
      ['operation', 'decide µs', 'XState API + JSON µs', 'decide / XState'],
      rows.map(([name, ours, plain]) => [
        name,
        ours.toFixed(1),
        plain.toFixed(1),
        ratio(ours, plain),
      ]),
    ),
  );
}
