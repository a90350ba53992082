/**
 * Rule: a ticket was cancelled → each of its open tasks gets `CANCEL`, if Postgres says the
 * ticket really is cancelled now. Across transactions (a reaction, then the reconciler): a
 * ticket with many tasks would otherwise lock them all in the cancelling request.
 */
import type { UnitOfWork } from '../actors/host.js';
import { openTasksOfCancelledTicket } from '../persistence/reaction-rows.js';
import { sendIfAccepted } from './send.js';

/** Returns how many tasks it cancelled. */
export async function cancelOpenTasks(uow: UnitOfWork, ticketId: string): Promise<number> {
  let n = 0;
  for (const id of await openTasksOfCancelledTicket(uow.tx, ticketId)) {
    const applied = await sendIfAccepted(uow, 'task', id, {
      type: 'CANCEL',
      reason: `ticket ${ticketId} was cancelled`,
    });
    if (applied) n++;
  }
  return n;
}
