/**
 * NATS subject and stream names. Domain events travel on
 * `<prefix>.events.<entityType>.<entityId>.<event>` (e.g. `orch.events.task.tsk_1.completed`),
 * so a consumer filters by entity type, entity or event with ordinary wildcards (NATS 2.9
 * has single-filter consumers only). The prefix and stream names are configurable so that
 * tests and tenants sharing one server never see each other's messages.
 */
import { createHash } from 'node:crypto';

export interface TransportNames {
  prefix: string;
  /** The domain event stream (limits retention, duplicate window). */
  stream: string;
  /** The dead-letter stream: messages a reaction gave up on, with their last error. */
  dlqStream: string;
}

export function transportNames(prefix: string, stream: string): TransportNames {
  return { prefix, stream, dlqStream: `${stream}_DLQ` };
}

/** Entity ids become subject tokens: they must not hold `.`, `*`, `>` or whitespace. */
export function isSubjectSafe(token: string): boolean {
  return token.length > 0 && !/[.*>\s]/.test(token);
}

/**
 * The subject token of an entity id: the id itself when it is subject-safe, else a stable
 * hash of it (the message body still carries the real id).
 */
export function subjectToken(entityId: string): string {
  if (isSubjectSafe(entityId)) return entityId;
  return `h_${createHash('sha256').update(entityId).digest('hex').slice(0, 32)}`;
}

export function eventSubject(
  n: TransportNames,
  entityType: string,
  entityId: string,
  type: string,
): string {
  const name = type.includes('.') ? type.slice(type.indexOf('.') + 1) : type;
  return `${n.prefix}.events.${entityType}.${subjectToken(entityId)}.${name}`;
}

/**
 * The event type a message's subject names (`<entityType>.<event>`, as `eventSubject` built
 * it), or null when the subject is not an event subject of these names. What the subject
 * names is all it says: a message is its event only once the event log confirms it.
 */
export function eventTypeOfSubject(n: TransportNames, subject: string): string | null {
  const head = `${n.prefix}.events.`;
  if (!subject.startsWith(head)) return null;
  const tokens = subject.slice(head.length).split('.');
  if (tokens.length !== 3) return null;
  return `${tokens[0]}.${tokens[2]}`;
}

export const allEventsSubject = (n: TransportNames) => `${n.prefix}.events.>`;
export const entityEventsSubject = (n: TransportNames, entityId: string) =>
  `${n.prefix}.events.*.${subjectToken(entityId)}.*`;
export const typeEventsSubject = (n: TransportNames, entityType: string, event = '*') =>
  `${n.prefix}.events.${entityType}.*.${event}`;
export const dlqSubject = (n: TransportNames, consumer: string) => `${n.prefix}.dlq.${consumer}`;
/** Core NATS (not JetStream): a wake-up for idle workers and long-polling claims. */
export const dispatchSubject = (n: TransportNames) => `${n.prefix}.dispatch`;
/**
 * Core NATS: "events were committed", from a process that runs no relay of its own to the
 * relays of the others (outside the stream; a lost one costs at most a poll interval).
 */
export const relayWakeSubject = (n: TransportNames) => `${n.prefix}.relay.wake`;
