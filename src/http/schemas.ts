/**
 * Every request and response shape of the API as a zod schema: the handlers validate with
 * them and `/openapi.json` is generated from them, so the two cannot drift. Request objects
 * are strict (an unknown field is `validation_failed` naming it).
 */
import { z } from 'zod';
import { PHASES } from '../machines/phases.js';
import { TASK_STATES } from '../machines/task.js';
import { TICKET_STATES } from '../machines/ticket.js';

/** Components of the OpenAPI document: each schema registered here is named by its id. */
export const components = z.registry<{ id: string; description?: string }>();

const name = z.string().regex(/^[A-Za-z0-9_.:#-]{1,100}$/, 'letters, digits and _ . : # - only');
const json = z.json().register(components, { id: 'Json' });
/** Entity ids: what the API issues (`tkt_<uuid>`, `tsk_<uuid>`, `<ticket>-diagnostic-<n>`). */
export const ID_PATTERN = /^[A-Za-z0-9_.:#-]{1,200}$/;
const id = z.string().regex(ID_PATTERN, 'not an id');

// ---- requests -------------------------------------------------------------------------

export const NewTicketBody = z
  .strictObject({
    title: z.string().trim().min(1).max(500),
    description: z.string().max(20_000).nullable().optional(),
  })
  .register(components, { id: 'NewTicket' });

export const NewTaskBody = z
  .strictObject({
    type: name,
    phase: z.enum(PHASES).optional(),
    payload: json.optional(),
    executor: name.optional(),
    worktree: z.string().min(1).max(500).nullable().optional(),
    maxAttempts: z.int().min(1).max(100).optional(),
    priority: z.int().min(-1000).max(1000).optional(),
  })
  .register(components, { id: 'NewTask' });

export const ClaimBody = z
  .strictObject({
    workerId: z.string().min(1).max(200),
    types: z.array(name).max(100).optional(),
    /** Long poll; capped by CLAIM_MAX_WAIT_MS. */
    waitMs: z.int().min(0).max(3_600_000).optional(),
  })
  .register(components, { id: 'ClaimRequest' });

const reason = z.string().min(1).max(2_000);
const token = z.string().min(1).max(200);

export const TicketEventBody = z
  .discriminatedUnion('type', [
    z.strictObject({ type: z.literal('START') }),
    z.strictObject({ type: z.literal('ADVANCE') }),
    z.strictObject({ type: z.literal('BLOCK'), reason }),
    z.strictObject({ type: z.literal('UNBLOCK') }),
    z.strictObject({ type: z.literal('CANCEL'), reason: reason.optional() }),
  ])
  .register(components, { id: 'TicketEvent' });

/** CLAIM is not here: claims go through `POST /tasks/claim`, which checks worktrees and caps. */
export const TaskEventBody = z
  .discriminatedUnion('type', [
    z.strictObject({ type: z.literal('START'), token }),
    z.strictObject({ type: z.literal('HEARTBEAT'), token }),
    z.strictObject({ type: z.literal('COMPLETE'), token, result: json.optional() }),
    z.strictObject({ type: z.literal('FAIL'), token, error: z.string().min(1).max(20_000) }),
    z.strictObject({ type: z.literal('RELEASE'), token, reason: reason.optional() }),
    z.strictObject({ type: z.literal('CANCEL'), reason: reason.optional() }),
    z.strictObject({ type: z.literal('REQUEUE'), maxAttempts: z.int().min(1).max(100).optional() }),
  ])
  .register(components, { id: 'TaskEvent' });

const limit = (def: number, max: number) => z.coerce.number().int().min(1).max(max).default(def);
const cursor = z.string().min(1).max(500).optional();

export const TicketListQuery = z.strictObject({
  state: z.enum(TICKET_STATES).optional(),
  limit: limit(50, 500),
  cursor,
});

export const TaskListQuery = z.strictObject({
  state: z.enum(TASK_STATES).optional(),
  ticketId: id.optional(),
  limit: limit(50, 500),
  cursor,
});

export const EventLogQuery = z.strictObject({
  after: z.coerce.number().int().min(0).default(0),
  limit: limit(1000, 1000),
});

export const DeadLetterQuery = z.strictObject({ limit: limit(100, 1000) });

export const DeadLetterList = z
  .object({
    items: z.array(
      z.object({
        id: z.number().int(),
        consumer: z.string(),
        eventId: z.string().nullable(),
        subject: z.string(),
        data: z.unknown(),
        error: z.string(),
        deliveries: z.number().int(),
        at: z.string(),
      }),
    ),
  })
  .register(components, { id: 'DeadLetterList' });

export const StreamQuery = z.strictObject({
  after: z.union([z.literal('new'), z.coerce.number().int().min(0)]).optional(),
  entityId: id.optional(),
});

export const MermaidQuery = z.strictObject({ state: name.optional() });

// ---- responses ------------------------------------------------------------------------

const iso = z.string();

export const Ticket = z
  .object({
    id,
    title: z.string(),
    description: z.string().nullable(),
    state: z.enum(TICKET_STATES),
    phase: z.enum(PHASES).nullable(),
    blockedReason: z.string().nullable(),
    diagnostics: z.int(),
    version: z.int(),
    createdAt: iso,
    updatedAt: iso,
  })
  .register(components, { id: 'Ticket' });

export const Task = z
  .object({
    id,
    ticketId: id,
    type: z.string(),
    phase: z.enum(PHASES),
    state: z.enum(TASK_STATES),
    attempt: z.int(),
    attemptsUsed: z.int(),
    maxAttempts: z.int(),
    executor: z.string(),
    worktree: z.string().nullable(),
    workerId: z.string().nullable(),
    leaseExpiresAt: iso.nullable(),
    priority: z.int(),
    payload: json,
    result: json,
    error: z.string().nullable(),
    version: z.int(),
    createdAt: iso,
    updatedAt: iso,
  })
  .register(components, { id: 'Task' });

const allowedEvents = z.array(z.string());

export const TaskDetail = Task.extend({ allowedEvents }).register(components, {
  id: 'TaskDetail',
});

export const TicketSummary = Ticket.extend({ allowedEvents }).register(components, {
  id: 'TicketSummary',
});

export const TicketDetail = TicketSummary.extend({ tasks: z.array(TaskDetail) }).register(
  components,
  { id: 'TicketDetail' },
);

export const TicketPage = z
  .object({ items: z.array(Ticket), nextCursor: z.string().nullable() })
  .register(components, { id: 'TicketPage' });

export const TaskPage = z
  .object({ items: z.array(Task), nextCursor: z.string().nullable() })
  .register(components, { id: 'TaskPage' });

export const LogEntry = z
  .object({
    seq: z.int(),
    entityId: id,
    entityType: z.enum(['ticket', 'task']),
    type: z.string(),
    data: z.record(z.string(), json),
    at: iso,
  })
  .register(components, { id: 'LogEntry' });

export const EventLog = z
  .object({ events: z.array(LogEntry) })
  .register(components, { id: 'EventLog' });

export const Claimed = z
  .object({ task: Task, token: z.string() })
  .register(components, { id: 'Claimed' });

export const ErrorResponse = z
  .looseObject({
    error: z.enum([
      'validation_failed',
      'unauthorized',
      'not_found',
      'illegal_transition',
      'stale_token',
      'conflict',
      'version_conflict',
      'payload_too_large',
      'unsupported_media_type',
      'unsupported_snapshot',
      'unavailable',
      'internal',
    ]),
    message: z.string(),
    issues: z.array(z.object({ path: z.string(), message: z.string() })).optional(),
    state: z.string().optional(),
    event: z.string().optional(),
    allowed: z.array(z.string()).optional(),
    attempt: z.int().optional(),
  })
  .register(components, { id: 'Error' });

export const MachineSummary = z
  .object({
    name: z.string(),
    version: z.int(),
    states: z.array(z.string()),
    events: z.array(z.string()),
    systemEvents: z.array(z.string()),
  })
  .register(components, { id: 'MachineSummary' });

export const MachineList = z
  .object({ machines: z.array(MachineSummary) })
  .register(components, { id: 'MachineList' });

export const Health = z.object({ status: z.literal('ok') }).register(components, { id: 'Health' });

export const Readiness = z
  .object({
    ready: z.boolean(),
    postgres: z.boolean(),
    nats: z.boolean(),
    migrations: z.boolean(),
  })
  .register(components, { id: 'Readiness' });
