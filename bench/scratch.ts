/**
 * What every bench section sets up for itself: a scratch database (created, migrated,
 * dropped with `force`), NATS stream and subject names of its own (streams deleted after),
 * and a child process running a TypeScript file under tsx.
 */
import { type ChildProcess, fork } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { jetstreamManager } from '@nats-io/jetstream';
import { connect } from '@nats-io/transport-node';
import postgres from 'postgres';
import { createSql, type Sql } from '../src/persistence/db.js';
import { migrate } from '../src/persistence/migrate.js';
import { deleteStreams } from '../src/transport/streams.js';
import { type TransportNames, transportNames } from '../src/transport/subjects.js';

export const ADMIN_URL =
  process.env.BENCH_DATABASE_URL ?? 'postgres://postgres@127.0.0.1:5432/postgres';
export const NATS_URL = process.env.BENCH_NATS_URL ?? 'nats://127.0.0.1:4222';

/**
 * Everything a crash must still clean up: scratch databases and stream names in use. A
 * fatal error or Ctrl-C anywhere (a pool's background error included) drops them first.
 */
const live = { databases: new Set<string>(), streams: new Set<TransportNames>() };

async function cleanUpAndExit(reason: unknown): Promise<never> {
  process.stderr.write(
    `bench: ${reason instanceof Error ? (reason.stack ?? reason.message) : String(reason)}\n`,
  );
  process.stderr.write('bench: dropping scratch databases and streams\n');
  const admin = postgres(ADMIN_URL, { max: 1, onnotice: () => {} });
  for (const name of live.databases) {
    await admin.unsafe(`drop database if exists ${name} with (force)`).catch(() => {});
  }
  await admin.end().catch(() => {});
  for (const names of live.streams) await dropStreams(names).catch(() => {});
  process.exit(1);
}

let handlersInstalled = false;
function installCleanup(): void {
  if (handlersInstalled || process.send) return; // children leave it to the parent
  handlersInstalled = true;
  process.once('uncaughtException', (e) => void cleanUpAndExit(e));
  process.once('unhandledRejection', (e) => void cleanUpAndExit(e));
  process.once('SIGINT', () => void cleanUpAndExit('interrupted'));
  process.once('SIGTERM', () => void cleanUpAndExit('terminated'));
}

export interface Scratch {
  name: string;
  url: string;
  sql: Sql;
  /** Another pool on the same database. */
  pool(max: number): Sql;
  drop(): Promise<void>;
}

export async function scratchDatabase(
  label: string,
  options: { max?: number; migrate?: boolean } = {},
): Promise<Scratch> {
  installCleanup();
  const name = `orch_bench_${label}_${randomBytes(4).toString('hex')}`;
  const admin = postgres(ADMIN_URL, { max: 1, onnotice: () => {} });
  try {
    await connectionHeadroom(admin, (options.max ?? 20) + 10, label);
    await admin.unsafe(`create database ${name}`);
    live.databases.add(name);
  } finally {
    await admin.end();
  }
  const u = new URL(ADMIN_URL);
  u.pathname = `/${name}`;
  const url = u.toString();
  const pools: Sql[] = [];
  const pool = (max: number) => {
    const s = createSql(url, { max, applicationName: `bench-${label}` });
    pools.push(s);
    return s;
  };
  const sql = pool(options.max ?? 20);
  if (options.migrate !== false) await migrate(sql);
  return {
    name,
    url,
    sql,
    pool,
    async drop() {
      await Promise.all(pools.map((p) => p.end({ timeout: 2 }).catch(() => {})));
      const a = postgres(ADMIN_URL, { max: 1, onnotice: () => {} });
      await a.unsafe(`drop database if exists ${name} with (force)`);
      await a.end();
      live.databases.delete(name);
    },
  };
}

/**
 * Waits (up to two minutes) until the server has `needed` connection slots free: other
 * work on a shared server (test suites) can hold most of max_connections for a while.
 */
export async function waitForConnections(needed: number, label: string): Promise<void> {
  const admin = postgres(ADMIN_URL, { max: 1, onnotice: () => {} });
  try {
    await connectionHeadroom(admin, needed, label);
  } finally {
    await admin.end();
  }
}

async function connectionHeadroom(admin: postgres.Sql, needed: number, label: string) {
  const started = Date.now();
  for (;;) {
    const [r] = await admin<{ free: number }[]>`
      select current_setting('max_connections')::int
        - (select count(*) from pg_stat_activity)::int as free`;
    if ((r?.free ?? 0) >= needed || Date.now() - started > 120_000) break;
    await new Promise((resolve) => setTimeout(resolve, 500));
  }
  const waited = Date.now() - started;
  if (waited > 1_000) {
    process.stdout.write(
      `(${label}: waited ${(waited / 1000).toFixed(0)}s for ${needed} free Postgres connections)\n`,
    );
  }
}

/** Stream and subject names of this run only. */
export function benchNames(): TransportNames {
  installCleanup();
  const id = randomBytes(4).toString('hex');
  const names = transportNames(`bench_${id}`, `BENCH_${id}`);
  live.streams.add(names);
  return names;
}

export async function dropStreams(names: TransportNames): Promise<void> {
  const nc = await connect({ servers: NATS_URL });
  try {
    await deleteStreams(await jetstreamManager(nc), names);
    live.streams.delete(names);
  } finally {
    await nc.close();
  }
}

/** Runs `file` (a .ts path relative to bench/) in a child Node process under tsx, with IPC. */
export function forkTs(file: string, args: string[] = [], execArgv: string[] = []): ChildProcess {
  return fork(new URL(file, import.meta.url), args, {
    execArgv: [...execArgv, '--import', 'tsx'],
    stdio: ['ignore', 'inherit', 'inherit', 'ipc'],
  });
}

/** The next IPC message from `child` that satisfies `match` (rejects if the child exits). */
export function nextMessage<T>(
  child: ChildProcess,
  match: (m: unknown) => m is T,
  timeoutMs = 120_000,
): Promise<T> {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(
      () => done(new Error('bench: child did not answer in time')),
      timeoutMs,
    );
    const onMessage = (m: unknown) => {
      if (match(m)) done(null, m);
    };
    const onExit = (code: number | null) => done(new Error(`bench: child exited (${code})`));
    function done(error: Error | null, value?: T) {
      clearTimeout(timer);
      child.off('message', onMessage);
      child.off('exit', onExit);
      if (error) reject(error);
      else resolve(value as T);
    }
    child.on('message', onMessage);
    child.on('exit', onExit);
  });
}

export const isType =
  <T extends { type: string }>(type: T['type']) =>
  (m: unknown): m is T =>
    typeof m === 'object' && m !== null && (m as { type?: unknown }).type === type;
