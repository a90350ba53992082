/**
 * Early reactions: the process that commits an event applies an idempotent reaction to it
 * right after that commit, instead of waiting for the event to go through the relay,
 * JetStream and a consumer. A task's completion reaches its ticket one transaction after
 * its own commit, where the durable path costs a relay round, a delivery and a check on
 * the way, each waiting its turn on a busy process.
 *
 * The durable path is unchanged, and stays the guarantee: the relay still publishes the
 * event and a consumer of some process still receives it. A consumer of another process
 * checks it against Postgres as always and finds the effect done (the reaction is
 * idempotent: it records what it did in the same transaction). The consumer of this
 * process knows, from its own commit, that the effect is done, and acks the delivery
 * without a transaction (`take`), but only when the delivery names exactly the event
 * committed here (id, entity, type, seq and subject).
 *
 * Best effort by design. An early reaction is dropped when too many are pending, when its
 * transaction fails, and when the process stops or dies. The consumer then applies it, as
 * it would have anyway. Only what this process committed is applied, read from its own
 * commit, never from a message.
 *
 * The queues are plain maps rather than an @xstate/store: they change on every commit of
 * the hot path and nothing outside this class reads them.
 */
import type { ActorHost, Applied } from '../actors/host.js';
import type { Logger } from '../log.js';
import type { EventEntry } from '../persistence/event-log.js';
import type { Reaction, TransactionalReaction } from './reactions.js';
import { settleWithin } from './settle.js';

/** What names an event exactly: all a delivery is compared with, kept without its data. */
export type EventIdentity = Pick<
  EventEntry,
  'eventId' | 'entityId' | 'entityType' | 'type' | 'seq'
>;

export interface EarlyReactionStats {
  /** Events whose reaction this process applied right after committing them. */
  applied: number;
  /** Transactions those took. */
  transactions: number;
  /** Events left to the consumer: too many pending, or the process stopping. */
  dropped: number;
  /** Early transactions that failed (their events are left to the consumer). */
  failures: number;
}

export interface EarlyReactionOptions {
  host: ActorHost;
  log: Logger;
  reaction: TransactionalReaction;
  /** Events queued or in flight at most; more are left to the consumer. */
  maxPending?: number;
  /** Events of one key applied in one transaction at most. */
  maxPerTransaction?: number;
  /** Applied events remembered for the consumer's `take` at most (the oldest are forgotten). */
  rememberMax?: number;
}

const DEFAULT_MAX_PENDING = 10_000;
const DEFAULT_MAX_PER_TRANSACTION = 256;
const DEFAULT_REMEMBER_MAX = 20_000;
/** How long `stop` waits for the transactions running. */
const STOP_WAIT_MS = 5_000;

type Grouped = NonNullable<TransactionalReaction['group']>;
type Early = TransactionalReaction & {
  group: Grouped & Required<Pick<Grouped, 'applyClaims' | 'keyOf'>>;
};

/**
 * Whether a reaction may run early: it must be idempotent (a consumer elsewhere will run it
 * again) and keyed by what the stored event states, with an effect that takes entries
 * already verified (`group.applyClaims`).
 */
export function runsEarly(r: Reaction): r is Early {
  return (
    r.kind === 'transactional' &&
    r.idempotent === true &&
    r.group?.applyClaims !== undefined &&
    r.group.keyOf !== undefined
  );
}

export class EarlyReactions {
  readonly stats: EarlyReactionStats = { applied: 0, transactions: 0, dropped: 0, failures: 0 };
  readonly name: string;
  private readonly reaction: Early;
  /** Entries waiting, by key, in commit order. */
  private readonly queued = new Map<string, EventEntry[]>();
  /** Keys with a transaction running: what arrives for them waits for the next one. */
  private readonly busy = new Set<string>();
  /**
   * Applied and committed, by event id, oldest first: what `take` answers from. Without
   * their data: a completion's result may be large, and only what names the event is read.
   */
  private readonly done = new Map<string, EventIdentity>();
  /**
   * Queued or in flight, by event id (its size is what `maxPending` bounds): a delivery
   * that arrives meanwhile waits for it.
   */
  private readonly inFlight = new Map<string, Deferred>();
  /** Transactions running, with their key, their events and when they started. */
  private readonly running = new Map<
    Promise<void>,
    { key: string; entries: EventEntry[]; since: number }
  >();
  private readonly listeners = new Set<(entries: EventEntry[]) => void>();
  private scheduled = false;
  private stopped = false;
  private readonly maxPending: number;
  private readonly maxPerTransaction: number;
  private readonly rememberMax: number;

  constructor(private readonly o: EarlyReactionOptions) {
    if (!runsEarly(o.reaction)) {
      throw new Error(`reaction ${o.reaction.name} cannot run early (see runsEarly)`);
    }
    this.reaction = o.reaction;
    this.name = o.reaction.name;
    this.maxPending = Math.max(1, o.maxPending ?? DEFAULT_MAX_PENDING);
    this.maxPerTransaction = Math.max(1, o.maxPerTransaction ?? DEFAULT_MAX_PER_TRANSACTION);
    this.rememberMax = Math.max(1, o.rememberMax ?? DEFAULT_REMEMBER_MAX);
  }

  /** Called with what a commit of this process applied: queues the events the reaction takes. */
  committed(applied: readonly Applied[]): void {
    if (this.stopped) return;
    const r = this.reaction;
    let queued = false;
    for (const a of applied) {
      for (const e of a.events) {
        if (!r.accepts(e)) continue;
        const key = r.group.keyOf(e);
        if (key === undefined) continue;
        if (this.inFlight.size >= this.maxPending) {
          this.stats.dropped++;
          continue;
        }
        this.inFlight.set(e.eventId, deferred());
        const list = this.queued.get(key);
        if (list) list.push(e);
        else this.queued.set(key, [e]);
        queued = true;
      }
    }
    // The commits answered in this turn (a batch's units) share the transactions that follow.
    if (queued && !this.scheduled) {
      this.scheduled = true;
      queueMicrotask(() => {
        this.scheduled = false;
        this.pump();
      });
    }
  }

  /**
   * The entry of `eventId` if this process applied its reaction and committed it, or a
   * promise of that answer while it is still queued or in flight (undefined: dropped or
   * failed). Forgets it: a redelivery of the same message takes the consumer's usual path.
   */
  take(eventId: string): EventIdentity | Promise<EventIdentity | undefined> | undefined {
    const waiting = this.inFlight.get(eventId);
    if (waiting !== undefined) return waiting.promise.then(() => this.take(eventId));
    const entry = this.done.get(eventId);
    if (entry !== undefined) this.done.delete(eventId);
    return entry;
  }

  /** Events remembered for `take`. */
  get remembered(): number {
    return this.done.size;
  }

  /** Listens to the entries each early transaction applied, after its commit. */
  onApplied(listener: (entries: EventEntry[]) => void): () => void {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  /**
   * Takes nothing more, leaves what waits to the consumer, and waits for what runs, at most
   * `waitMs`: an early reaction is never the only way its effect is made (a consumer applies
   * what this one leaves, and a transaction left open is rolled back when the process's
   * connections close), so a transaction that does not end must not hold the shutdown. One
   * that outlives the wait is logged with where its commit stands.
   */
  async stop(waitMs = STOP_WAIT_MS): Promise<void> {
    this.stopped = true;
    for (const list of this.queued.values()) {
      this.stats.dropped += list.length;
      this.settle(list);
    }
    this.queued.clear();
    const ended = await settleWithin(Promise.allSettled([...this.running.keys()]), waitMs);
    if (ended) return;
    const now = performance.now();
    this.o.log.warn(
      {
        reaction: this.name,
        running: [...this.running.values()].map((r) => ({
          key: r.key,
          events: r.entries.length,
          ms: Math.round(now - r.since),
        })),
        commits: this.o.host.commits.inFlight(),
        commitsWaiting: this.o.host.commits.waiting,
      },
      'early reactions still running at shutdown: left to the consumers',
    );
    // A delivery of this process waiting for one of them (`take`) applies it itself.
    for (const r of this.running.values()) this.settle(r.entries);
  }

  private pump(): void {
    if (this.stopped) return;
    for (const [key, list] of this.queued) {
      if (this.busy.has(key)) continue;
      const entries = list.splice(0, this.maxPerTransaction);
      if (list.length === 0) this.queued.delete(key);
      this.busy.add(key);
      const p = this.apply(key, entries).finally(() => {
        this.busy.delete(key);
        this.running.delete(p);
        if (this.queued.has(key)) this.pump();
      });
      this.running.set(p, { key, entries, since: performance.now() });
    }
  }

  private async apply(key: string, entries: EventEntry[]): Promise<void> {
    const group = this.reaction.group;
    try {
      // The entries are this process's own commit: they are the stored events, verified.
      const verified = Promise.resolve(entries);
      await this.o.host.transact((uow) => group.applyClaims(uow, key, entries, verified), {
        keys: [`${group.actor}:${key}`],
      });
    } catch (error) {
      // The consumer applies them when their messages arrive.
      this.stats.failures++;
      this.o.log.debug(
        { err: error, reaction: this.name, key, events: entries.length },
        'early reaction failed; left to the consumer',
      );
      this.settle(entries);
      return;
    }
    this.stats.transactions++;
    this.stats.applied += entries.length;
    for (const e of entries) {
      const { eventId, entityId, entityType, type, seq } = e;
      this.done.set(eventId, { eventId, entityId, entityType, type, seq });
    }
    // Oldest first: what no consumer of this process took (it went to another) is forgotten.
    for (const id of this.done.keys()) {
      if (this.done.size <= this.rememberMax) break;
      this.done.delete(id);
    }
    this.settle(entries);
    for (const listener of this.listeners) {
      try {
        listener(entries);
      } catch (error) {
        // A listener's failure is its own: the news is committed and answered.
        this.o.log.warn({ err: error, reaction: this.name }, 'early reaction listener failed');
      }
    }
  }

  /** Answers the deliveries that wait for these entries (from `done`, or with nothing). */
  private settle(entries: readonly EventEntry[]): void {
    for (const e of entries) {
      this.inFlight.get(e.eventId)?.resolve();
      this.inFlight.delete(e.eventId);
    }
  }
}

interface Deferred {
  promise: Promise<void>;
  resolve: () => void;
}

function deferred(): Deferred {
  let resolve: () => void = () => {};
  const promise = new Promise<void>((r) => {
    resolve = r;
  });
  return { promise, resolve };
}
