/**
 * A reaction's consumer keeps no message once it is done with it. Its loop raced each wait
 * for a message against one promise that lived as long as the runner (the stop signal), and
 * every race left a reaction on that promise holding its batch's first message: a process's
 * heap grew by every batch it ever consumed (found by `npm run soak`). The messages here are
 * watched through weak references, after forced collections.
 */
import { setFlagsFromString } from 'node:v8';
import { runInNewContext } from 'node:vm';
import { type JetStreamClient, type JsMsg, jetstream } from '@nats-io/jetstream';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { ActorHost } from '../../src/actors/host.js';
import { silentLogger } from '../../src/log.js';
import { ConsumerRunner, DEFAULT_CONSUMER_SETTINGS } from '../../src/transport/consumer-runner.js';
import type { DirectReaction } from '../../src/transport/reactions.js';
import { ensureStreams } from '../../src/transport/streams.js';
import { allEventsSubject } from '../../src/transport/subjects.js';
import { createTestDatabase, type TestDatabase } from '../support/database.js';
import { TASK_DEFAULTS, ticketInput } from '../support/fixtures.js';
import {
  commandsFor,
  eventually,
  type NatsAdmin,
  natsAdmin,
  startTransport,
  testNames,
} from '../support/transport.js';

setFlagsFromString('--expose_gc');
const gc = runInNewContext('gc') as () => void;

const names = testNames();
let db: TestDatabase;
let admin: NatsAdmin;
beforeAll(async () => {
  db = await createTestDatabase('consumer_memory');
  admin = await natsAdmin();
  await ensureStreams(admin.jsm, names);
});
afterAll(async () => {
  await admin.close([names]);
  await db.drop();
});

/** The client, with a weak reference kept to every message its consumers hand out. */
function watched(js: JetStreamClient, refs: WeakRef<JsMsg>[]): JetStreamClient {
  const consumers = new Proxy(js.consumers, {
    get(target, key) {
      const value = Reflect.get(target, key, target);
      if (key !== 'get') return typeof value === 'function' ? value.bind(target) : value;
      return async (...args: Parameters<typeof target.get>) => {
        const consumer = await target.get(...args);
        return new Proxy(consumer, {
          get(c, k) {
            const v = Reflect.get(c, k, c);
            if (k !== 'consume') return typeof v === 'function' ? v.bind(c) : v;
            return async (...a: Parameters<typeof consumer.consume>) => {
              const messages = await consumer.consume(...a);
              return new Proxy(messages, {
                get(m, mk) {
                  const mv = Reflect.get(m, mk, m);
                  if (mk !== Symbol.asyncIterator)
                    return typeof mv === 'function' ? mv.bind(m) : mv;
                  return () => {
                    const it = messages[Symbol.asyncIterator]();
                    return {
                      next: async () => {
                        const r = await it.next();
                        if (!r.done) refs.push(new WeakRef(r.value));
                        return r;
                      },
                      return: it.return?.bind(it),
                      [Symbol.asyncIterator]() {
                        return this;
                      },
                    };
                  };
                },
              });
            };
          },
        });
      };
    },
  });
  return new Proxy(js, {
    get(target, key) {
      if (key === 'consumers') return consumers;
      const value = Reflect.get(target, key, target);
      return typeof value === 'function' ? value.bind(target) : value;
    },
  });
}

it('holds none of the messages of the batches it finished', async () => {
  const host = new ActorHost(db.sql, { taskDefaults: TASK_DEFAULTS });
  const commands = commandsFor(host);
  const relay = await startTransport(db.sql, host, names, {
    reactions: () => [],
    enableReconciler: false,
  });
  const refs: WeakRef<JsMsg>[] = [];
  let seen = 0;
  const probe: DirectReaction = {
    kind: 'direct',
    name: 'memory_probe',
    filterSubject: allEventsSubject,
    accepts: () => true,
    run: async () => {
      seen++;
    },
  };
  const runner = new ConsumerRunner({
    nc: admin.nc,
    js: watched(jetstream(admin.nc), refs),
    jsm: admin.jsm,
    sql: db.sql,
    host,
    names,
    log: silentLogger(),
    reaction: probe,
    settings: DEFAULT_CONSUMER_SETTINGS,
    ensureStreams: () => ensureStreams(admin.jsm, names),
  });
  await runner.start();
  try {
    // One ticket at a time, each relayed before the next: many small batches.
    const tickets = 120;
    for (let i = 0; i < tickets; i++) {
      await host.transact((u) => commands.createTicket(u, ticketInput()));
      await eventually(() => seen > i, 10_000, `delivery ${i + 1}`);
    }
    expect(refs.length).toBeGreaterThanOrEqual(tickets);
    let alive = Number.POSITIVE_INFINITY;
    for (let round = 0; round < 5 && alive > 2; round++) {
      // A weak reference read in this turn keeps its target: collect, then look next turn.
      await new Promise((resolve) => setTimeout(resolve, 50));
      gc();
      await new Promise((resolve) => setImmediate(resolve));
      gc();
      alive = refs.filter((r) => r.deref() !== undefined).length;
    }
    // At most the batch in hand; before the fix, every batch's first message stayed.
    expect(alive).toBeLessThanOrEqual(2);
  } finally {
    await runner.stop();
    await relay.stop();
  }
});
