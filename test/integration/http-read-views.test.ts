/**
 * Read answers stay small however large the tasks: `GET /tickets/:id` carries a bounded
 * first page of task summaries and a cursor to the rest, lists never carry a task's payload
 * or result, `limit` is bounded, and paging returns every task exactly once in a stable
 * order. `GET /tasks/:id` still returns the whole task.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createTestApp, type Reply, type TestApp } from '../support/http-app.js';
import { openApiChecker } from '../support/openapi.js';

let t: TestApp;
let check: ReturnType<typeof openApiChecker>;
let ticketId: string;
const created: string[] = [];
const TASKS = 230;
const BLOB = 'p'.repeat(50_000);
const RESULT = 'r'.repeat(50_000);

async function call(path: string, template: string): Promise<Reply> {
  const r = await t.call('GET', path);
  check('GET', template, r.status, r.body);
  return r;
}

const bytes = (r: Reply) => Buffer.byteLength(r.text);

beforeAll(async () => {
  t = await createTestApp('http_read_views');
  check = openApiChecker((await t.call('GET', '/openapi.json')).body);
  ticketId = (await t.call('POST', '/tickets', { title: 'many big tasks' })).body.id;
  await t.call('POST', `/tickets/${ticketId}/events`, { type: 'START' });
  for (let i = 0; i < TASKS; i++) {
    const r = await t.call('POST', `/tickets/${ticketId}/tasks`, {
      type: 'big',
      payload: { i, blob: BLOB },
    });
    expect(r.status).toBe(201);
    created.push(r.body.id);
  }
  // A few finish with large results too.
  for (let i = 0; i < 3; i++) {
    const claim = await t.call('POST', '/tasks/claim', { workerId: 'w', types: ['big'] });
    const { task, token } = claim.body;
    await t.call('POST', `/tasks/${task.id}/events`, { type: 'START', token });
    const done = await t.call('POST', `/tasks/${task.id}/events`, {
      type: 'COMPLETE',
      token,
      result: { blob: RESULT },
    });
    expect(done.body.state).toBe('completed');
  }
}, 120_000);
afterAll(() => t.close());

interface Item {
  id: string;
  createdAt: string;
}
/** The keyset order, (created_at, id), as Postgres sorts it (ids by its collation). */
async function ordered(ticket: string): Promise<string[]> {
  const rows = await t.db.sql<{ id: string }[]>`
    select id from tasks where ticket_id = ${ticket} order by created_at, id`;
  return rows.map((r) => r.id);
}

/** Follows `tasksNext` through GET /tickets/:id/tasks; returns the items in order. */
async function allTicketTasks(limit: number): Promise<Item[]> {
  const first = await call(`/tickets/${ticketId}`, '/tickets/{id}');
  const items: Item[] = [...first.body.tasks];
  let cursor: string | null = first.body.tasksNext;
  while (cursor) {
    const page = await call(
      `/tickets/${ticketId}/tasks?limit=${limit}&cursor=${encodeURIComponent(cursor)}`,
      '/tickets/{id}/tasks',
    );
    expect(page.body.items.length).toBeLessThanOrEqual(limit);
    items.push(...page.body.items);
    cursor = page.body.nextCursor;
  }
  return items;
}

describe('a ticket with many large tasks', () => {
  it('GET /tickets/:id is a bounded first page of summaries with a cursor', async () => {
    const r = await call(`/tickets/${ticketId}`, '/tickets/{id}');
    expect(r.status).toBe(200);
    expect(bytes(r)).toBeLessThan(128 * 1024);
    expect(r.body.tasks).toHaveLength(100);
    expect(r.body.tasksNext).toEqual(expect.any(String));
    expect(r.body.allowedEvents).toContain('CANCEL');
    for (const task of r.body.tasks) {
      expect(task).not.toHaveProperty('payload');
      expect(task).not.toHaveProperty('result');
      expect(task).toMatchObject({ ticketId, type: 'big', allowedEvents: expect.any(Array) });
    }
  });

  it('paging its tasks returns every task exactly once, oldest first, stably', async () => {
    const items = await allTicketTasks(37);
    const ids = items.map((x) => x.id);
    expect(ids).toHaveLength(TASKS);
    expect(new Set(ids)).toEqual(new Set(created));
    expect(ids).toEqual(await ordered(ticketId));
    const again = await allTicketTasks(200);
    expect(again.map((x) => x.id)).toEqual(ids);
  });

  it('GET /tasks pages summaries only, within the limit, each task once', async () => {
    const r = await call('/tasks?limit=200', '/tasks');
    expect(r.body.items).toHaveLength(200);
    expect(bytes(r)).toBeLessThan(256 * 1024);
    for (const item of r.body.items) {
      expect(item).not.toHaveProperty('payload');
      expect(item).not.toHaveProperty('result');
    }
    const seen: Item[] = [];
    let cursor: string | null = null;
    do {
      const q: string = `/tasks?ticketId=${ticketId}&limit=64${cursor ? `&cursor=${encodeURIComponent(cursor)}` : ''}`;
      const page = await call(q, '/tasks');
      expect(bytes(page)).toBeLessThan(96 * 1024);
      seen.push(...page.body.items);
      cursor = page.body.nextCursor;
    } while (cursor);
    expect(seen.map((x) => x.id).sort()).toEqual([...created].sort());
    expect(seen.map((x) => x.id)).toEqual((await ordered(ticketId)).reverse());
    const completed = await call(`/tasks?state=completed&ticketId=${ticketId}`, '/tasks');
    expect(completed.body.items).toHaveLength(3);
    expect(completed.text).not.toContain(RESULT.slice(0, 100));
  });

  it('GET /tasks/:id still returns the whole task', async () => {
    const done = await call(`/tasks?state=completed&ticketId=${ticketId}&limit=1`, '/tasks');
    const full = await call(`/tasks/${done.body.items[0].id}`, '/tasks/{id}');
    expect(full.body.result).toEqual({ blob: RESULT });
    expect(full.body.payload).toMatchObject({ blob: BLOB });
  });

  it('pages tasks created in one transaction (one createdAt) one at a time', async () => {
    const tie = (await t.call('POST', '/tickets', { title: 'ties' })).body.id as string;
    await t.call('POST', `/tickets/${tie}/events`, { type: 'START' });
    const { value: made } = await t.host.transact(async (uow) => {
      const ids: string[] = [];
      for (let i = 0; i < 7; i++) {
        ids.push((await t.services.commands.addTask(uow, tie, { type: 'tie' })).id);
      }
      return ids;
    });
    const seen: Item[] = [];
    let cursor: string | null = null;
    do {
      const q: string = `/tickets/${tie}/tasks?limit=1${cursor ? `&cursor=${encodeURIComponent(cursor)}` : ''}`;
      const page = await call(q, '/tickets/{id}/tasks');
      expect(page.body.items.length).toBeLessThanOrEqual(1);
      seen.push(...page.body.items);
      cursor = page.body.nextCursor;
    } while (cursor);
    expect(new Set(seen.map((x) => x.createdAt)).size).toBe(1);
    expect(seen.map((x) => x.id).sort()).toEqual([...made].sort());
    expect(seen.map((x) => x.id)).toEqual(await ordered(tie));
  });

  it('bounds limit, refuses foreign cursors and unknown tickets', async () => {
    for (const path of [
      '/tasks?limit=201',
      '/tickets?limit=201',
      `/tickets/${ticketId}/tasks?limit=201`,
      `/tickets/${ticketId}/tasks?limit=0`,
      `/tickets/${ticketId}/tasks?cursor=nonsense`,
      `/tickets/${ticketId}/tasks?other=1`,
    ]) {
      const r = await t.call('GET', path);
      expect(r.status, path).toBe(400);
      expect(r.body.error).toBe('validation_failed');
    }
    const missing = await call('/tickets/tkt_nope/tasks', '/tickets/{id}/tasks');
    expect(missing.status).toBe(404);
  });
});
