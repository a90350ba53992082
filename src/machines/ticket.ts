/**
 * The ticket machine (CONTRACT section 1): the built-in `default` workflow, compiled by the
 * same factory as every user-defined one (`./workflow.ts`), so the two cannot drift.
 */
import type { Phase } from './phases.js';
import {
  compileWorkflow,
  type PhaseCounts,
  type TicketContext as WorkflowTicketContext,
} from './workflow.js';
import { DEFAULT_WORKFLOW } from './workflow-definition.js';

export {
  DIAGNOSTIC_TASK_TYPE,
  diagnosticTaskId,
  phaseComplete,
  roundOf,
  TICKET_SYSTEM_EVENTS,
  type TicketEvent,
  type TicketInput,
} from './workflow.js';

/** The context of a default-workflow ticket (a user workflow's is `WorkflowTicketContext`). */
export type TicketContext = Omit<WorkflowTicketContext, 'phase' | 'counts'> & {
  phase: Phase | null;
  counts: Partial<Record<Phase, PhaseCounts>>;
};

/** The default workflow's states; a user workflow has its own phases in their place. */
export type TicketState = 'backlog' | Phase | 'done' | 'blocked' | 'cancelled';

export const DEFAULT_COMPILED = compileWorkflow(DEFAULT_WORKFLOW, 1);

export const TICKET_STATES: readonly TicketState[] = DEFAULT_COMPILED.states as TicketState[];
export const FINAL_TICKET_STATES: readonly TicketState[] = ['done', 'cancelled'];

export const ticketMachine = DEFAULT_COMPILED.machine;
