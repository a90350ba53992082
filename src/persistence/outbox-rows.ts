/**
 * SQL for the outbox relay. The event log is the outbox, followed by a cursor: the relay
 * reads events after `relay_cursor` in (tx, pos) order, below a watermark under which no
 * transaction that could still write an event runs, publishes them and moves the cursor, in
 * one transaction. No event row is written for it: publishing costs one read per batch and
 * one cursor update per round, not an update of each event.
 *
 * Rounds of all relays take turns on a transaction-scoped advisory lock, so the cursor has
 * one writer at a time; a relay that dies releases the lock with its connection and the next
 * round starts from the cursor it last committed (the repeated publishes are deduplicated by
 * JetStream on the event id). Events the cursor passes without publishing wait in
 * `relay_held`, in order per entity (a refused event backing off, or an event whose
 * predecessor lies beyond the cursor). Events the stream turns out to have lost are
 * published again from a checkpoint (guarantee 8).
 */

import type { PendingQuery, Row } from 'postgres';
import type { EntityType } from '../machines/index.js';
import { type Db, type Tx, writeNow } from './db.js';

/** Rounds of every relay of this database take turns on it. */
const RELAY_LOCK_ID = 7_402_615_002;

/** A position in the relay's order: the writing transaction's id (as text), then `pos`. */
export interface RelayPosition {
  tx: string;
  pos: number;
}

export interface RelayCursor extends RelayPosition {
  /** The highest stream sequence acknowledged so far. */
  streamSeq: number;
  /** Some event is held (waits in `relay_held`), as the cursor was read. */
  held: boolean;
}

export interface OutboxItem extends RelayPosition {
  eventId: string;
  entityType: EntityType;
  entityId: string;
  seq: number;
  type: string;
  /** `data` as Postgres wrote it out: the message embeds it without parsing it. */
  dataJson: string;
  /** Parsed on first use (a reduced form, a dispatch wake-up). */
  readonly data: Record<string, unknown>;
  /** ISO 8601, UTC, milliseconds (as `Date.toISOString` writes it). */
  at: string;
  /** Attempts to publish this event so far, this one included. */
  attempts: number;
  /** Publishes of this event the server refused. */
  rejections: number;
}

/** An event read after the cursor, with what decides whether it may go out now. */
export interface CursorItem extends OutboxItem {
  /** The entity's previous event (by seq), when it has one. */
  pred: RelayPosition | null;
  /** The entity has events waiting in `relay_held`: this one joins them. */
  held: boolean;
}

interface ItemRaw {
  pos: number;
  tx: string;
  event_id: string;
  entity_type: EntityType;
  entity_id: string;
  seq: number;
  type: string;
  data: string;
  at: string;
  attempts: number;
  rejections: number;
}

function toItem(r: ItemRaw): OutboxItem {
  let data: Record<string, unknown> | undefined;
  return {
    tx: r.tx,
    pos: r.pos,
    eventId: r.event_id,
    entityType: r.entity_type,
    entityId: r.entity_id,
    seq: r.seq,
    type: r.type,
    dataJson: r.data,
    get data() {
      data ??= JSON.parse(r.data) as Record<string, unknown>;
      return data;
    },
    at: r.at,
    attempts: r.attempts,
    rejections: r.rejections,
  };
}

/** The columns of an item: `data` as text, `at` as `Date.toISOString` writes it. */
const ITEM_COLUMNS = `e.pos, e.tx, e.event_id, e.entity_type, e.entity_id, e.seq, e.type,
  e.data::text as data,
  to_char(e.at at time zone 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"') as at`;

/**
 * Orders two relay positions, the transaction ids as 64-bit numbers: Postgres writes them in
 * decimal without leading zeros, so a shorter one is smaller and equal lengths compare as text
 * (no parsing: the relay compares positions for every event it reads).
 */
export function comparePositions(a: RelayPosition, b: RelayPosition): number {
  if (a.tx !== b.tx) {
    if (a.tx.length !== b.tx.length) return a.tx.length - b.tx.length;
    return a.tx < b.tx ? -1 : 1;
  }
  return a.pos - b.pos;
}

/**
 * Takes the relay's turn (waits for another relay's round to commit) and reads the cursor,
 * and whether any event is held (so that a round reads the held ones only when there are:
 * that read cost Postgres half a millisecond of planning a round). With `idleTimeoutMs`,
 * Postgres ends the round's session once it sits that long between statements holding the
 * lock (its process frozen or cut off): the rounds of every other relay wait behind it, so
 * its stall is bounded, and its round rolls back whole. The cursor is read by a statement of
 * its own: one that also waited for the lock would read it as it was before the wait.
 *
 * `lazyCommit`: the transaction's COMMIT returns without waiting for its WAL to reach disk
 * (`synchronous_commit` off for it alone). Only for what a round writes: the cursor, the held
 * events and the checkpoints. A crash of Postgres may then lose the last rounds' records, and
 * the relay publishes those events again, deduplicated by the stream on their ids: the same
 * as a relay killed between its publishes and its commit, which every round must survive
 * anyway. No event, state or acknowledgement of anyone else's depends on a round's commit.
 */
export async function lockRelay(
  tx: Tx,
  options: { idleTimeoutMs?: number; lazyCommit?: boolean } = {},
): Promise<RelayCursor> {
  const { idleTimeoutMs, lazyCommit = false } = options;
  const timeout =
    idleTimeoutMs === undefined
      ? tx``
      : tx`, set_config('idle_in_transaction_session_timeout', ${String(Math.max(1, Math.round(idleTimeoutMs)))}, true)`;
  const lazy = lazyCommit ? tx`, set_config('synchronous_commit', 'off', true)` : tx``;
  const [, rows] = await Promise.all([
    tx`select pg_advisory_xact_lock(${RELAY_LOCK_ID}) ${timeout} ${lazy}`,
    tx<{ tx: string; pos: number; stream_seq: number; held: boolean }[]>`
      select tx::text as tx, pos, stream_seq,
        exists (select 1 from relay_held where published_seq is null) as held
      from relay_cursor`,
  ]);
  const r = rows[0];
  if (!r) throw new Error('relay_cursor has no row: the migrations have not run');
  return { tx: r.tx, pos: r.pos, streamSeq: r.stream_seq, held: r.held };
}

/**
 * The watermark: the lowest id among the snapshot's running transactions that may write
 * here, or the snapshot's xmax when none. Every transaction below it has ended, so no event
 * below it can still appear. A running transaction is skipped only when `pg_stat_activity`
 * shows it in another database (it cannot write this event log): a long transaction there
 * does not hold this relay back. One whose database is not shown counts as ours. (Within a
 * transaction Postgres keeps its first read of `pg_stat_activity`; a later read of the round
 * can then only count a transaction as ours that is not, never the reverse: an id once shown
 * in another database belongs to it for good.) It calls the view's function itself: the
 * view's joins, unused here, cost a tenth of a millisecond of planning a read.
 */
const WATERMARK = `(
  with snap as materialized (select pg_current_snapshot() as s)
  select coalesce(
    (select min(x) from snap, pg_snapshot_xip(snap.s) as x
      where not exists (
        select 1 from pg_stat_get_activity(null) a
        where a.backend_xid = x::xid
          and a.datid <> (select oid from pg_database where datname = current_database()))),
    (select pg_snapshot_xmax(s) from snap)))`;

/**
 * Up to `limit` events after `after` and below the watermark, in (tx, pos) order, with each
 * one's predecessor and whether its entity has held events.
 */
export async function readAfter(
  tx: Tx,
  after: RelayPosition | null,
  limit: number,
): Promise<CursorItem[]> {
  // Without a position, from the committed cursor (read in the same statement, so a round's
  // first read can be sent together with the lock that precedes it).
  const from = after
    ? tx`(select ${after.tx}::xid8 as tx, ${after.pos}::bigint as pos)`
    : tx`(select tx, pos from relay_cursor limit 1)`;
  // Lateral, so the cursor is an index condition of the scan (a join would filter the log).
  // `limit 1` everywhere the cursor is read: without statistics the planner takes the table
  // for 1,330 rows, and the cost it then expects switches JIT on (about 400 ms a statement).
  // Transaction ids come back as the driver gives an unknown type, as text, without a cast.
  // No outer `order by`: the lateral scan over the cursor's one row yields the index's order,
  // and sorting the batch again cost Postgres a tenth of the read; `inRelayOrder` checks it.
  const query = tx<
    (ItemRaw & { pred_tx: string | null; pred_pos: number | null; held: boolean })[]
  >`
    select x.* from ${from} c
    cross join lateral (
      select ${tx.unsafe(ITEM_COLUMNS)}, 1 as attempts, 0 as rejections,
        p.tx as pred_tx, p.pos as pred_pos,
        exists (select 1 from relay_held h
          where h.entity_id = e.entity_id and h.published_seq is null) as held
      from events e
      -- Each predecessor by the (entity_id, seq) index. As a plain join, a log of a few
      -- thousand events was hashed whole on every read; the \`limit 1\` keeps the planner
      -- from turning this back into that join.
      left join lateral (select p.tx, p.pos from events p
        where p.entity_id = e.entity_id and p.seq = e.seq - 1 limit 1) p on true
      where (e.tx, e.pos) > (c.tx, c.pos) and e.tx < ${tx.unsafe(WATERMARK)}
      order by e.tx, e.pos
      limit ${limit}
    ) x`;
  // A read after a batch is asked for before that batch's publishes are built: written at
  // once, Postgres runs it while they are (at the end of the turn, it went out behind them).
  const rows = await (after ? writeNow(query) : query);
  const items = rows.map((r) => {
    // Assigned, not spread: a spread would read (and parse) the lazy `data`.
    const item = toItem(r) as CursorItem;
    item.pred =
      r.pred_tx === null || r.pred_pos === null ? null : { tx: r.pred_tx, pos: r.pred_pos };
    item.held = r.held;
    return item;
  });
  return inRelayOrder(items);
}

/**
 * The items in (tx, pos) order: as they come (checked in one pass, without parsing the ids),
 * or sorted when a plan ever returned them otherwise.
 */
export function inRelayOrder<T extends RelayPosition>(items: T[]): T[] {
  for (let i = 1; i < items.length; i++) {
    if (comparePositions(items[i - 1]!, items[i]!) >= 0) return items.sort(comparePositions);
  }
  return items;
}

/**
 * Held events that may go out now, in `pos` order: those of entities whose first held event
 * is due (`retry_at`) and whose predecessor the cursor has passed.
 */
export async function readHeldDue(tx: Tx, limit: number): Promise<OutboxItem[]> {
  const rows = await tx<ItemRaw[]>`
    with heads as (
      select distinct on (h.entity_id) h.entity_id, h.pos, h.retry_at
      from relay_held h where h.published_seq is null
      order by h.entity_id, h.pos
    ), due as (
      select hd.entity_id from heads hd
      join events e on e.pos = hd.pos
      left join events p on p.entity_id = e.entity_id and p.seq = e.seq - 1
      cross join (select tx, pos from relay_cursor limit 1) c
      where hd.retry_at <= now()
        and (p.pos is null or (p.tx, p.pos) <= (c.tx, c.pos))
    )
    select ${tx.unsafe(ITEM_COLUMNS)}, h.attempts + 1 as attempts, h.rejections
    from relay_held h join events e on e.pos = h.pos
    where h.published_seq is null and h.entity_id in (select entity_id from due)
    order by h.pos
    limit ${limit}`;
  return rows.map(toItem);
}

/** An event the cursor passes without publishing it. */
export interface HoldRow {
  pos: number;
  entityId: string;
  /** Set when its publish was tried and failed. */
  failure?: Failure;
}

export interface Failure {
  delayMs: number;
  error: string;
  rejected: boolean;
}

export interface RoundOutcome {
  cursor: RelayPosition;
  /** The highest stream sequence acknowledged (the cursor's, when nothing was published). */
  streamSeq: number;
  hold: HoldRow[];
  /** Held events the stream took, with their sequences. */
  heldPublished: { pos: number; streamSeq: number }[];
  /** Held events whose publish failed again. */
  heldFailed: { pos: number; failure: Failure }[];
  /** Record a checkpoint at the new cursor. */
  checkpoint: boolean;
}

/**
 * Records a round in its transaction: the held events' changes, the cursor, a checkpoint.
 * Every statement is handed to the connection before this returns its promise, so a COMMIT
 * sent right after the call (`commitAhead`) goes out behind them.
 *
 * Resolves to whether committed events wait after the new cursor. The cursor's write sees
 * every event committed before it ran, so this is true when events were committed after the
 * round's last read, or when they were committed but kept back by the watermark: a
 * transaction with a lower id was still running. That transaction may write no event when it
 * ends, so nothing would wake a relay for them: the relay must look again by itself.
 */
export async function finishRound(tx: Tx, o: RoundOutcome): Promise<boolean> {
  const writes: PendingQuery<Row[]>[] = [];
  if (o.hold.length > 0) {
    const f = o.hold.map((h) => h.failure);
    writes.push(tx`
      insert into relay_held (pos, entity_id, attempts, rejections, retry_at, last_error)
      select h.pos, h.entity_id, h.attempts, h.rejections,
        now() + make_interval(secs => h.delay_s), h.last_error
      from unnest(${o.hold.map((h) => h.pos)}::bigint[], ${o.hold.map((h) => h.entityId)}::text[],
        ${f.map((x) => (x ? 1 : 0))}::int[], ${f.map((x) => (x?.rejected ? 1 : 0))}::int[],
        ${f.map((x) => (x ? Math.max(0, x.delayMs) / 1000 : 0))}::float8[],
        ${f.map((x) => (x ? x.error.slice(0, 2000) : null)) as string[]}::text[])
        as h(pos, entity_id, attempts, rejections, delay_s, last_error)
      on conflict (pos) do nothing`);
  }
  if (o.heldPublished.length > 0) {
    writes.push(tx`
      update relay_held h set published_seq = p.seq, published_at = now()
      from unnest(${o.heldPublished.map((p) => p.pos)}::bigint[],
        ${o.heldPublished.map((p) => p.streamSeq)}::bigint[]) as p(pos, seq)
      where h.pos = p.pos`);
  }
  for (const { pos, failure } of o.heldFailed) {
    writes.push(tx`
      update relay_held set attempts = attempts + 1,
        rejections = rejections + ${failure.rejected ? 1 : 0},
        retry_at = now() + make_interval(secs => ${Math.max(0, failure.delayMs) / 1000}),
        last_error = ${failure.error.slice(0, 2000)}
      where pos = ${pos}`);
  }
  const cursor = tx`
    update relay_cursor set tx = ${o.cursor.tx}::xid8, pos = ${o.cursor.pos},
      stream_seq = greatest(stream_seq, ${o.streamSeq}), updated_at = now()
    returning (select true from events e
      where (e.tx, e.pos) > (${o.cursor.tx}::xid8, ${o.cursor.pos}::bigint)
      order by e.tx, e.pos limit 1) is not null as behind`;
  // Ordered like the relay's index, so the planner walks it from the cursor: a bare `exists`
  // was planned as a scan of the whole log (1 ms a round).
  writes.push(cursor);
  if (o.checkpoint && o.streamSeq > 0) {
    writes.push(tx`
      insert into relay_checkpoints (stream_seq, tx, pos)
      values (${o.streamSeq}, ${o.cursor.tx}::xid8, ${o.cursor.pos})
      on conflict (stream_seq) do update set tx = excluded.tx, pos = excluded.pos, at = now()`);
  }
  // Handed to the connection here, in order, not when Promise.all gets to them.
  await Promise.all(writes.map((w) => w.execute()));
  return (await cursor)[0]?.behind === true;
}

/**
 * The stream holds nothing after sequence `kept`: moves the cursor back to the latest
 * checkpoint at or below it (the start of the log when there is none) and sets held events
 * published after it back to waiting, so the relay publishes all of them again. The cursor's
 * stream sequence becomes `streamSeq`. Returns the number of events to be published again.
 * Runs under the relay's lock: in the caller's round, or in a transaction of its own.
 */
export async function rewind(db: Db, kept: number, streamSeq: number): Promise<number> {
  const run = async (tx: Tx) => {
    const cur = await lockRelay(tx);
    const cps = await tx<{ tx: string; pos: number }[]>`
      select tx::text as tx, pos from relay_checkpoints
      where stream_seq <= ${kept} order by stream_seq desc limit 1`;
    const to: RelayPosition = cps[0] ?? { tx: '0', pos: 0 };
    const [passed, reheld] = await Promise.all([
      tx<{ n: number }[]>`
        select count(*)::int as n from events
        where (tx, pos) > (${to.tx}::xid8, ${to.pos}) and (tx, pos) <= (${cur.tx}::xid8, ${cur.pos})
          and pos not in (select pos from relay_held where published_seq is null)`,
      tx<{ pos: number }[]>`
        update relay_held set published_seq = null, published_at = null, retry_at = now()
        where published_seq > ${kept} returning pos`,
      tx`update relay_cursor set tx = ${to.tx}::xid8, pos = ${to.pos}, stream_seq = ${streamSeq},
        updated_at = now()`,
      tx`delete from relay_checkpoints where stream_seq > ${kept}`,
    ]);
    return (passed[0]?.n ?? 0) + reheld.length;
  };
  if ('savepoint' in db) return run(db);
  return db.begin(run);
}

/** Drops checkpoints and published held rows older than `maxAgeMs`, keeping the latest. */
export async function pruneRelayHistory(db: Db, maxAgeMs: number): Promise<void> {
  const secs = maxAgeMs / 1000;
  await db`delete from relay_checkpoints
    where at < now() - make_interval(secs => ${secs})
      and stream_seq < (select max(stream_seq) from relay_checkpoints)`;
  await db`delete from relay_held
    where published_seq is not null and published_at < now() - make_interval(secs => ${secs})`;
}

/** The highest stream sequence the relay recorded (0 when none). */
export async function recordedStreamSeq(db: Db): Promise<number> {
  const rows = await db<{ s: number }[]>`select stream_seq as s from relay_cursor`;
  return rows[0]?.s ?? 0;
}

export interface OutboxLag {
  /** Events committed but not yet acknowledged by JetStream. */
  count: number;
  /** Age of the oldest such event in ms (0 when none). */
  oldestMs: number;
}

/** Events after the cursor or held, counted (the relay's lag). */
export async function outboxLag(db: Db): Promise<OutboxLag> {
  const rows = await db<{ n: number; age: number | null }[]>`
    with c as (select tx, pos from relay_cursor limit 1),
    ahead as (
      select e.at from events e, c where (e.tx, e.pos) > (c.tx, c.pos)
      union all
      select e.at from relay_held h join events e on e.pos = h.pos where h.published_seq is null
    )
    select count(*)::int as n, (extract(epoch from now() - min(at)) * 1000)::float8 as age
    from ahead`;
  const r = rows[0];
  return { count: r?.n ?? 0, oldestMs: Math.max(0, Math.round(r?.age ?? 0)) };
}

/** A transaction of this database that has written and not ended (the oldest such). */
export interface OpenWriter {
  pid: number;
  applicationName: string;
  /** `pg_stat_activity.state`: `idle in transaction` is a session that left it open. */
  state: string | null;
  /** Since the transaction began. */
  ageMs: number;
}

/**
 * The oldest transaction of this database holding a transaction id, other than the caller's:
 * the one that keeps the relay's watermark down while it runs.
 */
export async function oldestOpenWriter(db: Db): Promise<OpenWriter | null> {
  const rows = await db<
    { pid: number; application_name: string; state: string | null; age_ms: number | null }[]
  >`
    select pid, application_name, state,
      (extract(epoch from now() - xact_start) * 1000)::float8 as age_ms
    from pg_stat_activity
    where datname = current_database() and backend_xid is not null and pid <> pg_backend_pid()
    order by age(backend_xid) desc
    limit 1`;
  const r = rows[0];
  if (!r) return null;
  return {
    pid: r.pid,
    applicationName: r.application_name,
    state: r.state,
    ageMs: Math.max(0, Math.round(r.age_ms ?? 0)),
  };
}

/**
 * Whether any event is not published yet (after the cursor, or held): the first one found
 * answers, where `outboxLag` counts them all (a poll for the end of a backlog).
 */
export async function anyUnpublished(db: Db): Promise<boolean> {
  // The first event after the cursor in the index's order: as a bare `exists` over a join
  // the planner scanned the log from its start, the whole of it once everything was out (7 ms
  // at 22,000 events, polled every 10 ms by the benchmarks).
  const rows = await db<{ any: boolean }[]>`
    select exists (
      select 1 from (select tx, pos from relay_cursor limit 1) c
      cross join lateral (
        select 1 from events e where (e.tx, e.pos) > (c.tx, c.pos)
        order by e.tx, e.pos limit 1) x
    ) or exists (select 1 from relay_held where published_seq is null) as any`;
  return rows[0]?.any ?? false;
}

/** How many events (of `entityIds`, or all) are not published yet: after the cursor, or held. */
export async function unpublishedCount(db: Db, entityIds?: readonly string[]): Promise<number> {
  if (!entityIds) return (await outboxLag(db)).count;
  const ids = [...entityIds];
  const rows = await db<{ n: number }[]>`
    select count(*)::int as n from events e, (select tx, pos from relay_cursor limit 1) c
    where e.entity_id = any(${ids}::text[])
      and ((e.tx, e.pos) > (c.tx, c.pos)
        or e.pos in (select pos from relay_held where published_seq is null))`;
  return rows[0]?.n ?? 0;
}
