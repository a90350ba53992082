/**
 * Group commit in the actor host against a real Postgres: units of work that queue while a
 * transaction is in flight commit together (counted by the transaction ids of their event
 * rows), each answered with its own result; units of different actors run side by side; a
 * refusal, a lost compare-and-set or a SQL fault concerns only its own unit; a failed commit
 * answers no unit as a success.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ActorHost, type ActorHost as Host } from '../../src/actors/host.js';
import { Conflict, IllegalTransition, VersionConflict } from '../../src/errors.js';
import { createTestDatabase, type TestDatabase } from '../support/database.js';
import { TASK_DEFAULTS, ticketInput } from '../support/fixtures.js';
import { recordingSql } from '../support/statement-log.js';

let db: TestDatabase;

beforeAll(async () => {
  db = await createTestDatabase('group_commit');
  // Which top-level transaction wrote each event: txid_current() is the transaction's own id
  // even inside a savepoint, where a row's xmin would be the savepoint's.
  await db.sql.unsafe(`
    create table commit_probe (n bigserial primary key, entity_id text not null, xid bigint not null);
    create function probe_event() returns trigger language plpgsql as $$
    begin
      insert into commit_probe (entity_id, xid) values (new.entity_id, txid_current());
      return new;
    end $$;
    create trigger commit_probe after insert on events for each row execute function probe_event();`);
});
afterAll(() => db.drop());

/** The transactions that wrote these entities' events, since `mark` (a probe count). */
async function xidsOf(ids: string[], mark: Mark): Promise<Set<number>> {
  const rows = await db.sql<{ xid: number }[]>`
    select xid from commit_probe where entity_id in ${db.sql(ids)} and n > ${mark}`;
  return new Set(rows.map((r) => r.xid));
}

type Mark = number;
async function mark(): Promise<Mark> {
  const [row] = await db.sql<
    { n: number }[]
  >`select coalesce(max(n), 0)::int as n from commit_probe`;
  return row?.n ?? 0;
}

async function seqsOf(id: string): Promise<number[]> {
  const rows = await db.sql<{ seq: number }[]>`
    select seq from events where entity_id = ${id} order by seq`;
  return rows.map((r) => r.seq);
}

/** `n` tickets in their first phase (2 events each: created, started). */
async function startedTickets(host: Host, n: number): Promise<string[]> {
  const ids: string[] = [];
  for (let i = 0; i < n; i++) {
    const t = await host.create('ticket', ticketInput());
    await host.send('ticket', t.id, { type: 'START' });
    ids.push(t.id);
  }
  return ids;
}

/**
 * Holds the host's only lane with a transaction of its own until `release` is called, so that
 * what is submitted meanwhile queues and forms one batch.
 */
async function holdLane(host: Host): Promise<{ release: () => void; done: Promise<unknown> }> {
  let release!: () => void;
  const released = new Promise<void>((r) => {
    release = r;
  });
  let started!: () => void;
  const running = new Promise<void>((r) => {
    started = r;
  });
  const done = host.transact(async (uow) => {
    await uow.tx`select 1`;
    started();
    await released;
  });
  await running;
  return { release, done };
}

const oneLane = (max = 64) =>
  new ActorHost(db.pool(4), { taskDefaults: TASK_DEFAULTS, commitLanes: 1, commitBatchMax: max });

describe('group commit', () => {
  it('64 concurrent sends to different tickets commit in fewer transactions, each answered', async () => {
    const host = new ActorHost(db.pool(8), { taskDefaults: TASK_DEFAULTS });
    const ids = await startedTickets(host, 64);
    const before = host.commits.stats.commits;
    const m = await mark();
    const results = await Promise.all(
      ids.map((id) => host.send('ticket', id, { type: 'BLOCK', reason: id })),
    );
    results.forEach((r, i) => {
      expect(r.id).toBe(ids[i]);
      expect(r.state).toBe('blocked');
      expect(r.version).toBe(3);
      expect(r.events.map((e) => [e.entityId, e.seq, e.type])).toEqual([
        [ids[i], 3, 'ticket.blocked'],
      ]);
    });
    const xids = await xidsOf(ids, m);
    expect(xids.size).toBeLessThan(64);
    expect(host.commits.stats.commits - before).toBe(xids.size);
    const rows = await db.sql<{ state: string; version: number }[]>`
      select distinct state, version from tickets where id in ${db.sql(ids)}`;
    expect(rows).toEqual([{ state: 'blocked', version: 3 }]);
  });

  it('two units of one batch on the same ticket follow each other without a conflict', async () => {
    const host = oneLane();
    const [id] = (await startedTickets(host, 1)) as [string];
    const m = await mark();
    const lane = await holdLane(host);
    const a = host.transact((uow) => uow.send('ticket', id, { type: 'BLOCK', reason: 'a' }));
    const b = host.transact((uow) => uow.send('ticket', id, { type: 'UNBLOCK' }));
    lane.release();
    const [ra, rb] = await Promise.all([a, b]);
    expect(ra.value.state).toBe('blocked');
    expect(rb.value.state).toBe('requirements');
    expect(host.stats.conflicts).toBe(0);
    expect((await xidsOf([id], m)).size).toBe(1);
    expect(await seqsOf(id)).toEqual([1, 2, 3, 4]);
    // The cache holds the committed end state: the next event is decided on it.
    expect((await host.send('ticket', id, { type: 'BLOCK', reason: 'c' })).version).toBe(5);
  });

  it('units of different actors in one batch run side by side in one transaction', async () => {
    const host = oneLane();
    const [a, b] = (await startedTickets(host, 2)) as [string, string];
    const m = await mark();
    const lane = await holdLane(host);
    // A waits, inside the shared transaction, for B to have started: in turn, A would wait
    // forever for a unit queued behind it.
    let bStarted!: () => void;
    const started = new Promise<void>((r) => {
      bStarted = r;
    });
    const ra = host.transact(
      async (uow) => {
        await started;
        return uow.send('ticket', a, { type: 'BLOCK', reason: 'a' });
      },
      { keys: [`ticket:${a}`] },
    );
    const rb = host.transact(
      async (uow) => {
        bStarted();
        return uow.send('ticket', b, { type: 'BLOCK', reason: 'b' });
      },
      { keys: [`ticket:${b}`] },
    );
    lane.release();
    const hung = new Promise<'hung'>((r) => setTimeout(() => r('hung'), 5_000).unref());
    const both = await Promise.race([Promise.all([ra, rb]), hung]);
    expect(both).not.toBe('hung');
    const [va, vb] = both as [{ value: { state: string } }, { value: { state: string } }];
    expect([va.value.state, vb.value.state]).toEqual(['blocked', 'blocked']);
    expect((await xidsOf([a, b], m)).size).toBe(1);
  });

  it('a side-by-side unit whose read another unit made stale runs again; it never writes on it', async () => {
    const host = oneLane();
    const [contested] = (await startedTickets(host, 1)) as [string];
    const conflicts = host.stats.conflicts;
    const lane = await holdLane(host);
    // Keyed apart on purpose, though both write the same ticket: each decides BLOCK on the
    // cached row, and the second compare-and-set finds the first one's version.
    const send = (key: string, reason: string) =>
      host.transact((uow) => uow.send('ticket', contested, { type: 'BLOCK', reason }), {
        keys: [key],
      });
    const units = [send('one', 'first'), send('two', 'second')];
    lane.release();
    const settled = await Promise.allSettled(units);
    const applied = settled.filter((r) => r.status === 'fulfilled');
    const refused = settled.filter((r) => r.status === 'rejected');
    expect(applied).toHaveLength(1);
    expect(refused).toHaveLength(1);
    // Run again on the committed row, the second BLOCK is refused: the ticket is blocked.
    expect((refused[0] as PromiseRejectedResult).reason).toBeInstanceOf(IllegalTransition);
    expect(host.stats.conflicts - conflicts).toBeGreaterThanOrEqual(1);
    expect(await seqsOf(contested)).toEqual([1, 2, 3]);
    const [row] = await db.sql`select state, version from tickets where id = ${contested}`;
    expect(row).toEqual({ state: 'blocked', version: 3 });
  });

  it('a unit without a key runs after the side-by-side ones and builds on their writes', async () => {
    const host = oneLane();
    const [a, b] = (await startedTickets(host, 2)) as [string, string];
    const m = await mark();
    const conflicts = host.stats.conflicts;
    const lane = await holdLane(host);
    const keyed = [a, b].map((id) => host.send('ticket', id, { type: 'BLOCK', reason: 'k' }));
    const after = host.transact(async (uow) => {
      await uow.send('ticket', a, { type: 'UNBLOCK' });
      return uow.send('ticket', b, { type: 'UNBLOCK' });
    });
    lane.release();
    expect((await Promise.all(keyed)).map((r) => r.state)).toEqual(['blocked', 'blocked']);
    expect((await after).value.state).toBe('requirements');
    expect(host.stats.conflicts - conflicts).toBe(0);
    expect((await xidsOf([a, b], m)).size).toBe(1);
    for (const id of [a, b]) expect(await seqsOf(id)).toEqual([1, 2, 3, 4]);
  });

  it('commands with Idempotency-Keys run side by side; one key is never held twice at once', async () => {
    const host = oneLane();
    const [a, b, c, d] = (await startedTickets(host, 4)) as [string, string, string, string];
    const m = await mark();
    const lane = await holdLane(host);
    const block = (id: string, key: string) =>
      host.idempotent(
        { scope: 'test', key, request: `BLOCK ${id}` },
        async (uow) => ({
          status: 200,
          body: { state: (await uow.send('ticket', id, { type: 'BLOCK', reason: key })).state },
        }),
        { entityType: 'ticket', id },
      );
    // Two keys of their own, and one key sent for two tickets (a client's mistake): in one
    // batch, the second holder runs after the first and finds the key used.
    const units = [
      block(a, `own-${a}`),
      block(b, `own-${b}`),
      block(c, 'shared'),
      block(d, 'shared'),
    ];
    lane.release();
    const settled = await Promise.allSettled(units);
    expect(settled.slice(0, 3).map((r) => r.status)).toEqual([
      'fulfilled',
      'fulfilled',
      'fulfilled',
    ]);
    expect(settled[3]?.status).toBe('rejected');
    expect((settled[3] as PromiseRejectedResult).reason).toBeInstanceOf(Conflict);
    expect((await xidsOf([a, b, c], m)).size).toBe(1);
    expect(await seqsOf(d)).toEqual([1, 2]);
  });

  it('a refused event in a batch leaves the others committed', async () => {
    const host = oneLane();
    const ids = await startedTickets(host, 5);
    const [bad] = (await startedTickets(host, 1)) as [string];
    host.forget(); // decided from Postgres, inside the batch
    const m = await mark();
    const lane = await holdLane(host);
    const good = ids.map((id) => host.send('ticket', id, { type: 'BLOCK', reason: 'ok' }));
    const refused = host.send('ticket', bad, { type: 'UNBLOCK' });
    const reruns = host.commits.stats.reruns;
    lane.release();
    await expect(refused).rejects.toBeInstanceOf(IllegalTransition);
    const results = await Promise.all(good);
    expect(results.map((r) => r.state)).toEqual(ids.map(() => 'blocked'));
    expect(results.map((r) => r.version)).toEqual(ids.map(() => 3));
    expect((await xidsOf(ids, m)).size).toBe(1);
    expect(await seqsOf(bad)).toEqual([1, 2]);
    // The refusal came last: the five before it ran again, and each wrote its event once.
    expect(host.commits.stats.reruns - reruns).toBe(5);
    for (const id of ids) expect(await seqsOf(id)).toEqual([1, 2, 3]);
  });

  it('a lost compare-and-set in a batch retries only its own unit', async () => {
    const host = oneLane();
    const other = new ActorHost(db.pool(2), { taskDefaults: TASK_DEFAULTS });
    const ids = await startedTickets(host, 5);
    const [contested] = (await startedTickets(host, 1)) as [string];
    // Another process moves the contested ticket on and back: this host's cached row is
    // stale, though BLOCK is legal in both (so it is the compare-and-set that loses).
    await other.send('ticket', contested, { type: 'BLOCK', reason: 'elsewhere' });
    await other.send('ticket', contested, { type: 'UNBLOCK' });
    const m = await mark();
    const lane = await holdLane(host);
    const before = host.stats.conflicts;
    const good = ids.map((id) => host.send('ticket', id, { type: 'BLOCK', reason: 'ok' }));
    const retried = host.send('ticket', contested, { type: 'BLOCK', reason: 'late' });
    lane.release();
    expect((await retried).state).toBe('blocked');
    expect((await Promise.all(good)).map((r) => r.state)).toEqual(ids.map(() => 'blocked'));
    expect(host.stats.conflicts - before).toBe(1);
    const batch = await xidsOf(ids, m);
    expect(batch.size).toBe(1);
    const own = await xidsOf([contested], m);
    expect(own.size).toBe(1);
    expect([...own][0]).not.toBe([...batch][0]);
    expect(await seqsOf(contested)).toEqual([1, 2, 3, 4, 5]);
  });

  it('a send that ends its unit commits behind its write; a lost compare-and-set still runs it again', async () => {
    const rec = recordingSql(db.url, 1);
    try {
      const host = new ActorHost(rec.sql, { taskDefaults: TASK_DEFAULTS });
      const other = new ActorHost(db.pool(2), { taskDefaults: TASK_DEFAULTS });
      const [id] = (await startedTickets(host, 1)) as [string];
      const block = (h: Host) => h.send('ticket', id, { type: 'BLOCK', reason: 'wait' });
      const unblock = (h: Host) => h.send('ticket', id, { type: 'UNBLOCK' });

      // BLOCK and UNBLOCK emit events no same-transaction rule acts on, so each send is the
      // last statement of its unit and the COMMIT goes out in the same turn as its write
      // (once the statements are prepared on the one connection: a first run describes
      // them first, in a turn of their own).
      await block(host);
      await unblock(host);
      rec.sent.length = 0;
      await block(host);
      const write = rec.sent.find((x) => /update\s+"?tickets"?\s+set/i.test(x.query));
      const commit = rec.sent.find((x) => x.query.trim() === 'commit');
      expect(write).toBeDefined();
      expect(commit?.turn).toBe(write?.turn);

      // Another process unblocks and blocks the ticket again: this host's cached row is two
      // versions behind, the compare-and-set fails in Postgres (the COMMIT behind it rolls
      // back), and the send runs again on the current row.
      await unblock(other);
      await block(other);
      const conflicts = host.stats.conflicts;
      const answer = await unblock(host);
      expect(answer.state).toBe('requirements');
      expect(host.stats.conflicts).toBe(conflicts + 1);
      // Two events to start, then six blocks and unblocks in turn: no gap, no repeat.
      expect(await seqsOf(id)).toEqual([1, 2, 3, 4, 5, 6, 7, 8]);
      const [row] = await db.sql<{ state: string }[]>`select state from tickets where id = ${id}`;
      expect(row?.state).toBe('requirements');
    } finally {
      await rec.sql.end();
    }
  });

  it('sendMany decides every event before it writes, and commits behind the writes of locked rows', async () => {
    const rec = recordingSql(db.url, 1);
    try {
      const [a, b] = (await startedTickets(
        new ActorHost(db.sql, { taskDefaults: TASK_DEFAULTS }),
        2,
      )) as [string, string];
      const block = () => ({ type: 'BLOCK', reason: 'many' });
      const unblock = () => ({ type: 'UNBLOCK' });
      const state = async (id: string) =>
        (
          await db.sql<{ state: string; version: number }[]>`
          select state, version from tickets where id = ${id}`
        )[0];
      const before = await state(a);
      // b is not blocked: its UNBLOCK is refused, and a's BLOCK is not written either.
      const fresh = () => new ActorHost(rec.sql, { taskDefaults: TASK_DEFAULTS });
      await expect(
        fresh().transact((uow) =>
          uow.sendMany('ticket', [
            { id: a, events: [block] },
            { id: b, events: [unblock] },
          ]),
        ),
      ).rejects.toBeInstanceOf(IllegalTransition);
      expect(await state(a)).toEqual(before);

      // A host with a cold cache locks each row it loads: nothing can follow the writes, so
      // the COMMIT goes out with them (the second round, once the statements are prepared).
      const both = (events: () => { type: string }) =>
        fresh().transact((uow) =>
          uow.sendMany(
            'ticket',
            [a, b].map((id) => ({ id, events: [events] })),
            { last: true },
          ),
        );
      await both(block);
      await both(unblock);
      rec.sent.length = 0;
      const { value } = await both(block);
      expect(value.map((x) => x.state)).toEqual(['blocked', 'blocked']);
      const writes = rec.sent.filter((x) => /update\s+"?tickets"?\s+set/i.test(x.query));
      const commit = rec.sent.find((x) => x.query.trim() === 'commit');
      expect(writes).toHaveLength(2);
      expect(commit?.turn).toBe(writes[1]?.turn);
      expect(writes[0]?.turn).toBe(writes[1]?.turn);
      expect((await state(b))?.state).toBe('blocked');
    } finally {
      await rec.sql.end();
    }
  });

  it('a SQL fault in one unit fails only that unit, and its writes are gone', async () => {
    const host = oneLane();
    const ids = await startedTickets(host, 4);
    const [faulty] = (await startedTickets(host, 1)) as [string];
    await db.sql`insert into idempotency_keys (scope, key, request_hash, status, body)
      values ('test', ${faulty}, 'h', 200, '{}')`;
    const m = await mark();
    const lane = await holdLane(host);
    const good = ids.map((id) => host.send('ticket', id, { type: 'BLOCK', reason: 'ok' }));
    const failing = host.transact(async (uow) => {
      await uow.send('ticket', faulty, { type: 'BLOCK', reason: 'doomed' });
      // A unique violation after the unit's transition.
      await uow.tx`insert into idempotency_keys (scope, key, request_hash, status, body)
        values ('test', ${faulty}, 'h', 200, '{}')`;
    });
    lane.release();
    await expect(failing).rejects.toMatchObject({ code: '23505' });
    expect((await Promise.all(good)).map((r) => r.state)).toEqual(ids.map(() => 'blocked'));
    expect((await xidsOf(ids, m)).size).toBe(1);
    for (const id of ids) expect(await seqsOf(id)).toEqual([1, 2, 3]);
    expect(await seqsOf(faulty)).toEqual([1, 2]);
    const [row] = await db.sql`select state, version from tickets where id = ${faulty}`;
    expect(row).toEqual({ state: 'requirements', version: 2 });
    // Nothing of the rolled-back unit stayed in the cache: BLOCK applies on the stored row.
    expect((await host.send('ticket', faulty, { type: 'BLOCK', reason: 'now' })).version).toBe(3);
  });

  it('units after a failed one in the batch run once, units before it run again with fresh state', async () => {
    const host = oneLane();
    const ids = await startedTickets(host, 6);
    const runs = new Map<string, number>();
    const m = await mark();
    const lane = await holdLane(host);
    const unit = (id: string, fail: boolean) =>
      host.transact(async (uow) => {
        runs.set(id, (runs.get(id) ?? 0) + 1);
        // Each run reads the row afresh: a rolled-back run's version is never built on.
        const applied = await uow.send('ticket', id, { type: 'BLOCK', reason: 'r' });
        if (fail) throw new Error(`unit ${id} gives up`);
        return applied.version;
      });
    const [a, b, c, bad, d, e] = ids as [string, string, string, string, string, string];
    const before = [a, b, c].map((id) => unit(id, false));
    const failing = unit(bad, true);
    const after = [d, e].map((id) => unit(id, false));
    lane.release();
    await expect(failing).rejects.toThrow(`unit ${bad} gives up`);
    const versions = await Promise.all([...before, ...after]);
    expect(versions.map((v) => v.value)).toEqual([3, 3, 3, 3, 3]);
    expect([a, b, c].map((id) => runs.get(id))).toEqual([2, 2, 2]);
    expect([d, e].map((id) => runs.get(id))).toEqual([1, 1]);
    expect(runs.get(bad)).toBe(1);
    expect((await xidsOf([a, b, c, d, e], m)).size).toBe(1);
    for (const id of [a, b, c, d, e]) expect(await seqsOf(id)).toEqual([1, 2, 3]);
    expect(await seqsOf(bad)).toEqual([1, 2]);
  });

  it('a failed commit answers no unit as a success and leaves nothing half-committed', async () => {
    const host = oneLane();
    const ids = await startedTickets(host, 4);
    const [first, second, third, fourth] = ids as [string, string, string, string];
    const m = await mark();
    const lane = await holdLane(host);
    let pid!: (n: number) => void;
    const backend = new Promise<number>((r) => {
      pid = r;
    });
    const units = [
      host.send('ticket', first, { type: 'BLOCK', reason: 'x' }),
      host.send('ticket', second, { type: 'BLOCK', reason: 'x' }),
      host.transact(async (uow) => {
        await uow.send('ticket', third, { type: 'BLOCK', reason: 'x' });
        const [row] = await uow.tx<{ pid: number }[]>`select pg_backend_pid() as pid`;
        pid(row?.pid ?? 0);
        await uow.tx`select pg_sleep(30)`;
      }),
      host.send('ticket', fourth, { type: 'BLOCK', reason: 'x' }),
    ];
    lane.release();
    await db.sql`select pg_terminate_backend(${await backend})`;
    const settled = await Promise.allSettled(units);
    expect(settled.map((s) => s.status)).toEqual(units.map(() => 'rejected'));
    for (const s of settled) {
      expect((s as PromiseRejectedResult).reason).not.toBeInstanceOf(VersionConflict);
    }
    expect(host.commits.stats.failedCommits).toBeGreaterThanOrEqual(1);
    expect(await xidsOf(ids, m)).toEqual(new Set());
    expect(
      await db.sql`select 1 from events where entity_id in ${db.sql(ids)} and seq > 2`,
    ).toEqual([]);
    const rows = await db.sql<{ state: string; version: number }[]>`
      select distinct state, version from tickets where id in ${db.sql(ids)}`;
    expect(rows).toEqual([{ state: 'requirements', version: 2 }]);
    // The host goes on (a new connection) and its cache kept nothing of the lost batch.
    const again = await Promise.all(
      ids.map((id) => host.send('ticket', id, { type: 'BLOCK', reason: 'y' })),
    );
    expect(again.map((a) => a.version)).toEqual(ids.map(() => 3));
  });
});
