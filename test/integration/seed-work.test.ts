/**
 * Seed regression tests, work distribution (issue 8, item 2): the bugs of ../shared/seeds/
 * in how work was handed out and watched, replayed with two "processes" (hosts, claim
 * services and timer pollers on their own pools) against one Postgres.
 *
 * - In-memory cooldown lost on restart (seed 001, the root cause).
 * - Double claim: non-atomic claiming (seed 001 factor 1; seed 003 section 1).
 * - O(n) worktree lookup (seed 002, task 2).
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { OPEN_TASK_STATES } from '../../src/machines/task.js';
import {
  belowCap,
  lockCandidates,
  typesAtCap,
  worktreeFree,
} from '../../src/persistence/claim-rows.js';
import type { Tx } from '../../src/persistence/db.js';
import { Queries } from '../../src/persistence/queries.js';
import { forwardTaskState } from '../../src/policies/index.js';
import { createTestDatabase, type TestDatabase } from '../support/database.js';
import { explaining, planNodes as nodes, type PlanNode } from '../support/explain.js';
import { ticketInput } from '../support/fixtures.js';
import { type TestProcess, testProcess, until } from '../support/worker-process.js';

let db: TestDatabase;
const procs: TestProcess[] = [];
beforeAll(async () => {
  db = await createTestDatabase('seed_work');
});
afterAll(async () => {
  await Promise.all(procs.map((p) => p.close()));
  await db.drop();
});

function proc(o: Parameters<typeof testProcess>[1] = {}): TestProcess {
  const p = testProcess(db.pool(4), o);
  procs.push(p);
  return p;
}

const count = async (query: Promise<{ n: number }[]>) => (await query)[0]?.n ?? 0;

describe('seed regressions: work', () => {
  /*
   * Seed 001 (duplicate task spawning), ROOT CAUSE, "In-Memory Cooldown State":
   * `self._last_diagnostic: Dict[str, float] = {}  # In-memory only!` — "Any restart of
   * orchestrator_worker.py or monitoring_worker.py creates a new DiagnosticService instance
   * with an empty _last_diagnostic dictionary", and "Each worker process has its own
   * DiagnosticService instance", so the same stuck workflow got a new diagnostic task every
   * 2-12 minutes.
   *
   * Here a stuck ticket (STUCK_AFTER_MS 150 ms, cooldown 60 s) gets its diagnostic; it
   * completes; then both processes are replaced by new host/poller/claim objects on new
   * pools, four times over, each generation letting several stuck checks run. Still one
   * diagnostic. A control ticket with no cooldown gets a new one every generation, so the
   * checks really ran and would have spawned.
   */
  it('in-memory cooldown: restarts within the cooldown never spawn a second diagnostic', async () => {
    const STUCK_MS = 150;
    const generation = () => {
      const made = [0, 1].map(() =>
        proc({ stuckAfterMs: STUCK_MS, diagnosticCooldownMs: 60_000, timerPollMs: 20 }),
      );
      return made as [TestProcess, TestProcess];
    };
    let [a, b] = generation();
    const stuckTicket = async (p: TestProcess, cooldownMs: number) => {
      const t = await p.host.create('ticket', {
        ...ticketInput({ stuckAfterMs: STUCK_MS, diagnosticCooldownMs: cooldownMs }),
      });
      await p.host.send('ticket', t.id, { type: 'START' });
      await p.task(t.id, { type: 'implement_feature' }); // external: nobody here claims it
      return t.id;
    };
    const ticket = await stuckTicket(a, 60_000);
    const control = await stuckTicket(a, 0);
    const diagnostics = (id: string) =>
      count(db.sql<{ n: number }[]>`select count(*)::int as n from tasks
        where ticket_id = ${id} and type = 'diagnostic'`);
    const version = async (id: string) =>
      (await db.sql<{ v: number }[]>`select version as v from tickets where id = ${id}`)[0]?.v ?? 0;
    /** Completes the open diagnostic of `id` and tells its ticket (the reaction's job). */
    const completeOpenDiagnostic = async (p: TestProcess, id: string) => {
      const [open] = await db.sql<{ id: string }[]>`select id from tasks
        where ticket_id = ${id} and type = 'diagnostic' and state = 'pending'`;
      if (!open) return false;
      const claimed = await p.host.send('task', open.id, { type: 'CLAIM', workerId: 'agent' });
      const token = (claimed.snapshot.context as { token: string }).token;
      await p.host.send('task', open.id, { type: 'START', token });
      await p.host.send('task', open.id, { type: 'COMPLETE', token });
      await p.host.transact((uow) => forwardTaskState(uow, open.id));
      return true;
    };

    await Promise.all([a.poller.start(), b.poller.start()]);
    await until(async () => (await diagnostics(ticket)) === 1, 10_000, 'first diagnostic');
    await until(async () => (await diagnostics(control)) === 1, 10_000, 'control diagnostic');
    await completeOpenDiagnostic(a, ticket);
    await completeOpenDiagnostic(b, control);

    for (let restart = 1; restart <= 4; restart++) {
      // "Restart": both processes go away; two new ones start on the same database.
      await Promise.all(
        [a, b].map(async (p) => {
          await p.close();
          await p.host.sql.end({ timeout: 1 });
        }),
      );
      [a, b] = generation();
      const before = await version(ticket);
      await Promise.all([a.poller.start(), b.poller.start()]);
      // Several stuck checks run (each re-enters the phase: +1 version) and find the
      // cooldown, read from Postgres, not over.
      await until(async () => (await version(ticket)) >= before + 3, 10_000, 'stuck checks');
      expect(await diagnostics(ticket)).toBe(1);
      // The control ticket, no cooldown, was diagnosed again: the checks do spawn.
      await until(async () => (await diagnostics(control)) === restart + 1, 10_000, 'control');
      await completeOpenDiagnostic(a, control);
    }
    const [row] = await db.sql<{ last: number | null; n: number }[]>`
      select (snapshot->'context'->>'lastDiagnosticAt')::float8 as last,
        (snapshot->'context'->>'diagnostics')::int as n from tickets where id = ${ticket}`;
    expect(row?.n).toBe(1);
    expect(row?.last).toBeGreaterThan(0);
    expect(
      await count(db.sql<{ n: number }[]>`select count(*)::int as n from events
        where entity_id = ${ticket} and type = 'ticket.diagnostic_spawned'`),
    ).toBe(1);
  });

  /*
   * Seed 001, contributing factor 1, "Race Condition in Task Claiming": "get_next_task()
   * returned tasks without atomically claiming them, allowing multiple poll cycles to grab
   * the same task"; seed 003, section 1, "Atomic Run Claiming": "multiple processes could
   * pick up the same QUEUED run and execute it twice" (`if run.status == "QUEUED":
   * run.status = "RUNNING"`).
   *
   * Here 100 claimers over the ClaimService of two processes race for 30 tasks: each task is
   * claimed once, by a distinct claimer. Then the same 100 claimers loop (claim, start,
   * complete, claim again) over 60 more tasks while a monitor watches: no task is ever
   * claimed twice, and no claimer ever holds two tasks at once.
   */
  it('double claim: 100 concurrent claimers on two pools, 30 tasks: each claimed once', async () => {
    const [a, b] = [proc(), proc()];
    const ticket = await a.ticket();
    const addTasks = async (n: number) => {
      const ids: string[] = [];
      for (let i = 0; i < n; i++) ids.push(await a.task(ticket, { type: 'x', executor: 'sleep' }));
      return ids;
    };
    const first = await addTasks(30);
    const claimers = Array.from({ length: 100 }, (_, i) => ({
      id: `claimer-${i}`,
      claims: (i % 2 ? a : b).claims,
      host: (i % 2 ? a : b).host,
    }));
    const won = (
      await Promise.all(
        claimers.map((c) =>
          c.claims.claim({ workerId: c.id, executors: ['sleep'], waitMs: 1_000 }),
        ),
      )
    ).filter((r) => r !== null);
    expect(won).toHaveLength(30);
    expect(new Set(won.map((w) => w.task.id))).toEqual(new Set(first));
    expect(new Set(won.map((w) => w.task.workerId)).size).toBe(30);
    expect(new Set(won.map((w) => w.token)).size).toBe(30);
    for (const w of won) {
      await a.host.send('task', w.task.id, { type: 'START', token: w.token });
      await a.host.send('task', w.task.id, { type: 'COMPLETE', token: w.token });
    }

    const second = await addTasks(60);
    const all = [...first, ...second];
    let watching = true;
    let doubleHolders = 0;
    let samples = 0;
    const monitor = (async () => {
      while (watching) {
        const rows = await db.sql<{ worker_id: string }[]>`select worker_id from tasks
          where ticket_id = ${ticket} and state in ('claimed', 'running')
          group by worker_id having count(*) > 1`;
        doubleHolders += rows.length;
        samples++;
        await new Promise((r) => setTimeout(r, 5));
      }
    })();
    const pending = () =>
      count(db.sql<{ n: number }[]>`select count(*)::int as n from tasks
        where ticket_id = ${ticket} and state = 'pending'`);
    let completions = 0;
    await Promise.all(
      claimers.map(async (c) => {
        for (;;) {
          const got = await c.claims.claim({ workerId: c.id, executors: ['sleep'], waitMs: 200 });
          if (!got) {
            if ((await pending()) === 0) return;
            continue;
          }
          await c.host.send('task', got.task.id, { type: 'START', token: got.token });
          await new Promise((r) => setTimeout(r, 5));
          await c.host.send('task', got.task.id, { type: 'COMPLETE', token: got.token });
          completions++;
        }
      }),
    );
    watching = false;
    await monitor;
    expect(completions).toBe(60);
    expect(samples).toBeGreaterThan(0);
    expect(doubleHolders).toBe(0);

    const perTask = await db.sql<{ entity_id: string; claimed: number; completed: number }[]>`
      select entity_id, count(*) filter (where type = 'task.claimed')::int as claimed,
        count(*) filter (where type = 'task.completed')::int as completed
      from events where entity_id in ${db.sql(all)} group by entity_id`;
    expect(perTask).toHaveLength(90);
    expect(perTask.filter((t) => t.claimed !== 1 || t.completed !== 1)).toEqual([]);
    // From the log: per claimer, claimed and completed strictly alternate.
    const log = await db.sql<{ worker: string; type: string; entity_id: string }[]>`
      select data->>'workerId' as worker, type, entity_id from events
      where entity_id in ${db.sql(all)} and type in ('task.claimed', 'task.completed')
      order by pos`;
    const holding = new Map<string, string>();
    for (const e of log) {
      if (e.type === 'task.claimed') {
        expect(holding.get(e.worker)).toBeUndefined();
        holding.set(e.worker, e.entity_id);
      } else {
        expect(holding.get(e.worker)).toBe(e.entity_id);
        holding.delete(e.worker);
      }
    }
    expect(holding.size).toBe(0);
  });

  /*
   * Seed 002 (orchestrator MVP fixes), task 2, "Optimize get_workflow_by_worktree":
   * "`get_workflow_by_worktree` calls `repository.list_active()` (O(n)) then iterates to find
   * the matching workflow. With many concurrent workflows, this is expensive."
   *
   * Here the lookups run in Postgres on indexes. With ~20,000 tasks stored (a few hundred
   * holding worktrees, thousands pending, the rest settled) and statistics fresh, the plan
   * of every claim-time query (candidates, worktree held?, type caps) and of a ticket's
   * tasks (read model, cancellation) is captured with EXPLAIN (FORMAT JSON) on the very SQL
   * the code issues, and none scans the tasks table sequentially.
   */
  it('O(n) worktree lookup: claim, worktree and ticket lookups use indexes with 20k tasks', async () => {
    const t = await db.sql.begin(async (tx) => {
      await tx`insert into tickets (id, state, phase, title, machine_version, snapshot, version,
          seq, created_at, updated_at)
        select 'bulk-tk-' || g, 'requirements', 'requirements', 'bulk', 1, '{}'::jsonb, 1, 1,
          now(), now()
        from generate_series(1, 1000) g`;
      await tx`insert into tasks (id, ticket_id, type, phase, state, executor, worktree, priority,
          attempt, worker_id, lease_expires_at, machine_version, snapshot, version, seq,
          created_at, updated_at)
        select 'bulk-ts-' || g, 'bulk-tk-' || (g % 1000 + 1),
          case when g % 10 = 0 then 'implement_feature' else 'x' end, 'requirements',
          case when g % 100 = 0 then 'running' when g % 100 = 1 then 'claimed'
            when g % 8 = 0 then 'pending' when g % 50 = 3 then 'retry_wait' else 'completed' end,
          case when g % 3 = 0 then 'sleep' else 'external' end,
          case when g % 100 in (0, 1) then 'wt-held-' || g when g % 4 = 0 then 'wt-' || (g % 2000)
            else null end,
          g % 3, 1, case when g % 100 in (0, 1) then 'w-' || g end, null, 1, '{}'::jsonb, 1, 1,
          now() - (g || ' seconds')::interval, now()
        from generate_series(1, 20000) g`;
      return (await tx<{ n: number }[]>`select count(*)::int as n from tasks`)[0]?.n;
    });
    expect(t).toBeGreaterThanOrEqual(20_000);
    await db.sql`analyze tasks`;
    await db.sql`analyze tickets`;

    const plans: { label: string; plan: PlanNode }[] = [];
    let label = '';
    const capture = (plan: PlanNode) => plans.push({ label, plan });
    await db.sql.begin(async (raw) => {
      const tx = explaining(raw as unknown as Tx, capture);
      label = 'lockCandidates';
      await lockCandidates(tx, { executors: ['sleep'] }, 2);
      label = 'lockCandidates(types, excludeTypes)';
      await lockCandidates(
        tx,
        {
          executors: ['sleep', 'external'],
          types: ['x', 'implement_feature'],
          excludeTypes: ['y'],
        },
        2,
      );
      label = 'worktreeFree';
      await worktreeFree(tx, 'wt-held-500');
      label = 'worktreeFree(free)';
      await worktreeFree(tx, 'wt-17');
      label = 'belowCap';
      await belowCap(tx, 'implement_feature', 2);
      label = 'typesAtCap';
      await typesAtCap(tx, { implement_feature: 2, x: 5 });
      // The task holding a worktree (what seed 002 looked up by scanning every workflow).
      label = 'task holding a worktree';
      await tx`select id from tasks where worktree = ${'wt-held-700'}
        and state in ('claimed', 'running')`;
      // The reaction's lookups: a task's state, a ticket's open tasks.
      label = 'open tasks of a ticket';
      await tx`select id from tasks where ticket_id = ${'bulk-tk-7'}
        and state in ${tx(OPEN_TASK_STATES as string[])} order by id`;
    });
    // The read model of one real ticket among them.
    const p = proc();
    const real = await p.ticket();
    for (let i = 0; i < 5; i++) await p.task(real, { type: 'x', worktree: `wt-real-${i}` });
    const queries = new Queries(explaining(db.sql as unknown as Tx, capture));
    label = 'Queries.getTicket';
    expect((await queries.getTicket(real))?.tasks).toHaveLength(5);
    label = 'Queries.listTasks(ticketId)';
    expect((await queries.listTasks({ ticketId: real, limit: 50 })).items).toHaveLength(5);
    label = 'Queries.listTasks';
    // The newest five are the real ones (the bulk rows are older and have no snapshot).
    const newest = await queries.listTasks({ limit: 5 });
    expect(newest.items).toHaveLength(5);
    label = 'Queries.listTasks(cursor)';
    const older = await queries.listTasks({ limit: 5, cursor: newest.nextCursor ?? '' });
    expect(older.items).toHaveLength(5);
    label = 'Queries.ticketTasks(cursor)';
    const first = await queries.ticketTasks(real, { limit: 2 });
    const rest = await queries.ticketTasks(real, { limit: 5, cursor: first?.nextCursor ?? '' });
    expect(rest?.items).toHaveLength(3);

    const byLabel = (l: string) => plans.filter((p) => p.label === l);
    // Every captured statement that reads tasks uses an index; none scans the table.
    for (const { label: l, plan } of plans) {
      const seq = nodes(plan).filter((n) => n['Node Type'] === 'Seq Scan');
      expect(
        seq.map((n) => n['Relation Name']),
        `${l}: ${JSON.stringify(plan)}`,
      ).not.toContain('tasks');
    }
    const indexes = (l: string) =>
      byLabel(l).flatMap((p) =>
        nodes(p.plan)
          .map((n) => n['Index Name'])
          .filter(Boolean),
      );
    expect(indexes('lockCandidates')).toContain('tasks_claimable');
    // "Is this candidate's worktree held?" reads an index of active tasks only (the planner
    // picks either partial index with that predicate): its cost follows the active tasks,
    // not the stored ones.
    const subplans = byLabel('lockCandidates').flatMap((p) =>
      nodes(p.plan).filter((n) => n['Parent Relationship'] === 'SubPlan'),
    );
    expect(subplans.length).toBeGreaterThan(0);
    for (const sp of subplans) {
      expect(['tasks_worktree_active', 'tasks_active_type']).toContain(sp['Index Name']);
    }
    expect(indexes('worktreeFree')).toContain('tasks_worktree_active');
    expect(indexes('worktreeFree(free)')).toContain('tasks_worktree_active');
    expect(indexes('task holding a worktree')).toEqual(['tasks_worktree_active']);
    expect(indexes('belowCap')).toContain('tasks_active_type');
    expect(indexes('typesAtCap')).toContain('tasks_active_type');
    expect(indexes('open tasks of a ticket')).toContain('tasks_open_ticket');
    expect(indexes('Queries.getTicket')).toContain('tasks_ticket');
    expect(indexes('Queries.listTasks(ticketId)')).toContain('tasks_ticket');
    // Every task, newest first: the newest of each state, merged (no index of its own).
    expect(indexes('Queries.listTasks')).toContain('tasks_state_created');
    expect(indexes('Queries.listTasks(cursor)')).toContain('tasks_state_created');
    expect(indexes('Queries.ticketTasks(cursor)')).toContain('tasks_ticket');
    // Each of the code paths above was really captured (the proxy missed none).
    expect(byLabel('worktreeFree')).toHaveLength(2);
    expect(byLabel('Queries.getTicket')).toHaveLength(2);
  });
});
