/**
 * Runs one reaction as a durable pull consumer shared by every process: explicit ack,
 * `ack_wait`, `max_deliver` and backoff. A transactional reaction records (consumer, event
 * id) in the inbox in the same transaction as its effect and acks after commit, so a
 * redelivery changes nothing (one that is idempotent by itself keeps no inbox). A failure is nak'ed with an exponential delay; the last allowed
 * delivery that fails goes to `dead_letters` and the DLQ stream with its error, then `term()`.
 * A message whose every delivery timed out (a crashed handler) is dead-lettered from the
 * server's MAX_DELIVERIES advisory instead.
 *
 * Messages are taken in batches: whatever has arrived, up to `batchSize`. A batch is checked
 * against the event log in one query, then split by the reaction's key (the task_state
 * reaction keys a task's news by its ticket); a reaction with `group.applyClaims` instead has
 * its messages split by the key they state and checked inside each key's transaction, in its
 * first round trip. The messages of one key are applied in one
 * transaction, keys in parallel (at most `concurrency` at once), and a key whose transaction
 * is running collects what arrives for it meanwhile into its next one. So a burst of one
 * ticket's news locks and writes the ticket once per transaction, not once per message.
 * Acks follow the commit. When a key's transaction fails, its messages are tried again one
 * transaction each, so only the message that fails is nak'ed (or dead-lettered); the other
 * keys never notice.
 *
 * Anyone allowed to publish on the stream's subjects can put a message there, so a message
 * is never trusted: its event must exist in the event log with that id, entity, seq and type,
 * published on that event's subject, and the reaction gets the stored entry, never the
 * message's body. A message that fails the check (malformed, made-up id, details that do not
 * match) is acked, counted as `forged` and logged: retrying it could not make it true.
 * The one exception is an event this very process committed and applied the reaction to
 * right after (early-reactions.ts): a delivery naming exactly that event is acked without a
 * transaction, and one still being applied early waits for it rather than lock the same
 * ticket beside it.
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
import { type EventEntry, findEvent, findEvents } from '../persistence/event-log.js';
import { recordInboxMany } from '../persistence/inbox-rows.js';
import type { EarlyReactions, EventIdentity } from './early-reactions.js';
import type { Reaction, TransactionalReaction } from './reactions.js';
import { settleWithin } from './settle.js';
import { isStreamNotFound } from './streams.js';
import { dlqSubject, eventSubject, eventTypeOfSubject, type TransportNames } from './subjects.js';

export interface ConsumerSettings {
  /** How long a delivery may stay unacknowledged before the server redelivers it. */
  ackWaitMs: number;
  /** Deliveries before a message is dead-lettered. */
  maxDeliver: number;
  /** First nak delay; doubles with each delivery, capped at `maxRetryDelayMs`. */
  retryBaseMs: number;
  maxRetryDelayMs: number;
  /** Transactions (keys) this process runs at once. */
  concurrency: number;
  /**
   * Most messages taken from the consumer at once. This process holds at most twice as many
   * unacknowledged (below the consumer's `max_ack_pending`).
   */
  batchSize: number;
  /** Most messages of one key applied in one transaction (at most `batchSize`). */
  maxPerTransaction: number;
}

export const DEFAULT_CONSUMER_SETTINGS: ConsumerSettings = {
  ackWaitMs: 30_000,
  maxDeliver: 5,
  retryBaseMs: 1_000,
  maxRetryDelayMs: 60_000,
  concurrency: 8,
  batchSize: 200,
  maxPerTransaction: 200,
};

/** How long a stop waits for the consumer's loop to end (see `stop`). */
const LOOP_STOP_MS = 2_000;

/** The consumer's `max_ack_pending`; a process holds at most `2 × batchSize` of it. */
const MAX_ACK_PENDING = 1_000;
/** Entities whose key this process remembers (a key never changes; this only bounds memory). */
const KEY_CACHE_MAX = 20_000;

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
  /**
   * What this process applied of the reaction right after committing it: a delivery naming
   * exactly such an event is acked without a transaction.
   */
  early?: Pick<EarlyReactions, 'take'>;
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
  /** Committed transactions of a transactional reaction (one may apply many messages). */
  transactions: number;
  /** Deliveries acked without a transaction: this process applied them early (early-reactions.ts). */
  appliedEarly: number;
}

/** Called after a commit with the entries it applied (first time in the inbox, if it keeps one). */
export type AppliedListener = (entries: EventEntry[]) => void;

/** The event log's `seq` is an int: a larger one names no event and could not be looked up. */
const MAX_SEQ = 2_147_483_647;
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
    !e.entityId.includes('\0') &&
    typeof e.entityType === 'string' &&
    ENTITY_TYPES.includes(e.entityType) &&
    typeof e.type === 'string' &&
    e.type.length <= 128 &&
    Number.isSafeInteger(e.seq) &&
    (e.seq as number) > 0 &&
    (e.seq as number) <= MAX_SEQ;
  return ok ? (e as unknown as EventEntry) : null;
}

/** A delivery that passed the check, waiting for (or in) its key's transaction. */
interface Held {
  m: JsMsg;
  entry: EventEntry;
  /**
   * `entry` is only what the message states: its key's transaction checks it against the
   * event log (a reaction with `group.applyClaims`).
   */
  claimed?: true;
}

/** Longest key a message may state for its transaction to be run before it is checked. */
const MAX_CLAIMED_KEY = 256;

export class ConsumerRunner {
  readonly stats: ReactionStats = {
    applied: 0,
    duplicates: 0,
    ignored: 0,
    forged: 0,
    failures: 0,
    redeliveries: 0,
    deadLettered: 0,
    transactions: 0,
    appliedEarly: 0,
  };
  readonly name: string;
  private running = false;
  private loop: Promise<void> | null = null;
  private messages: ConsumerMessages | null = null;
  private advisories: Subscription | null = null;
  private readonly inFlight = new Set<Promise<void>>();
  private restartTimer: { timer: NodeJS.Timeout; resolve: () => void } | null = null;
  /** Checked deliveries by key, in arrival order, not yet in a transaction. */
  private readonly queued = new Map<string, Held[]>();
  /** Keys with a transaction running (a key runs one at a time). */
  private readonly busy = new Set<string>();
  /** Deliveries taken from the consumer and not yet acked, nak'ed or termed. */
  private readonly held = new Set<JsMsg>();
  private heldChanged: (() => void) | null = null;
  /**
   * Ends the loop's current wait for a message when `stop()` begins: a consumer whose
   * `close()` does not end its iterator (seen after NATS came back from an outage: `stop()`
   * then waited forever for a message that never came) cannot hold the loop.
   */
  private endWait: (() => void) | null = null;
  private keepAlive: NodeJS.Timeout | null = null;
  private readonly keys = new Map<string, string>();
  private readonly appliedListeners = new Set<AppliedListener>();

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
      max_ack_pending: MAX_ACK_PENDING,
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

  /** Calls `listener` after each commit with the entries it applied; returns the unsubscribe. */
  onApplied(listener: AppliedListener): () => void {
    this.appliedListeners.add(listener);
    return () => this.appliedListeners.delete(listener);
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
          this.track(p);
        },
      },
    );
    // Held deliveries wait for their key's turn: keep the server from redelivering them.
    const s = this.o.settings;
    this.keepAlive = setInterval(
      () => {
        for (const m of this.held) m.working();
      },
      Math.max(100, s.ackWaitMs / 2),
    );
    this.loop = this.run();
  }

  async stop(): Promise<void> {
    this.running = false;
    this.endWait?.();
    this.advisories?.unsubscribe();
    this.advisories = null;
    if (this.restartTimer) {
      clearTimeout(this.restartTimer.timer);
      this.restartTimer.resolve();
    }
    this.heldChanged?.();
    // With NATS down, close() waits for a server that is not there: bound it.
    if (this.messages) await settleWithin(this.messages.close(), 2_000);
    // The loop may be inside a JetStream call (the consumer looked up or recreated after NATS
    // came back) that answers only at its timeout, one after another: the stop does not wait
    // for those past a bound. The loop ends at its next look at `running` and takes nothing.
    if (this.loop && !(await settleWithin(this.loop, LOOP_STOP_MS))) {
      this.o.log.warn({ consumer: this.name }, 'consumer loop still in a JetStream call; stopping');
    }
    this.loop = null;
    // What waits for a transaction goes back to the server at once, for any process to take.
    for (const items of this.queued.values()) {
      for (const h of items) this.release(h.m, () => h.m.nak());
    }
    this.queued.clear();
    await Promise.allSettled([...this.inFlight]);
    if (this.keepAlive) clearInterval(this.keepAlive);
    this.keepAlive = null;
  }

  private async run(): Promise<void> {
    let failures = 0;
    while (this.running) {
      try {
        if (failures > 0) await this.ensureConsumer();
        const consumer = await this.o.js.consumers.get(this.o.names.stream, this.name);
        if (!this.running) break;
        const s = this.o.settings;
        const messages = await consumer.consume({
          // The client pulls again below a quarter of this: keep that above zero.
          max_messages: Math.max(8, s.batchSize),
          expires: 10_000,
          abort_on_missing_resource: true,
        });
        this.messages = messages;
        void this.watch(messages);
        if (!this.running) {
          await settleWithin(messages.close(), 2_000);
          break;
        }
        const it = messages[Symbol.asyncIterator]();
        // A `next()` still waiting when a batch closes is the first message of the next one.
        let next: Promise<IteratorResult<JsMsg>> | null = null;
        const take = () => {
          next ??= it.next();
          return next;
        };
        for (;;) {
          const first = await this.nextOrStop(take);
          next = null;
          if (first.done) break;
          failures = 0;
          const batch: JsMsg[] = [first.value];
          // Whatever else has arrived: buffered messages resolve within microtasks, so a
          // `next()` that loses the race with setImmediate means nothing more is waiting.
          while (batch.length < s.batchSize) {
            const more = await Promise.race([take(), immediate()]);
            if (more === null) break;
            next = null;
            if (more.done) break;
            batch.push(more.value);
          }
          await this.intake(batch);
          // Backpressure: take no more while twice a batch waits or runs.
          while (this.running && this.held.size >= 2 * s.batchSize) {
            await new Promise<void>((resolve) => {
              this.heldChanged = resolve;
            });
            this.heldChanged = null;
          }
          if (!this.running) break;
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

  /**
   * The next message, or the end once `stop()` begins. A new promise for each wait: a
   * `Promise.race` against one promise that lives as long as the runner left a reaction on
   * it per batch, each holding its batch's first message, so a process's heap grew by every
   * message it consumed.
   */
  private nextOrStop(take: () => Promise<IteratorResult<JsMsg>>): Promise<IteratorResult<JsMsg>> {
    if (!this.running) return Promise.resolve({ done: true, value: undefined });
    return new Promise<IteratorResult<JsMsg>>((resolve, reject) => {
      this.endWait = () => resolve({ done: true, value: undefined });
      take().then(resolve, reject);
    }).finally(() => {
      this.endWait = null;
    });
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

  /**
   * Takes a batch: malformed, ignored and forged messages are acked at once; the others are
   * checked against the event log in one query and queued by key (a direct reaction runs
   * them here).
   */
  private async intake(batch: JsMsg[]): Promise<void> {
    const r = this.o.reaction;
    const claims: { m: JsMsg; claim: EventEntry }[] = [];
    for (const m of batch) {
      this.held.add(m);
      if (m.info.deliveryCount > 1) this.stats.redeliveries++;
      const named = r.acceptsType && eventTypeOfSubject(this.o.names, m.subject);
      if (named && !r.acceptsType?.(named)) {
        this.stats.ignored++;
        this.release(m, () => m.ack());
        continue;
      }
      const claim = parseEventMessage(m.string());
      if (claim === null) {
        this.forged(m.subject, null, 'not an event message');
        this.release(m, () => m.ack());
      } else if (!r.accepts(claim)) {
        this.stats.ignored++;
        this.release(m, () => m.ack());
      } else {
        const early = this.o.early?.take(claim.eventId.toLowerCase());
        if (early instanceof Promise) {
          // This process is applying it early: the delivery waits for that transaction
          // rather than lock the same ticket beside it to find the news already told.
          this.track(
            early
              .then((entry) => this.afterEarly(m, claim, entry))
              .catch((error) => this.failed(m, claim, error)),
          );
        } else if (!this.ackedEarly(m, claim, early)) {
          claims.push({ m, claim });
        }
      }
    }
    await this.check(claims);
  }

  /** A delivery whose event this process was applying early, once that is settled. */
  private async afterEarly(
    m: JsMsg,
    claim: EventEntry,
    entry: EventIdentity | undefined,
  ): Promise<void> {
    if (this.ackedEarly(m, claim, entry)) return;
    // Dropped or failed early: the usual path.
    await this.check([{ m, claim }]);
  }

  /**
   * Acks the delivery if this process applied its event's reaction right after committing
   * it: the claim must name exactly the event committed (`entry`), or it takes the usual
   * path, where a claim that does not match its stored event is found forged.
   */
  private ackedEarly(m: JsMsg, claim: EventEntry, entry: EventIdentity | undefined): boolean {
    if (entry === undefined || this.mismatch(claim, entry, m.subject) !== null) return false;
    this.stats.appliedEarly++;
    this.release(m, () => m.ack());
    return true;
  }

  /** Checks claims against the event log and queues them by key (see `intake`). */
  private async check(accepted: { m: JsMsg; claim: EventEntry }[]): Promise<void> {
    const r = this.o.reaction;
    let claims = accepted;
    if (claims.length === 0) return;
    const later = this.queueClaims(claims);
    if (later.length < claims.length) this.pump();
    claims = later;
    if (claims.length === 0) return;
    let stored: Map<string, EventEntry>;
    try {
      stored = await findEvents(
        this.o.sql,
        claims.map((c) => c.claim),
      );
    } catch (error) {
      for (const c of claims) await this.failed(c.m, c.claim, error);
      return;
    }
    const checked: Held[] = [];
    for (const { m, claim } of claims) {
      const entry = stored.get(claim.eventId.toLowerCase()) ?? null;
      const mismatch = this.mismatch(claim, entry, m.subject);
      if (mismatch !== null || entry === null) {
        this.forged(m.subject, claim, mismatch ?? 'no such event');
        this.release(m, () => m.ack());
      } else {
        checked.push({ m, entry });
      }
    }
    if (r.kind === 'direct') {
      for (const { m, entry } of checked) {
        try {
          await r.run(entry);
          this.stats.applied++;
          this.release(m, () => m.ack());
        } catch (error) {
          await this.failed(m, entry, error);
        }
      }
      return;
    }
    let keys: Map<string, string>;
    try {
      keys = await this.keysOf(
        r,
        checked.map((h) => h.entry),
      );
    } catch (error) {
      for (const h of checked) await this.failed(h.m, h.entry, error);
      return;
    }
    for (const h of checked) this.enqueue(keys.get(h.entry.entityId) ?? h.entry.entityId, h);
    this.pump();
  }

  /**
   * Queues, unchecked, the claims whose key the message states, when the reaction can check
   * them inside its own transaction (`group.applyClaims`): the check then shares the
   * transaction's first round trip instead of taking one of its own before it. Returns the
   * others, to be checked first.
   */
  private queueClaims(
    claims: { m: JsMsg; claim: EventEntry }[],
  ): { m: JsMsg; claim: EventEntry }[] {
    const r = this.o.reaction;
    const group = r.kind === 'transactional' && r.idempotent ? r.group : undefined;
    if (!group?.applyClaims || !group.keyOf) return claims;
    const later: { m: JsMsg; claim: EventEntry }[] = [];
    for (const c of claims) {
      const key = group.keyOf(c.claim);
      if (key !== undefined && key.length > 0 && key.length <= MAX_CLAIMED_KEY) {
        this.enqueue(key, { m: c.m, entry: c.claim, claimed: true });
      } else {
        later.push(c);
      }
    }
    return later;
  }

  private enqueue(key: string, h: Held): void {
    const list = this.queued.get(key);
    if (list) list.push(h);
    else this.queued.set(key, [h]);
  }

  /** The reaction's key of each entity, from memory or asked for the ones not known yet. */
  private async keysOf(
    r: TransactionalReaction,
    entries: EventEntry[],
  ): Promise<Map<string, string>> {
    const out = new Map<string, string>();
    if (!r.group) return out; // each entity is its own key
    const unknown: string[] = [];
    for (const e of entries) {
      const stated = r.group.keyOf?.(e);
      if (stated !== undefined) out.set(e.entityId, stated);
    }
    for (const id of new Set(entries.map((e) => e.entityId))) {
      if (out.has(id)) continue;
      const key = this.keys.get(id);
      if (key === undefined) unknown.push(id);
      else out.set(id, key);
    }
    if (unknown.length === 0) return out;
    const found = await r.group.keysOf(this.o.sql, unknown);
    if (this.keys.size + found.size > KEY_CACHE_MAX) this.keys.clear();
    for (const [id, key] of found) {
      this.keys.set(id, key);
      out.set(id, key);
    }
    return out;
  }

  /** Starts a transaction for each key that waits and is not running, up to `concurrency`. */
  private pump(): void {
    const s = this.o.settings;
    if (!this.running) return;
    for (const [key, items] of this.queued) {
      if (this.busy.size >= s.concurrency) return;
      if (this.busy.has(key)) continue;
      const taken = items.splice(0, Math.max(1, s.maxPerTransaction));
      if (items.length === 0) this.queued.delete(key);
      this.busy.add(key);
      const p = this.runKey(key, taken)
        .catch((error) => {
          this.o.log.error({ err: error, consumer: this.name }, 'reaction batch not settled');
        })
        .finally(() => {
          this.busy.delete(key);
          this.pump();
        });
      this.track(p);
    }
  }

  /** One key's deliveries: one transaction, then ack each; on failure one transaction each. */
  private async runKey(key: string, items: Held[]): Promise<void> {
    if (items.some((h) => h.claimed)) {
      await this.runClaims(key, items);
      return;
    }
    try {
      await this.applyEntries(
        items.map((h) => h.entry),
        key,
      );
      for (const h of items) this.release(h.m, () => h.m.ack());
      return;
    } catch (error) {
      const only = items.length === 1 ? items[0] : undefined;
      if (only) {
        await this.failed(only.m, only.entry, error);
        return;
      }
      this.o.log.warn(
        { err: error, consumer: this.name, messages: items.length },
        'batch failed; applying its messages one by one',
      );
    }
    for (const h of items) {
      try {
        await this.applyEntries([h.entry], key);
        this.release(h.m, () => h.m.ack());
      } catch (error) {
        await this.failed(h.m, h.entry, error);
      }
    }
  }

  /**
   * One key's deliveries, checked in the transaction that applies them: one transaction,
   * then ack each (a delivery that fails the check is counted as forged). On failure each is
   * taken the long way, checked first and applied in a transaction of its own.
   */
  private async runClaims(key: string, items: Held[]): Promise<void> {
    let verdicts: Map<Held, string | null>;
    try {
      verdicts = await this.applyClaims(key, items);
    } catch (error) {
      this.o.log.warn(
        { err: error, consumer: this.name, messages: items.length },
        'batch failed; checking and applying its messages one by one',
      );
      for (const h of items) await this.checkAndApply(key, h);
      return;
    }
    for (const h of items) {
      const why = verdicts.get(h) ?? null;
      if (why !== null) this.forged(h.m.subject, h.entry, why);
      this.release(h.m, () => h.m.ack());
    }
  }

  /**
   * The reaction's `applyClaims` for `items`, with the check against the event log sent first
   * in the same transaction. Returns why each delivery is not its event, or null if it is.
   */
  private async applyClaims(key: string, items: Held[]): Promise<Map<Held, string | null>> {
    const r = this.o.reaction as TransactionalReaction;
    const group = r.group as NonNullable<TransactionalReaction['group']>;
    const applyClaims = group.applyClaims as NonNullable<typeof group.applyClaims>;
    const claims = [
      ...new Map(items.map((h) => [h.entry.eventId.toLowerCase(), h.entry])).values(),
    ];
    let verdicts = new Map<Held, string | null>();
    const { value: verified } = await this.o.host.transact(
      async (uow) => {
        const checked = findEvents(uow.tx, claims).then((stored) => {
          verdicts = new Map();
          const ok = new Map<string, EventEntry>();
          for (const h of items) {
            const entry = stored.get(h.entry.eventId.toLowerCase()) ?? null;
            let why = this.mismatch(h.entry, entry, h.m.subject);
            if (why === null && entry && group.keyOf?.(entry) !== key) {
              why = 'states another key than its event';
            }
            verdicts.set(h, why);
            if (why === null && entry) ok.set(entry.eventId, entry);
          }
          return [...ok.values()];
        });
        // Answered before anything awaited below: a failure fails them, and the unit with it.
        checked.catch(() => {});
        await applyClaims(uow, key, claims, checked);
        return checked;
      },
      unitKeys(r, [], key),
    );
    let passed = 0;
    for (const why of verdicts.values()) if (why === null) passed++;
    this.counted(verified, passed);
    return verdicts;
  }

  /** One delivery the long way: checked against the event log, then applied alone. */
  private async checkAndApply(key: string, h: Held): Promise<void> {
    let entry: EventEntry | null = h.claimed ? null : h.entry;
    try {
      if (h.claimed) {
        entry = await findEvent(this.o.sql, h.entry);
        const why = this.mismatch(h.entry, entry, h.m.subject);
        if (why !== null || entry === null) {
          this.forged(h.m.subject, h.entry, why ?? 'no such event');
          this.release(h.m, () => h.m.ack());
          return;
        }
      }
      const stored = entry as EventEntry;
      const r = this.o.reaction as TransactionalReaction;
      await this.applyEntries([stored], r.group?.keyOf?.(stored) ?? key);
      this.release(h.m, () => h.m.ack());
    } catch (error) {
      await this.failed(h.m, entry, error);
    }
  }

  /**
   * The transactional reaction's effect for these stored entries, in one transaction with
   * their inbox rows; an entry already in the inbox (a redelivery) changes nothing. Returns
   * how many were applied (for an idempotent reaction, every entry: it keeps no inbox).
   * `key`: the runner's key of the entries (their entity, or their group's key), if known.
   */
  private async applyEntries(entries: EventEntry[], key?: string): Promise<number> {
    const r = this.o.reaction as TransactionalReaction;
    const unique = [...new Map(entries.map((e) => [e.eventId, e])).values()];
    const confined = unitKeys(r, entries, key);
    const { value: fresh } = await this.o.host.transact(async (uow) => {
      // An idempotent reaction keeps no inbox row: a repeat of its effect changes nothing.
      const todo = r.idempotent
        ? unique
        : await recordInboxMany(
            uow.tx,
            this.name,
            unique.map((e) => e.eventId),
          ).then((ids) => unique.filter((e) => ids.has(e.eventId)));
      if (todo.length === 0) return todo;
      if (r.group) await r.group.applyMany(uow, todo, this.o.host);
      else for (const e of todo) await r.apply(uow, e, this.o.host);
      return todo;
    }, confined);
    this.counted(fresh, entries.length);
    return fresh.length;
  }

  /** A committed transaction that applied `fresh` for `deliveries` messages (the rest repeats). */
  private counted(fresh: EventEntry[], deliveries: number): void {
    this.stats.transactions++;
    this.stats.applied += fresh.length;
    this.stats.duplicates += deliveries - fresh.length;
    if (fresh.length > 0) for (const listener of this.appliedListeners) listener(fresh);
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
    const entry = await findEvent(this.o.sql, claim);
    const mismatch = this.mismatch(claim, entry, subject);
    if (mismatch !== null || !entry) {
      this.forged(subject, claim, mismatch ?? 'no such event');
      return 'forged';
    }
    if (r.kind === 'direct') {
      await r.run(entry);
      this.stats.applied++;
      return 'applied';
    }
    const key = r.group ? r.group.keyOf?.(entry) : entry.entityId;
    return (await this.applyEntries([entry], key)) === 1 ? 'applied' : 'duplicate';
  }

  /** Why `claim` is not the stored event `entry` (published on its subject), or null. */
  private mismatch(
    claim: EventEntry,
    entry: EventIdentity | null,
    subject: string | undefined,
  ): string | null {
    if (!entry) return 'no such event in the event log';
    if (
      entry.eventId !== claim.eventId.toLowerCase() ||
      entry.entityId !== claim.entityId ||
      entry.entityType !== claim.entityType ||
      entry.type !== claim.type ||
      entry.seq !== claim.seq
    ) {
      return 'does not match the stored event';
    }
    if (
      subject !== undefined &&
      subject !== eventSubject(this.o.names, entry.entityType, entry.entityId, entry.type)
    ) {
      return 'published on another subject than its event';
    }
    return null;
  }

  /** A delivery whose handling threw: nak with a delay, or dead-letter and term the last. */
  private async failed(m: JsMsg, entry: EventEntry | null, error: unknown): Promise<void> {
    const s = this.o.settings;
    const deliveries = m.info.deliveryCount;
    this.stats.failures++;
    const message = error instanceof Error ? error.message : String(error);
    if (deliveries >= s.maxDeliver) {
      try {
        await this.deadLetter(m.subject, entry, m.string(), message, deliveries);
        this.release(m, () => m.term());
      } catch (dlqError) {
        // The MAX_DELIVERIES advisory will dead-letter it once the server gives up.
        this.o.log.error({ err: dlqError, consumer: this.name }, 'dead-lettering failed');
        this.release(m, () => m.nak(s.retryBaseMs));
      }
      return;
    }
    const delay = Math.min(s.maxRetryDelayMs, s.retryBaseMs * 2 ** (deliveries - 1));
    this.o.log.warn(
      { err: error, consumer: this.name, eventId: entry?.eventId, deliveries, retryInMs: delay },
      'reaction failed; will retry',
    );
    this.release(m, () => m.nak(delay));
  }

  /** Settles a held delivery (ack, nak or term) and lets the reader take more. */
  private release(m: JsMsg, settle: () => void): void {
    try {
      settle();
    } catch (error) {
      // A closed connection: unsettled, the server delivers it again after ack_wait.
      this.o.log.warn({ err: error, consumer: this.name }, 'delivery not settled');
    } finally {
      this.held.delete(m);
      this.heldChanged?.();
    }
  }

  private track(p: Promise<void>): void {
    this.inFlight.add(p);
    void p.finally(() => this.inFlight.delete(p));
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

/**
 * The actor a transaction of `entries` is confined to (their entity, or their group's key
 * read as the group's actor), so that the host may run it side by side with other units.
 */
function unitKeys(
  r: TransactionalReaction,
  entries: EventEntry[],
  key: string | undefined,
): { keys?: string[] } {
  if (key === undefined) return {};
  if (r.group) return { keys: [`${r.group.actor}:${key}`] };
  const first = entries[0];
  return first ? { keys: [`${first.entityType}:${key}`] } : {};
}

/** Resolves null on the next turn of the event loop (after pending I/O callbacks). */
function immediate(): Promise<null> {
  return new Promise((resolve) => setImmediate(() => resolve(null)));
}
