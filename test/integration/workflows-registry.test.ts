/**
 * The workflow registry over HTTP (CONTRACT section 5): versions, the same definition found
 * again, concurrent registrations from two pools, refusals naming the path, the read routes,
 * the compiled machine, and WORKFLOWS_DIR.
 */
import { mkdtemp, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { workflowCompiler } from '../../src/actors/workflow-compiler.js';
import { WorkflowRegistry } from '../../src/actors/workflow-registry.js';
import { createTestApp, type TestApp } from '../support/http-app.js';

const FEATURE = {
  name: 'feature',
  description: 'plan, approve, build, review',
  phases: [
    { name: 'plan', tasks: [{ key: 'spec', type: 'write_spec' }] },
    {
      name: 'plan_review',
      approval: { timeoutMs: 86_400_000, onTimeout: 'block' },
      onReject: { sendBackTo: 'plan', maxLoops: 3 },
    },
    {
      name: 'build',
      tasks: [
        { key: 'code', type: 'implement', worktree: '{{ticket.id}}' },
        { key: 'tests', type: 'run_tests', dependsOn: ['code'] },
      ],
      onFail: { sendBackTo: 'build', maxLoops: 2 },
    },
    {
      name: 'review',
      tasks: [{ key: 'review', type: 'code_review' }],
      onFail: { sendBackTo: 'build', maxLoops: 3 },
    },
  ],
};

let t: TestApp;

beforeAll(async () => {
  t = await createTestApp('workflows_registry');
  const registry = new WorkflowRegistry(t.db.sql, workflowCompiler());
  await registry.ensureBuiltIn();
  t.services.workflows = registry;
  t = { ...t, ...(await rebuild(t)) };
});
afterAll(async () => t?.close());

/** The app reads its services when built: build it again with the registry in. */
async function rebuild(base: TestApp): Promise<Pick<TestApp, 'app' | 'call'>> {
  const again = await createTestApp('unused', { db: base.db, services: base.services });
  return { app: again.app, call: again.call };
}

describe('POST /workflows', () => {
  it('a new name is version 1 (201); the same definition again is that version (200)', async () => {
    const first = await t.call('POST', '/workflows', FEATURE);
    expect(first.status).toBe(201);
    expect(first.body).toMatchObject({ name: 'feature', version: 1 });
    expect(first.body.phases).toHaveLength(4);
    expect(typeof first.body.createdAt).toBe('string');
    // Same definition, keys in another order: the canonical hash finds version 1.
    const reordered = { phases: FEATURE.phases, description: FEATURE.description, name: 'feature' };
    const again = await t.call('POST', '/workflows', reordered);
    expect(again.status).toBe(200);
    expect(again.body).toMatchObject({ name: 'feature', version: 1 });
    expect(again.body.createdAt).toBe(first.body.createdAt);
  });

  it('a different definition of the same name is the next version; old ones are kept', async () => {
    const changed = { ...FEATURE, description: 'changed' };
    const second = await t.call('POST', '/workflows', changed);
    expect(second.status).toBe(201);
    expect(second.body.version).toBe(2);
    const v1 = await t.call('GET', '/workflows/feature/versions/1');
    expect(v1.status).toBe(200);
    expect(v1.body.description).toBe(FEATURE.description);
    const latest = await t.call('GET', '/workflows/feature');
    expect(latest.body.version).toBe(2);
    expect(latest.body.versions.map((v: { version: number }) => v.version)).toEqual([1, 2]);
  });

  it('concurrent registrations from two pools: versions 1..N, none skipped or repeated', async () => {
    const pools = [t.db.pool(5), t.db.pool(5)];
    const registries = pools.map((p) => new WorkflowRegistry(p, workflowCompiler()));
    const defs = Array.from({ length: 12 }, (_, i) => ({
      name: 'racy',
      description: `d${i % 6}`, // six distinct definitions, each posted twice
      phases: [{ name: 'work' }],
    }));
    const results = await Promise.all(
      defs.map((d, i) => (registries[i % 2] as WorkflowRegistry).register(d)),
    );
    const created = results.filter((r) => r.created).map((r) => r.workflow.version);
    expect(created.sort((a, b) => a - b)).toEqual([1, 2, 3, 4, 5, 6]);
    // The two posts of one definition got the same version.
    const byDesc = new Map<string, Set<number>>();
    results.forEach((r, i) => {
      const key = (defs[i] as { description: string }).description;
      byDesc.set(key, (byDesc.get(key) ?? new Set()).add(r.workflow.version));
    });
    for (const versions of byDesc.values()) expect(versions.size).toBe(1);
    const rows = await t.db.sql<{ version: number }[]>`
      select version from workflows where name = 'racy' order by version`;
    expect(rows.map((r) => r.version)).toEqual([1, 2, 3, 4, 5, 6]);
  });

  it('refused definitions: 400 validation_failed naming the path; nothing stored', async () => {
    const cases: [unknown, string][] = [
      [{ name: 'bad', phases: [{ name: 'Plan' }] }, 'phases[0].name'],
      [{ name: 'bad', phases: [] }, 'phases'],
      [{ name: 'bad', phases: [{ name: 'done' }] }, 'phases[0].name'],
      [{ name: 'bad', phases: [{ name: 'a', extra: 1 }] }, 'phases[0]'],
      [{ name: 'Bad!', phases: [{ name: 'a' }] }, 'name'],
      [{ name: 'default', phases: [{ name: 'a' }] }, 'name'],
      [{ phases: [{ name: 'a' }] }, 'name'],
    ];
    for (const [body, path] of cases) {
      const res = await t.call('POST', '/workflows', body);
      expect(res.status, JSON.stringify(body)).toBe(400);
      expect(res.body.error).toBe('validation_failed');
      expect(JSON.stringify(res.body.issues)).toContain(path);
    }
    const stored = await t.db.sql`select 1 from workflows where name = 'bad'`;
    expect(stored).toHaveLength(0);
  });

  it('a body over 64 KiB is 413 and not stored', async () => {
    const big = { name: 'big', description: 'x'.repeat(70 * 1024), phases: [{ name: 'a' }] };
    const res = await t.call('POST', '/workflows', big);
    expect(res.status).toBe(413);
    expect(res.body.error).toBe('payload_too_large');
    expect(await t.db.sql`select 1 from workflows where name = 'big'`).toHaveLength(0);
  });
});

describe('reading workflows', () => {
  it('GET /workflows lists the latest of each name, default included', async () => {
    const res = await t.call('GET', '/workflows');
    expect(res.status).toBe(200);
    const byName = Object.fromEntries(
      res.body.workflows.map((w: { name: string; version: number }) => [w.name, w.version]),
    );
    expect(byName.default).toBe(1);
    expect(byName.feature).toBe(2);
  });

  it('unknown names and versions are 404', async () => {
    expect((await t.call('GET', '/workflows/nope')).status).toBe(404);
    expect((await t.call('GET', '/workflows/feature/versions/9')).status).toBe(404);
    expect((await t.call('GET', '/workflows/feature/versions/x')).status).toBe(404);
    expect((await t.call('GET', '/machines/workflow:feature@9')).status).toBe(404);
  });

  it('GET /machines/workflow:NAME@VERSION is the compiled machine as JSON', async () => {
    const res = await t.call('GET', '/machines/workflow:feature@1');
    expect(res.status).toBe(200);
    expect(res.body.id).toBe('ticket');
    expect(Object.keys(res.body.states)).toEqual(
      expect.arrayContaining(['backlog', 'plan', 'plan_review', 'build', 'review', 'done']),
    );
    // The built-in machine route is unchanged.
    expect((await t.call('GET', '/machines/ticket')).status).toBe(200);
  });
});

describe('WORKFLOWS_DIR', () => {
  it('registers every *.json; a bad file stops with one line naming the file and the path', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'wf-'));
    await writeFile(join(dir, 'a.json'), JSON.stringify({ ...FEATURE, name: 'from_dir' }));
    await writeFile(join(dir, 'notes.txt'), 'ignored');
    const registry = new WorkflowRegistry(t.db.sql, workflowCompiler());
    const done = await registry.registerDir(dir);
    expect(done.map((w) => `${w.name}@${w.version}`)).toEqual(['from_dir@1']);
    await writeFile(
      join(dir, 'b.json'),
      JSON.stringify({
        name: 'broken',
        phases: [{ name: 'a', onFail: { sendBackTo: 'A', maxLoops: 1 } }],
      }),
    );
    const error = await registry.registerDir(dir).catch((e: Error) => e);
    expect(error).toBeInstanceOf(Error);
    expect((error as Error).message).toContain('b.json');
    expect((error as Error).message).toContain('phases[0].onFail.sendBackTo');
    expect((error as Error).message.split('\n')).toHaveLength(1);
    await writeFile(join(dir, 'b.json'), '{not json');
    expect(((await registry.registerDir(dir).catch((e: Error) => e)) as Error).message).toContain(
      'b.json',
    );
  });
});
