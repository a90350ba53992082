/**
 * A consumer of the event stream from a start sequence, delivering every later event exactly
 * once and in stream order. The live feed (live-feed.ts) holds one per process, as its
 * wake-up for other processes' commits; SSE clients no longer hold one each.
 *
 * The consumer is ours, not the client library's ordered consumer: that one recreates itself
 * with a five-minute `inactive_threshold` and is not deleted on close, so every hung-up SSE
 * client left a consumer on the server for minutes. Ours is deleted when the feed ends, and
 * one left behind (a killed process, NATS unreachable at close) expires after
 * `FEED_INACTIVE_MS`. Instead of recreating itself after a gap, the feed ends: its owner
 * subscribes again, which is the same guarantee at no cost.
 */
import { randomBytes } from 'node:crypto';
import {
  AckPolicy,
  type ConsumerConfig,
  type ConsumerMessages,
  DeliverPolicy,
  type JetStreamClient,
} from '@nats-io/jetstream';
import { nanos } from '@nats-io/transport-node';
import type { Logger } from '../log.js';
import type { EventEntry } from '../persistence/event-log.js';
import { settleWithin } from './settle.js';
import { allEventsSubject, entityEventsSubject, type TransportNames } from './subjects.js';

export interface FeedMessage {
  streamSeq: number;
  entry: EventEntry;
}

export interface EventSubscription {
  /** The consumer's name on the server. */
  readonly consumer: string;
  /** Ends the feed; resolves once the consumer is closed and deleted. */
  close(): Promise<void>;
  /** Resolves when the feed ends (closed, a gap, or the stream or consumer went away). */
  readonly done: Promise<void>;
}

/** A consumer nobody pulls from is deleted by the server after this long. */
export const FEED_INACTIVE_MS = 5_000;
/** Each pull waits this long; a pull outstanding counts as activity, so it stays short. */
const PULL_EXPIRES_MS = 2_000;
/** Bounds on the server round trips of creating and deleting the consumer. */
const DELETE_TIMEOUT_MS = 2_000;

/** Consumer names of live feeds start with this (operators and tests can tell them apart). */
export const FEED_CONSUMER_PREFIX = 'feed_';

/**
 * Delivers the events after `afterStreamSeq` (or only new ones with 'new'), optionally of
 * one entity, to `onMessage`, one at a time: the next waits for the previous to settle.
 */
export async function subscribeEvents(
  js: JetStreamClient,
  names: TransportNames,
  afterStreamSeq: number | 'new',
  filterEntityId: string | undefined,
  onMessage: (m: FeedMessage) => void | Promise<void>,
  log?: Logger,
): Promise<EventSubscription> {
  const name = `${FEED_CONSUMER_PREFIX}${randomBytes(8).toString('hex')}`;
  const config: Partial<ConsumerConfig> = {
    name,
    filter_subject: filterEntityId
      ? entityEventsSubject(names, filterEntityId)
      : allEventsSubject(names),
    ack_policy: AckPolicy.None,
    max_deliver: 1,
    mem_storage: true,
    num_replicas: 1,
    inactive_threshold: nanos(FEED_INACTIVE_MS),
    ...(afterStreamSeq === 'new'
      ? { deliver_policy: DeliverPolicy.New }
      : {
          deliver_policy: DeliverPolicy.StartSequence,
          opt_start_seq: Math.max(0, Math.floor(afterStreamSeq)) + 1,
        }),
  };
  // No API check: the client is already connected to JetStream.
  const jsm = await js.jetstreamManager(false);
  await jsm.consumers.add(names.stream, config);
  const remove = () =>
    settleWithin(
      jsm.consumers.delete(names.stream, name).catch(() => {}),
      DELETE_TIMEOUT_MS,
    );
  let messages: ConsumerMessages;
  try {
    const consumer = await js.consumers.get(names.stream, name);
    messages = await consumer.consume({
      max_messages: 256,
      expires: PULL_EXPIRES_MS,
      // A consumer that expired or was deleted ends the feed rather than waiting for it.
      abort_on_missing_resource: true,
    });
  } catch (error) {
    await remove();
    throw error;
  }
  const done = (async () => {
    // Without acks nothing is redelivered, so delivery sequences are contiguous; a jump
    // means messages were lost on the way (a reconnect). End the feed: the client resumes.
    let delivered = 0;
    try {
      for await (const m of messages) {
        if (m.info.deliverySequence !== delivered + 1) {
          log?.warn({ consumer: name, delivered, got: m.info.deliverySequence }, 'event feed gap');
          break;
        }
        delivered = m.info.deliverySequence;
        let entry: EventEntry;
        try {
          entry = m.json<EventEntry>();
        } catch {
          continue;
        }
        await onMessage({ streamSeq: m.seq, entry });
      }
    } catch (error) {
      log?.warn({ err: error }, 'event feed ended');
    } finally {
      // Bounded: with NATS down, close() and delete would wait for the server.
      await settleWithin(messages.close(), DELETE_TIMEOUT_MS);
      await remove();
    }
  })();
  return {
    consumer: name,
    done,
    async close() {
      void messages.close().catch(() => {});
      await settleWithin(done, 2 * DELETE_TIMEOUT_MS + 500);
    },
  };
}
