/**
 * Runs one reaction as a durable pull consumer shared by every process: explicit ack,
 * `ack_wait`, `max_deliver` and backoff. A transactional reaction records (consumer, event
 * id) in the inbox in the same transaction as its effect and acks after commit, so a
 * redelivery changes nothing. A failure is nak'ed with an exponential delay; the last allowed
 * delivery that fails goes to `dead_letters` and the DLQ stream with its error, then `term()`.
 * A message whose every delivery timed out (a crashed handler) is dead-lettered from the
 * server's MAX_DELIVERIES advisory instead.
 *
 * Anyone allowed to publish on the stream's subjects can put a message there, so a message
 * is never trusted: its event must exist in the event log with that id, entity, seq and type,
 * published on that event's subject, and the reaction gets the stored entry, never the
 * message's body. A message that fails the check (malformed, made-up id, details that do not
 * match) is acked, counted as `forged` and logged: retrying it could not make it true.
 */
import {
  AckPolicy,
  type ConsumerConfig,
  type ConsumerMessages,
  DeliverPolicy,
  type JetStreamClient,
  type JetStreamManager,
  type JsMsg,
} from '@nats-io/jetstream';
import { headers, type NatsConnection, nanos, type Subscription } from '@nats-io/transport-node';
import type { ActorHost } from '../actors/host.js';
import type { Logger } from '../log.js';
import type { Sql } from '../persistence/db.js';
import { hasDeadLetter, insertDeadLetter } from '../persistence/dead-letter-rows.js';
import { type EventEntry, findEvent } from '../persistence/event-log.js';
import { recordInbox } from '../persistence/inbox-rows.js';
import type { Reaction } from './reactions.js';
import { settleWithin } from './settle.js';
import { isStreamNotFound } from './streams.js';
import { dlqSubject, eventSubject, type TransportNames } from './subjects.js';

export interface ConsumerSettings {
  /** How long a delivery may stay unacknowledged before the server redelivers it. */
  ackWaitMs: number;
  /** Deliveries before a message is dead-lettered. */
  maxDeliver: number;
  /** First nak delay; doubles with each delivery, capped at `maxRetryDelayMs`. */
  retryBaseMs: number;
  maxRetryDelayMs: number;
  /** Messages handled at once by this process. */
  concurrency: number;
}

export const DEFAULT_CONSUMER_SETTINGS: ConsumerSettings = {
  ackWaitMs: 30_000,
  maxDeliver: 5,
  retryBaseMs: 1_000,
  maxRetryDelayMs: 60_000,
  concurrency: 8,
};

export interface RunnerOptions {
  nc: NatsConnection;
  js: JetStreamClient;
  jsm: JetStreamManager;
  sql: Sql;
  host: ActorHost;
  names: TransportNames;
  log: Logger;
  reaction: Reaction;
  settings: ConsumerSettings;
  /** Creates the streams again when the consumer finds its stream gone. */
  ensureStreams: () => Promise<void>;
}

export type Outcome = 'applied' | 'duplicate' | 'ignored' | 'forged';

export interface ReactionStats {
  applied: number;
  duplicates: number;
  ignored: number;
  /** Messages acked and not acted on: malformed, or not an event of the event log. */
  forged: number;
  failures: number;
  redeliveries: number;
  deadLettered: number;
}

const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;
const ENTITY_TYPES: readonly string[] = ['ticket', 'task'];

/**
 * The message body as a claim about an event, or null when it does not even have the shape
 * of one (so a made-up body never reaches a query).
 */
export function parseEventMessage(raw: string): EventEntry | null {
  let v: unknown;
  try {
    v = JSON.parse(raw);
  } catch {
    return null;
  }
  if (typeof v !== 'object' || v === null || Array.isArray(v)) return null;
  const e = v as Record<string, unknown>;
  const ok =
    typeof e.eventId === 'string' &&
    UUID.test(e.eventId) &&
    typeof e.entityId === 'string' &&
    e.entityId.length > 0 &&
    e.entityId.length <= 256 &&
    typeof e.entityType === 'string' &&
    ENTITY_TYPES.includes(e.entityType) &&
    typeof e.type === 'string' &&
    e.type.length <= 128 &&
    Number.isSafeInteger(e.seq) &&
    (e.seq as number) > 0;
  return ok ? (e as unknown as EventEntry) : null;
}

export class ConsumerRunner {
  readonly stats: ReactionStats = {
    applied: 0,
    duplicates: 0,
    ignored: 0,
    forged: 0,
    failures: 0,
    redeliveries: 0,
    deadLettered: 0,
  };
  readonly name: string;
  private running = false;
  private loop: Promise<void> | null = null;
  private messages: ConsumerMessages | null = null;
  private advisories: Subscription | null = null;
  private readonly inFlight = new Set<Promise<void>>();
  private restartTimer: { timer: NodeJS.Timeout; resolve: () => void } | null = null;

  constructor(private readonly o: RunnerOptions) {
    this.name = o.reaction.name;
  }

  consumerConfig(): Partial<ConsumerConfig> {
    const s = this.o.settings;
    const backoff: number[] = [];
    for (let i = 0; i < Math.min(s.maxDeliver - 1, 8); i++) {
      backoff.push(nanos(Math.min(s.ackWaitMs * 2 ** i, Math.max(s.maxRetryDelayMs, s.ackWaitMs))));
    }
    return {
      durable_name: this.name,
      ack_policy: AckPolicy.Explicit,
      ack_wait: nanos(s.ackWaitMs),
      max_deliver: s.maxDeliver,
      ...(backoff.length > 0 ? { backoff } : {}),
      filter_subject: this.o.reaction.filterSubject(this.o.names),
      deliver_policy: DeliverPolicy.All,
      max_ack_pending: 1_000,
    };
  }

  /** Creates the durable consumer, or brings its configuration up to date. */
  async ensureConsumer(): Promise<void> {
    const { jsm, names } = this.o;
    const config = this.consumerConfig();
    try {
      await jsm.consumers.add(names.stream, config);
    } catch (error) {
      if (isStreamNotFound(error)) {
        await this.o.ensureStreams();
        await jsm.consumers.add(names.stream, config);
        return;
      }
      const { durable_name: _d, deliver_policy: _p, ...changeable } = config;
      try {
        await jsm.consumers.update(names.stream, this.name, changeable);
      } catch {
        throw error;
      }
    }
  }

  async start(): Promise<void> {
    if (this.running) return;
    await this.ensureConsumer();
    this.running = true;
    this.advisories = this.o.nc.subscribe(
      `$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.${this.o.names.stream}.${this.name}`,
      {
        queue: `${this.o.names.stream}_${this.name}_dlq`,
        callback: (err, msg) => {
          if (err) return;
          const p = this.onMaxDeliveries(msg.json<{ stream_seq: number; deliveries: number }>());
          this.inFlight.add(p);
          void p.finally(() => this.inFlight.delete(p));
        },
      },
    );
    this.loop = this.run();
  }

  async stop(): Promise<void> {
    this.running = false;
    this.advisories?.unsubscribe();
    this.advisories = null;
    if (this.restartTimer) {
      clearTimeout(this.restartTimer.timer);
      this.restartTimer.resolve();
    }
    // With NATS down, close() waits for a server that is not there: bound it.
    if (this.messages) await settleWithin(this.messages.close(), 2_000);
    await this.loop;
    this.loop = null;
    await Promise.allSettled([...this.inFlight]);
  }

  private async run(): Promise<void> {
    let failures = 0;
    while (this.running) {
      try {
        if (failures > 0) await this.ensureConsumer();
        const consumer = await this.o.js.consumers.get(this.o.names.stream, this.name);
        const s = this.o.settings;
        const messages = await consumer.consume({
          max_messages: s.concurrency,
          expires: 10_000,
          abort_on_missing_resource: true,
        });
        this.messages = messages;
        void this.watch(messages);
        if (!this.running) await messages.close();
        for await (const m of messages) {
          failures = 0;
          while (this.inFlight.size >= s.concurrency) await Promise.race(this.inFlight);
          const p = this.handleMessage(m).finally(() => this.inFlight.delete(p));
          this.inFlight.add(p);
        }
      } catch (error) {
        if (this.running) this.o.log.warn({ err: error, consumer: this.name }, 'consumer stopped');
      }
      this.messages = null;
      if (!this.running) break;
      failures++;
      // The consumer (or its stream) went away, or the server refused: recreate and resume.
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, Math.min(5_000, 200 * 2 ** Math.min(failures, 5)));
        this.restartTimer = { timer, resolve };
      });
      this.restartTimer = null;
    }
  }

  /** Ends the iterator when the consumer is deleted under it, so `run` recreates it. */
  private async watch(messages: ConsumerMessages): Promise<void> {
    try {
      for await (const s of messages.status()) {
        if (
          s.type === 'consumer_deleted' ||
          s.type === 'consumer_not_found' ||
          s.type === 'stream_not_found'
        ) {
          await messages.close();
          return;
        }
      }
    } catch {
      // closed
    }
  }

  /** Handles one delivery: process, then ack, nak with a delay, or dead-letter and term. */
  async handleMessage(m: JsMsg): Promise<void> {
    const deliveries = m.info.deliveryCount;
    if (deliveries > 1) this.stats.redeliveries++;
    let entry: EventEntry | null = null;
    const s = this.o.settings;
    const keepAlive = setInterval(() => m.working(), Math.max(100, s.ackWaitMs / 2));
    try {
      entry = parseEventMessage(m.string());
      if (entry === null) this.forged(m.subject, null, 'not an event message');
      else await this.process(entry, m.subject);
      m.ack();
    } catch (error) {
      this.stats.failures++;
      const message = error instanceof Error ? error.message : String(error);
      if (deliveries >= s.maxDeliver) {
        try {
          await this.deadLetter(m.subject, entry, m.string(), message, deliveries);
          m.term();
        } catch (dlqError) {
          // The MAX_DELIVERIES advisory will dead-letter it once the server gives up.
          this.o.log.error({ err: dlqError, consumer: this.name }, 'dead-lettering failed');
          m.nak(s.retryBaseMs);
        }
      } else {
        const delay = Math.min(s.maxRetryDelayMs, s.retryBaseMs * 2 ** (deliveries - 1));
        this.o.log.warn(
          {
            err: error,
            consumer: this.name,
            eventId: entry?.eventId,
            deliveries,
            retryInMs: delay,
          },
          'reaction failed; will retry',
        );
        m.nak(delay);
      }
    } finally {
      clearInterval(keepAlive);
    }
  }

  /**
   * The reaction's effect for one event, at most once per (consumer, event id). Safe to call
   * again with the same entry: the second call finds the inbox row and returns 'duplicate'.
   * `claim` is only a pointer into the event log: the reaction runs on the stored entry, and
   * not at all ('forged') when there is none that matches it (and, given the subject the
   * message came on, that subject).
   */
  async process(claim: EventEntry, subject?: string): Promise<Outcome> {
    const r = this.o.reaction;
    if (!r.accepts(claim)) {
      this.stats.ignored++;
      return 'ignored';
    }
    const entry = await findEvent(this.o.sql, claim.eventId);
    const mismatch = !entry
      ? 'no such event in the event log'
      : entry.entityId !== claim.entityId ||
          entry.entityType !== claim.entityType ||
          entry.type !== claim.type ||
          entry.seq !== claim.seq
        ? 'does not match the stored event'
        : subject !== undefined &&
            subject !== eventSubject(this.o.names, entry.entityType, entry.entityId, entry.type)
          ? 'published on another subject than its event'
          : null;
    if (mismatch || !entry) {
      this.forged(subject, claim, mismatch ?? 'no such event');
      return 'forged';
    }
    if (r.kind === 'direct') {
      await r.run(entry);
      this.stats.applied++;
      return 'applied';
    }
    const { value } = await this.o.host.transact(async (uow) => {
      if (!(await recordInbox(uow.tx, this.name, entry.eventId))) return 'duplicate' as const;
      await r.apply(uow, entry, this.o.host);
      return 'applied' as const;
    });
    if (value === 'duplicate') this.stats.duplicates++;
    else this.stats.applied++;
    return value;
  }

  private forged(subject: string | undefined, claim: EventEntry | null, why: string): void {
    this.stats.forged++;
    this.o.log.warn(
      {
        consumer: this.name,
        subject,
        eventId: claim?.eventId,
        entityId: claim?.entityId,
        type: claim?.type,
        why,
      },
      'message is not an event of the event log: acked, not acted on',
    );
  }

  private async deadLetter(
    subject: string,
    entry: EventEntry | null,
    raw: string,
    error: string,
    deliveries: number,
  ): Promise<void> {
    await insertDeadLetter(this.o.sql, {
      consumer: this.name,
      eventId: entry?.eventId ?? null,
      subject,
      data: entry ?? { raw },
      error,
      deliveries,
    });
    const h = headers();
    h.set('Orch-Consumer', this.name);
    h.set('Orch-Subject', subject);
    h.set('Orch-Error', error.replace(/[\r\n]+/g, ' ').slice(0, 1000));
    h.set('Orch-Deliveries', String(deliveries));
    await this.o.js.publish(dlqSubject(this.o.names, this.name), raw, {
      headers: h,
      ...(entry ? { msgID: `${this.name}:${entry.eventId}` } : {}),
    });
    this.stats.deadLettered++;
    this.o.log.error(
      { consumer: this.name, eventId: entry?.eventId, deliveries, error },
      'reaction gave up; message dead-lettered',
    );
  }

  /** The server stopped delivering a message nobody acked (handlers crashed or hung). */
  private async onMaxDeliveries(a: { stream_seq: number; deliveries: number }): Promise<void> {
    try {
      const stored = await this.o.jsm.streams.getMessage(this.o.names.stream, {
        seq: a.stream_seq,
      });
      if (!stored) return;
      const raw = stored.string();
      const entry = parseEventMessage(raw);
      // A handler that failed on its last delivery has dead-lettered it already.
      if (entry) {
        if (await hasDeadLetter(this.o.sql, this.name, entry.eventId)) return;
      }
      await this.deadLetter(
        stored.subject,
        entry,
        raw,
        `no ack after ${a.deliveries} deliveries (ack_wait expired each time)`,
        a.deliveries,
      );
    } catch (error) {
      this.o.log.error({ err: error, consumer: this.name }, 'max-deliveries advisory not handled');
    }
  }
}
