/**
 * The live feed behind `GET /events/stream`, over real Postgres and NATS: many clients of one
 * process share its one JetStream consumer and each gets every event once, in event-log
 * order; a transaction that commits late is delivered at its position and a rolled-back one
 * is skipped; a client resuming with `Last-Event-ID` while writers keep writing gets exactly
 * what followed, from Postgres then live; a client that stops reading holds up nobody and
 * later reads everything it missed; with NATS down the feed goes on from Postgres.
 */
import { type AddressInfo, createServer, connect as netConnect, type Socket } from 'node:net';
import type { ConsumerInfo } from '@nats-io/jetstream';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ActorHost } from '../../src/actors/host.js';
import type { LiveMessage, Transport } from '../../src/transport/index.js';
import { deleteStreams } from '../../src/transport/streams.js';
import type { TransportNames } from '../../src/transport/subjects.js';
import { createTestApp, type TestApp } from '../support/http-app.js';
import { type SseReader, sseReader } from '../support/sse.js';
import {
  commandsFor,
  eventually,
  type NatsAdmin,
  natsAdmin,
  startTransport,
  testNames,
} from '../support/transport.js';

const BUFFER = 50;
let t: TestApp;
let transport: Transport;
let names: TransportNames;
let admin: NatsAdmin;

beforeAll(async () => {
  names = testNames();
  admin = await natsAdmin();
  t = await createTestApp('sse_live_feed', {
    config: { SSE_MAX_CLIENTS: '500' },
    services: { sse: { keepAliveMs: 60_000, bufferLimit: BUFFER } },
  });
  transport = await startTransport(t.db.sql, t.host, names, { reactions: () => [] });
  t.services.events = transport;
});
afterAll(async () => {
  await transport?.stop();
  await admin?.close([names]);
  await t?.close();
});

const consumers = (): Promise<ConsumerInfo[]> => admin.jsm.consumers.list(names.stream).next();

const createTicket = (title: string) =>
  t.host.transact((uow) => t.services.commands.createTicket(uow, { title }));

/** Every position after `after` in the event log, in order (the truth a client must match). */
async function positionsAfter(after: number): Promise<number[]> {
  const rows = await t.db.sql<{ pos: number }[]>`
    select pos from events where pos > ${after} order by pos`;
  return rows.map((r) => r.pos);
}

async function maxPos(): Promise<number> {
  const rows = await t.db.sql<{ max: number | null }[]>`select max(pos) as max from events`;
  return rows[0]?.max ?? 0;
}

/** Opens a stream and reads its `connected` comment. */
async function open(query = '?after=new', headers: Record<string, string> = {}) {
  const res = await t.app.request(`/events/stream${query}`, { headers });
  expect(res.status).toBe(200);
  const reader = sseReader(res);
  expect((await reader.next())?.comments).toEqual(['connected']);
  return reader;
}

/** Reads event ids until `done(ids)` holds. */
async function readIds(
  r: SseReader,
  done: (ids: number[]) => boolean,
  ids: number[] = [],
): Promise<number[]> {
  while (!done(ids)) {
    const f = await r.next(30_000);
    if (!f) throw new Error(`stream ended after ${ids.length} events`);
    if (f.id) ids.push(Number(f.id));
  }
  return ids;
}

/** `n` tickets from 8 concurrent writers (positions commit out of order). */
async function write(n: number, label: string): Promise<void> {
  let next = 0;
  await Promise.all(
    Array.from({ length: 8 }, async () => {
      while (next < n) {
        const i = next++;
        await createTicket(`${label} ${i}`);
      }
    }),
  );
}

describe('one live feed per process', () => {
  it('200 clients share one JetStream consumer and each gets every event once, in log order', async () => {
    const clients = 200;
    const start = await maxPos();
    const readers = await Promise.all(Array.from({ length: clients }, () => open()));
    expect(transport.liveFeed.stats.clients).toBe(clients);
    expect(await consumers()).toHaveLength(1);

    // A transaction that drew its position first and commits last, and one that rolls back.
    let commitLate!: () => void;
    const gate = new Promise<void>((r) => {
      commitLate = r;
    });
    // On a host of their own: the main host's group commit could put the held transaction
    // in one batch with the writes below, which would then wait for it.
    const side = new ActorHost(t.db.sql, {
      taskDefaults: { maxAttempts: 3, leaseMs: 60_000, retryBaseMs: 100 },
    });
    const late = side.transact(async (uow) => {
      const r = await t.services.commands.createTicket(uow, { title: 'late' });
      await gate;
      return r;
    });
    const rolledBack = side
      .transact(async (uow) => {
        await t.services.commands.createTicket(uow, { title: 'rolled back' });
        throw new Error('roll back');
      })
      .catch(() => 'rolled back');
    await write(60, 'fan-out');
    expect(await rolledBack).toBe('rolled back');
    commitLate();
    await late;
    await write(20, 'after');

    const expected = await positionsAfter(start);
    expect(expected).toHaveLength(81);
    const received = await Promise.all(
      readers.map((r) => readIds(r, (ids) => ids.length >= expected.length)),
    );
    for (const ids of received) expect(ids).toEqual(expected);
    // Still the one consumer, and the feed read each event once for all of them.
    expect(await consumers()).toHaveLength(1);
    await Promise.all(readers.map((r) => r.cancel()));
    await eventually(() => transport.liveFeed.stats.clients === 0, 10_000, 'every client gone');
  });

  it('a client resuming with Last-Event-ID while writers write gets exactly what followed', async () => {
    const start = await maxPos();
    const writing = write(300, 'resume');
    const first = await open(`?after=${start}`);
    const ids = await readIds(first, (got) => got.length >= 40);
    await first.cancel();
    const lastId = ids[ids.length - 1] as number;
    // Away while events keep coming: the feed moves past the client's position.
    await eventually(async () => (await maxPos()) > lastId + 100, 30_000, 'writers moved on');
    const catchUps = transport.liveFeed.stats.catchUps;
    const second = await open('', { 'Last-Event-ID': String(lastId) });
    await writing;
    const expected = await positionsAfter(start);
    await readIds(second, (got) => got.length >= expected.length, ids);
    await second.cancel();
    expect(ids).toEqual(expected);
    // The resume read from Postgres before joining the live feed.
    expect(transport.liveFeed.stats.catchUps).toBeGreaterThan(catchUps);
  });

  it('a client that stops reading delays nobody and later reads what it missed, once', async () => {
    const start = await maxPos();
    const stalled = await open();
    const fast = await open();
    const overflows = transport.liveFeed.stats.overflows;
    const total = BUFFER * 4;
    const fastIds: number[] = [];
    // The fast client gets each event while the stalled one reads nothing.
    for (let i = 0; i < total; i++) {
      await createTicket(`flood ${i}`);
      await readIds(fast, (got) => got.length > i, fastIds);
    }
    expect(fastIds).toEqual(await positionsAfter(start));
    // Its queue reached the bound and was dropped (memory stays bounded)...
    expect(transport.liveFeed.stats.overflows).toBeGreaterThan(overflows);
    // ...and it was not cut off: reading now, it gets every event once, in order.
    const late = await readIds(stalled, (got) => got.length >= total);
    expect(late).toEqual(fastIds);
    await Promise.all([stalled.cancel(), fast.cancel()]);
  });
});

/** A TCP proxy to the NATS server: closing it is NATS going down for whoever connects through it. */
async function natsProxy(port = 0): Promise<{ port: number; close(): Promise<void> }> {
  const sockets = new Set<Socket>();
  const server = createServer((client) => {
    const upstream = netConnect(4222, '127.0.0.1');
    sockets.add(client);
    sockets.add(upstream);
    const drop = () => {
      client.destroy();
      upstream.destroy();
    };
    for (const s of [client, upstream]) {
      s.on('error', drop);
      s.on('close', drop);
    }
    client.pipe(upstream).pipe(client);
  });
  await new Promise<void>((resolve) => server.listen(port, '127.0.0.1', resolve));
  return {
    port: (server.address() as AddressInfo).port,
    close: () =>
      new Promise<void>((resolve) => {
        server.close(() => resolve());
        for (const s of sockets) s.destroy();
      }),
  };
}

describe('the live feed without NATS', () => {
  it('goes on from Postgres while NATS is down, and after it is back', async () => {
    const proxyNames = testNames();
    let proxy = await natsProxy();
    const feedTransport = await startTransport(t.db.sql, t.host, proxyNames, {
      reactions: () => [],
      natsUrl: `nats://127.0.0.1:${proxy.port}`,
      liveFeed: { pollMs: 400 },
    });
    // Another process's writes: nothing wakes this feed but the stream and its poll.
    const other = new ActorHost(t.db.sql, {
      taskDefaults: { maxAttempts: 3, leaseMs: 60_000, retryBaseMs: 100 },
    });
    const otherCommands = commandsFor(other);
    const writeOther = async (n: number) => {
      for (let i = 0; i < n; i++) {
        await other.transact((uow) => otherCommands.createTicket(uow, { title: `other ${i}` }));
      }
    };
    try {
      const start = await maxPos();
      const got: number[] = [];
      const sub = await feedTransport.subscribeEvents(start, undefined, (m: LiveMessage) => {
        got.push(m.position);
      });
      await writeOther(5);
      await eventually(() => got.length === 5, 15_000, 'events with NATS up');
      await proxy.close();
      await writeOther(10);
      await eventually(() => got.length === 15, 15_000, 'events while NATS is down');
      proxy = await natsProxy(proxy.port);
      await writeOther(5);
      await eventually(() => got.length === 20, 15_000, 'events after NATS is back');
      expect(got).toEqual(await positionsAfter(start));
      await sub.close();
    } finally {
      await feedTransport.stop();
      await proxy.close();
      await deleteStreams(admin.jsm, proxyNames);
    }
  });
});
