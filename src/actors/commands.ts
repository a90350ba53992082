/**
 * The commands of CONTRACT section 2, over the actor host: create a ticket, add a task to a
 * ticket (one transaction: the ticket learns of the task as the task is born), and send a
 * public event. HTTP, the built-in workers and the demo all go through here.
 */
import { randomUUID } from 'node:crypto';
import { InvalidInput } from '../errors.js';
import type { Json } from '../machines/domain-events.js';
import { type EntityType, MACHINES } from '../machines/index.js';
import { isPhase, type Phase } from '../machines/phases.js';
import { recordTaskAdded } from '../policies/index.js';
import type { DecideEvent } from './decide.js';
import type { ActorHost, Applied, UnitOfWork } from './host.js';

export interface TicketSettings {
  stuckAfterMs: number;
  diagnosticCooldownMs: number;
}

export interface NewTicket {
  id?: string;
  title: string;
  description?: string | null;
}

export interface NewTask {
  id?: string;
  type: string;
  phase?: Phase;
  payload?: Json;
  executor?: string;
  worktree?: string | null;
  maxAttempts?: number;
  priority?: number;
}

export class Commands {
  constructor(
    readonly host: ActorHost,
    private readonly tickets: TicketSettings,
  ) {}

  createTicket(uow: UnitOfWork, spec: NewTicket): Promise<Applied> {
    return uow.create('ticket', {
      id: spec.id ?? `tkt_${randomUUID()}`,
      title: spec.title,
      description: spec.description ?? null,
      stuckAfterMs: this.tickets.stuckAfterMs,
      diagnosticCooldownMs: this.tickets.diagnosticCooldownMs,
    });
  }

  /**
   * Adds a task to a ticket in its current phase (or the one given). The ticket records it in
   * the same transaction (the `task-added` policy); a final ticket refuses it with
   * IllegalTransition, and then no task exists.
   */
  async addTask(uow: UnitOfWork, ticketId: string, spec: NewTask): Promise<Applied> {
    const ticket = await uow.load('ticket', ticketId);
    const current = (ticket.snapshot.context as { phase: Phase | null }).phase;
    const phase = spec.phase ?? current ?? 'requirements';
    if (!isPhase(phase)) throw new InvalidInput(`phase ${String(phase)} is not a phase`);
    const id = spec.id ?? `tsk_${randomUUID()}`;
    await recordTaskAdded(uow, ticketId, { taskId: id, phase, taskType: spec.type });
    const d = this.host.taskDefaults;
    return uow.create('task', {
      id,
      ticketId,
      type: spec.type,
      phase,
      executor: spec.executor ?? 'external',
      worktree: spec.worktree ?? null,
      payload: spec.payload ?? null,
      priority: spec.priority ?? 0,
      maxAttempts: spec.maxAttempts ?? d.maxAttempts,
      leaseMs: d.leaseMs,
      retryBaseMs: d.retryBaseMs,
    });
  }

  /**
   * Sends an event from outside (HTTP, an operator, an agent). System events are the
   * runtime's alone and are refused here, before any state is read.
   */
  sendPublic(
    uow: UnitOfWork,
    entityType: EntityType,
    id: string,
    event: DecideEvent,
  ): Promise<Applied> {
    assertPublicEvent(entityType, event.type);
    return uow.send(entityType, id, event);
  }
}

export function assertPublicEvent(entityType: EntityType, type: string): void {
  if (type.startsWith('xstate.') || MACHINES[entityType].systemEvents.includes(type)) {
    throw new InvalidInput(`event ${type} is sent by the runtime only`, [
      { path: 'type', message: `${type} is a system event of ${entityType}` },
    ]);
  }
}
