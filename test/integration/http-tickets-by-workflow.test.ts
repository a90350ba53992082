/** `GET /tickets?workflow=`: a name matches each of its versions, a ref only itself. */
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
  const db = await createTestDatabase('tickets_by_workflow');
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

const ids = (body: { items: { id: string }[] }) => body.items.map((i) => i.id).sort();

describe('GET /tickets?workflow=', () => {
  it('lists only the tickets of a workflow, by name or by version', async () => {
    await t.call('POST', '/workflows', { name: 'a_b', phases: [{ name: 'one' }] });
    const a1 = (await t.call('POST', '/tickets', { title: '1', workflow: 'a_b' })).body.id;
    await t.call('POST', '/workflows', { name: 'a_b', phases: [{ name: 'two' }] });
    const a2 = (await t.call('POST', '/tickets', { title: '2', workflow: 'a_b' })).body.id;
    // `_` is not a wildcard: a name that LIKE would match is another workflow.
    await t.call('POST', '/workflows', { name: 'axb', phases: [{ name: 'one' }] });
    const other = (await t.call('POST', '/tickets', { title: '3', workflow: 'axb' })).body.id;
    const plain = (await t.call('POST', '/tickets', { title: '4' })).body.id;

    expect(ids((await t.call('GET', '/tickets?workflow=a_b')).body)).toEqual([a1, a2].sort());
    expect(ids((await t.call('GET', '/tickets?workflow=a_b@2')).body)).toEqual([a2]);
    expect(ids((await t.call('GET', '/tickets?workflow=axb')).body)).toEqual([other]);
    expect(ids((await t.call('GET', '/tickets?workflow=default')).body)).toEqual([plain]);
    expect(ids((await t.call('GET', '/tickets?workflow=nothing')).body)).toEqual([]);
    // With a state: both filters apply.
    await t.call('POST', `/tickets/${a1}/events`, { type: 'START' });
    const started = await t.call('GET', '/tickets?workflow=a_b&state=backlog');
    expect(ids(started.body)).toEqual([a2]);
  });

  it('refuses a malformed workflow filter', async () => {
    for (const bad of ['A', 'a@0', 'a@', '@1', "a'--", 'a@1@2']) {
      const r = await t.call('GET', `/tickets?workflow=${encodeURIComponent(bad)}`);
      expect(r.status, bad).toBe(400);
      expect(r.body.error).toBe('validation_failed');
    }
  });
});
