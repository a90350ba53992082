/** Setup shared by the HTTP sections: a listening app, and running tasks with their tokens. */

import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { jetstreamManager } from '@nats-io/jetstream';
import type { Commands } from '../src/actors/commands.js';
import type { ActorHost } from '../src/actors/host.js';
import { startHttpServer } from '../src/http/server.js';
import { summaryOf } from '../src/http/views.js';
import { silentLogger } from '../src/log.js';
import type { Sql } from '../src/persistence/db.js';
import { anyUnpublished } from '../src/persistence/outbox-rows.js';
import { Transport, type TransportNames, type TransportOptions } from '../src/transport/index.js';
import { NATS_URL } from './scratch.js';
import { pool, until } from './stats.js';

/** Serves `fetch` on a free loopback port, with the server `bin/orchestrator` runs. */
export async function listen(
  fetch: (req: Request) => Response | Promise<Response>,
): Promise<{ server: Server; url: string }> {
  const server = startHttpServer(fetch, { port: 0, hostname: '127.0.0.1' });
  await new Promise<void>((resolve, reject) => {
    server.once('listening', () => resolve());
    server.once('error', reject);
  });
  return { server, url: `http://127.0.0.1:${(server.address() as AddressInfo).port}` };
}

/**
 * The floor under the HTTP section's POST: a bare node:http handler for
 * `POST /tasks/:id/events` that reads the body, parses it and makes the route's own call
 * (the same unit in the task's mailbox, the same view in the answer), with no framework,
 * middleware, validation or error mapping. What any Node HTTP server pays per request on this
 * machine, beside what the app adds to it.
 */
export async function listenBare(
  host: ActorHost,
  commands: Commands,
): Promise<{ server: Server; url: string }> {
  const server = createServer((req, res) => {
    const chunks: Buffer[] = [];
    req.on('data', (chunk: Buffer) => chunks.push(chunk));
    req.on('end', () => {
      const id = (req.url ?? '').split('/')[2] ?? '';
      const event = JSON.parse(Buffer.concat(chunks).toString('utf8')) as {
        type: 'HEARTBEAT';
        token: string;
      };
      host
        .idempotent(
          undefined,
          async (uow) => ({
            status: 200,
            body: summaryOf(await commands.sendPublic(uow, 'task', id, event, { last: true })),
          }),
          { entityType: 'task', id },
        )
        .then(
          (r) => {
            const text = JSON.stringify(r.body);
            res.writeHead(200, {
              'Content-Type': 'application/json',
              'Content-Length': Buffer.byteLength(text),
            });
            res.end(text);
          },
          () => {
            res.writeHead(500).end();
          },
        );
    });
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => resolve());
  });
  return { server, url: `http://127.0.0.1:${(server.address() as AddressInfo).port}` };
}

/** `n` tasks, each in a ticket of its own, claimed and started: one per client loop. */
export async function runningTasks(
  host: ActorHost,
  commands: Commands,
  n: number,
): Promise<{ id: string; token: string }[]> {
  const tasks: { id: string; token: string }[] = [];
  await pool(n, 4, async () => {
    const { value } = await host.transact(async (uow) => {
      const t = await commands.createTicket(uow, { title: 'bench' });
      return (await commands.addTask(uow, t.id, { type: 'bench' })).id;
    });
    const claimed = await host.send('task', value, { type: 'CLAIM', workerId: 'bench' });
    const token = (claimed.snapshot.context as { token: string }).token;
    await host.send('task', value, { type: 'START', token });
    tasks.push({ id: value, token });
  });
  return tasks;
}

/** A bench process's own transport: no reconciler, no stream check; `over` adds the rest. */
export function benchTransportOptions(
  sql: Sql,
  host: ActorHost,
  names: TransportNames,
  over: Partial<TransportOptions> = {},
): TransportOptions {
  return {
    sql,
    host,
    log: silentLogger(),
    natsUrl: NATS_URL,
    names,
    reconcileMs: 600_000,
    enableReconciler: false,
    relay: { streamCheckMs: 0 },
    ...over,
  };
}

/**
 * Relays a setup's events and lets every reaction to them settle (nothing unpublished, no
 * consumer with messages pending), with a transport of its own that is stopped afterwards.
 */
export async function settleSetup(sql: Sql, host: ActorHost, names: TransportNames): Promise<void> {
  const t = await Transport.start(benchTransportOptions(sql, host, names));
  try {
    const jsm = await jetstreamManager(t.nc);
    await until(
      async () => {
        if (await anyUnpublished(sql)) return false;
        for (const runner of t.runners) {
          const info = await jsm.consumers.info(names.stream, runner.name);
          if (info.num_pending + info.num_ack_pending > 0) return false;
        }
        return true;
      },
      300_000,
      'the setup events to settle',
      50,
    );
  } finally {
    await t.stop();
  }
}
