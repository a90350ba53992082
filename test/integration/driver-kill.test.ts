/**
 * A Postgres backend killed in the middle of a transaction (pg_terminate_backend, a server
 * restart, a failover) must fail that transaction and leave the process and its pool
 * working. postgres.js 3.4.9 crashed the process instead (porsager/postgres#1154); our
 * postinstall patch (scripts/patch-deps.mjs) fixes it, and this test fails without it.
 */
import { afterAll, beforeAll, expect, it } from 'vitest';
import { ActorHost } from '../../src/actors/host.js';
import { createTestDatabase, type TestDatabase } from '../support/database.js';
import { TASK_DEFAULTS, ticketInput } from '../support/fixtures.js';

let db: TestDatabase;
beforeAll(async () => {
  db = await createTestDatabase('driver_kill');
});
afterAll(() => db.drop());

async function killWhenWaiting(appName: string): Promise<void> {
  for (let i = 0; i < 200; i++) {
    const rows = await db.sql`select pg_terminate_backend(pid) as killed from pg_stat_activity
      where application_name = ${appName} and wait_event = 'PgSleep'`;
    if (rows.length > 0) return;
    await new Promise((r) => setTimeout(r, 25));
  }
  throw new Error('the victim never started waiting');
}

/**
 * Kills the waiting backend and returns what `pending` failed with. The handler is attached
 * before the kill: the rejection can land while the kill's own query is still answering, and
 * a rejection with no handler yet is an unhandled one, whoever awaits it later.
 */
async function failureAfterKill(appName: string, pending: Promise<unknown>): Promise<unknown> {
  const outcome = pending.then(
    () => null,
    (error: unknown) => error,
  );
  await killWhenWaiting(appName);
  return outcome;
}

it('a killed backend fails its transaction; the process and the pool carry on', async () => {
  const { createSql } = await import('../../src/persistence/db.js');
  const victim = createSql(db.url, { max: 2, applicationName: 'victim-raw' });
  for (let round = 0; round < 3; round++) {
    const tx = victim.begin(async (t) => {
      await t`select pg_sleep(10)`;
    });
    expect(await failureAfterKill('victim-raw', tx)).toBeInstanceOf(Error);
    // The pool recovers: at most the first query after the kill may still see the dead
    // session's error; none hangs, and the process is alive to run them.
    const outcomes: string[] = [];
    for (let i = 0; i < 4; i++) {
      outcomes.push(
        await victim`select 1 as ok`.then(
          () => 'ok',
          (e: { code?: string }) => String(e.code),
        ),
      );
    }
    expect(outcomes.slice(1)).toEqual(['ok', 'ok', 'ok']);
  }
  await victim.end({ timeout: 1 });
});

it('a host transition whose backend is killed leaves nothing and the host carries on', async () => {
  const { createSql } = await import('../../src/persistence/db.js');
  const sql = createSql(db.url, { max: 2, applicationName: 'victim-host' });
  const host = new ActorHost(sql, { taskDefaults: TASK_DEFAULTS });
  const t = await host.create('ticket', ticketInput());
  await db.sql.unsafe(`
    create function slow_event() returns trigger language plpgsql as $$
    begin
      if current_setting('application_name') = 'victim-host' then perform pg_sleep(10); end if;
      return new;
    end $$;
    create trigger event_slow before insert on events for each row execute function slow_event();`);
  const start = host.send('ticket', t.id, { type: 'START' });
  expect(await failureAfterKill('victim-host', start)).toBeInstanceOf(Error);
  const [row] = await db.sql`select state, version from tickets where id = ${t.id}`;
  expect(row).toEqual({ state: 'backlog', version: 1 });
  await db.sql.unsafe('drop trigger event_slow on events');
  const applied = await host.send('ticket', t.id, { type: 'START' });
  expect(applied.state).toBe('requirements');
  await sql.end({ timeout: 1 });
});

it('a connection killed mid-transaction forgets its queries: later answers are not shifted and end() is prompt', async () => {
  const { createSql } = await import('../../src/persistence/db.js');
  // One connection, so every query after the kill runs on the one that died.
  const victim = createSql(db.url, { max: 1, applicationName: 'victim-stale' });
  // Statements pipelined behind the one the kill interrupts: all of them must settle.
  let behind: Promise<unknown>[] = [];
  const tx = victim.begin(async (t) => {
    // A query is sent when first awaited or handled: the sleep goes out first.
    const sleeping = t`select pg_sleep(10)`;
    sleeping.catch(() => {});
    behind = [t`select 2 as n`, t`select 3 as n`];
    // Handled here: the scope stops at the killed statement and never awaits them.
    for (const b of behind) b.catch(() => {});
    await sleeping;
    await Promise.all(behind);
  });
  expect(await failureAfterKill('victim-stale', tx)).toBeInstanceOf(Error);
  for (const b of behind) await expect(b).rejects.toThrow();
  // The unpatched driver kept the killed query (or the ROLLBACK sent after the close) as the
  // connection's current one, and end() waited for its answer until the timeout.
  const started = performance.now();
  await victim.end({ timeout: 5 });
  expect(performance.now() - started).toBeLessThan(2_000);

  const again = createSql(db.url, { max: 1, applicationName: 'victim-stale' });
  const tx2 = again.begin(async (t) => {
    await t`select pg_sleep(10)`;
  });
  expect(await failureAfterKill('victim-stale', tx2)).toBeInstanceOf(Error);
  const answers: unknown[] = [];
  for (let i = 0; i < 6; i++) {
    answers.push(
      await again`select ${i}::int as n`.then(
        ([r]) => r?.n,
        (e: { code?: string }) => String(e.code),
      ),
    );
  }
  // At most the first may still see the dead session's error; each other gets its own answer
  // (a stale current query would take the next answer, and every later query the one after).
  expect(answers.slice(1)).toEqual([1, 2, 3, 4, 5]);
  const ended = performance.now();
  await again.end({ timeout: 5 });
  expect(performance.now() - ended).toBeLessThan(2_000);
});

it('a reserve() waiting for a busy pool survives the kill of the connection it waits on', async () => {
  const { createSql } = await import('../../src/persistence/db.js');
  // One connection: the reserve must wait for the one the kill takes away.
  const victim = createSql(db.url, { max: 1, applicationName: 'victim-reserve' });
  await victim`select 1`;
  const busy = victim`select pg_sleep(10)`;
  busy.catch(() => {});
  // Queued once the one connection is sleeping, not before: a cold pool would give it first.
  await new Promise((r) => setTimeout(r, 100));
  const reserving = victim.reserve();
  // The unpatched driver handed the waiting reserve to the reconnect as its first query and
  // dropped it there (porsager/postgres#1195): this never settled.
  expect(await failureAfterKill('victim-reserve', busy)).toBeInstanceOf(Error);
  const conn = await Promise.race([
    reserving,
    new Promise<null>((r) => setTimeout(() => r(null), 5_000)),
  ]);
  expect(conn).not.toBeNull();
  if (!conn) return;
  expect(await conn`select 7::int as n`).toEqual([{ n: 7 }]);
  conn.release();
  // The pool is whole: its one connection came back from the reserve.
  expect(await victim`select 8::int as n`).toEqual([{ n: 8 }]);
  const ended = performance.now();
  await victim.end({ timeout: 5 });
  expect(performance.now() - ended).toBeLessThan(2_000);
});
