/**
 * Issue 6: the HTTP layer's cost. The app is the real one (createApp over a real host,
 * commands, claims and queries, as src/runtime.ts composes it), served on port 0 by the
 * server `bin/orchestrator` runs (src/http/server.ts); the load comes from a child process (http-load.ts) with fetch and
 * keep-alive, so the server's event loop does only server work.
 *
 * - GET /healthz: the floor of an HTTP round trip on this machine.
 * - GET /tasks/:id beside the same `queries.getTask` called in-process.
 * - POST /tasks/:id/events {HEARTBEAT, token} beside the same call the route makes
 *   in-process (`host.idempotent` in the task's mailbox, `commands.sendPublic` its unit's last
 *   statement): what HTTP adds to a transition. Beside it, the same call behind a bare
 *   node:http handler (`listenBare`): the part of that cost any Node HTTP server pays here.
 *   The unmailboxed call earlier sections compared with (`host.transact` + `sendPublic`,
 *   whose units run in turn in a shared transaction) is printed for reference.
 * - SSE fan-out: N clients on GET /events/stream; per event, commit → the last client got
 *   it; a burst's deliveries/s. Beside N ordered JetStream consumers through the same feed
 *   function without HTTP, in the same child process.
 */
import type { ChildProcess } from 'node:child_process';
import type { Server } from 'node:http';
import { Commands } from '../src/actors/commands.js';
import { ActorHost, type UnitOfWork } from '../src/actors/host.js';
import { configWith } from '../src/config.js';
import { createApp } from '../src/http/app.js';
import { machineCatalog } from '../src/http/machines.js';
import { silentLogger } from '../src/log.js';
import { Queries } from '../src/persistence/queries.js';
import { Transport } from '../src/transport/index.js';
import { ClaimService } from '../src/workers/claims.js';
import { Wakeups } from '../src/workers/wakeups.js';
import { benchTransportOptions, listen, listenBare, runningTasks } from './fixtures.js';
import {
  benchNames,
  dropStreams,
  forkTs,
  isType,
  NATS_URL,
  nextMessage,
  scratchDatabase,
} from './scratch.js';
import {
  inTurns,
  type LatencyStats,
  loop,
  ms,
  n0,
  pool,
  print,
  ratio,
  sleep,
  summarize,
  TURNS,
  table,
} from './stats.js';

const CONCURRENCY = 16;
const TASK_DEFAULTS = { maxAttempts: 3, leaseMs: 600_000, retryBaseMs: 1_000 };

type Loaded = LatencyStats & { type: 'loaded'; errors: number; clientCpuUs: number };

/** Untimed runs before the timed ones, so that neither side is measured while it warms up. */
const WARM_UP_SECONDS = 1;

/**
 * `run`, and the CPU time this process spent meanwhile per operation (µs): for a request,
 * what the server side costs, whatever the load of the machine (the client is another
 * process); for the in-process call, the same call without HTTP.
 */
async function withCpu<T extends LatencyStats>(
  host: ActorHost,
  run: () => Promise<T>,
): Promise<T & { cpuUs: number; perCommit: number }> {
  const { commits, units } = host.commits.stats;
  const before = process.cpuUsage();
  const r = await run();
  const used = process.cpuUsage(before);
  const c = host.commits.stats;
  return {
    ...r,
    cpuUs: (used.user + used.system) / Math.max(1, r.count),
    perCommit: (c.units - units) / Math.max(1, c.commits - commits),
  };
}
type All = { type: 'all'; key: string; at: number };

export async function httpSection(o: { seconds: number; sseClients: number }): Promise<void> {
  print('## HTTP API and SSE (issue 6)');
  const db = await scratchDatabase('http', { max: 20 });
  const names = benchNames();
  const host = new ActorHost(db.sql, { taskDefaults: TASK_DEFAULTS });
  const commands = new Commands(host, { stuckAfterMs: 3_600_000, diagnosticCooldownMs: 3_600_000 });
  const config = configWith({ CLAIM_MAX_WAIT_MS: '0' });
  const claims = new ClaimService(host, new Wakeups(), { typeLimits: {}, maxWaitMs: 0 });
  let transport: Transport | null = null;
  let child: ChildProcess | null = null;
  let server: Server | null = null;
  let bare: Server | null = null;
  try {
    // The relay feeds the stream SSE reads; no reactions (HEARTBEAT writes no event anyway).
    transport = await Transport.start(
      benchTransportOptions(db.sql, host, names, { reactions: () => [] }),
    );
    const app = createApp({
      host,
      commands,
      claims,
      queries: new Queries(db.sql),
      machines: machineCatalog(),
      log: silentLogger(),
      config,
      events: transport,
      ready: async () => ({ postgres: true, nats: true, migrations: true }),
      sse: { bufferLimit: 10_000 },
    });
    const listening = await listen(app.fetch);
    server = listening.server;
    const url = listening.url;
    const bareListening = await listenBare(host, commands);
    bare = bareListening.server;

    // One running task per client loop, with its token.
    const tasks = await runningTasks(host, commands, CONCURRENCY);

    child = forkTs('./http-load.ts');
    const c = child;
    const load = async (
      method: 'GET' | 'POST',
      paths: string[],
      bodies?: string[],
      seconds = o.seconds,
      client: 'node' | 'raw' = 'node',
      base = url,
    ) => {
      c.send({
        type: 'load',
        url: base,
        method,
        paths,
        bodies,
        concurrency: CONCURRENCY,
        seconds,
        client,
      });
      const r = await nextMessage<Loaded>(c, isType<Loaded>('loaded'));
      if (r.errors > 0) print(`!! ${r.errors} non-2xx answers to ${method} ${paths[0]}`);
      return r;
    };
    const ms1000 = o.seconds * 1000;
    const queries = new Queries(db.sql);
    const getInProcess = (durationMs: number) =>
      loop(CONCURRENCY, durationMs, async (w) => {
        await queries.getTask((tasks[w % tasks.length] as { id: string }).id);
      });
    const heartbeat = (w: number) => {
      const t = tasks[w % tasks.length] as { id: string; token: string };
      const send = (uow: UnitOfWork) =>
        commands.sendPublic(
          uow,
          'task',
          t.id,
          { type: 'HEARTBEAT', token: t.token },
          { last: true },
        );
      return { id: t.id, send };
    };
    // The route's call: the unit queues in the task's mailbox and holds the task as its key,
    // so the units of a shared transaction run side by side (as `host.send` does).
    const postInProcess = (durationMs: number) =>
      loop(CONCURRENCY, durationMs, async (w) => {
        const { id, send } = heartbeat(w);
        await host.idempotent(undefined, async (uow) => ({ status: 200, body: await send(uow) }), {
          entityType: 'task',
          id,
        });
      });
    const postUnkeyed = (durationMs: number) =>
      loop(CONCURRENCY, durationMs, async (w) => {
        await host.transact(heartbeat(w).send);
      });
    const getPaths = tasks.map((t) => `/tasks/${t.id}`);
    const postPaths = tasks.map((t) => `/tasks/${t.id}/events`);
    const postBodies = tasks.map((t) => JSON.stringify({ type: 'HEARTBEAT', token: t.token }));
    await getInProcess(WARM_UP_SECONDS * 1000);
    await postInProcess(WARM_UP_SECONDS * 1000);
    await postUnkeyed(WARM_UP_SECONDS * 1000);
    await load('GET', ['/healthz'], undefined, WARM_UP_SECONDS);
    await load('GET', getPaths, undefined, WARM_UP_SECONDS);
    await load('POST', postPaths, postBodies, WARM_UP_SECONDS);
    await load('POST', postPaths, postBodies, WARM_UP_SECONDS, 'raw');
    await load('POST', postPaths, postBodies, WARM_UP_SECONDS, 'raw', bareListening.url);
    // Each path runs TURNS times, the paths taking turns, and each reports its median run (by
    // rate): run once each, one after the other, a ratio moved with the machine's speed
    // between its two halves.
    const { median } = await inTurns({
      getIn: () => withCpu(host, () => getInProcess(ms1000)),
      get: () => withCpu(host, () => load('GET', getPaths)),
      postIn: () => withCpu(host, () => postInProcess(ms1000)),
      post: () => withCpu(host, () => load('POST', postPaths, postBodies)),
      postRaw: () => withCpu(host, () => load('POST', postPaths, postBodies, o.seconds, 'raw')),
      postBare: () =>
        withCpu(host, () =>
          load('POST', postPaths, postBodies, o.seconds, 'raw', bareListening.url),
        ),
      postUnkeyed: () => withCpu(host, () => postUnkeyed(ms1000)),
      health: () => withCpu(host, () => load('GET', ['/healthz'])),
    });
    const { getIn, get, postIn, post, postRaw, postBare, postUnkeyed: unkeyed, health } = median;
    const postRow = (label: string, r: typeof post) => [
      label,
      n0(r.perSecond),
      ms(r.p50),
      ms(r.p99),
      n0(postIn.perSecond),
      ms(postIn.p50),
      ms(postIn.p99),
      ratio(r.perSecond, postIn.perSecond),
      n0(r.cpuUs),
      n0(postIn.cpuUs),
      n0(r.clientCpuUs),
      `${r.perCommit.toFixed(1)} / ${postIn.perCommit.toFixed(1)}`,
    ];
    print(
      `\n### Requests at concurrency ${CONCURRENCY} (client in another process, node:http with keep-alive; median of ${TURNS} runs each, taking turns)\n`,
    );
    print(
      table(
        [
          'request',
          'req/s',
          'p50 ms',
          'p99 ms',
          'in-process same call/s',
          'p50 ms',
          'p99 ms',
          'HTTP / in-process',
          'server CPU µs/req',
          'in-process CPU µs/call',
          'client CPU µs/req',
          'transitions per commit, HTTP / in-process',
        ],
        [
          [
            'GET /healthz (HTTP floor)',
            n0(health.perSecond),
            ms(health.p50),
            ms(health.p99),
            '-',
            '-',
            '-',
            '-',
            n0(health.cpuUs),
            '-',
            n0(health.clientCpuUs),
            '-',
          ],
          [
            'GET /tasks/:id vs queries.getTask',
            n0(get.perSecond),
            ms(get.p50),
            ms(get.p99),
            n0(getIn.perSecond),
            ms(getIn.p50),
            ms(getIn.p99),
            ratio(get.perSecond, getIn.perSecond),
            n0(get.cpuUs),
            n0(getIn.cpuUs),
            n0(get.clientCpuUs),
            '-',
          ],
          postRow('POST /tasks/:id/events HEARTBEAT vs host', post),
          postRow('the same, raw-socket client (as wrk)', postRaw),
          postRow('the same call behind bare node:http, raw client', postBare),
        ],
      ),
    );
    print(
      `\nThe app over bare node:http, raw clients: ${ratio(postRaw.perSecond, postBare.perSecond)} (server CPU ${n0(postRaw.cpuUs)} against ${n0(postBare.cpuUs)} µs per request). The unmailboxed call of sections 6-37 (host.transact + sendPublic, units in turn): ${n0(unkeyed.perSecond)}/s, ${n0(unkeyed.cpuUs)} µs CPU per call, ${unkeyed.perCommit.toFixed(1)} per commit; HTTP / it ${ratio(post.perSecond, unkeyed.perSecond)} (node:http client) and ${ratio(postRaw.perSecond, unkeyed.perSecond)} (raw).`,
    );
    print(
      '\nThe client shares the two cores with the server and Postgres: node:http spends the CPU in the last column per request, taken from the server. The raw-socket client writes prepared bytes and reads only the status, length and body, as wrk does: the closer figure for a server whose clients run elsewhere.',
    );

    // SSE fan-out, then the same through ordered consumers without HTTP.
    const tickets: string[] = [];
    for (let i = 0; i < 8; i++) {
      const a = await host.create('ticket', {
        id: `sse-${i}-${Date.now()}`,
        title: 'bench',
        stuckAfterMs: 3_600_000,
        diagnosticCooldownMs: 0,
      });
      await host.send('ticket', a.id, { type: 'START' });
      tickets.push(a.id);
    }
    await sleep(500); // the setup's events reach the stream before the clients subscribe
    const sse = await fanOut(c, host, tickets, { type: 'sse-open', url, clients: o.sseClients });
    const feed = await fanOut(c, host, tickets, {
      type: 'feed-open',
      natsUrl: NATS_URL,
      names,
      clients: o.sseClients,
    });
    print(`\n### Fan-out to ${o.sseClients} clients\n`);
    print(
      table(
        [
          'clients',
          'one event: commit → all have it p50 ms',
          'p99 ms',
          'burst of 500: deliveries/s',
          'events/s',
        ],
        [
          [
            `${o.sseClients} SSE clients (GET /events/stream)`,
            ms(sse.alone.p50),
            ms(sse.alone.p99),
            n0(sse.deliveries),
            n0(sse.events),
          ],
          [
            `${o.sseClients} ordered consumers, no HTTP`,
            ms(feed.alone.p50),
            ms(feed.alone.p99),
            n0(feed.deliveries),
            n0(feed.events),
          ],
          [
            'SSE / no HTTP',
            ratio(sse.alone.p50, feed.alone.p50),
            ratio(sse.alone.p99, feed.alone.p99),
            ratio(sse.deliveries, feed.deliveries),
            '',
          ],
        ],
      ),
    );
  } finally {
    child?.disconnect();
    claims.close();
    bare?.closeAllConnections();
    bare?.close();
    if (server) {
      const s = server;
      await new Promise<void>((resolve) => {
        s.close(() => resolve());
        if ('closeAllConnections' in s) s.closeAllConnections();
      });
    }
    await transport?.stop().catch(() => {});
    await dropStreams(names).catch(() => {});
    await db.drop();
  }
}

/** Whether each SSE ticket is blocked now: the next event to send it is UNBLOCK. */
const blocked = new Map<string, boolean>();

/**
 * Opens the clients, sends `samples` events one at a time (commit → the last client got it),
 * then a burst of 500 at concurrency 8 (deliveries/s until every client had every event).
 * `whileOpen` runs once every client is connected (e.g. to count consumers).
 */
export async function fanOut(
  child: ChildProcess,
  host: ActorHost,
  tickets: string[],
  open: { type: string; clients: number; [k: string]: unknown },
  o: { samples?: number; whileOpen?: () => Promise<void> } = {},
): Promise<{ alone: LatencyStats; deliveries: number; events: number }> {
  const wallNow = () => performance.timeOrigin + performance.now();
  child.send(open);
  await nextMessage(child, isType('ready'));
  await sleep(500);
  await o.whileOpen?.();
  const arrivals = new Map<string, number>();
  const waiters = new Map<string, () => void>();
  const onAll = (m: unknown) => {
    if (!isType<All>('all')(m)) return;
    arrivals.set(m.key, m.at);
    waiters.get(m.key)?.();
  };
  child.on('message', onAll);
  const step = async (id: string) => {
    const b = blocked.get(id) ?? false;
    blocked.set(id, !b);
    const a = await host.send(
      'ticket',
      id,
      b ? { type: 'UNBLOCK' } : { type: 'BLOCK', reason: 'bench' },
    );
    const e = a.events[0];
    if (!e) throw new Error('bench: BLOCK/UNBLOCK emitted no event');
    return { key: `${id}:${e.seq}`, at: wallNow() };
  };
  try {
    const alone: number[] = [];
    for (let i = 0; i < (o.samples ?? 30); i++) {
      const id = tickets[0] as string;
      let resolveAll: () => void = () => {};
      const all = new Promise<void>((r) => {
        resolveAll = r;
      });
      const { key, at } = await step(id);
      waiters.set(key, resolveAll);
      if (!arrivals.has(key)) await withTimeout(all, 30_000, `event ${key} at every client`);
      waiters.delete(key);
      alone.push((arrivals.get(key) ?? at) - at);
    }
    const keys: string[] = [];
    const first = wallNow();
    await pool(500, tickets.length, async (i) => {
      keys.push((await step(tickets[i % tickets.length] as string)).key);
    });
    const deadline = Date.now() + 120_000;
    while (!keys.every((k) => arrivals.has(k))) {
      if (Date.now() > deadline) throw new Error('bench: the burst did not reach every client');
      await sleep(10);
    }
    const last = Math.max(...keys.map((k) => arrivals.get(k) ?? 0));
    const seconds = (last - first) / 1000;
    return {
      alone: summarize(alone, 0),
      deliveries: (open.clients * keys.length) / seconds,
      events: keys.length / seconds,
    };
  } finally {
    child.off('message', onAll);
    child.send({ type: 'close' });
    await nextMessage(child, isType('closed'));
  }
}

async function withTimeout(p: Promise<void>, msec: number, what: string): Promise<void> {
  let timer: NodeJS.Timeout | undefined;
  await Promise.race([
    p,
    new Promise<void>((_, reject) => {
      timer = setTimeout(() => reject(new Error(`bench: timed out waiting for ${what}`)), msec);
    }),
  ]).finally(() => clearTimeout(timer));
}
