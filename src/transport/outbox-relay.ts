/**
 * The outbox relay: publishes committed events to JetStream, in order per entity, with
 * `Nats-Msg-Id` = the event id, and only after the ack records the stream sequence and
 * deletes the outbox row. Woken by LISTEN/NOTIFY, with a polling fallback; any number of
 * relays may run (claims are leased and serialised, and the duplicate window absorbs a
 * crash between publish and mark). While NATS is down rows simply wait, and the relay backs
 * off. A periodic stream check compares the stream's last sequence with the highest one
 * Postgres recorded and publishes again whatever the stream lost (guarantee 8).
 */
import type { JetStreamClient, JetStreamManager } from '@nats-io/jetstream';
import type { Logger } from '../log.js';
import type { Sql } from '../persistence/db.js';
import { OUTBOX_CHANNEL } from '../persistence/event-log.js';
import {
  type Ack,
  claimOutbox,
  markPublished,
  maxStreamSeq,
  type OutboxItem,
  type OutboxLag,
  outboxLag,
  releaseOutbox,
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
  /** Rows claimed per round. */
  batchSize?: number;
  /** How long a claim holds its rows before another relay may take them. */
  leaseMs?: number;
  /** Polling fallback when no NOTIFY arrives. */
  pollMs?: number;
  publishTimeoutMs?: number;
  /** Interval of the stream check (guarantee 8); 0 disables the timer. */
  streamCheckMs?: number;
  maxBackoffMs?: number;
  /** Subscribe to OUTBOX_CHANNEL (default true). */
  listen?: boolean;
  /** Called after the stream had to be created again (consumers must be recreated). */
  onStreamRecreated?: () => void;
}

export interface RelayStats {
  published: number;
  duplicates: number;
  failures: number;
  /** Events put back in the outbox because the stream lost them. */
  republished: number;
  streamChecks: number;
}

/** The message body of a domain event on the stream: the event-log entry. */
export function eventPayload(item: OutboxItem): string {
  return JSON.stringify({
    pos: item.pos,
    eventId: item.eventId,
    seq: item.seq,
    entityId: item.entityId,
    entityType: item.entityType,
    type: item.type,
    data: item.data,
    at: item.at.toISOString(),
  });
}

export class OutboxRelay {
  readonly stats: RelayStats = {
    published: 0,
    duplicates: 0,
    failures: 0,
    republished: 0,
    streamChecks: 0,
  };
  private readonly o: Required<Omit<RelayOptions, 'onStreamRecreated' | 'streamOptions'>> &
    Pick<RelayOptions, 'onStreamRecreated' | 'streamOptions'>;
  private running = false;
  private loop: Promise<void> | null = null;
  private wakeUp: (() => void) | null = null;
  private woken = false;
  private unlisten: (() => Promise<void>) | null = null;
  private checkTimer: NodeJS.Timeout | null = null;
  private checking: Promise<number> | null = null;
  private consecutiveFailures = 0;
  private backingOff = false;

  constructor(options: RelayOptions) {
    this.o = {
      batchSize: 256,
      leaseMs: 10_000,
      pollMs: 1_000,
      publishTimeoutMs: 5_000,
      streamCheckMs: 30_000,
      maxBackoffMs: 5_000,
      listen: true,
      ...options,
    };
  }

  async start(): Promise<void> {
    if (this.running) return;
    this.running = true;
    if (this.o.listen) {
      const req = await this.o.sql.listen(OUTBOX_CHANNEL, () => this.wake());
      this.unlisten = () => req.unlisten();
    }
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
    if (this.unlisten) await this.unlisten().catch(() => {});
    this.unlisten = null;
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
   * One round: claim, publish per entity in order, record the acks. Returns the number of
   * rows published; throws when a publish failed (the rows are released for a later round).
   */
  async drainOnce(): Promise<number> {
    const items = await claimOutbox(this.o.sql, this.o.batchSize, this.o.leaseMs);
    if (items.length === 0) return 0;
    const byEntity = new Map<string, OutboxItem[]>();
    for (const item of items) {
      const list = byEntity.get(item.entityId);
      if (list) list.push(item);
      else byEntity.set(item.entityId, [item]);
    }
    const acks: Ack[] = [];
    const unpublished: number[] = [];
    let lastError: unknown = null;
    await Promise.all(
      [...byEntity.values()].map(async (rows) => {
        for (let i = 0; i < rows.length; i++) {
          const item = rows[i] as OutboxItem;
          try {
            acks.push({ pos: item.pos, streamSeq: await this.publish(item) });
          } catch (error) {
            lastError = error;
            // Later events of this entity must wait for this one.
            for (const rest of rows.slice(i)) unpublished.push(rest.pos);
            return;
          }
        }
      }),
    );
    let requeued: number;
    try {
      requeued = await markPublished(this.o.sql, acks);
    } catch (error) {
      // Recording the acks failed (e.g. the backend was killed): give every claimed row back
      // at once rather than letting the lease hold this entity's later events. Publishing
      // them again is deduplicated by JetStream on the event id.
      await releaseOutbox(
        this.o.sql,
        items.map((i) => i.pos),
        String(error),
      ).catch(() => {});
      throw error;
    }
    if (requeued > 0) this.noteRequeued(requeued, 'an acknowledged sequence was reused');
    if (unpublished.length > 0) {
      const message = lastError instanceof Error ? lastError.message : String(lastError);
      await releaseOutbox(this.o.sql, unpublished, message);
      this.stats.failures += unpublished.length;
      throw new RelayPublishError(message, unpublished.length, { cause: lastError });
    }
    return acks.length;
  }

  /**
   * Guarantee 8: reads the highest stream sequence Postgres recorded, then the stream's last
   * sequence (in that order, so a concurrent publish cannot look like a loss). When the
   * stream is behind, every event recorded after its last sequence goes back to the outbox.
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

  private async publish(item: OutboxItem): Promise<number> {
    const ack = await this.o.js.publish(
      eventSubject(this.o.names, item.entityType, item.entityId, item.type),
      eventPayload(item),
      {
        msgID: item.eventId,
        timeout: this.o.publishTimeoutMs,
        expect: { streamName: this.o.names.stream },
      },
    );
    if (ack.duplicate) this.stats.duplicates++;
    else this.stats.published++;
    return ack.seq;
  }

  private async run(): Promise<void> {
    while (this.running) {
      this.woken = false;
      let delay = this.o.pollMs;
      try {
        const n = await this.drainOnce();
        this.consecutiveFailures = 0;
        if (n > 0) continue;
      } catch (error) {
        this.consecutiveFailures++;
        delay = Math.min(this.o.maxBackoffMs, 100 * 2 ** Math.min(this.consecutiveFailures, 10));
        delay = delay / 2 + Math.random() * (delay / 2);
        this.o.log.warn(
          { err: error, failures: this.consecutiveFailures, retryInMs: Math.round(delay) },
          'outbox relay round failed',
        );
        if (this.consecutiveFailures % 3 === 0) {
          void this.checkStream().catch(() => 0);
        }
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

export class RelayPublishError extends Error {
  constructor(
    message: string,
    readonly rows: number,
    options?: ErrorOptions,
  ) {
    super(`publish failed for ${rows} outbox row(s): ${message}`, options);
    this.name = 'RelayPublishError';
  }
}
