/**
 * Idle long-poll claimers: their number is capped per process (503 `unavailable` with
 * Retry-After beyond CLAIM_MAX_WAITERS), and a freed task wakes one of them, not all. The
 * claim services here poll every 30 s, so any claim attempt within a test comes from a
 * wake-up; attempts are counted at `claimOnce`, the one place a claim transaction starts.
 */
import { setMaxListeners } from 'node:events';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import type { NewTask } from '../../src/actors/commands.js';
import { type ClaimedTask, type ClaimRequest, ClaimService } from '../../src/workers/claims.js';
import { Wakeups } from '../../src/workers/wakeups.js';
import { createTestApp, type TestApp } from '../support/http-app.js';
import { eventually } from '../support/transport.js';

const MAX_WAITERS = 5;
let t: TestApp;
const services: ClaimService[] = [];
const aborts: AbortController[] = [];

beforeAll(async () => {
  t = await createTestApp('claim_waiters', {
    config: { CLAIM_MAX_WAITERS: String(MAX_WAITERS), CLAIM_MAX_WAIT_MS: '20000' },
  });
});
afterEach(async () => {
  for (const a of aborts.splice(0)) a.abort();
  // Let aborted waiters leave before the services stop listening.
  await new Promise((r) => setTimeout(r, 50));
  for (const s of services.splice(0)) s.close();
});
afterAll(() => t.close());

interface Counted {
  svc: ClaimService;
  /** Worker ids, one per claim attempt begun. */
  tried: string[];
  /** Claim attempts ended. */
  ended: { n: number };
}

/** Counts the attempts of `svc` at `claimOnce`, where every claim transaction starts. */
function counted(svc: ClaimService): Counted {
  const tried: string[] = [];
  const ended = { n: 0 };
  const claimOnce = svc.claimOnce.bind(svc);
  svc.claimOnce = (req: ClaimRequest) => {
    tried.push(req.workerId);
    return claimOnce(req).finally(() => ended.n++);
  };
  return { svc, tried, ended };
}

/** A claim service of its own on the test app's host, polling too seldom to matter. */
function service(pollMs = 30_000): Counted {
  const svc = new ClaimService(t.host, new Wakeups(), {
    typeLimits: {},
    maxWaitMs: 20_000,
    pollMs,
  });
  services.push(svc);
  return counted(svc);
}

/**
 * `n` claimers waiting for `executors` tasks, queued in index order: each starts once the
 * one before has made its first attempt (found nothing) and gone to sleep.
 */
async function waiters(c: Counted, n: number, prefix: string, executors = ['external']) {
  const { svc, ended } = c;
  const abort = new AbortController();
  // One signal for all n waiters, as a worker pool shares one: each holds a listener on it.
  setMaxListeners(0, abort.signal);
  aborts.push(abort);
  const results: (ClaimedTask | null)[] = [];
  const done: Promise<ClaimedTask | null>[] = [];
  for (let i = 0; i < n; i++) {
    const before = ended.n;
    done.push(
      svc
        .claim({ workerId: `${prefix}${i}`, executors, waitMs: 20_000, signal: abort.signal })
        .then((r) => {
          results.push(r);
          return r;
        }),
    );
    await eventually(() => ended.n > before, 10_000, `first attempt of ${prefix}${i}`);
  }
  // Nothing is awaited between an empty attempt and the sleep: a tick is enough.
  await new Promise((r) => setTimeout(r, 50));
  return { results, done, abort };
}

async function ticket(): Promise<string> {
  const { value } = await t.host.transact((u) =>
    t.services.commands.createTicket(u, { title: 'waiters' }),
  );
  await t.host.send('ticket', value.id, { type: 'START' });
  return value.id;
}

/** Creates `n` tasks in one transaction (one commit). */
async function tasks(ticketId: string, n: number, spec: Partial<NewTask> = {}): Promise<string[]> {
  const { value } = await t.host.transact(async (u) => {
    const ids: string[] = [];
    for (let i = 0; i < n; i++) {
      const a = await t.services.commands.addTask(u, ticketId, {
        type: 'x',
        executor: 'external',
        ...spec,
      });
      ids.push(a.id);
    }
    return ids;
  });
  return value;
}

async function claimedEvents(ids: string[]): Promise<number> {
  const [r] = await t.db.sql<{ n: number }[]>`select count(*)::int as n from events
    where entity_id in ${t.db.sql(ids)} and type = 'task.claimed'`;
  return r?.n ?? 0;
}

const claimBody = (workerId: string, waitMs = 20_000) => ({ workerId, waitMs });

describe('long-poll claim waiters', () => {
  it(`the waiter past CLAIM_MAX_WAITERS=${MAX_WAITERS} gets 503 unavailable with Retry-After`, async () => {
    const c = counted(t.claims);
    const abort = new AbortController();
    aborts.push(abort);
    const polls = Array.from({ length: MAX_WAITERS }, async (_, i) =>
      t.app.request('/tasks/claim', {
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        body: JSON.stringify(claimBody(`cap${i}`)),
        signal: abort.signal,
      }),
    );
    await eventually(() => c.ended.n >= MAX_WAITERS, 10_000, 'first attempts');
    await new Promise((r) => setTimeout(r, 50));
    const over = await t.call('POST', '/tasks/claim', claimBody('cap-over'));
    expect(over.status).toBe(503);
    expect(over.body.error).toBe('unavailable');
    expect(over.body.message).toContain('CLAIM_MAX_WAITERS');
    expect(Number(over.headers.get('retry-after'))).toBeGreaterThan(0);
    // A claim that does not wait is not a waiter: it is answered (204, nothing to claim).
    expect((await t.call('POST', '/tasks/claim', claimBody('cap-now', 0))).status).toBe(204);
    // A task to claim is handed out even at the cap: the check is made before sleeping.
    const [id] = await tasks(await ticket(), 1);
    await eventually(async () => (await claimedEvents([id as string])) === 1, 5_000, 'claimed');
    // The others hang up; each wait ends at once.
    abort.abort();
    const got = await Promise.all(polls.map(async (p) => (await p).status));
    expect(got.sort()).toEqual([200, 204, 204, 204, 204]);
    expect(await claimedEvents([id as string])).toBe(1);
    // Room again: a new waiter is admitted (and times out with 204).
    expect((await t.call('POST', '/tasks/claim', claimBody('cap-after', 300))).status).toBe(204);
  });

  it('with 50 idle waiters, one new task makes exactly one of them try a claim', async () => {
    const c = service();
    const { svc, tried } = c;
    const w = await waiters(c, 50, 'one');
    tried.length = 0;
    const attempts = svc.attempts;
    const ids = await tasks(await ticket(), 1);
    await eventually(() => w.results.length === 1, 5_000, 'the task claimed');
    // Time for any other woken waiter to reach its claim transaction.
    await new Promise((r) => setTimeout(r, 500));
    expect(tried).toHaveLength(1);
    expect(svc.attempts - attempts).toBe(1);
    expect(w.results).toHaveLength(1);
    expect(w.results[0]?.task.id).toBe(ids[0]);
    expect(await claimedEvents(ids)).toBe(1);
    expect(svc.waiters).toBe(49);
  });

  it('five new tasks wake enough of 50 waiters to claim all five at once', async () => {
    const c = service();
    const { tried } = c;
    const w = await waiters(c, 50, 'five');
    tried.length = 0;
    const started = Date.now();
    const ids = await tasks(await ticket(), 5);
    await eventually(() => w.results.length === 5, 5_000, 'five tasks claimed');
    expect(Date.now() - started).toBeLessThan(2_000);
    await new Promise((r) => setTimeout(r, 500));
    expect(new Set(w.results.map((r) => r?.task.id))).toEqual(new Set(ids));
    expect(await claimedEvents(ids)).toBe(5);
    // One wake-up per task, plus at most one hand-on per claim that saw more work queued,
    // plus a second look by a woken waiter that found the rows locked by the others' claims
    // while a wake-up went out meanwhile. Far from one try per waiter (50).
    expect(tried.length).toBeGreaterThanOrEqual(5);
    expect(tried.length).toBeLessThanOrEqual(15);
  });

  it('five tasks in five commits: each wakes one waiter, and all five are claimed', async () => {
    const c = service();
    const { tried } = c;
    const w = await waiters(c, 50, 'sep');
    tried.length = 0;
    const tk = await ticket();
    const ids = (await Promise.all(Array.from({ length: 5 }, () => tasks(tk, 1)))).flat();
    await eventually(() => w.results.length === 5, 5_000, 'five tasks claimed');
    await new Promise((r) => setTimeout(r, 500));
    expect(new Set(w.results.map((r) => r?.task.id))).toEqual(new Set(ids));
    expect(tried.length).toBeLessThanOrEqual(10);
  });

  it('a task wakes a waiter that can take it, not the longest waiting of another kind', async () => {
    const c = service();
    const { tried } = c;
    const sleepers = await waiters(c, 10, 'sleep', ['sleep']);
    const agents = await waiters(c, 10, 'ext', ['external']);
    tried.length = 0;
    const ids = await tasks(await ticket(), 1);
    await eventually(() => agents.results.length === 1, 5_000, 'an agent claims it');
    await new Promise((r) => setTimeout(r, 300));
    expect(tried).toEqual(['ext0']);
    expect(sleepers.results).toHaveLength(0);
    expect(await claimedEvents(ids)).toBe(1);
  });

  it('a waiter woken for a task that fails before claiming hands the wake-up on', async () => {
    const c = service();
    const { svc, tried } = c;
    const w = await waiters(c, 3, 'fail');
    // The first waiter's next attempt fails (a database error, say).
    const claimOnce = svc.claimOnce;
    svc.claimOnce = (req: ClaimRequest) => {
      if (req.workerId === 'fail0') {
        svc.claimOnce = claimOnce;
        tried.push(req.workerId);
        return Promise.reject(new Error('connection lost'));
      }
      return claimOnce(req);
    };
    tried.length = 0;
    const failed = w.done[0]?.then(
      () => 'resolved',
      (e: Error) => e.message,
    );
    const ids = await tasks(await ticket(), 1);
    expect(await failed).toBe('connection lost');
    await eventually(() => w.results.length === 1, 3_000, 'another waiter claims the task');
    expect(tried).toEqual(['fail0', 'fail1']);
    expect(w.results[0]?.task.id).toBe(ids[0]);
  });

  it('a woken waiter that loses the race waits again and is woken by the next task', async () => {
    const c = service();
    const { svc, tried } = c;
    const w = await waiters(c, 1, 'race');
    tried.length = 0;
    // Another claimer (no long poll) takes the task first; the waiter, woken, finds nothing.
    const tk = await ticket();
    const claimOnce = svc.claimOnce;
    let stolen: ClaimedTask | null = null;
    svc.claimOnce = async (req: ClaimRequest) => {
      if (req.workerId === 'race0' && !stolen) {
        stolen = await t.claims.claimOnce({ workerId: 'thief' });
      }
      return claimOnce(req);
    };
    const ended = c.ended.n;
    await tasks(tk, 1);
    await eventually(() => c.ended.n === ended + 1, 3_000, 'the woken attempt');
    await new Promise((r) => setTimeout(r, 50));
    expect(tried).toEqual(['race0']);
    expect(stolen).not.toBeNull();
    expect(w.results).toHaveLength(0);
    const [second] = await tasks(tk, 1);
    await eventually(() => w.results.length === 1, 3_000, 'the waiter claims the next task');
    expect(w.results[0]?.task.id).toBe(second);
  });

  it('50 idle waiters take one fallback poll per interval between them, and it still finds work', async () => {
    const c = service(100);
    const w = await waiters(c, 50, 'idle');
    c.tried.length = 0;
    await new Promise((r) => setTimeout(r, 1_500));
    // One waiter polls per 100 ms interval (each used to: about 750 attempts in 1.5 s).
    expect(c.tried.length).toBeGreaterThan(3);
    expect(c.tried.length).toBeLessThanOrEqual(30);
    // A task no wake-up announces (as if freed in another process) is found by that poll.
    const tk = await ticket();
    const [id] = await tasks(tk, 1);
    await eventually(() => w.results.length === 1, 3_000, 'the polling waiter claims it');
    expect(w.results[0]?.task.id).toBe(id);
  });
});
