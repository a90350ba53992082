/** Tickets that run a registered workflow: chosen at creation, kept to the end, bad input refused. */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Commands } from '../../src/actors/commands.js';
import { ActorHost } from '../../src/actors/host.js';
import { workflowCompiler } from '../../src/actors/workflow-compiler.js';
import { WorkflowRegistry } from '../../src/actors/workflow-registry.js';
import { createTestDatabase } from '../support/database.js';
import { TASK_DEFAULTS } from '../support/fixtures.js';
import { createTestApp, type TestApp } from '../support/http-app.js';

let t: TestApp;

beforeAll(async () => {
  const db = await createTestDatabase('workflows_tickets');
  const registry = new WorkflowRegistry(db.sql, workflowCompiler());
  await registry.ensureBuiltIn();
  const host = new ActorHost(db.sql, { taskDefaults: TASK_DEFAULTS, workflows: registry });
  const commands = new Commands(host, { stuckAfterMs: 3_600_000, diagnosticCooldownMs: 3_600_000 });
  t = await createTestApp('unused', { db, services: { host, commands, workflows: registry } });
});
afterAll(async () => {
  await t?.close();
  await t?.db.drop();
});

const GATED = {
  name: 'gated',
  phases: [
    { name: 'plan' },
    { name: 'gate', approval: {}, onReject: { sendBackTo: 'plan', maxLoops: 1 } },
    { name: 'ship' },
  ],
};

describe('tickets of a workflow', () => {
  it('runs the version it was created with after a new version is registered', async () => {
    expect((await t.call('POST', '/workflows', GATED)).body.version).toBe(1);
    const ticket = (await t.call('POST', '/tickets', { title: 'a', workflow: 'gated' })).body;
    expect(ticket.state).toBe('backlog');
    const v2 = await t.call('POST', '/workflows', { ...GATED, phases: [{ name: 'only' }] });
    expect(v2.body.version).toBe(2);
    const started = await t.call('POST', `/tickets/${ticket.id}/events`, { type: 'START' });
    expect(started.status).toBe(200);
    expect(started.body.state).toBe('plan');
    const row = await t.db.sql<{ workflow: string }[]>`
      select workflow from tickets where id = ${ticket.id}`;
    expect(row[0]?.workflow).toBe('gated@1');
    // A task of a phase the workflow has; APPROVE on a work phase is illegal.
    const task = await t.call('POST', `/tickets/${ticket.id}/tasks`, { type: 'x', phase: 'plan' });
    expect(task.status).toBe(201);
    const approve = await t.call('POST', `/tickets/${ticket.id}/events`, {
      type: 'APPROVE',
      by: 'ann',
    });
    expect(approve.status).toBe(409);
    expect(approve.body.error).toBe('illegal_transition');
  });

  it('reads a ticket of another workflow with the events its own machine allows', async () => {
    const ticket = (await t.call('POST', '/tickets', { title: 'r', workflow: 'gated@1' })).body;
    expect(ticket.workflow).toBe('gated@1');
    await t.call('POST', `/tickets/${ticket.id}/events`, { type: 'START' });
    const read = await t.call('GET', `/tickets/${ticket.id}`);
    expect(read.status).toBe(200);
    expect(read.body.state).toBe('plan');
    expect(read.body.workflow).toBe('gated@1');
    expect(read.body.allowedEvents).toEqual(['ADVANCE', 'BLOCK', 'CANCEL']);
    const list = await t.call('GET', '/tickets?state=plan');
    expect(list.status).toBe(200);
    const listed = list.body.items.find((i: { id: string }) => i.id === ticket.id);
    expect(listed.workflow).toBe('gated@1');
    const plain = (await t.call('POST', '/tickets', { title: 'd' })).body;
    expect(plain.workflow).toBe('default@1');
    expect((await t.call('GET', `/tickets/${plain.id}`)).body.workflow).toBe('default@1');
  });

  it('bad input: unknown workflow, a phase not in the workflow, a malformed APPROVE', async () => {
    const unknown = await t.call('POST', '/tickets', { title: 'a', workflow: 'nope@3' });
    expect(unknown.status).toBe(400);
    expect(JSON.stringify(unknown.body.issues)).toContain('workflow');
    const ticket = (await t.call('POST', '/tickets', { title: 'b', workflow: 'gated@1' })).body;
    const bad = await t.call('POST', `/tickets/${ticket.id}/tasks`, {
      type: 'x',
      phase: 'requirements',
    });
    expect(bad.status).toBe(400);
    expect(bad.body.issues[0].path).toBe('phase');
    const noBy = await t.call('POST', `/tickets/${ticket.id}/events`, { type: 'APPROVE' });
    expect(noBy.status).toBe(400);
  });
});
