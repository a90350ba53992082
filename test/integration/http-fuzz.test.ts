/**
 * Guarantee 9 under fuzzing: arbitrary bodies, paths, methods, media types and headers
 * never get a 5xx, never hang, and a refused request changes no stored state (tickets,
 * tasks, events and idempotency keys compared before and after each one).
 */
import fc from 'fast-check';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createTestApp, type TestApp } from '../support/http-app.js';

let t: TestApp;
let ticketId: string;
let taskId: string;

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
  t = await createTestApp('http_fuzz', { config: { BODY_LIMIT_BYTES: '8192' } });
  ticketId = (await t.call('POST', '/tickets', { title: 'fuzz target' })).body.id;
  await t.call('POST', `/tickets/${ticketId}/events`, { type: 'START' });
  taskId = (await t.call('POST', `/tickets/${ticketId}/tasks`, { type: 'fuzz' })).body.id;
});
afterAll(() => t.close());

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
        fc.constantFrom('GET', 'POST', 'POST', 'POST', 'PUT', 'DELETE', 'PATCH'),
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
          const init: RequestInit = { method, headers };
          if (method !== 'GET') init.body = body;
          let url: string;
          try {
            url = new URL(p, 'http://localhost').pathname + new URL(p, 'http://localhost').search;
          } catch {
            return;
          }
          const res = await Promise.race([
            t.app.request(url, init),
            new Promise<never>((_, reject) => setTimeout(() => reject(new Error('hang')), 5000)),
          ]);
          const text = await res.text();
          expect(
            res.status,
            `${method} ${url} ${body.slice(0, 200)} -> ${text.slice(0, 300)}`,
          ).toBeLessThan(500);
          expect(res.headers.get('x-request-id')).toBeTruthy();
          if (res.status >= 400 && res.headers.get('content-type')?.includes('json')) {
            const parsed = JSON.parse(text) as { error: string; message: string };
            expect(typeof parsed.error).toBe('string');
            expect(typeof parsed.message).toBe('string');
          }
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
