/** Response bodies built from what a command applied: the entity plus its allowed events. */
import { allowedEvents, restore } from '../actors/decide.js';
import type { Applied } from '../actors/host.js';
import { taskView, ticketView } from '../actors/views.js';
import { DEFAULT_WORKFLOW_REF } from '../persistence/actor-rows.js';

export function summaryOf(a: Applied) {
  const view =
    a.entityType === 'ticket'
      ? ticketView(a.snapshot, a.version, a.workflow ?? DEFAULT_WORKFLOW_REF)
      : taskView(a.snapshot, a.version, a.feedback ?? null);
  const snapshot = restore(a.entityType, a.snapshot, a.machine);
  return { ...view, allowedEvents: allowedEvents(a.entityType, snapshot, a.machine) };
}
