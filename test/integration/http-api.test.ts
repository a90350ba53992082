/**
 * The HTTP API of CONTRACT section 2 in-process (`app.request`) over a real ActorHost and a
 * migrated database: routes, every error code, pagination, idempotency, the claim long
 * poll, and every response checked against the served OpenAPI document.
 */
import { Agent, request as httpRequest } from 'node:http';
import type { AddressInfo } from 'node:net';
import { connect } from 'node:net';
import { Writable } from 'node:stream';
import { pino } from 'pino';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startHttpServer } from '../../src/http/server.js';
import { createTestApp, type Reply, type TestApp } from '../support/http-app.js';
import { openApiChecker } from '../support/openapi.js';

let t: TestApp;
let check: ReturnType<typeof openApiChecker>;

/** Calls and checks the response against the OpenAPI document (`template` names the path). */
async function call(
  method: string,
  path: string,
  template: string,
  body?: unknown,
  headers?: Record<string, string>,
): Promise<Reply> {
  const r = await t.call(method, path, body, headers);
  expect(r.headers.get('x-request-id')).toBeTruthy();
  check(method, template, r.status, r.body);
  return r;
}

const newTicket = async (title = 'Ticket') =>
  (await call('POST', '/tickets', '/tickets', { title })).body;

beforeAll(async () => {
  t = await createTestApp('http_api', {
    config: { BODY_LIMIT_BYTES: '4096', PAYLOAD_MAX_BYTES: '1024' },
  });
  const doc = await t.call('GET', '/openapi.json');
  expect(doc.status).toBe(200);
  check = openApiChecker(doc.body);
});
afterAll(() => t.close());

describe('tickets', () => {
  it('creates, reads with tasks and allowed events, and logs events', async () => {
    const created = await call('POST', '/tickets', '/tickets', {
      title: 'Ship it',
      description: 'd',
    });
    expect(created.status).toBe(201);
    expect(created.body).toMatchObject({ title: 'Ship it', state: 'backlog', version: 1 });
    expect(created.body.allowedEvents).toEqual(['CANCEL', 'START']);
    const id = created.body.id as string;

    const started = await call('POST', `/tickets/${id}/events`, '/tickets/{id}/events', {
      type: 'START',
    });
    expect(started.status).toBe(200);
    expect(started.body.state).toBe('requirements');

    const task = await call('POST', `/tickets/${id}/tasks`, '/tickets/{id}/tasks', {
      type: 'implement_feature',
      payload: { n: 1, deep: [{ x: null }] },
      worktree: 'wt-1',
      priority: 5,
    });
    expect(task.status).toBe(201);
    expect(task.body).toMatchObject({ ticketId: id, phase: 'requirements', state: 'pending' });
    // Issued ids are time-ordered (UUIDv7): a later entity's sorts after an earlier one's.
    const v7 = /^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/;
    expect(id.slice(4)).toMatch(v7);
    expect(String(task.body.id).slice(4)).toMatch(v7);
    expect(String(task.body.id).slice(4, 17) >= id.slice(4, 17)).toBe(true);
    expect(task.body.allowedEvents).toContain('CANCEL');

    const got = await call('GET', `/tickets/${id}`, '/tickets/{id}');
    expect(got.status).toBe(200);
    expect(got.body.tasks.map((x: { id: string }) => x.id)).toEqual([task.body.id]);
    expect(got.body.allowedEvents).toEqual(['ADVANCE', 'BLOCK', 'CANCEL']);

    const log = await call('GET', `/tickets/${id}/events`, '/tickets/{id}/events');
    expect(log.body.events.map((e: { seq: number }) => e.seq)).toEqual([1, 2]);
    expect(log.body.events[0]).toEqual({
      seq: 1,
      entityId: id,
      entityType: 'ticket',
      type: 'ticket.created',
      data: expect.any(Object),
      at: expect.any(String),
    });
    const after = await call('GET', `/tickets/${id}/events?after=1`, '/tickets/{id}/events');
    expect(after.body.events.map((e: { type: string }) => e.type)).toEqual([
      'ticket.phase_changed',
    ]);
    const taskLog = await call('GET', `/tasks/${task.body.id}/events`, '/tasks/{id}/events');
    expect(taskLog.body.events[0].type).toBe('task.created');
  });

  it('lists by state with a keyset cursor, newest first, each ticket once', async () => {
    const ids: string[] = [];
    for (let i = 0; i < 7; i++) ids.push((await newTicket(`page ${i}`)).id);
    await call('POST', `/tickets/${ids[0]}/events`, '/tickets/{id}/events', { type: 'CANCEL' });
    const seen: string[] = [];
    let cursor: string | null = null;
    do {
      const q: string = `/tickets?state=backlog&limit=3${cursor ? `&cursor=${cursor}` : ''}`;
      const page = await call('GET', q, '/tickets');
      expect(page.body.items.length).toBeLessThanOrEqual(3);
      for (const item of page.body.items) expect(item.state).toBe('backlog');
      seen.push(...page.body.items.map((x: { id: string }) => x.id));
      cursor = page.body.nextCursor;
    } while (cursor);
    expect(new Set(seen).size).toBe(seen.length);
    const mine = seen.filter((id) => ids.includes(id));
    expect(mine).toEqual(ids.slice(1).reverse());
    const cancelled = await call('GET', '/tickets?state=cancelled', '/tickets');
    expect(cancelled.body.items.map((x: { id: string }) => x.id)).toContain(ids[0]);
  });

  it('lists tasks by state and ticket', async () => {
    const ticket = await newTicket();
    const a = await call('POST', `/tickets/${ticket.id}/tasks`, '/tickets/{id}/tasks', {
      type: 'a',
    });
    await call('POST', `/tasks/${a.body.id}/events`, '/tasks/{id}/events', { type: 'CANCEL' });
    await call('POST', `/tickets/${ticket.id}/tasks`, '/tickets/{id}/tasks', { type: 'b' });
    const pending = await call('GET', `/tasks?state=pending&ticketId=${ticket.id}`, '/tasks');
    expect(pending.body.items.map((x: { type: string }) => x.type)).toEqual(['b']);
    const all = await call('GET', `/tasks?ticketId=${ticket.id}&limit=1`, '/tasks');
    expect(all.body.items).toHaveLength(1);
    expect(all.body.nextCursor).toEqual(expect.any(String));
    const one = await call('GET', `/tasks/${a.body.id}`, '/tasks/{id}');
    expect(one.body).toMatchObject({ state: 'cancelled', allowedEvents: [] });
  });

  it('lists every task newest first across states, each once, page by page', async () => {
    const ticket = await newTicket();
    const mine: string[] = [];
    for (let i = 0; i < 5; i++) {
      const t = await call('POST', `/tickets/${ticket.id}/tasks`, '/tickets/{id}/tasks', {
        type: `t${i}`,
      });
      mine.push(t.body.id);
      // Pending and cancelled in turn: the listing merges the states.
      if (i % 2 === 1) {
        await call('POST', `/tasks/${t.body.id}/events`, '/tasks/{id}/events', { type: 'CANCEL' });
      }
    }
    const seen: { id: string; createdAt: string }[] = [];
    let cursor: string | null = null;
    do {
      const q: string = `/tasks?limit=2${cursor ? `&cursor=${cursor}` : ''}`;
      const page = await call('GET', q, '/tasks');
      expect(page.status).toBe(200);
      expect(page.body.items.length).toBeLessThanOrEqual(2);
      seen.push(...page.body.items);
      cursor = page.body.nextCursor;
    } while (cursor);
    const ids = seen.map((x) => x.id);
    expect(new Set(ids).size).toBe(ids.length);
    expect(ids.filter((id) => mine.includes(id))).toEqual([...mine].reverse());
    const times = seen.map((x) => Date.parse(x.createdAt));
    expect(times.every(Number.isFinite)).toBe(true);
    expect([...times].sort((x, y) => y - x)).toEqual(times);
  });
});

describe('error codes', () => {
  it('validation_failed names every bad field', async () => {
    const r = await call('POST', '/tickets', '/tickets', { title: 5, extra: 1, other: 2 });
    expect(r.status).toBe(400);
    expect(r.body.error).toBe('validation_failed');
    expect(r.body.issues.map((i: { path: string }) => i.path).sort()).toEqual([
      'extra',
      'other',
      'title',
    ]);

    const ticket = await newTicket();
    const task = await call('POST', `/tickets/${ticket.id}/tasks`, '/tickets/{id}/tasks', {
      type: 'x',
      maxAttempts: 0,
      priority: 1.5,
    });
    expect(task.status).toBe(400);
    expect(task.body.issues.map((i: { path: string }) => i.path).sort()).toEqual([
      'maxAttempts',
      'priority',
    ]);

    const cases: [string, string, string, unknown][] = [
      ['POST', '/tickets', '/tickets', '{"title": '],
      ['POST', '/tickets', '/tickets', ''],
      ['POST', '/tickets', '/tickets', '[1]'],
      ['POST', '/tickets', '/tickets', { title: 'nul \u0000 inside' }],
      ['POST', '/tickets', '/tickets', { title: 'lone \ud800' }],
      ['GET', '/tickets?limit=0', '/tickets', undefined],
      ['GET', '/tickets?state=nope', '/tickets', undefined],
      ['GET', '/tickets?cursor=garbage', '/tickets', undefined],
      ['GET', '/tickets?unknown=1', '/tickets', undefined],
      ['POST', `/tickets/${ticket.id}/events`, '/tickets/{id}/events', { type: 'TASK_ADDED' }],
      ['POST', `/tickets/${ticket.id}/events`, '/tickets/{id}/events', { type: 'NOPE' }],
      ['POST', `/tickets/${ticket.id}/events`, '/tickets/{id}/events', { type: 'BLOCK' }],
      ['POST', '/tasks/claim', '/tasks/claim', { workerId: '' }],
      ['POST', '/tasks/claim', '/tasks/claim', { workerId: 'w', waitMs: -1 }],
    ];
    for (const [method, path, template, body] of cases) {
      const res = await call(method, path, template, body);
      expect(res.status, `${method} ${path} ${JSON.stringify(body)}`).toBe(400);
      expect(res.body.error).toBe('validation_failed');
      expect(res.body.issues.length).toBeGreaterThan(0);
    }
    const idem = await call(
      'POST',
      '/tickets',
      '/tickets',
      { title: 'x' },
      { 'Idempotency-Key': '' },
    );
    expect(idem.body.issues[0].path).toBe('Idempotency-Key');
  });

  it('not_found for unknown tickets, tasks, machines and routes', async () => {
    for (const [method, path, template, body] of [
      ['GET', '/tickets/tkt_nope', '/tickets/{id}', undefined],
      ['GET', '/tasks/tsk_nope', '/tasks/{id}', undefined],
      ['GET', '/tasks/%00', '/tasks/{id}', undefined],
      ['GET', '/tickets/tkt_nope/events', '/tickets/{id}/events', undefined],
      ['POST', '/tickets/tkt_nope/events', '/tickets/{id}/events', { type: 'START' }],
      ['POST', '/tickets/tkt_nope/tasks', '/tickets/{id}/tasks', { type: 'x' }],
      ['POST', '/tasks/tsk_nope/events', '/tasks/{id}/events', { type: 'CANCEL' }],
      ['GET', '/machines/nope', '/machines/{name}', undefined],
    ] as const) {
      const r = await call(method, path, template, body);
      expect(r.status, path).toBe(404);
      expect(r.body.error).toBe('not_found');
    }
    const route = await t.call('GET', '/no/such/route');
    expect(route.status).toBe(404);
    expect(route.body).toEqual({ error: 'not_found', message: 'no route GET /no/such/route' });
    expect(route.headers.get('x-request-id')).toBeTruthy();
  });

  it('illegal_transition with state, event and allowed; 409 on a final ticket', async () => {
    const ticket = await newTicket();
    const r = await call('POST', `/tickets/${ticket.id}/events`, '/tickets/{id}/events', {
      type: 'ADVANCE',
    });
    expect(r.status).toBe(409);
    expect(r.body).toMatchObject({
      error: 'illegal_transition',
      state: 'backlog',
      event: 'ADVANCE',
      allowed: ['CANCEL', 'START'],
    });
    await call('POST', `/tickets/${ticket.id}/events`, '/tickets/{id}/events', { type: 'CANCEL' });
    const task = await call('POST', `/tickets/${ticket.id}/tasks`, '/tickets/{id}/tasks', {
      type: 'late',
    });
    expect(task.status).toBe(409);
    expect(task.body.error).toBe('illegal_transition');
    const after = await call('GET', `/tickets/${ticket.id}`, '/tickets/{id}');
    expect(after.body.tasks).toEqual([]);
  });

  it('stale_token with attempt; claim, start, heartbeat and complete with the right token', async () => {
    const ticket = await newTicket();
    const task = await call('POST', `/tickets/${ticket.id}/tasks`, '/tickets/{id}/tasks', {
      type: 'stale_check',
    });
    const claimed = await call('POST', '/tasks/claim', '/tasks/claim', {
      workerId: 'agent-1',
      types: ['stale_check'],
    });
    expect(claimed.status).toBe(200);
    expect(claimed.body.task).toMatchObject({ id: task.body.id, state: 'claimed', attempt: 1 });
    expect(claimed.body.task.workerId).toBe('agent-1');
    const path = `/tasks/${task.body.id}/events`;
    const stale = await call('POST', path, '/tasks/{id}/events', { type: 'START', token: 'wrong' });
    expect(stale.status).toBe(409);
    expect(stale.body).toMatchObject({ error: 'stale_token', attempt: 1 });
    const token = claimed.body.token as string;
    for (const type of ['START', 'HEARTBEAT']) {
      const r = await call('POST', path, '/tasks/{id}/events', { type, token });
      expect(r.status, type).toBe(200);
    }
    const done = await call('POST', path, '/tasks/{id}/events', {
      type: 'COMPLETE',
      token,
      result: { ok: true },
    });
    expect(done.body).toMatchObject({ state: 'completed', result: { ok: true } });
    const claimEvent = await call('POST', path, '/tasks/{id}/events', {
      type: 'CLAIM',
      workerId: 'x',
    });
    expect(claimEvent.status).toBe(400);
  });

  it('conflict when an Idempotency-Key is reused with another body', async () => {
    const key = { 'Idempotency-Key': 'reuse-1' };
    const first = await call('POST', '/tickets', '/tickets', { title: 'one' }, key);
    const again = await call('POST', '/tickets', '/tickets', { title: 'one' }, key);
    expect(again.status).toBe(201);
    expect(again.body).toEqual(first.body);
    const other = await call('POST', '/tickets', '/tickets', { title: 'two' }, key);
    expect(other.status).toBe(409);
    expect(other.body.error).toBe('conflict');
  });

  it('payload_too_large and unsupported_media_type', async () => {
    const big = await call('POST', '/tickets', '/tickets', { title: 'x'.repeat(5000) });
    expect(big.status).toBe(413);
    expect(big.body.error).toBe('payload_too_large');
    const text = await call('POST', '/tickets', '/tickets', 'title=x', {
      'content-type': 'text/plain',
    });
    expect(text.status).toBe(415);
    expect(text.body.error).toBe('unsupported_media_type');
    const none = await t.app.request('/tickets', { method: 'POST', body: '{"title":"x"}' });
    expect(none.status).toBe(415);
  });

  it('internal: a 500 that names the request id and is logged with it', async () => {
    const lines: string[] = [];
    const sink = new Writable({
      write(chunk, _enc, done) {
        lines.push(String(chunk));
        done();
      },
    });
    const broken = await createTestApp('http_api_internal', {
      db: t.db,
      log: pino({ level: 'error' }, sink),
      services: {
        queries: Object.assign(Object.create(t.services.queries), {
          getTicket: () => Promise.reject(new Error('disk on fire')),
        }),
      },
    });
    const r = await broken.call('GET', '/tickets/tkt_1', undefined, { 'X-Request-Id': 'req-42' });
    expect(r.status).toBe(500);
    expect(r.body).toEqual({
      error: 'internal',
      message: 'internal error (request req-42)',
      requestId: 'req-42',
    });
    expect(r.text).not.toContain('disk on fire');
    expect(r.headers.get('x-request-id')).toBe('req-42');
    check('GET', '/tickets/{id}', 400, r.body); // the Error schema
    expect(lines.join('')).toContain('"requestId":"req-42"');
    expect(lines.join('')).toContain('disk on fire');
    await broken.close();
  });

  it('unauthorized without the bearer token when API_TOKEN is set', async () => {
    const secured = await createTestApp('http_api_auth', {
      db: t.db,
      config: { API_TOKEN: 's3cret' },
    });
    const missing = await secured.call('GET', '/tickets');
    expect(missing.status).toBe(401);
    expect(missing.body.error).toBe('unauthorized');
    expect(missing.headers.get('www-authenticate')).toBe('Bearer');
    const wrong = await secured.call('GET', '/tickets', undefined, {
      authorization: 'Bearer nope',
    });
    expect(wrong.status).toBe(401);
    const post = await secured.call('POST', '/tickets', { title: 'x' });
    expect(post.status).toBe(401);
    const right = await secured.call('GET', '/tickets', undefined, {
      authorization: 'Bearer s3cret',
    });
    expect(right.status).toBe(200);
    expect((await secured.call('GET', '/healthz')).status).toBe(200);
    await secured.close();
  });
});

describe('idempotency', () => {
  it('20 concurrent POSTs with one key have one effect and one answer', async () => {
    const before = await t.db.sql<{ n: number }[]>`select count(*)::int as n from tickets`;
    const replies = await Promise.all(
      Array.from({ length: 20 }, () =>
        t.call('POST', '/tickets', { title: 'once' }, { 'Idempotency-Key': 'twenty' }),
      ),
    );
    const after = await t.db.sql<{ n: number }[]>`select count(*)::int as n from tickets`;
    expect(after[0]?.n).toBe((before[0]?.n ?? 0) + 1);
    for (const r of replies) {
      expect(r.status).toBe(201);
      expect(r.body).toEqual(replies[0]?.body);
    }
  });

  it('20 concurrent events with one key apply once', async () => {
    const ticket = await newTicket();
    const replies = await Promise.all(
      Array.from({ length: 20 }, () =>
        t.call(
          'POST',
          `/tickets/${ticket.id}/events`,
          { type: 'START' },
          { 'Idempotency-Key': `start-${ticket.id}` },
        ),
      ),
    );
    expect(new Set(replies.map((r) => r.status))).toEqual(new Set([200]));
    const log = await t.call('GET', `/tickets/${ticket.id}/events`);
    expect(log.body.events.map((e: { type: string }) => e.type)).toEqual([
      'ticket.created',
      'ticket.phase_changed',
    ]);
  });

  it('a keyed claim returns the same task and token when repeated', async () => {
    const ticket = await newTicket();
    await t.call('POST', `/tickets/${ticket.id}/tasks`, { type: 'idem_claim' });
    const body = { workerId: 'agent-i', types: ['idem_claim'] };
    const key = { 'Idempotency-Key': `claim-${ticket.id}` };
    const first = await call('POST', '/tasks/claim', '/tasks/claim', body, key);
    const again = await call('POST', '/tasks/claim', '/tasks/claim', body, key);
    expect(first.status).toBe(200);
    expect(again.body).toEqual(first.body);
  });
});

describe('claim long poll', () => {
  it('answers 204 after waitMs when nothing is claimable', async () => {
    const started = Date.now();
    const r = await t.call('POST', '/tasks/claim', {
      workerId: 'agent-2',
      types: ['nothing_here'],
      waitMs: 400,
    });
    expect(r.status).toBe(204);
    expect(r.text).toBe('');
    expect(Date.now() - started).toBeGreaterThanOrEqual(380);
  });

  it('answers 200 when a task appears mid-wait', async () => {
    const ticket = await newTicket();
    const started = Date.now();
    const pending = t.call('POST', '/tasks/claim', {
      workerId: 'agent-3',
      types: ['appears'],
      waitMs: 4000,
    });
    await new Promise((r) => setTimeout(r, 300));
    const task = await t.call('POST', `/tickets/${ticket.id}/tasks`, { type: 'appears' });
    const r = await pending;
    expect(r.status).toBe(200);
    expect(r.body.task.id).toBe(task.body.id);
    expect(Date.now() - started).toBeLessThan(2500);
  });

  it('caps waitMs and ends the wait when the client goes away', async () => {
    const abort = new AbortController();
    const started = Date.now();
    const pending = t.app.request('/tasks/claim', {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ workerId: 'agent-4', types: ['never'], waitMs: 3_600_000 }),
      signal: abort.signal,
    });
    setTimeout(() => abort.abort(), 200);
    const r = await pending;
    expect(r.status).toBe(204);
    expect(Date.now() - started).toBeLessThan(1500);
  });
});

describe('operations and inspection', () => {
  it('healthz, readyz and a request id on every response', async () => {
    const h = await call('GET', '/healthz', '/healthz');
    expect(h.body).toEqual({ status: 'ok' });
    const r = await call('GET', '/readyz', '/readyz');
    expect(r.body).toEqual({ ready: true, postgres: true, nats: true, migrations: true });
    const given = await t.call('GET', '/healthz', undefined, { 'X-Request-Id': 'abc-123' });
    expect(given.headers.get('x-request-id')).toBe('abc-123');
    const down = await createTestApp('http_api_ready', {
      db: t.db,
      services: { ready: async () => ({ postgres: true, nats: false, migrations: true }) },
    });
    const d = await down.call('GET', '/readyz');
    expect(d.status).toBe(503);
    check('GET', '/readyz', 503, d.body);
    expect(d.body.nats).toBe(false);
    await down.close();
  });

  it('metrics in Prometheus text', async () => {
    await t.call('GET', '/healthz');
    const m = await t.call('GET', '/metrics');
    expect(m.status).toBe(200);
    expect(m.headers.get('content-type')).toContain('text/plain');
    expect(m.text).toContain(
      'http_request_duration_seconds_bucket{method="GET",route="/healthz",status="200",le="0.005"}',
    );
    expect(m.text).toMatch(
      /http_request_duration_seconds_count\{method="GET",route="\/tickets\/:id"/,
    );
    expect(m.text).toMatch(
      /orch_transitions_total\{entity="ticket",event="create",from="new",to="backlog"\} \d+/,
    );
    expect(m.text).toMatch(
      /orch_illegal_transitions_total\{entity="ticket",state="backlog",event="ADVANCE"\} \d+/,
    );
    expect(m.text).toMatch(/orch_claims_total \d+/);
    // This app's host committed the tickets the earlier tests created: at least one unit each.
    const counter = (name: string) => Number(new RegExp(`^${name} (\\d+)$`, 'm').exec(m.text)?.[1]);
    expect(counter('orch_commits_total')).toBeGreaterThan(0);
    expect(counter('orch_commit_units_total')).toBeGreaterThanOrEqual(
      counter('orch_commits_total'),
    );
    expect(counter('orch_commit_reruns_total')).toBeGreaterThanOrEqual(0);
    expect(counter('orch_commit_failures_total')).toBeGreaterThanOrEqual(0);
    expect(m.text).toMatch(/^orch_commit_waiting \d+$/m);
    expect(m.text).toMatch(/orch_outbox_pending \d+/);
    expect(m.text).toMatch(/orch_dead_letters 0/);
    expect(m.text).toMatch(/orch_entities\{entity="ticket",state="backlog"\} \d+/);
    // The process's own health, under prom-client's names.
    const gauge = (name: string) => Number(new RegExp(`^${name} (\\S+)$`, 'm').exec(m.text)?.[1]);
    const rss = gauge('process_resident_memory_bytes');
    expect(rss).toBeGreaterThan(10e6);
    expect(rss).toBeLessThan(8e9);
    expect(gauge('nodejs_heap_size_used_bytes')).toBeGreaterThan(1e6);
    expect(gauge('nodejs_heap_size_used_bytes')).toBeLessThanOrEqual(
      gauge('nodejs_heap_size_total_bytes'),
    );
    expect(gauge('process_cpu_user_seconds_total')).toBeGreaterThan(0);
    expect(gauge('process_open_fds')).toBeGreaterThan(3);
    expect(gauge('nodejs_active_resources')).toBeGreaterThan(0);
    expect(
      Math.abs(gauge('process_start_time_seconds') - (Date.now() / 1000 - process.uptime())),
    ).toBeLessThan(5);
    // A busy loop between two scrapes shows in the second. (The sampler restarts at each
    // scrape and records from its second tick, 20 ms on.)
    await new Promise((r) => setTimeout(r, 60));
    const spin = Date.now() + 120;
    while (Date.now() < spin) {}
    const after = await t.call('GET', '/metrics');
    const max = Number(/^nodejs_eventloop_lag_max_seconds (\S+)$/m.exec(after.text)?.[1]);
    expect(max).toBeGreaterThan(0.08);
    expect(max).toBeLessThan(10);
    expect(after.text).toMatch(/^nodejs_eventloop_lag_p99_seconds \S+$/m);
    const withExtra = await createTestApp('http_api_metrics', {
      db: t.db,
      services: {
        metrics: () =>
          '# HELP orch_dead_letters x\n# TYPE orch_dead_letters gauge\norch_dead_letters 7\n',
      },
    });
    const text = (await withExtra.call('GET', '/metrics')).text;
    const types = [...text.matchAll(/^# TYPE (\S+)/gm)].map((x) => x[1]);
    expect(types.length).toBe(new Set(types).size);
    expect(text).toContain('orch_dead_letters 7');
    expect(text).toContain('orch_outbox_pending');
    await withExtra.close();
  });

  it('machine definitions and their Mermaid charts', async () => {
    const list = await call('GET', '/machines', '/machines');
    expect(list.body.machines.map((m: { name: string }) => m.name)).toEqual(['ticket', 'task']);
    const task = list.body.machines[1];
    expect(task.events).toContain('COMPLETE');
    expect(task.events).not.toContain('LEASE_EXPIRED');
    const def = await t.call('GET', '/machines/task');
    expect(def.body).toMatchObject({ id: 'task', initial: expect.anything() });
    expect(Object.keys(def.body.states)).toContain('retry_wait');
    const chart = await t.call('GET', '/machines/ticket/mermaid?state=design');
    expect(chart.text).toContain('stateDiagram-v2');
    expect(chart.text).toContain('class design current');
  });

  it('serves the dashboard and mermaid locally', async () => {
    const page = await t.call('GET', '/');
    expect(page.headers.get('content-type')).toContain('text/html');
    expect(page.text).toContain('/assets/mermaid.min.js');
    expect(page.text).not.toMatch(/https?:\/\//);
    const js = await t.app.request('/assets/mermaid.min.js');
    expect(js.status).toBe(200);
    expect((await js.text()).length).toBeGreaterThan(1_000_000);
  });

  it('documents every route in OpenAPI 3.1', async () => {
    const doc = (await t.call('GET', '/openapi.json')).body;
    expect(doc.openapi).toBe('3.1.0');
    expect(Object.keys(doc.paths)).toEqual(
      expect.arrayContaining([
        '/tickets',
        '/tickets/{id}',
        '/tickets/{id}/events',
        '/tickets/{id}/tasks',
        '/tasks',
        '/tasks/claim',
        '/tasks/{id}',
        '/tasks/{id}/events',
        '/events/stream',
        '/machines',
        '/machines/{name}',
        '/healthz',
        '/readyz',
        '/metrics',
      ]),
    );
    expect(doc.components.schemas.NewTicket.additionalProperties).toBe(false);
    // The checker itself bites: a body that is not a TicketDetail is refused.
    expect(() => check('GET', '/tickets/{id}', 200, { id: 'x' })).toThrow(/TicketDetail/);
    expect(() => check('GET', '/tickets/{id}', 404, { error: 'nope', message: 'm' })).toThrow();
  });
});

/** A count of everything a request could change, to assert that a refusal changed nothing. */
async function stateOf(): Promise<string> {
  const rows = await t.db.sql`
    select
      (select count(*) from tickets) as tickets,
      (select coalesce(sum(version), 0) from tickets) as ticket_versions,
      (select count(*) from tasks) as tasks,
      (select coalesce(sum(version), 0) from tasks) as task_versions,
      (select count(*) from events) as events`;
  return JSON.stringify(rows[0]);
}

const cursorOf = (at: unknown, id: unknown) =>
  Buffer.from(JSON.stringify([at, id])).toString('base64url');

describe('bounds on what reaches SQL and timers', () => {
  it('refuses numbers past the column or timer they feed, with the field named', async () => {
    const ticket = await newTicket();
    const task = (await t.call('POST', `/tickets/${ticket.id}/tasks`, { type: 'bounds' })).body;
    const before = await stateOf();
    const numbers = [
      '2147483648',
      '4294967296',
      '9007199254740993',
      '-1',
      '1.5',
      '1e3',
      '1e400',
      '0x10',
      'Infinity',
      'NaN',
      ' 5',
      '',
    ];
    for (const v of numbers) {
      for (const [path, field] of [
        [`/tickets/${ticket.id}/events?after=${encodeURIComponent(v)}`, 'after'],
        [`/tasks/${task.id}/events?after=${encodeURIComponent(v)}`, 'after'],
        [`/tickets/${ticket.id}/events?limit=${encodeURIComponent(v)}`, 'limit'],
        [`/tickets?limit=${encodeURIComponent(v)}`, 'limit'],
        [`/tasks?limit=${encodeURIComponent(v)}`, 'limit'],
        [`/dead-letters?limit=${encodeURIComponent(v)}`, 'limit'],
      ] as const) {
        const r = await t.call('GET', path);
        expect(r.status, `${path} -> ${r.text}`).toBe(400);
        expect(r.body.error).toBe('validation_failed');
        expect(r.body.issues.map((i: { path: string }) => i.path)).toContain(`query.${field}`);
      }
      // A stream position is a bigint: only past 2^53 (where a number loses digits) is it refused.
      if (v === '2147483648' || v === '4294967296') continue;
      const stream = await t.call('GET', `/events/stream?after=${encodeURIComponent(v)}`);
      expect(stream.status, `/events/stream?after=${v} -> ${stream.text}`).toBe(400);
      expect(stream.body.issues[0].path).toBe('query.after');
    }
    const edge = await call(
      'GET',
      `/tickets/${ticket.id}/events?after=2147483647`,
      '/tickets/{id}/events',
    );
    expect(edge.status).toBe(200);
    expect(edge.body.events).toEqual([]);
    expect(await stateOf()).toBe(before);
  });

  it('refuses a cursor with a NUL, an id or a date Postgres cannot hold', async () => {
    const good = '2024-01-01T00:00:00.000Z';
    const cursors = [
      '%00',
      encodeURIComponent('abc\u0000'),
      cursorOf(good, 'tkt\u0000x'),
      cursorOf(good, 'x'.repeat(10_000)),
      cursorOf('+275760-09-13T00:00:00.000Z', 'tkt_1'),
      cursorOf('-271821-04-20T00:00:00.000Z', 'tkt_1'),
      cursorOf('0000-00-00', 'tkt_1'),
      cursorOf('9999999-01-01', 'tkt_1'),
      cursorOf(8.64e15, 'tkt_1'),
      cursorOf('2024-01-01\u0000', 'tkt_1'),
    ];
    for (const cursor of cursors) {
      for (const path of ['/tickets', '/tasks']) {
        const r = await call('GET', `${path}?cursor=${cursor}`, path);
        expect(r.status, `${path} ${cursor} -> ${r.text}`).toBe(400);
        expect(r.body.issues.map((i: { path: string }) => i.path)).toContainEqual(
          expect.stringMatching(/cursor$/),
        );
      }
    }
    const ok = await call('GET', `/tickets?cursor=${cursorOf(good, 'tkt_1')}`, '/tickets');
    expect(ok.status).toBe(200);
  });

  it('validates payloads against the executor: sleep ms and shell fields fit a timer', async () => {
    const ticket = await newTicket();
    await call('POST', `/tickets/${ticket.id}/events`, '/tickets/{id}/events', { type: 'START' });
    const path = `/tickets/${ticket.id}/tasks`;
    const before = await stateOf();
    const refused: [string, unknown, string][] = [
      ['sleep', { ms: 2_147_483_648 }, 'payload.ms'],
      ['sleep', { ms: 2 ** 53 }, 'payload.ms'],
      ['sleep', { ms: -1 }, 'payload.ms'],
      ['sleep', { ms: 1.5 }, 'payload.ms'],
      ['sleep', { ms: '10' }, 'payload.ms'],
      ['sleep', [1], 'payload'],
      ['shell', { command: 'true', timeoutMs: 2_147_483_648 }, 'payload.timeoutMs'],
      ['shell', { command: 'true', timeoutMs: 0 }, 'payload.timeoutMs'],
      ['shell', { command: 'true', timeoutMs: 1e21 }, 'payload.timeoutMs'],
      ['shell', { command: '' }, 'payload.command'],
      ['shell', { command: 'x'.repeat(70_000) }, 'payload.command'],
      ['shell', { timeoutMs: 10 }, 'payload.command'],
      ['shell', null, 'payload'],
      ['shell', { command: 'true', cwd: 5 }, 'payload.cwd'],
      ['shell', { command: 'true', cwd: 'x'.repeat(5_000) }, 'payload.cwd'],
    ];
    for (const [executor, payload, field] of refused) {
      // The big command is refused for its size first when over the body limit: use a roomy app.
      const r = await t.call('POST', path, { type: 'bounded', executor, payload });
      if (r.status === 413) continue;
      expect(r.status, `${executor} ${JSON.stringify(payload).slice(0, 80)} -> ${r.text}`).toBe(
        400,
      );
      expect(r.body.issues.map((i: { path: string }) => i.path)).toContain(field);
    }
    const noPayload = await t.call('POST', path, { type: 'bounded', executor: 'shell' });
    expect(noPayload.status).toBe(400);
    expect(await stateOf()).toBe(before);

    for (const [executor, payload] of [
      ['sleep', { ms: 2_147_483_647 }],
      ['sleep', { ms: 0, fail: 'boom' }],
      ['sleep', undefined],
      ['shell', { command: 'echo hi', timeoutMs: 2_147_483_647, cwd: '.' }],
      ['external', { ms: 2 ** 60, anything: ['goes'] }],
      ['my_agent', { timeoutMs: -5 }],
    ] as const) {
      const r = await call('POST', path, '/tickets/{id}/tasks', {
        type: 'bounded',
        executor,
        payload,
      });
      expect(r.status, `${executor} ${JSON.stringify(payload)} -> ${r.text}`).toBe(201);
    }
  });

  it('caps payload and result in bytes of UTF-8 JSON: 413 naming the field, nothing changed', async () => {
    const ticket = await newTicket();
    await call('POST', `/tickets/${ticket.id}/events`, '/tickets/{id}/events', { type: 'START' });
    const path = `/tickets/${ticket.id}/tasks`;
    // A JSON string of n ASCII characters encodes to n + 2 bytes; the cap is 1024.
    const atCap = await call('POST', path, '/tickets/{id}/tasks', {
      type: 'capped',
      payload: 'x'.repeat(1022),
    });
    expect(atCap.status).toBe(201);
    const before = await stateOf();
    const over = await call('POST', path, '/tickets/{id}/tasks', {
      type: 'capped',
      payload: 'x'.repeat(1023),
    });
    expect(over.status).toBe(413);
    expect(over.body.error).toBe('payload_too_large');
    expect(over.body.message).toContain('payload');
    // 400 characters, 1200 bytes: the cap counts bytes.
    const euros = await call('POST', path, '/tickets/{id}/tasks', {
      type: 'capped',
      payload: { note: '\u20ac'.repeat(400) },
    });
    expect(euros.status).toBe(413);
    expect(euros.body.message).toContain('payload');
    expect(await stateOf()).toBe(before);

    const claimed = await call('POST', '/tasks/claim', '/tasks/claim', {
      workerId: 'capper',
      types: ['capped'],
    });
    expect(claimed.status).toBe(200);
    const { token } = claimed.body;
    const events = `/tasks/${claimed.body.task.id}/events`;
    await call('POST', events, '/tasks/{id}/events', { type: 'START', token });
    const running = await stateOf();
    const big = await call('POST', events, '/tasks/{id}/events', {
      type: 'COMPLETE',
      token,
      result: { out: '\u00e9'.repeat(600) },
    });
    expect(big.status).toBe(413);
    expect(big.body.error).toBe('payload_too_large');
    expect(big.body.message).toContain('result');
    expect(await stateOf()).toBe(running);
    const task = await call('GET', `/tasks/${claimed.body.task.id}`, '/tasks/{id}');
    expect(task.body.state).toBe('running');
    const done = await call('POST', events, '/tasks/{id}/events', {
      type: 'COMPLETE',
      token,
      result: { out: 'x'.repeat(900) },
    });
    expect(done.status).toBe(200);
  });
});

/** Sends raw bytes on a new connection and returns everything the server wrote back. */
function rawExchange(port: number, data: string | Buffer, timeoutMs = 5_000): Promise<string> {
  return new Promise((resolve, reject) => {
    const socket = connect(port, '127.0.0.1');
    const chunks: Buffer[] = [];
    const timer = setTimeout(() => {
      socket.destroy();
      reject(new Error(`no close within ${timeoutMs} ms: ${Buffer.concat(chunks).toString()}`));
    }, timeoutMs);
    socket.on('data', (c) => chunks.push(c));
    socket.on('error', () => {});
    socket.on('close', () => {
      clearTimeout(timer);
      resolve(Buffer.concat(chunks).toString('utf8'));
    });
    socket.write(data);
  });
}

function parseRaw(text: string): { status: number; headers: string; body: string } {
  const at = text.indexOf('\r\n\r\n');
  const head = at < 0 ? text : text.slice(0, at);
  return {
    status: Number(/^HTTP\/1\.[01] (\d{3})/.exec(head)?.[1] ?? 0),
    headers: head.toLowerCase(),
    body: at < 0 ? '' : text.slice(at + 4),
  };
}

describe('on a real socket', () => {
  let server: ReturnType<typeof startHttpServer>;
  let port: number;
  let secured: TestApp;
  let securedServer: ReturnType<typeof startHttpServer>;
  let securedPort: number;

  const listen = async (app: TestApp) => {
    const s = startHttpServer(app.app.fetch, { port: 0, hostname: '127.0.0.1' });
    await new Promise<void>((resolve) => s.once('listening', () => resolve()));
    return { s, port: (s.address() as AddressInfo).port };
  };

  beforeAll(async () => {
    ({ s: server, port } = await listen(t));
    secured = await createTestApp('http_api_socket', { db: t.db, config: { API_TOKEN: 'k' } });
    ({ s: securedServer, port: securedPort } = await listen(secured));
  });
  afterAll(async () => {
    for (const s of [server, securedServer]) {
      s.closeAllConnections();
      await new Promise<void>((resolve) => s.close(() => resolve()));
    }
    await secured.close();
  });

  /** One request through `agent`; the answer's status, headers and body. */
  function send(
    agent: Agent,
    to: number,
    method: string,
    path: string,
    body?: Buffer | string,
    headers: Record<string, string> = {},
  ): Promise<{ status: number; headers: Record<string, unknown>; body: string }> {
    return new Promise((resolve, reject) => {
      const req = httpRequest(
        { host: '127.0.0.1', port: to, method, path, agent, headers },
        (res) => {
          const chunks: Buffer[] = [];
          res.on('data', (c: Buffer) => chunks.push(c));
          res.on('end', () =>
            resolve({
              status: res.statusCode ?? 0,
              headers: res.headers,
              body: Buffer.concat(chunks).toString('utf8'),
            }),
          );
          res.on('error', reject);
        },
      );
      req.on('error', reject);
      req.setTimeout(10_000, () => req.destroy(new Error('timeout')));
      req.end(body);
    });
  }

  it('an answer that leaves the body unread closes the connection; the next request works', async () => {
    // [port, path, headers, status, body size]: 413 answers before reading a body over the
    // 4096-byte limit; the others refuse before reading one under it (401 before any limit).
    const cases: [number, string, Record<string, string>, number, number][] = [
      [port, '/tickets', { 'content-type': 'application/json' }, 413, 1_000_000],
      [
        port,
        '/tickets',
        { 'content-type': 'application/json', 'transfer-encoding': 'chunked' },
        413,
        1_000_000,
      ],
      [port, '/tickets', { 'content-type': 'text/plain' }, 415, 4_000],
      [port, '/no/such/route', { 'content-type': 'application/json' }, 404, 4_000],
      [securedPort, '/tickets', { 'content-type': 'application/json' }, 401, 1_000_000],
    ];
    for (const [to, path, headers, status, size] of cases) {
      const agent = new Agent({ keepAlive: true, maxSockets: 1 });
      try {
        for (let i = 0; i < 10; i++) {
          const body = `{"title":"${'x'.repeat(size)}"}`;
          const refused = await send(agent, to, 'POST', path, body, headers);
          expect(refused.status, `${path} ${i}`).toBe(status);
          expect(refused.headers.connection).toBe('close');
          expect(JSON.parse(refused.body)).toMatchObject({ message: expect.any(String) });
          const next = await send(agent, to, 'GET', '/healthz');
          expect(next.status, `request after ${status} #${i}`).toBe(200);
        }
      } finally {
        agent.destroy();
      }
    }
  });

  it('a request whose body was read keeps the connection alive', async () => {
    const agent = new Agent({ keepAlive: true, maxSockets: 1 });
    try {
      const a = await send(agent, port, 'POST', '/tickets', '{"title":"kept"}', {
        'content-type': 'application/json',
      });
      expect(a.status).toBe(201);
      expect(a.headers.connection).not.toBe('close');
      const invalid = await send(agent, port, 'POST', '/tickets', '{"title":5}', {
        'content-type': 'application/json',
      });
      expect(invalid.status).toBe(400);
      expect(invalid.headers.connection).not.toBe('close');
    } finally {
      agent.destroy();
    }
  });

  it("Node's own refusals (bad request line, huge headers, no Host) are JSON too", async () => {
    const cases: [string, number][] = [
      ['GARBAGE\r\n\r\n', 400],
      ['GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n', 400],
      [`GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ${'a'.repeat(20_000)}\r\n\r\n`, 431],
      ['GET /healthz HTTP/1.1\r\n\r\n', 400],
      ['GET /healthz HTTP/1.1\r\nHost: [::1\r\n\r\n', 400],
      ['POST /tickets HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n', 400],
      ['POST /tickets HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n', 400],
    ];
    for (const [request, status] of cases) {
      const answer = parseRaw(await rawExchange(port, request));
      expect(answer.status, JSON.stringify(request.slice(0, 80))).toBe(status);
      expect(answer.headers).toContain('content-type: application/json');
      expect(answer.headers).toContain('connection: close');
      const body = JSON.parse(answer.body) as { error: string; message: string };
      expect(typeof body.error).toBe('string');
      expect(body.message.length).toBeGreaterThan(0);
    }
  });
});
