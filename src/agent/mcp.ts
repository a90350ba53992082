/**
 * `bin/orchestrator mcp`: a Model Context Protocol server on stdio, so an AI agent (Claude
 * Code, Claude Desktop, any MCP client) works tasks with tool calls: claim, heartbeat, log,
 * complete, fail and release tasks; read and create tickets, send them events, add tasks;
 * approve or reject gates. Each tool's input schema is built from the zod schema the server
 * validates that request with (src/api/schemas.ts), and every failure is a tool error
 * (`isError: true`) whose text is the API's error body: `{"error": CODE, "message", ...}`.
 *
 * A model thinks in minutes, not in thirds of a lease: this process heartbeats the tasks
 * it claimed by itself while the session lasts and the agent keeps using them (up to
 * HOLD_IDLE_MS after its last tool call on the task); when the session ends (stdin
 * closes, SIGTERM), their tasks are RELEASEd. stdout carries only the protocol; any
 * diagnostics go to stderr.
 */

import { hostname } from 'node:os';
import { McpServer } from '@modelcontextprotocol/sdk/server/mcp.js';
import { StdioServerTransport } from '@modelcontextprotocol/sdk/server/stdio.js';
import type { CallToolResult } from '@modelcontextprotocol/sdk/types.js';
import { z } from 'zod';
import { TICKET_STATES } from '../api/constants.js';
import {
  ClaimBody,
  ID_PATTERN,
  NewTaskBody,
  NewTicketBody,
  OutputBody,
  PAGE_MAX,
  TaskEventBody,
  TicketEventBody,
} from '../api/schemas.js';
import {
  type ClaimedTask,
  IllegalTransitionError,
  NotFoundError,
  OrchestratorClient,
  OrchestratorClientError,
  StaleTokenError,
  type TaskEvent,
  type TicketEvent,
} from '../client/index.js';
import { packageVersion } from '../version.js';

/** How long a claimed task's lease is kept alive after the agent's last call about it. */
export const HOLD_IDLE_MS = 30 * 60_000;
/** Tasks one session may hold at once. */
export const MAX_HELD = 64;
const DEFAULT_LEASE_MS = 30_000;

const id = z.string().regex(ID_PATTERN, 'not an id');

/** One member of a discriminated union of events, checked to be the event `type`. */
function eventOf<O extends z.ZodObject>(option: O | undefined, type: string): O {
  if (!option || (option.shape.type as z.ZodLiteral).value !== type) {
    throw new Error(`the API schema no longer has ${type} where expected`);
  }
  return option;
}

/** Looks a ticket event up by type: present once the server's schema has it. */
function ticketEvent(type: string): z.ZodObject | undefined {
  const options = TicketEventBody.options as readonly z.ZodObject[];
  return options.find((o) => (o.shape.type as z.ZodLiteral).value === type);
}

const T = TaskEventBody.options;
/**
 * Gates' events: the server's own schemas once they are in TicketEventBody; until then the
 * same shapes here (and the server answers 400 or 409, which is a tool error like any other).
 */
const approveFallback = z.strictObject({
  type: z.literal('APPROVE'),
  by: z.string().min(1).max(200),
  comment: z.string().max(2_000).optional(),
});
const rejectFallback = z.strictObject({
  type: z.literal('REJECT'),
  by: z.string().min(1).max(200),
  reason: z.string().min(1).max(2_000),
});
const gate = <F extends typeof approveFallback | typeof rejectFallback>(fallback: F): F =>
  (ticketEvent(fallback.shape.type.value) as F | undefined) ?? fallback;

export const TOOL_SCHEMAS = {
  claim_task: ClaimBody.partial({ workerId: true }),
  heartbeat_task: eventOf(T[1], 'HEARTBEAT').omit({ type: true }).extend({ taskId: id }),
  log_task_output: OutputBody.extend({ taskId: id }),
  complete_task: eventOf(T[2], 'COMPLETE').omit({ type: true }).extend({ taskId: id }),
  fail_task: eventOf(T[3], 'FAIL').omit({ type: true }).extend({ taskId: id }),
  release_task: eventOf(T[4], 'RELEASE').omit({ type: true }).extend({ taskId: id }),
  get_task: z.strictObject({ taskId: id }),
  read_task_output: z.strictObject({
    taskId: id,
    after: z.int().min(0).optional(),
    limit: z.int().min(1).max(1_000).optional(),
  }),
  create_ticket: NewTicketBody.extend({
    start: z.boolean().optional().describe('send START at once (backlog → first phase)'),
  }),
  get_ticket: z.strictObject({ ticketId: id }),
  list_tickets: z.strictObject({
    state: z.enum(TICKET_STATES).optional(),
    limit: z.int().min(1).max(PAGE_MAX).optional(),
    cursor: z.string().max(500).optional(),
  }),
  send_ticket_event: z.strictObject({ ticketId: id, event: TicketEventBody }),
  add_task: NewTaskBody.extend({ ticketId: id }),
  approve_gate: gate(approveFallback)
    .omit({ type: true })
    .partial({ by: true })
    .extend({ ticketId: id }),
  reject_gate: gate(rejectFallback)
    .omit({ type: true })
    .partial({ by: true })
    .extend({ ticketId: id }),
} as const;

type Args<K extends keyof typeof TOOL_SCHEMAS> = z.output<(typeof TOOL_SCHEMAS)[K]>;

const DESCRIPTIONS: Record<keyof typeof TOOL_SCHEMAS, string> = {
  claim_task:
    'Claim the next task (optionally of `types`, waiting up to `waitMs`) and start it. Returns the task and its `token` (pass it to every later call about this task), or `{task: null}` when none was available. This server keeps the lease alive while you work; finish with complete_task, fail_task or release_task.',
  heartbeat_task:
    'Extend the lease of a task you claimed. This server already does it in the background; an error here (illegal_transition with state "cancelled", stale_token) means stop working on the task.',
  log_task_output:
    'Append to the task\'s output (what the dashboard and GET /tasks/:id/output show): chunks of {stream: "stdout"|"stderr"|"log", text}.',
  complete_task: 'Finish the task successfully with an optional JSON `result`.',
  fail_task:
    'Fail the task with an `error` message; it is retried (attempts left) or fails for good.',
  release_task: 'Give the task back unfinished; another agent can claim it at once.',
  get_task: 'Read a task: state, attempt, payload, result, error, worktree, feedback.',
  read_task_output: "Read a task's output chunks after the sequence number `after`.",
  create_ticket: 'Create a ticket (in backlog; `start: true` moves it to its first phase).',
  get_ticket: 'Read a ticket with its tasks and the events its state accepts.',
  list_tickets: 'List tickets, newest first, optionally in one `state`.',
  send_ticket_event:
    'Send a ticket event: START, ADVANCE, BLOCK {reason}, UNBLOCK, CANCEL {reason?} (and the workflow events the server accepts).',
  add_task:
    "Add a task to a ticket (phase defaults to the ticket's current one). `executor` defaults to external: a task for agents.",
  approve_gate:
    "Approve the ticket's current gate phase (APPROVE {by, comment?}): it moves to the next phase.",
  reject_gate:
    "Reject the ticket's current gate phase (REJECT {by, reason}): it goes back for rework, or blocks.",
};

// ---- results ----------------------------------------------------------------------------

function ok(value: unknown): CallToolResult {
  const structured =
    value !== null && typeof value === 'object' && !Array.isArray(value)
      ? (value as Record<string, unknown>)
      : { value };
  return {
    content: [{ type: 'text', text: JSON.stringify(value, null, 2) }],
    structuredContent: structured,
  };
}

/** The API's error body as a tool error; anything else becomes `internal`. */
export function toolError(error: unknown): CallToolResult {
  const body =
    error instanceof OrchestratorClientError
      ? { ...error.body, error: error.code, message: error.message, status: error.status }
      : { error: 'internal', message: error instanceof Error ? error.message : String(error) };
  return { isError: true, content: [{ type: 'text', text: JSON.stringify(body) }] };
}

// ---- held leases ------------------------------------------------------------------------

interface Hold {
  token: string;
  leaseMs: number;
  idleUntil: number;
  timer: NodeJS.Timeout | undefined;
}

/** The tasks this session claimed: heartbeated at a third of their lease while in use. */
class Holds {
  private readonly held = new Map<string, Hold>();

  constructor(
    private readonly client: OrchestratorClient,
    private readonly warn: (line: string) => void,
  ) {}

  get size(): number {
    return this.held.size;
  }

  add(taskId: string, token: string, leaseMs: number): void {
    this.drop(taskId);
    const hold: Hold = { token, leaseMs, idleUntil: Date.now() + HOLD_IDLE_MS, timer: undefined };
    this.held.set(taskId, hold);
    this.schedule(taskId, hold, leaseMs / 3);
  }

  /** A call about the task: keep its lease for another HOLD_IDLE_MS. */
  touch(taskId: string, token: string): void {
    const hold = this.held.get(taskId);
    if (hold && hold.token === token) hold.idleUntil = Date.now() + HOLD_IDLE_MS;
  }

  drop(taskId: string): void {
    const hold = this.held.get(taskId);
    if (hold) clearTimeout(hold.timer);
    this.held.delete(taskId);
  }

  private schedule(taskId: string, hold: Hold, ms: number): void {
    hold.timer = setTimeout(() => void this.beat(taskId, hold), Math.max(ms, 10));
  }

  private async beat(taskId: string, hold: Hold): Promise<void> {
    if (this.held.get(taskId) !== hold) return;
    if (Date.now() > hold.idleUntil) {
      this.warn(
        `task ${taskId}: no call about it for ${HOLD_IDLE_MS} ms; its lease is left to expire`,
      );
      this.drop(taskId);
      return;
    }
    try {
      await this.client.heartbeat(taskId, hold.token);
      if (this.held.get(taskId) === hold) this.schedule(taskId, hold, hold.leaseMs / 3);
    } catch (error) {
      if (
        error instanceof IllegalTransitionError ||
        error instanceof StaleTokenError ||
        error instanceof NotFoundError
      ) {
        // Cancelled or reclaimed: the agent's next call about it gets the same answer.
        this.drop(taskId);
        return;
      }
      this.warn(`task ${taskId}: heartbeat failed: ${(error as Error).message}`);
      if (this.held.get(taskId) === hold) this.schedule(taskId, hold, hold.leaseMs / 6);
    }
  }

  /** RELEASE every held task (the session is over); bounded by the client's own retries. */
  async releaseAll(reason: string): Promise<void> {
    const all = [...this.held.entries()];
    for (const [taskId] of all) this.drop(taskId);
    await Promise.all(
      all.map(([taskId, hold]) => this.client.release(taskId, hold.token, reason).catch(() => {})),
    );
  }
}

function leaseOf(task: ClaimedTask['task']): number {
  const lease = Date.parse(task.leaseExpiresAt ?? '') - Date.parse(task.updatedAt);
  return Number.isFinite(lease) && lease > 0 ? lease : DEFAULT_LEASE_MS;
}

// ---- the server -------------------------------------------------------------------------

export interface OrchestratorMcp {
  server: McpServer;
  /** Releases the tasks this session holds and stops heartbeating them. */
  shutdown(reason: string): Promise<void>;
}

export function createOrchestratorMcp(
  client: OrchestratorClient,
  o: { workerId: string; version: string; warn?: (line: string) => void },
): OrchestratorMcp {
  const warn = o.warn ?? ((line: string) => process.stderr.write(`[mcp] ${line}\n`));
  const holds = new Holds(client, warn);
  const server = new McpServer({ name: 'actor-orchestrator', version: o.version });

  // Arguments the SDK refuses never reach a handler: give those errors the contract's code too.
  const internals = server as unknown as { createToolError?: (message: string) => CallToolResult };
  if (typeof internals.createToolError === 'function') {
    internals.createToolError = (message: string) => {
      const code = /Input validation error/.test(message)
        ? 'validation_failed'
        : /Tool .* (not found|disabled)/.test(message)
          ? 'not_found'
          : 'internal';
      return toolError(new OrchestratorClientError(code, 0, message));
    };
  }

  const tool = <K extends keyof typeof TOOL_SCHEMAS>(
    name: K,
    run: (args: Args<K>) => Promise<unknown>,
  ) => {
    const inputSchema = TOOL_SCHEMAS[name] as z.ZodObject;
    server.registerTool(name, { description: DESCRIPTIONS[name], inputSchema }, (async (
      args: Args<K>,
    ) => {
      try {
        return ok(await run(args));
      } catch (error) {
        return toolError(error);
      }
    }) as never);
  };

  /** A worker event on a held task: the hold follows its outcome. */
  const settle = async (taskId: string, token: string, event: TaskEvent) => {
    holds.touch(taskId, token);
    try {
      const task = await client.sendTaskEvent(taskId, event);
      holds.drop(taskId);
      return task;
    } catch (error) {
      if (error instanceof IllegalTransitionError || error instanceof StaleTokenError) {
        holds.drop(taskId);
      }
      throw error;
    }
  };

  tool('claim_task', async (args) => {
    if (holds.size >= MAX_HELD) {
      throw new OrchestratorClientError(
        'conflict',
        409,
        `this session holds ${MAX_HELD} tasks; complete, fail or release one first`,
      );
    }
    const claimed = await client.claim({ ...args, workerId: args.workerId ?? o.workerId });
    if (!claimed) return { task: null, message: 'no claimable task right now' };
    const { task, token } = claimed;
    const started = await client.start(task.id, token);
    holds.add(task.id, token, leaseOf(task));
    return {
      task: { ...task, ...started, feedback: (task as { feedback?: unknown }).feedback },
      token,
    };
  });
  tool('heartbeat_task', async ({ taskId, token }) => {
    holds.touch(taskId, token);
    return client.heartbeat(taskId, token);
  });
  tool('log_task_output', async ({ taskId, token, chunks }) => {
    holds.touch(taskId, token);
    await client.appendOutput(taskId, token, chunks);
    return { accepted: chunks.length };
  });
  tool('complete_task', ({ taskId, token, result }) =>
    settle(taskId, token, {
      type: 'COMPLETE',
      token,
      ...(result === undefined ? {} : { result }),
    } as TaskEvent),
  );
  tool('fail_task', ({ taskId, token, error }) =>
    settle(taskId, token, { type: 'FAIL', token, error }),
  );
  tool('release_task', ({ taskId, token, reason }) =>
    settle(taskId, token, { type: 'RELEASE', token, ...(reason ? { reason } : {}) }),
  );
  tool('get_task', ({ taskId }) => client.getTask(taskId));
  tool('read_task_output', ({ taskId, after, limit }) =>
    client.readOutput(taskId, { after, limit }),
  );
  tool('create_ticket', async ({ start, ...body }) => {
    const ticket = await client.createTicket(body);
    return start ? client.sendTicketEvent(ticket.id, { type: 'START' }) : ticket;
  });
  tool('get_ticket', ({ ticketId }) => client.getTicket(ticketId));
  tool('list_tickets', (q) => client.listTickets(q));
  tool('send_ticket_event', ({ ticketId, event }) => client.sendTicketEvent(ticketId, event));
  tool('add_task', ({ ticketId, ...body }) => client.addTask(ticketId, body));
  tool('approve_gate', ({ ticketId, ...rest }) =>
    client.sendTicketEvent(ticketId, {
      type: 'APPROVE',
      by: o.workerId,
      ...rest,
    } as unknown as TicketEvent),
  );
  tool('reject_gate', ({ ticketId, ...rest }) =>
    client.sendTicketEvent(ticketId, {
      type: 'REJECT',
      by: o.workerId,
      ...rest,
    } as unknown as TicketEvent),
  );

  return { server, shutdown: (reason) => holds.releaseAll(reason) };
}

/** Serves MCP on stdin/stdout until stdin closes or a signal; then releases held tasks. */
export async function runMcpServer(argv: string[]): Promise<number> {
  if (argv[0] === '-h' || argv[0] === '--help') {
    process.stderr.write(
      'usage: orchestrator mcp   (MCP on stdio; env ORCHESTRATOR_URL, API_TOKEN, WORKER_ID)\n',
    );
    return 0;
  }
  if (argv.length > 0) {
    process.stderr.write(`orchestrator mcp: unexpected argument ${argv[0]}\n`);
    return 2;
  }
  const client = new OrchestratorClient({
    url: process.env.ORCHESTRATOR_URL || 'http://127.0.0.1:3000',
    token: process.env.API_TOKEN || undefined,
  });
  const workerId = process.env.WORKER_ID || `mcp-${hostname()}-${process.pid}`;
  const mcp = createOrchestratorMcp(client, { workerId, version: packageVersion() });
  const transport = new StdioServerTransport();
  await mcp.server.connect(transport);
  process.stderr.write(`[mcp] orchestrator MCP server for ${client.url} as ${workerId}\n`);

  const reason = await new Promise<string>((resolve) => {
    process.stdin.once('end', () => resolve('the MCP session ended'));
    process.stdin.once('close', () => resolve('the MCP session ended'));
    transport.onclose = () => resolve('the MCP session ended');
    process.once('SIGTERM', () => resolve('the MCP server was stopped'));
    process.once('SIGINT', () => resolve('the MCP server was stopped'));
  });
  await mcp.shutdown(reason);
  await mcp.server.close().catch(() => {});
  return 0;
}
