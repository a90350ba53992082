/**
 * Idempotency keys belong to the credential that presented them: a replay needs the same
 * credential, another one (a rotated API_TOKEN over the same database) gets a fresh request
 * and never the first response (a claim's fencing token). Without auth every request shares
 * the `anonymous` scope: same key and body replay, another body is a conflict.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createTestApp, type TestApp } from '../support/http-app.js';

let first: TestApp;
let rotated: TestApp;
let open: TestApp;
const ONE = { authorization: 'Bearer token-one' };
const TWO = { authorization: 'Bearer token-two' };

beforeAll(async () => {
  first = await createTestApp('http_idem_scope', { config: { API_TOKEN: 'token-one' } });
  // The same database after a token rotation: the server restarted with another API_TOKEN.
  rotated = await createTestApp('http_idem_scope', {
    db: first.db,
    config: { API_TOKEN: 'token-two' },
  });
  open = await createTestApp('http_idem_scope', { db: first.db });
});
afterAll(async () => {
  await rotated?.close();
  await open?.close();
  await first?.close();
});

describe('idempotency keys are scoped by credential', () => {
  it("another credential's key is a fresh claim, never the first one's token", async () => {
    const ticket = (await first.call('POST', '/tickets', { title: 'scoped' }, ONE)).body;
    for (let i = 0; i < 2; i++) {
      const task = await first.call('POST', `/tickets/${ticket.id}/tasks`, { type: 'scoped' }, ONE);
      expect(task.status).toBe(201);
    }
    const body = { workerId: 'agent', types: ['scoped'] };
    const key = { 'Idempotency-Key': 'claim-1' };

    const claimed = await first.call('POST', '/tasks/claim', body, { ...ONE, ...key });
    expect(claimed.status).toBe(200);
    const replay = await first.call('POST', '/tasks/claim', body, { ...ONE, ...key });
    expect(replay.text).toBe(claimed.text);

    const other = await rotated.call('POST', '/tasks/claim', body, { ...TWO, ...key });
    expect(other.status).toBe(200);
    expect(other.body.token).not.toBe(claimed.body.token);
    expect(other.body.task.id).not.toBe(claimed.body.task.id);
    // The second credential replays its own response, not the first one's.
    const otherReplay = await rotated.call('POST', '/tasks/claim', body, { ...TWO, ...key });
    expect(otherReplay.body).toEqual(other.body);

    // Without a credential (auth off), the key is again someone else's: nothing to replay.
    const anonymous = await open.call('POST', '/tasks/claim', body, key);
    expect(anonymous.status).toBe(204);
  });

  it("the same key with another body under another credential is not the first's conflict", async () => {
    const key = { 'Idempotency-Key': 'ticket-1' };
    const a = await first.call('POST', '/tickets', { title: 'a' }, { ...ONE, ...key });
    const b = await rotated.call('POST', '/tickets', { title: 'b' }, { ...TWO, ...key });
    expect([a.status, b.status]).toEqual([201, 201]);
    expect(b.body.id).not.toBe(a.body.id);
    expect(b.body.title).toBe('b');
    const rows = await first.db.sql<{ scope: string }[]>`
      select scope from idempotency_keys where key = 'ticket-1' order by scope`;
    expect(rows).toHaveLength(2);
    // Storage holds a digest of the token, never the token.
    for (const r of rows) {
      expect(r.scope).toMatch(/^bearer:[0-9a-f]{64}$/);
      expect(r.scope).not.toContain('token-');
    }
  });

  it('without auth, the same key and body replay and another body is a conflict', async () => {
    const key = { 'Idempotency-Key': 'open-1' };
    const created = await open.call('POST', '/tickets', { title: 'open' }, key);
    expect(created.status).toBe(201);
    // A bearer header that auth does not check changes nothing: the scope is `anonymous`.
    const again = await open.call('POST', '/tickets', { title: 'open' }, { ...key, ...ONE });
    expect(again.status).toBe(201);
    // The first answer as it was sent, byte for byte: members in their order too.
    expect(again.text).toBe(created.text);
    const count = await open.db.sql<{ n: number }[]>`
      select count(*)::int as n from tickets where title = 'open'`;
    expect(count[0]?.n).toBe(1);
    const other = await open.call('POST', '/tickets', { title: 'not open' }, key);
    expect(other.status).toBe(409);
    expect(other.body.error).toBe('conflict');
  });
});
