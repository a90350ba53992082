/**
 * What live-stream clients cost the server, on a real port over the real Transport: at most
 * SSE_MAX_CLIENTS streams (503 `unavailable` with Retry-After beyond), all of them on the
 * process's one live feed with its one JetStream consumer, which the server expires on its
 * own if its process dies; a client's slot is free as soon as it hangs up; `HEAD` opens
 * nothing.
 */
import type { AddressInfo } from 'node:net';
import { serve } from '@hono/node-server';
import type { ConsumerInfo } from '@nats-io/jetstream';
import { jetstream } from '@nats-io/jetstream';
import { connect as connectNats, nanos } from '@nats-io/transport-node';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { subscribeEvents } from '../../src/transport/event-feed.js';
import type { Transport } from '../../src/transport/index.js';
import type { TransportNames } from '../../src/transport/subjects.js';
import { createTestApp, type TestApp } from '../support/http-app.js';
import { type SseReader, sseReader } from '../support/sse.js';
import {
  eventually,
  NATS_URL,
  type NatsAdmin,
  natsAdmin,
  startTransport,
  testNames,
} from '../support/transport.js';

const MAX_CLIENTS = 3;
let t: TestApp;
let transport: Transport;
let names: TransportNames;
let admin: NatsAdmin;
let server: ReturnType<typeof serve>;
let base: string;
const open: { abort: AbortController; reader: SseReader | null }[] = [];

beforeAll(async () => {
  names = testNames();
  admin = await natsAdmin();
  t = await createTestApp('http_sse_limits', {
    config: { SSE_MAX_CLIENTS: String(MAX_CLIENTS) },
    services: { sse: { keepAliveMs: 500 } },
  });
  transport = await startTransport(t.db.sql, t.host, names, { reactions: () => [] });
  t.services.events = transport;
  server = serve({ fetch: t.app.fetch, port: 0, hostname: '127.0.0.1' });
  await new Promise<void>((resolve) => server.once('listening', () => resolve()));
  base = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
});
afterEach(async () => {
  for (const c of open.splice(0)) c.abort.abort();
  await eventually(() => transport.liveFeed.stats.clients === 0, 10_000, 'no client left');
});
afterAll(async () => {
  if (server) {
    await new Promise<void>((resolve) => {
      server.close(() => resolve());
      if ('closeAllConnections' in server) server.closeAllConnections();
    });
  }
  await transport?.stop();
  await admin?.close([names]);
  await t?.close();
});

async function consumers(): Promise<ConsumerInfo[]> {
  return admin.jsm.consumers.list(names.stream).next();
}

/** A client of the live stream on the real port: 200 with its `connected` comment read. */
async function connect(): Promise<{ abort: AbortController; reader: SseReader }> {
  const abort = new AbortController();
  const res = await fetch(`${base}/events/stream?after=new`, { signal: abort.signal });
  expect(res.status).toBe(200);
  const reader = sseReader(res);
  const client = { abort, reader };
  open.push(client);
  expect((await reader.next())?.comments).toEqual(['connected']);
  return client;
}

const createTicket = (title: string) =>
  t.host.transact((uow) => t.services.commands.createTicket(uow, { title }));

describe('live stream limits', () => {
  it('HEAD answers the headers of the stream and creates no consumer', async () => {
    const res = await fetch(`${base}/events/stream`, { method: 'HEAD' });
    expect(res.status).toBe(200);
    expect(res.headers.get('content-type')).toContain('text/event-stream');
    // Give a consumer that should not exist the time to appear.
    await new Promise((r) => setTimeout(r, 500));
    expect(await consumers()).toHaveLength(0);
    // A HEAD holds no client slot: all of them are still free.
    for (let i = 0; i < MAX_CLIENTS; i++) await connect();
    expect((await fetch(`${base}/events/stream`, { method: 'HEAD' })).status).toBe(503);
    expect(transport.liveFeed.stats.clients).toBe(MAX_CLIENTS);
  });

  it(`SSE_MAX_CLIENTS=${MAX_CLIENTS}: the next client gets 503 with Retry-After, until one leaves`, async () => {
    const clients = [];
    for (let i = 0; i < MAX_CLIENTS; i++) clients.push(await connect());
    // Every client shares the process's one consumer.
    const held = await consumers();
    expect(held).toHaveLength(1);

    const refused = await fetch(`${base}/events/stream?after=new`);
    expect(refused.status).toBe(503);
    expect(Number(refused.headers.get('retry-after'))).toBeGreaterThan(0);
    const body = (await refused.json()) as { error: string; message: string };
    expect(body.error).toBe('unavailable');
    expect(body.message).toContain('SSE_MAX_CLIENTS');

    // One hangs up: its slot is free at once; the feed and its consumer stay.
    const leaving = clients[0] as { abort: AbortController };
    const hungUpAt = Date.now();
    leaving.abort.abort();
    await eventually(
      () => transport.liveFeed.stats.clients === MAX_CLIENTS - 1,
      1_000,
      'the hung-up client gone from the feed',
    );
    expect(Date.now() - hungUpAt).toBeLessThan(1_000);
    expect((await consumers()).map((c) => c.name)).toEqual(held.map((c) => c.name));

    // There is room again, and every client still receives events.
    const late = await connect();
    const { value } = await createTicket('after a client left');
    for (const c of [...clients.slice(1), late]) {
      let frame = await c.reader.next(5_000);
      while (frame && !frame.id) frame = await c.reader.next(5_000);
      expect(JSON.parse(frame?.data ?? '{}').entityId).toBe(value.id);
    }
  });

  it('the live feed’s consumer stays while it idles', async () => {
    const client = await connect();
    const [consumer] = await consumers();
    const threshold = consumer?.config.inactive_threshold ?? 0;
    expect(threshold).toBeGreaterThan(0);
    expect(threshold).toBeLessThanOrEqual(nanos(5_000));
    // Idle for longer than the threshold: the outstanding pull keeps the consumer alive.
    await new Promise((r) => setTimeout(r, threshold / 1_000_000 + 1_500));
    expect((await consumers()).map((c) => c.name)).toEqual([consumer?.name]);
    const { value } = await createTicket('after idling');
    let frame = await client.reader.next(5_000);
    while (frame && !frame.id) frame = await client.reader.next(5_000);
    expect(JSON.parse(frame?.data ?? '{}').entityId).toBe(value.id);
  });

  it('the consumer of a feed whose process died expires on the server within seconds', async () => {
    // A process of its own, killed before it could delete its consumer.
    const nc = await connectNats({ servers: NATS_URL });
    const before = new Set((await consumers()).map((c) => c.name));
    await subscribeEvents(jetstream(nc), names, 'new', undefined, () => {});
    const orphan = (await consumers()).find((c) => !before.has(c.name));
    expect(orphan).toBeDefined();
    await nc.close();
    const diedAt = Date.now();
    await eventually(
      async () => !(await consumers()).some((c) => c.name === orphan?.name),
      15_000,
      'the orphan expired',
    );
    expect(Date.now() - diedAt).toBeLessThan(10_000);
  });
});
