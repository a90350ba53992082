/**
 * Transport test helpers: stream and subject names of their own per test file (so files
 * share the NATS server without seeing each other), an admin connection, a transport with
 * short timeouts, and a wait-for-condition helper.
 */
import { randomBytes } from 'node:crypto';
import { type JetStreamManager, jetstreamManager } from '@nats-io/jetstream';
import { connect, type NatsConnection } from '@nats-io/transport-node';
import { Commands } from '../../src/actors/commands.js';
import type { ActorHost } from '../../src/actors/host.js';
import { silentLogger } from '../../src/log.js';
import type { Sql } from '../../src/persistence/db.js';
import { Transport, type TransportOptions } from '../../src/transport/index.js';
import { deleteStreams } from '../../src/transport/streams.js';
import { type TransportNames, transportNames } from '../../src/transport/subjects.js';

export const NATS_URL = process.env.TEST_NATS_URL ?? 'nats://127.0.0.1:4222';

export function testNames(): TransportNames {
  const id = randomBytes(4).toString('hex');
  return transportNames(`t_${id}`, `T_${id}`);
}

export interface NatsAdmin {
  nc: NatsConnection;
  jsm: JetStreamManager;
  close(names: TransportNames[]): Promise<void>;
}

export async function natsAdmin(): Promise<NatsAdmin> {
  const nc = await connect({ servers: NATS_URL });
  const jsm = await jetstreamManager(nc);
  return {
    nc,
    jsm,
    async close(names) {
      for (const n of names) await deleteStreams(jsm, n);
      await nc.close();
    },
  };
}

/** A transport with test-sized timeouts; override anything. */
export function startTransport(
  sql: Sql,
  host: ActorHost,
  names: TransportNames,
  over: Partial<TransportOptions> = {},
): Promise<Transport> {
  return Transport.start({
    sql,
    host,
    log: silentLogger(),
    natsUrl: NATS_URL,
    names,
    reconcileMs: 60_000,
    connectTimeoutMs: 2_000,
    consumer: { ackWaitMs: 1_000, maxDeliver: 3, retryBaseMs: 50, maxRetryDelayMs: 200 },
    relay: { pollMs: 100, streamCheckMs: 0, publishTimeoutMs: 1_000 },
    reconcileGraceMs: 0,
    ...over,
  });
}

export function commandsFor(host: ActorHost): Commands {
  return new Commands(host, { stuckAfterMs: 3_600_000, diagnosticCooldownMs: 3_600_000 });
}

/** Polls `check` until it returns true (or a value that is not false/undefined). */
export async function eventually<T>(
  check: () => Promise<T | false | undefined> | T | false | undefined,
  timeoutMs = 15_000,
  what = 'condition',
): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  let last: unknown;
  for (;;) {
    try {
      const v = await check();
      if (v !== false && v !== undefined) return v as T;
    } catch (error) {
      last = error;
    }
    if (Date.now() > deadline) {
      throw new Error(`timed out waiting for ${what}${last ? `: ${String(last)}` : ''}`);
    }
    await new Promise((r) => setTimeout(r, 50));
  }
}
