/**
 * The event stream's retention as the runtime sets it: EVENT_STREAM_MAX_AGE_MS becomes the
 * stream's max_age when the stream is created, and a later start with another value changes
 * the existing stream (an upgrade from a version that kept every event forever).
 */
import { afterAll, beforeAll, expect, it } from 'vitest';
import { silentLogger } from '../../src/log.js';
import { startRuntime } from '../../src/runtime.js';
import { testRuntimeConfig } from '../support/api-runtime.js';
import { createTestDatabase, type TestDatabase } from '../support/database.js';
import { type NatsAdmin, natsAdmin, testNames } from '../support/transport.js';

const names = testNames();
let db: TestDatabase;
let admin: NatsAdmin;
beforeAll(async () => {
  db = await createTestDatabase('event_stream_retention');
  admin = await natsAdmin();
});
afterAll(async () => {
  await admin.close([names]);
  await db.drop();
});

async function startAndStop(maxAgeMs: string | undefined): Promise<number> {
  const over = maxAgeMs !== undefined ? { EVENT_STREAM_MAX_AGE_MS: maxAgeMs } : {};
  const runtime = await startRuntime(testRuntimeConfig(db, names, over), 'api', silentLogger());
  try {
    return (await admin.jsm.streams.info(names.stream)).config.max_age;
  } finally {
    await runtime.stop();
  }
}

it('creates the stream with the configured max age, and changes it on a later start', async () => {
  const NS_PER_MS = 1_000_000;
  expect(await startAndStop(undefined)).toBe(604_800_000 * NS_PER_MS);
  expect(await startAndStop('3600000')).toBe(3_600_000 * NS_PER_MS);
  expect(await startAndStop('0')).toBe(0);
  // The dead-letter stream keeps what it holds for an operator to read.
  expect((await admin.jsm.streams.info(names.dlqStream)).config.max_age).toBe(0);
});
