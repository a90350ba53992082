/**
 * Guarantee 9 under fuzzing, on a real listening server: arbitrary bodies, paths, methods,
 * media types and headers, numbers at and past what their column or timer holds, NULs and
 * impossible dates in every query parameter, oversized payloads and results, and HEAD on
 * every route never get a 5xx, never hang, always answer an error as JSON `{error, message}`,
 * and a refused request changes no stored state (tickets, tasks, events and idempotency keys
 * compared before and after).
 */
import type { Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import fc from 'fast-check';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startHttpServer } from '../../src/http/server.js';
import type { Transport } from '../../src/transport/index.js';
import type { TransportNames } from '../../src/transport/subjects.js';
import { createTestApp, type TestApp } from '../support/http-app.js';
import { natsAdmin, startTransport, testNames } from '../support/transport.js';

let t: TestApp;
let ticketId: string;
let taskId: string;
let server: Server;
let base: string;
let transport: Transport;
let names: TransportNames;

async function fingerprint(): Promise<string> {
  const rows = await t.db.sql`
    select
      (select count(*) from tickets) as tickets,
      (select coalesce(sum(version), 0) from tickets) as ticket_versions,
      (select count(*) from tasks) as tasks,
      (select coalesce(sum(version), 0) from tasks) as task_versions,
      (select count(*) from events) as events,
      (select count(*) from idempotency_keys) as keys`;
  return JSON.stringify(rows[0]);
}

beforeAll(async () => {
  t = await createTestApp('http_fuzz', {
    config: { BODY_LIMIT_BYTES: '8192', PAYLOAD_MAX_BYTES: '1024' },
  });
  names = testNames();
  transport = await startTransport(t.db.sql, t.host, names, { reactions: () => [] });
  t.services.events = transport;
  server = startHttpServer(t.app.fetch, { port: 0, hostname: '127.0.0.1' });
  await new Promise<void>((resolve) => server.once('listening', () => resolve()));
  base = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
  ticketId = (await t.call('POST', '/tickets', { title: 'fuzz target' })).body.id;
  await t.call('POST', `/tickets/${ticketId}/events`, { type: 'START' });
  taskId = (await t.call('POST', `/tickets/${ticketId}/tasks`, { type: 'fuzz' })).body.id;
});
afterAll(async () => {
  server?.closeAllConnections();
  await new Promise<void>((resolve) => (server ? server.close(() => resolve()) : resolve()));
  await transport?.stop();
  const admin = await natsAdmin();
  await admin.close([names]);
  await t.close();
});

interface Answer {
  status: number;
  text: string;
  headers: Headers;
}

/**
 * One request to the listening server, refused as a hang after `timeoutMs`. An event
 * stream's body is not read (it never ends); `undefined` when the client library itself
 * refuses the request (a header it cannot send).
 */
async function request(
  method: string,
  url: string,
  init: { headers?: Record<string, string>; body?: string } = {},
  timeoutMs = 5_000,
): Promise<Answer | undefined> {
  try {
    new Headers(init.headers);
  } catch {
    return undefined;
  }
  const res = await fetch(`${base}${url}`, {
    method,
    headers: init.headers,
    body: method === 'GET' || method === 'HEAD' ? undefined : init.body,
    signal: AbortSignal.timeout(timeoutMs),
  }).catch((error: unknown) => {
    throw new Error(`${method} ${url}: ${String(error)} (${String((error as Error).cause)})`);
  });
  if (res.headers.get('content-type')?.includes('text/event-stream')) {
    await res.body?.cancel();
    return { status: res.status, text: '', headers: res.headers };
  }
  return { status: res.status, text: await res.text(), headers: res.headers };
}

/** No 5xx; an error is JSON `{error, message}`; every answer has a request id. */
function expectWellFormed(what: string, a: Answer): void {
  expect(a.status, `${what} -> ${a.text.slice(0, 300)}`).toBeLessThan(500);
  expect(a.headers.get('x-request-id'), what).toBeTruthy();
  if (a.status < 400) return;
  expect(a.headers.get('content-type'), what).toContain('application/json');
  if (what.startsWith('HEAD ')) return;
  const parsed = JSON.parse(a.text) as { error: unknown; message: unknown };
  expect(typeof parsed.error, what).toBe('string');
  expect(typeof parsed.message, what).toBe('string');
}

const segment = fc.oneof(
  fc.constantFrom('tickets', 'tasks', 'events', 'claim', 'machines', 'stream', 'task', ''),
  fc.constantFrom('%00', '%zz', '%', '..', '%2F', 'x'.repeat(300), '\u{1F600}', '%ED%A0%80'),
  fc.string().map(encodeURIComponent),
  fc.constant('TICKET'),
  fc.constant('TASK'),
);

const path = fc
  .tuple(
    fc.array(segment, { minLength: 1, maxLength: 4 }),
    fc.option(fc.string(), { nil: undefined }),
  )
  .map(([segs, query]) => {
    const p = `/${segs.join('/')}`.replace('TICKET', ticketId).replace('TASK', taskId);
    return query === undefined ? p : `${p}?${encodeURIComponent(query).replace(/%3D/g, '=')}`;
  });

/** Paths a real client would hit, so bodies reach validation rather than a 404. */
const knownPost = fc.constantFrom(
  '/tickets',
  '/tasks/claim',
  'TICKET/events',
  'TICKET/tasks',
  'TASK/events',
);

const jsonBody = fc.oneof(
  { arbitrary: fc.jsonValue().map((v) => JSON.stringify(v)), weight: 3 },
  {
    weight: 8,
    arbitrary: fc
      .dictionary(
        fc.constantFrom(
          'title',
          'type',
          'token',
          'workerId',
          'waitMs',
          'maxAttempts',
          'payload',
          'x',
        ),
        fc.oneof(fc.jsonValue(), fc.string(), fc.integer(), fc.constant('\u0000')),
      )
      .map((v) => JSON.stringify(v)),
  },
  { arbitrary: fc.string(), weight: 1 },
  { arbitrary: fc.constant('{"title": "\\ud800"}'), weight: 1 },
  { arbitrary: fc.constant(`${'['.repeat(3000)}${']'.repeat(3000)}`), weight: 1 },
  { arbitrary: fc.constant('x'.repeat(9000)), weight: 1 },
);

/** Bodies that would be valid and change state are left out: they are not bad input. */
function wouldApply(method: string, p: string, body: string): boolean {
  if (method !== 'POST') return false;
  try {
    const v = JSON.parse(body) as Record<string, unknown>;
    if (p === '/tickets') return typeof v.title === 'string' && Object.keys(v).length === 1;
    if (p === '/tasks/claim') return typeof v.workerId === 'string';
    if (p.endsWith('/tasks')) return typeof v.type === 'string';
    return typeof v.type === 'string';
  } catch {
    return false;
  }
}

describe('fuzzing', () => {
  it('never answers 5xx, never hangs, never changes state on refused input', async () => {
    const before = await fingerprint();
    await fc.assert(
      fc.asyncProperty(
        fc.constantFrom('GET', 'HEAD', 'POST', 'POST', 'POST', 'PUT', 'DELETE', 'PATCH'),
        fc.oneof(
          { arbitrary: path, weight: 1 },
          {
            weight: 3,
            arbitrary: knownPost.map((p) =>
              p.replace('TICKET', `/tickets/${ticketId}`).replace('TASK', `/tasks/${taskId}`),
            ),
          },
        ),
        jsonBody,
        fc.constantFrom(
          'application/json',
          'application/json',
          'application/json',
          'text/plain',
          'application/x+json',
          '',
          'application/json; charset=utf-8',
        ),
        fc.option(fc.string({ maxLength: 40 }), { nil: undefined }),
        async (method, p, body, contentType, lastEventId) => {
          fc.pre(!p.startsWith('/events/stream') && !wouldApply(method, p, body));
          const headers: Record<string, string> = { 'content-type': contentType };
          if (lastEventId !== undefined)
            headers['last-event-id'] = lastEventId.replace(/[\r\n]/g, '');
          const init = { headers, body };
          let url: string;
          try {
            url = new URL(p, 'http://localhost').pathname + new URL(p, 'http://localhost').search;
          } catch {
            return;
          }
          const res = await request(method, url, init as { headers: Record<string, string> });
          if (res) expectWellFormed(`${method} ${url} ${body.slice(0, 200)}`, res);
        },
      ),
      { numRuns: 1500, interruptAfterTimeLimit: 20_000 },
    );
    expect(await fingerprint()).toBe(before);
  });

  it('validates JSON bodies on every POST route: 4xx with named fields, nothing written', async () => {
    const before = await fingerprint();
    const statuses = new Map<number, number>();
    await fc.assert(
      fc.asyncProperty(knownPost, jsonBody, async (p, body) => {
        const url = p.replace('TICKET', `/tickets/${ticketId}`).replace('TASK', `/tasks/${taskId}`);
        fc.pre(!wouldApply('POST', url, body));
        const res = await t.call('POST', url, body);
        statuses.set(res.status, (statuses.get(res.status) ?? 0) + 1);
        expect(
          res.status,
          `${url} ${body.slice(0, 200)} -> ${res.text.slice(0, 300)}`,
        ).toBeLessThan(500);
        expect(res.status).toBeGreaterThanOrEqual(400);
        if (res.status === 400) expect(res.body.issues.length).toBeGreaterThan(0);
      }),
      { numRuns: 1000, interruptAfterTimeLimit: 15_000 },
    );
    expect(statuses.get(400)).toBeGreaterThan(500);
    expect(await fingerprint()).toBe(before);
  });
});

/** Numbers at and past every boundary a column or timer has, as query text. */
const HOSTILE_NUMBERS = [
  '2147483647',
  '2147483648',
  '4294967296',
  '9007199254740991',
  '9007199254740992',
  '9007199254740993',
  '18446744073709551616',
  '-1',
  '-2147483649',
  '1.5',
  '0.0',
  '1e3',
  '1e21',
  '1e400',
  '-1e400',
  '0x10',
  '0b1',
  'Infinity',
  'NaN',
  ' 1',
  '+1',
  '',
  '1 ',
];

/** NULs and dates no timestamptz holds (or none at all), raw and inside a cursor. */
const cursorOf = (at: unknown, id: unknown) =>
  Buffer.from(JSON.stringify([at, id])).toString('base64url');
const BAD_DATES = ['+275760-09-13', '0000-00-00', '9999999-01-01', '-271821-04-20T00:00:00Z'];
const HOSTILE_STRINGS = [
  '%00',
  'a%00b',
  '%00%00',
  ...BAD_DATES.map(encodeURIComponent),
  ...BAD_DATES.map((d) => cursorOf(d, 'tkt_1')),
  cursorOf('2024-01-01T00:00:00.000Z', 'tkt_\u0000'),
  cursorOf('+275760-09-13T00:00:00.000Z', 'tkt_1'),
  cursorOf(8.64e15, 'tkt_1'),
];

/** Every GET route with its query parameters (`TICKET`/`TASK` stand for live ids). */
const QUERY_ROUTES: [string, string[]][] = [
  ['/tickets', ['state', 'limit', 'cursor']],
  ['/tasks', ['state', 'ticketId', 'limit', 'cursor']],
  ['/tickets/TICKET/events', ['after', 'limit']],
  ['/tasks/TASK/events', ['after', 'limit']],
  ['/dead-letters', ['limit']],
  ['/events/stream', ['after', 'entityId']],
  ['/machines/ticket/mermaid', ['state']],
];

const live = (p: string) => p.replace('TICKET', ticketId).replace('TASK', taskId);

describe('boundaries', () => {
  it('every query parameter takes numbers past 2^31 and 2^53, NULs and impossible dates', async () => {
    const before = await fingerprint();
    const refusedNumbers = new Set<string>();
    for (const [route, params] of QUERY_ROUTES) {
      for (const param of params) {
        for (const value of [...HOSTILE_NUMBERS.map(encodeURIComponent), ...HOSTILE_STRINGS]) {
          const url = `${live(route)}?${param}=${value}`;
          const a = await request('GET', url, {}, 3_000);
          if (!a) continue;
          expectWellFormed(`GET ${url}`, a);
          // A number past what the column holds is refused, never passed on to Postgres.
          if (a.status === 400 && ['after', 'limit'].includes(param)) refusedNumbers.add(value);
        }
      }
    }
    for (const v of ['2147483648', '9007199254740993', '1e400', '-1', '1.5']) {
      expect(refusedNumbers, v).toContain(encodeURIComponent(v));
    }
    const seq = await request('GET', `/tickets/${ticketId}/events?after=2147483648`);
    expect(seq?.status).toBe(400);
    expect(JSON.parse(seq?.text ?? '{}').issues[0].path).toBe('query.after');
    expect(await fingerprint()).toBe(before);
  });

  it('every numeric body field takes numbers past 2^31 and 2^53, negatives and fractions', async () => {
    const before = await fingerprint();
    const numbers = [
      '2147483648',
      '4294967296',
      '9007199254740992',
      '9007199254740993',
      '123456789012345678901234567890',
      '-2147483649',
      '-9007199254740993',
      '1.5',
      '0.000001',
      '1e21',
      '1e400',
      '-1e400',
      '"1"',
      'null',
    ];
    // [path, body with N where the number goes]: each of these is invalid for every N above.
    const fields: [string, string][] = [
      ['/tickets/TICKET/tasks', '{"type":"f","maxAttempts":N}'],
      ['/tickets/TICKET/tasks', '{"type":"f","priority":N}'],
      ['/tickets/TICKET/tasks', '{"type":"f","executor":"sleep","payload":{"ms":N}}'],
      [
        '/tickets/TICKET/tasks',
        '{"type":"f","executor":"shell","payload":{"command":"true","timeoutMs":N}}',
      ],
      ['/tasks/claim', '{"workerId":"w","waitMs":N}'],
      ['/tasks/TASK/events', '{"type":"REQUEUE","maxAttempts":N}'],
      ['/tasks/TASK/events', '{"type":"HEARTBEAT","token":N}'],
      ['/tickets/TICKET/events', '{"type":"BLOCK","reason":N}'],
    ];
    for (const [route, template] of fields) {
      for (const n of numbers) {
        // `null` is a legal "no value" for a few optional fields of other shapes; skip those.
        if (n === 'null' && !template.includes('"ms"')) continue;
        // A string is a valid token or reason: not a number case.
        if (n === '"1"' && /token|reason/.test(template)) continue;
        const body = template.replace('N', n);
        const url = live(route).replace('/TICKET', `/${ticketId}`);
        const a = await request('POST', url, {
          headers: { 'content-type': 'application/json' },
          body,
        });
        if (!a) continue;
        expectWellFormed(`POST ${url} ${body}`, a);
        expect(a.status, `POST ${url} ${body} -> ${a.text}`).toBeGreaterThanOrEqual(400);
      }
    }
    expect(await fingerprint()).toBe(before);
  });

  it('an oversized payload or result is 413 naming the field, in bytes, and changes nothing', async () => {
    const before = await fingerprint();
    const cases: [string, unknown, string][] = [
      [`/tickets/${ticketId}/tasks`, { type: 'f', payload: 'x'.repeat(2_000) }, 'payload'],
      [
        `/tickets/${ticketId}/tasks`,
        { type: 'f', payload: { s: '\u00e9'.repeat(600) } },
        'payload',
      ],
      [`/tickets/${ticketId}/tasks`, { type: 'f', payload: ['\u{1F600}'.repeat(300)] }, 'payload'],
      [
        `/tasks/${taskId}/events`,
        { type: 'COMPLETE', token: 't', result: 'x'.repeat(2_000) },
        'result',
      ],
      [
        `/tasks/${taskId}/events`,
        { type: 'COMPLETE', token: 't', result: { s: '\u20ac'.repeat(400) } },
        'result',
      ],
    ];
    for (const [url, body, field] of cases) {
      const a = await request('POST', url, {
        headers: { 'content-type': 'application/json' },
        body: JSON.stringify(body),
      });
      expect(a).toBeDefined();
      if (!a) continue;
      expectWellFormed(`POST ${url}`, a);
      expect(a.status, `${url} ${field} -> ${a.text}`).toBe(413);
      const parsed = JSON.parse(a.text) as { error: string; message: string };
      expect(parsed.error).toBe('payload_too_large');
      expect(parsed.message).toContain(field);
    }
    expect(await fingerprint()).toBe(before);
  });

  it('HEAD on every route answers, without a 5xx, within a short timeout', async () => {
    const before = await fingerprint();
    const routes = [
      '/',
      '/healthz',
      '/readyz',
      '/metrics',
      '/openapi.json',
      '/machines',
      '/machines/ticket',
      '/machines/ticket/mermaid',
      '/dead-letters',
      '/tickets',
      `/tickets/${ticketId}`,
      `/tickets/${ticketId}/events`,
      `/tickets/${ticketId}/tasks`,
      '/tasks',
      '/tasks/claim',
      `/tasks/${taskId}`,
      `/tasks/${taskId}/events`,
      '/events/stream',
      '/events/stream?after=new',
      '/tickets?limit=2147483648',
      `/tickets/${ticketId}/events?after=2147483648`,
      '/no/such/route',
    ];
    for (const route of routes) {
      const a = await request('HEAD', route, {}, 3_000);
      expect(a, route).toBeDefined();
      if (!a) continue;
      expectWellFormed(`HEAD ${route}`, a);
      expect(a.text, `HEAD ${route}`).toBe('');
    }
    expect(await fingerprint()).toBe(before);
  });
});
