/**
 * One "process" of the worker side for integration tests: a host, a claim service with its
 * wake-ups, a timer poller and commands on its own Postgres pool, plus helpers to create
 * tickets and tasks and to wait for a condition.
 */
import { Commands, type NewTask } from '../../src/actors/commands.js';
import { ActorHost, type TaskDefaults } from '../../src/actors/host.js';
import { TimerPoller } from '../../src/actors/timer-poller.js';
import { silentLogger } from '../../src/log.js';
import type { Sql } from '../../src/persistence/db.js';
import { ClaimService } from '../../src/workers/claims.js';
import {
  type Executor,
  ExecutorRegistry,
  SleepExecutor,
} from '../../src/workers/executors/index.js';
import { Wakeups } from '../../src/workers/wakeups.js';
import { WorkerPool, type WorkerPoolOptions } from '../../src/workers/worker-pool.js';

export interface ProcessOptions {
  taskDefaults?: Partial<TaskDefaults>;
  typeLimits?: Record<string, number>;
  timerPollMs?: number;
  stuckAfterMs?: number;
  diagnosticCooldownMs?: number;
}

export type TestProcess = ReturnType<typeof testProcess>;

export function testProcess(sql: Sql, o: ProcessOptions = {}) {
  const host = new ActorHost(sql, {
    taskDefaults: { maxAttempts: 3, leaseMs: 30_000, retryBaseMs: 20, ...o.taskDefaults },
  });
  const wakeups = new Wakeups();
  const claims = new ClaimService(host, wakeups, {
    typeLimits: o.typeLimits ?? {},
    maxWaitMs: 10_000,
    pollMs: 200,
  });
  const poller = new TimerPoller(host, sql, silentLogger(), { pollMs: o.timerPollMs ?? 20 });
  const commands = new Commands(host, {
    stuckAfterMs: o.stuckAfterMs ?? 3_600_000,
    diagnosticCooldownMs: o.diagnosticCooldownMs ?? 3_600_000,
  });
  const pools: WorkerPool[] = [];
  return {
    host,
    wakeups,
    claims,
    poller,
    commands,
    /** A started worker pool; `executors` default to `sleep`. */
    pool(options: Partial<WorkerPoolOptions> = {}, executors: Executor[] = [new SleepExecutor()]) {
      const registry = new ExecutorRegistry();
      for (const e of executors) registry.register(e);
      const pool = new WorkerPool(host, claims, registry, silentLogger(), {
        workerId: 'w',
        concurrency: 2,
        heartbeatMs: 1_000,
        claimWaitMs: 5_000,
        ...options,
      });
      pool.start();
      pools.push(pool);
      return pool;
    },
    async ticket(title = 't'): Promise<string> {
      const { value } = await host.transact((u) => commands.createTicket(u, { title }));
      await host.send('ticket', value.id, { type: 'START' });
      return value.id;
    },
    async task(ticketId: string, spec: NewTask): Promise<string> {
      const { value } = await host.transact((u) => commands.addTask(u, ticketId, spec));
      return value.id;
    },
    /** Stops pools (no grace), the poller and the wake-up subscription. */
    async close(): Promise<void> {
      await Promise.all(pools.map((p) => p.stop(0)));
      await poller.stop();
      claims.close();
    },
  };
}

export async function until(
  check: () => Promise<boolean> | boolean,
  ms = 10_000,
  what = 'condition',
): Promise<void> {
  const end = Date.now() + ms;
  while (!(await check())) {
    if (Date.now() > end) throw new Error(`${what} not met within ${ms} ms`);
    await new Promise((r) => setTimeout(r, 15));
  }
}

export const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

export async function taskRow(sql: Sql, id: string) {
  const [row] = await sql<
    {
      state: string;
      attempt: number;
      worker_id: string | null;
      snapshot: { context: Record<string, unknown> };
    }[]
  >`select state, attempt, worker_id, snapshot from tasks where id = ${id}`;
  if (!row) throw new Error(`no task ${id}`);
  return {
    state: row.state,
    attempt: row.attempt,
    workerId: row.worker_id,
    ctx: row.snapshot.context,
  };
}

export async function eventTypes(sql: Sql, id: string): Promise<string[]> {
  const rows = await sql<{ type: string }[]>`
    select type from events where entity_id = ${id} order by seq`;
  return rows.map((r) => r.type);
}
