/**
 * The live event feed for SSE: an ordered consumer over the event stream from a start
 * sequence, so a client resuming after stream sequence N receives every later event exactly
 * once and in stream order. The stream sequence is the position a client resumes from.
 */
import { DeliverPolicy, type JetStreamClient } from '@nats-io/jetstream';
import type { Logger } from '../log.js';
import type { EventEntry } from '../persistence/event-log.js';
import { settleWithin } from './settle.js';
import { allEventsSubject, entityEventsSubject, type TransportNames } from './subjects.js';

export interface FeedMessage {
  streamSeq: number;
  entry: EventEntry;
}

export interface EventSubscription {
  /** Ends the feed; resolves once the consumer is closed. */
  close(): Promise<void>;
  /** Resolves when the feed ends (closed, or the stream went away). */
  readonly done: Promise<void>;
}

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
  const filter = filterEntityId
    ? entityEventsSubject(names, filterEntityId)
    : allEventsSubject(names);
  const consumer = await js.consumers.get(
    names.stream,
    afterStreamSeq === 'new'
      ? { filter_subjects: filter, deliver_policy: DeliverPolicy.New }
      : {
          filter_subjects: filter,
          deliver_policy: DeliverPolicy.StartSequence,
          opt_start_seq: Math.max(0, Math.floor(afterStreamSeq)) + 1,
        },
  );
  const messages = await consumer.consume({ max_messages: 256 });
  const done = (async () => {
    try {
      for await (const m of messages) {
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
      await settleWithin(messages.close(), 2_000);
    }
  })();
  return {
    done,
    async close() {
      // Bounded: with NATS down, close() would wait for the server.
      await settleWithin(messages.close(), 2_000);
      await settleWithin(done, 1_000);
    },
  };
}
