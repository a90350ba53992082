/**
 * A claim with `start` (what the built-in workers ask for) CLAIMs and STARTs the task in one
 * transaction: it comes back running under the claim's token, both events are committed
 * together, the token still fences every later event, and a claim without `start` (agents
 * over HTTP) still leaves the task claimed.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ActorHost, type UnitOfWork } from '../../src/actors/host.js';
import { StaleToken } from '../../src/errors.js';
import { entityEvents } from '../../src/persistence/event-log.js';
import { ClaimService } from '../../src/workers/claims.js';
import { Wakeups } from '../../src/workers/wakeups.js';
import { createTestApp, type TestApp } from '../support/http-app.js';
import { recordingSql } from '../support/statement-log.js';

let t: TestApp;
let claims: ClaimService;

beforeAll(async () => {
  t = await createTestApp('claims_start');
  claims = new ClaimService(t.host, new Wakeups(), { typeLimits: {}, maxWaitMs: 0 });
});
afterAll(async () => {
  claims.close();
  await t.close();
});

async function oneTask(executor: string): Promise<string> {
  const { value } = await t.host.transact(async (u) => {
    const ticket = await t.services.commands.createTicket(u, { title: 'claim start' });
    await u.send('ticket', ticket.id, { type: 'START' });
    return t.services.commands.addTask(u, ticket.id, { type: 'x', executor });
  });
  return value.id;
}

describe('claim with start', () => {
  it('returns the task running under its token, claimed and started in one commit', async () => {
    const id = await oneTask('start-a');
    const got = await claims.claim({ workerId: 'w1', executors: ['start-a'], start: true });
    expect(got?.task.id).toBe(id);
    expect(got?.task.state).toBe('running');
    const [row] = await t.db.sql<{ state: string; version: number }[]>`
      select state, version from tasks where id = ${id}`;
    expect(row?.state).toBe('running');
    const events = await entityEvents(t.db.sql, id);
    const claimed = events.find((e) => e.type === 'task.claimed');
    const started = events.find((e) => e.type === 'task.started');
    expect(claimed).toBeDefined();
    expect(started).toBeDefined();
    // One unit of work stamps one time on all its events, and they follow each other.
    expect(started?.at).toBe(claimed?.at);
    expect(started?.seq).toBe((claimed?.seq ?? 0) + 1);

    // The fence holds: another token is refused, the claim's own completes the task.
    await expect(
      t.host.send('task', id, { type: 'COMPLETE', token: 'not-the-token', result: null }),
    ).rejects.toBeInstanceOf(StaleToken);
    const token = got?.token as string;
    await t.host.send('task', id, { type: 'COMPLETE', token, result: null });
    const [done] = await t.db.sql<{ state: string }[]>`select state from tasks where id = ${id}`;
    expect(done?.state).toBe('completed');
  });

  it('writes the task row once and reads it once, in the candidate query, on a cold cache', async () => {
    const id = await oneTask('start-c');
    await t.db.sql.unsafe(`
      create table task_writes (id text not null, version int not null);
      create function count_task_write() returns trigger language plpgsql as $$
      begin insert into task_writes values (new.id, new.version); return new; end $$;
      create trigger count_task_write after update on tasks
        for each row execute function count_task_write();`);
    // A second process: its cache has never seen the task. Its statements are counted.
    const { sql, sent } = recordingSql(t.db.url, 2);
    try {
      const host = new ActorHost(sql, {
        taskDefaults: { maxAttempts: 3, leaseMs: 60_000, retryBaseMs: 1_000 },
      });
      const other = new ClaimService(host, new Wakeups(), { typeLimits: {}, maxWaitMs: 0 });
      const got = await other.claim({ workerId: 'w3', executors: ['start-c'], start: true });
      other.close();
      expect(got?.task.state).toBe('running');
      const writes = await t.db.sql<{ version: number }[]>`
        select version from task_writes where id = ${id}`;
      // Version 1 (created) to 3 (claimed, started) in ONE compare-and-set.
      expect(writes.map((w) => w.version)).toEqual([3]);
      const reads = sent.filter((s) => /^\s*select\b[\s\S]*\bfrom tasks\b/i.test(s.query));
      expect(reads).toHaveLength(1);
      const events = await entityEvents(t.db.sql, id);
      expect(events.map((e) => [e.type, e.seq])).toEqual([
        ['task.created', 1],
        ['task.claimed', 2],
        ['task.started', 3],
      ]);
    } finally {
      await sql.end({ timeout: 1 });
      await t.db.sql.unsafe('drop trigger count_task_write on tasks');
    }
  });

  it('settling a task sends the candidate lookup of its next claim beside its writes', async () => {
    const done = await oneTask('start-d');
    const next = await oneTask('start-d');
    // Statements in the order postgres.js puts them on the wire.
    const { sql, sent } = recordingSql(t.db.url, 2);
    try {
      const host = new ActorHost(sql, {
        taskDefaults: { maxAttempts: 3, leaseMs: 60_000, retryBaseMs: 1_000 },
      });
      const worker = new ClaimService(host, new Wakeups(), { typeLimits: {}, maxWaitMs: 0 });
      // Claim one of the two (in creation order, the first), then settle it and claim on.
      const first = await worker.claim({ workerId: 'w4', executors: ['start-d'], start: true });
      expect(first?.task.id).toBe(done);
      sent.length = 0;
      let sentWhenSettled = -1;
      const [claimed] = await worker.settleAndClaim(
        { executors: ['start-d'], start: true },
        ['w4'],
        [
          async (uow) => {
            await uow.send('task', done, {
              type: 'COMPLETE',
              token: first?.token as string,
              result: null,
            });
            sentWhenSettled = sent.length;
          },
        ],
      );
      worker.close();
      expect(claimed?.task.id).toBe(next);
      expect(claimed?.task.state).toBe('running');
      // By the time the COMPLETE's writes were answered, the candidate lookup had been sent
      // with them: one round trip for both, not one after the other.
      const lookup = sent.findIndex((s) => /for update skip locked/i.test(s.query));
      expect(lookup).toBeGreaterThanOrEqual(0);
      expect(lookup).toBeLessThan(sentWhenSettled);
      const [row] = await t.db.sql<{ state: string }[]>`select state from tasks where id = ${done}`;
      expect(row?.state).toBe('completed');
    } finally {
      await sql.end({ timeout: 1 });
    }
  });

  it("a slot's settle and next claim commit in the round trip of the claim's write", async () => {
    const ids = [await oneTask('start-e'), await oneTask('start-e'), await oneTask('start-e')];
    // One connection, so that every statement is prepared on it by the first two rounds.
    const { sql, sent } = recordingSql(t.db.url, 1);
    try {
      const host = new ActorHost(sql, {
        taskDefaults: { maxAttempts: 3, leaseMs: 60_000, retryBaseMs: 1_000 },
      });
      const worker = new ClaimService(host, new Wakeups(), { typeLimits: {}, maxWaitMs: 0 });
      const req = { executors: ['start-e'], start: true };
      let held = await worker.claim({ workerId: 'w5', ...req });
      const settle = (id: string, token: string) => async (uow: UnitOfWork) =>
        uow.send('task', id, { type: 'COMPLETE', token, result: null });
      let turns: { claim: number | undefined; commit: number | undefined } = {
        claim: undefined,
        commit: undefined,
      };
      for (let round = 0; round < 2; round++) {
        sent.length = 0;
        const [next] = await worker.settleAndClaim(
          req,
          ['w5'],
          [settle(held?.task.id as string, held?.token as string)],
        );
        const claim = sent.findLast((s) => /update\s+"?tasks"?\s+set/i.test(s.query));
        const commit = sent.find((s) => s.query.trim() === 'commit');
        turns = { claim: claim?.turn, commit: commit?.turn };
        held = next ?? null;
      }
      worker.close();
      expect(held?.task.id).toBe(ids[2]);
      expect(turns.claim).toBeDefined();
      // Nothing can follow the claims (no rule acts on a claim or a start, the rows are
      // locked): the COMMIT goes out with their write, not one round trip later.
      expect(turns.commit).toBe(turns.claim);
      const rows = await t.db.sql<{ id: string; state: string }[]>`
        select id, state from tasks where id = any(${ids}::text[]) order by created_at`;
      expect(rows.map((r) => r.state)).toEqual(['completed', 'completed', 'running']);
    } finally {
      await sql.end({ timeout: 1 });
    }
  });

  it('without start the task stays claimed until its claimer STARTs it', async () => {
    const id = await oneTask('start-b');
    const got = await claims.claim({ workerId: 'w2', executors: ['start-b'] });
    expect(got?.task.id).toBe(id);
    expect(got?.task.state).toBe('claimed');
    const types = (await entityEvents(t.db.sql, id)).map((e) => e.type);
    expect(types).toContain('task.claimed');
    expect(types).not.toContain('task.started');
  });
});
