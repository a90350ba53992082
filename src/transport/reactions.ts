/**
 * The reactions CONTRACT section 1 asks of the system, each a durable consumer on the event
 * stream. A message is only a pointer: the consumer runner looks its event up in Postgres and
 * hands the reaction the stored entry (a forged or unknown message never reaches one), and
 * each reaction reads the state it acts on from Postgres too:
 * - `task_state`: a task changed state → `TASK_STATE {taskId, state, seq}` to its ticket, with
 *   the task's state and seq read from Postgres at that moment. The ticket refuses news older
 *   than what it knows, so redeliveries, reordering and the reconciler never double-count;
 *   its own guards advance it (the phase's last task completed) or block it (a task failed
 *   for good), exactly once.
 * - `ticket_cancel`: a ticket was cancelled → `CANCEL` each of its open tasks, if the ticket
 *   really is cancelled now.
 * - `dispatch`: a task became claimable → a core NATS message that wakes idle workers and
 *   long-polling claims. Only a latency optimisation: claimers poll as well.
 */
import type { NatsConnection, Subscription } from '@nats-io/transport-node';
import type { DecideEvent } from '../actors/decide.js';
import type { ActorHost, Applied, UnitOfWork } from '../actors/host.js';
import { IllegalTransition, NotFound } from '../errors.js';
import type { EntityType } from '../machines/index.js';
import type { EventEntry } from '../persistence/event-log.js';
import { openTasksOfCancelledTicket, taskProgress } from '../persistence/reaction-rows.js';
import { dispatchSubject, type TransportNames, typeEventsSubject } from './subjects.js';

interface ReactionBase {
  /** The durable consumer's name, shared by every process. */
  name: string;
  filterSubject: (n: TransportNames) => string;
  /** Events of the filter this reaction acts on; the others are acked untouched. */
  accepts: (entry: EventEntry) => boolean;
}

/** Runs in one Postgres transaction with its inbox row. */
export interface TransactionalReaction extends ReactionBase {
  kind: 'transactional';
  apply: (uow: UnitOfWork, entry: EventEntry, host: ActorHost) => Promise<void>;
}

/** An effect outside Postgres that may repeat harmlessly (a wake-up). */
export interface DirectReaction extends ReactionBase {
  kind: 'direct';
  run: (entry: EventEntry) => Promise<void>;
}

export type Reaction = TransactionalReaction | DirectReaction;

export { OPEN_TASK_STATES } from '../persistence/reaction-rows.js';

/** Task events after which the task may be claimable. */
export const DISPATCH_EVENTS: readonly string[] = [
  'task.created',
  'task.retried',
  'task.requeued',
  'task.released',
];

/**
 * Sends an event to an actor read fresh from Postgres (not the process cache). A refusal
 * (older news, a state that no longer takes it) or a missing actor means there is nothing to
 * do, and is answered with null.
 */
export async function sendIfAccepted(
  host: ActorHost,
  uow: UnitOfWork,
  entityType: EntityType,
  id: string,
  event: DecideEvent,
): Promise<Applied | null> {
  host.forget(entityType, id);
  try {
    return await uow.send(entityType, id, event);
  } catch (error) {
    if (error instanceof IllegalTransition || error instanceof NotFound) return null;
    throw error;
  }
}

/**
 * Forwards a task's current state and seq, read from Postgres, to its ticket (never a state
 * a message claims: the ticket refuses a seq older than the one it knows).
 */
export async function forwardTaskState(
  host: ActorHost,
  uow: UnitOfWork,
  taskId: string,
): Promise<Applied | null> {
  const task = await taskProgress(uow.tx, taskId);
  if (!task) return null;
  return sendIfAccepted(host, uow, 'ticket', task.ticketId, {
    type: 'TASK_STATE',
    taskId,
    state: task.state,
    seq: task.seq,
  });
}

/** Cancels every open task of a ticket that Postgres says is cancelled (else nothing). */
export async function cancelOpenTasks(
  host: ActorHost,
  uow: UnitOfWork,
  ticketId: string,
): Promise<number> {
  const open = await openTasksOfCancelledTicket(uow.tx, ticketId);
  let n = 0;
  for (const id of open) {
    const applied = await sendIfAccepted(host, uow, 'task', id, {
      type: 'CANCEL',
      reason: `ticket ${ticketId} was cancelled`,
    });
    if (applied) n++;
  }
  return n;
}

export const taskStateReaction: TransactionalReaction = {
  kind: 'transactional',
  name: 'task_state',
  filterSubject: (n) => typeEventsSubject(n, 'task'),
  accepts: (e) => e.entityType === 'task' && e.type !== 'task.created',
  apply: async (uow, e, host) => {
    await forwardTaskState(host, uow, e.entityId);
  },
};

export const ticketCancelReaction: TransactionalReaction = {
  kind: 'transactional',
  name: 'ticket_cancel',
  filterSubject: (n) => typeEventsSubject(n, 'ticket', 'cancelled'),
  accepts: (e) => e.type === 'ticket.cancelled',
  apply: async (uow, e, host) => {
    await cancelOpenTasks(host, uow, e.entityId);
  },
};

export interface DispatchMessage {
  taskId: string;
  event: string;
  executor?: string;
  type?: string;
}

export function dispatchReaction(nc: NatsConnection, names: TransportNames): DirectReaction {
  return {
    kind: 'direct',
    name: 'dispatch',
    filterSubject: (n) => typeEventsSubject(n, 'task'),
    accepts: (e) => DISPATCH_EVENTS.includes(e.type),
    run: async (e) => {
      publishDispatch(nc, names, {
        taskId: e.entityId,
        event: e.type,
        ...(typeof e.data.executor === 'string' ? { executor: e.data.executor } : {}),
        ...(typeof e.data.type === 'string' ? { type: e.data.type } : {}),
      });
    },
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

export function defaultReactions(nc: NatsConnection, names: TransportNames): Reaction[] {
  return [taskStateReaction, ticketCancelReaction, dispatchReaction(nc, names)];
}
