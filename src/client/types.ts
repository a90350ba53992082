/**
 * The shapes the client sends and receives, taken from the zod schemas the server validates
 * with (src/api/schemas.ts): a field renamed on one side is a type error on the other.
 * Request types are the schemas' inputs (what you may send), responses their outputs.
 */
import type { z } from 'zod';
import type { TASK_STATES, TICKET_STATES } from '../api/constants.js';
import type {
  ClaimBody,
  Claimed,
  DeadLetterList,
  ErrorResponse,
  EventLog,
  LogEntry,
  MachineList,
  NewTaskBody,
  NewTicketBody,
  OutputAccepted as OutputAcceptedSchema,
  OutputChunkIn as OutputChunkInSchema,
  OutputChunk as OutputChunkSchema,
  OutputPage as OutputPageSchema,
  Readiness,
  TaskDetail,
  TaskEventBody,
  TaskPage,
  TicketDetail,
  TicketEventBody,
  TicketPage,
  TicketSummary,
  TicketTaskPage,
} from '../api/schemas.js';

export type TaskState = (typeof TASK_STATES)[number];
export type TicketState = (typeof TICKET_STATES)[number];

export type NewTicket = z.input<typeof NewTicketBody>;
export type NewTask = z.input<typeof NewTaskBody>;
export type ClaimRequest = z.input<typeof ClaimBody>;
export type TicketEvent = z.input<typeof TicketEventBody>;
export type TaskEvent = z.input<typeof TaskEventBody>;

/** A ticket with the events its state accepts (what a POST answers). */
export type Ticket = z.output<typeof TicketSummary>;
/** A ticket with its first tasks; `tasksNext` pages the rest (`ticketTasks`). */
export type TicketWithTasks = z.output<typeof TicketDetail>;
/** A task with the events its state accepts. */
export type Task = z.output<typeof TaskDetail>;
export type TicketPageBody = z.output<typeof TicketPage>;
export type TaskPageBody = z.output<typeof TaskPage>;
export type TicketTaskPageBody = z.output<typeof TicketTaskPage>;
/** One event log entry: `{seq, entityId, entityType, type, data, at}`. */
export type EventLogEntry = z.output<typeof LogEntry>;
export type EventLogBody = z.output<typeof EventLog>;
/** A claim: the task (attempt, payload, lease) and the fencing `token` of this attempt. */
export type ClaimedTask = z.output<typeof Claimed>;
export type ErrorBody = z.output<typeof ErrorResponse>;
export type ErrorCode = ErrorBody['error'];
export type MachineListBody = z.output<typeof MachineList>;
export type ReadinessBody = z.output<typeof Readiness>;
export type DeadLetters = z.output<typeof DeadLetterList>;

export interface TicketListQuery {
  state?: TicketState;
  /** `NAME` (every version) or `NAME@VERSION`. */
  workflow?: string;
  limit?: number;
  cursor?: string;
}
export interface TaskListQuery {
  state?: TaskState;
  ticketId?: string;
  limit?: number;
  cursor?: string;
}
export interface PageQuery {
  limit?: number;
  cursor?: string;
}
export interface EventLogQuery {
  after?: number;
  limit?: number;
}

// ---- output (CONTRACT section 6) -------------------------------------------------------

export type OutputChunkIn = z.input<typeof OutputChunkInSchema>;
export type OutputStream = OutputChunkIn['stream'];
/** One stored chunk: `seq` orders a task's output across its attempts. */
export type OutputChunk = z.output<typeof OutputChunkSchema>;
/** `truncated`: older chunks went past OUTPUT_MAX_BYTES. */
export type OutputPage = z.output<typeof OutputPageSchema>;
export type OutputAccepted = z.output<typeof OutputAcceptedSchema>;
export interface OutputQuery {
  after?: number;
  limit?: number;
}

// ---- workflows (CONTRACT section 5) ----------------------------------------------------

export interface WorkflowTemplate {
  key: string;
  type: string;
  executor?: string;
  payload?: unknown;
  maxAttempts?: number;
  priority?: number;
  worktree?: string | null;
  dependsOn?: string[];
}
export interface WorkflowLoop {
  sendBackTo: string;
  maxLoops: number;
}
export interface WorkflowPhase {
  name: string;
  tasks?: WorkflowTemplate[];
  approval?: { timeoutMs?: number; onTimeout?: 'approve' | 'reject' | 'block' };
  onReject?: WorkflowLoop;
  onFail?: WorkflowLoop;
}
export interface WorkflowDefinition {
  name: string;
  description?: string;
  phases: WorkflowPhase[];
}
export interface Workflow extends WorkflowDefinition {
  version: number;
  createdAt: string;
}

// ---- the live stream -------------------------------------------------------------------

/** One Server-Sent Event of `GET /events/stream`: `id` is the event-log position to resume from. */
export interface StreamEvent {
  id: string;
  type: string;
  entry: EventLogEntry;
}
