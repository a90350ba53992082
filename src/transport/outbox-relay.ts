/**
 * The outbox relay: publishes committed events to JetStream, in order per entity, with
 * `Nats-Msg-Id` = the event id, and records the stream sequence of each ack. The event log is
 * the outbox (an event is unpublished while its `stream_seq` is null). Each round is one
 * transaction: lock unpublished events (SKIP LOCKED), publish them, record the acks, commit;
 * the row locks keep other relays (any number may run) off them, and a relay that dies
 * releases them with its connection (the duplicate window absorbs the repeated publish).
 * Rounds overlap: the next batch is claimed and published while the previous one's acks are
 * still arriving and being recorded; the next batch leaves out the entities still in flight,
 * and the claim's per-entity rule holds back any event whose predecessor is unpublished.
 *
 * Woken in-process by commits, over NATS by processes that run no relay, with a polling
 * fallback. An event whose publish fails backs off on its own (jittered, exponential),
 * holding back only the later events of its entity; while NATS is down every event simply
 * waits. An event the server cannot take (larger than `max_payload`, or refused
 * `maxRejections` times) is published in a reduced form rather than retried forever. A
 * periodic stream check compares the stream's last sequence with the highest one Postgres
 * recorded and publishes again whatever the stream lost (guarantee 8).
 */
import { JetStreamApiError, type JetStreamClient, type JetStreamManager } from '@nats-io/jetstream';
import { InvalidArgumentError } from '@nats-io/transport-node';
import type { Logger } from '../log.js';
import type { Sql, Tx } from '../persistence/db.js';
import {
  type Ack,
  backOffEvent,
  claimUnpublished,
  markPublished,
  maxStreamSeq,
  type OutboxItem,
  type OutboxLag,
  outboxLag,
  requeue,
} from '../persistence/outbox-rows.js';
import { ensureStreams, isStreamNotFound, type StreamOptions } from './streams.js';
import { eventSubject, type TransportNames } from './subjects.js';

export interface RelayOptions {
  sql: Sql;
  js: JetStreamClient;
  jsm: JetStreamManager;
  names: TransportNames;
  log: Logger;
  streamOptions?: StreamOptions;
  /** Events claimed per round. */
  batchSize?: number;
  /**
   * Rounds in flight at once (each a transaction, so a connection): the next batch is
   * claimed and published while the earlier ones' acks are awaited and recorded. 1 turns
   * pipelining off.
   */
  pipelineDepth?: number;
  /** Polling fallback when no wake-up arrives. */
  pollMs?: number;
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
}

/** NATS's default `max_payload`, used until the server has told its own. */
const DEFAULT_MAX_PAYLOAD = 1_048_576;
/** Room for the headers (`Nats-Msg-Id`, `Nats-Expected-Stream`), which count toward it. */
const HEADER_ALLOWANCE = 1_024;
/** A reduced event keeps at most this many of its scalar `data` fields, each this short. */
const KEPT_FIELDS = 32;
const KEPT_STRING_CHARS = 200;

/** The message body of a domain event on the stream: the event-log entry. */
export function eventPayload(item: OutboxItem, data: Record<string, unknown> = item.data): string {
  return JSON.stringify({
    pos: item.pos,
    eventId: item.eventId,
    seq: item.seq,
    entityId: item.entityId,
    entityType: item.entityType,
    type: item.type,
    data,
    at: item.at.toISOString(),
  });
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

  constructor(options: RelayOptions) {
    this.o = {
      batchSize: 256,
      pipelineDepth: 2,
      pollMs: 1_000,
      publishTimeoutMs: 5_000,
      streamCheckMs: 30_000,
      retryBaseMs: 200,
      maxBackoffMs: 5_000,
      maxRejections: 5,
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
  }

  /** Asks for a round now (a commit happened). */
  wake(): void {
    this.woken = true;
    if (!this.backingOff) this.wakeUp?.();
  }

  lag(): Promise<OutboxLag> {
    return outboxLag(this.o.sql);
  }

  /**
   * One round on its own (no overlap): claim, publish per entity in order, record the acks.
   * Returns the number of events published.
   */
  drainOnce(): Promise<number> {
    return this.round([]).done;
  }

  /**
   * Starts a round in a transaction of its own. `claimed` resolves with the events it locked
   * (so the caller can claim the next batch meanwhile); `done` with the number published,
   * once the acks are recorded and committed. An event whose publish failed backs off alone
   * (its entity's later events wait behind it); `done` rejects only when Postgres failed,
   * and then the rollback releases every event of the round, unpublished.
   */
  private round(exceptEntities: readonly string[]): {
    claimed: Promise<OutboxItem[]>;
    done: Promise<number>;
  } {
    let onClaimed: (items: OutboxItem[]) => void = () => {};
    let onFailed: (error: unknown) => void = () => {};
    const claimed = new Promise<OutboxItem[]>((resolve, reject) => {
      onClaimed = resolve;
      onFailed = reject;
    });
    const done = this.o.sql.begin(async (tx) => {
      const items = await claimUnpublished(tx, this.o.batchSize, exceptEntities);
      onClaimed(items);
      return items.length === 0 ? 0 : this.publishAndRecord(tx, items);
    });
    // A failed claim rejects `claimed` too; after the claim this does nothing. `claimed` is
    // marked handled: a caller that awaits only `done` (drainOnce) still sees the error there.
    done.catch(onFailed);
    claimed.catch(() => {});
    return { claimed, done };
  }

  private async publishAndRecord(tx: Tx, items: OutboxItem[]): Promise<number> {
    const byEntity = new Map<string, OutboxItem[]>();
    for (const item of items) {
      const list = byEntity.get(item.entityId);
      if (list) list.push(item);
      else byEntity.set(item.entityId, [item]);
    }
    const acks: Ack[] = [];
    const failed: { item: OutboxItem; error: unknown }[] = [];
    await Promise.all(
      [...byEntity.values()].map(async (rows) => {
        for (const item of rows) {
          try {
            acks.push({
              pos: item.pos,
              streamSeq: await this.publish(item),
              retried: item.attempts > 1,
            });
          } catch (error) {
            // Later events of this entity stay unpublished: the claim keeps them back while
            // this one backs off.
            failed.push({ item, error });
            return;
          }
        }
      }),
    );
    const requeued = await markPublished(tx, acks);
    for (const f of failed) await this.backOff(tx, f.item, f.error);
    if (requeued > 0) this.noteRequeued(requeued, 'an acknowledged sequence was reused');
    // A publish that found no stream may mean the stream was deleted: check it, now and then.
    if (failed.some((f) => !isRejection(f.error)) && Date.now() >= this.nextFailureCheck) {
      this.nextFailureCheck = Date.now() + this.o.maxBackoffMs;
      void this.checkStream().catch(() => 0);
    }
    return acks.length;
  }

  private async backOff(tx: Tx, item: OutboxItem, error: unknown): Promise<void> {
    const rejected = isRejection(error);
    const ceiling = Math.min(
      this.o.maxBackoffMs,
      this.o.retryBaseMs * 2 ** Math.min(Math.max(0, item.attempts - 1), 20),
    );
    const delay = ceiling / 2 + Math.random() * (ceiling / 2);
    const message = error instanceof Error ? error.message : String(error);
    this.stats.failures++;
    await backOffEvent(tx, item.pos, delay, message, rejected);
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
    const recorded = await maxStreamSeq(this.o.sql);
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
    if (recorded <= last) return 0;
    const n = await requeue(this.o.sql, last);
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
  private async publish(item: OutboxItem): Promise<number> {
    const maxPayload = this.o.maxPayload?.() ?? DEFAULT_MAX_PAYLOAD;
    let payload = eventPayload(item);
    const bytes = Buffer.byteLength(payload);
    let reason: string | null = null;
    if (bytes + HEADER_ALLOWANCE > maxPayload) {
      reason = `event of ${bytes} bytes exceeds the NATS max_payload of ${maxPayload}`;
    } else if (item.rejections >= this.o.maxRejections) {
      reason = `refused by NATS ${item.rejections} times`;
    }
    if (reason) payload = eventPayload(item, reducedData(item.data, reason));
    const ack = await this.o.js.publish(
      eventSubject(this.o.names, item.entityType, item.entityId, item.type),
      payload,
      {
        msgID: item.eventId,
        timeout: this.o.publishTimeoutMs,
        expect: { streamName: this.o.names.stream },
      },
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
    return ack.seq;
  }

  private async run(): Promise<void> {
    // Rounds whose acks are still being awaited or recorded, oldest first.
    const inflight: { entities: string[]; done: Promise<number> }[] = [];
    while (this.running) {
      this.woken = false;
      let delay = this.o.pollMs;
      try {
        const next = this.round(inflight.flatMap((r) => r.entities));
        const items = await next.claimed;
        if (items.length > 0) {
          inflight.push({ entities: [...new Set(items.map((i) => i.entityId))], done: next.done });
          // At most `pipelineDepth` rounds at once: wait for the oldest before claiming again.
          // The claim after it comes after its commit, and may take its entities' later events.
          if (inflight.length >= this.o.pipelineDepth) {
            await inflight[0]?.done;
            inflight.shift();
          }
          this.consecutiveFailures = 0;
          continue;
        }
        await next.done;
        if (inflight.length > 0) {
          // Nothing else to take meanwhile; what is left may be held back behind the oldest.
          await inflight[0]?.done;
          inflight.shift();
          this.consecutiveFailures = 0;
          continue;
        }
        this.consecutiveFailures = 0;
      } catch (error) {
        for (const r of inflight.splice(0)) await r.done.catch(() => 0);
        this.consecutiveFailures++;
        delay = Math.min(this.o.maxBackoffMs, 100 * 2 ** Math.min(this.consecutiveFailures, 10));
        delay = delay / 2 + Math.random() * (delay / 2);
        this.o.log.warn(
          { err: error, failures: this.consecutiveFailures, retryInMs: Math.round(delay) },
          'outbox relay round failed',
        );
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
    for (const r of inflight.splice(0)) await r.done.catch(() => 0);
  }
}
