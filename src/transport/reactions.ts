/**
 * The reactions: durable consumers on the event stream that run, across transactions, the
 * policies that must not run inside the triggering one (src/policies owns the rules). A
 * message is only a pointer: the consumer runner looks its event up in Postgres and hands the
 * reaction the stored entry (a forged or unknown message never reaches one), and each policy
 * reads the state it acts on from Postgres too.
 * - `task_state`: a task settled or reopened → the `task-state` policy (its ticket learns
 *   it). The news of one ticket's tasks that arrive together is applied in one transaction.
 * - `ticket_cancel`: a ticket was cancelled → the `ticket-cancelled` policy.
 * A task that became claimable wakes claimers without a consumer: the relay sends the
 * wake-up (dispatch.ts).
 */
import type { NatsConnection } from '@nats-io/transport-node';
import type { ActorHost, UnitOfWork } from '../actors/host.js';
import type { EntityType } from '../machines/index.js';
import { TASK_SETTLEMENT_EVENTS } from '../machines/task.js';
import type { Db } from '../persistence/db.js';
import type { EventEntry } from '../persistence/event-log.js';
import {
  cancelOpenTasks,
  forwardTaskState,
  forwardTaskStates,
  forwardTicketNews,
  ticketsOfTasks,
} from '../policies/index.js';
import { type TransportNames, typeEventsSubject } from './subjects.js';

interface ReactionBase {
  /** The durable consumer's name, shared by every process. */
  name: string;
  filterSubject: (n: TransportNames) => string;
  /** Events of the filter this reaction acts on; the others are acked untouched. */
  accepts: (entry: EventEntry) => boolean;
  /**
   * Whether an event of this type (`<entityType>.<event>`, named by the message's subject) may
   * be one `accepts` takes. A message whose subject names another type is acked without its
   * body being read: it could not be applied anyway, since a delivery whose subject is not its
   * stored event's is refused as forged. Unset: every body is read.
   */
  acceptsType?: (type: string) => boolean;
}

/** Runs in one Postgres transaction with its inbox row. */
export interface TransactionalReaction extends ReactionBase {
  kind: 'transactional';
  apply: (uow: UnitOfWork, entry: EventEntry, host: ActorHost) => Promise<void>;
  /**
   * The effect itself changes nothing when repeated (it checks Postgres for what it already
   * did), so the runner records no inbox row for it: one row per event, kept forever, would
   * be most of what the reaction writes. A redelivery is then answered `applied` again.
   */
  idempotent?: boolean;
  /**
   * How messages that arrive together are applied together. The runner applies the entries
   * that share a key in one unit of work (with their inbox rows), in arrival order, and
   * entries of different keys in parallel. Without `group` the key is the event's entity
   * and `apply` runs for each entry in turn.
   */
  group?: {
    /**
     * What a key names: the runner's transaction for one key is confined to that actor (with
     * the rules of its transitions), so transactions of different keys may share a batch
     * side by side (GroupUnit.key). Without `group`, the entity is that actor.
     */
    actor: EntityType;
    /**
     * The key of each entity, by entity id (one missing is keyed by itself). An entity's key
     * must never change: the runner keeps it.
     */
    keysOf: (db: Db, entityIds: string[]) => Promise<Map<string, string>>;
    /**
     * The key as the stored entry states it, or undefined to look it up with `keysOf`. The
     * entry is the event log's (never a message body), so what it states is the truth.
     */
    keyOf?: (entry: EventEntry) => string | undefined;
    /** The effect of several entries of one key (each new to the inbox), in one unit of work. */
    applyMany: (uow: UnitOfWork, entries: EventEntry[], host: ActorHost) => Promise<void>;
    /**
     * The same effect while the runner checks the messages in this very transaction (an
     * idempotent reaction only: no inbox row waits for the check). It is the whole of its
     * unit of work: nothing is sent in the transaction after it returns. `claims` are what the
     * messages state, untrusted, all of key `key` by `keyOf`; `verified` resolves, in the
     * check's round trip, to the stored entries that match them. Reads of what the claims name
     * may go out before that answer, so the check costs no round trip of its own; every effect
     * must be decided on `verified` alone.
     */
    applyClaims?: (
      uow: UnitOfWork,
      key: string,
      claims: EventEntry[],
      verified: Promise<EventEntry[]>,
    ) => Promise<void>;
  };
}

/** An effect outside Postgres that may repeat harmlessly (a wake-up). */
export interface DirectReaction extends ReactionBase {
  kind: 'direct';
  run: (entry: EventEntry) => Promise<void>;
}

export type Reaction = TransactionalReaction | DirectReaction;

const SETTLEMENT_EVENTS: ReadonlySet<string> = new Set(TASK_SETTLEMENT_EVENTS);
const isSettlementEvent = (type: string) => SETTLEMENT_EVENTS.has(type);

/** The ticket a task event states (the task machine's context, fixed at creation). */
function statedTicket(e: EventEntry): string | undefined {
  return typeof e.data.ticketId === 'string' ? e.data.ticketId : undefined;
}

export const taskStateReaction: TransactionalReaction = {
  kind: 'transactional',
  name: 'task_state',
  filterSubject: (n) => typeEventsSubject(n, 'task'),
  // A task's claim, start, retry or release changes nothing its ticket decides on (the
  // policy would tell it nothing): those messages are acknowledged without reading Postgres.
  accepts: (e) => e.entityType === 'task' && isSettlementEvent(e.type),
  // Two of a task's three events on the way to done (claimed, started) are no news: their
  // subjects say so, and the bodies are left unread.
  acceptsType: isSettlementEvent,
  // The policy tells the ticket only news newer than its ticket_tasks row (by the task's
  // seq), in the same transaction: a redelivery, or the reconciler's sweep, finds it told.
  idempotent: true,
  apply: async (uow, e) => {
    await forwardTaskState(uow, e.entityId);
  },
  // One ticket's news in one transaction: one lock of its row, each task's state read once.
  group: {
    actor: 'ticket',
    keysOf: (db, taskIds) => ticketsOfTasks(db, taskIds),
    keyOf: statedTicket,
    applyMany: async (uow, entries) => {
      const taskIds = entries.map((e) => e.entityId);
      // The entries of one key state one ticket; any that states none is told the long way.
      const ticketId = entries[0] ? statedTicket(entries[0]) : undefined;
      if (ticketId !== undefined && entries.every((e) => statedTicket(e) === ticketId)) {
        await forwardTicketNews(uow, ticketId, taskIds);
      } else {
        await forwardTaskStates(uow, taskIds);
      }
    },
    // The ticket's lock and the claimed tasks' states go out behind the check; only the tasks
    // of verified entries are told. Nothing follows in the runner's unit of work, so its
    // transaction may commit right behind the ticket's write.
    applyClaims: async (uow, ticketId, claims, verified) => {
      await forwardTicketNews(
        uow,
        ticketId,
        claims.map((c) => c.entityId),
        {
          only: verified.then((entries) => entries.map((e) => e.entityId)),
          last: true,
        },
      );
    },
  },
};

export const ticketCancelReaction: TransactionalReaction = {
  kind: 'transactional',
  name: 'ticket_cancel',
  filterSubject: (n) => typeEventsSubject(n, 'ticket', 'cancelled'),
  accepts: (e) => e.type === 'ticket.cancelled',
  acceptsType: (type) => type === 'ticket.cancelled',
  // The policy cancels only the tasks still open, so a repeat finds none and changes nothing:
  // an inbox row per cancelled ticket, kept for good, would guard nothing.
  idempotent: true,
  apply: async (uow, e) => {
    await cancelOpenTasks(uow, e.entityId);
  },
};

export function defaultReactions(_nc: NatsConnection, _names: TransportNames): Reaction[] {
  return [taskStateReaction, ticketCancelReaction];
}

/**
 * Consumers earlier versions ran and this one does not: deleted at start, so the stream does
 * not keep counting messages for them. (`dispatch`: wake-ups now come from the relay.)
 */
export const OBSOLETE_CONSUMERS: readonly string[] = ['dispatch'];
