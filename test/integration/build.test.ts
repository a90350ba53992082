/**
 * The compiled build, in a copy of the package (so the checkout's own dist/ is left alone
 * while other files spawn bin/orchestrator): `npm run build`'s script makes dist/ with the
 * files the code reads at run time; plain Node imports the SDK from it by the package's
 * name; bin/orchestrator runs it while it is fresh and the
 * sources once a source file is newer or ORCHESTRATOR_FROM_SOURCE=1; the built `worker`
 * migrates a new database and serves its probes.
 */
import { execFileSync } from 'node:child_process';
import { cpSync, existsSync, readdirSync, statSync, symlinkSync, utimesSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createTestDatabase, type TestDatabase } from '../support/database.js';
import { spawnIn } from '../support/orchestrator-process.js';
import { tempDir } from '../support/temp-dir.js';
import { NATS_URL, natsAdmin, testNames } from '../support/transport.js';

const ROOT = new URL('../..', import.meta.url).pathname;
const copy = tempDir('orch-build-');
const names = testNames();
let db: TestDatabase;

beforeAll(() => {
  for (const part of [
    'src',
    'bin',
    'scripts/build.mjs',
    'package.json',
    'tsconfig.json',
    'tsconfig.build.json',
  ]) {
    cpSync(join(ROOT, part), join(copy, part), { recursive: true });
  }
  symlinkSync(join(ROOT, 'node_modules'), join(copy, 'node_modules'));
});
afterAll(async () => {
  await db?.drop();
  const admin = await natsAdmin();
  await admin.close([names]);
});

const version = (env: Record<string, string> = {}) =>
  execFileSync(process.execPath, [join(copy, 'bin/orchestrator'), '--version'], {
    env: { PATH: process.env.PATH ?? '', ...env },
    encoding: 'utf8',
  }).trim();

describe('the build', () => {
  it('runs the sources until built, the build while fresh, the sources again after an edit', () => {
    expect(version()).toMatch(/^actor-orchestrator \d+\.\d+\.\d+ \(source\)$/);

    const out = execFileSync(process.execPath, [join(copy, 'scripts/build.mjs')], {
      encoding: 'utf8',
    });
    const sql = readdirSync(join(ROOT, 'src/persistence/migrations'));
    expect(out).toContain('built dist/');
    expect(existsSync(join(copy, 'dist/main.js'))).toBe(true);
    expect(readdirSync(join(copy, 'dist/persistence/migrations')).sort()).toEqual(sql.sort());
    for (const asset of ['index.html', 'dashboard.js', 'dashboard.css']) {
      expect(existsSync(join(copy, 'dist/http/dashboard', asset)), asset).toBe(true);
    }
    expect(
      readdirSync(join(copy, 'dist'), { recursive: true }).some((f) => String(f).endsWith('.ts')),
    ).toBe(false);
    expect(version()).toMatch(/\(build\)$/);
    expect(version({ ORCHESTRATOR_FROM_SOURCE: '1' })).toMatch(/\(source\)$/);
    // Plain Node, no TypeScript loader: the SDK by its package name comes from the build.
    const sdk = execFileSync(
      process.execPath,
      [
        '--input-type=module',
        '-e',
        "const m = await import('actor-orchestrator/client'); console.log(typeof m.OrchestratorClient, import.meta.resolve('actor-orchestrator/client'))",
      ],
      { cwd: copy, encoding: 'utf8' },
    ).trim();
    expect(sdk).toBe(`function file://${join(copy, 'dist/client/index.js')}`);

    // An edit after the build: the build is stale, and is not run.
    const edited = join(copy, 'src/machines/task.ts');
    const before = statSync(edited).mtime;
    const later = new Date(Date.now() + 60_000);
    utimesSync(edited, later, later);
    expect(version()).toMatch(/\(source\)$/);
    utimesSync(edited, before, before);
    expect(version()).toMatch(/\(build\)$/);
  }, 60_000);

  it('a built worker migrates a new database and answers its probes', async () => {
    db = await createTestDatabase('build');
    const worker = spawnIn(copy, ['worker'], {
      DATABASE_URL: db.url,
      NATS_URL,
      NATS_PREFIX: names.prefix,
      NATS_STREAM: names.stream,
      LOG_LEVEL: 'warn',
      OPS_PORT: '0',
    });
    try {
      const ops = await worker.opsUrl();
      expect(worker.out()).toContain('code=build');
      const ready = await fetch(`${ops}/readyz`);
      expect(await ready.json()).toEqual({
        ready: true,
        postgres: true,
        nats: true,
        migrations: true,
      });
      worker.child.kill('SIGTERM');
      expect(await worker.exited).toBe(0);
    } finally {
      worker.child.kill('SIGKILL');
    }
  }, 60_000);
});
