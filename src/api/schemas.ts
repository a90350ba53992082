/**
 * Every request and response shape of the API as a zod schema: the handlers validate with
 * them and `/openapi.json` is generated from them, so the two cannot drift. Request objects
 * are strict (an unknown field is `validation_failed` naming it).
 */
import { z } from 'zod';
import { MAX_TIMER_MS, TASK_STATES } from './constants.js';

/** Components of the OpenAPI document: each schema registered here is named by its id. */
export const components = z.registry<{ id: string; description?: string }>();

const name = z.string().regex(/^[A-Za-z0-9_.:#-]{1,100}$/, 'letters, digits and _ . : # - only');
const json = z.json().register(components, { id: 'Json' });
/** Entity ids: what the API issues (`tkt_<uuidv7>`, `tsk_<uuidv7>`, `<ticket>-diagnostic-<n>`). */
export const ID_PATTERN = /^[A-Za-z0-9_.:#-]{1,200}$/;
const id = z.string().regex(ID_PATTERN, 'not an id');
/** The largest value of a Postgres `int4` column (event `seq`, `priority`, `attempt`). */
export const INT4_MAX = 2_147_483_647;

/**
 * What the built-in executors read from `payload`, checked when the task is created so a
 * value no timer can hold (Node's timers overflow past MAX_TIMER_MS and fire at once) is a
 * 400 instead of a task that fails when it runs. Other executors' payloads are free-form.
 * Unknown keys are kept: the payload is the task's own data.
 */
export const EXECUTOR_PAYLOADS: Readonly<Record<string, z.ZodType>> = {
  sleep: z
    .looseObject({
      ms: z.int().min(0).max(MAX_TIMER_MS).optional(),
      fail: z.string().max(20_000).optional(),
    })
    .nullable()
    .optional(),
  shell: z.looseObject({
    command: z.string().min(1).max(65_536),
    timeoutMs: z.int().min(1).max(MAX_TIMER_MS).optional(),
    cwd: z.string().min(1).max(4_096).optional(),
  }),
};

// ---- requests -------------------------------------------------------------------------

export const NewTicketBody = z
  .strictObject({
    title: z.string().trim().min(1).max(500),
    description: z.string().max(20_000).nullable().optional(),
    /** `NAME` (its latest version) or `NAME@VERSION`; default `default`. */
    workflow: z
      .string()
      .regex(/^[a-z][a-z0-9_-]{0,63}(@[1-9][0-9]{0,8})?$/, 'NAME or NAME@VERSION')
      .optional(),
  })
  .register(components, { id: 'NewTicket' });

/** Dependencies one task may name: a bound on the rows and locks one request can take. */
export const TASK_DEPENDS_ON_MAX = 32;

export const NewTaskBody = z
  .strictObject({
    type: name,
    /** A phase of the ticket's workflow (checked against it when the task is added). */
    phase: z
      .string()
      .regex(/^[a-z][a-z0-9_]{0,39}$/, 'a phase name')
      .optional(),
    payload: json.optional(),
    executor: name.optional(),
    worktree: z.string().min(1).max(500).nullable().optional(),
    maxAttempts: z.int().min(1).max(100).optional(),
    priority: z.int().min(-1000).max(1000).optional(),
    /** Tasks of the same ticket that must complete first (checked when the task is added). */
    dependsOn: z.array(id).max(TASK_DEPENDS_ON_MAX).optional(),
  })
  .superRefine((task, ctx) => {
    const schema = EXECUTOR_PAYLOADS[task.executor ?? 'external'];
    const parsed = schema?.safeParse(task.payload);
    for (const issue of parsed?.error?.issues ?? []) {
      ctx.addIssue({
        code: 'custom',
        message: `${issue.message} (executor ${task.executor})`,
        path: ['payload', ...issue.path],
      });
    }
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
    z.strictObject({
      type: z.literal('APPROVE'),
      by: z.string().min(1).max(200),
      comment: z.string().max(2_000).optional(),
    }),
    z.strictObject({ type: z.literal('REJECT'), by: z.string().min(1).max(200), reason }),
    z.strictObject({
      type: z.literal('SEND_BACK'),
      toPhase: z.string().regex(/^[a-z][a-z0-9_]{0,39}$/, 'a phase name'),
      reason,
    }),
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

/**
 * An integer query parameter: plain decimal digits only (no sign, blank, fraction, exponent
 * or hex, which `Number()` would accept), within the range of what it feeds.
 */
const queryInt = (min: number, max: number) => {
  const message = `an integer from ${min} to ${max}`;
  return z
    .string()
    .regex(/^\d{1,16}$/, message)
    .transform(Number)
    .refine((n) => n >= min && n <= max, message);
};
const limit = (def: number, max: number) => queryInt(1, max).default(def);
/** Opaque, but always base64url: anything else (a NUL, a quote) is refused here. */
const cursor = z
  .string()
  .regex(/^[A-Za-z0-9_-]{1,500}$/, 'invalid cursor')
  .optional();

/** The most items one page of a list holds. */
export const PAGE_MAX = 200;

/** A ticket state of any workflow: its phases and the fixed states share this pattern. */
const ticketState = z.string().regex(/^[a-z][a-z0-9_]{0,39}$/, 'a ticket state');

export const TicketListQuery = z.strictObject({
  state: ticketState.optional(),
  /** `NAME` (every version) or `NAME@VERSION`: only the tickets that run it. */
  workflow: z
    .string()
    .regex(/^[a-z][a-z0-9_-]{0,63}(@[1-9][0-9]{0,8})?$/, 'NAME or NAME@VERSION')
    .optional(),
  limit: limit(50, PAGE_MAX),
  cursor,
});

export const TaskListQuery = z.strictObject({
  state: z.enum(TASK_STATES).optional(),
  ticketId: id.optional(),
  limit: limit(50, PAGE_MAX),
  cursor,
});

/** `GET /tickets/:id/tasks`: pass a ticket's `tasksNext` as `cursor`. */
export const TicketTasksQuery = z.strictObject({
  limit: limit(100, PAGE_MAX),
  cursor,
});

export const EventLogQuery = z.strictObject({
  /** Feeds the int4 `seq` column. */
  after: queryInt(0, INT4_MAX).default(0),
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
  /** An event-log position (`pos`, a bigint); past 2^53 a number loses digits. */
  after: z.union([z.literal('new'), queryInt(0, Number.MAX_SAFE_INTEGER)]).optional(),
  entityId: id.optional(),
});

/** Chunks one output request carries at most (413 beyond). */
export const OUTPUT_CHUNKS_MAX = 1_000;
/** UTF-8 bytes of one chunk's text at most (and never more than OUTPUT_MAX_BYTES). */
export const OUTPUT_CHUNK_MAX_BYTES = 65_536;

export const OutputChunkIn = z
  .strictObject({
    stream: z.enum(['stdout', 'stderr', 'log']),
    text: z.string().min(1),
  })
  .register(components, { id: 'OutputChunkIn' });

export const OutputBody = z
  .strictObject({ token, chunks: z.array(OutputChunkIn).min(1) })
  .register(components, { id: 'OutputRequest' });

export const OutputQuery = z.strictObject({
  /** Feeds the bigint `seq` column; past 2^53 a number loses digits. */
  after: queryInt(0, Number.MAX_SAFE_INTEGER).default(0),
  limit: limit(500, 1000),
});

export const OutputStreamQuery = z.strictObject({
  after: queryInt(0, Number.MAX_SAFE_INTEGER).optional(),
});

export const MermaidQuery = z.strictObject({ state: name.optional() });

// ---- responses ------------------------------------------------------------------------

const iso = z.string();

export const Ticket = z
  .object({
    id,
    title: z.string(),
    description: z.string().nullable(),
    /** A state of the ticket's workflow (`TICKET_STATES` for `default`). */
    state: ticketState,
    phase: ticketState.nullable(),
    blockedReason: z.string().nullable(),
    diagnostics: z.int(),
    workflow: z.string(),
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
    phase: ticketState,
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
    dependsOn: z.array(id),
    feedback: z.object({ fromPhase: z.string(), reason: z.string(), loop: z.int() }).nullable(),
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

export const TaskSummary = Task.omit({ payload: true, result: true }).register(components, {
  id: 'TaskSummary',
  description: 'A task in a list: every field but payload and result (GET /tasks/{id} has them).',
});

export const TicketTask = TaskSummary.extend({ allowedEvents }).register(components, {
  id: 'TicketTask',
});

export const TicketDetail = TicketSummary.extend({
  tasks: z.array(TicketTask).max(PAGE_MAX),
  tasksNext: z.string().nullable(),
}).register(components, {
  id: 'TicketDetail',
  description:
    'The ticket with its first tasks, oldest first; when tasksNext is not null, ' +
    'GET /tickets/{id}/tasks?cursor={tasksNext} returns the next ones.',
});

export const TicketPage = z
  .object({ items: z.array(Ticket), nextCursor: z.string().nullable() })
  .register(components, { id: 'TicketPage' });

export const TaskPage = z
  .object({ items: z.array(TaskSummary), nextCursor: z.string().nullable() })
  .register(components, { id: 'TaskPage' });

export const TicketTaskPage = z
  .object({ items: z.array(TicketTask), nextCursor: z.string().nullable() })
  .register(components, { id: 'TicketTaskPage' });

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

export const OutputChunk = z
  .object({
    seq: z.int(),
    attempt: z.int(),
    stream: z.enum(['stdout', 'stderr', 'log']),
    text: z.string(),
    at: iso,
  })
  .register(components, { id: 'OutputChunk' });

export const OutputPage = z
  .object({
    chunks: z.array(OutputChunk),
    truncated: z.boolean(),
  })
  .register(components, { id: 'OutputPage' });

export const OutputAccepted = z
  .object({ firstSeq: z.int(), lastSeq: z.int(), attempt: z.int() })
  .register(components, { id: 'OutputAccepted' });

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
