/**
 * The TypeScript client against a real `api` runtime (Postgres, NATS): each error code as
 * its own exception, safe retries with one effect, and the agent loop: COMPLETE and FAIL
 * from the handler, `ctx.signal` on cancel within one heartbeat, RELEASE on stop, and
 * nothing left running once `work()` resolves.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  ConflictError,
  IllegalTransitionError,
  NetworkError,
  NotFoundError,
  OrchestratorClient,
  PayloadTooLargeError,
  StaleTokenError,
  TaskAbortedError,
  UnauthorizedError,
  UnavailableError,
  ValidationError,
} from '../../src/client/index.js';
import { type ApiRuntime, startApi } from '../support/api-runtime.js';

const LEASE_MS = 3_000;
let api: ApiRuntime;
let secured: ApiRuntime;
let client: OrchestratorClient;

beforeAll(async () => {
  api = await startApi('client_api', {
    LEASE_MS: String(LEASE_MS),
    CLAIM_MAX_WAIT_MS: '2000',
    PAYLOAD_MAX_BYTES: '2048',
    SSE_MAX_CLIENTS: '2',
  });
  secured = await startApi('client_api_auth', { API_TOKEN: 'right-token' });
  client = new OrchestratorClient({ url: api.url });
}, 60_000);
afterAll(async () => {
  await api?.stop();
  await secured?.stop();
});

async function caught(p: Promise<unknown>): Promise<unknown> {
  try {
    await p;
  } catch (error) {
    return error;
  }
  throw new Error('expected a rejection');
}

async function taskOf(type: string, extra: Record<string, unknown> = {}) {
  const ticket = await client.createTicket({ title: type });
  await client.sendTicketEvent(ticket.id, { type: 'START' });
  return client.addTask(ticket.id, { type, ...extra });
}

describe('typed errors', () => {
  it('validation_failed names the fields', async () => {
    const e = await caught(client.createTicket({ title: '' }));
    expect(e).toBeInstanceOf(ValidationError);
    expect(e).toMatchObject({ code: 'validation_failed', status: 400 });
    expect((e as ValidationError).issues.map((i) => i.path)).toEqual(['title']);
  });

  it('unauthorized without or with a wrong token; the right one works', async () => {
    for (const token of [undefined, 'wrong']) {
      const c = new OrchestratorClient({ url: secured.url, token: token ?? '' });
      const e = await caught(c.listTickets());
      expect(e).toBeInstanceOf(UnauthorizedError);
      expect(e).toMatchObject({ code: 'unauthorized', status: 401 });
    }
    const ok = new OrchestratorClient({ url: secured.url, token: 'right-token' });
    expect((await ok.listTickets()).items).toEqual([]);
  });

  it('not_found', async () => {
    const e = await caught(client.getTask('tsk_nope'));
    expect(e).toBeInstanceOf(NotFoundError);
    expect(e).toMatchObject({ code: 'not_found', status: 404 });
  });

  it('illegal_transition with state, event and allowed', async () => {
    const ticket = await client.createTicket({ title: 'twice' });
    await client.sendTicketEvent(ticket.id, { type: 'START' });
    const e = await caught(client.sendTicketEvent(ticket.id, { type: 'START' }));
    expect(e).toBeInstanceOf(IllegalTransitionError);
    const i = e as IllegalTransitionError;
    expect([i.code, i.status, i.state, i.event]).toEqual([
      'illegal_transition',
      409,
      'requirements',
      'START',
    ]);
    expect(i.allowed).toContain('CANCEL');
  });

  it('stale_token with the attempt', async () => {
    const task = await taskOf('stale');
    const claimed = await client.claim({ workerId: 'w', types: ['stale'] });
    expect(claimed?.task.id).toBe(task.id);
    const e = await caught(client.start(task.id, 'not-the-token'));
    expect(e).toBeInstanceOf(StaleTokenError);
    expect(e).toMatchObject({ code: 'stale_token', status: 409, attempt: 1 });
  });

  it('conflict: one Idempotency-Key, two bodies', async () => {
    await client.createTicket({ title: 'a' }, { idempotencyKey: 'k-conflict' });
    const e = await caught(client.createTicket({ title: 'b' }, { idempotencyKey: 'k-conflict' }));
    expect(e).toBeInstanceOf(ConflictError);
    expect(e).toMatchObject({ code: 'conflict', status: 409 });
  });

  it('payload_too_large', async () => {
    const ticket = await client.createTicket({ title: 'big' });
    const e = await caught(client.addTask(ticket.id, { type: 'x', payload: 'p'.repeat(4096) }));
    expect(e).toBeInstanceOf(PayloadTooLargeError);
    expect(e).toMatchObject({ code: 'payload_too_large', status: 413 });
  });

  it('unavailable with retryAfterMs, once the retries are spent', async () => {
    const hold = new AbortController();
    const streams = [0, 1].map(async () => {
      for await (const _ of client.streamEvents({ after: 'new', signal: hold.signal })) break;
    });
    const noRetry = new OrchestratorClient({ url: api.url, retries: 0 });
    try {
      await expect
        .poll(async () => (await fetch(`${api.url}/events/stream`, { method: 'HEAD' })).status)
        .toBe(503);
      const e = await caught(noRetry.streamEvents({ after: 'new' }).next());
      expect(e).toBeInstanceOf(UnavailableError);
      expect(e).toMatchObject({ code: 'unavailable', status: 503, retryAfterMs: 1000 });
    } finally {
      hold.abort();
      await Promise.allSettled(streams);
    }
  });

  it('network: nothing listening, after the retries', async () => {
    let calls = 0;
    const c = new OrchestratorClient({
      url: 'http://127.0.0.1:1',
      retries: 2,
      retryBaseMs: 5,
      fetch: (input, init) => {
        calls++;
        return fetch(input, init);
      },
    });
    const e = await caught(c.health());
    expect(e).toBeInstanceOf(NetworkError);
    expect(e).toMatchObject({ code: 'network', status: 0 });
    expect(calls).toBe(3);
  });
});

describe('retries', () => {
  it('a POST whose answer was lost is sent again with its key: one ticket, the first answer', async () => {
    const title = `lost-answer-${Date.now()}`;
    const keys: (string | null)[] = [];
    let lost = 0;
    const c = new OrchestratorClient({
      url: api.url,
      retryBaseMs: 5,
      fetch: async (input, init) => {
        keys.push(new Headers(init?.headers).get('idempotency-key'));
        const res = await fetch(input, init);
        // The server applied it; the connection died before the answer arrived.
        if (lost++ === 0) throw new TypeError('fetch failed');
        return res;
      },
    });
    const ticket = await c.createTicket({ title });
    expect(keys).toHaveLength(2);
    expect(keys[0]).toMatch(/.+/);
    expect(keys[1]).toBe(keys[0]);
    const all = await client.listTickets({ limit: 200 });
    expect(all.items.filter((t) => t.title === title).map((t) => t.id)).toEqual([ticket.id]);
  });

  it('a GET answered 503 is retried; a 4xx is not', async () => {
    const statuses: number[] = [];
    let first = true;
    const c = new OrchestratorClient({
      url: api.url,
      retryBaseMs: 5,
      fetch: async (input, init) => {
        if (first) {
          first = false;
          statuses.push(503);
          return new Response(JSON.stringify({ error: 'unavailable', message: 'down' }), {
            status: 503,
            headers: { 'content-type': 'application/json', 'retry-after': '0' },
          });
        }
        const res = await fetch(input, init);
        statuses.push(res.status);
        return res;
      },
    });
    expect(await c.health()).toEqual({ status: 'ok' });
    await caught(c.getTask('tsk_nope'));
    expect(statuses).toEqual([503, 200, 404]);
  });
});

describe('agent', () => {
  it('COMPLETE with the return value, FAIL with the throw; ctx has task, token, attempt', async () => {
    const good = await taskOf('agent-ok', { payload: { n: 2 } });
    const bad = await taskOf('agent-bad', { maxAttempts: 1 });
    const seen: unknown[] = [];
    const agent = client.agent({ workerId: 'a1', types: ['agent-ok', 'agent-bad'], waitMs: 500 });
    const working = agent.work(async (task, ctx) => {
      seen.push({
        id: task.id,
        attempt: ctx.attempt,
        token: typeof ctx.token,
        same: ctx.task === task,
      });
      if (task.type === 'agent-bad') throw new Error('no good');
      for (let i = 0; i < 50; i++) ctx.log(`line ${i}\n`);
      ctx.log('to stderr\n', 'stderr');
      return { doubled: (task.payload as { n: number }).n * 2 };
    });
    await expect
      .poll(async () => (await client.getTask(good.id)).state, { timeout: 15_000 })
      .toBe('completed');
    await expect
      .poll(async () => (await client.getTask(bad.id)).state, { timeout: 15_000 })
      .toBe('failed');
    await agent.stop();
    await working;
    expect((await client.getTask(good.id)).result).toEqual({ doubled: 4 });
    expect((await client.getTask(bad.id)).error).toBe('Error: no good');
    expect(seen).toContainEqual({ id: good.id, attempt: 1, token: 'string', same: true });
    // Batched: 51 log calls arrive as one chunk per stream, flushed before COMPLETE.
    const output = await client.readOutput(good.id);
    expect(output.truncated).toBe(false);
    expect(output.chunks.map((c) => [c.stream, c.attempt])).toEqual([
      ['log', 1],
      ['stderr', 1],
    ]);
    const lines = Array.from({ length: 50 }, (_, i) => `line ${i}\n`).join('');
    expect(output.chunks.map((c) => c.text)).toEqual([lines, 'to stderr\n']);
  });

  for (const live of [false, true]) {
    it(`ctx.signal aborts on cancel within one heartbeat (live stream ${live ? 'on' : 'off'})`, async () => {
      const task = await taskOf(`cancel-${live}`);
      let started = 0;
      let aborted = 0;
      let reason: unknown;
      const agent = client.agent({ workerId: 'a2', types: [task.type], waitMs: 500, live });
      const working = agent.work(async (_task, ctx) => {
        started = Date.now();
        await new Promise<void>((resolve) =>
          ctx.signal.addEventListener('abort', () => resolve(), { once: true }),
        );
        aborted = Date.now();
        reason = ctx.signal.reason;
      });
      await expect.poll(() => started, { timeout: 10_000 }).toBeGreaterThan(0);
      // Just past a heartbeat, so the next one is a whole interval away.
      await new Promise((r) => setTimeout(r, LEASE_MS / 3 + 50));
      const cancelledAt = Date.now();
      await client.cancelTask(task.id, 'not needed');
      await expect.poll(() => aborted, { timeout: 5_000 }).toBeGreaterThan(0);
      expect(reason).toBeInstanceOf(TaskAbortedError);
      expect((reason as TaskAbortedError).reason).toBe('cancelled');
      // One heartbeat interval plus the heartbeat's own round trip.
      expect(aborted - cancelledAt).toBeLessThan(LEASE_MS / 3 + 500);
      await agent.stop();
      await working;
      expect((await client.getTask(task.id)).state).toBe('cancelled');
    });
  }

  it('stop(): unfinished work is RELEASEd after the grace; nothing runs after work() resolves', async () => {
    const task = await taskOf('release');
    let after = 0;
    let resolved = false;
    const c = new OrchestratorClient({
      url: api.url,
      fetch: (input, init) => {
        if (resolved) after++;
        return fetch(input, init);
      },
    });
    let reason: unknown;
    const agent = c.agent({
      workerId: 'a3',
      types: ['release'],
      waitMs: 1_000,
      shutdownGraceMs: 300,
    });
    const working = agent.work(async (_task, ctx) => {
      ctx.log('working\n');
      await new Promise<void>((resolve) =>
        ctx.signal.addEventListener('abort', () => resolve(), { once: true }),
      );
      reason = ctx.signal.reason;
      // A handler that takes its time after the abort does not hold work() up.
      await new Promise((r) => setTimeout(r, 3_000));
    });
    await expect
      .poll(async () => (await client.getTask(task.id)).state, { timeout: 10_000 })
      .toBe('running');
    const stopping = Date.now();
    await agent.stop();
    await working;
    resolved = true;
    expect(Date.now() - stopping).toBeLessThan(2_000);
    expect((reason as TaskAbortedError).reason).toBe('shutdown');
    const back = await client.getTask(task.id);
    expect(back).toMatchObject({ state: 'pending', attempt: 1, attemptsUsed: 0 });
    const events = (await client.taskEvents(task.id)).events.map((e) => e.type);
    expect(events).toContain('task.released');
    // Two lease thirds: a heartbeat loop left behind would have sent one by now. (The server
    // shares this process, so its timers cannot be counted here: sdk-agents.test.ts checks
    // that an agent process exits on its own once work() resolves.)
    await new Promise((r) => setTimeout(r, (LEASE_MS * 2) / 3 + 200));
    expect(after).toBe(0);
  });

  it('a claim in its long poll ends at stop(), and work() rejects when the server refuses the agent', async () => {
    const agent = client.agent({ workerId: 'a4', types: ['nothing-here'], waitMs: 60_000 });
    const working = agent.work(() => undefined);
    await new Promise((r) => setTimeout(r, 300));
    const t = Date.now();
    await agent.stop();
    await working;
    expect(Date.now() - t).toBeLessThan(1_000);
    const wrong = new OrchestratorClient({ url: secured.url, token: 'wrong' });
    await expect(wrong.agent({ workerId: 'a5' }).work(() => undefined)).rejects.toBeInstanceOf(
      UnauthorizedError,
    );
  });
});
