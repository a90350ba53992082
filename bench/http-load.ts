/**
 * The HTTP bench's client, in a process of its own so that the server's event loop does
 * only server work. Driven over IPC by http.ts:
 * - `load`: closed-loop requests (node:http, keep-alive) at a concurrency for some seconds.
 * - `sse-open` / `sse-open-node` / `feed-open`: N SSE clients of GET /events/stream (fetch,
 *   or node:http with a lighter parse), or N ordered JetStream
 *   consumers through the same feed function the route uses (the baseline without HTTP).
 *   Each event is keyed `entityId:seq`; when every client has it, the child reports the
 *   wall-clock time (ms, sub-ms precision) at which the last one got it.
 * - `close`: ends the clients.
 */
import http from 'node:http';
import net from 'node:net';
import { jetstream } from '@nats-io/jetstream';
import { connect, type NatsConnection } from '@nats-io/transport-node';
import { subscribeEvents } from '../src/transport/event-feed.js';
import type { TransportNames } from '../src/transport/subjects.js';
import { summarize } from './stats.js';

type Msg =
  | {
      type: 'load';
      url: string;
      method: 'GET' | 'POST';
      paths: string[];
      bodies?: string[];
      concurrency: number;
      seconds: number;
      /** `raw`: HTTP/1.1 written to and parsed from the socket by hand, as wrk does. */
      client?: 'node' | 'raw';
    }
  | { type: 'sse-open'; url: string; clients: number }
  | { type: 'sse-open-node'; url: string; clients: number }
  | { type: 'feed-open'; natsUrl: string; names: TransportNames; clients: number }
  | { type: 'close' };

const send = (m: object) => process.send?.(m);
const wallNow = () => performance.timeOrigin + performance.now();

let closers: (() => Promise<void>)[] = [];
let clientCount = 0;
const got = new Map<string, number>();

function arrived(key: string): void {
  const n = (got.get(key) ?? 0) + 1;
  got.set(key, n);
  if (n === clientCount) {
    got.delete(key);
    send({ type: 'all', key, at: wallNow() });
  }
}

/**
 * Closed-loop requests through node:http with a keep-alive agent (one socket per loop), as
 * wrk or autocannon would send them: fetch (undici) spends several times the CPU per request
 * in this process, and on a small machine that CPU is taken from the server being measured.
 * The client's own CPU per request is reported beside the figures.
 */
async function load(m: Extract<Msg, { type: 'load' }>): Promise<void> {
  if (m.client === 'raw') return rawLoad(m);
  const samples: number[] = [];
  let errors = 0;
  const agent = new http.Agent({ keepAlive: true, maxSockets: m.concurrency });
  const request = (path: string, body: string | undefined) =>
    new Promise<number>((resolve, reject) => {
      const req = http.request(
        `${m.url}${path}`,
        {
          method: m.method,
          agent,
          headers:
            body !== undefined
              ? { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) }
              : {},
        },
        (res) => {
          res.on('data', () => {});
          res.on('end', () => resolve(res.statusCode ?? 0));
          res.on('error', reject);
        },
      );
      req.on('error', reject);
      req.end(body);
    });
  const cpu = process.cpuUsage();
  const end = Date.now() + m.seconds * 1000;
  const started = performance.now();
  await Promise.all(
    Array.from({ length: m.concurrency }, async (_, w) => {
      const path = m.paths[w % m.paths.length] as string;
      const body = m.bodies?.[w % m.bodies.length];
      while (Date.now() < end) {
        const t0 = performance.now();
        const status = await request(path, body);
        samples.push(performance.now() - t0);
        if (status >= 300) errors++;
      }
    }),
  );
  const used = process.cpuUsage(cpu);
  agent.destroy();
  send({
    type: 'loaded',
    ...summarize(samples, (performance.now() - started) / 1000),
    errors,
    clientCpuUs: (used.user + used.system) / Math.max(1, samples.length),
  });
}

/**
 * The same closed loops on raw keep-alive sockets: each request is written as bytes prepared
 * once, and an answer is read only as far as its status, Content-Length and body. This is
 * how wrk spends a tenth of node:http's CPU per request; on a 2-core machine the client's
 * CPU is taken from the server, so this figure is the closer one to a server whose clients
 * run elsewhere.
 */
async function rawLoad(m: Extract<Msg, { type: 'load' }>): Promise<void> {
  const samples: number[] = [];
  let errors = 0;
  const target = new URL(m.url);
  const port = Number(target.port);
  const requestBytes = (path: string, body: string | undefined) =>
    Buffer.from(
      `${m.method} ${path} HTTP/1.1\r\nHost: ${target.host}\r\n` +
        (body !== undefined
          ? `Content-Type: application/json\r\nContent-Length: ${Buffer.byteLength(body)}\r\n\r\n${body}`
          : '\r\n'),
    );
  const cpu = process.cpuUsage();
  const end = Date.now() + m.seconds * 1000;
  const started = performance.now();
  await Promise.all(
    Array.from({ length: m.concurrency }, (_, w) => {
      const path = m.paths[w % m.paths.length] as string;
      const bytes = requestBytes(path, m.bodies?.[w % m.bodies.length]);
      return new Promise<void>((resolve, reject) => {
        const socket = net.connect(port, target.hostname);
        socket.setNoDelay(true);
        let buffer: Buffer = Buffer.alloc(0);
        let t0 = 0;
        const ask = () => {
          t0 = performance.now();
          socket.write(bytes);
        };
        socket.on('connect', ask);
        socket.on('error', reject);
        socket.on('close', () => resolve());
        socket.on('data', (chunk: Buffer) => {
          buffer = buffer.length === 0 ? chunk : Buffer.concat([buffer, chunk]);
          for (;;) {
            const head = buffer.indexOf('\r\n\r\n');
            if (head < 0) return;
            const headers = buffer.toString('latin1', 0, head);
            const length = Number(/\r\ncontent-length:\s*(\d+)/i.exec(headers)?.[1] ?? 0);
            if (buffer.length < head + 4 + length) return;
            const status = Number(headers.slice(9, 12));
            buffer = buffer.subarray(head + 4 + length);
            samples.push(performance.now() - t0);
            if (!(status >= 200 && status < 300)) errors++;
            if (Date.now() < end) ask();
            else socket.end();
          }
        });
      });
    }),
  );
  const used = process.cpuUsage(cpu);
  send({
    type: 'loaded',
    ...summarize(samples, (performance.now() - started) / 1000),
    errors,
    clientCpuUs: (used.user + used.system) / Math.max(1, samples.length),
  });
}

async function openSse(url: string, clients: number): Promise<void> {
  clientCount = clients;
  let ready = 0;
  await new Promise<void>((resolve, reject) => {
    for (let c = 0; c < clients; c++) {
      const abort = new AbortController();
      closers.push(async () => abort.abort());
      void (async () => {
        const res = await fetch(`${url}/events/stream?after=new`, {
          headers: { accept: 'text/event-stream' },
          signal: abort.signal,
        });
        if (!res.ok || !res.body) throw new Error(`SSE answered ${res.status}`);
        const reader = res.body.getReader();
        const decoder = new TextDecoder();
        let buffer = '';
        for (;;) {
          const { value, done } = await reader.read();
          if (done) return;
          buffer += decoder.decode(value, { stream: true });
          let cut = buffer.indexOf('\n\n');
          while (cut >= 0) {
            const block = buffer.slice(0, cut);
            buffer = buffer.slice(cut + 2);
            cut = buffer.indexOf('\n\n');
            if (block.startsWith(': connected')) {
              if (++ready === clients) resolve();
              continue;
            }
            const data = block.split('\n').find((l) => l.startsWith('data:'));
            if (!data) continue;
            const e = JSON.parse(data.slice(5)) as { entityId: string; seq: number };
            arrived(`${e.entityId}:${e.seq}`);
          }
        }
      })().catch((error: unknown) => {
        if (!abort.signal.aborted) reject(error);
      });
    }
  });
}

/**
 * The same clients over node:http (no fetch, no web streams), each frame keyed by a regular
 * expression instead of JSON.parse: at 1,000 clients the client process's own parsing would
 * otherwise be most of what is measured.
 */
async function openSseNode(url: string, clients: number): Promise<void> {
  clientCount = clients;
  const agent = new http.Agent({ keepAlive: false, maxSockets: Number.POSITIVE_INFINITY });
  let ready = 0;
  const key = /"seq":(\d+),"entityId":"([^"]+)"/;
  await new Promise<void>((resolve, reject) => {
    for (let c = 0; c < clients; c++) {
      const req = http.get(
        `${url}/events/stream?after=new`,
        { agent, headers: { accept: 'text/event-stream' } },
        (res) => {
          if (res.statusCode !== 200) {
            reject(new Error(`SSE answered ${res.statusCode}`));
            return;
          }
          res.setEncoding('utf8');
          let buffer = '';
          res.on('data', (chunk: string) => {
            buffer += chunk;
            let cut = buffer.indexOf('\n\n');
            while (cut >= 0) {
              const block = buffer.slice(0, cut);
              buffer = buffer.slice(cut + 2);
              cut = buffer.indexOf('\n\n');
              if (block.startsWith(': connected')) {
                if (++ready === clients) resolve();
                continue;
              }
              const m = key.exec(block);
              if (m) arrived(`${m[2]}:${m[1]}`);
            }
          });
        },
      );
      req.on('error', (error) => {
        if (!req.destroyed) reject(error);
      });
      closers.push(async () => {
        req.destroy();
      });
    }
  });
}

let nc: NatsConnection | null = null;

async function openFeeds(natsUrl: string, names: TransportNames, clients: number): Promise<void> {
  clientCount = clients;
  nc ??= await connect({ servers: natsUrl });
  const js = jetstream(nc);
  for (let c = 0; c < clients; c++) {
    const sub = await subscribeEvents(js, names, 'new', undefined, (m) => {
      arrived(`${m.entry.entityId}:${m.entry.seq}`);
    });
    closers.push(() => sub.close());
  }
}

process.on('message', (m: Msg) => {
  void (async () => {
    if (m.type === 'load') await load(m);
    if (m.type === 'sse-open') {
      await openSse(m.url, m.clients);
      send({ type: 'ready' });
    }
    if (m.type === 'sse-open-node') {
      await openSseNode(m.url, m.clients);
      send({ type: 'ready' });
    }
    if (m.type === 'feed-open') {
      await openFeeds(m.natsUrl, m.names, m.clients);
      send({ type: 'ready' });
    }
    if (m.type === 'close') {
      await Promise.all(closers.map((c) => c().catch(() => {})));
      closers = [];
      got.clear();
      send({ type: 'closed' });
    }
  })().catch((error: unknown) => {
    process.stderr.write(`http-load: ${String(error)}\n`);
    process.exit(1);
  });
});
process.on('disconnect', () => {
  void nc?.close();
  process.exit(0);
});
