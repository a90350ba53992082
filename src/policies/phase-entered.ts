/**
 * Rules on a ticket entering a phase, in the same transaction as the phase change:
 * - a diagnostic the stuck check asked for is created, with its row beside the ticket;
 * - a send-back cancels the open tasks of the phase it leaves;
 * - entering a work phase (forward or sent back) creates one task per template of the phase,
 *   with feedback on a re-entry. The phase change happens once (the host's compare-and-set),
 *   and these tasks are created only here, never by a reaction or the reconciler, so once per
 *   entry; their ids are derived from the entry's event seq, so a second creation could not
 *   commit anyway. One transition may enter several phases (the machine's automatic advance
 *   runs after the event's own transition): each entry's templates are created.
 *
 * A phase whose tasks already allow it to advance (they finished while the ticket was in
 * backlog or blocked) needs no rule here: the machine's eventless transition leaves it in the
 * same step that enters it.
 */
import type { Applied, UnitOfWork } from '../actors/host.js';
import type { DomainEvent } from '../machines/domain-events.js';
import type { Phase } from '../machines/phases.js';
import { OPEN_TASK_STATES } from '../machines/task.js';
import { DIAGNOSTIC_TASK_TYPE } from '../machines/ticket.js';
import { phaseEntry, roundOf, type TicketContext, templatesOf } from '../machines/workflow.js';
import type { TaskTemplate } from '../machines/workflow-definition.js';
import { DEFAULT_WORKFLOW_REF } from '../persistence/actor-rows.js';
import { openTasksOfPhase } from '../persistence/dependency-rows.js';
import { insertTicketTask } from '../persistence/ticket-task-rows.js';
import { addTask } from './new-task.js';
import { sendIfAccepted } from './send.js';

/**
 * The ticket events this module's rules act on (`spawnDiagnostics`, `cancelLeftPhase`,
 * `createTemplateTasks` via `phaseEntry`): after a ticket's write that emitted none of them,
 * no rule sends anything (`rulesFollow`). A rule on another event must be named here.
 */
export const TICKET_RULE_EVENTS: readonly string[] = [
  'ticket.diagnostic_spawned',
  'ticket.sent_back',
  'ticket.phase_changed',
];

export async function spawnDiagnostics(uow: UnitOfWork, ticket: Applied): Promise<void> {
  for (const e of ticket.events) {
    if (e.type !== 'ticket.diagnostic_spawned') continue;
    const { taskId, phase } = e.data as { taskId: string; phase: Phase };
    const { taskDefaults, diagnosticExecutor } = uow.host;
    await uow.create('task', {
      id: taskId,
      ticketId: ticket.id,
      type: DIAGNOSTIC_TASK_TYPE,
      phase,
      executor: diagnosticExecutor,
      payload: { reason: 'no task of the phase changed state within STUCK_AFTER_MS' },
      priority: 10,
      ...taskDefaults,
    });
    // The transition counted it in the current round of the phase: its row says so.
    const context = ticket.snapshot.context as unknown as TicketContext;
    await insertTicketTask(uow.tx, {
      taskId,
      ticketId: ticket.id,
      phase,
      round: roundOf(context, phase),
      type: DIAGNOSTIC_TASK_TYPE,
    });
  }
}

/** A send-back: every open task of the phase left is cancelled (the machine set them aside). */
export async function cancelLeftPhase(uow: UnitOfWork, ticket: Applied): Promise<void> {
  for (const e of ticket.events) {
    if (e.type !== 'ticket.sent_back' || typeof e.data.from !== 'string') continue;
    const from = e.data.from;
    for (const id of await openTasksOfPhase(uow.tx, ticket.id, from, OPEN_TASK_STATES)) {
      await sendIfAccepted(uow, 'task', id, {
        type: 'CANCEL',
        reason: `ticket ${ticket.id} was sent back from ${from}`,
      });
    }
  }
}

/** Id of a template's task: one per (ticket, phase entry, key). */
export function templateTaskId(ticketId: string, phase: string, entrySeq: number, key: string) {
  return `${ticketId}-${phase}-${entrySeq}-${key}`;
}

export async function createTemplateTasks(uow: UnitOfWork, ticket: Applied): Promise<void> {
  const workflow = ticket.workflow ?? DEFAULT_WORKFLOW_REF;
  for (const e of ticket.events) {
    const entry = phaseEntry(e as unknown as DomainEvent);
    if (!entry) continue;
    // The built-in workflow has no templates; it needs no registry.
    if (workflow === DEFAULT_WORKFLOW_REF) return;
    const { definition } = await uow.host.resolveWorkflow(workflow);
    const templates = templatesOf(definition, entry.phase);
    const ids = new Map(
      templates.map((t) => [t.key, templateTaskId(ticket.id, entry.phase, e.seq, t.key)]),
    );
    for (const t of dependencyOrder(templates)) {
      await addTask(uow, ticket.id, {
        id: ids.get(t.key)!,
        type: t.type,
        phase: entry.phase,
        executor: t.executor,
        worktree: t.worktree?.replaceAll('{{ticket.id}}', ticket.id),
        payload: t.payload,
        priority: t.priority,
        maxAttempts: t.maxAttempts,
        dependsOn: (t.dependsOn ?? []).map((k) => ids.get(k)!),
        feedback: entry.feedback,
      });
    }
  }
}

/** Templates with each after the ones it depends on (registration checked they are acyclic). */
function dependencyOrder(templates: TaskTemplate[]): TaskTemplate[] {
  const byKey = new Map(templates.map((t) => [t.key, t]));
  const out: TaskTemplate[] = [];
  const seen = new Set<string>();
  const visit = (t: TaskTemplate) => {
    if (seen.has(t.key)) return;
    seen.add(t.key);
    for (const k of t.dependsOn ?? []) {
      const dep = byKey.get(k);
      if (dep) visit(dep);
    }
    out.push(t);
  };
  for (const t of templates) visit(t);
  return out;
}
