/**
 * `GET /events/stream`. First over an in-memory ordered source (frame format, resume,
 * filter, keep-alive, slow-client cut-off), both through `app.request` (Hono's web stream)
 * and through a Node server (the response written directly), then end to end over the real Transport and
 * NATS JetStream: a client that disconnects mid-run and resumes with `Last-Event-ID` gets
 * every one of 500 events once, in order, while they are being produced.
 */
import type { AddressInfo } from 'node:net';
import { serve } from '@hono/node-server';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { EventFeed, EventSource, StreamMessage } from '../../src/http/services.js';
import type { Transport } from '../../src/transport/index.js';
import type { TransportNames } from '../../src/transport/subjects.js';
import { createTestApp, type TestApp } from '../support/http-app.js';
import { sseReader } from '../support/sse.js';
import { eventually, natsAdmin, startTransport, testNames } from '../support/transport.js';

/** An ordered in-memory stream: what the Transport promises, without NATS. */
class MemorySource implements EventSource {
  readonly log: StreamMessage[] = [];
  private readonly subs = new Set<(m: StreamMessage) => void>();
  open = 0;

  push(entityId: string, type: string, data: Record<string, unknown> = {}): void {
    const m: StreamMessage = {
      position: this.log.length + 1,
      entry: {
        seq: 1,
        entityId,
        entityType: 'ticket',
        type,
        data,
        at: new Date().toISOString(),
      },
    };
    this.log.push(m);
    for (const s of this.subs) s(m);
  }

  async subscribeEvents(
    after: number | 'new',
    entityId: string | undefined,
    onMessage: (m: StreamMessage) => void,
  ): Promise<EventFeed> {
    const from = after === 'new' ? this.log.length : after;
    const deliver = (m: StreamMessage) => {
      if (m.position > from && (!entityId || m.entry.entityId === entityId)) onMessage(m);
    };
    for (const m of this.log) deliver(m);
    this.subs.add(deliver);
    this.open++;
    return {
      close: async () => {
        if (this.subs.delete(deliver)) this.open--;
      },
    };
  }
}

const source = new MemorySource();
let t: TestApp;
let server: ReturnType<typeof serve>;
let base: string;

beforeAll(async () => {
  t = await createTestApp('http_sse', {
    services: { events: source, sse: { keepAliveMs: 100, bufferLimit: 20 } },
  });
  server = serve({ fetch: t.app.fetch, port: 0, hostname: '127.0.0.1' });
  await new Promise<void>((resolve) => server.once('listening', () => resolve()));
  base = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
});
afterAll(async () => {
  await new Promise<void>((resolve) => {
    server.close(() => resolve());
    if ('closeAllConnections' in server) server.closeAllConnections();
  });
  await t.close();
});

type Mode = 'app.request' | 'a Node server';

describe.each<Mode>(['app.request', 'a Node server'])(
  'SSE over an ordered source, through %s',
  (mode) => {
    const open = (query = '', headers: Record<string, string> = {}) =>
      mode === 'app.request'
        ? t.app.request(`/events/stream${query}`, { headers })
        : fetch(`${base}/events/stream${query}`, { headers });

    it('frames each event with id, event type and the log entry', async () => {
      // The log holds what earlier tests pushed: this one starts after it.
      const start = source.log.length;
      source.push('tkt_a', 'ticket.created');
      source.push('tkt_b', 'ticket.created');
      const res = await open(`?after=${start}`);
      expect(res.status).toBe(200);
      expect(res.headers.get('content-type')).toContain('text/event-stream');
      expect(res.headers.get('x-request-id')).toBeTruthy();
      const r = sseReader(res);
      expect((await r.next())?.comments).toEqual(['connected']);
      const first = await r.next();
      expect(first).toMatchObject({ id: String(start + 1), event: 'ticket.created' });
      expect(JSON.parse(first?.data ?? '')).toEqual({
        seq: 1,
        entityId: 'tkt_a',
        entityType: 'ticket',
        type: 'ticket.created',
        data: {},
        at: expect.any(String),
      });
      expect((await r.next())?.id).toBe(String(start + 2));
      source.push('tkt_c', 'ticket.created');
      expect((await r.next())?.id).toBe(String(start + 3));
      await r.cancel();
      await eventually(() => source.open === 0, 2_000, 'the feed to close on hang-up');
    });

    it('resumes after Last-Event-ID or ?after=, and filters by entity', async () => {
      const start = source.log.length;
      for (let i = 0; i < 5; i++) source.push(i % 2 ? 'tkt_odd' : 'tkt_even', 'ticket.created');
      const ids = async (res: Response, n: number) => {
        const r = sseReader(res);
        const out: string[] = [];
        while (out.length < n) {
          const f = await r.next();
          if (!f) throw new Error('stream ended early');
          if (f.id) out.push(f.id);
        }
        await r.cancel();
        return out.map(Number);
      };
      expect(await ids(await open('', { 'Last-Event-ID': String(start + 3) }), 2)).toEqual([
        start + 4,
        start + 5,
      ]);
      expect(await ids(await open(`?after=${start + 4}`), 1)).toEqual([start + 5]);
      expect(await ids(await open(`?after=${start}&entityId=tkt_odd`), 2)).toEqual([
        start + 2,
        start + 4,
      ]);
      const bad = await t.call('GET', '/events/stream', undefined, { 'Last-Event-ID': 'abc' });
      expect(bad.status).toBe(400);
      expect(bad.body.issues[0].path).toBe('Last-Event-ID');
      expect((await t.call('GET', '/events/stream?entityId=a%20b')).status).toBe(400);
    });

    it('sends keep-alive comments while idle', async () => {
      const r = sseReader(await open('?after=new'));
      expect((await r.next())?.comments).toEqual(['connected']);
      expect((await r.next(2_000))?.comments).toEqual(['keep-alive']);
      await r.cancel();
    });

    it('disconnects a client that does not read, without holding up the others', async () => {
      const slow = await open('?after=new');
      const fast = sseReader(await open('?after=new'));
      expect((await fast.next())?.comments).toEqual(['connected']);
      const from = source.log.length;
      const got: number[] = [];
      // Over a socket, the kernel's and the client's buffers take a few MiB before the server
      // sees a client that does not read: large events get there within the flood.
      const data = mode === 'app.request' ? {} : { pad: 'x'.repeat(128 * 1024) };
      for (let i = 0; i < 200; i++) {
        source.push('tkt_flood', 'ticket.created', data);
        for (;;) {
          const f = await fast.next();
          if (!f) throw new Error('the fast client was cut off');
          if (f.id) {
            got.push(Number(f.id));
            break;
          }
        }
      }
      expect(got).toEqual(Array.from({ length: 200 }, (_, i) => from + i + 1));
      await fast.cancel();
      // The slow client's stream was cut: reading it now ends after what was buffered.
      const r = sseReader(slow);
      let frames = 0;
      for (;;) {
        // A socket cut off mid-frame ends the read with an error rather than an end.
        const f = await r.next(2_000).catch(() => null);
        if (!f) break;
        if (f.id) frames++;
      }
      expect(frames).toBeLessThan(200);
      await eventually(() => source.open === 0, 2_000, 'every feed closed');
    });

    it('answers 503 unavailable without an event source', async () => {
      const bare = await createTestApp('http_sse_bare', { db: t.db });
      const r = await bare.call('GET', '/events/stream');
      expect(r.status).toBe(503);
      expect(r.body.error).toBe('unavailable');
      await bare.close();
    });
  },
);

describe('SSE over the real Transport', () => {
  let names: TransportNames;
  let transport: Transport;
  let live: TestApp;
  const admin = natsAdmin();

  beforeAll(async () => {
    names = testNames();
    live = await createTestApp('http_sse_nats');
    transport = await startTransport(live.db.sql, live.host, names, { reactions: () => [] });
    // The stream route reads its source per request.
    live.services.events = transport;
  });
  afterAll(async () => {
    await transport?.stop();
    await live?.close();
    await (await admin).close([names]);
  });

  it('a client that hangs up and resumes with Last-Event-ID gets 500 events once, in order', async () => {
    const total = 500;
    const produced: string[] = [];
    const producing = (async () => {
      for (let i = 0; i < total; i += 10) {
        const batch = await Promise.all(
          Array.from({ length: 10 }, (_, j) =>
            live.host.transact((uow) =>
              live.services.commands.createTicket(uow, { title: `sse ${i + j}` }),
            ),
          ),
        );
        produced.push(...batch.map((b) => b.value.id));
        await new Promise((r) => setTimeout(r, 5));
      }
    })();

    const received: { id: number; entityId: string }[] = [];
    const readUntil = async (res: Response, stop: () => boolean) => {
      const r = sseReader(res);
      while (!stop()) {
        const f = await r.next(15_000);
        if (!f) break;
        if (f.id && f.data) {
          received.push({ id: Number(f.id), entityId: JSON.parse(f.data).entityId });
        }
      }
      await r.cancel();
    };
    await readUntil(await live.app.request('/events/stream'), () => received.length >= 120);
    const lastId = received[received.length - 1]?.id;
    // The hang-up happened mid-run: the rest was produced while the client was away.
    expect(produced.length).toBeLessThan(total);
    // Away for a while: events keep coming.
    await new Promise((r) => setTimeout(r, 300));
    await readUntil(
      await live.app.request('/events/stream', { headers: { 'Last-Event-ID': String(lastId) } }),
      () => received.length >= total,
    );
    await producing;

    const ids = received.map((e) => e.id);
    expect(ids).toEqual(Array.from({ length: total }, (_, i) => i + 1));
    expect(new Set(received.map((e) => e.entityId))).toEqual(new Set(produced));
  });
});
