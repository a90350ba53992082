/**
 * Configuration from the environment, validated once at start. A bad value stops the
 * process with one line per problem; defaults live here and in the README's table.
 */
import { hostname } from 'node:os';
import { z } from 'zod';

const int = (def: number, min = 0) => z.coerce.number().int().min(min).default(def);
const flag = z
  .enum(['0', '1', 'true', 'false', ''])
  .default('0')
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

export const configSchema = z.object({
  DATABASE_URL: z.url().optional(),
  NATS_URL: z.string().min(1).optional(),
  PORT: int(3000).pipe(z.number().max(65_535)),
  HOST: z.string().default('127.0.0.1'),
  API_TOKEN: z.string().min(1).optional(),
  WORKER_ID: z.string().min(1).default(`${hostname()}-${process.pid}`),
  WORKER_CONCURRENCY: int(4),
  LEASE_MS: int(30_000, 100),
  HEARTBEAT_MS: int(10_000, 10),
  TIMER_POLL_MS: int(1_000, 10),
  MAX_ATTEMPTS: int(3, 1),
  RETRY_BASE_MS: int(1_000, 1),
  STUCK_AFTER_MS: int(600_000, 100),
  DIAGNOSTIC_COOLDOWN_MS: int(1_800_000, 0),
  SHUTDOWN_GRACE_MS: int(10_000, 0),
  ENABLE_SHELL_EXECUTOR: flag,
  SHELL_TIMEOUT_MS: int(600_000, 100),
  TASK_TYPE_LIMITS: limits,
  CLAIM_MAX_WAIT_MS: int(30_000, 0),
  BODY_LIMIT_BYTES: int(1_048_576, 1),
  RECONCILE_MS: int(30_000, 100),
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

/** A test or embedded configuration: defaults plus overrides, no environment read. */
export function configWith(overrides: Partial<Record<keyof Config, string>>): Config {
  return loadConfig(overrides as NodeJS.ProcessEnv);
}
