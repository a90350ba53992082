/**
 * The processes of a chaos run, all its own: a nats-server on a free port with a store
 * directory of its own, a fresh database on the local Postgres server, and orchestrator
 * processes (`node bin/orchestrator <role>`) that can be killed, frozen and restarted. Every
 * process started here is tracked so that `destroy()` can end it, whatever happened.
 */
import { type ChildProcess, spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { appendFileSync, closeSync, openSync, readFileSync, statSync } from 'node:fs';
import { mkdir, rm } from 'node:fs/promises';
import { join } from 'node:path';
import postgres from 'postgres';
import { freePort, reachable } from '../../src/infra/free-port.js';
import { createSql, type Sql } from '../../src/persistence/db.js';
import { errorText, note, sleep, waitUntil } from './util.js';

const BIN = new URL('../../bin/orchestrator', import.meta.url).pathname;

export type { Sql } from '../../src/persistence/db.js';

export interface ClusterOptions {
  dir: string;
  adminUrl: string;
  leaseMs: number;
  heartbeatMs: number;
  workerConcurrency: number;
  logLevel: string;
  /** Settings of every orchestrator beyond (or instead of) the harness's own. */
  env?: Record<string, string>;
}

/** One exit the chaos did not cause (a crash, or a start that failed). */
export interface UnexpectedExit {
  name: string;
  workerId: string;
  code: number | null;
  signal: string | null;
  at: number;
  tail: string;
}

export class Nats {
  private child: ChildProcess | null = null;
  constructor(
    readonly port: number,
    readonly storeDir: string,
    private readonly logFile: string,
  ) {}

  get url(): string {
    return `nats://127.0.0.1:${this.port}`;
  }

  get running(): boolean {
    return this.child !== null && this.child.exitCode === null && this.child.signalCode === null;
  }

  async start(): Promise<void> {
    const fd = openSync(this.logFile, 'a');
    const child = spawn(
      'nats-server',
      ['-a', '127.0.0.1', '-p', String(this.port), '-js', '-sd', this.storeDir],
      { stdio: ['ignore', fd, fd] },
    );
    closeSync(fd);
    this.child = child;
    const up = await waitUntil(
      async () => child.exitCode === null && (await reachable('127.0.0.1', this.port, 200)),
      15_000,
      50,
    );
    if (!up) throw new Error(`nats-server did not start on port ${this.port}`);
  }

  /** SIGKILL (a crash) or SIGTERM (a clean stop); resolves once it is gone. */
  async stop(signal: NodeJS.Signals = 'SIGKILL'): Promise<void> {
    const child = this.child;
    if (!child || child.exitCode !== null || child.signalCode !== null) return;
    const gone = new Promise<void>((r) => child.once('exit', () => r()));
    child.kill(signal);
    const timer = setTimeout(() => child.kill('SIGKILL'), 5_000);
    await gone;
    clearTimeout(timer);
  }
}

export class Database {
  readonly url: string;
  private pools: Sql[] = [];
  constructor(
    readonly name: string,
    private readonly adminUrl: string,
  ) {
    const u = new URL(adminUrl);
    u.pathname = `/${name}`;
    this.url = u.toString();
  }

  static async create(adminUrl: string): Promise<Database> {
    const name = `orch_chaos_${randomBytes(4).toString('hex')}`;
    const admin = postgres(adminUrl, { max: 1, onnotice: () => {} });
    try {
      await admin.unsafe(`create database ${name}`);
    } finally {
      await admin.end({ timeout: 1 });
    }
    return new Database(name, adminUrl);
  }

  /** A pool of the harness, named so that the backend-killing fault spares it. */
  pool(max = 4): Sql {
    const sql = createSql(this.url, { max, applicationName: 'chaos-harness' });
    this.pools.push(sql);
    return sql;
  }

  async drop(): Promise<void> {
    await Promise.all(this.pools.map((p) => p.end({ timeout: 1 }).catch(() => {})));
    this.pools = [];
    const admin = postgres(this.adminUrl, { max: 1, onnotice: () => {} });
    try {
      await admin.unsafe(`drop database if exists ${this.name} with (force)`);
    } finally {
      await admin.end({ timeout: 1 });
    }
  }
}

export type Role = 'all' | 'worker';

/** One orchestrator "slot" (a1, w1, ...): restarted as new incarnations with new worker ids. */
export class Orchestrator {
  child: ChildProcess | null = null;
  incarnation = -1;
  private starting: Promise<void> | null = null;
  /** The current incarnation confirmed it was up. */
  private up = false;
  frozen = false;
  /** Set while the chaos itself stops the process, so its exit is not reported. */
  private expectingExit = false;
  /** Starts that failed (and were tried again), with the end of their log. */
  readonly failedStarts: { workerId: string; code: number | null; tail: string }[] = [];
  /** Every worker id this slot has used, with the time it started and ended. */
  readonly lives: { workerId: string; from: number; to: number | null }[] = [];

  constructor(
    readonly name: string,
    readonly role: Role,
    readonly port: number,
    private readonly env: Record<string, string>,
    private readonly logFile: string,
    private readonly onUnexpectedExit: (e: UnexpectedExit) => void,
  ) {}

  get url(): string | null {
    return this.role === 'all' ? `http://127.0.0.1:${this.port}` : null;
  }

  /** Where its probes and `/metrics` are: the API, or a worker's OPS_PORT (its port here). */
  get opsUrl(): string {
    return `http://127.0.0.1:${this.port}`;
  }

  get workerId(): string {
    return `${this.name}.${this.incarnation}`;
  }

  get alive(): boolean {
    const c = this.child;
    return c !== null && c.exitCode === null && c.signalCode === null;
  }

  /** Up and answering (its start confirmed), and not frozen: a fair target for a fault. */
  get ready(): boolean {
    return this.alive && this.up && !this.frozen && this.starting === null;
  }

  /**
   * Starts a new incarnation; tries again (NATS may be down) until `timeoutMs`. A start
   * already under way is joined: one slot never runs two processes.
   */
  start(timeoutMs = 60_000): Promise<void> {
    this.starting ??= this.startLoop(timeoutMs).finally(() => {
      this.starting = null;
    });
    return this.starting;
  }

  private async startLoop(timeoutMs: number): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      if (await this.tryStart(Math.max(1_000, deadline - Date.now()))) return;
      if (Date.now() > deadline) throw new Error(`${this.name} did not start`);
      await sleep(500);
    }
  }

  private async tryStart(timeoutMs: number): Promise<boolean> {
    this.incarnation++;
    const workerId = this.workerId;
    appendFileSync(this.logFile, `=== ${workerId} starting at ${new Date().toISOString()}\n`);
    const offset = statSync(this.logFile).size;
    const fd = openSync(this.logFile, 'a');
    const child = spawn(process.execPath, [BIN, this.role], {
      env: {
        PATH: process.env.PATH ?? '',
        HOME: process.env.HOME ?? '/tmp',
        ...this.env,
        PORT: String(this.port),
        // A worker serves no API: its port serves its probes and metrics.
        ...(this.role === 'worker' ? { OPS_PORT: String(this.port) } : {}),
        WORKER_ID: workerId,
      },
      stdio: ['ignore', fd, fd],
    });
    closeSync(fd);
    this.child = child;
    this.frozen = false;
    this.expectingExit = false;
    const life = { workerId, from: Date.now(), to: null as number | null };
    this.lives.push(life);
    let up = false;
    this.up = false;
    child.once('exit', (code, signal) => {
      life.to = Date.now();
      if (this.child === child) this.frozen = false;
      // A start that fails is retried by start(); only a process that was up can crash.
      if (!up) this.failedStarts.push({ workerId, code, tail: this.logTail(offset) });
      else if (!this.expectingExit) {
        this.onUnexpectedExit({
          name: this.name,
          workerId,
          code,
          signal,
          at: Date.now(),
          tail: this.logTail(offset),
        });
      }
    });
    const ready = await waitUntil(
      async () => {
        if (child.exitCode !== null || child.signalCode !== null) throw new Error('exited');
        const res = await fetch(`${this.opsUrl}/readyz`, { signal: AbortSignal.timeout(1_000) });
        return res.status === 200;
      },
      timeoutMs,
      150,
    );
    if (ready && this.alive) {
      up = true;
      this.up = true;
      return true;
    }
    if (this.alive) {
      this.expectingExit = true;
      child.kill('SIGKILL');
    }
    return false;
  }

  logTail(offset = 0, max = 4_000): string {
    try {
      const text = readFileSync(this.logFile).subarray(offset).toString();
      return text.slice(-max);
    } catch {
      return '';
    }
  }

  /** kill -9, as the chaos means it. */
  async kill(): Promise<void> {
    const child = this.child;
    if (!child || !this.alive) return;
    this.expectingExit = true;
    const gone = new Promise<void>((r) => child.once('exit', () => r()));
    child.kill('SIGKILL');
    await gone;
    this.frozen = false;
  }

  freeze(): void {
    if (!this.alive) return;
    this.child?.kill('SIGSTOP');
    this.frozen = true;
  }

  thaw(): void {
    if (!this.child || !this.frozen) return;
    this.child.kill('SIGCONT');
    this.frozen = false;
  }

  /** SIGTERM and wait: the exit code of a clean shutdown (null when it had to be killed). */
  async stop(graceMs = 15_000): Promise<number | null> {
    const child = this.child;
    if (!child || !this.alive) return child?.exitCode ?? null;
    this.thaw();
    this.expectingExit = true;
    const gone = new Promise<number | null>((r) => child.once('exit', (code) => r(code)));
    child.kill('SIGTERM');
    const timer = setTimeout(() => child.kill('SIGKILL'), graceMs);
    const code = await gone;
    clearTimeout(timer);
    return code;
  }

  /** Ends the process at once, whatever its state (cleanup). */
  destroy(): void {
    const child = this.child;
    if (!child || !this.alive) return;
    this.expectingExit = true;
    try {
      child.kill('SIGCONT');
      child.kill('SIGKILL');
    } catch {
      // gone already
    }
  }
}

export interface ClusterEnv {
  databaseUrl: string;
  natsUrl: string;
  prefix: string;
  stream: string;
  /** `all` processes run shell tasks, so their API must require a token. */
  apiToken: string;
}

/** Builds the orchestrators of a run: `alls` × all and `workers` × worker. */
export async function orchestrators(
  o: ClusterOptions,
  env: ClusterEnv,
  counts: { alls: number; workers: number },
  onUnexpectedExit: (e: UnexpectedExit) => void,
): Promise<Orchestrator[]> {
  await mkdir(join(o.dir, 'logs'), { recursive: true });
  const common: Record<string, string> = {
    DATABASE_URL: env.databaseUrl,
    NATS_URL: env.natsUrl,
    NATS_PREFIX: env.prefix,
    NATS_STREAM: env.stream,
    DATA_DIR: join(o.dir, 'data'),
    WORKER_CONCURRENCY: String(o.workerConcurrency),
    LEASE_MS: String(o.leaseMs),
    HEARTBEAT_MS: String(o.heartbeatMs),
    TIMER_POLL_MS: '200',
    RETRY_BASE_MS: '200',
    MAX_ATTEMPTS: '8',
    STUCK_AFTER_MS: '3600000',
    DIAGNOSTIC_COOLDOWN_MS: '3600000',
    SHUTDOWN_GRACE_MS: '3000',
    ENABLE_SHELL_EXECUTOR: '1',
    API_TOKEN: env.apiToken,
    // The executions log names the worker that ran each shell task.
    SHELL_ENV_PASSTHROUGH: 'WORKER_ID',
    // The harness may run as root (CI does): its shell tasks are its own.
    ...(process.getuid?.() === 0 ? { SHELL_ALLOW_ROOT: '1' } : {}),
    RECONCILE_MS: '2000',
    CLAIM_MAX_WAIT_MS: '5000',
    LOG_LEVEL: o.logLevel,
    ...o.env,
  };
  const out: Orchestrator[] = [];
  const make = async (name: string, role: Role) => {
    // A worker's port is its OPS_PORT: a fixed one, so its probes survive a restart.
    const port = await freePort();
    out.push(
      new Orchestrator(
        name,
        role,
        port,
        common,
        join(o.dir, 'logs', `${name}.log`),
        onUnexpectedExit,
      ),
    );
  };
  for (let i = 1; i <= counts.alls; i++) await make(`a${i}`, 'all');
  for (let i = 1; i <= counts.workers; i++) await make(`w${i}`, 'worker');
  note(
    `orchestrators: ${out.map((p) => `${p.name}(${p.role}${p.port ? `:${p.port}` : ''})`).join(' ')}`,
  );
  return out;
}

/** What a harness run started, as its module holds it at the moment of cleaning up. */
export interface Started {
  dir: string | null;
  db: Database | null;
  nats: Nats | null;
  procs: Orchestrator[];
}

/**
 * The cleanup of a harness run (chaos, soak): its processes and nats-server killed, its
 * database dropped and its directory removed, or both kept (and named) with `keep`. Runs
 * once however often it is called; on SIGINT, SIGTERM or SIGHUP it runs and the run exits.
 */
export function harnessCleanup(started: () => Started, keep: boolean): () => Promise<void> {
  let cleaning: Promise<void> | null = null;
  const cleanup = () => {
    cleaning ??= (async () => {
      const { dir, db, nats, procs } = started();
      for (const p of procs) p.destroy();
      await nats?.stop('SIGKILL').catch(() => {});
      if (keep) {
        note(`kept: ${dir ?? '(no dir)'}${db ? `, database ${db.name}` : ''}`);
        return;
      }
      await db?.drop().catch((e: unknown) => note(`could not drop ${db.name}: ${errorText(e)}`));
      if (dir) await rm(dir, { recursive: true, force: true }).catch(() => {});
    })();
    return cleaning;
  };
  for (const signal of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) {
    process.on(signal, () => {
      note(`${signal}: cleaning up`);
      void cleanup().finally(() => process.exit(130));
    });
  }
  return cleanup;
}
