/** `GET /dead-letters`: what reactions gave up on, with the last error, newest first. */
import { afterAll, beforeAll, expect, it } from 'vitest';
import { insertDeadLetter } from '../../src/persistence/dead-letter-rows.js';
import { createTestApp, type TestApp } from '../support/http-app.js';

let t: TestApp;
beforeAll(async () => {
  t = await createTestApp('dead_letters');
});
afterAll(() => t.close());

it('lists dead letters newest first and validates its limit', async () => {
  expect((await t.call('GET', '/dead-letters')).body).toEqual({ items: [] });
  for (const n of [1, 2, 3]) {
    await insertDeadLetter(t.db.sql, {
      consumer: 'task-state',
      eventId: `00000000-0000-4000-8000-00000000000${n}`,
      subject: 'orch.events.task.x.completed',
      data: { n },
      error: `boom ${n}`,
      deliveries: 5,
    });
  }
  const page = await t.call('GET', '/dead-letters?limit=2');
  expect(page.status).toBe(200);
  expect(page.body.items.map((d: { error: string }) => d.error)).toEqual(['boom 3', 'boom 2']);
  expect(page.body.items[0]).toMatchObject({
    consumer: 'task-state',
    deliveries: 5,
    data: { n: 3 },
  });
  const bad = await t.call('GET', '/dead-letters?limit=0');
  expect(bad.status).toBe(400);
  expect(bad.body.error).toBe('validation_failed');
});
