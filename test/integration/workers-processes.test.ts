/**
 * Real worker processes (`bin/orchestrator worker`) on one database: shell tasks across four
 * of them (200 by default, WORKER_PROCESS_TASKS=1000 for the full run), each run and
 * completed once; a worker killed with SIGKILL in the middle of a
 * shell task, whose task is reclaimed after its lease with no two runs overlapping and
 * whose late COMPLETE is stale; SIGTERM during work: exit 0 within the grace, nothing left
 * claimed.
 */
import { type ChildProcess, spawn } from 'node:child_process';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { StaleToken } from '../../src/errors.js';
import { createTestDatabase, type TestDatabase } from '../support/database.js';
import { tempDir } from '../support/temp-dir.js';
import { NATS_URL, natsAdmin, testNames } from '../support/transport.js';
import { type TestProcess, taskRow, testProcess, until } from '../support/worker-process.js';

const TASKS = Number(process.env.WORKER_PROCESS_TASKS ?? 200);
const BIN = new URL('../../bin/orchestrator', import.meta.url).pathname;
const names = testNames();
const dir = tempDir('orch-workers-');
const children: ChildProcess[] = [];
let db: TestDatabase;
let p: TestProcess;

beforeAll(async () => {
  db = await createTestDatabase('workers_processes');
  p = testProcess(db.pool(4), { taskDefaults: { leaseMs: 1_500, retryBaseMs: 50 } });
});
// A test that failed half-way must not leave workers that take the next test's tasks.
afterEach(async () => {
  const alive = children.filter((c) => c.exitCode === null && c.signalCode === null);
  for (const c of alive) c.kill('SIGKILL');
  await Promise.all(alive.map((c) => new Promise((r) => c.once('exit', r))));
});
afterAll(async () => {
  await p.close();
  await db.drop();
  const admin = await natsAdmin();
  await admin.close([names]);
});

interface Worker {
  child: ChildProcess;
  exited: Promise<number | null>;
  ready: Promise<void>;
  output: () => string;
}

function worker(id: string, env: Record<string, string> = {}): Worker {
  const child = spawn(process.execPath, [BIN, 'worker'], {
    env: {
      PATH: process.env.PATH ?? '',
      HOME: process.env.HOME ?? '/tmp',
      DATABASE_URL: db.url,
      NATS_URL,
      NATS_PREFIX: names.prefix,
      NATS_STREAM: names.stream,
      WORKER_ID: id,
      WORKER_CONCURRENCY: '2',
      ENABLE_SHELL_EXECUTOR: '1',
      // Tests run as root in CI: opt in, as an operator would.
      ...(process.getuid?.() === 0 ? { SHELL_ALLOW_ROOT: '1' } : {}),
      LEASE_MS: '1500',
      HEARTBEAT_MS: '300',
      TIMER_POLL_MS: '100',
      RETRY_BASE_MS: '50',
      LOG_LEVEL: 'warn',
      ...env,
    },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  children.push(child);
  let out = '';
  child.stdout?.on('data', (b: Buffer) => {
    out += b.toString();
  });
  child.stderr?.on('data', (b: Buffer) => {
    out += b.toString();
  });
  const exited = new Promise<number | null>((r) => child.once('exit', (code) => r(code)));
  const ready = until(
    () => {
      if (child.exitCode !== null) throw new Error(`worker ${id} exited:\n${out}`);
      return out.includes('orchestrator worker running');
    },
    30_000,
    `worker ${id} to start`,
  );
  return { child, exited, ready, output: () => out };
}

async function states(ids: string[]): Promise<Record<string, number>> {
  const rows = await db.sql<{ state: string; n: number }[]>`
    select state, count(*)::int as n from tasks where id in ${db.sql(ids)} group by state`;
  return Object.fromEntries(rows.map((r) => [r.state, r.n]));
}

describe('worker processes', () => {
  it(`${TASKS} shell tasks across four worker processes: each id written once, each completed once`, async () => {
    const file = join(dir, 'ids.txt');
    const workers = ['p1', 'p2', 'p3', 'p4'].map((id) => worker(id));
    let took = 0;
    // A task's lease is set when it is created. Nothing here needs one to run out, so these
    // get 10 s: a loaded machine cannot starve a heartbeat that long, and a second write can
    // then only be a double claim.
    const long = testProcess(db.pool(2), { taskDefaults: { leaseMs: 10_000, retryBaseMs: 50 } });
    const tickets = await Promise.all(Array.from({ length: 10 }, () => long.ticket()));
    const ids = (
      await Promise.all(
        tickets.map(async (t) => {
          const mine: string[] = [];
          for (let i = 0; i < TASKS / 10; i++) {
            mine.push(
              await long.task(t, {
                type: 'x',
                executor: 'shell',
                payload: { command: `echo $TASK_ID >> ${file}` },
              }),
            );
          }
          return mine;
        }),
      )
    ).flat();
    await Promise.all(workers.map((w) => w.ready));
    const started = Date.now();
    await until(async () => (await states(ids)).completed === TASKS, 120_000, 'all completed');
    took = Date.now() - started;
    for (const w of workers) w.child.kill('SIGTERM');
    expect(await Promise.all(workers.map((w) => w.exited))).toEqual([0, 0, 0, 0]);

    const written = (await readFile(file, 'utf8')).trim().split('\n');
    expect(written).toHaveLength(TASKS);
    expect(new Set(written)).toEqual(new Set(ids));
    const [events] = await db.sql<{ completed: number; claimed: number }[]>`
      select count(*) filter (where type = 'task.completed')::int as completed,
        count(*) filter (where type = 'task.claimed')::int as claimed
      from events where entity_id in ${db.sql(ids)}`;
    expect(events).toEqual({ completed: TASKS, claimed: TASKS });
    const [by] = await db.sql<{ workers: number }[]>`
      select count(distinct split_part(worker_id, '#', 1))::int as workers
      from tasks where id in ${db.sql(ids)}`;
    expect(by?.workers).toBe(4);
    await long.close();
    console.log(`${TASKS} shell tasks, 4 worker processes x 2 slots: ${took} ms`);
  }, 180_000);

  it('kill -9 mid shell task: reclaimed after its lease, runs never overlap, the late COMPLETE is stale', async () => {
    const log = join(dir, 'runs.txt');
    const ticket = await p.ticket();
    const id = await p.task(ticket, {
      type: 'x',
      executor: 'shell',
      payload: {
        command: `echo "start $TASK_ATTEMPT" >> ${log}; sleep 2; echo "end $TASK_ATTEMPT" >> ${log}`,
      },
    });
    const first = worker('doomed');
    await first.ready;
    await until(async () => (await readFile(log, 'utf8').catch(() => '')).includes('start 1'));
    const { ctx } = await taskRow(db.sql, id);
    const oldToken = ctx.token as string;
    first.child.kill('SIGKILL');
    await first.exited;

    const second = worker('rescuer');
    await second.ready;
    // While the rescuer holds attempt 2, the dead worker's COMPLETE is stale and changes nothing.
    await until(async () => {
      const row = await taskRow(db.sql, id);
      return row.state === 'running' && row.attempt === 2;
    }, 20_000);
    const before = await db.sql`select version, seq from tasks where id = ${id}`;
    await expect(
      p.host.send('task', id, { type: 'COMPLETE', token: oldToken }),
    ).rejects.toBeInstanceOf(StaleToken);
    expect(await db.sql`select version, seq from tasks where id = ${id}`).toEqual(before);

    await until(async () => (await taskRow(db.sql, id)).state === 'completed', 20_000);
    second.child.kill('SIGTERM');
    expect(await second.exited).toBe(0);
    expect((await readFile(log, 'utf8')).trim().split('\n')).toEqual([
      'start 1',
      'start 2',
      'end 2',
    ]);
    const done = await taskRow(db.sql, id);
    expect(done).toMatchObject({ attempt: 2, workerId: expect.stringMatching(/^rescuer#/) });
    // After completion it is refused too (a completed task takes no event at all).
    const after = await db.sql`select version, seq from tasks where id = ${id}`;
    await expect(p.host.send('task', id, { type: 'COMPLETE', token: oldToken })).rejects.toThrow();
    expect(await db.sql`select version, seq from tasks where id = ${id}`).toEqual(after);
  }, 40_000);

  it('SIGTERM during work: exit 0 within the grace period, the task released, none left claimed', async () => {
    const ticket = await p.ticket();
    const ids = [
      await p.task(ticket, { type: 'x', executor: 'sleep', payload: { ms: 60_000 } }),
      await p.task(ticket, { type: 'x', executor: 'sleep', payload: { ms: 60_000 } }),
    ];
    const w = worker('leaving', { SHUTDOWN_GRACE_MS: '500' });
    await w.ready;
    await until(async () => (await states(ids)).running === 2, 10_000);
    const started = Date.now();
    w.child.kill('SIGTERM');
    expect(await w.exited).toBe(0);
    expect(Date.now() - started).toBeLessThan(3_000);
    expect(await states(ids)).toEqual({ pending: 2 });
    for (const id of ids) await p.host.send('task', id, { type: 'CANCEL' });
  }, 40_000);
});
