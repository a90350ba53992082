/**
 * Configuration from the environment, validated once at start. A bad value stops the
 * process with one line per problem; defaults live here and in the README's table.
 */
import { hostname } from 'node:os';
import { z } from 'zod';

const int = (def: number, min = 0) => z.coerce.number().int().min(min).default(def);
/** The longest delay Node's timers hold: past 2^31-1 ms they overflow and fire at once. */
export const MAX_TIMER_MS = 2_147_483_647;
/** A duration that ends up in a timer (setTimeout or a durable `after` delay). */
const ms = (def: number, min = 0) => int(def, min).pipe(z.number().max(MAX_TIMER_MS));
const flag = z
  .enum(['0', '1', 'true', 'false', ''])
  .default('0')
  .transform((v) => v === '1' || v === 'true');
/** A flag that is on unless set to 0 or false. */
const onFlag = z
  .enum(['0', '1', 'true', 'false'])
  .default('1')
  .transform((v) => v === '1' || v === 'true');

/** `implement_feature=2,deploy=1`: cluster-wide caps on claimed/running tasks per type. */
const limits = z
  .string()
  .default('')
  .transform((raw, ctx) => {
    const out: Record<string, number> = {};
    for (const part of raw
      .split(',')
      .map((p) => p.trim())
      .filter(Boolean)) {
      const m = /^([A-Za-z0-9_.:-]+)=(\d+)$/.exec(part);
      if (!m?.[1] || !m[2]) {
        ctx.addIssue({ code: 'custom', message: `"${part}" is not type=N` });
        continue;
      }
      out[m[1]] = Number(m[2]);
    }
    return out;
  });

/** `AWS_REGION,GIT_AUTHOR_NAME`: environment variable names. */
const names = z
  .string()
  .default('')
  .transform((raw, ctx) => {
    const out: string[] = [];
    for (const part of raw
      .split(',')
      .map((p) => p.trim())
      .filter(Boolean)) {
      if (!/^[A-Za-z_][A-Za-z0-9_]{0,127}$/.test(part)) {
        ctx.addIssue({ code: 'custom', message: `"${part}" is not a variable name` });
        continue;
      }
      out.push(part);
    }
    return out;
  });

export const configSchema = z.object({
  DATABASE_URL: z.url().optional(),
  NATS_URL: z.string().min(1).optional(),
  PORT: int(3000).pipe(z.number().max(65_535)),
  HOST: z.string().default('127.0.0.1'),
  /**
   * A second listener (on HOST) serving only /healthz, /readyz and /metrics, in any role: how
   * a `worker` process, which has no API, is probed and scraped. Unset: none; 0: any free port.
   */
  OPS_PORT: z.coerce.number().int().min(0).max(65_535).optional(),
  API_TOKEN: z.string().min(1).optional(),
  WORKER_ID: z.string().min(1).default(`${hostname()}-${process.pid}`),
  WORKER_CONCURRENCY: int(4),
  /**
   * Tasks per slot the built-in workers may hold claimed, not started, while their tasks are
   * short (mean run under 50 ms, so at most about 0.4 s of work waits per slot): slots begin
   * them without waiting for a claim, and settles and claims share bigger transactions.
   * 0: none.
   */
  WORKER_CLAIM_AHEAD: int(8).pipe(z.number().max(64)),
  LEASE_MS: ms(30_000, 100),
  HEARTBEAT_MS: ms(10_000, 10),
  TIMER_POLL_MS: ms(1_000, 10),
  MAX_ATTEMPTS: int(3, 1),
  RETRY_BASE_MS: ms(1_000, 1),
  STUCK_AFTER_MS: ms(600_000, 100),
  DIAGNOSTIC_COOLDOWN_MS: ms(1_800_000, 0),
  SHUTDOWN_GRACE_MS: ms(10_000, 0),
  ENABLE_SHELL_EXECUTOR: flag,
  SHELL_TIMEOUT_MS: ms(600_000, 100),
  /** Shell tasks refuse to run as uid 0 unless this is set. */
  SHELL_ALLOW_ROOT: flag,
  /** Extra variable names passed to shell tasks, besides PATH, HOME, LANG and TASK_*. */
  SHELL_ENV_PASSTHROUGH: names,
  /** `payload.cwd` must resolve inside this directory (default: the process's cwd). */
  SHELL_CWD_ROOT: z.string().min(1).optional(),
  /** Cap, in bytes of JSON, of a task's `payload` and of its `result`. */
  PAYLOAD_MAX_BYTES: int(262_144, 1_024).pipe(z.number().max(16_777_216)),
  /** Bytes of actor snapshots kept in memory per process. */
  ACTOR_CACHE_MAX_BYTES: int(67_108_864, 0),
  /** Units of work committed together in one transaction at most (group commit; 1: off). */
  COMMIT_BATCH_MAX: int(32, 1).pipe(z.number().max(1_000)),
  /**
   * Write transactions in flight at once per process; units queue while all are busy. The
   * default is the host's (`DEFAULT_COMMIT_LANES`, where the reason is).
   */
  COMMIT_LANES: int(4, 1).pipe(z.number().max(64)),
  /** Concurrent SSE clients per process (503 beyond). */
  SSE_MAX_CLIENTS: int(256, 1),
  /** Concurrent long-poll claims waiting per process (503 beyond). */
  CLAIM_MAX_WAITERS: int(1_024, 1),
  /** Path of a NATS credentials file (JWT + nkey seed). */
  NATS_CREDS: z.string().min(1).optional(),
  /** TLS to NATS: CA bundle, client certificate and key (PEM paths); any one turns TLS on. */
  NATS_TLS_CA: z.string().min(1).optional(),
  NATS_TLS_CERT: z.string().min(1).optional(),
  NATS_TLS_KEY: z.string().min(1).optional(),
  TASK_TYPE_LIMITS: limits,
  CLAIM_MAX_WAIT_MS: ms(30_000, 0),
  BODY_LIMIT_BYTES: int(1_048_576, 1),
  RECONCILE_MS: ms(30_000, 100),
  /**
   * A task's settlement reaches its ticket from the process that committed it, right after
   * the commit (src/transport/early-reactions.ts); 0 leaves it to the consumers alone.
   */
  EARLY_REACTIONS: onFlag,
  /** How often each process checks the queue tables for dead rows (0: never; autovacuum only). */
  VACUUM_INTERVAL_MS: ms(30_000, 0),
  /** Dead rows that make a queue table (events, tasks, timers) due for a vacuum. */
  VACUUM_DEAD_ROWS: int(10_000, 100),
  /**
   * How long an Idempotency-Key's stored response is kept (ms; 0: forever). A retry within it
   * replays the first answer; after it the key may be forgotten and the same key makes a new
   * request. At most a year.
   */
  IDEMPOTENCY_KEY_TTL_MS: int(86_400_000, 0).pipe(z.number().max(31_536_000_000)),
  /**
   * The oldest event the JetStream event stream keeps (ms; 0: forever). Postgres holds the
   * event log; the stream only carries it to consumers and live feeds, which catch up from
   * Postgres, and the reconciler re-derives a reaction whose message aged out unread. Without
   * a bound the stream's files grow for as long as the deployment runs. At least an hour.
   */
  EVENT_STREAM_MAX_AGE_MS: int(604_800_000, 0)
    .pipe(z.number().max(315_360_000_000))
    .refine((v) => v === 0 || v >= 3_600_000, 'must be 0 (forever) or at least 3600000 (an hour)'),
  /** Postgres connections per process (plus one for LISTEN). */
  DB_POOL_MAX: int(10, 2).pipe(z.number().max(1_000)),
  LOG_LEVEL: z.enum(['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent']).default('info'),
  /** NATS subject prefix and stream names: distinct values let tenants and tests share a server. */
  NATS_PREFIX: z
    .string()
    .regex(/^[A-Za-z0-9_-]+$/)
    .default('orch'),
  NATS_STREAM: z
    .string()
    .regex(/^[A-Za-z0-9_-]+$/)
    .default('ORCH_EVENTS'),
  DATA_DIR: z.string().default('./.data'),
  /** Bytes of output text kept per task; past it the oldest chunks go (`truncated`). */
  OUTPUT_MAX_BYTES: int(1_048_576, 256).pipe(z.number().max(1_073_741_824)),
  /** Every `*.json` here is registered as a workflow at start (CONTRACT section 5). */
  WORKFLOWS_DIR: z.string().min(1).optional(),
});

export type Config = z.output<typeof configSchema>;

export class ConfigError extends Error {
  constructor(readonly problems: string[]) {
    super(`invalid configuration:\n${problems.map((p) => `  ${p}`).join('\n')}`);
    this.name = 'ConfigError';
  }
}

/** Reads the known variables from `env`; empty strings count as unset. */
export function loadConfig(env: NodeJS.ProcessEnv = process.env): Config {
  const known = Object.keys(configSchema.shape);
  const input = Object.fromEntries(
    known.filter((k) => env[k] !== undefined && env[k] !== '').map((k) => [k, env[k]]),
  );
  const parsed = configSchema.safeParse(input);
  if (!parsed.success) {
    throw new ConfigError(
      parsed.error.issues.map((i) => {
        const key = String(i.path[0] ?? '?');
        return `${key}=${JSON.stringify(env[key] ?? '')}: ${i.message}`;
      }),
    );
  }
  return parsed.data;
}

/**
 * What is wrong with `config` for a process of `role` only: a `worker` serves no API, so its
 * PORT is free for OPS_PORT; an `api` or `all` process cannot listen twice on one port.
 */
export function roleConfigProblems(config: Config, role: 'all' | 'api' | 'worker'): string[] {
  const ops = config.OPS_PORT;
  if (role !== 'worker' && ops !== undefined && ops !== 0 && ops === config.PORT) {
    return [`OPS_PORT=${ops}: must differ from PORT, where the API listens`];
  }
  return [];
}

/** A test or embedded configuration: defaults plus overrides, no environment read. */
export function configWith(overrides: Partial<Record<keyof Config, string>>): Config {
  return loadConfig(overrides as NodeJS.ProcessEnv);
}
