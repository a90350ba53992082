/**
 * A reaction's consumer stops in bounded time even when its loop is inside a JetStream call
 * that does not answer (after NATS came back, a consumer lookup or re-creation answers only at
 * its timeout, one call after another): the process's shutdown does not wait on it, and the
 * loop takes nothing once it was stopped.
 */
import { jetstream } from '@nats-io/jetstream';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { ActorHost } from '../../src/actors/host.js';
import { silentLogger } from '../../src/log.js';
import { ConsumerRunner, DEFAULT_CONSUMER_SETTINGS } from '../../src/transport/consumer-runner.js';
import { taskStateReaction } from '../../src/transport/reactions.js';
import { ensureStreams } from '../../src/transport/streams.js';
import { createTestDatabase, type TestDatabase } from '../support/database.js';
import { TASK_DEFAULTS } from '../support/fixtures.js';
import { type NatsAdmin, natsAdmin, testNames } from '../support/transport.js';

const names = testNames();
let db: TestDatabase;
let admin: NatsAdmin;
beforeAll(async () => {
  db = await createTestDatabase('consumer_stop');
  admin = await natsAdmin();
  await ensureStreams(admin.jsm, names);
});
afterAll(async () => {
  await admin.close([names]);
  await db.drop();
});

it('stops within its bound while its loop waits on a JetStream call that never answers', async () => {
  const js = jetstream(admin.nc);
  let lookups = 0;
  let answer: (() => void) | null = null;
  // The consumer's lookup hangs until the test lets it answer, long after the stop.
  const hanging = new Proxy(js, {
    get(target, key, receiver) {
      if (key !== 'consumers') return Reflect.get(target, key, receiver);
      const consumers = target.consumers;
      return new Proxy(consumers, {
        get(c, k, r) {
          if (k !== 'get') return Reflect.get(c, k, r);
          return (...args: Parameters<typeof consumers.get>) => {
            lookups++;
            return new Promise((resolve) => {
              answer = () => resolve(consumers.get(...args));
            });
          };
        },
      });
    },
  });
  const runner = new ConsumerRunner({
    nc: admin.nc,
    js: hanging,
    jsm: admin.jsm,
    sql: db.sql,
    host: new ActorHost(db.sql, { taskDefaults: TASK_DEFAULTS }),
    names,
    log: silentLogger(),
    reaction: taskStateReaction,
    settings: DEFAULT_CONSUMER_SETTINGS,
    ensureStreams: () => ensureStreams(admin.jsm, names),
  });
  await runner.start();
  await new Promise((resolve) => setTimeout(resolve, 100));
  expect(lookups).toBe(1);
  const started = performance.now();
  await runner.stop();
  const ms = performance.now() - started;
  expect(ms).toBeLessThan(5_000);
  expect(ms).toBeGreaterThanOrEqual(1_900);
  // The lookup answers after the stop: the loop ends there and starts no consumption.
  (answer as (() => void) | null)?.();
  await new Promise((resolve) => setTimeout(resolve, 300));
  const info = await admin.jsm.consumers.info(names.stream, taskStateReaction.name);
  expect(info.num_waiting).toBe(0);
  expect(lookups).toBe(1);
});
