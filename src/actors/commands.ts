/**
 * The commands of CONTRACT section 2, over the actor host: create a ticket, add a task to a
 * ticket (one transaction: the ticket learns of the task as the task is born), and send a
 * public event. HTTP, the built-in workers and the demo all go through here.
 */
import { InvalidInput, UnknownWorkflow } from '../errors.js';
import type { Json } from '../machines/domain-events.js';
import { type EntityType, MACHINES } from '../machines/index.js';
import { FIXED_TICKET_STATES } from '../machines/workflow.js';
import { addTask } from '../policies/index.js';
import type { DecideEvent } from './decide.js';
import type { ActorHost, Applied, UnitOfWork } from './host.js';
import { uuidv7 } from './ids.js';

export interface TicketSettings {
  stuckAfterMs: number;
  diagnosticCooldownMs: number;
}

export interface NewTicket {
  id?: string;
  title: string;
  description?: string | null;
  /** `NAME` (latest version) or `NAME@VERSION`; default `default`. */
  workflow?: string;
}

export interface NewTask {
  id?: string;
  type: string;
  phase?: string;
  payload?: Json;
  executor?: string;
  worktree?: string | null;
  maxAttempts?: number;
  priority?: number;
  /** Tasks of the same ticket that must complete first. */
  dependsOn?: string[];
}

export class Commands {
  constructor(
    readonly host: ActorHost,
    private readonly tickets: TicketSettings,
  ) {}

  /** A ticket of the given workflow; an unknown workflow is InvalidInput naming it. */
  async createTicket(uow: UnitOfWork, spec: NewTicket): Promise<Applied> {
    let ref: string | undefined;
    if (
      spec.workflow !== undefined &&
      spec.workflow !== 'default' &&
      spec.workflow !== 'default@1'
    ) {
      try {
        ref = (await this.host.resolveWorkflow(spec.workflow)).ref;
      } catch (error) {
        if (!(error instanceof UnknownWorkflow)) throw error;
        throw new InvalidInput(error.message, [
          { path: 'workflow', message: `no workflow ${spec.workflow} is registered` },
        ]);
      }
    }
    return uow.create(
      'ticket',
      {
        id: spec.id ?? `tkt_${uuidv7()}`,
        title: spec.title,
        description: spec.description ?? null,
        stuckAfterMs: this.tickets.stuckAfterMs,
        diagnosticCooldownMs: this.tickets.diagnosticCooldownMs,
      },
      ref === undefined ? {} : { workflow: ref },
    );
  }

  /**
   * Adds a task to a ticket in its current phase (or the one given). The ticket records it in
   * the same transaction (the `task-added` policy); a final ticket refuses it with
   * IllegalTransition, and then no task exists.
   */
  async addTask(uow: UnitOfWork, ticketId: string, spec: NewTask): Promise<Applied> {
    const ticket = await uow.load('ticket', ticketId);
    const phases = phasesOf(await this.host.machineOf('ticket', ticket.workflow));
    const current = (ticket.snapshot.context as { phase: string | null }).phase;
    const phase = spec.phase ?? current ?? phases[0];
    if (phase === undefined || !phases.includes(phase)) {
      throw new InvalidInput(`phase ${String(phase)} is not a phase of this ticket's workflow`, [
        { path: 'phase', message: `one of ${phases.join(', ')}` },
      ]);
    }
    return addTask(uow, ticketId, { ...spec, id: spec.id ?? `tsk_${uuidv7()}`, phase });
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
    /** `last`: the unit of work sends nothing after it (see `UnitOfWork.sendAccepted`). */
    options: { last?: boolean } = {},
  ): Promise<Applied> {
    assertPublicEvent(entityType, event.type);
    return uow.send(entityType, id, event, options);
  }
}

/** A ticket machine's phases, in order: its states less the fixed ones. */
function phasesOf(entry: { machine: { config: { states?: object } } }): string[] {
  const fixed: readonly string[] = FIXED_TICKET_STATES;
  return Object.keys(entry.machine.config.states ?? {}).filter((s) => !fixed.includes(s));
}

export function assertPublicEvent(entityType: EntityType, type: string): void {
  if (type.startsWith('xstate.') || MACHINES[entityType].systemEvents.includes(type)) {
    throw new InvalidInput(`event ${type} is sent by the runtime only`, [
      { path: 'type', message: `${type} is a system event of ${entityType}` },
    ]);
  }
}
