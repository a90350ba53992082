/**
 * The composition root: one process of the orchestrator in a given role. Every role runs the
 * machinery that keeps the system moving (durable timers, outbox relay, reactions,
 * reconciler), each safe in any number of processes; `api` adds the HTTP server, `worker`
 * the built-in executors, `all` both. `stop()` shuts down in dependency order.
 */
import type { AddressInfo } from 'node:net';
import { Commands } from './actors/commands.js';
import { ActorHost } from './actors/host.js';
import { TaskOutput } from './actors/output.js';
import { TimerPoller } from './actors/timer-poller.js';
import { workflowCompiler } from './actors/workflow-compiler.js';
import { WorkflowRegistry } from './actors/workflow-registry.js';
import type { Config } from './config.js';
import { createApp } from './http/app.js';
import { machineCatalog } from './http/machines.js';
import { family } from './http/metrics.js';
import { createOpsApp } from './http/ops-app.js';
import { startHttpServer } from './http/server.js';
import { startEmbeddedPostgres } from './infra/embedded-postgres.js';
import { resolveNats } from './infra/nats-child.js';
import type { Logger } from './log.js';
import { createSql, type Sql } from './persistence/db.js';
import { IdempotencyExpiry } from './persistence/idempotency-rows.js';
import { migrate, migrationsApplied } from './persistence/migrate.js';
import { Queries } from './persistence/queries.js';
import { QueueVacuum } from './persistence/queue-vacuum.js';
import { StateCountFolder } from './persistence/state-counts.js';
import { Transport } from './transport/index.js';
import { transportNames } from './transport/subjects.js';
import { ClaimService } from './workers/claims.js';
import { Wakeups } from './workers/wakeups.js';
import { createWorkerPool, type WorkerPool } from './workers/worker-pool.js';

export type Role = 'all' | 'api' | 'worker';
export const ROLES: readonly Role[] = ['all', 'api', 'worker'];

export interface Runtime {
  role: Role;
  /** The URL the HTTP server listens on (api and all). */
  url: string | null;
  /** The URL of the probes and metrics listener, when OPS_PORT is set. */
  opsUrl: string | null;
  databaseUrl: string;
  /** The embedded cluster's data directory, when no DATABASE_URL was given. */
  embeddedDataDir: string | null;
  natsUrl: string;
  host: ActorHost;
  sql: Sql;
  transport: Transport;
  workers: WorkerPool | null;
  stop(): Promise<void>;
}

type Closer = { name: string; close: () => Promise<unknown> };

/** A part still stopping after this long is named in a warning. */
const SLOW_STOP_MS = 5_000;
/** A part whose stop took this long is logged at info. */
const SLOW_PART_MS = 1_000;

export async function startRuntime(config: Config, role: Role, log: Logger): Promise<Runtime> {
  // Closers run in reverse order of start; a failure half-way still stops what started.
  const closers: Closer[] = [];
  const stopAll = async () => {
    for (const c of closers.reverse()) {
      // Each part's stop is logged, so a shutdown that hangs names the part it hangs in.
      const started = performance.now();
      log.debug({ part: c.name }, 'stopping');
      // At the default level too: a stop that outlasts a supervisor's grace names its part.
      const slow = setTimeout(
        () => log.warn({ part: c.name, ms: SLOW_STOP_MS }, 'still stopping'),
        SLOW_STOP_MS,
      );
      await c.close().catch((err: unknown) => log.warn({ err, part: c.name }, 'stop failed'));
      clearTimeout(slow);
      const ms = Math.round(performance.now() - started);
      // A slow part is worth a line at the default level: shutdowns that near a supervisor's
      // kill deadline then say where the time went.
      if (ms >= SLOW_PART_MS) log.info({ part: c.name, ms }, 'stopped, slowly');
      else log.debug({ part: c.name, ms }, 'stopped');
    }
    closers.length = 0;
  };
  try {
    let databaseUrl = config.DATABASE_URL;
    let embeddedDataDir: string | null = null;
    if (!databaseUrl) {
      const embedded = await startEmbeddedPostgres(config.DATA_DIR, log);
      closers.push({ name: 'embedded-postgres', close: embedded.stop });
      databaseUrl = embedded.url;
      embeddedDataDir = embedded.dataDir;
    }
    const nats = await resolveNats(config.NATS_URL, config.DATA_DIR, log);
    closers.push({ name: 'nats-server', close: nats.stop });

    const sql = createSql(databaseUrl, {
      max: config.DB_POOL_MAX,
      applicationName: `orchestrator-${role}`,
    });
    closers.push({ name: 'postgres', close: () => sql.end({ timeout: 5 }) });
    await sql`select 1`.catch((error: unknown) => {
      throw new Error(
        `PostgreSQL at ${redact(databaseUrl)} (DATABASE_URL) is not reachable: ${String(error)}`,
      );
    });
    const applied = await migrate(sql);
    if (applied.length > 0) log.info({ applied }, 'migrations applied');

    const workflows = new WorkflowRegistry(sql, workflowCompiler());
    await workflows.ensureBuiltIn();
    if (config.WORKFLOWS_DIR) {
      const registered = await workflows.registerDir(config.WORKFLOWS_DIR);
      log.info(
        { workflows: registered.map((w) => `${w.name}@${w.version}`) },
        'workflows registered',
      );
    }
    const host = new ActorHost(sql, {
      workflows,
      cacheMaxBytes: config.ACTOR_CACHE_MAX_BYTES,
      commitBatchMax: config.COMMIT_BATCH_MAX,
      commitLanes: config.COMMIT_LANES,
      taskDefaults: {
        maxAttempts: config.MAX_ATTEMPTS,
        leaseMs: config.LEASE_MS,
        retryBaseMs: config.RETRY_BASE_MS,
      },
    });
    const commands = new Commands(host, {
      stuckAfterMs: config.STUCK_AFTER_MS,
      diagnosticCooldownMs: config.DIAGNOSTIC_COOLDOWN_MS,
    });
    const wakeups = new Wakeups();
    const claims = new ClaimService(host, wakeups, {
      typeLimits: config.TASK_TYPE_LIMITS,
      maxWaitMs: config.CLAIM_MAX_WAIT_MS,
      maxWaiters: config.CLAIM_MAX_WAITERS,
    });

    const folder = new StateCountFolder(sql, log.child({ component: 'state-counts' }));
    folder.start();
    closers.push({ name: 'state-counts', close: () => folder.stop() });

    const vacuum = new QueueVacuum(sql, log.child({ component: 'vacuum' }), {
      intervalMs: config.VACUUM_INTERVAL_MS,
      deadRows: config.VACUUM_DEAD_ROWS,
    });
    vacuum.start();
    closers.push({ name: 'vacuum', close: () => vacuum.stop() });

    const expiry = new IdempotencyExpiry(sql, log.child({ component: 'idempotency' }), {
      ttlMs: config.IDEMPOTENCY_KEY_TTL_MS,
    });
    expiry.start();
    closers.push({ name: 'idempotency-expiry', close: () => expiry.stop() });

    const poller = new TimerPoller(host, sql, log.child({ component: 'timers' }), {
      pollMs: config.TIMER_POLL_MS,
    });
    await poller.start();
    closers.push({ name: 'timers', close: () => poller.stop() });

    const transport = await Transport.start({
      sql,
      host,
      log,
      natsUrl: nats.url,
      natsAuth: {
        credsFile: config.NATS_CREDS,
        tlsCaFile: config.NATS_TLS_CA,
        tlsCertFile: config.NATS_TLS_CERT,
        tlsKeyFile: config.NATS_TLS_KEY,
      },
      names: transportNames(config.NATS_PREFIX, config.NATS_STREAM),
      streamOptions: { maxAgeMs: config.EVENT_STREAM_MAX_AGE_MS },
      reconcileMs: config.RECONCILE_MS,
      earlyReactions: config.EARLY_REACTIONS,
    });
    closers.push({ name: 'transport', close: () => transport.stop() });
    const dispatch = transport.subscribeDispatch((msg) => claims.dispatched(msg));
    closers.push({ name: 'dispatch', close: async () => dispatch.unsubscribe() });

    const output = new TaskOutput(sql, { maxBytes: config.OUTPUT_MAX_BYTES, host });
    if (role !== 'worker') {
      // Only processes that serve the live output streams need to hear other processes' writes.
      await output.start();
      closers.push({ name: 'output', close: () => output.stop() });
    }

    let workers: WorkerPool | null = null;
    if (role !== 'api') {
      workers = createWorkerPool(host, claims, config, log, output);
      workers.start();
      const pool = workers;
      closers.push({ name: 'workers', close: () => pool.stop(config.SHUTDOWN_GRACE_MS) });
    }

    const queries = new Queries(sql, (ref) => host.machineOf('ticket', ref));
    // The probes and metrics every listener of this process serves (the API's, OPS_PORT's).
    const ops = {
      host,
      claims,
      queries,
      config,
      ready: async () => ({
        postgres: await sql`select 1`.then(
          () => true,
          () => false,
        ),
        nats: transport.connected(),
        migrations: await migrationsApplied(sql).catch(() => false),
      }),
      metrics: async () => {
        const parts = [await transport.prometheus()];
        if (workers) parts.push(workerMetrics(workers));
        parts.push(
          family('orch_timers_fired_total', 'counter', 'Durable timers this process fired.', [
            { value: poller.fired },
          ]),
          family(
            'orch_idempotency_keys_expired_total',
            'counter',
            'Stored Idempotency-Key responses this process deleted past IDEMPOTENCY_KEY_TTL_MS.',
            [{ value: expiry.expired }],
          ),
        );
        return parts.join('');
      },
    };
    const serve = async (
      name: string,
      fetch: Parameters<typeof startHttpServer>[0],
      port: number,
      variable: 'PORT' | 'OPS_PORT',
    ) => {
      const server = startHttpServer(fetch, { port, hostname: config.HOST });
      closers.push({
        name,
        close: () =>
          new Promise<void>((resolve) => {
            // Open SSE streams would hold close() forever: end them, then stop listening.
            server.close(() => resolve());
            server.closeAllConnections();
          }),
      });
      await new Promise<void>((resolve, reject) => {
        server.once('listening', () => resolve());
        server.once('error', (error: NodeJS.ErrnoException) =>
          reject(
            new Error(
              `cannot listen on ${config.HOST}:${port} (${variable}): ${error.code ?? error.message}`,
            ),
          ),
        );
      });
      return `http://${config.HOST}:${(server.address() as AddressInfo).port}`;
    };

    let opsUrl: string | null = null;
    if (config.OPS_PORT !== undefined) {
      opsUrl = await serve(
        'ops-http',
        createOpsApp({ ...ops, log: log.child({ component: 'ops-http' }) }).fetch,
        config.OPS_PORT,
        'OPS_PORT',
      );
    }

    let url: string | null = null;
    if (role !== 'worker') {
      const app = createApp({
        ...ops,
        commands,
        machines: machineCatalog(),
        workflows,
        log: log.child({ component: 'http' }),
        events: transport,
        output,
      });
      url = await serve('http', app.fetch, config.PORT, 'PORT');
    }

    // Closers run in reverse start order: HTTP first (no new commands), then the workers
    // finish or release their tasks, then the machinery, then the connections and servers.
    return {
      role,
      url,
      opsUrl,
      databaseUrl,
      embeddedDataDir,
      natsUrl: nats.url,
      host,
      sql,
      transport,
      workers,
      stop: stopAll,
    };
  } catch (error) {
    await stopAll();
    throw error;
  }
}

function workerMetrics(pool: WorkerPool): string {
  const s = pool.stats();
  const lines = [
    '# HELP orch_worker_slots Built-in worker slots in this process.',
    '# TYPE orch_worker_slots gauge',
    `orch_worker_slots ${s.slots}`,
    '# HELP orch_worker_running Tasks this process is executing now.',
    '# TYPE orch_worker_running gauge',
    `orch_worker_running ${s.running}`,
    '# HELP orch_worker_held Tasks this process holds claimed ahead, not started (WORKER_CLAIM_AHEAD).',
    '# TYPE orch_worker_held gauge',
    `orch_worker_held ${s.held}`,
    '# HELP orch_worker_events_total Worker outcomes in this process.',
    '# TYPE orch_worker_events_total counter',
    ...(['claims', 'completions', 'failures', 'releases', 'leaseLosses'] as const).map(
      (k) => `orch_worker_events_total{outcome="${k}"} ${s[k]}`,
    ),
  ];
  return `${lines.join('\n')}\n`;
}

/** A database URL without its password, for messages. */
export function redact(url: string): string {
  try {
    const u = new URL(url);
    if (u.password) u.password = '***';
    return u.toString();
  } catch {
    return '(unparseable URL)';
  }
}
