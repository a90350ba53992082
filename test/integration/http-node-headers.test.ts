/**
 * The headers the app reads and writes on Node's own request and response (src/http/
 * node-io.ts), through the real server on a real port with raw sockets, so every byte the
 * client sends and gets is the test's: the request id on every kind of answer (the route's,
 * the error mapping's, the 404's, the auth refusal's), a given id echoed and a bad one
 * replaced, `Connection: close` when a body is left unread, and the bearer token read from
 * Node's parsed headers.
 */
import { randomUUID } from 'node:crypto';
import type { Server } from 'node:http';
import net, { type AddressInfo } from 'node:net';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startHttpServer } from '../../src/http/server.js';
import { createTestApp, type TestApp } from '../support/http-app.js';

const TOKEN = 'node-headers-token';
let t: TestApp;
let server: Server;
let port: number;

interface RawReply {
  status: number;
  headers: Record<string, string>;
  body: string;
  /** The server closed the connection after this answer. */
  closed: boolean;
}

/**
 * One request on a fresh connection, exactly as written; the first answer, parsed. With
 * `watchClose`, waits up to a second for the server to close the connection after it.
 */
function raw(request: string, watchClose = false): Promise<RawReply> {
  return new Promise((resolve, reject) => {
    const socket = net.connect(port, '127.0.0.1');
    let buffer = Buffer.alloc(0);
    let reply: Omit<RawReply, 'closed'> | null = null;
    const timer = setTimeout(() => {
      socket.destroy();
      if (reply) resolve({ ...reply, closed: false });
      else reject(new Error(`no answer to ${request.split('\r\n')[0]}`));
    }, 1_000);
    socket.on('error', reject);
    socket.on('data', (chunk) => {
      buffer = Buffer.concat([buffer, chunk]);
      if (reply) return;
      const head = buffer.indexOf('\r\n\r\n');
      if (head < 0) return;
      const lines = buffer.toString('latin1', 0, head).split('\r\n');
      const headers: Record<string, string> = {};
      for (const line of lines.slice(1)) {
        const i = line.indexOf(':');
        headers[line.slice(0, i).toLowerCase()] = line.slice(i + 1).trim();
      }
      const length = Number(headers['content-length'] ?? 0);
      if (buffer.length < head + 4 + length) return;
      reply = {
        status: Number(lines[0]?.split(' ')[1]),
        headers,
        body: buffer.toString('utf8', head + 4, head + 4 + length),
      };
      if (!watchClose) {
        clearTimeout(timer);
        socket.destroy();
        resolve({ ...reply, closed: false });
      }
    });
    socket.on('close', () => {
      clearTimeout(timer);
      if (reply) resolve({ ...reply, closed: true });
      else reject(new Error('closed before an answer'));
    });
    socket.write(request);
  });
}

const get = (path: string, extra = '') =>
  raw(`GET ${path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${TOKEN}\r\n${extra}\r\n`);
const post = (path: string, body: string, extra = '') =>
  raw(
    `POST ${path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${TOKEN}\r\n` +
      `Content-Type: application/json\r\nContent-Length: ${Buffer.byteLength(body)}\r\n${extra}\r\n${body}`,
  );

beforeAll(async () => {
  t = await createTestApp('http_node_headers', { config: { API_TOKEN: TOKEN } });
  server = startHttpServer(t.app.fetch, { port: 0, hostname: '127.0.0.1' });
  await new Promise<void>((resolve) => server.once('listening', () => resolve()));
  port = (server.address() as AddressInfo).port;
});
afterAll(async () => {
  await new Promise<void>((resolve) => {
    server?.close(() => resolve());
    server?.closeAllConnections();
  });
  await t?.close();
});

describe('headers on Node', () => {
  it('puts a request id on every kind of answer and echoes a well-formed given one', async () => {
    const created = await post('/tickets', JSON.stringify({ title: 'headers' }));
    expect(created.status).toBe(201);
    const ticket = JSON.parse(created.body) as { id: string };
    const answers = [
      created,
      await get('/healthz'),
      await get(`/tickets/${ticket.id}`),
      // The error mapping: an event the ticket's state does not take.
      await post(`/tickets/${ticket.id}/events`, JSON.stringify({ type: 'ADVANCE' })),
      // Validation, and the 404 fallback.
      await post('/tickets', JSON.stringify({ title: 7 })),
      await get('/no/such/route'),
      // The auth refusal, thrown before any route.
      await raw('GET /tickets HTTP/1.1\r\nHost: x\r\n\r\n'),
    ];
    expect(answers.map((a) => a.status)).toEqual([201, 200, 200, 409, 400, 404, 401]);
    for (const a of answers) {
      expect(a.headers['x-request-id']).toMatch(/^[0-9a-f-]{36}$/);
      expect(a.headers['content-type']).toMatch(/^application\/json/);
    }
    expect(new Set(answers.map((a) => a.headers['x-request-id'])).size).toBe(answers.length);
    expect(answers[3]?.body).toContain('illegal_transition');
    expect(answers[6]?.headers['www-authenticate']).toBe('Bearer');

    const given = await get(`/tickets/${ticket.id}`, 'X-Request-Id: trace-42.a:b\r\n');
    expect(given.headers['x-request-id']).toBe('trace-42.a:b');
    const refused = await raw('GET /tickets HTTP/1.1\r\nHost: x\r\nX-Request-Id: mine-1\r\n\r\n');
    expect(refused.status).toBe(401);
    expect(refused.headers['x-request-id']).toBe('mine-1');
    // Not an id: spaces, or two of them (Node joins a repeated header with a comma).
    for (const extra of ['X-Request-Id: a b\r\n', 'X-Request-Id: a\r\nX-Request-Id: b\r\n']) {
      const r = await get('/healthz', extra);
      expect(r.headers['x-request-id']).toMatch(/^[0-9a-f-]{36}$/);
    }
  });

  it('reads the bearer token, media type and idempotency key from the request', async () => {
    const wrong = await raw(
      `GET /tickets HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${TOKEN}x\r\n\r\n`,
    );
    expect(wrong.status).toBe(401);
    expect((await get('/tickets')).status).toBe(200);

    const text = await raw(
      `POST /tickets HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${TOKEN}\r\n` +
        'Content-Type: text/plain\r\nContent-Length: 2\r\n\r\n{}',
    );
    expect(text.status).toBe(415);

    const key = `k-${randomUUID()}`;
    const body = JSON.stringify({ title: 'once' });
    const first = await post('/tickets', body, `Idempotency-Key: ${key}\r\n`);
    const again = await post('/tickets', body, `Idempotency-Key: ${key}\r\n`);
    expect(first.status).toBe(201);
    expect(again.status).toBe(201);
    expect(JSON.parse(again.body).id).toBe(JSON.parse(first.body).id);
    const bad = await post('/tickets', body, 'Idempotency-Key: has space\r\n');
    expect(bad.status).toBe(400);
  });

  it('closes the connection when an answer leaves the body unread, and only then', async () => {
    // A route that does not take a body: the 404 answers before reading it.
    const unread = await raw(
      `POST /no/such/route HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${TOKEN}\r\n` +
        `Content-Type: application/json\r\nContent-Length: 5000\r\n\r\n${'x'.repeat(100)}`,
      true,
    );
    expect(unread.status).toBe(404);
    expect(unread.headers.connection).toBe('close');
    expect(unread.closed).toBe(true);
    expect(unread.headers['x-request-id']).toMatch(/^[0-9a-f-]{36}$/);

    const body = JSON.stringify({ title: 'kept alive' });
    const read = await raw(
      `POST /tickets HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${TOKEN}\r\n` +
        `Content-Type: application/json\r\nContent-Length: ${body.length}\r\n\r\n${body}`,
      true,
    );
    expect(read.status).toBe(201);
    expect(read.headers.connection).toBe('keep-alive');
    expect(read.closed).toBe(false);
  });
});
