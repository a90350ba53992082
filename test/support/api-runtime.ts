/**
 * A real `api` runtime in this process for client tests: its own database and NATS
 * stream, a free port, and a `stop()` that removes all of it.
 */
import { type Config, configWith } from '../../src/config.js';
import { silentLogger } from '../../src/log.js';
import { type Runtime, startRuntime } from '../../src/runtime.js';
import type { TransportNames } from '../../src/transport/subjects.js';
import { createTestDatabase, type TestDatabase } from './database.js';
import { NATS_URL, natsAdmin, testNames } from './transport.js';

export interface ApiRuntime {
  url: string;
  runtime: Runtime;
  db: TestDatabase;
  stop(): Promise<void>;
}

/** A test runtime's configuration: its database and stream, a free port, `over` on top. */
export function testRuntimeConfig(
  db: TestDatabase,
  names: TransportNames,
  over: Partial<Record<keyof Config, string>> = {},
): Config {
  return configWith({
    DATABASE_URL: db.url,
    NATS_URL,
    NATS_PREFIX: names.prefix,
    NATS_STREAM: names.stream,
    PORT: '0',
    TIMER_POLL_MS: '100',
    ...over,
  });
}

export async function startApi(
  label: string,
  config: Partial<Record<keyof Config, string>> = {},
): Promise<ApiRuntime> {
  const names = testNames();
  const db = await createTestDatabase(label);
  const runtime = await startRuntime(testRuntimeConfig(db, names, config), 'api', silentLogger());
  return {
    url: runtime.url!,
    runtime,
    db,
    async stop() {
      await runtime.stop();
      const admin = await natsAdmin();
      await admin.close([names]);
      await db.drop();
    },
  };
}
