/**
 * Task leases as a column of the task row: a claim, a start and heartbeats write no timer row;
 * a passed lease expires once, across a restart and with two processes' pollers racing, and
 * the task is retried; a heartbeat that extends the lease before the poller fires it wins;
 * the migration moves the lease timer rows of an existing database into the column.
 */
import { randomUUID } from 'node:crypto';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Commands } from '../../src/actors/commands.js';
import { ActorHost } from '../../src/actors/host.js';
import { TimerPoller } from '../../src/actors/timer-poller.js';
import { silentLogger } from '../../src/log.js';
import type { Sql } from '../../src/persistence/db.js';
import { loadMigrations, migrate } from '../../src/persistence/migrate.js';
import { TIMER_CHANNEL } from '../../src/persistence/timer-rows.js';
import { createTestDatabase, type TestDatabase } from '../support/database.js';

let db: TestDatabase;
beforeAll(async () => {
  db = await createTestDatabase('lease_column');
});
afterAll(() => db.drop());

function processOn(sql: Sql, pollMs = 20) {
  const host = new ActorHost(sql, {
    taskDefaults: { maxAttempts: 3, leaseMs: 30_000, retryBaseMs: 20 },
  });
  const poller = new TimerPoller(host, sql, silentLogger(), { pollMs });
  const commands = new Commands(host, { stuckAfterMs: 3_600_000, diagnosticCooldownMs: 0 });
  return { sql, host, poller, commands };
}
type Proc = ReturnType<typeof processOn>;

async function newTask(p: Proc, maxAttempts = 3): Promise<string> {
  const { value: ticket } = await p.host.transact((u) =>
    p.commands.createTicket(u, { title: 't' }),
  );
  const { value: task } = await p.host.transact((u) =>
    p.commands.addTask(u, ticket.id, { type: 'x', maxAttempts }),
  );
  return task.id;
}

const tokenOf = (a: { snapshot: { context: Record<string, unknown> } }) =>
  a.snapshot.context.token as string;

async function count(sql: Sql, type: string, ids: string[]): Promise<number> {
  const [r] = await sql<{ n: number }[]>`select count(*)::int as n from events
    where type = ${type} and entity_id in ${sql(ids)}`;
  return r?.n ?? 0;
}

async function leaseOf(sql: Sql, id: string): Promise<Date | null> {
  const [r] = await sql<{ lease: Date | null }[]>`
    select lease_expires_at as lease from tasks where id = ${id}`;
  return r?.lease ?? null;
}

async function until(check: () => Promise<boolean>, ms = 15_000): Promise<void> {
  const end = Date.now() + ms;
  while (!(await check())) {
    if (Date.now() > end) throw new Error('condition not met in time');
    await new Promise((r) => setTimeout(r, 20));
  }
}

describe('task leases as a column', () => {
  it('a claim, a start and heartbeats write no timer row: the lease is the task row', async () => {
    const p = processOn(db.pool(2));
    const id = await newTask(p);
    const claimed = await p.host.send('task', id, {
      type: 'CLAIM',
      workerId: 'w',
      leaseMs: 60_000,
    });
    const token = tokenOf(claimed);
    const expected = claimed.snapshot.context.leaseExpiresAt as number;
    expect((await leaseOf(p.sql, id))?.getTime()).toBe(expected);
    await p.host.send('task', id, { type: 'START', token });
    for (let i = 0; i < 3; i++) await p.host.send('task', id, { type: 'HEARTBEAT', token });
    const beat = await p.host.send('task', id, { type: 'HEARTBEAT', token });
    expect((await leaseOf(p.sql, id))?.getTime()).toBe(beat.snapshot.context.leaseExpiresAt);
    expect(await db.sql`select key from timers where entity_id = ${id}`).toEqual([]);
    // Leaving claimed and running clears it.
    await p.host.send('task', id, { type: 'COMPLETE', token });
    expect(await leaseOf(p.sql, id)).toBeNull();
    expect(await db.sql`select key from timers where entity_id = ${id}`).toEqual([]);
    await p.sql.end();
  });

  it('a lease set before a stop expires once after it, and the task is retried', async () => {
    const first = processOn(db.pool(2));
    const id = await newTask(first);
    await first.host.send('task', id, { type: 'CLAIM', workerId: 'gone', leaseMs: 300 });
    await first.sql.end(); // the process stops before the lease passes; no poller ran

    const second = processOn(db.pool(4));
    const third = processOn(db.pool(4));
    await Promise.all([second.poller.start(), third.poller.start()]);
    try {
      await until(async () => (await count(db.sql, 'task.retried', [id])) === 1);
    } finally {
      await Promise.all([second.poller.stop(), third.poller.stop()]);
    }
    expect(await count(db.sql, 'task.lease_expired', [id])).toBe(1);
    expect(second.poller.fired + third.poller.fired).toBe(2); // the expiry, then the retry
    const [row] = await db.sql`select state, attempt from tasks where id = ${id}`;
    expect(row).toEqual({ state: 'pending', attempt: 1 });
    expect(await leaseOf(db.sql, id)).toBeNull();
    // Claimable again: the next claim is attempt 2 with its own lease.
    const again = await second.host.send('task', id, { type: 'CLAIM', workerId: 'next' });
    expect(again.snapshot.context.attempt).toBe(2);
    expect(await leaseOf(db.sql, id)).not.toBeNull();
    await Promise.all([second.sql.end(), third.sql.end()]);
  });

  it('two processes polling: each passed lease expires exactly once', async () => {
    const procs = [processOn(db.pool(4)), processOn(db.pool(4))];
    const ids: string[] = [];
    for (let i = 0; i < 30; i++) ids.push(await newTask(procs[0]!, 1));
    await Promise.all(
      ids.map((id) =>
        procs[0]!.host.send('task', id, { type: 'CLAIM', workerId: 'w', leaseMs: 150 }),
      ),
    );
    await Promise.all(procs.map((p) => p.poller.start()));
    try {
      await until(async () => (await count(db.sql, 'task.lease_expired', ids)) === ids.length);
      // Give a duplicate every chance to show.
      await new Promise((r) => setTimeout(r, 300));
    } finally {
      await Promise.all(procs.map((p) => p.poller.stop()));
    }
    const dup = await db.sql`select entity_id from events
      where type = 'task.lease_expired' and entity_id in ${db.sql(ids)}
      group by entity_id having count(*) > 1`;
    expect(dup).toEqual([]);
    expect(await count(db.sql, 'task.lease_expired', ids)).toBe(ids.length);
    // maxAttempts 1: each expiry failed its task, and nothing holds a lease any more.
    const states = await db.sql`select distinct state from tasks where id in ${db.sql(ids)}`;
    expect(states).toEqual([{ state: 'failed' }]);
    expect(
      await db.sql`select 1 from tasks where id in ${db.sql(ids)} and lease_expires_at is not null`,
    ).toEqual([]);
    await Promise.all(procs.map((p) => p.sql.end()));
  });

  it('a heartbeat that extends a passed lease before the poller fires it wins', async () => {
    const p = processOn(db.pool(4));
    const id = await newTask(p);
    const claimed = await p.host.send('task', id, { type: 'CLAIM', workerId: 'w', leaseMs: 200 });
    const token = tokenOf(claimed);
    // The deadline passes with no poller running; a poller finds it passed...
    await until(async () => {
      const [r] = await db.sql`select 1 from tasks where id = ${id} and lease_expires_at < now()`;
      return r !== undefined;
    });
    // ...but the heartbeat commits first: the lease runs again and nothing expires it.
    const beat = await p.host.send('task', id, { type: 'HEARTBEAT', token });
    expect(await p.host.expireLease(id)).toBeNull();
    expect(await p.poller.tick()).toBe(0);
    const [row] = await db.sql`select state, version from tasks where id = ${id}`;
    expect(row).toEqual({ state: 'claimed', version: beat.version });
    expect(await count(db.sql, 'task.lease_expired', [id])).toBe(0);
    // Once no heartbeat comes, it does expire (once).
    await until(async () => {
      await p.poller.tick();
      return (await count(db.sql, 'task.lease_expired', [id])) === 1;
    });
    expect(await p.host.expireLease(id)).toBeNull();
    expect(await count(db.sql, 'task.lease_expired', [id])).toBe(1);
    await p.sql.end();
  });

  it('the migration moves the lease timer rows of an existing database into the column', async () => {
    const old = await createTestDatabase('lease_column_migration', { migrate: false });
    try {
      const all = await loadMigrations();
      const before = all.filter((m) => m.name < '0010');
      expect(before.length).toBeLessThan(all.length);
      await migrate(old.sql, before);
      // Today's code makes the rows; its settling write reads `has_dependents` (0014), which
      // the old schema gets for that long only.
      await old.sql`alter table tasks add column has_dependents boolean not null default false`;
      const p = processOn(old.pool(2));
      const held = await newTask(p);
      const done = await newTask(p);
      const claimed = await p.host.send('task', held, { type: 'CLAIM', workerId: 'w' });
      const c2 = await p.host.send('task', done, { type: 'CLAIM', workerId: 'w' });
      await p.host.send('task', done, { type: 'START', token: tokenOf(c2) });
      await p.host.send('task', done, { type: 'COMPLETE', token: tokenOf(c2) });
      // As the earlier code left them: the lease a timer row, the column a projection (here
      // made to differ, and stale on the completed task, to see which one wins).
      const due = new Date(Date.now() + 120_000);
      await old.sql`insert into timers (entity_type, entity_id, key, event, due_at, token)
        values ('task', ${held}, 'xstate.after.lease.task.claimed',
          ${old.sql.json({ type: 'xstate.after.lease.task.claimed' })}, ${due},
          ${randomUUID()})`;
      await old.sql`update tasks set lease_expires_at = now() where id = ${held}`;
      await old.sql`update tasks set lease_expires_at = now() where id = ${done}`;
      expect(tokenOf(claimed)).toBeTruthy();
      await old.sql`alter table tasks drop column has_dependents`;

      expect(await migrate(old.sql)).toContain('0010-lease-column.sql');
      expect((await leaseOf(old.sql, held))?.getTime()).toBe(due.getTime());
      expect(await leaseOf(old.sql, done)).toBeNull();
      expect(await old.sql`select 1 from timers where key like 'xstate.after.lease.%'`).toEqual([]);
      const [index] = await old.sql`select indexdef from pg_indexes
        where indexname = 'tasks_lease_due'`;
      expect(index?.indexdef).toContain('WHERE (lease_expires_at IS NOT NULL)');
      await p.sql.end();
    } finally {
      await old.drop();
    }
  });

  it('wakes pollers after the commit, and only for what falls due within the poll interval', async () => {
    const heard: number[] = [];
    const listener = await db.sql.listen(TIMER_CHANNEL, (payload) => {
      heard.push(Number(payload));
    });
    // Pollers that would sleep a minute: only a wake makes the retry below happen in time.
    const p = processOn(db.pool(4), 60_000);
    const other = processOn(db.pool(4), 60_000);
    await Promise.all([p.poller.start(), other.poller.start()]);
    try {
      const id = await newTask(p);
      const claimed = await p.host.send('task', id, {
        type: 'CLAIM',
        workerId: 'w',
        leaseMs: 120_000,
      });
      const token = tokenOf(claimed);
      await p.host.send('task', id, { type: 'START', token });
      await p.host.send('task', id, { type: 'HEARTBEAT', token });
      // A lease two minutes out needs no wake; a retry backoff of ~20 ms does.
      const failed = await p.host.send('task', id, { type: 'FAIL', token, error: 'x' });
      const retryAt = failed.snapshot.context.retryAt as number;
      await until(async () => (await count(db.sql, 'task.retried', [id])) === 1);
      await until(async () => heard.length > 0);
      expect(heard).toEqual([retryAt]);
    } finally {
      await Promise.all([p.poller.stop(), other.poller.stop()]);
      await listener.unlisten();
      await Promise.all([p.sql.end(), other.sql.end()]);
    }
  });
});
