/**
 * Dispatch wake-ups: a core NATS message (outside the stream) saying a task may have become
 * claimable, which wakes idle workers and long-polling claims in every process. Only a
 * latency hint: a claimer acts on it by trying a claim in Postgres, and claimers poll as well,
 * so a lost one costs at most a poll interval and a forged one a wasted claim attempt.
 *
 * The relay that publishes a task's event to the stream sends its wake-up right after the
 * stream took it: the event was read from the event log, so no consumer has to look it up
 * again, and no JetStream consumer has to take every task event for the few that wake.
 */
import type { NatsConnection, Subscription } from '@nats-io/transport-node';
import { dispatchSubject, type TransportNames } from './subjects.js';

/** Task events after which the task may be claimable. */
export const DISPATCH_EVENTS: readonly string[] = [
  'task.created',
  'task.retried',
  'task.requeued',
  'task.released',
  'task.ready',
];

export interface DispatchMessage {
  taskId: string;
  event: string;
  executor?: string;
  type?: string;
}

/** The wake-up an event of the log calls for, or null when it frees nothing to claim. */
export function dispatchOf(e: {
  entityType: string;
  entityId: string;
  type: string;
  data: Record<string, unknown>;
}): DispatchMessage | null {
  if (e.entityType !== 'task' || !DISPATCH_EVENTS.includes(e.type)) return null;
  return {
    taskId: e.entityId,
    event: e.type,
    ...(typeof e.data.executor === 'string' ? { executor: e.data.executor } : {}),
    ...(typeof e.data.type === 'string' ? { type: e.data.type } : {}),
  };
}

export function publishDispatch(
  nc: NatsConnection,
  names: TransportNames,
  msg: DispatchMessage,
): void {
  nc.publish(dispatchSubject(names), JSON.stringify(msg));
}

/**
 * Calls `onWake` for every dispatch message (any process may publish them). Returns the
 * subscription; `unsubscribe()` ends it.
 */
export function subscribeDispatch(
  nc: NatsConnection,
  names: TransportNames,
  onWake: (msg: DispatchMessage) => void,
): Subscription {
  return nc.subscribe(dispatchSubject(names), {
    callback: (err, msg) => {
      if (err) return;
      let parsed: DispatchMessage;
      try {
        parsed = msg.json<DispatchMessage>();
      } catch {
        parsed = { taskId: '', event: 'unknown' };
      }
      onWake(parsed);
    },
  });
}
