/**
 * The streams, created or brought up to date at every start (any number of processes may do
 * it at once): the domain event stream with its duplicate window, and the dead-letter stream.
 */
import {
  DiscardPolicy,
  JetStreamApiError,
  type JetStreamManager,
  RetentionPolicy,
  StorageType,
  type StreamConfig,
} from '@nats-io/jetstream';
import { nanos } from '@nats-io/transport-node';
import { allEventsSubject, type TransportNames } from './subjects.js';

export const STREAM_NOT_FOUND = 10_059;
const STREAM_NAME_IN_USE = 10_058;

export interface StreamOptions {
  /** Publishes with the same `Nats-Msg-Id` within this window are stored once. */
  duplicateWindowMs?: number;
  /** Oldest message kept in the event stream, ms (0 = forever). */
  maxAgeMs?: number;
}

export function eventStreamConfig(
  n: TransportNames,
  o: StreamOptions = {},
): Partial<StreamConfig> & { name: string } {
  return {
    name: n.stream,
    subjects: [allEventsSubject(n)],
    retention: RetentionPolicy.Limits,
    storage: StorageType.File,
    discard: DiscardPolicy.Old,
    duplicate_window: nanos(o.duplicateWindowMs ?? 120_000),
    max_age: nanos(o.maxAgeMs ?? 0),
    num_replicas: 1,
  };
}

export function dlqStreamConfig(n: TransportNames): Partial<StreamConfig> & { name: string } {
  return {
    name: n.dlqStream,
    subjects: [`${n.prefix}.dlq.>`],
    retention: RetentionPolicy.Limits,
    storage: StorageType.File,
    discard: DiscardPolicy.Old,
    duplicate_window: nanos(120_000),
    num_replicas: 1,
  };
}

/** Creates both streams, or updates them when their configuration changed. */
export async function ensureStreams(
  jsm: JetStreamManager,
  n: TransportNames,
  o: StreamOptions = {},
): Promise<void> {
  await ensureStream(jsm, eventStreamConfig(n, o));
  await ensureStream(jsm, dlqStreamConfig(n));
}

export async function ensureStream(
  jsm: JetStreamManager,
  config: Partial<StreamConfig> & { name: string },
): Promise<void> {
  const name = config.name;
  try {
    await jsm.streams.add(config);
  } catch (error) {
    if (!(error instanceof JetStreamApiError && error.code === STREAM_NAME_IN_USE)) throw error;
    const { name: _name, storage: _storage, ...changeable } = config;
    await jsm.streams.update(name, changeable);
  }
}

/** Deletes both streams (tests, tenant teardown); a missing stream is not an error. */
export async function deleteStreams(jsm: JetStreamManager, n: TransportNames): Promise<void> {
  for (const name of [n.stream, n.dlqStream]) {
    try {
      await jsm.streams.delete(name);
    } catch (error) {
      if (!isStreamNotFound(error)) throw error;
    }
  }
}

export function isStreamNotFound(error: unknown): boolean {
  return error instanceof JetStreamApiError && error.code === STREAM_NOT_FOUND;
}
