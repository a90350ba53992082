/**
 * The machine registry: every entity type, its machine, the machine's version (stored beside
 * each snapshot so a later change can migrate or refuse old rows) and its event vocabulary.
 */
import { TASK_SYSTEM_EVENTS, TASK_TOKEN_EVENTS, type TaskEvent, taskMachine } from './task.js';
import { TICKET_SYSTEM_EVENTS, type TicketEvent, ticketMachine } from './ticket.js';
import { type CompiledWorkflow, upgradeTicketContext } from './workflow.js';

export type EntityType = 'ticket' | 'task';
export const ENTITY_TYPES: readonly EntityType[] = ['ticket', 'task'];

export interface MachineEntry {
  machine: typeof ticketMachine | typeof taskMachine;
  version: number;
  /** Events only the runtime may send. */
  systemEvents: readonly string[];
  /** Events that carry a fencing token checked against `context.token`. */
  tokenEvents: readonly string[];
  /**
   * The `after` delay kept as a deadline column of the actor's row (found by an index, written
   * by the same update as the snapshot) instead of a timer row, and the event the runtime
   * sends once it passes. Tasks: the lease, set on every claim and heartbeat.
   */
  deadline?: { delay: string; event: string };
}

export const MACHINES: Record<EntityType, MachineEntry> = {
  ticket: {
    machine: ticketMachine,
    // 2: the context counts tasks per phase and state (`counts`, `rounds`, `openDiagnostics`)
    // instead of listing them (`tasks`); version-1 snapshots are upgraded on load.
    version: 2,
    systemEvents: TICKET_SYSTEM_EVENTS,
    tokenEvents: [],
  },
  task: {
    machine: taskMachine,
    version: 1,
    systemEvents: TASK_SYSTEM_EVENTS,
    tokenEvents: TASK_TOKEN_EVENTS,
    deadline: { delay: 'lease', event: 'LEASE_EXPIRED' },
  },
};

/** A persisted snapshot, as far as an upgrade reads it. */
export interface StoredSnapshot {
  context: Record<string, unknown>;
  [key: string]: unknown;
}

/**
 * A snapshot stored by an older version of the entity's machine, as the current version's,
 * or null when no upgrade from that version exists. Pure.
 */
export function upgradeSnapshot<S extends StoredSnapshot>(
  entityType: EntityType,
  from: number,
  snapshot: S,
): S | null {
  if (entityType === 'ticket' && from === 1 && MACHINES.ticket.version === 2) {
    return { ...snapshot, context: upgradeTicketContext(snapshot.context) };
  }
  return null;
}

/** The registry entry of a compiled workflow's ticket machine, for `decide(..., entry)`. */
export function workflowMachineEntry(compiled: CompiledWorkflow): MachineEntry {
  return {
    machine: compiled.machine,
    version: compiled.version,
    systemEvents: TICKET_SYSTEM_EVENTS,
    tokenEvents: [],
  };
}

export type EventOf<T extends EntityType> = T extends 'ticket' ? TicketEvent : TaskEvent;
export type AnyEntityEvent = TicketEvent | TaskEvent;

export { taskMachine, ticketMachine };
