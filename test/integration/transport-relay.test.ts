/**
 * The outbox relay against a real NATS and Postgres: per-entity order with msg ids = event
 * ids, deduplication of a publish repeated after a crash, NATS unreachable at start, two
 * relays at once, a stream that lost its messages (deleted and recreated), and events the
 * server cannot take (larger than max_payload, or refused): per-row backoff, reduced form.
 */
import { type AddressInfo, createServer, connect as netConnect, type Socket } from 'node:net';
import { jetstream } from '@nats-io/jetstream';
import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { ActorHost } from '../../src/actors/host.js';
import { Unavailable } from '../../src/errors.js';
import { silentLogger } from '../../src/log.js';
import type { Sql } from '../../src/persistence/db.js';
import {
  lockRelay,
  recordedStreamSeq,
  unpublishedCount,
} from '../../src/persistence/outbox-rows.js';
import type { Transport } from '../../src/transport/index.js';
import { OutboxRelay } from '../../src/transport/outbox-relay.js';
import { ensureStreams } from '../../src/transport/streams.js';
import { eventSubject, type TransportNames } from '../../src/transport/subjects.js';
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

/**
 * A database is bound to one event stream (it records the stream's sequences), so each test
 * gets a database and a stream of its own.
 */
let db: TestDatabase;
let admin: NatsAdmin;
const allNames: TransportNames[] = [];
const dbs: TestDatabase[] = [];
const transports: Transport[] = [];

beforeAll(async () => {
  admin = await natsAdmin();
});
beforeEach(async () => {
  db = await createTestDatabase('transport_relay');
  dbs.push(db);
});
// Postgres connections are shared with other suites: free each test's before the next.
afterEach(async () => {
  await Promise.all(transports.splice(0).map((t) => t.stop()));
  await Promise.all(dbs.splice(0).map((d) => d.drop()));
});
afterAll(async () => {
  await admin.close(allNames);
});

function names(): TransportNames {
  const n = testNames();
  allNames.push(n);
  return n;
}

async function publishOnly(sql: Sql, host: ActorHost, n: TransportNames) {
  const t = await startTransport(sql, host, n, { reactions: () => [], enableReconciler: false });
  transports.push(t);
  return t;
}

/** Tickets with several events each: created, phase_changed, then BLOCK/UNBLOCK pairs. */
async function makeEvents(host: ActorHost, tickets: number, pairs: number): Promise<string[]> {
  const ids: string[] = [];
  await Promise.all(
    Array.from({ length: tickets }, async () => {
      const t = await host.create('ticket', ticketInput());
      ids.push(t.id);
      await host.send('ticket', t.id, { type: 'START' });
      for (let i = 0; i < pairs; i++) {
        await host.send('ticket', t.id, { type: 'BLOCK', reason: `r${i}` });
        await host.send('ticket', t.id, { type: 'UNBLOCK' });
      }
    }),
  );
  return ids;
}

/** Events not yet published: after the relay's cursor, or held. */
function outboxCount(sql: Sql): Promise<number> {
  return unpublishedCount(sql);
}

interface StreamMsg {
  seq: number;
  subject: string;
  msgId: string | undefined;
  entry: {
    eventId: string;
    entityId: string;
    seq: number;
    type: string;
    data: Record<string, unknown>;
  };
}

async function streamMessages(n: TransportNames): Promise<StreamMsg[]> {
  const info = await admin.jsm.streams.info(n.stream);
  const out: StreamMsg[] = [];
  if (info.state.messages === 0) return out;
  const seqs: number[] = [];
  for (let seq = info.state.first_seq; seq <= info.state.last_seq; seq++) seqs.push(seq);
  // Many requests in flight at once: read one by one, 1,400 messages took over a minute on a
  // loaded machine (one request-reply each).
  for (let i = 0; i < seqs.length; i += 100) {
    const got = await Promise.all(
      seqs.slice(i, i + 100).map(async (seq) => {
        const m = await admin.jsm.streams.getMessage(n.stream, { seq });
        if (!m) return null;
        return {
          seq,
          subject: m.subject,
          msgId: m.header.get('Nats-Msg-Id') || undefined,
          entry: m.json(),
        } as StreamMsg;
      }),
    );
    for (const m of got) if (m) out.push(m);
  }
  return out;
}

async function stateOf(sql: Sql, ticketId: string): Promise<string | undefined> {
  const rows = await sql<{ state: string }[]>`select state from tickets where id = ${ticketId}`;
  return rows[0]?.state;
}

async function streamCount(n: TransportNames): Promise<number> {
  return (await admin.jsm.streams.info(n.stream)).state.messages;
}

async function eventCount(sql: Sql, ids: string[]): Promise<number> {
  const rows = await sql<
    { n: number }[]
  >`select count(*)::int as n from events where entity_id in ${sql(ids)}`;
  return rows[0]?.n ?? 0;
}

/** A TCP proxy in front of NATS: closing it is NATS going down for this client. */
async function natsProxy(port = 0): Promise<{ port: number; close(): Promise<void> }> {
  const sockets = new Set<Socket>();
  let closing = false;
  const server = createServer((client) => {
    if (closing) {
      client.destroy();
      return;
    }
    const upstream = netConnect(4222, '127.0.0.1');
    sockets.add(client);
    sockets.add(upstream);
    const drop = () => {
      client.destroy();
      upstream.destroy();
      sockets.delete(client);
      sockets.delete(upstream);
    };
    for (const s of [client, upstream]) {
      s.on('error', drop);
      s.on('close', drop);
    }
    client.pipe(upstream).pipe(client);
  });
  await new Promise<void>((resolve) => server.listen(port, '127.0.0.1', resolve));
  return {
    port: (server.address() as AddressInfo).port,
    close: () =>
      new Promise<void>((resolve) => {
        // Stop accepting first: a client reconnecting at once must not keep the server open.
        closing = true;
        server.close(() => resolve());
        for (const s of sockets) s.destroy();
      }),
  };
}

/** A relay of the test's own (no stream check), driven by hand or started. */
function relayOn(
  sql: Sql,
  n: TransportNames,
  over: Partial<ConstructorParameters<typeof OutboxRelay>[0]> = {},
): OutboxRelay {
  return new OutboxRelay({
    sql,
    nc: admin.nc,
    jsm: admin.jsm,
    names: n,
    log: silentLogger(),
    streamCheckMs: 0,
    ...over,
  });
}

describe('outbox relay', () => {
  it('drains in per-entity order with Nats-Msg-Id = event id and records the last stream seq', async () => {
    const sql = db.sql;
    const host = new ActorHost(sql, { taskDefaults: TASK_DEFAULTS });
    const n = names();
    const ids = await makeEvents(host, 20, 3); // 20 × 8 events, committed before the relay runs
    expect(await outboxCount(sql)).toBe(160);
    await publishOnly(sql, host, n);
    await eventually(async () => (await outboxCount(sql)) === 0, 15_000, 'outbox drained');

    const msgs = await streamMessages(n);
    expect(msgs).toHaveLength(160);
    const events = await sql<{ event_id: string; entity_id: string; seq: number; type: string }[]>`
      select event_id, entity_id, seq, type from events where entity_id in ${sql(ids)}`;
    const byId = new Map(events.map((e) => [e.event_id, e]));
    expect(await recordedStreamSeq(sql)).toBe(Math.max(...msgs.map((m) => m.seq)));
    const lastSeq = new Map<string, number>();
    for (const m of msgs) {
      expect(m.msgId).toBe(m.entry.eventId);
      const e = byId.get(m.entry.eventId);
      expect(e?.seq).toBe(m.entry.seq);
      expect(m.subject).toBe(eventSubject(n, 'ticket', m.entry.entityId, m.entry.type));
      // per entity, the stream holds seq 1, 2, 3 ... in order
      expect(m.entry.seq).toBe((lastSeq.get(m.entry.entityId) ?? 0) + 1);
      lastSeq.set(m.entry.entityId, m.entry.seq);
    }
  });

  it('a publish repeated after a crash between publish and mark is stored once', async () => {
    const sql = db.sql;
    const host = new ActorHost(sql, { taskDefaults: TASK_DEFAULTS });
    const n = names();
    await ensureStreams(admin.jsm, n);
    const t = await host.create('ticket', ticketInput());
    // The "crashed" relay: published the event, never moved the cursor past it.
    const row = (
      await sql<{ event_id: string; type: string }[]>`
        select event_id, type from events where entity_id = ${t.id} order by seq limit 1`
    )[0]!;
    const js = jetstream(admin.nc);
    const first = await js.publish(eventSubject(n, 'ticket', t.id, row.type), '{}', {
      msgID: row.event_id,
    });
    const transport = await publishOnly(sql, host, n);
    await eventually(async () => (await outboxCount(sql)) === 0, 10_000, 'outbox drained');
    expect(await streamCount(n)).toBe(1);
    expect(transport.relay.stats.duplicates).toBe(1);
    expect(await recordedStreamSeq(sql)).toBe(first.seq);
    await transport.stop();
  });

  it('a round whose cursor write fails records nothing; the next one publishes its events again, stored once', async () => {
    const sql = db.sql;
    const host = new ActorHost(sql, { taskDefaults: TASK_DEFAULTS });
    const n = names();
    await ensureStreams(admin.jsm, n);
    const t = await host.create('ticket', ticketInput());
    const [before] = await sql`select tx::text as tx, pos, stream_seq from relay_cursor`;
    // The round's last write fails: the round fails with it and moves nothing.
    await sql.unsafe(`
      create function refuse_cursor() returns trigger language plpgsql as $$
      begin raise exception 'cursor write refused'; end $$;
      create trigger refuse_cursor before update on relay_cursor
        for each row execute function refuse_cursor();`);
    const relay = relayOn(sql, n);
    try {
      await expect(relay.drainOnce()).rejects.toThrow(/cursor write refused/);
      expect((await sql`select tx::text as tx, pos, stream_seq from relay_cursor`)[0]).toEqual(
        before,
      );
      expect(await streamCount(n)).toBe(1);
    } finally {
      await sql.unsafe(
        `drop trigger refuse_cursor on relay_cursor; drop function refuse_cursor();`,
      );
    }
    expect(await relay.drainOnce()).toBe(1); // the one event sent again: a duplicate
    expect(relay.stats.duplicates).toBe(1);
    expect(await streamCount(n)).toBe(1);
    expect(await outboxCount(sql)).toBe(0);
    const [after] = await sql<{ pos: number }[]>`select pos from relay_cursor`;
    const [last] = await sql<{ pos: number }[]>`
      select max(pos)::int as pos from events where entity_id = ${t.id}`;
    expect(after?.pos).toBe(last?.pos);
    await relay.stop();
  });

  it('a round commits without waiting for the disk; the setting ends with its transaction', async () => {
    // One connection: the round's and the statements after it share a session.
    const sql = db.pool(1);
    const host = new ActorHost(sql, { taskDefaults: TASK_DEFAULTS });
    const n = names();
    await ensureStreams(admin.jsm, n);
    await host.create('ticket', ticketInput());
    await sql.unsafe(`
      create table seen_commit_mode (mode text not null);
      create function note_commit_mode() returns trigger language plpgsql as $$
      begin insert into seen_commit_mode values (current_setting('synchronous_commit')); return new; end $$;
      create trigger note_commit_mode before update on relay_cursor
        for each row execute function note_commit_mode();`);
    const relay = relayOn(sql, n);
    const mode = async () =>
      (await sql`select current_setting('synchronous_commit') as mode`)[0]?.mode as string;
    const configured = await mode();
    expect(configured).not.toBe('off');
    try {
      expect(await relay.drainOnce()).toBe(1);
      expect((await sql`select mode from seen_commit_mode`).map((r) => r.mode)).toEqual(['off']);
      // Everything else on that session commits as configured: a command's commit still waits.
      expect(await mode()).toBe(configured);
      const [inTx] = await sql.begin(
        (tx) => tx`select current_setting('synchronous_commit') as mode`,
      );
      expect(inTx?.mode).toBe(configured);
    } finally {
      await relay.stop();
      await sql.unsafe(`
        drop trigger note_commit_mode on relay_cursor; drop function note_commit_mode();
        drop table seen_commit_mode;`);
      await sql.end();
    }
  });

  it("an entity's later event written by an older transaction waits for its predecessor", async () => {
    const sql = db.sql;
    const n = names();
    await ensureStreams(admin.jsm, n);
    const insert = (c: Sql, entity: string, seq: number) =>
      c`insert into events (event_id, entity_type, entity_id, seq, type, data, at)
        values (gen_random_uuid(), 'ticket', ${entity}, ${seq}, 'ticket.blocked', '{}', now())`;
    // `older` takes its transaction id first; `between` takes the next and stays open; `newer`
    // writes e's first event and commits; then `older` writes e's second and commits. In
    // (transaction, pos) order e's second event comes first, and while `between` runs its
    // first is not even readable.
    const [older, between, newer] = await Promise.all([
      sql.reserve(),
      sql.reserve(),
      sql.reserve(),
    ]);
    try {
      await older`begin`;
      await insert(older, 'f', 1);
      await between`begin`;
      await insert(between, 'z', 1);
      await newer`begin`;
      await insert(newer, 'e', 1);
      await newer`commit`;
      await insert(older, 'e', 2);
      await older`commit`;
      const relay = relayOn(sql, n);
      await relay.drainOnce();
      // f went out; e's second event is held behind its first, which is beyond the cursor.
      expect((await streamMessages(n)).map((m) => m.entry.entityId)).toEqual(['f']);
      const held = await sql<{ entity_id: string; seq: number }[]>`
        select e.entity_id, e.seq from relay_held h join events e on e.pos = h.pos`;
      expect(held).toEqual([{ entity_id: 'e', seq: 2 }]);
      await between`commit`;
      for (let i = 0; i < 5 && (await outboxCount(sql)) > 0; i++) await relay.drainOnce();
      expect(await outboxCount(sql)).toBe(0);
      const msgs = await streamMessages(n);
      expect(msgs.filter((m) => m.entry.entityId === 'e').map((m) => m.entry.seq)).toEqual([1, 2]);
      expect(msgs).toHaveLength(4);
    } finally {
      for (const c of [older, between, newer]) c.release();
    }
  });

  it('a transaction left open in another database does not hold the relay back; one in this database does', async () => {
    const sql = db.sql;
    const host = new ActorHost(sql, { taskDefaults: TASK_DEFAULTS });
    const n = names();
    await ensureStreams(admin.jsm, n);
    const relay = relayOn(sql, n);
    const otherDb = await createTestDatabase('transport_relay_other');
    dbs.push(otherDb);
    const elsewhere = await otherDb.sql.reserve();
    const here = await db.pool(1).reserve();
    try {
      // A transaction id taken elsewhere and kept: below every id this test's writes get.
      await elsewhere`begin`;
      await elsewhere`select pg_current_xact_id()`;
      const a = await host.create('ticket', ticketInput());
      await relay.drainOnce();
      expect(await unpublishedCount(sql, [a.id])).toBe(0);
      // The same here: events committed after it wait until it ends.
      await here`begin`;
      await here`select pg_current_xact_id()`;
      const b = await host.create('ticket', ticketInput());
      await relay.drainOnce();
      expect(await unpublishedCount(sql, [b.id])).toBe(1);
      await here`commit`;
      await relay.drainOnce();
      expect(await unpublishedCount(sql, [b.id])).toBe(0);
    } finally {
      await elsewhere`rollback`.catch(() => {});
      elsewhere.release();
      here.release();
    }
  });

  it("a round stuck holding the relays' lock is cut off after its idle timeout; another relay goes on", async () => {
    const sql = db.sql;
    const host = new ActorHost(sql, { taskDefaults: TASK_DEFAULTS });
    const n = names();
    await ensureStreams(admin.jsm, n);
    const t = await host.create('ticket', ticketInput());
    // A round whose process froze: it took the lock, then sends nothing for 3 s.
    const frozen = db.pool(1);
    let locked = false;
    const stuck = frozen
      .begin(async (tx) => {
        await lockRelay(tx, { idleTimeoutMs: 300 });
        locked = true;
        await new Promise((r) => setTimeout(r, 3_000));
        await tx`select 1`;
      })
      .then(
        () => null,
        (error: unknown) => error,
      );
    await eventually(async () => locked, 5_000, 'the frozen round to hold the lock');
    const relay = relayOn(sql, n);
    const started = Date.now();
    await relay.drainOnce();
    expect(Date.now() - started).toBeLessThan(2_500);
    expect(await unpublishedCount(sql, [t.id])).toBe(0);
    // Its session was ended: the frozen round fails when it wakes, having recorded nothing.
    expect(await stuck).toBeInstanceOf(Error);
  });

  it('NATS unreachable: start fails naming the URL, commands still commit, the outbox drains later', async () => {
    const sql = db.sql;
    const host = new ActorHost(sql, { taskDefaults: TASK_DEFAULTS });
    const n = names();
    const badUrl = 'nats://127.0.0.1:1';
    const failed = await startTransport(sql, host, n, {
      natsUrl: badUrl,
      connectTimeoutMs: 500,
    }).catch((e: unknown) => e);
    expect(failed).toBeInstanceOf(Unavailable);
    expect((failed as Error).message).toContain(badUrl);

    const ids = await makeEvents(host, 5, 1); // accepted and committed without NATS
    expect(await outboxCount(sql)).toBe(20);
    await publishOnly(sql, host, n);
    await eventually(async () => (await outboxCount(sql)) === 0, 10_000, 'outbox drained');
    expect(await streamCount(n)).toBe(await eventCount(sql, ids));
  });

  it('two relays on two pools publish every row once, in per-entity order', async () => {
    const sqlA = db.sql;
    const sqlB = db.pool(6);
    const hostA = new ActorHost(sqlA, { taskDefaults: TASK_DEFAULTS });
    const n = names();
    await ensureStreams(admin.jsm, n);
    const ids = await makeEvents(hostA, 60, 2); // 360 events
    const relays = [sqlA, sqlB].map((sql) => relayOn(sql, n, { batchSize: 25, pollMs: 20 }));
    await Promise.all(relays.map((r) => r.start()));
    try {
      await eventually(async () => (await outboxCount(sqlA)) === 0, 20_000, 'outbox drained');
    } finally {
      await Promise.all(relays.map((r) => r.stop()));
    }
    expect(relays.every((r) => r.stats.published > 0)).toBe(true);
    expect(relays[0]!.stats.published + relays[1]!.stats.published).toBe(360);
    expect(relays[0]!.stats.duplicates + relays[1]!.stats.duplicates).toBe(0);
    const msgs = await streamMessages(n);
    expect(msgs).toHaveLength(await eventCount(sqlA, ids));
    const lastSeq = new Map<string, number>();
    for (const m of msgs) {
      expect(m.entry.seq).toBe((lastSeq.get(m.entry.entityId) ?? 0) + 1);
      lastSeq.set(m.entry.entityId, m.entry.seq);
    }
  });

  it('a stream that lost its tail gets again what followed the checkpoint below what it kept, not more', async () => {
    const sql = db.sql;
    const host = new ActorHost(sql, { taskDefaults: TASK_DEFAULTS });
    const n = names();
    await ensureStreams(admin.jsm, n);
    // A checkpoint after every round, so the rewind's point is known exactly.
    const relay = relayOn(sql, n, { checkpointMs: 0 });
    const first = await makeEvents(host, 5, 1);
    await relay.drainOnce();
    const kept = await streamMessages(n);
    expect(kept).toHaveLength(await eventCount(sql, first));
    const second = await makeEvents(host, 5, 1);
    await relay.drainOnce();
    const lost = await eventCount(sql, second);
    expect(await streamCount(n)).toBe(kept.length + lost);
    // The stream comes back with only what the first round published (as after a crash that
    // lost its unsynced tail): the same messages at the same sequences.
    await admin.jsm.streams.delete(n.stream);
    await ensureStreams(admin.jsm, n);
    const js = jetstream(admin.nc);
    for (const m of kept) {
      await js.publish(m.subject, JSON.stringify(m.entry), { msgID: m.entry.eventId });
    }
    expect(await relay.checkStream()).toBe(lost);
    await relay.drainOnce();
    const msgs = await streamMessages(n);
    expect(msgs).toHaveLength(kept.length + lost);
    expect(new Set(msgs.map((m) => m.entry.eventId)).size).toBe(kept.length + lost);
    expect(await outboxCount(sql)).toBe(0);
  });

  it('the stream deleted and recreated: the stream check publishes every event again', async () => {
    const sql = db.sql;
    const host = new ActorHost(sql, { taskDefaults: TASK_DEFAULTS });
    const n = names();
    const ids = await makeEvents(host, 10, 1);
    const total = await eventCount(sql, ids);
    const transport = await publishOnly(sql, host, n);
    await eventually(async () => (await outboxCount(sql)) === 0, 10_000, 'outbox drained');
    expect(await streamCount(n)).toBe(total);

    await admin.jsm.streams.delete(n.stream);
    const requeued = await transport.relay.checkStream();
    expect(requeued).toBe(total);
    await eventually(async () => (await outboxCount(sql)) === 0, 10_000, 'outbox drained again');
    expect(await streamCount(n)).toBe(total);
    const msgs = await streamMessages(n);
    expect(new Set(msgs.map((m) => m.entry.eventId)).size).toBe(total);
    // a second check finds nothing behind
    expect(await transport.relay.checkStream()).toBe(0);
  });

  it('a new publish that gets an already-recorded sequence re-queues the lost events', async () => {
    const sql = db.sql;
    const host = new ActorHost(sql, { taskDefaults: TASK_DEFAULTS });
    const n = names();
    const ids = await makeEvents(host, 4, 1);
    const transport = await publishOnly(sql, host, n);
    await eventually(async () => (await outboxCount(sql)) === 0, 10_000, 'outbox drained');
    // The stream loses everything behind the relay's back (no stream check runs here).
    await admin.jsm.streams.delete(n.stream);
    await ensureStreams(admin.jsm, n);
    const more = await makeEvents(host, 1, 0);
    const total = await eventCount(sql, [...ids, ...more]);
    await eventually(
      async () => (await outboxCount(sql)) === 0 && (await streamCount(n)) === total,
      10_000,
      'lost events published again',
    );
    expect(transport.relay.stats.republished).toBeGreaterThan(0);
    const msgs = await streamMessages(n);
    expect(new Set(msgs.map((m) => m.entry.eventId)).size).toBe(total);
  });

  it('an event larger than max_payload reaches the stream in reduced form; other events flow and the ticket advances', async () => {
    const sql = db.sql;
    const host = new ActorHost(sql, { taskDefaults: TASK_DEFAULTS });
    const commands = commandsFor(host);
    const n = names();
    const { value: ticketId } = await host.transact(async (uow) => {
      const tk = await commands.createTicket(uow, { title: 'big result' });
      await commands.addTask(uow, tk.id, { id: `${tk.id}-task`, type: 'build' });
      return tk.id;
    });
    await host.send('ticket', ticketId, { type: 'START' });
    const taskId = `${ticketId}-task`;
    const claimed = await host.send('task', taskId, { type: 'CLAIM', workerId: 'w' });
    const token = (claimed.snapshot.context as { token: string }).token;
    await host.send('task', taskId, { type: 'START', token });
    const maxPayload = admin.nc.info?.max_payload ?? 0;
    expect(maxPayload).toBeGreaterThan(0);
    const log = 'x'.repeat(maxPayload + 100_000);
    await host.send('task', taskId, { type: 'COMPLETE', token, result: { log } });
    const others = await makeEvents(host, 5, 1);

    const transport = await startTransport(sql, host, n, { enableReconciler: false });
    transports.push(transport);
    await eventually(async () => (await outboxCount(sql)) === 0, 15_000, 'outbox drained');
    // The task_state reaction read the completion from Postgres: the ticket advanced.
    await eventually(async () => (await stateOf(sql, ticketId)) === 'design', 10_000, 'advance');

    const msgs = await streamMessages(n);
    const completed = msgs.filter(
      (m) => m.entry.entityId === taskId && m.entry.type === 'task.completed',
    );
    expect(completed).toHaveLength(1);
    const data = completed[0]!.entry.data;
    expect(data).toMatchObject({ truncated: true, ticketId, workerId: 'w', attempt: 1 });
    expect(data.result).toBeUndefined();
    expect(data.bytes).toBeGreaterThan(maxPayload);
    expect(String(data.reason)).toContain('max_payload');
    // Every other event went out whole, in per-entity order.
    const theirs = msgs.filter((m) => others.includes(m.entry.entityId));
    expect(theirs).toHaveLength(await eventCount(sql, others));
    expect(theirs.every((m) => m.entry.data.truncated === undefined)).toBe(true);
    expect(transport.relay.stats.reduced).toBe(1);
    expect(transport.relay.stats.failures).toBe(0);
    // Postgres keeps the full entry.
    const stored = await sql<{ n: number }[]>`
      select length(data -> 'result' ->> 'log')::int as n from events
      where entity_id = ${taskId} and type = 'task.completed'`;
    expect(stored[0]?.n).toBe(log.length);
    expect(await transport.prometheus()).toContain('orch_relay_reduced_total 1');
  });

  it('a row the server refuses backs off alone: others flow, its entity waits in order, then it goes out reduced', async () => {
    const sql = db.sql;
    const host = new ActorHost(sql, { taskDefaults: TASK_DEFAULTS });
    const n = names();
    await ensureStreams(admin.jsm, n);
    // The stream refuses messages over 8 KiB: a refusal by the server, not a size NATS knows.
    await admin.jsm.streams.update(n.stream, { max_msg_size: 8_192 });
    const bad = await host.create('ticket', ticketInput());
    await host.send('ticket', bad.id, { type: 'START' });
    await host.send('ticket', bad.id, { type: 'BLOCK', reason: 'r'.repeat(10_000) });
    await host.send('ticket', bad.id, { type: 'UNBLOCK' });
    const before = await makeEvents(host, 3, 1);
    const relay = relayOn(sql, n, {
      pollMs: 20,
      // Three refusals take at least 0.5 + 1 + 2 s: time enough to see the others flow.
      retryBaseMs: 1_000,
      maxBackoffMs: 8_000,
      maxRejections: 3,
    });
    await relay.start();
    try {
      const pending = async () =>
        sql<{ type: string; rejections: number; backing_off: boolean; last_error: string }[]>`
          select e.type, h.rejections, h.retry_at > now() as backing_off, h.last_error
          from relay_held h join events e on e.pos = h.pos
          where h.published_seq is null order by e.pos`;
      // The refused row backs off; its entity's later event waits behind it; the others are out.
      const first = await eventually(
        async () => {
          const rows = await pending();
          return rows.length === 2 && rows[0]!.rejections >= 1 && rows;
        },
        10_000,
        'refused row backing off',
      );
      expect(first.map((r) => r.type)).toEqual(['ticket.blocked', 'ticket.unblocked']);
      expect(first[0]!.last_error).toMatch(/size/i);
      expect(first[1]!.rejections).toBe(0);
      // Events committed while it backs off are published at once.
      const during = await makeEvents(host, 3, 1);
      await eventually(
        async () => (await streamCount(n)) === (await eventCount(sql, [...before, ...during])) + 2,
        5_000,
        'other entities published during the backoff',
      );
      const meanwhile = await pending();
      expect(meanwhile.map((r) => r.type)).toContain('ticket.unblocked');
      // After three refusals it goes out in reduced form, then its entity's later event.
      await eventually(async () => (await outboxCount(sql)) === 0, 20_000, 'outbox drained');
    } finally {
      await relay.stop();
    }
    expect(relay.stats.failures).toBe(3);
    expect(relay.stats.reduced).toBe(1);
    const mine = (await streamMessages(n)).filter((m) => m.entry.entityId === bad.id);
    expect(mine.map((m) => m.entry.type)).toEqual([
      'ticket.created',
      'ticket.phase_changed',
      'ticket.blocked',
      'ticket.unblocked',
    ]);
    expect(mine[2]!.entry.data).toMatchObject({
      truncated: true,
      reason: 'refused by NATS 3 times',
    });
    expect(mine[3]!.entry.data.truncated).toBeUndefined();
  });

  it('NATS down mid-run: commands commit, the outbox waits, then drains and reactions resume', async () => {
    const sql = db.sql;
    const host = new ActorHost(sql, { taskDefaults: TASK_DEFAULTS });
    const n = names();
    let proxy = await natsProxy();
    const transport = await startTransport(sql, host, n, {
      natsUrl: `nats://127.0.0.1:${proxy.port}`,
      enableReconciler: false, // the reactions alone must catch up
      // The consumers alone: early reactions would tell the ticket while NATS is down.
      earlyReactions: false,
    });
    transports.push(transport);
    const before = await makeEvents(host, 2, 0);
    await eventually(async () => (await outboxCount(sql)) === 0, 10_000, 'outbox drained');

    const commands = commandsFor(host);
    const { value: ticketId } = await host.transact(async (uow) => {
      const tk = await commands.createTicket(uow, { title: 'outage' });
      await commands.addTask(uow, tk.id, { id: `${tk.id}-task`, type: 'build' });
      return tk.id;
    });
    await host.send('ticket', ticketId, { type: 'START' });
    await eventually(async () => (await outboxCount(sql)) === 0, 10_000, 'outbox drained');

    await proxy.close(); // NATS unreachable from here on
    const during = await makeEvents(host, 10, 1);
    const taskId = `${ticketId}-task`;
    const claimed = await host.send('task', taskId, { type: 'CLAIM', workerId: 'w' });
    const token = (claimed.snapshot.context as { token: string }).token;
    await host.send('task', taskId, { type: 'START', token });
    await host.send('task', taskId, { type: 'COMPLETE', token });
    await new Promise((r) => setTimeout(r, 1_500));
    expect(await outboxCount(sql)).toBeGreaterThanOrEqual(43);
    const lag = await transport.relay.lag();
    expect(lag.count).toBeGreaterThanOrEqual(43);
    expect(lag.oldestMs).toBeGreaterThan(500);
    expect(await stateOf(sql, ticketId)).toBe('requirements');

    proxy = await natsProxy(proxy.port); // NATS back
    try {
      const total = await eventCount(sql, [...before, ...during, ticketId, taskId]);
      await eventually(
        async () => (await outboxCount(sql)) === 0 && (await streamCount(n)) >= total,
        20_000,
        'outbox drained after NATS came back',
      );
      // the reaction consumers resumed: the completion reached the ticket, which advanced once
      await eventually(async () => (await stateOf(sql, ticketId)) === 'design', 10_000, 'advance');
      const changes = await sql`select 1 from events where entity_id = ${ticketId}
        and type = 'ticket.phase_changed'`;
      expect(changes).toHaveLength(2);
    } finally {
      await transport.stop();
      await proxy.close();
    }
  });

  it('NATS down for 5 s while 200 tickets are created and advanced: every event and reaction once', {
    timeout: 120_000,
  }, async () => {
    const sql = db.sql;
    const host = new ActorHost(sql, { taskDefaults: TASK_DEFAULTS });
    const commands = commandsFor(host);
    const n = names();
    let proxy = await natsProxy();
    const transport = await startTransport(sql, host, n, {
      natsUrl: `nats://127.0.0.1:${proxy.port}`,
      enableReconciler: false,
    });
    transports.push(transport);
    await proxy.close();
    const down = Date.now();
    const ids = await Promise.all(
      Array.from({ length: 200 }, async (_, i) => {
        const { value: ticketId } = await host.transact(async (uow) => {
          const tk = await commands.createTicket(uow, { title: `outage ${i}` });
          await commands.addTask(uow, tk.id, { id: `${tk.id}-task`, type: 'build' });
          return tk.id;
        });
        await host.send('ticket', ticketId, { type: 'START' });
        const taskId = `${ticketId}-task`;
        const claimed = await host.send('task', taskId, { type: 'CLAIM', workerId: 'w' });
        const token = (claimed.snapshot.context as { token: string }).token;
        await host.send('task', taskId, { type: 'START', token });
        await host.send('task', taskId, { type: 'COMPLETE', token });
        return [ticketId, taskId] as const;
      }),
    );
    await new Promise((r) => setTimeout(r, Math.max(0, 5_000 - (Date.now() - down))));
    proxy = await natsProxy(proxy.port);
    try {
      const all = ids.flat();
      const total = await eventCount(sql, all);
      await eventually(
        async () => (await outboxCount(sql)) === 0,
        30_000,
        'outbox drained after NATS came back',
      );
      const tickets = ids.map(([t]) => t);
      await eventually(
        async () => {
          const r = await sql<{ n: number }[]>`select count(*)::int as n from tickets
            where state = 'design' and id in ${sql(tickets)}`;
          return r[0]?.n === tickets.length;
        },
        30_000,
        'every ticket advanced',
      );
      // every event in the stream once (the advances added one event per ticket, committed
      // after the first drain: wait for the relay to publish those too)
      await eventually(
        async () => (await outboxCount(sql)) === 0,
        30_000,
        'outbox drained after the advances',
      );
      const msgs = await streamMessages(n);
      expect(new Set(msgs.map((m) => m.entry.eventId)).size).toBe(msgs.length);
      expect(msgs.length).toBe(await eventCount(sql, all));
      // Each ticket's advance is one event, whether early (NATS down) or after it came back.
      expect(msgs.length).toBeLessThanOrEqual(total + tickets.length);
      const changes = await sql<{ n: number }[]>`select count(*)::int as n from events
        where type = 'ticket.phase_changed' and entity_id in ${sql(tickets)}`;
      expect(changes[0]?.n).toBe(2 * tickets.length);
    } finally {
      await transport.stop();
      await proxy.close();
    }
  });

  it('stop() returns promptly while NATS is down', async () => {
    const sql = db.sql;
    const host = new ActorHost(sql, { taskDefaults: TASK_DEFAULTS });
    const n = names();
    const proxy = await natsProxy();
    const transport = await startTransport(sql, host, n, {
      natsUrl: `nats://127.0.0.1:${proxy.port}`,
      drainTimeoutMs: 1_000,
    });
    const feed = await transport.subscribeEvents(0, undefined, () => {});
    await proxy.close();
    await makeEvents(host, 2, 0);
    await new Promise((r) => setTimeout(r, 300));
    const started = Date.now();
    await transport.stop();
    expect(Date.now() - started).toBeLessThan(8_000);
    await feed.close();
    expect(transport.connected()).toBe(false);
  });
});
