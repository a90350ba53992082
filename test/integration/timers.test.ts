/**
 * Durable timers: a timer set by one "process" fires once in another started after the
 * first stopped, fires once with several pollers racing, and does nothing once its state
 * was left. This is what XState's in-memory `after` cannot do (xstate#5331).
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Commands } from '../../src/actors/commands.js';
import { ActorHost } from '../../src/actors/host.js';
import { TimerPoller } from '../../src/actors/timer-poller.js';
import { silentLogger } from '../../src/log.js';
import type { Sql } from '../../src/persistence/db.js';
import { TIMER_CHANNEL } from '../../src/persistence/timer-rows.js';
import { createTestDatabase, type TestDatabase } from '../support/database.js';
import { deferred } from '../support/deferred.js';
import { TASK_DEFAULTS } from '../support/fixtures.js';

let db: TestDatabase;
beforeAll(async () => {
  db = await createTestDatabase('timers');
});
afterAll(() => db.drop());

function processOn(sql: Sql, pollMs = 50) {
  const host = new ActorHost(sql, { taskDefaults: TASK_DEFAULTS });
  const poller = new TimerPoller(host, sql, silentLogger(), { pollMs });
  const commands = new Commands(host, { stuckAfterMs: 3_600_000, diagnosticCooldownMs: 0 });
  return { host, poller, commands };
}

async function newTask(p: ReturnType<typeof processOn>, maxAttempts = 3) {
  const { value: ticket } = await p.host.transact((u) =>
    p.commands.createTicket(u, { title: 't' }),
  );
  const { value: task } = await p.host.transact((u) =>
    p.commands.addTask(u, ticket.id, { type: 'x', maxAttempts }),
  );
  return task.id;
}

/** A task whose attempt failed: in retry_wait, its RETRY timer due after the backoff. */
async function inRetryWait(p: ReturnType<typeof processOn>): Promise<string> {
  const id = await newTask(p);
  const claimed = await p.host.send('task', id, { type: 'CLAIM', workerId: 'w' });
  const token = (claimed.snapshot.context as { token: string }).token;
  await p.host.send('task', id, { type: 'START', token });
  await p.host.send('task', id, { type: 'FAIL', token, error: 'boom' });
  return id;
}

const eventsOf = (id: string, type: string) =>
  db.sql`select seq from events where entity_id = ${id} and type = ${type}`;

async function until(check: () => Promise<boolean>, ms = 5_000): Promise<void> {
  const end = Date.now() + ms;
  while (!(await check())) {
    if (Date.now() > end) throw new Error('condition not met in time');
    await new Promise((r) => setTimeout(r, 20));
  }
}

describe('durable timers', () => {
  it('a lease timer set before a stop fires once in the process started after it', async () => {
    const first = processOn(db.pool(4));
    await first.poller.start();
    const id = await newTask(first);
    await first.host.send('task', id, { type: 'CLAIM', workerId: 'w1', leaseMs: 400 });
    await first.poller.stop(); // the process stops before the lease is due

    const second = processOn(db.pool(4));
    const third = processOn(db.pool(4));
    await Promise.all([second.poller.start(), third.poller.start()]);
    await until(async () => (await eventsOf(id, 'task.lease_expired')).length > 0);
    await new Promise((r) => setTimeout(r, 300));
    await Promise.all([second.poller.stop(), third.poller.stop()]);
    expect(await eventsOf(id, 'task.lease_expired')).toHaveLength(1);
    const [row] = await db.sql`select state from tasks where id = ${id}`;
    // Lease expired with attempts left: retry_wait, then RETRY after the backoff.
    expect(['retry_wait', 'pending']).toContain(row?.state);
  });

  it('many due timers, four pollers: each fires exactly once', async () => {
    const procs = [1, 2, 3, 4].map(() => processOn(db.pool(4), 20));
    const ids: string[] = [];
    for (let i = 0; i < 40; i++) ids.push(await newTask(procs[0]!));
    await Promise.all(
      ids.map((id) =>
        procs[0]!.host.send('task', id, { type: 'CLAIM', workerId: 'w', leaseMs: 150 }),
      ),
    );
    await Promise.all(procs.map((p) => p.poller.start()));
    await until(async () => {
      const rows = await db.sql`select count(*)::int as n from events
        where type = 'task.lease_expired' and entity_id in ${db.sql(ids)}`;
      return rows[0]?.n === 40;
    });
    await new Promise((r) => setTimeout(r, 300));
    await Promise.all(procs.map((p) => p.poller.stop()));
    const dup = await db.sql`select entity_id, count(*)::int as n from events
      where type = 'task.lease_expired' and entity_id in ${db.sql(ids)}
      group by entity_id having count(*) > 1`;
    expect(dup).toEqual([]);
  });

  it('a timer whose state was left does nothing (completed stays completed)', async () => {
    const p = processOn(db.pool(4), 20);
    const id = await newTask(p);
    const claimed = await p.host.send('task', id, { type: 'CLAIM', workerId: 'w', leaseMs: 150 });
    const token = (claimed.snapshot.context as { token: string }).token;
    await p.host.send('task', id, { type: 'START', token });
    await p.host.send('task', id, { type: 'COMPLETE', token, result: { ok: true } });
    expect(await db.sql`select 1 from timers where entity_id = ${id}`).toHaveLength(0);
    await p.poller.start();
    await new Promise((r) => setTimeout(r, 400));
    await p.poller.stop();
    const [row] = await db.sql`select state from tasks where id = ${id}`;
    expect(row?.state).toBe('completed');
    expect(await eventsOf(id, 'task.lease_expired')).toHaveLength(0);
  });

  it('a heartbeat replaces the lease timer; the replaced one never fires', async () => {
    const p = processOn(db.pool(4), 20);
    const id = await newTask(p);
    // Heartbeats for 1.5 s, longer than the 1 s lease: the first lease timer would have fired
    // had a heartbeat not replaced it. The gap between heartbeats leaves room for a slow CI.
    const claimed = await p.host.send('task', id, { type: 'CLAIM', workerId: 'w', leaseMs: 1_000 });
    const token = (claimed.snapshot.context as { token: string }).token;
    await p.poller.start();
    for (let i = 0; i < 6; i++) {
      await new Promise((r) => setTimeout(r, 250));
      await p.host.send('task', id, { type: 'HEARTBEAT', token });
    }
    await p.poller.stop();
    const [row] = await db.sql`select state from tasks where id = ${id}`;
    expect(row?.state).toBe('claimed');
    expect(await eventsOf(id, 'task.lease_expired')).toHaveLength(0);
  });
});

describe('a fire that fails', () => {
  it('is tried again soon after a dropped connection, not after the claim lease', async () => {
    const p = processOn(db.pool(4), 50); // the claim lease is its default, 30 s
    const id = await inRetryWait(p); // RETRY due in about a second
    // Another session holds the task's row, so the fire's write waits on it; then the fire's
    // backend is terminated, as a Postgres restart or an operator would.
    const locker = await db.sql.reserve();
    try {
      await locker`begin`;
      await locker`select 1 from tasks where id = ${id} for update`;
      await p.poller.start();
      let waiting: number | undefined;
      await until(async () => {
        const rows = await db.sql<{ pid: number }[]>`
          select pid from pg_stat_activity
          where datname = current_database() and wait_event_type = 'Lock'`;
        waiting = rows[0]?.pid;
        return waiting !== undefined;
      });
      const [claim] = await db.sql<{ locked_until: Date | null }[]>`
        select locked_until from timers where entity_id = ${id}`;
      expect(claim?.locked_until?.getTime()).toBeGreaterThan(Date.now() + 20_000);
      await db.sql`select pg_terminate_backend(${waiting as number})`;
      await locker`commit`;
    } finally {
      locker.release();
    }
    try {
      // Well within the 30 s lease the failed claim would otherwise have held.
      await until(async () => (await eventsOf(id, 'task.retried')).length === 1, 5_000);
    } finally {
      await p.poller.stop();
    }
    const [row] = await db.sql`select state from tasks where id = ${id}`;
    expect(row?.state).toBe('pending');
    expect(await db.sql`select 1 from timers where entity_id = ${id}`).toHaveLength(0);
  });
});

describe('a poll that fails halfway', () => {
  it('still fires the timers it claimed when its lease read fails', async () => {
    const p = processOn(db.pool(4), 50); // the claim lease is its default, 30 s
    const id = await inRetryWait(p);
    await until(async () => {
      const [r] = await db.sql<{ due: boolean }[]>`
        select due_at <= now() as due from timers where entity_id = ${id}`;
      return r?.due === true;
    });
    // The poll's lease read waits behind a table lock and its backend is then terminated;
    // its timer claim (another table) commits in the same poll.
    const locker = await db.sql.reserve();
    try {
      await locker`begin`;
      await locker`lock table tasks in access exclusive mode`;
      await p.poller.start();
      let reader: number | undefined;
      await until(async () => {
        const rows = await db.sql<{ pid: number }[]>`
          select pid from pg_stat_activity
          where datname = current_database() and wait_event_type = 'Lock'
            and query like '%lease_expires_at <= now()%order by%'`;
        reader = rows[0]?.pid;
        const [t] = await db.sql<{ locked_until: Date | null }[]>`
          select locked_until from timers where entity_id = ${id}`;
        return reader !== undefined && t?.locked_until != null;
      });
      await db.sql`select pg_terminate_backend(${reader as number})`;
      await locker`commit`;
    } finally {
      locker.release();
    }
    try {
      await until(async () => (await eventsOf(id, 'task.retried')).length === 1, 5_000);
    } finally {
      await p.poller.stop();
    }
  });
});

describe("the poller's wake-ups", () => {
  it('a commit that lands while the poller reads its next due time still wakes it', async () => {
    const pool = db.pool(4);
    // The poller's first read of its next due time is held until the test lets it go, so the
    // commit below lands after that read and before the poller goes to sleep.
    const atGate = deferred();
    const gate = deferred();
    let held = false;
    const gated = new Proxy(pool, {
      apply(target, self, args: unknown[]) {
        const result = Reflect.apply(target, self, args) as PromiseLike<unknown>;
        const text = (args[0] as { raw?: string[] } | undefined)?.raw?.join('') ?? '';
        if (held || !text.includes('min(due_at)')) return result;
        held = true;
        return Promise.resolve(result).then(async (rows) => {
          atGate.resolve();
          await gate.promise;
          return rows;
        });
      },
    });
    const host = new ActorHost(pool, { taskDefaults: { ...TASK_DEFAULTS, retryBaseMs: 20 } });
    const commands = new Commands(host, { stuckAfterMs: 3_600_000, diagnosticCooldownMs: 0 });
    // It would sleep a minute (or until the task's 30 s lease) unless woken.
    const poller = new TimerPoller(host, gated, silentLogger(), { pollMs: 60_000 });
    const p = { host, poller, commands };
    const id = await newTask(p);
    const claimed = await host.send('task', id, { type: 'CLAIM', workerId: 'w', leaseMs: 30_000 });
    const token = (claimed.snapshot.context as { token: string }).token;
    await host.send('task', id, { type: 'START', token });
    const heard: string[] = [];
    const listener = await db.sql.listen(TIMER_CHANNEL, (payload) => heard.push(payload));
    await poller.start();
    try {
      await atGate.promise;
      // The retry's backoff (about 20 ms) is due long before the poller's next look. Its
      // commit wakes the poller in-process and, through a NOTIFY, in every process: both
      // arrive while the poller is still reading, before it sleeps.
      await host.send('task', id, { type: 'FAIL', token, error: 'x' });
      await until(async () => heard.length > 0);
      await new Promise((r) => setTimeout(r, 100));
      gate.resolve();
      await until(async () => (await eventsOf(id, 'task.retried')).length === 1, 5_000);
    } finally {
      gate.resolve();
      await poller.stop();
      await listener.unlisten();
      await pool.end();
    }
  });
});
