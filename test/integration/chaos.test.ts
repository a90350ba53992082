/**
 * Proof under faults. `npm run chaos` with a short load window (2 `all` + 2 `worker`
 * processes, its own nats-server and database, kill -9, NATS restarts, Postgres backends
 * terminated, a frozen worker) must find no violation of any CONTRACT guarantee.
 *
 * And the bug the chaos run found first, pinned down without processes: a durable timer
 * fired by a process whose cache held an older snapshot of the actor was consumed as
 * "moot", so a task stayed in `retry_wait` (or `claimed` past its lease) for good.
 */
import { spawn } from 'node:child_process';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Commands } from '../../src/actors/commands.js';
import { ActorHost } from '../../src/actors/host.js';
import { TimerPoller } from '../../src/actors/timer-poller.js';
import { silentLogger } from '../../src/log.js';
import type { Sql } from '../../src/persistence/db.js';
import { createTestDatabase, type TestDatabase } from '../support/database.js';

const ROOT = new URL('../../', import.meta.url).pathname;

describe('a timer fired by a process with a stale cache', () => {
  let db: TestDatabase;
  beforeAll(async () => {
    db = await createTestDatabase('chaos_timers');
  });
  afterAll(() => db.drop());

  const processOn = (sql: Sql) => {
    const host = new ActorHost(sql, {
      taskDefaults: { maxAttempts: 3, leaseMs: 300, retryBaseMs: 20 },
    });
    const commands = new Commands(host, { stuckAfterMs: 3_600_000, diagnosticCooldownMs: 0 });
    const poller = new TimerPoller(host, sql, silentLogger(), { pollMs: 20 });
    return { host, commands, poller };
  };

  /** `b` creates the task (and so caches it as pending); `a` claims it. */
  async function setUp() {
    const a = processOn(db.pool(3));
    const b = processOn(db.pool(3));
    const { value: ticket } = await b.host.transact((u) =>
      b.commands.createTicket(u, { title: 't' }),
    );
    const { value: task } = await b.host.transact((u) =>
      b.commands.addTask(u, ticket.id, { type: 'x', executor: 'sleep' }),
    );
    const claimed = await a.host.send('task', task.id, { type: 'CLAIM', workerId: 'w' });
    const token = (claimed.snapshot.context as { token: string }).token;
    return { a, b, id: task.id, token };
  }

  const typesOf = async (id: string) =>
    (
      await db.sql<{ type: string }[]>`select type from events where entity_id = ${id} order by seq`
    ).map((r) => r.type);

  async function until(check: () => Promise<boolean>, ms: number) {
    const end = Date.now() + ms;
    while (!(await check())) {
      if (Date.now() > end) return false;
      await new Promise((r) => setTimeout(r, 25));
    }
    return true;
  }

  it('still retries a failed attempt (RETRY after backoff)', async () => {
    const { a, b, id, token } = await setUp();
    await a.host.send('task', id, { type: 'START', token });
    await a.host.send('task', id, { type: 'FAIL', token, error: 'boom' });
    // Only b polls: its cache says `pending`, Postgres says `retry_wait`.
    await b.poller.start();
    try {
      expect(await until(async () => (await typesOf(id)).includes('task.retried'), 5_000)).toBe(
        true,
      );
    } finally {
      await b.poller.stop();
    }
  });

  it('still expires a lease nobody renews (LEASE_EXPIRED)', async () => {
    const { a, b, id, token } = await setUp();
    await a.host.send('task', id, { type: 'START', token });
    await b.poller.start();
    try {
      expect(
        await until(async () => (await typesOf(id)).includes('task.lease_expired'), 5_000),
      ).toBe(true);
    } finally {
      await b.poller.stop();
    }
  });
});

describe('npm run chaos', () => {
  it('finds no violation under kill -9, NATS restarts, Postgres kills and a frozen worker', async () => {
    // The settle is a bound, not a wait: a workflow ticket started at the end of the load
    // may still fail a review eight times (about 25 s of backoff) and go round its build
    // phase again, which took 52 s in one run. 60 s left such a ticket's review in
    // retry_wait at the deadline now and then.
    const child = spawn(
      `${ROOT}node_modules/.bin/tsx`,
      ['scripts/chaos.ts', '--duration', '45', '--settle', '120', '--fault-gap-ms', '3500'],
      { cwd: ROOT, stdio: ['ignore', 'pipe', 'pipe'] },
    );
    let out = '';
    let err = '';
    child.stdout.on('data', (b: Buffer) => {
      out += b.toString();
    });
    child.stderr.on('data', (b: Buffer) => {
      err += b.toString();
    });
    const code = await new Promise<number | null>((resolve) => child.once('exit', resolve));
    if (code !== 0) console.error(`${err.slice(-6_000)}\n${out}`);
    expect(out).toMatch(/RESULT: no violations/);
    expect(out).toMatch(/kill -9 \d/);
    expect(code).toBe(0);
  }, 240_000);
});
