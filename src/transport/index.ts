/**
 * The transport: everything that moves events between Postgres and NATS JetStream in one
 * process. `Transport.start` connects, ensures the streams, and starts the outbox relay, one
 * runner per reaction (durable consumers shared by every process) and the reconciler;
 * `stop` drains them and closes the connection. Any number of processes may run one.
 */
import {
  type JetStreamClient,
  type JetStreamManager,
  jetstream,
  jetstreamManager,
} from '@nats-io/jetstream';
import type { NatsConnection, Subscription } from '@nats-io/transport-node';
import type { ActorHost } from '../actors/host.js';
import type { Logger } from '../log.js';
import type { Sql } from '../persistence/db.js';
import {
  countDeadLetters,
  type DeadLetter,
  listDeadLetters,
} from '../persistence/dead-letter-rows.js';
import type { OutboxItem, OutboxLag } from '../persistence/outbox-rows.js';
import {
  ConsumerRunner,
  type ConsumerSettings,
  DEFAULT_CONSUMER_SETTINGS,
  type ReactionStats,
} from './consumer-runner.js';
import {
  type DispatchMessage,
  dispatchOf,
  publishDispatch,
  subscribeDispatch,
} from './dispatch.js';
import { type EarlyReactionStats, EarlyReactions, runsEarly } from './early-reactions.js';
import type { EventSubscription, FeedMessage } from './event-feed.js';
import {
  LiveFeed,
  type LiveFeedOptions,
  type LiveFeedStats,
  type LiveMessage,
  type LiveSubscription,
  type SubscribeOptions,
} from './live-feed.js';
import { connectNats, type NatsAuthFiles } from './nats.js';
import { OutboxRelay, type RelayOptions, type RelayStats } from './outbox-relay.js';
import { defaultReactions, OBSOLETE_CONSUMERS, type Reaction } from './reactions.js';
import { Reconciler, type ReconcilerStats } from './reconciler.js';
import { namedStop, settleWithin } from './settle.js';
import { ensureStreams, type StreamOptions } from './streams.js';
import { relayWakeSubject, type TransportNames } from './subjects.js';

export interface TransportOptions {
  sql: Sql;
  host: ActorHost;
  log: Logger;
  /** May hold `user:pass@` or `token@` (never logged). */
  natsUrl: string;
  /** Credentials and TLS files (NATS_CREDS, NATS_TLS_*). */
  natsAuth?: NatsAuthFiles;
  names: TransportNames;
  /** Reconciler interval (RECONCILE_MS). */
  reconcileMs: number;
  /** Deadline of the first NATS connect. */
  connectTimeoutMs?: number;
  streamOptions?: StreamOptions;
  consumer?: Partial<ConsumerSettings>;
  relay?: Partial<
    Pick<
      RelayOptions,
      | 'batchSize'
      | 'pipelineDepth'
      | 'pollMs'
      | 'keptBackWarnMs'
      | 'publishTimeoutMs'
      | 'streamCheckMs'
      | 'retryBaseMs'
      | 'maxBackoffMs'
      | 'maxRejections'
    >
  >;
  /** Reconciler: rows changed more recently than this are left to the reactions. */
  reconcileGraceMs?: number;
  /** Reactions to run; the CONTRACT's three by default. An empty list runs none. */
  reactions?: (nc: NatsConnection, names: TransportNames) => Reaction[];
  /** How long `stop` waits for the connection to drain before closing it (default 5 s). */
  drainTimeoutMs?: number;
  /** The live feed behind SSE (page size, per-client bound, poll intervals). */
  liveFeed?: Partial<
    Pick<LiveFeedOptions, 'pageSize' | 'bufferLimit' | 'pollMs' | 'gapRetryMs' | 'gapTimeoutMs'>
  >;
  /**
   * Turn parts off (tests, or a process that only publishes). All on by default. A process
   * without a relay wakes the relays of the others after its commits (over NATS).
   */
  enableRelay?: boolean;
  enableReconciler?: boolean;
  /**
   * Idempotent reactions applied by the committing process right after its commit
   * (EARLY_REACTIONS; early-reactions.ts). On by default; off, only consumers apply them.
   */
  earlyReactions?: boolean;
}

export interface TransportMetrics {
  connected: boolean;
  outbox: OutboxLag;
  relay: RelayStats;
  reactions: Record<string, ReactionStats>;
  early: Record<string, EarlyReactionStats>;
  redeliveries: number;
  deadLetters: number;
  reconciler: ReconcilerStats;
  liveFeed: LiveFeedStats;
}

export type {
  DeadLetter,
  DispatchMessage,
  EventSubscription,
  FeedMessage,
  LiveMessage,
  LiveSubscription,
  NatsAuthFiles,
  TransportNames,
};
export { subscribeDispatch };

export class Transport {
  readonly relay: OutboxRelay;
  readonly runners: ConsumerRunner[];
  /** The reactions this process applies right after its own commits, by reaction name. */
  readonly early: ReadonlyMap<string, EarlyReactions>;
  readonly reconciler: Reconciler;
  /** The one live feed of this process, shared by every SSE client; started by the first. */
  readonly liveFeed: LiveFeed;
  private readonly unsubscribeCommit: () => void;
  private wakeSub: Subscription | null = null;
  /** A wake-up for the other processes' relays is due (coalesced: one per turn of the loop). */
  private wakePending = false;
  private stopped = false;

  private constructor(
    readonly nc: NatsConnection,
    readonly js: JetStreamClient,
    readonly jsm: JetStreamManager,
    private readonly o: TransportOptions,
  ) {
    const ensure = () => ensureStreams(jsm, o.names, o.streamOptions);
    this.relay = new OutboxRelay({
      sql: o.sql,
      nc,
      jsm,
      names: o.names,
      log: o.log.child({ component: 'outbox-relay' }),
      maxPayload: () => nc.info?.max_payload,
      ...(o.streamOptions ? { streamOptions: o.streamOptions } : {}),
      onPublished: (item) => this.dispatch(item),
      ...o.relay,
    });
    const settings: ConsumerSettings = { ...DEFAULT_CONSUMER_SETTINGS, ...o.consumer };
    const reactions = (o.reactions ?? defaultReactions)(nc, o.names);
    const early = new Map<string, EarlyReactions>();
    if (o.earlyReactions !== false) {
      for (const reaction of reactions.filter(runsEarly)) {
        early.set(
          reaction.name,
          new EarlyReactions({
            host: o.host,
            log: o.log.child({ component: 'early-reaction', reaction: reaction.name }),
            reaction,
          }),
        );
      }
    }
    this.early = early;
    this.runners = reactions.map((reaction) => {
      const applied = early.get(reaction.name);
      return new ConsumerRunner({
        nc,
        js,
        jsm,
        sql: o.sql,
        host: o.host,
        names: o.names,
        log: o.log.child({ component: 'reaction', consumer: reaction.name }),
        reaction,
        settings,
        ensureStreams: ensure,
        ...(applied ? { early: applied } : {}),
      });
    });
    this.reconciler = new Reconciler({
      sql: o.sql,
      host: o.host,
      log: o.log.child({ component: 'reconciler' }),
      names: o.names,
      nc,
      intervalMs: o.reconcileMs,
      ...(o.reconcileGraceMs !== undefined ? { graceMs: o.reconcileGraceMs } : {}),
    });
    this.liveFeed = new LiveFeed({
      sql: o.sql,
      js,
      names: o.names,
      log: o.log.child({ component: 'live-feed' }),
      ...o.liveFeed,
    });
    // A commit that wrote events wakes this process's relay and live feed at once (the stream
    // wakes the other processes' feeds); a heartbeat writes none and must not start empty
    // rounds. Nothing is sent from inside the write transaction: a NOTIFY there would take
    // Postgres's global notify lock at commit and serialise every writer of the database.
    this.unsubscribeCommit = o.host.onCommit((applied) => {
      if (!applied.some((a) => a.events.length > 0)) return;
      for (const e of early.values()) e.committed(applied);
      this.liveFeed.wake();
      if (o.enableRelay !== false) this.relay.wake();
      else this.wakeOthers();
    });
  }

  /**
   * A process without a relay: after its commits, one core NATS message (however many
   * commits arrived in this turn of the event loop) wakes the relays of the other processes,
   * so its events go out within a round trip rather than a poll interval. NATS rather than a
   * NOTIFY after commit: no Postgres round trip or notify-queue lock, and the relays already
   * hold the connection. Lost (NATS down), it costs a poll interval, no event.
   */
  private wakeOthers(): void {
    if (this.wakePending || this.stopped) return;
    this.wakePending = true;
    setImmediate(() => {
      this.wakePending = false;
      if (this.stopped || this.nc.isClosed()) return;
      try {
        this.nc.publish(relayWakeSubject(this.o.names));
      } catch {
        // Closed or draining: the relays' poll finds the events.
      }
    });
  }

  /** The wake-up of an event the relay just published, if it calls for one. */
  private dispatch(item: OutboxItem): void {
    const msg = dispatchOf(item);
    if (!msg || this.stopped || this.nc.isClosed()) return;
    try {
      publishDispatch(this.nc, this.o.names, msg);
    } catch {
      // Closed or draining: claimers' polls find the task.
    }
  }

  /**
   * Connects (failing with `Unavailable` naming the URL if NATS does not answer in time),
   * ensures the streams and starts every part.
   */
  static async start(options: TransportOptions): Promise<Transport> {
    const nc = await connectNats(options.natsUrl, {
      timeoutMs: options.connectTimeoutMs ?? 5_000,
      log: options.log.child({ component: 'nats' }),
      name: `orchestrator:${options.names.prefix}`,
      ...(options.natsAuth ? { auth: options.natsAuth } : {}),
    });
    try {
      const jsm = await jetstreamManager(nc);
      await ensureStreams(jsm, options.names, options.streamOptions);
      const t = new Transport(nc, jetstream(nc), jsm, options);
      await t.startParts();
      return t;
    } catch (error) {
      await nc.close().catch(() => {});
      throw error;
    }
  }

  private async startParts(): Promise<void> {
    if (this.o.enableRelay !== false) {
      await this.relay.start();
      this.wakeSub = this.nc.subscribe(relayWakeSubject(this.o.names), {
        callback: () => this.relay.wake(),
      });
    }
    for (const name of OBSOLETE_CONSUMERS) {
      await this.jsm.consumers.delete(this.o.names.stream, name).catch(() => false);
    }
    for (const r of this.runners) await r.start();
    if (this.o.enableReconciler !== false) this.reconciler.start();
  }

  /** Stops every part (in-flight reactions finish), then drains and closes the connection. */
  async stop(): Promise<void> {
    if (this.stopped) return;
    this.stopped = true;
    this.unsubscribeCommit();
    this.wakeSub?.unsubscribe();
    // Each part named: a stop that hangs says which part it hangs in.
    const log = this.o.log;
    await namedStop(log, 'transport: live feed', () => this.liveFeed.stop());
    await namedStop(log, 'transport: reconciler', () => this.reconciler.stop());
    // What the early reactions leave, the consumers (of this process or another) apply.
    await Promise.all(
      [...this.early].map(([name, e]) =>
        namedStop(log, `transport: early ${name}`, () => e.stop()),
      ),
    );
    await Promise.all(
      this.runners.map((r) => namedStop(log, `transport: consumer ${r.name}`, () => r.stop())),
    );
    await namedStop(log, 'transport: relay', () => this.relay.stop());
    // Drain flushes what is buffered; with NATS down it would wait forever, so it is bounded.
    const drained = await settleWithin(this.nc.drain(), this.o.drainTimeoutMs ?? 5_000);
    if (!drained) await this.nc.close().catch(() => {});
  }

  /** True while the NATS connection is up (for /readyz). */
  connected(): boolean {
    return !this.nc.isClosed() && !this.nc.isDraining() && this.nc.info !== undefined;
  }

  async metrics(): Promise<TransportMetrics> {
    const reactions: Record<string, ReactionStats> = {};
    let redeliveries = 0;
    for (const r of this.runners) {
      reactions[r.name] = { ...r.stats };
      redeliveries += r.stats.redeliveries;
    }
    const early: Record<string, EarlyReactionStats> = {};
    for (const [name, e] of this.early) early[name] = { ...e.stats };
    const [outbox, deadLetters] = await Promise.all([
      this.relay.lag(),
      countDeadLetters(this.o.sql),
    ]);
    return {
      connected: this.connected(),
      outbox,
      relay: { ...this.relay.stats },
      reactions,
      early,
      redeliveries,
      deadLetters,
      reconciler: { ...this.reconciler.stats },
      liveFeed: { ...this.liveFeed.stats },
    };
  }

  /** `metrics()` as Prometheus text, for `GET /metrics`. */
  async prometheus(): Promise<string> {
    const m = await this.metrics();
    const lines: string[] = [];
    const gauge = (name: string, help: string, value: number, type = 'gauge') => {
      lines.push(`# HELP ${name} ${help}`, `# TYPE ${name} ${type}`, `${name} ${value}`);
    };
    gauge('orch_nats_connected', 'NATS connection up (1) or down (0).', m.connected ? 1 : 0);
    gauge(
      'orch_outbox_rows',
      'Events committed but not yet acknowledged by JetStream.',
      m.outbox.count,
    );
    gauge('orch_outbox_oldest_ms', 'Age of the oldest unpublished event, ms.', m.outbox.oldestMs);
    gauge(
      'orch_relay_published_total',
      'Events this process published.',
      m.relay.published,
      'counter',
    );
    gauge(
      'orch_relay_duplicates_total',
      'Publishes JetStream deduplicated by msg id.',
      m.relay.duplicates,
      'counter',
    );
    gauge(
      'orch_relay_republished_total',
      'Events published again because the stream lost them.',
      m.relay.republished,
      'counter',
    );
    gauge(
      'orch_relay_failures_total',
      'Publishes that failed and were retried later (per-row backoff).',
      m.relay.failures,
      'counter',
    );
    gauge(
      'orch_relay_reduced_total',
      'Events published in reduced form (too large for NATS, or refused too often).',
      m.relay.reduced,
      'counter',
    );
    gauge(
      'orch_relay_rounds_total',
      'Relay rounds this process ran (one transaction under the relay lock each).',
      m.relay.rounds,
      'counter',
    );
    gauge(
      'orch_relay_kept_back_warnings_total',
      'Warnings that events waited behind a transaction left running (the log names it).',
      m.relay.keptBackWarnings,
      'counter',
    );
    gauge('orch_dead_letters', 'Messages reactions gave up on.', m.deadLetters);
    lines.push(
      '# HELP orch_reaction_messages_total Reaction deliveries by consumer and outcome.',
      '# TYPE orch_reaction_messages_total counter',
    );
    for (const [consumer, s] of Object.entries(m.reactions)) {
      for (const outcome of [
        'applied',
        'duplicates',
        'ignored',
        'forged',
        'failures',
        'redeliveries',
      ] as const) {
        lines.push(
          `orch_reaction_messages_total{consumer="${consumer}",outcome="${outcome}"} ${s[outcome]}`,
        );
      }
      lines.push(
        `orch_reaction_messages_total{consumer="${consumer}",outcome="applied_early"} ${s.appliedEarly}`,
      );
    }
    lines.push(
      '# HELP orch_early_reactions_total Events whose reaction this process applied right after committing them, or left to the consumer.',
      '# TYPE orch_early_reactions_total counter',
    );
    for (const [reaction, s] of Object.entries(m.early)) {
      for (const outcome of ['applied', 'dropped', 'failures'] as const) {
        lines.push(
          `orch_early_reactions_total{reaction="${reaction}",outcome="${outcome}"} ${s[outcome]}`,
        );
      }
    }
    gauge(
      'orch_reconciler_fixes_total',
      'Reactions the reconciler applied because no message did.',
      m.reconciler.ticketsFixed + m.reconciler.tasksCancelled,
      'counter',
    );
    gauge('orch_live_feed_clients', "SSE clients on this process's live feed.", m.liveFeed.clients);
    gauge(
      'orch_live_feed_catchups_total',
      'Live feed clients that read from Postgres (resumes, and queues dropped at their bound).',
      m.liveFeed.catchUps,
      'counter',
    );
    gauge(
      'orch_live_feed_overflows_total',
      'Live feed client queues dropped at their bound (slow clients).',
      m.liveFeed.overflows,
      'counter',
    );
    return `${lines.join('\n')}\n`;
  }

  /** The most recent dead letters, newest first (for an API route). */
  deadLetters(limit = 100): Promise<DeadLetter[]> {
    return listDeadLetters(this.o.sql, Math.max(1, Math.min(limit, 1_000)));
  }

  /**
   * The live feed for SSE: every event after position `after` (an event-log `pos`; 'new':
   * only events from now on), optionally of one entity, in `pos` order, once each.
   */
  subscribeEvents(
    after: number | 'new',
    filterEntityId: string | undefined,
    onMessage: (m: LiveMessage) => void | Promise<void>,
    options?: SubscribeOptions,
  ): Promise<LiveSubscription> {
    return this.liveFeed.subscribe(after, filterEntityId, onMessage, options);
  }

  /** Dispatch wake-ups from any process. */
  subscribeDispatch(onWake: (msg: DispatchMessage) => void): Subscription {
    return subscribeDispatch(this.nc, this.o.names, onWake);
  }
}
