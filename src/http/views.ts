/** Response bodies built from what a command applied: the entity plus its allowed events. */
import { allowedEventsOf } from '../actors/decide.js';
import type { Applied } from '../actors/host.js';
import { taskView, ticketView } from '../actors/views.js';
import { DEFAULT_WORKFLOW_REF } from '../persistence/actor-rows.js';

export function summaryOf(a: Applied) {
  const view =
    a.entityType === 'ticket'
      ? ticketView(a.snapshot, a.version, a.workflow ?? DEFAULT_WORKFLOW_REF)
      : taskView(a.snapshot, a.version, a.feedback ?? null);
  return { ...view, allowedEvents: allowedEventsOf(a.entityType, a.snapshot, a.machine) };
}
