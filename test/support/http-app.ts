/**
 * The HTTP app over real services on a test database of its own: a real ActorHost,
 * Commands, ClaimService and Queries; the event stream and readiness are injectable.
 */
import { Commands } from '../../src/actors/commands.js';
import { ActorHost } from '../../src/actors/host.js';
import { type Config, configWith } from '../../src/config.js';
import { type AppServices, createApp } from '../../src/http/app.js';
import { machineCatalog } from '../../src/http/machines.js';
import { type Logger, silentLogger } from '../../src/log.js';
import { Queries } from '../../src/persistence/queries.js';
import { ClaimService } from '../../src/workers/claims.js';
import { Wakeups } from '../../src/workers/wakeups.js';
import { createTestDatabase, type TestDatabase } from './database.js';
import { TASK_DEFAULTS } from './fixtures.js';

export interface TestApp {
  db: TestDatabase;
  host: ActorHost;
  claims: ClaimService;
  services: AppServices;
  app: ReturnType<typeof createApp>;
  call(
    method: string,
    path: string,
    body?: unknown,
    headers?: Record<string, string>,
  ): Promise<Reply>;
  close(): Promise<void>;
}

export interface Reply {
  status: number;
  headers: Headers;
  // biome-ignore lint/suspicious/noExplicitAny: tests read arbitrary JSON bodies
  body: any;
  text: string;
}

export interface TestAppOptions {
  config?: Partial<Record<keyof Config, string>>;
  log?: Logger;
  services?: Partial<AppServices>;
  db?: TestDatabase;
}

export async function createTestApp(label: string, options: TestAppOptions = {}): Promise<TestApp> {
  const db = options.db ?? (await createTestDatabase(label));
  const config = configWith({ CLAIM_MAX_WAIT_MS: '5000', ...options.config });
  const host = new ActorHost(db.sql, { taskDefaults: TASK_DEFAULTS });
  const commands = new Commands(host, {
    stuckAfterMs: 3_600_000,
    diagnosticCooldownMs: 3_600_000,
  });
  const claims = new ClaimService(host, new Wakeups(), {
    typeLimits: {},
    maxWaitMs: config.CLAIM_MAX_WAIT_MS,
    pollMs: 200,
    maxWaiters: config.CLAIM_MAX_WAITERS,
  });
  const services: AppServices = {
    host,
    commands,
    claims,
    queries: new Queries(db.sql, (ref) =>
      (options.services?.host ?? host).machineOf('ticket', ref),
    ),
    machines: machineCatalog(),
    log: options.log ?? silentLogger(),
    config,
    ready: async () => ({ postgres: true, nats: true, migrations: true }),
    ...options.services,
  };
  const app = createApp(services);
  const call: TestApp['call'] = async (method, path, body, headers = {}) => {
    const init: RequestInit = { method, headers: { ...headers } };
    if (body !== undefined) {
      init.body = typeof body === 'string' ? body : JSON.stringify(body);
      (init.headers as Record<string, string>)['content-type'] ??= 'application/json';
    }
    const res = await app.request(path, init);
    const text = await res.text();
    let parsed: unknown = null;
    try {
      parsed = text ? JSON.parse(text) : null;
    } catch {
      parsed = text;
    }
    return { status: res.status, headers: res.headers, body: parsed, text };
  };
  return {
    db,
    host,
    claims,
    services,
    app,
    call,
    async close() {
      claims.close();
      if (!options.db) await db.drop();
    },
  };
}
