/**
 * The live feed at scale: N SSE clients (default 1,000) of GET /events/stream on one process,
 * with the clients in a child process (http-load.ts, node:http readers) so the server's
 * event loop does only server work. Per event, commit → the last of the N clients got it (p50/p99), for commits of
 * this process (the feed is woken in-process) and of another host (woken through the event
 * stream, after the relay published it); then a burst's deliveries/s. Beside it, the baseline:
 * one raw JetStream consumer of the event stream, commit → received, same commits. Also the
 * number of JetStream consumers on the stream while the N clients are connected.
 */
import type { ChildProcess } from 'node:child_process';
import type { Server } from 'node:http';
import { Commands } from '../src/actors/commands.js';
import { ActorHost } from '../src/actors/host.js';
import { configWith } from '../src/config.js';
import { createApp } from '../src/http/app.js';
import { machineCatalog } from '../src/http/machines.js';
import { silentLogger } from '../src/log.js';
import { Queries } from '../src/persistence/queries.js';
import { Transport } from '../src/transport/index.js';
import { ClaimService } from '../src/workers/claims.js';
import { Wakeups } from '../src/workers/wakeups.js';
import { benchTransportOptions, listen } from './fixtures.js';
import { fanOut } from './http.js';
import { benchNames, dropStreams, forkTs, NATS_URL, scratchDatabase } from './scratch.js';
import { ms, n0, print, sleep, table } from './stats.js';

const TASK_DEFAULTS = { maxAttempts: 3, leaseMs: 600_000, retryBaseMs: 1_000 };

export async function sseSection(o: { clients: number; samples: number }): Promise<void> {
  print(`## SSE: ${o.clients} clients on one process, one live feed`);
  const db = await scratchDatabase('sse', { max: 20 });
  const names = benchNames();
  const host = new ActorHost(db.sql, { taskDefaults: TASK_DEFAULTS });
  // Another writer, as another process is: its own relay publishes its commits, and they
  // reach this process's feed only through the event stream.
  const other = new ActorHost(db.sql, { taskDefaults: TASK_DEFAULTS });
  let otherTransport: Transport | null = null;
  const commands = new Commands(host, { stuckAfterMs: 3_600_000, diagnosticCooldownMs: 3_600_000 });
  const claims = new ClaimService(host, new Wakeups(), { typeLimits: {}, maxWaitMs: 0 });
  let transport: Transport | null = null;
  let child: ChildProcess | null = null;
  let server: Server | null = null;
  try {
    transport = await Transport.start(
      benchTransportOptions(db.sql, host, names, { reactions: () => [] }),
    );
    const t = transport;
    otherTransport = await Transport.start(
      benchTransportOptions(db.sql, other, names, { reactions: () => [] }),
    );
    const app = createApp({
      host,
      commands,
      claims,
      queries: new Queries(db.sql),
      machines: machineCatalog(),
      log: silentLogger(),
      config: configWith({ SSE_MAX_CLIENTS: String(o.clients + 10) }),
      events: transport,
      ready: async () => ({ postgres: true, nats: true, migrations: true }),
    });
    const listening = await listen(app.fetch);
    server = listening.server;
    child = forkTs('./http-load.ts');

    const tickets = async (h: ActorHost, label: string) => {
      const ids: string[] = [];
      for (let i = 0; i < 8; i++) {
        const a = await h.create('ticket', {
          id: `${label}-${i}-${Date.now()}`,
          title: 'bench',
          stuckAfterMs: 3_600_000,
          diagnosticCooldownMs: 0,
        });
        await h.send('ticket', a.id, { type: 'START' });
        ids.push(a.id);
      }
      return ids;
    };
    const mine = await tickets(host, 'sse');
    const theirs = await tickets(other, 'sse-other');
    await sleep(500);

    let consumers = 0;
    const count = async () => {
      consumers = (await t.jsm.consumers.list(names.stream).next()).length;
    };
    const sseOpen = { type: 'sse-open-node', url: listening.url, clients: o.clients };
    const sse = await fanOut(child, host, mine, sseOpen, { samples: o.samples, whileOpen: count });
    const sseOther = await fanOut(child, other, theirs, sseOpen, { samples: o.samples });
    const feedOpen = { type: 'feed-open', natsUrl: NATS_URL, names, clients: 1 };
    const raw = await fanOut(child, host, mine, feedOpen, { samples: o.samples });

    print(`\n### One event at a time (${o.samples} each), then a burst of 500 at concurrency 8\n`);
    print(
      table(
        [
          'receivers',
          'commit → the last has it p50 ms',
          'p99 ms',
          'burst: deliveries/s',
          'events/s',
          'JetStream consumers',
        ],
        [
          [
            `${n0(o.clients)} SSE clients, commits in this process`,
            ms(sse.alone.p50),
            ms(sse.alone.p99),
            n0(sse.deliveries),
            n0(sse.events),
            String(consumers),
          ],
          [
            `${n0(o.clients)} SSE clients, commits of another host (its own relay)`,
            ms(sseOther.alone.p50),
            ms(sseOther.alone.p99),
            n0(sseOther.deliveries),
            n0(sseOther.events),
            '',
          ],
          [
            'baseline: 1 raw JetStream consumer',
            ms(raw.alone.p50),
            ms(raw.alone.p99),
            n0(raw.deliveries),
            n0(raw.events),
            '1',
          ],
        ],
      ),
    );
    const f = t.liveFeed.stats;
    print(
      `\nlive feed: ${n0(f.events)} events read once each, ${f.catchUps} catch-ups, ${f.overflows} queues dropped, ${f.consumers} consumer(s) made`,
    );
  } finally {
    child?.disconnect();
    await otherTransport?.stop().catch(() => {});
    claims.close();
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
