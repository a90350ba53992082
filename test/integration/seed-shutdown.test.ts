/**
 * Seed regression test, unclean shutdown (issue 8, item 2): seed 003 (concurrency &
 * production readiness), section 3, "Clean Shutdown": "Worker thread was daemon and would be
 * killed when process exited, with no cleanup" — a run in progress was simply dropped, left
 * RUNNING for nobody.
 *
 * Here `bin/orchestrator worker` runs as a real child process with a long sleep task and a
 * long shell task in progress. SIGTERM: it exits 0 within SHUTDOWN_GRACE_MS plus a margin;
 * both tasks are RELEASEd (pending again, the attempt not charged, no worker) and another worker
 * claims them at once, long before their 60 s lease could have expired; the shell task's
 * process group, the child's Postgres connections and the child itself are gone.
 */
import { type ChildProcess, execFileSync, spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { transportNames } from '../../src/transport/subjects.js';
import { createTestDatabase, type TestDatabase } from '../support/database.js';
import { NATS_URL, natsAdmin } from '../support/transport.js';
import {
  eventTypes,
  type TestProcess,
  taskRow,
  testProcess,
  until,
} from '../support/worker-process.js';

const BIN = new URL('../../bin/orchestrator', import.meta.url).pathname;
const GRACE_MS = 1_000;
/** Beyond the grace: stopping the transport and closing the pools, on a loaded machine. */
const MARGIN_MS = 6_000;
const suffix = randomBytes(3).toString('hex').toUpperCase();
const names = transportNames(`seedstop${suffix}`, `SEEDSTOP_${suffix}`);

let db: TestDatabase;
let p: TestProcess;
let child: ChildProcess | null = null;

beforeAll(async () => {
  db = await createTestDatabase('seed_shutdown');
  p = testProcess(db.pool(4));
});
afterAll(async () => {
  child?.kill('SIGKILL');
  await p.close();
  await db.drop();
  const admin = await natsAdmin();
  await admin.close([names]);
});

const alive = (pid: number) => {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
};

/** Processes of a process group that are not zombies (ps: pgid and state). */
function running(pgid: number): string[] {
  return execFileSync('ps', ['-eo', 'pgid=,stat=,pid='], { encoding: 'utf8' })
    .split('\n')
    .map((l) => l.trim().split(/\s+/))
    .filter(([g, stat]) => Number(g) === pgid && stat !== undefined && !stat.startsWith('Z'))
    .map((f) => f.join(' '));
}

describe('seed regressions: shutdown', () => {
  it('unclean shutdown: SIGTERM to a worker process releases its running tasks and exits 0', {
    timeout: 60_000,
  }, async () => {
    const proc = spawn(process.execPath, [BIN, 'worker'], {
      env: {
        PATH: process.env.PATH ?? '',
        HOME: process.env.HOME ?? '/tmp',
        DATABASE_URL: db.url,
        NATS_URL,
        NATS_PREFIX: names.prefix,
        NATS_STREAM: names.stream,
        DATA_DIR: mkdtempSync(join(tmpdir(), 'seed-stop-data-')),
        WORKER_ID: 'seed-worker',
        WORKER_CONCURRENCY: '2',
        SHUTDOWN_GRACE_MS: String(GRACE_MS),
        LEASE_MS: '60000',
        HEARTBEAT_MS: '1000',
        ENABLE_SHELL_EXECUTOR: '1',
        // Tests run as root in CI: opt in, as an operator would.
        ...(process.getuid?.() === 0 ? { SHELL_ALLOW_ROOT: '1' } : {}),
        LOG_LEVEL: 'warn',
      },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    child = proc;
    let out = '';
    proc.stdout?.on('data', (b: Buffer) => {
      out += b.toString();
    });
    proc.stderr?.on('data', (b: Buffer) => {
      out += b.toString();
    });
    const exited = new Promise<{ code: number | null; at: number }>((resolve) =>
      proc.once('exit', (code) => resolve({ code, at: Date.now() })),
    );
    await until(() => out.includes('orchestrator worker running'), 30_000, `startup: ${out}`);

    const pidFile = join(mkdtempSync(join(tmpdir(), 'seed-stop-')), 'pid');
    const ticket = await p.ticket();
    const sleepTask = await p.task(ticket, {
      type: 'x',
      executor: 'sleep',
      payload: { ms: 60_000 },
    });
    const shellTask = await p.task(ticket, {
      type: 'x',
      executor: 'shell',
      payload: { command: `echo $$ > ${pidFile}; sleep 60` },
    });
    const ids = [sleepTask, shellTask];
    await until(
      async () => {
        const rows = await Promise.all(ids.map((id) => taskRow(db.sql, id)));
        return rows.every((r) => r.state === 'running');
      },
      20_000,
      'both tasks running in the child',
    );
    await until(() => readFileSync(pidFile, { encoding: 'utf8', flag: 'a+' }).trim() !== '');
    const shellGroup = Number(readFileSync(pidFile, 'utf8').trim());
    expect(running(shellGroup).length).toBeGreaterThan(0);
    for (const id of ids) {
      expect(await taskRow(db.sql, id)).toMatchObject({ attempt: 1 });
      expect((await taskRow(db.sql, id)).workerId).toMatch(/^seed-worker#/);
    }

    const signalled = Date.now();
    proc.kill('SIGTERM');
    const { code, at } = await Promise.race([
      exited,
      new Promise<never>((_, reject) =>
        setTimeout(() => reject(new Error(`no exit after SIGTERM: ${out}`)), 20_000),
      ),
    ]);
    expect(code, out).toBe(0);
    expect(at - signalled).toBeLessThan(GRACE_MS + MARGIN_MS);

    // Released, not abandoned: pending at once, the attempt not charged, held by no one.
    for (const id of ids) {
      const row = await taskRow(db.sql, id);
      expect(row).toMatchObject({ state: 'pending', attempt: 1, workerId: null });
      expect(row.ctx.attemptsUsed).toBe(0);
      const types = await eventTypes(db.sql, id);
      expect(types.at(-1)).toBe('task.released');
      expect(types.filter((t) => t === 'task.released')).toHaveLength(1);
      expect(types).not.toContain('task.lease_expired');
    }
    // Nothing left running: the child, the shell's process group, its connections.
    expect(alive(proc.pid ?? 0)).toBe(false);
    // (Exited members may linger as zombies until init reaps them: dead, not running.)
    await until(() => running(shellGroup).length === 0, 5_000, 'shell process group gone');
    const conns = await db.sql`select 1 from pg_stat_activity
      where datname = current_database() and application_name = 'orchestrator-worker'`;
    expect(conns).toHaveLength(0);

    // Claimable at once by another worker (their 60 s leases are nowhere near expiry).
    const next = [];
    for (const [i] of ids.entries()) {
      next.push(await p.claims.claimOnce({ workerId: `next-${i}`, executors: ['sleep', 'shell'] }));
    }
    expect(new Set(next.map((n) => n?.task.id))).toEqual(new Set(ids));
    // A new claim is a new attempt number: two executions never share one.
    for (const n of next) expect(n?.task.attempt).toBe(2);
    for (const id of ids) await p.host.send('task', id, { type: 'CANCEL' });
  });
});
