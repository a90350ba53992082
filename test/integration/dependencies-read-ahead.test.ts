/**
 * A task that settles releases its waiting dependents in the same transaction; the read of
 * those dependents goes out right behind the task's own writes, in the same round trip, and
 * still sees the task settled (Postgres runs one connection's statements in order).
 */
import { afterAll, beforeAll, expect, it } from 'vitest';
import { ActorHost } from '../../src/actors/host.js';
import { ClaimService } from '../../src/workers/claims.js';
import { Wakeups } from '../../src/workers/wakeups.js';
import { createTestApp, type TestApp } from '../support/http-app.js';
import { recordingSql } from '../support/statement-log.js';

let t: TestApp;
beforeAll(async () => {
  t = await createTestApp('deps_read_ahead');
});
afterAll(() => t.close());

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
    const host = new ActorHost(sql, {
      taskDefaults: { maxAttempts: 3, leaseMs: 60_000, retryBaseMs: 1_000 },
    });
    const claims = new ClaimService(host, new Wakeups(), { typeLimits: {}, maxWaitMs: 0 });
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
      const write = sent.find((s) => /^\s*with w as \(\s*update tasks\b/i.test(s.query));
      const read = sent.find((s) => /from task_dependencies td join tasks/i.test(s.query));
      expect(write).toBeDefined();
      expect(read).toBeDefined();
      expect(read?.turn).toBe(write?.turn);
    }
    claims.close();
  } finally {
    await sql.end({ timeout: 1 });
  }
});
