/**
 * The live event feed of one process, shared by every SSE client: events in event-log
 * (`pos`) order, each client with its own filter, position and bounded queue.
 *
 * Order and positions. Postgres is the ordered truth: the feed delivers the event log in
 * `pos` order and a client's position is the `pos` of the last event it got, so resuming
 * after a position is exact and never depends on what the JetStream stream holds (the relay
 * publishes again what the stream lost, at new stream sequences; readers of the stream can
 * see such an event late, and a resume by stream sequence could skip or repeat it). Within an
 * entity, `pos` follows `seq`. A position still in flight holds the feed back until its
 * transaction ends; one lost with a rollback is skipped once no transaction that could hold
 * it is running (see `feed-rows.ts`), or after `gapTimeoutMs` at the latest.
 *
 * One reader per process. The feed keeps one cursor and reads each page once from Postgres,
 * woken by this process's commits and, for other processes' commits, by one JetStream
 * consumer on the event stream (the message says "something after pos N committed"; the
 * event itself is read from Postgres, whole, never in the relay's reduced form). A fallback
 * poll covers lost wake-ups and NATS being down; the consumer is made again after NATS
 * comes back.
 *
 * Clients. A client behind the feed's cursor (a `Last-Event-ID`, or one that fell behind)
 * reads the event log from Postgres up to the cursor as it stood when it started to catch
 * up, while the live events after that cursor queue up for it; then it takes the queue,
 * dropping what it already has. Every position at or below the cursor is committed or gone
 * for good, so the catch-up misses nothing, and the queue starts right after it. A client
 * whose queue reaches its bound is not disconnected: its queue is dropped and it catches up
 * from Postgres again at its own pace, so a slow client neither stalls the others nor holds
 * more than its bound in memory.
 *
 * Plain collections, not an @xstate/store: the clients hold callbacks and promises, which are
 * not state to snapshot, and a fan-out must advance the cursor and fill every queue in one
 * synchronous step, or a client starting its catch-up in between would miss or repeat events.
 */
import type { JetStreamClient } from '@nats-io/jetstream';
import type { Logger } from '../log.js';
import type { Sql } from '../persistence/db.js';
import type { EventEntry } from '../persistence/event-log.js';
import {
  feedHead,
  type Horizon,
  readFeedPage,
  readFeedRange,
  runningUpTo,
} from '../persistence/feed-rows.js';
import { type EventSubscription, subscribeEvents } from './event-feed.js';
import { settleWithin } from './settle.js';
import type { TransportNames } from './subjects.js';

/** One event of the feed: `position` is its `pos`, what a client resumes after. */
export interface LiveMessage {
  position: number;
  entry: EventEntry;
}

export interface LiveSubscription {
  /** Ends the subscription; resolves once its delivery loop has stopped (bounded). */
  close(): Promise<void>;
  /** Resolves when the subscription ends (closed, the feed stopped, or Postgres failed). */
  readonly done: Promise<void>;
}

export interface SubscribeOptions {
  /** Events queued for this client before it is sent back to catch up from Postgres. */
  bufferLimit?: number;
}

export interface LiveFeedOptions {
  sql: Sql;
  js: JetStreamClient;
  names: TransportNames;
  log: Logger;
  /** Events read per query, by the feed and by each catching-up client (default 500). */
  pageSize?: number;
  /** Default per-client queue bound (default 1000). */
  bufferLimit?: number;
  /** Fallback poll without any wake-up (default 1000 ms; a quarter of it while NATS is down). */
  pollMs?: number;
  /** Re-read interval while a position is in flight (default 20 ms). */
  gapRetryMs?: number;
  /**
   * A position missing for longer than this is skipped whatever holds it (default 5 min).
   * Only a transaction of this database that has run since the gap was seen can hold it up
   * (the feed skips a rolled-back position as soon as those end), so this fires only beside a
   * transaction left open that long, such as a session idle in a transaction: the feed then
   * goes on rather than stall for good. Skipping sooner would drop events of ordinary slow
   * transactions (a process frozen for seconds, a loaded machine) from every live client.
   */
  gapTimeoutMs?: number;
}

export interface LiveFeedStats {
  clients: number;
  /** The position the feed has delivered up to. */
  cursor: number;
  /** Events fanned out (once each, whatever the number of clients). */
  events: number;
  /** Catch-ups from Postgres started by clients (a resume, or a queue that overflowed). */
  catchUps: number;
  /** Client queues dropped at their bound. */
  overflows: number;
  /** Positions skipped as lost with a rollback. */
  gapsSkipped: number;
  /** Times the JetStream consumer was made (1 while NATS stays up). */
  consumers: number;
}

interface Client {
  entityId: string | undefined;
  onMessage: (m: LiveMessage) => void | Promise<void>;
  limit: number;
  queue: LiveMessage[];
  lastSent: number;
  /** Must (re)start a catch-up: it is behind the cursor, or its queue overflowed. */
  behind: boolean;
  closed: boolean;
  kick: (() => void) | null;
}

const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

export class LiveFeed {
  readonly stats: LiveFeedStats = {
    clients: 0,
    cursor: 0,
    events: 0,
    catchUps: 0,
    overflows: 0,
    gapsSkipped: 0,
    consumers: 0,
  };
  private readonly o: Required<LiveFeedOptions>;
  private readonly clients = new Set<Client>();
  private cursor = 0;
  /** A missing position: `upTo` was visible above it in a read with this horizon. */
  private probe: { upTo: number; horizon: Horizon; since: number } | null = null;
  private starting: Promise<void> | null = null;
  private running = false;
  private woken = false;
  private wakeUp: (() => void) | null = null;
  private loops: Promise<void>[] = [];
  private sub: EventSubscription | null = null;

  constructor(options: LiveFeedOptions) {
    this.o = {
      pageSize: 500,
      bufferLimit: 1_000,
      pollMs: 1_000,
      gapRetryMs: 20,
      gapTimeoutMs: 300_000,
      ...options,
    };
  }

  /** Starts the feed at the end of the event log (once; later calls wait for the first). */
  start(): Promise<void> {
    this.starting ??= this.begin().catch((error) => {
      this.starting = null;
      throw error;
    });
    return this.starting;
  }

  private async begin(): Promise<void> {
    const head = await feedHead(this.o.sql);
    // Positions below the head may still be in flight: wait for them, so that everything at
    // or below the cursor is committed or gone (what every catch-up relies on).
    // A first client should not wait minutes for an unrelated long transaction: those
    // positions predate every client of this feed anyway.
    const deadline = Date.now() + Math.min(this.o.gapTimeoutMs, 10_000);
    while ((await runningUpTo(this.o.sql, head.horizon)) && Date.now() < deadline) await sleep(5);
    this.cursor = head.pos;
    this.stats.cursor = head.pos;
    this.running = true;
    this.loops = [this.readLoop(), this.natsLoop()];
  }

  async stop(): Promise<void> {
    if (!this.starting) return;
    await this.starting.catch(() => {});
    this.running = false;
    this.wakeUp?.();
    const sub = this.sub;
    if (sub) await sub.close();
    for (const c of this.clients) this.end(c);
    await Promise.all(this.loops);
  }

  /** Something committed: read the event log now (no-op before the feed started). */
  wake(): void {
    this.woken = true;
    this.wakeUp?.();
  }

  /**
   * Delivers every event after `after` ('new': from now on), optionally of one entity, in
   * order, once, to `onMessage`; the next waits for the previous to settle.
   */
  async subscribe(
    after: number | 'new',
    entityId: string | undefined,
    onMessage: (m: LiveMessage) => void | Promise<void>,
    options: SubscribeOptions = {},
  ): Promise<LiveSubscription> {
    await this.start();
    const lastSent = after === 'new' ? this.cursor : after;
    const client: Client = {
      entityId,
      onMessage,
      limit: Math.max(1, options.bufferLimit ?? this.o.bufferLimit),
      queue: [],
      lastSent,
      behind: lastSent < this.cursor,
      closed: false,
      kick: null,
    };
    this.clients.add(client);
    this.stats.clients = this.clients.size;
    const done = this.pump(client).finally(() => {
      this.clients.delete(client);
      this.stats.clients = this.clients.size;
    });
    return {
      done,
      close: async () => {
        this.end(client);
        await settleWithin(done, 2_000);
      },
    };
  }

  private end(c: Client): void {
    c.closed = true;
    c.queue.length = 0;
    c.kick?.();
  }

  /** One client's delivery loop: catch up when behind, else take its queue. */
  private async pump(c: Client): Promise<void> {
    try {
      while (!c.closed && this.running) {
        if (c.behind) {
          // Synchronously: from here on the fan-out queues what comes after `target`.
          c.behind = false;
          c.queue.length = 0;
          const target = this.cursor;
          this.stats.catchUps++;
          await this.catchUp(c, target);
          continue;
        }
        if (c.queue.length === 0) {
          await new Promise<void>((resolve) => {
            c.kick = resolve;
          });
          c.kick = null;
          continue;
        }
        await this.deliver(c, c.queue.splice(0));
      }
    } catch (error) {
      this.o.log.warn({ err: error, lastSent: c.lastSent }, 'live feed client ended');
    }
  }

  private async catchUp(c: Client, target: number): Promise<void> {
    while (!c.closed && this.running && c.lastSent < target) {
      const page = await readFeedRange(this.o.sql, c.lastSent, target, c.entityId, this.o.pageSize);
      if (c.closed) return;
      await this.deliver(
        c,
        page.map((entry) => ({ position: entry.pos, entry })),
      );
      if (page.length < this.o.pageSize) break;
    }
    // Whatever the filter left out up to the target is behind this client too.
    if (!c.closed) c.lastSent = Math.max(c.lastSent, target);
  }

  /**
   * Hands `messages` to the client without waiting between them (its receiver may write them
   * out together), at most its bound at a time, then waits for the last to settle.
   */
  private async deliver(c: Client, messages: LiveMessage[]): Promise<void> {
    let pending: Promise<void> | undefined;
    let n = 0;
    for (const m of messages) {
      if (c.closed) return;
      if (m.position <= c.lastSent) continue;
      const settled = c.onMessage(m);
      if (settled) pending = settled;
      c.lastSent = m.position;
      if (++n % c.limit === 0) await pending;
    }
    await pending;
  }

  /** Advances the cursor over `entries` and queues them for every client, in one step. */
  private fanOut(entries: EventEntry[]): void {
    for (const entry of entries) {
      const m: LiveMessage = { position: entry.pos, entry };
      for (const c of this.clients) {
        if (c.behind || c.closed) continue;
        if (c.entityId !== undefined && c.entityId !== entry.entityId) continue;
        if (c.queue.length >= c.limit) {
          // Too far behind: forget the queue; it reads the rest from Postgres at its pace.
          c.queue.length = 0;
          c.behind = true;
          this.stats.overflows++;
          c.kick?.();
          continue;
        }
        c.queue.push(m);
        c.kick?.();
      }
      this.cursor = entry.pos;
    }
    this.stats.cursor = this.cursor;
    this.stats.events += entries.length;
  }

  /**
   * Reads one page after the cursor and fans out its gap-free prefix. Returns true when more
   * may be waiting right away.
   */
  private async readOnce(): Promise<boolean> {
    let resolved = false;
    const probe = this.probe;
    if (probe) {
      if (Date.now() - probe.since >= this.o.gapTimeoutMs) {
        this.o.log.warn(
          { after: this.cursor, upTo: probe.upTo },
          'event log position missing for too long; skipping it',
        );
        resolved = true;
      } else {
        // Checked before the page is read: what was in flight has ended by then.
        resolved = !(await runningUpTo(this.o.sql, probe.horizon));
      }
    }
    const page = await readFeedPage(this.o.sql, this.cursor, this.o.pageSize);
    const out: EventEntry[] = [];
    let next = this.cursor;
    let held = false;
    for (const e of page.entries) {
      if (e.pos !== next + 1) {
        if (!(probe && resolved && e.pos <= probe.upTo)) {
          if (!this.probe || this.probe.upTo <= next) {
            this.probe = { upTo: e.pos, horizon: page.horizon, since: Date.now() };
          }
          held = true;
          break;
        }
        this.stats.gapsSkipped += e.pos - next - 1;
      }
      out.push(e);
      next = e.pos;
      if (this.probe && this.probe.upTo <= next) this.probe = null;
    }
    if (out.length > 0) this.fanOut(out);
    return !held && page.entries.length === this.o.pageSize;
  }

  private async readLoop(): Promise<void> {
    let failures = 0;
    while (this.running) {
      this.woken = false;
      let delay = this.probe ? this.o.gapRetryMs : this.o.pollMs;
      if (!this.sub) delay = Math.min(delay, Math.ceil(this.o.pollMs / 4));
      try {
        const more = await this.readOnce();
        failures = 0;
        if (more) continue;
      } catch (error) {
        failures++;
        delay = Math.min(5_000, 50 * 2 ** Math.min(failures, 7));
        this.o.log.warn({ err: error, failures }, 'live feed read failed');
      }
      if (!this.running) break;
      if (this.woken && failures === 0) continue;
      await new Promise<void>((resolve) => {
        const timer = setTimeout(done, delay);
        function done() {
          clearTimeout(timer);
          resolve();
        }
        // A commit ends the wait, not a backoff after a failure (stop() ends either).
        this.wakeUp = failures === 0 ? done : () => (this.running ? undefined : done());
      });
      this.wakeUp = null;
    }
  }

  /** One JetStream consumer as the wake-up for other processes' commits, made again when lost. */
  private async natsLoop(): Promise<void> {
    let attempt = 0;
    while (this.running) {
      try {
        this.sub = await subscribeEvents(
          this.o.js,
          this.o.names,
          'new',
          undefined,
          (m) => {
            if (m.entry.pos > this.cursor) this.wake();
          },
          this.o.log,
        );
        this.stats.consumers++;
        attempt = 0;
        // Commits while there was no consumer woke nobody.
        this.wake();
        if (!this.running) await this.sub.close();
        await this.sub.done;
      } catch (error) {
        this.o.log.warn({ err: error }, 'live feed consumer not created; retrying');
      }
      this.sub = null;
      if (!this.running) break;
      const delay = Math.min(5_000, 100 * 2 ** Math.min(attempt++, 6));
      for (let t = 0; t < delay && this.running; t += 100) await sleep(100);
    }
  }
}
