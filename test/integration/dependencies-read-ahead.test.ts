/**
 * A task that settles releases its waiting dependents in the same transaction; the read of
 * those dependents goes out right behind the task's own writes, in the same round trip, and
 * still sees the task settled (Postgres runs one connection's statements in order). A task
 * that nothing depends on is not read for dependents at all: its write checks the task's
 * `has_dependents` mark in the same statement, and its COMMIT goes out behind it. A write
 * that finds the mark (set by a dependency committed since) fails, and the command runs
 * again the long way, releasing the dependent.
 */
import { afterAll, beforeAll, expect, it } from 'vitest';
import { ActorHost } from '../../src/actors/host.js';
import type { Sql } from '../../src/persistence/db.js';
import { ClaimService } from '../../src/workers/claims.js';
import { Wakeups } from '../../src/workers/wakeups.js';
import { deferred } from '../support/deferred.js';
import { createTestApp, type TestApp } from '../support/http-app.js';
import { recordingSql } from '../support/statement-log.js';

let t: TestApp;
beforeAll(async () => {
  t = await createTestApp('deps_read_ahead');
});
afterAll(() => t.close());

/** Another process's host and claims on `sql` (it has seen no task's dependents). */
function hostOn(sql: Sql) {
  const host = new ActorHost(sql, {
    taskDefaults: { maxAttempts: 3, leaseMs: 60_000, retryBaseMs: 1_000 },
  });
  return { host, claims: new ClaimService(host, new Wakeups(), { typeLimits: {}, maxWaitMs: 0 }) };
}

/** A started ticket with a task and a second one waiting for it. */
async function pair(executor: string): Promise<{ first: string; waiting: string }> {
  const { value } = await t.host.transact(async (u) => {
    const ticket = await t.services.commands.createTicket(u, { title: 'deps' });
    await u.send('ticket', ticket.id, { type: 'START' });
    const first = await t.services.commands.addTask(u, ticket.id, { type: 'a', executor });
    const waiting = await t.services.commands.addTask(u, ticket.id, {
      type: 'b',
      executor,
      dependsOn: [first.id],
    });
    return { first: first.id, waiting: waiting.id };
  });
  return value;
}

it('reads the dependents of a completed task in the round trip of its writes', async () => {
  // One connection: its statements are prepared by the first round.
  const { sql, sent } = recordingSql(t.db.url, 1);
  try {
    const { host, claims } = hostOn(sql);
    for (const round of [1, 2]) {
      const { first, waiting } = await pair(`read-ahead-${round}`);
      const got = await claims.claim({
        workerId: 'w',
        executors: [`read-ahead-${round}`],
        start: true,
      });
      expect(got?.task.id).toBe(first);
      sent.length = 0;
      await host.send('task', first, {
        type: 'COMPLETE',
        token: got?.token as string,
        result: null,
      });
      // The dependent was released in the same transaction.
      const [row] = await t.db.sql<{ state: string }[]>`
        select state from tasks where id = ${waiting}`;
      expect(row?.state).toBe('pending');
      if (round === 1) continue; // statements prepared; the second round is the one measured
      // This host had not seen the task's dependent: its first write checked for dependents,
      // found the mark and failed; the command ran again, reading them behind its write (and
      // then wrote the dependent's release).
      const writes = sent.filter((s) => /^\s*with w as \(\s*update tasks\b/i.test(s.query));
      const reads = sent.filter((s) => /from task_dependencies td join tasks/i.test(s.query));
      expect(writes).toHaveLength(3);
      expect(writes[0]?.query).toMatch(/returning has_dependents/);
      expect(writes[1]?.query).not.toMatch(/has_dependents/);
      expect(reads).toHaveLength(1);
      expect(reads[0]?.turn).toBe(writes[1]?.turn);
    }
    claims.close();
  } finally {
    await sql.end({ timeout: 1 });
  }
});

it('a task nothing depends on is not read for dependents; its COMMIT goes with its write', async () => {
  const { sql, sent } = recordingSql(t.db.url, 1);
  try {
    const { host, claims } = hostOn(sql);
    for (const round of [1, 2]) {
      const { value: id } = await t.host.transact(async (u) => {
        const ticket = await t.services.commands.createTicket(u, { title: 'alone' });
        await u.send('ticket', ticket.id, { type: 'START' });
        return (
          await t.services.commands.addTask(u, ticket.id, { type: 'a', executor: `alone-${round}` })
        ).id;
      });
      const got = await claims.claim({ workerId: 'w', executors: [`alone-${round}`], start: true });
      expect(got?.task.id).toBe(id);
      sent.length = 0;
      await host.send('task', id, { type: 'COMPLETE', token: got?.token as string, result: 1 });
      const [row] = await t.db.sql<{ state: string; has_dependents: boolean }[]>`
        select state, has_dependents from tasks where id = ${id}`;
      expect(row).toEqual({ state: 'completed', has_dependents: false });
      if (round === 1) continue;
      const write = sent.find((s) => /^\s*with w as \(\s*update tasks\b/i.test(s.query));
      const commit = sent.find((s) => /^\s*commit\s*$/i.test(s.query));
      expect(write?.query).toMatch(/returning has_dependents/);
      expect(sent.some((s) => /task_dependencies/i.test(s.query))).toBe(false);
      expect(commit?.turn).toBe(write?.turn);
    }
    claims.close();
  } finally {
    await sql.end({ timeout: 1 });
  }
});

it('a dependency added while its task completes: the completion waits, then releases it', async () => {
  const { host: other, claims } = hostOn(t.db.sql);
  const runs = 8;
  for (let i = 0; i < runs; i++) {
    const { value } = await t.host.transact(async (u) => {
      const ticket = await t.services.commands.createTicket(u, { title: 'race' });
      await u.send('ticket', ticket.id, { type: 'START' });
      const first = await t.services.commands.addTask(u, ticket.id, {
        type: 'a',
        executor: `race-${i}`,
      });
      return { ticket: ticket.id, first: first.id };
    });
    const got = await claims.claim({ workerId: 'w', executors: [`race-${i}`], start: true });
    expect(got?.task.id).toBe(value.first);
    // The dependent's transaction holds the dependency's row while the completion is sent
    // from another host (which has never seen a dependent of it) and must wait for it.
    const held = deferred();
    const inserted = deferred();
    const dependent = t.host.transact(async (u) => {
      const task = await t.services.commands.addTask(u, value.ticket, {
        type: 'b',
        executor: `race-${i}-b`,
        dependsOn: [value.first],
      });
      inserted.resolve();
      await held.promise;
      return task.id;
    });
    await inserted.promise;
    const completing = other.send('task', value.first, {
      type: 'COMPLETE',
      token: got?.token as string,
      result: i,
    });
    // Let the completion reach Postgres and wait on the row, then commit the dependent.
    await new Promise((r) => setTimeout(r, 50));
    held.resolve();
    const { value: waitingId } = await dependent;
    await completing;
    const rows = await t.db.sql<{ id: string; state: string; has_dependents: boolean }[]>`
      select id, state, has_dependents from tasks where id in (${value.first}, ${waitingId})
      order by id = ${value.first} desc`;
    expect(rows).toEqual([
      { id: value.first, state: 'completed', has_dependents: true },
      // Created waiting (its dependency was running) and released by the completion itself,
      // not by the reconciler's sweep, which runs nowhere here.
      { id: waitingId, state: 'pending', has_dependents: false },
    ]);
  }
  expect(other.stats.conflicts).toBe(0);
  claims.close();
});
