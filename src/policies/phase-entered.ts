/**
 * Rules on a ticket entering a phase, in the same transaction as the phase change:
 * - a diagnostic the stuck check asked for is created;
 * - a phase whose tasks already allow it to advance (they finished while the ticket was in
 *   backlog or blocked) advances now: no later task event would trigger the automatic
 *   ADVANCE, and it must not wait for a stuck check.
 */
import type { Applied, UnitOfWork } from '../actors/host.js';
import type { Phase } from '../machines/phases.js';
import { DIAGNOSTIC_TASK_TYPE, phaseComplete, type TicketContext } from '../machines/ticket.js';

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
  }
}

export async function advanceIfPhaseComplete(uow: UnitOfWork, ticket: Applied): Promise<void> {
  const entered = ticket.events.some(
    (e) =>
      (e.type === 'ticket.phase_changed' && e.data.to !== 'done') || e.type === 'ticket.unblocked',
  );
  if (!entered) return;
  const ctx = ticket.snapshot.context as unknown as TicketContext;
  if (ctx.phase !== null && phaseComplete(ctx.tasks, ctx.phase)) {
    await uow.send('ticket', ticket.id, { type: 'ADVANCE' });
  }
}
