/**
 * The outbox relay: publishes committed events to JetStream, in order per entity, with
 * `Nats-Msg-Id` = the event id. The event log is the outbox and the relay follows it with a
 * cursor (outbox-rows.ts): a round takes the relays' lock, reads events after the cursor below
 * the watermark, publishes them, and commits the cursor past them; no event row is written.
 * Any number of relays may run: their rounds take turns, and a relay that dies leaves the
 * cursor where its last round committed it (the repeated publishes are deduplicated by
 * JetStream on the event id). Within a round the next batch is read while the previous one's
 * acks are still arriving, and one entity's events go out one after another.
 *
 * Woken in-process by commits, over NATS by processes that run no relay, with a polling
 * fallback. An event the server refuses is held (`relay_held`) and backs off on its own
 * (jittered, exponential), holding back only the later events of its entity; after
 * `maxRejections` refusals, or when it can never fit the server's `max_payload`, it goes out
 * in reduced form rather than being retried forever. While NATS is down (timeouts, no
 * connection) the cursor stays before the first event not sent and the relay backs off. A
 * periodic stream check compares the stream's last sequence with the highest one recorded
 * and publishes again whatever the stream lost (guarantee 8).
 */
import { JetStreamApiError, type JetStreamManager } from '@nats-io/jetstream';
import { InvalidArgumentError, type NatsConnection } from '@nats-io/transport-node';
import type { Logger } from '../log.js';
import { commitAhead, type Sql } from '../persistence/db.js';
import {
  type CursorItem,
  comparePositions,
  type Failure,
  finishRound,
  type HoldRow,
  lockRelay,
  type OutboxItem,
  type OutboxLag,
  oldestOpenWriter,
  outboxLag,
  pruneRelayHistory,
  type RelayPosition,
  readAfter,
  readHeldDue,
  recordedStreamSeq,
  rewind,
} from '../persistence/outbox-rows.js';
import { StreamPublisher } from './stream-publisher.js';
import { ensureStreams, isStreamNotFound, type StreamOptions } from './streams.js';
import { eventSubject, type TransportNames } from './subjects.js';

export interface RelayOptions {
  sql: Sql;
  /** The events go out on this connection (StreamPublisher), the stream checks through `jsm`. */
  nc: NatsConnection;
  jsm: JetStreamManager;
  names: TransportNames;
  log: Logger;
  streamOptions?: StreamOptions;
  /** Events read at once. */
  batchSize?: number;
  /**
   * Batches in flight at once within a round: the next batch is read and published while
   * the earlier ones' acks are awaited. 1 turns pipelining off.
   */
  pipelineDepth?: number;
  /** Batches per round, at most: the cursor is committed at least this often. */
  roundBatches?: number;
  /** A checkpoint (where a stream that lost its tail is published again from) per interval. */
  checkpointMs?: number;
  /** Checkpoints and the record of held events' publishes are kept this long. */
  historyMs?: number;
  /** Polling fallback when no wake-up arrives. */
  pollMs?: number;
  /**
   * How long events may wait behind a running transaction, nothing published meanwhile,
   * before the relay names that transaction in a warning (and then at most this often).
   */
  keptBackWarnMs?: number;
  publishTimeoutMs?: number;
  /** Interval of the stream check (guarantee 8); 0 disables the timer. */
  streamCheckMs?: number;
  /** First delay of a row whose publish failed; doubles per attempt, jittered. */
  retryBaseMs?: number;
  /** Longest wait of a failing row, and of the relay after a failed round (Postgres down). */
  maxBackoffMs?: number;
  /**
   * Refusals by the server (not timeouts or outages) after which an event is published in
   * reduced form.
   */
  maxRejections?: number;
  /** The server's `max_payload` (bytes), read at each publish: it can change on reconnect. */
  maxPayload?: () => number | undefined;
  /** Called after the stream had to be created again (consumers must be recreated). */
  onStreamRecreated?: () => void;
  /**
   * Called once the stream took an event for the first time (not for a duplicate of one it
   * had), as it stands in the event log: the dispatch wake-up goes out here.
   */
  onPublished?: (item: OutboxItem) => void;
}

export interface RelayStats {
  published: number;
  duplicates: number;
  failures: number;
  /** Events set back to unpublished because the stream lost them. */
  republished: number;
  streamChecks: number;
  /** Events published in reduced form (too large, or refused too often). */
  reduced: number;
  /** Warnings that events waited behind a running transaction (see `keptBackWarnMs`). */
  keptBackWarnings: number;
  /** Rounds run (each a transaction under the relays' lock), whatever they found. */
  rounds: number;
}

/**
 * Events a relay reads at once. 512 rather than 256: a read's fixed part (planning, the
 * watermark, a round trip on a machine whose cores are busy publishing) is what a round waits
 * on; `npm run bench -- --only relay`, alternating, two pairs: 0.93 / 0.81 of raw publishing
 * against 0.82 / 0.72.
 */
export const RELAY_BATCH = 512;

/**
 * The first wait before a relay reads again after events were kept back by the watermark:
 * the transaction holding them back is usually a reaction's, a few milliseconds long.
 */
const BEHIND_FIRST_MS = 2;
/**
 * While events stay kept back this long and nothing goes out, the relay names the transaction
 * holding them (at most once per this interval): a session left open in a transaction halts
 * every event of the database until it ends.
 */
const KEPT_BACK_WARN_MS = 30_000;
/** NATS's default `max_payload`, used until the server has told its own. */
const DEFAULT_MAX_PAYLOAD = 1_048_576;
/** Room for the headers (`Nats-Msg-Id`, `Nats-Expected-Stream`), which count toward it. */
const HEADER_ALLOWANCE = 1_024;
/** A reduced event keeps at most this many of its scalar `data` fields, each this short. */
const KEPT_FIELDS = 32;
const KEPT_STRING_CHARS = 200;

/**
 * The message body of a domain event on the stream: the event-log entry. Written by hand
 * around the data's JSON as Postgres gave it: parsing and writing it again cost the relay a
 * fifth of its time.
 */
export function eventPayload(item: OutboxItem, data?: Record<string, unknown>): string {
  return `{"pos":${item.pos},"eventId":${JSON.stringify(item.eventId)},"seq":${item.seq},"entityId":${JSON.stringify(item.entityId)},"entityType":${JSON.stringify(item.entityType)},"type":${JSON.stringify(item.type)},"data":${data ? JSON.stringify(data) : item.dataJson},"at":${JSON.stringify(item.at)}}`;
}

/**
 * The `data` of an event published in reduced form: its small scalar fields (an executor, a
 * state, a reason), then `truncated`, the size of the full data and why. The envelope (event
 * id, entity, seq, type) is intact.
 *
 * Why a reduced form rather than a dead letter: the stream stays complete and in order per
 * entity, so the reactions (which read the event from Postgres before acting), the SSE feed
 * and the stream check go on working, and nothing waits on an operator. Postgres keeps the
 * full entry; a consumer that sees `truncated: true` reads it there.
 */
export function reducedData(
  data: Record<string, unknown>,
  reason: string,
): Record<string, unknown> {
  const kept: Record<string, unknown> = {};
  let n = 0;
  for (const [key, value] of Object.entries(data)) {
    if (n >= KEPT_FIELDS) break;
    const small =
      value === null ||
      typeof value === 'number' ||
      typeof value === 'boolean' ||
      (typeof value === 'string' && value.length <= KEPT_STRING_CHARS);
    if (small && key.length <= KEPT_STRING_CHARS) {
      kept[key] = value;
      n++;
    }
  }
  return {
    ...kept,
    truncated: true,
    bytes: Buffer.byteLength(JSON.stringify(data)),
    reason: reason.slice(0, KEPT_STRING_CHARS),
  };
}

/**
 * True when the server answered and refused this message (or the client refused it before
 * sending): trying the same bytes again will fail again. Timeouts, a closed or draining
 * connection and "no responders" are outages: the row waits, however long they last.
 */
export function isRejection(error: unknown): boolean {
  return error instanceof JetStreamApiError || error instanceof InvalidArgumentError;
}

export class OutboxRelay {
  readonly stats: RelayStats = {
    published: 0,
    duplicates: 0,
    failures: 0,
    republished: 0,
    streamChecks: 0,
    reduced: 0,
    keptBackWarnings: 0,
    rounds: 0,
  };
  private readonly o: Required<
    Omit<RelayOptions, 'onStreamRecreated' | 'streamOptions' | 'maxPayload' | 'onPublished'>
  > &
    Pick<RelayOptions, 'onStreamRecreated' | 'streamOptions' | 'maxPayload' | 'onPublished'>;
  private running = false;
  private loop: Promise<void> | null = null;
  private wakeUp: (() => void) | null = null;
  private woken = false;
  private checkTimer: NodeJS.Timeout | null = null;
  private checking: Promise<number> | null = null;
  private consecutiveFailures = 0;
  private backingOff = false;
  private nextFailureCheck = 0;
  private lastCheckpoint = 0;
  /** The wait before looking again for events kept back by a running transaction. */
  private behindMs = 0;
  /** Since when events have been kept back with nothing published (0: they are not). */
  private keptBackSince = 0;
  private nextKeptBackWarn = 0;
  /**
   * Made at the first publish (a relay can be driven by hand without `start`), and again
   * when the last one can answer nothing more.
   */
  private publisher: StreamPublisher | null = null;

  constructor(options: RelayOptions) {
    this.o = {
      batchSize: RELAY_BATCH,
      pipelineDepth: 2,
      pollMs: 1_000,
      keptBackWarnMs: KEPT_BACK_WARN_MS,
      publishTimeoutMs: 5_000,
      streamCheckMs: 30_000,
      retryBaseMs: 200,
      maxBackoffMs: 5_000,
      maxRejections: 5,
      roundBatches: 8,
      checkpointMs: 1_000,
      historyMs: 86_400_000,
      ...options,
    };
  }

  async start(): Promise<void> {
    if (this.running) return;
    this.running = true;
    if (this.o.streamCheckMs > 0) {
      this.checkTimer = setInterval(() => {
        void this.checkStream().catch((error) =>
          this.o.log.warn({ err: error }, 'stream check failed'),
        );
      }, this.o.streamCheckMs);
      this.checkTimer.unref();
      // At start too: NATS may have come back from a crash that lost acknowledged messages.
      void this.checkStream().catch((error) =>
        this.o.log.warn({ err: error }, 'stream check failed'),
      );
    }
    this.loop = this.run();
  }

  async stop(): Promise<void> {
    this.running = false;
    if (this.checkTimer) clearInterval(this.checkTimer);
    this.checkTimer = null;
    this.wakeUp?.();
    await this.loop;
    this.loop = null;
    await this.checking?.catch(() => 0);
    this.publisher?.close();
    this.publisher = null;
  }

  /** Asks for a round now (a commit happened). */
  wake(): void {
    this.woken = true;
    if (!this.backingOff) this.wakeUp?.();
  }

  lag(): Promise<OutboxLag> {
    return outboxLag(this.o.sql);
  }

  /** One round on its own: returns the number of events published. */
  async drainOnce(): Promise<number> {
    return (await this.round()).published;
  }

  /**
   * One round, in a transaction holding the relays' lock: publishes the held events that are
   * due, then reads batches after the cursor (the next while the previous is in flight) and
   * publishes them, one entity's in order; then records what was held or published and moves
   * the cursor. Rejects only when Postgres failed; then nothing of the round is recorded and
   * the next round publishes its events again (deduplicated by the stream).
   */
  private round(): Promise<RoundResult> {
    this.stats.rounds++;
    return this.o.sql.begin(async (tx) => {
      const [cursor, first] = await Promise.all([
        // A round waits at most a publish's timeout between statements; longer, it is stuck.
        // Its COMMIT waits for no disk flush: what it records is what a crash may take back.
        lockRelay(tx, { idleTimeoutMs: this.o.publishTimeoutMs + 1_000, lazyCommit: true }),
        readAfter(tx, null, this.o.batchSize),
      ]);
      const heldDue = cursor.held ? await readHeldDue(tx, this.o.batchSize) : [];
      const r = new RoundState(cursor.streamSeq);
      const sends: Promise<void>[] = [];

      // Held events first: an entity's go out in order until one fails again.
      const heldEntities = new Set<string>();
      for (const rows of groupByEntity(heldDue)) {
        heldEntities.add(rows[0]!.entityId);
        sends.push(
          (async () => {
            for (const item of rows) {
              try {
                const ack = await this.publish(item);
                r.ack(ack);
                r.heldPublished.push({ pos: item.pos, streamSeq: ack.seq });
              } catch (error) {
                r.heldFailed.push({ pos: item.pos, failure: this.failure(item, error) });
                return;
              }
            }
          })(),
        );
      }

      // Then the events after the cursor.
      const chains = new Map<string, Promise<void>>();
      const inFlight: Promise<unknown>[] = [];
      let readFrom: RelayPosition = cursor;
      let batch = first;
      let capped = false;
      for (let n = 1; ; n++) {
        if (batch.length === 0) break;
        // The position this batch was read after: its events' predecessors are compared to it.
        const after = readFrom;
        readFrom = batch[batch.length - 1]!;
        capped = n >= this.o.roundBatches;
        // A short batch ends the round: reading on after it (once it was out) made more,
        // smaller reads under a steady load, and cost a drain 4-7% of its rate.
        const more = !capped && batch.length === this.o.batchSize;
        // The next batch is asked for before this one is handed to the client: Postgres reads
        // it while this thread builds and sends the publishes (asked for after them, the read
        // was what a round waited on most).
        const next = more ? readAfter(tx, readFrom, this.o.batchSize) : null;
        next?.catch(() => {});
        r.order.push(...batch);
        const inBatch = new Set(batch.map((i) => i.pos));
        const steps: Promise<void>[] = [];
        for (const rows of groupByEntity(batch, true)) {
          for (const item of rows) {
            const entity = item.entityId;
            // Waits when its entity has held events, or when its predecessor (a later
            // transaction wrote it) is not yet behind the cursor nor in this batch.
            const waits =
              item.held ||
              heldEntities.has(entity) ||
              r.entity.get(entity) === 'held' ||
              (item.pred !== null &&
                !inBatch.has(item.pred.pos) &&
                comparePositions(item.pred, after) > 0);
            if (waits && !chains.has(entity)) {
              heldEntities.add(entity);
              r.hold.push({ pos: item.pos, entityId: entity });
              continue;
            }
            const step = (chains.get(entity) ?? Promise.resolve()).then(() =>
              this.sendInRound(r, item, waits),
            );
            chains.set(entity, step);
            steps.push(step);
          }
        }
        inFlight.push(Promise.all(steps));
        if (!next) break;
        // The oldest of `pipelineDepth` batches in flight is awaited before the next is
        // published, so the read's time overlaps the publishing.
        if (inFlight.length >= this.o.pipelineDepth) {
          await inFlight[inFlight.length - this.o.pipelineDepth];
        }
        batch = await next;
      }
      await Promise.all([...sends, ...inFlight]);

      // The cursor passes every event read, up to the first one an outage kept from the stream.
      let to: RelayPosition = cursor;
      for (const item of r.order) {
        if (r.unsent.has(item.pos)) break;
        to = item;
      }
      const checkpoint =
        r.streamSeq > cursor.streamSeq && Date.now() - this.lastCheckpoint >= this.o.checkpointMs;
      if (checkpoint) this.lastCheckpoint = Date.now();
      // A new message got a sequence the stream had already given: it lost everything from
      // there on. Everything published after the checkpoint below it goes out again.
      const lost = r.lowestNew !== null && r.lowestNew <= cursor.streamSeq;
      const finished = finishRound(tx, {
        cursor: { tx: to.tx, pos: to.pos },
        streamSeq: r.streamSeq,
        hold: r.hold,
        heldPublished: r.heldPublished,
        heldFailed: r.heldFailed,
        checkpoint,
      });
      // Nothing else follows in the round: its COMMIT goes out behind the writes, a round
      // trip sooner (a failed write makes the server roll back instead, and the round fails).
      if (!lost) {
        finished.catch(() => {});
        commitAhead(tx);
      }
      const behind = await finished;
      if (lost && r.lowestNew !== null) {
        const n = await rewind(tx, r.lowestNew - 1, r.streamSeq);
        if (n > 0) this.noteRequeued(n, `sequence ${r.lowestNew} was given again`);
      }
      // A publish that found no stream may mean the stream was deleted: check it now and then.
      const outage = r.unsent.size > 0 || r.heldFailed.some((h) => !h.failure.rejected);
      if (outage && Date.now() >= this.nextFailureCheck) {
        this.nextFailureCheck = Date.now() + this.o.maxBackoffMs;
        void this.checkStream().catch(() => 0);
      }
      return {
        published: r.published,
        outage: r.unsent.size > 0,
        more: capped,
        behind,
      };
    });
  }

  /**
   * Publishes one event after the cursor, unless an earlier event of its entity failed in this
   * round: a refusal holds it (and the later ones), an outage leaves them unsent.
   */
  private async sendInRound(r: RoundState, item: CursorItem, waits: boolean): Promise<void> {
    const state = r.entity.get(item.entityId);
    if (state === 'held' || (waits && state !== 'outage')) {
      r.entity.set(item.entityId, 'held');
      r.hold.push({ pos: item.pos, entityId: item.entityId });
      return;
    }
    if (state === 'outage') {
      r.unsent.add(item.pos);
      return;
    }
    try {
      r.ack(await this.publish(item));
    } catch (error) {
      if (isRejection(error)) {
        r.entity.set(item.entityId, 'held');
        r.hold.push({ pos: item.pos, entityId: item.entityId, failure: this.failure(item, error) });
      } else {
        r.entity.set(item.entityId, 'outage');
        r.unsent.add(item.pos);
        this.failure(item, error);
      }
    }
  }

  /**
   * After a round that left committed events kept back by a transaction still running when
   * they were read, the wait before looking again (null when none were): nothing may wake this
   * relay when that transaction ends, so soon, less often while nothing goes out. Past
   * `keptBackWarnMs` of that, names the oldest open writer in a warning (an operator can end it).
   */
  private lookAgainAfter(r: RoundResult): number | null {
    if (!r.behind) {
      this.behindMs = 0;
      this.keptBackSince = 0;
      return null;
    }
    if (r.published > 0 || this.behindMs === 0) this.behindMs = BEHIND_FIRST_MS;
    else this.behindMs = Math.min(this.o.pollMs, this.behindMs * 2);
    if (r.published > 0) this.keptBackSince = 0;
    else this.warnIfKeptBack();
    return this.behindMs;
  }

  private warnIfKeptBack(): void {
    const now = Date.now();
    if (this.keptBackSince === 0) this.keptBackSince = now;
    if (now - this.keptBackSince < this.o.keptBackWarnMs || now < this.nextKeptBackWarn) return;
    this.nextKeptBackWarn = now + this.o.keptBackWarnMs;
    this.stats.keptBackWarnings++;
    const waitedMs = now - this.keptBackSince;
    void oldestOpenWriter(this.o.sql)
      .then((writer) =>
        this.o.log.warn(
          { waitedMs, blocker: writer },
          writer
            ? `events kept back for ${Math.round(waitedMs / 1000)} s by transaction of pid ${writer.pid} (${writer.applicationName || 'no application name'}, ${writer.state ?? 'state unknown'}, open ${Math.round(writer.ageMs / 1000)} s): they go out when it ends`
            : `events kept back for ${Math.round(waitedMs / 1000)} s by a running transaction: they go out when it ends`,
        ),
      )
      .catch((error: unknown) =>
        this.o.log.warn({ err: error, waitedMs }, 'events kept back by a running transaction'),
      );
  }

  /** Counts and logs a failed publish; returns its backoff (jittered, exponential). */
  private failure(item: OutboxItem, error: unknown): Failure {
    const rejected = isRejection(error);
    const ceiling = Math.min(
      this.o.maxBackoffMs,
      this.o.retryBaseMs * 2 ** Math.min(Math.max(0, item.attempts - 1), 20),
    );
    const delay = ceiling / 2 + Math.random() * (ceiling / 2);
    const message = error instanceof Error ? error.message : String(error);
    this.stats.failures++;
    this.o.log.warn(
      {
        err: error,
        eventId: item.eventId,
        entityId: item.entityId,
        attempts: item.attempts,
        rejections: item.rejections + (rejected ? 1 : 0),
        retryInMs: Math.round(delay),
      },
      rejected ? 'NATS refused an event; will retry' : 'event not published; will retry',
    );
    return { delayMs: delay, error: message, rejected };
  }

  /**
   * Guarantee 8: reads the highest stream sequence Postgres recorded, then the stream's last
   * sequence (in that order, so a concurrent publish cannot look like a loss). When the
   * stream is behind, every event recorded after its last sequence is unpublished again.
   * A missing stream is created again. Returns the number of events re-queued.
   */
  checkStream(): Promise<number> {
    this.checking ??= this.doCheckStream().finally(() => {
      this.checking = null;
    });
    return this.checking;
  }

  private async doCheckStream(): Promise<number> {
    this.stats.streamChecks++;
    const recorded = await recordedStreamSeq(this.o.sql);
    let last: number;
    try {
      last = (await this.o.jsm.streams.info(this.o.names.stream)).state.last_seq;
    } catch (error) {
      if (!isStreamNotFound(error)) throw error;
      this.o.log.warn({ stream: this.o.names.stream }, 'event stream missing; creating it again');
      await ensureStreams(this.o.jsm, this.o.names, this.o.streamOptions);
      last = (await this.o.jsm.streams.info(this.o.names.stream)).state.last_seq;
      this.o.onStreamRecreated?.();
    }
    await pruneRelayHistory(this.o.sql, this.o.historyMs);
    if (recorded <= last) return 0;
    const n = await rewind(this.o.sql, last, last);
    if (n > 0) this.noteRequeued(n, `stream last sequence ${last} < recorded ${recorded}`);
    return n;
  }

  private noteRequeued(n: number, why: string): void {
    this.stats.republished += n;
    this.o.log.warn(
      { events: n, why },
      'JetStream lost acknowledged events; publishing them again',
    );
    this.wake();
  }

  /**
   * Publishes the event as it is, or in reduced form when it cannot ever fit the server's
   * `max_payload` or the server refused it `maxRejections` times already.
   */
  private async publish(item: OutboxItem): Promise<{ seq: number; duplicate: boolean }> {
    const maxPayload = this.o.maxPayload?.() ?? DEFAULT_MAX_PAYLOAD;
    // Encoded once: its size is checked on the bytes the client then sends as they are.
    // (Buffer.from: a slice of a shared pool, a quarter of TextEncoder's cost at this size.)
    let payload: Uint8Array = Buffer.from(eventPayload(item));
    const bytes = payload.length;
    let reason: string | null = null;
    if (bytes + HEADER_ALLOWANCE > maxPayload) {
      reason = `event of ${bytes} bytes exceeds the NATS max_payload of ${maxPayload}`;
    } else if (item.rejections >= this.o.maxRejections) {
      reason = `refused by NATS ${item.rejections} times`;
    }
    if (reason) payload = Buffer.from(eventPayload(item, reducedData(item.data, reason)));
    if (!this.publisher || this.publisher.isClosed) {
      this.publisher = new StreamPublisher(this.o.nc, this.o.names.stream, this.o.publishTimeoutMs);
    }
    const ack = await this.publisher.publish(
      eventSubject(this.o.names, item.entityType, item.entityId, item.type),
      payload,
      item.eventId,
    );
    if (ack.duplicate) this.stats.duplicates++;
    else {
      this.stats.published++;
      this.o.onPublished?.(item);
    }
    if (reason) {
      this.stats.reduced++;
      this.o.log.warn(
        { eventId: item.eventId, entityId: item.entityId, type: item.type, bytes, reason },
        'event published in reduced form; Postgres keeps the full entry',
      );
    }
    return { seq: ack.seq, duplicate: ack.duplicate };
  }

  private async run(): Promise<void> {
    while (this.running) {
      this.woken = false;
      let delay = this.o.pollMs;
      try {
        const r = await this.round();
        if (r.outage) {
          // NATS is down or failing: the cursor waits before the first event not sent.
          this.consecutiveFailures++;
        } else {
          this.consecutiveFailures = 0;
          if (r.more) continue;
          delay = this.lookAgainAfter(r) ?? delay;
        }
      } catch (error) {
        this.consecutiveFailures++;
        this.o.log.warn(
          { err: error, failures: this.consecutiveFailures },
          'outbox relay round failed',
        );
      }
      if (this.consecutiveFailures > 0) {
        delay = Math.min(this.o.maxBackoffMs, 100 * 2 ** Math.min(this.consecutiveFailures, 10));
        delay = delay / 2 + Math.random() * (delay / 2);
      }
      if (!this.running) break;
      if (this.woken && this.consecutiveFailures === 0) continue;
      // A commit ends the poll wait, not a backoff; stop() ends either.
      this.backingOff = this.consecutiveFailures > 0;
      await new Promise<void>((resolve) => {
        const timer = setTimeout(done, delay);
        function done() {
          clearTimeout(timer);
          resolve();
        }
        this.wakeUp = done;
      });
      this.wakeUp = null;
    }
  }
}

type EntityState = 'held' | 'outage';

interface RoundResult {
  /** Events the stream acknowledged (new or duplicates). */
  published: number;
  /** Some event could not be sent for an outage (not a refusal). */
  outage: boolean;
  /** The round stopped at its size: more may be waiting. */
  more: boolean;
  /** Committed events wait after the new cursor (see `finishRound`). */
  behind: boolean;
}

/** What a round has done so far, recorded when it ends. */
class RoundState {
  /** Events read after the cursor, in the cursor's order. */
  readonly order: CursorItem[] = [];
  readonly entity = new Map<string, EntityState>();
  readonly hold: HoldRow[] = [];
  readonly heldPublished: { pos: number; streamSeq: number }[] = [];
  readonly heldFailed: { pos: number; failure: Failure }[] = [];
  /** Positions not sent for an outage: the cursor stops before the first. */
  readonly unsent = new Set<number>();
  published = 0;
  /** The lowest sequence the stream gave a message it did not have before. */
  lowestNew: number | null = null;

  constructor(public streamSeq: number) {}

  ack(a: { seq: number; duplicate: boolean }): void {
    this.published++;
    if (a.seq > this.streamSeq) this.streamSeq = a.seq;
    if (!a.duplicate && (this.lowestNew === null || a.seq < this.lowestNew)) this.lowestNew = a.seq;
  }
}

/** Items per entity, in first-seen order; each entity's in `seq` order when asked. */
function groupByEntity<T extends OutboxItem>(items: readonly T[], bySeq = false): T[][] {
  const groups = new Map<string, T[]>();
  for (const item of items) {
    const list = groups.get(item.entityId);
    if (list) list.push(item);
    else groups.set(item.entityId, [item]);
  }
  const all = [...groups.values()];
  if (bySeq) for (const list of all) list.sort((a, b) => a.seq - b.seq);
  return all;
}
