/**
 * Domain events: what a transition emits into the entity's event log, the outbox and, from
 * there, NATS JetStream. Machines declare them with XState's `emit()`, so the pure
 * `transition()` returns them as `xstate.emit` actions beside the next snapshot.
 */

export type DomainEventType =
  | 'ticket.created'
  | 'ticket.phase_changed'
  | 'ticket.blocked'
  | 'ticket.unblocked'
  | 'ticket.done'
  | 'ticket.cancelled'
  | 'ticket.diagnostic_spawned'
  | 'ticket.approved'
  | 'ticket.rejected'
  | 'ticket.sent_back'
  | 'task.created'
  | 'task.waiting'
  | 'task.ready'
  | 'task.claimed'
  | 'task.started'
  | 'task.completed'
  | 'task.failed'
  | 'task.retry_scheduled'
  | 'task.retried'
  | 'task.requeued'
  | 'task.released'
  | 'task.lease_expired'
  | 'task.cancelled';

export interface DomainEvent {
  type: DomainEventType;
  data: Record<string, unknown>;
}

/** Any JSON value: payloads and results travel through Postgres jsonb and NATS unchanged. */
export type Json = null | boolean | number | string | Json[] | { [key: string]: Json };

/**
 * The time an event happened, stamped on every event by the host before it is decided, so
 * that machines never read a clock. Events built by hand in tests may leave it out.
 */
export function timeOf(event: object): number {
  const at = (event as { at?: unknown }).at;
  return typeof at === 'number' ? at : 0;
}
