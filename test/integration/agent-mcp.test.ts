/**
 * `bin/orchestrator mcp` driven by the official SDK's client over stdio, against a real
 * `api` runtime: tools listed with the API's schemas; claim → log → complete, the lease
 * kept alive meanwhile; the API's errors as tool errors with their codes (stale_token,
 * illegal_transition, validation_failed); tasks still held when the session ends RELEASEd;
 * nothing but protocol on stdout.
 */
import { Client } from '@modelcontextprotocol/sdk/client/index.js';
import { StdioClientTransport } from '@modelcontextprotocol/sdk/client/stdio.js';
import type { CallToolResult } from '@modelcontextprotocol/sdk/types.js';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { OrchestratorClient } from '../../src/client/index.js';
import { type ApiRuntime, startApi } from '../support/api-runtime.js';
import { waitUntil } from '../support/orchestrator-process.js';

const BIN = new URL('../../bin/orchestrator', import.meta.url).pathname;
const LEASE_MS = 3_000;
let api: ApiRuntime;
let api2: ApiRuntime;
let client: OrchestratorClient;
const sessions: Client[] = [];
const protocolErrors: Error[] = [];

beforeAll(async () => {
  api = await startApi('agent_mcp', { LEASE_MS: String(LEASE_MS), CLAIM_MAX_WAIT_MS: '1000' });
  client = new OrchestratorClient({ url: api.url });
}, 60_000);
afterEach(async () => {
  for (const s of sessions.splice(0)) await s.close().catch(() => {});
  expect(protocolErrors).toEqual([]);
});
afterAll(async () => {
  await api?.stop();
  await api2?.stop();
});

async function session(env: Record<string, string> = {}): Promise<Client> {
  const transport = new StdioClientTransport({
    command: process.execPath,
    args: [BIN, 'mcp'],
    env: {
      PATH: process.env.PATH ?? '',
      HOME: process.env.HOME ?? '/tmp',
      ORCHESTRATOR_URL: api.url,
      WORKER_ID: 'mcp-test',
      ...env,
    },
    stderr: 'pipe',
  });
  const c = new Client({ name: 'orchestrator-test', version: '0.0.0' });
  // A line on stdout that is not JSON-RPC shows up here.
  c.onerror = (error) => protocolErrors.push(error);
  await c.connect(transport);
  sessions.push(c);
  return c;
}

async function call(c: Client, name: string, args: Record<string, unknown>) {
  const res = (await c.callTool({ name, arguments: args })) as CallToolResult;
  const first = res.content[0];
  const text = first?.type === 'text' ? first.text : '';
  return { isError: res.isError === true, body: JSON.parse(text) as Record<string, unknown> };
}

async function taskOf(type: string) {
  const ticket = await client.createTicket({ title: type });
  await client.sendTicketEvent(ticket.id, { type: 'START' });
  return client.addTask(ticket.id, { type });
}

describe('bin/orchestrator mcp', () => {
  it('lists its tools with the API schemas as input schemas', async () => {
    const c = await session();
    const { tools } = await c.listTools();
    const byName = new Map(tools.map((t) => [t.name, t]));
    expect([...byName.keys()].sort()).toEqual(
      [
        'add_task',
        'approve_gate',
        'claim_task',
        'complete_task',
        'create_ticket',
        'fail_task',
        'get_task',
        'get_ticket',
        'heartbeat_task',
        'list_tickets',
        'log_task_output',
        'read_task_output',
        'reject_gate',
        'release_task',
        'send_ticket_event',
      ].sort(),
    );
    const complete = byName.get('complete_task')!.inputSchema;
    expect(Object.keys(complete.properties ?? {}).sort()).toEqual(['result', 'taskId', 'token']);
    expect(complete.required?.sort()).toEqual(['taskId', 'token']);
    const claim = byName.get('claim_task')!.inputSchema;
    expect(Object.keys(claim.properties ?? {}).sort()).toEqual(['types', 'waitMs', 'workerId']);
    const output = byName.get('log_task_output')!.inputSchema as unknown as {
      properties: { chunks: { items: { properties: { stream: { enum: string[] } } } } };
    };
    expect(output.properties.chunks.items.properties.stream.enum).toEqual([
      'stdout',
      'stderr',
      'log',
    ]);
  });

  it('claim → log → complete; the lease is kept alive while the agent thinks', async () => {
    const task = await taskOf('mcp_work');
    const c = await session();
    const claimed = await call(c, 'claim_task', { types: ['mcp_work'], waitMs: 1_000 });
    expect(claimed.isError).toBe(false);
    const t = claimed.body.task as { id: string; state: string; attempt: number; workerId: string };
    const token = claimed.body.token as string;
    expect(t).toMatchObject({ id: task.id, state: 'running', attempt: 1, workerId: 'mcp-test' });
    const logged = await call(c, 'log_task_output', {
      taskId: task.id,
      token,
      chunks: [{ stream: 'log', text: 'thinking about it\n' }],
    });
    expect(logged).toEqual({ isError: false, body: { accepted: 1 } });
    // Longer than a lease with no call from the agent: the server heartbeats it meanwhile.
    await new Promise((r) => setTimeout(r, LEASE_MS + 500));
    expect(await client.getTask(task.id)).toMatchObject({ state: 'running', attempt: 1 });
    const done = await call(c, 'complete_task', { taskId: task.id, token, result: { ok: 1 } });
    expect(done.isError).toBe(false);
    expect(done.body).toMatchObject({ id: task.id, state: 'completed', result: { ok: 1 } });
    const out = await client.readOutput(task.id);
    expect(out.chunks.map((ch) => [ch.stream, ch.text])).toEqual([['log', 'thinking about it\n']]);
    // Nothing to claim: an answer, not an error.
    const none = await call(c, 'claim_task', { types: ['mcp_work'], waitMs: 0 });
    expect(none).toMatchObject({ isError: false, body: { task: null } });
  });

  it('errors are tool errors with the contract codes: stale_token, illegal_transition, validation_failed, not_found', async () => {
    const task = await taskOf('mcp_errors');
    const c = await session();
    const claimed = await call(c, 'claim_task', { types: ['mcp_errors'], waitMs: 1_000 });
    const token = claimed.body.token as string;

    const stale = await call(c, 'heartbeat_task', { taskId: task.id, token: 'not-the-token' });
    expect(stale.isError).toBe(true);
    expect(stale.body).toMatchObject({ error: 'stale_token', status: 409, attempt: 1 });

    const invalid = await call(c, 'complete_task', { taskId: task.id });
    expect(invalid.isError).toBe(true);
    expect(invalid.body).toMatchObject({ error: 'validation_failed' });
    expect(String(invalid.body.message)).toMatch(/token/);

    const missing = await call(c, 'get_task', { taskId: 'tsk_nope' });
    expect(missing).toMatchObject({ isError: true, body: { error: 'not_found', status: 404 } });

    await client.cancelTask(task.id, 'not needed');
    const cancelled = await call(c, 'log_task_output', {
      taskId: task.id,
      token,
      chunks: [{ stream: 'log', text: 'still here?\n' }],
    });
    expect(cancelled.isError).toBe(true);
    expect(cancelled.body).toMatchObject({ error: 'illegal_transition', state: 'cancelled' });

    // Gates: sent as ticket events; a ticket with no gate refuses them, as a tool error.
    const ticket = await call(c, 'create_ticket', { title: 'gated', start: true });
    expect(ticket.body).toMatchObject({ state: 'requirements' });
    const approve = await call(c, 'approve_gate', { ticketId: ticket.body.id, comment: 'ok' });
    expect(approve.isError).toBe(true);
    expect(['validation_failed', 'illegal_transition']).toContain(approve.body.error);
    const reject = await call(c, 'reject_gate', { ticketId: ticket.body.id, reason: 'no' });
    expect(reject.isError).toBe(true);
    expect(['validation_failed', 'illegal_transition']).toContain(reject.body.error);
  });

  it('tickets and tasks: create, add a task, read them back', async () => {
    const c = await session();
    const created = await call(c, 'create_ticket', { title: 'from MCP', description: 'd' });
    expect(created.body).toMatchObject({ title: 'from MCP', state: 'backlog' });
    const id = created.body.id as string;
    expect(
      (await call(c, 'send_ticket_event', { ticketId: id, event: { type: 'START' } })).body,
    ).toMatchObject({ state: 'requirements' });
    const added = await call(c, 'add_task', { ticketId: id, type: 'mcp_spec', payload: { p: 1 } });
    expect(added.body).toMatchObject({ ticketId: id, type: 'mcp_spec', state: 'pending' });
    const read = await call(c, 'get_ticket', { ticketId: id });
    expect((read.body.tasks as { id: string }[]).map((t) => t.id)).toEqual([added.body.id]);
    const listed = await call(c, 'list_tickets', { state: 'requirements' });
    expect((listed.body.items as { id: string }[]).some((t) => t.id === id)).toBe(true);
    // The server's own checks apply: a shell task needs payload.command.
    const bad = await call(c, 'add_task', { ticketId: id, type: 'x', executor: 'shell' });
    expect(bad).toMatchObject({ isError: true, body: { error: 'validation_failed' } });
  });

  it('a task still held when the session ends is RELEASEd', async () => {
    const task = await taskOf('mcp_release');
    const c = await session();
    const claimed = await call(c, 'claim_task', { types: ['mcp_release'], waitMs: 1_000 });
    expect(claimed.isError).toBe(false);
    expect((await client.getTask(task.id)).state).toBe('running');
    await c.close();
    await waitUntil(
      async () => (await client.getTask(task.id)).state === 'pending',
      5_000,
      'the task to be released',
    );
    expect(await client.getTask(task.id)).toMatchObject({ attempt: 1, attemptsUsed: 0 });
  });

  it('sends API_TOKEN: unauthorized without it', async () => {
    api2 = await startApi('agent_mcp_auth', { API_TOKEN: 'sesame' });
    const denied = await session({ ORCHESTRATOR_URL: api2.url });
    const no = await call(denied, 'list_tickets', {});
    expect(no).toMatchObject({ isError: true, body: { error: 'unauthorized', status: 401 } });
    const allowed = await session({ ORCHESTRATOR_URL: api2.url, API_TOKEN: 'sesame' });
    expect((await call(allowed, 'list_tickets', {})).isError).toBe(false);
  });
});
