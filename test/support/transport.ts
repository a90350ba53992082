/**
 * Transport test helpers: stream and subject names of their own per test file (so files
 * share the NATS server without seeing each other), an admin connection, a transport with
 * short timeouts, and a wait-for-condition helper.
 */
import { randomBytes } from 'node:crypto';
import { type JetStreamManager, jetstreamManager } from '@nats-io/jetstream';
import { connect, type NatsConnection } from '@nats-io/transport-node';
import { afterAll, afterEach, beforeAll } from 'vitest';
import { Commands } from '../../src/actors/commands.js';
import type { ActorHost } from '../../src/actors/host.js';
import { silentLogger } from '../../src/log.js';
import type { Sql } from '../../src/persistence/db.js';
import { Transport, type TransportOptions } from '../../src/transport/index.js';
import { deleteStreams } from '../../src/transport/streams.js';
import { type TransportNames, transportNames } from '../../src/transport/subjects.js';
import { createTestDatabase, type TestDatabase } from './database.js';

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

export interface TransportFixtures {
  /** The admin connection (after the file's `beforeAll`). */
  readonly admin: NatsAdmin;
  /** A database of its own, dropped after the test. */
  database(label: string): Promise<TestDatabase>;
  /** Stream and subject names of their own, whose streams go after the file. */
  names(): TransportNames;
  /** Stopped after the test (before its database is dropped). */
  keep(t: Transport): Transport;
}

/**
 * The lifecycle a transport test file needs, as hooks of the calling file: an admin
 * connection for the file, and the transports and databases each test made, stopped and
 * dropped after it, then the file's streams deleted.
 */
export function transportFixtures(): TransportFixtures {
  let admin: NatsAdmin | null = null;
  const names: TransportNames[] = [];
  const dbs: TestDatabase[] = [];
  const transports: Transport[] = [];
  beforeAll(async () => {
    admin = await natsAdmin();
  });
  afterEach(async () => {
    await Promise.all(transports.splice(0).map((t) => t.stop()));
    await Promise.all(dbs.splice(0).map((d) => d.drop()));
  });
  afterAll(async () => {
    await admin?.close(names);
  });
  return {
    get admin() {
      if (!admin) throw new Error('transportFixtures: the admin connection is made in beforeAll');
      return admin;
    },
    async database(label) {
      const db = await createTestDatabase(label);
      dbs.push(db);
      return db;
    },
    names() {
      const n = testNames();
      names.push(n);
      return n;
    },
    keep(t) {
      transports.push(t);
      return t;
    },
  };
}
