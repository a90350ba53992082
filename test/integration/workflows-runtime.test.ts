/**
 * Workflows at run time, against real Postgres and NATS over HTTP: templates become tasks on
 * each phase entry (exactly once, even with two processes racing to apply the news), gates,
 * rejects and failures send the ticket back with feedback and cancel the phase it leaves,
 * task dependencies wait, release and cascade cancellation, a gate's timeout is a durable
 * timer that fires once after a restart, and bad input is refused.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Commands } from '../../src/actors/commands.js';
import { ActorHost } from '../../src/actors/host.js';
import { TimerPoller } from '../../src/actors/timer-poller.js';
import { workflowCompiler } from '../../src/actors/workflow-compiler.js';
import { WorkflowRegistry } from '../../src/actors/workflow-registry.js';
import { silentLogger } from '../../src/log.js';
import type { Sql } from '../../src/persistence/db.js';
import { forwardTaskState } from '../../src/policies/index.js';
import type { Transport } from '../../src/transport/index.js';
import type { TransportNames } from '../../src/transport/subjects.js';
import { ClaimService } from '../../src/workers/claims.js';
import { Wakeups } from '../../src/workers/wakeups.js';
import { createTestDatabase, type TestDatabase } from '../support/database.js';
import { TASK_DEFAULTS } from '../support/fixtures.js';
import { createTestApp, type TestApp } from '../support/http-app.js';
import {
  eventually,
  type NatsAdmin,
  natsAdmin,
  startTransport,
  testNames,
} from '../support/transport.js';

interface Proc {
  sql: Sql;
  host: ActorHost;
  registry: WorkflowRegistry;
  commands: Commands;
}

let db: TestDatabase;
let admin: NatsAdmin;
let names: TransportNames;
let a: Proc;
let b: Proc;
let t: TestApp;
let claims: ClaimService;
const transports: Transport[] = [];

function proc(): Proc {
  const sql = db.pool(6);
  const registry = new WorkflowRegistry(sql, workflowCompiler());
  const host = new ActorHost(sql, { taskDefaults: TASK_DEFAULTS, workflows: registry });
  const commands = new Commands(host, { stuckAfterMs: 3_600_000, diagnosticCooldownMs: 3_600_000 });
  return { sql, host, registry, commands };
}

beforeAll(async () => {
  db = await createTestDatabase('workflows_runtime');
  admin = await natsAdmin();
  names = testNames();
  a = proc();
  b = proc();
  await a.registry.ensureBuiltIn();
  claims = new ClaimService(a.host, new Wakeups(), {
    typeLimits: {},
    maxWaitMs: 2_000,
    pollMs: 100,
    maxWaiters: 100,
  });
  t = await createTestApp('unused', {
    db,
    services: { host: a.host, commands: a.commands, workflows: a.registry, claims },
  });
  // Two processes, each running the reactions (shared durable consumers) on its own pool.
  transports.push(await startTransport(a.sql, a.host, names));
  transports.push(await startTransport(b.sql, b.host, names));
});

afterAll(async () => {
  await Promise.all(transports.map((x) => x.stop()));
  claims?.close();
  await t?.close();
  await admin?.close([names]);
  await db?.drop();
});

const FEATURE = {
  name: 'feature',
  description: 'plan, approve, build, review',
  phases: [
    { name: 'plan', tasks: [{ key: 'spec', type: 'write_spec' }] },
    {
      name: 'plan_review',
      approval: { timeoutMs: 86_400_000, onTimeout: 'block' },
      onReject: { sendBackTo: 'plan', maxLoops: 3 },
    },
    {
      name: 'build',
      tasks: [
        { key: 'code', type: 'implement', worktree: 'wt-{{ticket.id}}', maxAttempts: 1 },
        { key: 'tests', type: 'run_tests', dependsOn: ['code'] },
      ],
      onFail: { sendBackTo: 'build', maxLoops: 2 },
    },
    {
      name: 'review',
      tasks: [{ key: 'review', type: 'code_review', maxAttempts: 1 }],
      onFail: { sendBackTo: 'build', maxLoops: 1 },
    },
  ],
};

interface TaskJson {
  id: string;
  type: string;
  phase: string;
  state: string;
  worktree: string | null;
  dependsOn: string[];
  feedback: { fromPhase: string; reason: string; loop: number } | null;
}

async function tasksOf(ticketId: string): Promise<TaskJson[]> {
  const res = await t.call('GET', `/tickets/${ticketId}/tasks?limit=200`);
  expect(res.status).toBe(200);
  return res.body.items;
}

async function ticketState(ticketId: string): Promise<string> {
  return (await t.call('GET', `/tickets/${ticketId}`)).body.state;
}

async function waitState(ticketId: string, state: string): Promise<void> {
  await eventually(async () => (await ticketState(ticketId)) === state, 15_000, `ticket ${state}`);
}

/** Claims the one open task of `type` over HTTP, then STARTs it: returns it and its token. */
async function claimStarted(type: string): Promise<{ task: TaskJson; token: string }> {
  const res = await t.call('POST', '/tasks/claim', { workerId: 'agent', types: [type] });
  expect(res.status, `claim ${type}`).toBe(200);
  const { task, token } = res.body;
  const started = await t.call('POST', `/tasks/${task.id}/events`, { type: 'START', token });
  expect(started.status).toBe(200);
  return { task, token };
}

async function completeOne(type: string): Promise<TaskJson> {
  const { task, token } = await claimStarted(type);
  const done = await t.call('POST', `/tasks/${task.id}/events`, { type: 'COMPLETE', token });
  expect(done.status).toBe(200);
  return task;
}

async function failOne(type: string, error: string): Promise<TaskJson> {
  const { task, token } = await claimStarted(type);
  const failed = await t.call('POST', `/tasks/${task.id}/events`, { type: 'FAIL', token, error });
  expect(failed.status).toBe(200);
  expect(failed.body.state).toBe('failed');
  return task;
}

const open = (ts: TaskJson[], type: string) =>
  ts.filter((x) => x.type === type && !['completed', 'cancelled', 'failed'].includes(x.state));

describe('the feature workflow end to end', () => {
  it('plans, is rejected with feedback, approved, builds with a dependency, reworks, then blocks', async () => {
    expect((await t.call('POST', '/workflows', FEATURE)).status).toBe(201);
    const created = await t.call('POST', '/tickets', { title: 'f', workflow: 'feature' });
    expect(created.status).toBe(201);
    const id: string = created.body.id;
    expect(created.body.workflow).toBe('feature@1');
    const started = await t.call('POST', `/tickets/${id}/events`, { type: 'START' });
    expect(started.body.state).toBe('plan');

    // Entering plan created its one template task, in the same transaction.
    let ts = await tasksOf(id);
    expect(ts.map((x) => [x.type, x.phase, x.state, x.feedback])).toEqual([
      ['write_spec', 'plan', 'pending', null],
    ]);
    await completeOne('write_spec');
    await waitState(id, 'plan_review');

    // APPROVE's sibling on a work phase, and SEND_BACK forward, are illegal.
    const rejected = await t.call('POST', `/tickets/${id}/events`, {
      type: 'REJECT',
      by: 'ann',
      reason: 'too vague',
    });
    expect(rejected.status).toBe(200);
    expect(rejected.body.state).toBe('plan');
    ts = await tasksOf(id);
    const specs = ts.filter((x) => x.type === 'write_spec');
    expect(specs).toHaveLength(2);
    expect(specs[1]?.state).toBe('pending');
    expect(specs[1]?.feedback).toEqual({ fromPhase: 'plan_review', reason: 'too vague', loop: 1 });
    // The claim hands the next agent the feedback.
    const claim = await claimStarted('write_spec');
    expect(claim.task.id).toBe(specs[1]?.id);
    expect(claim.task.feedback).toEqual({ fromPhase: 'plan_review', reason: 'too vague', loop: 1 });
    await t.call('POST', `/tasks/${claim.task.id}/events`, {
      type: 'COMPLETE',
      token: claim.token,
    });
    await waitState(id, 'plan_review');
    const approved = await t.call('POST', `/tickets/${id}/events`, { type: 'APPROVE', by: 'ann' });
    expect(approved.status).toBe(200);
    expect(approved.body.state).toBe('build');

    // build: `tests` waits for `code`; the worktree names the ticket.
    ts = await tasksOf(id);
    const [code] = open(ts, 'implement');
    const [tests] = open(ts, 'run_tests');
    expect(code?.state).toBe('pending');
    expect(code?.worktree).toBe(`wt-${id}`);
    expect(tests?.state).toBe('waiting');
    expect(tests?.dependsOn).toEqual([code?.id]);
    const early = await t.call('POST', '/tasks/claim', { workerId: 'x', types: ['run_tests'] });
    expect(early.status).toBe(204);

    // A failed `code`: back to build (onFail, same phase): the waiting `tests` is cancelled,
    // a new round of both is created with the failure as feedback.
    await failOne('implement', 'does not compile');
    await eventually(async () => open(await tasksOf(id), 'implement').length === 1, 15_000);
    ts = await tasksOf(id);
    expect(ts.find((x) => x.id === tests?.id)?.state).toBe('cancelled');
    const [code2] = open(ts, 'implement');
    const [tests2] = open(ts, 'run_tests');
    const rework = { fromPhase: 'build', reason: 'does not compile', loop: 1 };
    expect(code2?.feedback).toEqual(rework);
    expect(tests2?.feedback).toEqual(rework);
    expect(tests2?.state).toBe('waiting');
    expect(await ticketState(id)).toBe('build');

    await completeOne('implement');
    // Released in the transaction of `code`'s completion.
    expect((await t.call('GET', `/tasks/${tests2?.id}`)).body.state).toBe('pending');
    await completeOne('run_tests');
    await waitState(id, 'review');

    // review fails: back to build (loop 1 of 1) with the error as feedback.
    await failOne('code_review', 'missing edge cases');
    await eventually(async () => open(await tasksOf(id), 'implement').length === 1, 15_000);
    ts = await tasksOf(id);
    expect(open(ts, 'implement')[0]?.feedback).toEqual({
      fromPhase: 'review',
      reason: 'missing edge cases',
      loop: 2,
    });
    expect(await ticketState(id)).toBe('build');
    await completeOne('implement');
    await completeOne('run_tests');
    await waitState(id, 'review');
    // Past maxLoops: blocked, and no new build round.
    await failOne('code_review', 'still missing');
    await waitState(id, 'blocked');
    ts = await tasksOf(id);
    expect(ts.filter((x) => x.type === 'implement')).toHaveLength(3);
    expect(open(ts, 'implement')).toHaveLength(0);

    const log = (await t.call('GET', `/tickets/${id}/events`)).body.events as {
      type: string;
      data: Record<string, unknown>;
    }[];
    const types = log.map((e) => e.type);
    expect(types.filter((x) => x === 'ticket.rejected')).toHaveLength(1);
    expect(types.filter((x) => x === 'ticket.approved')).toHaveLength(1);
    expect(types.filter((x) => x === 'ticket.sent_back')).toHaveLength(3);
    expect(types.at(-1)).toBe('ticket.blocked');
  }, 90_000);

  it('SEND_BACK cancels the open tasks of the phase it leaves; bad events are refused', async () => {
    const id = (await t.call('POST', '/tickets', { title: 's', workflow: 'feature@1' })).body.id;
    await t.call('POST', `/tickets/${id}/events`, { type: 'START' });
    const onWork = await t.call('POST', `/tickets/${id}/events`, { type: 'APPROVE', by: 'x' });
    expect(onWork.status).toBe(409);
    expect(onWork.body.error).toBe('illegal_transition');
    const forward = await t.call('POST', `/tickets/${id}/events`, {
      type: 'SEND_BACK',
      toPhase: 'build',
      reason: 'skip',
    });
    expect([400, 409]).toContain(forward.status);
    expect(await ticketState(id)).toBe('plan');

    await completeOne('write_spec');
    await waitState(id, 'plan_review');
    await t.call('POST', `/tickets/${id}/events`, { type: 'APPROVE', by: 'ann' });
    const before = open(await tasksOf(id), 'implement').concat(
      open(await tasksOf(id), 'run_tests'),
    );
    expect(before).toHaveLength(2);
    const back = await t.call('POST', `/tickets/${id}/events`, {
      type: 'SEND_BACK',
      toPhase: 'plan',
      reason: 'scope changed',
    });
    expect(back.status).toBe(200);
    expect(back.body.state).toBe('plan');
    const after = await tasksOf(id);
    for (const x of before) expect(after.find((y) => y.id === x.id)?.state).toBe('cancelled');
    const [spec] = open(after, 'write_spec');
    expect(spec?.feedback).toEqual({ fromPhase: 'build', reason: 'scope changed', loop: 1 });
  }, 60_000);
});

describe('template tasks with two processes', () => {
  it('are created exactly once per phase entry when both race to apply the news', async () => {
    const two = {
      name: 'two',
      phases: [
        { name: 'first', tasks: [{ key: 'x', type: 'two_x' }] },
        {
          name: 'second',
          tasks: [
            { key: 'y', type: 'two_y' },
            { key: 'z', type: 'two_z', dependsOn: ['y'] },
          ],
        },
      ],
    };
    expect((await t.call('POST', '/workflows', two)).status).toBe(201);
    const ids: string[] = [];
    for (let i = 0; i < 6; i++) {
      const id = (await t.call('POST', '/tickets', { title: `r${i}`, workflow: 'two' })).body.id;
      await t.call('POST', `/tickets/${id}/events`, { type: 'START' });
      ids.push(id);
    }
    const firsts = await db.sql<{ id: string }[]>`
      select id from tasks where ticket_id = any(${ids}::text[]) and type = 'two_x'`;
    // Complete every first task straight through the host, then let both processes apply
    // the ticket news at once, several times over, beside the reactions doing the same.
    for (const { id } of firsts) {
      const c = await a.host.send('task', id, { type: 'CLAIM', workerId: 'w' });
      const token = (c.snapshot.context as { token: string }).token;
      await a.host.send('task', id, { type: 'START', token });
      await a.host.send('task', id, { type: 'COMPLETE', token });
    }
    await Promise.all(
      firsts.flatMap(({ id }) =>
        [a, b, a, b].map((p) => p.host.transact((uow) => forwardTaskState(uow, id))),
      ),
    );
    for (const id of ids) await waitState(id, 'second');
    const counts = await db.sql<{ ticket_id: string; n: number }[]>`
      select ticket_id, count(*)::int as n from tasks
      where ticket_id = any(${ids}::text[]) and phase = 'second' group by ticket_id`;
    expect(counts).toHaveLength(ids.length);
    for (const c of counts) expect(c.n).toBe(2);
    const entries = await db.sql<{ n: number }[]>`
      select count(*)::int as n from events
      where entity_id = any(${ids}::text[]) and type = 'ticket.phase_changed'
        and data ->> 'to' = 'second'`;
    expect(entries[0]?.n).toBe(ids.length);
    // And the reactions keep nothing to do: a reconciler run changes nothing.
    const before = await db.sql`select count(*)::int as n from tasks`;
    await transports[1]?.reconciler.runOnce();
    const after = await db.sql`select count(*)::int as n from tasks`;
    expect(after[0]?.n).toBe(before[0]?.n);
  }, 60_000);
});

describe('the automatic advance', () => {
  it('does not skip a phase with templates for its earlier, completed tasks', async () => {
    const early = {
      name: 'early',
      phases: [
        { name: 'first', tasks: [{ key: 'x', type: 'early_x' }] },
        { name: 'second', tasks: [{ key: 'y', type: 'early_y' }] },
      ],
    };
    expect((await t.call('POST', '/workflows', early)).status).toBe(201);
    const id = (await t.call('POST', '/tickets', { title: 'early', workflow: 'early' })).body.id;
    expect((await t.call('POST', `/tickets/${id}/events`, { type: 'START' })).status).toBe(200);
    // A task of the second phase, added and completed while the ticket is in the first.
    const added = await t.call('POST', `/tickets/${id}/tasks`, {
      type: 'early_pre',
      phase: 'second',
    });
    expect(added.status).toBe(201);
    await completeOne('early_pre');
    await completeOne('early_x');
    // The first phase completes: the ticket enters the second, whose template task is new.
    await waitState(id, 'second');
    await eventually(async () => open(await tasksOf(id), 'early_y').length === 1, 15_000, 'y');
    expect(await ticketState(id)).toBe('second');
    await completeOne('early_y');
    await waitState(id, 'done');
    const changes = await db.sql<{ type: string; to: string }[]>`
      select type, data ->> 'to' as to from events
      where entity_id = ${id} and type in ('ticket.phase_changed', 'ticket.done') order by seq`;
    expect(changes.map((c) => c.to)).toEqual(['first', 'second', 'done']);
  }, 60_000);
});

describe('task dependencies over HTTP', () => {
  it('wait, release on completion, and cascade a cancellation', async () => {
    const id = (await t.call('POST', '/tickets', { title: 'deps' })).body.id;
    await t.call('POST', `/tickets/${id}/events`, { type: 'START' });
    const add = (body: object) => t.call('POST', `/tickets/${id}/tasks`, { type: 'dep', ...body });
    const root = (await add({})).body;
    const mid = await add({ dependsOn: [root.id] });
    expect(mid.status).toBe(201);
    expect(mid.body.state).toBe('waiting');
    expect(mid.body.dependsOn).toEqual([root.id]);
    const leaf = (await add({ dependsOn: [mid.body.id, root.id] })).body;
    expect(leaf.state).toBe('waiting');

    const cancelled = await t.call('POST', `/tasks/${root.id}/events`, { type: 'CANCEL' });
    expect(cancelled.status).toBe(200);
    // In the transaction of the root's cancellation, down the chain.
    for (const x of [mid.body.id, leaf.id]) {
      const got = (await t.call('GET', `/tasks/${x}`)).body;
      expect(got.state).toBe('cancelled');
      expect(got.error).toContain('was cancelled');
    }
    // A cancelled dependency is refused for a new task.
    const onCancelled = await add({ dependsOn: [root.id] });
    expect(onCancelled.status).toBe(400);
    expect(onCancelled.body.issues[0].path).toBe('dependsOn[0]');

    // Completion releases a dependent whose dependencies are all completed, not before.
    const d1 = (await add({ type: 'dep_a' })).body;
    const d2 = (await add({ type: 'dep_b' })).body;
    const both = (await add({ type: 'dep_c', dependsOn: [d1.id, d2.id] })).body;
    await completeOne('dep_a');
    expect((await t.call('GET', `/tasks/${both.id}`)).body.state).toBe('waiting');
    await completeOne('dep_b');
    expect((await t.call('GET', `/tasks/${both.id}`)).body.state).toBe('pending');
    // Depending on completed tasks only: created pending.
    const late = await add({ type: 'dep_d', dependsOn: [d1.id] });
    expect(late.body.state).toBe('pending');
  }, 60_000);

  it('the reconciler settles a waiting task whose dependency settled unseen', async () => {
    const id = (await t.call('POST', '/tickets', { title: 'rec' })).body.id;
    await t.call('POST', `/tickets/${id}/events`, { type: 'START' });
    const add = (body: object) => t.call('POST', `/tickets/${id}/tasks`, body);
    const dep = (await add({ type: 'rec_a' })).body;
    const gone = (await add({ type: 'rec_b' })).body;
    const ready = (await add({ type: 'rec_c', dependsOn: [dep.id] })).body;
    const doomed = (await add({ type: 'rec_d', dependsOn: [gone.id] })).body;
    // The dependency rows are hidden while the dependencies settle: what a dependent
    // committed after its dependency's transaction read them looks like.
    const hidden = await db.sql`delete from task_dependencies
      where task_id in (${ready.id}, ${doomed.id}) returning task_id, depends_on`;
    await completeOne('rec_a');
    await t.call('POST', `/tasks/${gone.id}/events`, { type: 'CANCEL' });
    await db.sql`insert into task_dependencies ${db.sql(hidden as never, 'task_id', 'depends_on')}`;
    expect((await t.call('GET', `/tasks/${ready.id}`)).body.state).toBe('waiting');
    expect((await t.call('GET', `/tasks/${doomed.id}`)).body.state).toBe('waiting');
    await transports[0]?.reconciler.runOnce();
    expect((await t.call('GET', `/tasks/${ready.id}`)).body.state).toBe('pending');
    expect((await t.call('GET', `/tasks/${doomed.id}`)).body.state).toBe('cancelled');
  });

  it('bad input: unknown or foreign dependencies, too many, never a 500', async () => {
    const mine = (await t.call('POST', '/tickets', { title: 'm' })).body.id;
    const other = (await t.call('POST', '/tickets', { title: 'o' })).body.id;
    const foreign = (await t.call('POST', `/tickets/${other}/tasks`, { type: 'f' })).body;
    const own = (await t.call('POST', `/tickets/${mine}/tasks`, { type: 'f' })).body;
    const cases: [unknown, string][] = [
      [[own.id, foreign.id], 'dependsOn[1]'],
      [['tsk_nope'], 'dependsOn[0]'],
      [Array.from({ length: 33 }, (_, i) => `tsk_${i}`), 'dependsOn'],
      [['bad id!'], 'dependsOn.0'],
    ];
    for (const [dependsOn, path] of cases) {
      const res = await t.call('POST', `/tickets/${mine}/tasks`, { type: 'g', dependsOn });
      expect(res.status, JSON.stringify(dependsOn)).toBe(400);
      expect(res.body.error).toBe('validation_failed');
      expect(JSON.stringify(res.body.issues)).toContain(path);
    }
    const n = await db.sql`select count(*)::int as n from tasks where ticket_id = ${mine}`;
    expect(n[0]?.n).toBe(1);
  });
});

describe('a gate timeout', () => {
  it('fires once, after a restart, from the timer row', async () => {
    const timed = {
      name: 'timed',
      phases: [
        { name: 'wait', approval: { timeoutMs: 400, onTimeout: 'approve' } },
        { name: 'ship', tasks: [{ key: 's', type: 'ship_it' }] },
      ],
    };
    expect((await t.call('POST', '/workflows', timed)).status).toBe(201);
    const id = (await t.call('POST', '/tickets', { title: 't', workflow: 'timed' })).body.id;
    await t.call('POST', `/tickets/${id}/events`, { type: 'START' });
    expect(await ticketState(id)).toBe('wait');
    // No poller ran while it came due (the process that set it is gone): new processes,
    // two of them, pick the row up.
    await new Promise((r) => setTimeout(r, 600));
    expect(await ticketState(id)).toBe('wait');
    const p1 = proc();
    const p2 = proc();
    const pollers = [p1, p2].map(
      (p) => new TimerPoller(p.host, p.sql, silentLogger(), { pollMs: 100 }),
    );
    try {
      await Promise.all(pollers.map((p) => p.start()));
      await waitState(id, 'ship');
    } finally {
      await Promise.all(pollers.map((p) => p.stop()));
    }
    const log = (await t.call('GET', `/tickets/${id}/events`)).body.events as {
      type: string;
      data: { by?: string };
    }[];
    const approvals = log.filter((e) => e.type === 'ticket.approved');
    expect(approvals).toHaveLength(1);
    expect(approvals[0]?.data.by).toBe('timeout');
    const ship = (await tasksOf(id)).filter((x) => x.type === 'ship_it');
    expect(ship).toHaveLength(1);
    const timers = await db.sql`select 1 from timers where entity_id = ${id}
      and key like '%approvalTimeout%'`;
    expect(timers).toHaveLength(0);
  }, 30_000);
});
