/**
 * The settings a process refuses to start with: an API without a token reachable from the
 * network, an API without a token in a process that runs shell tasks, and shell tasks as
 * root without SHELL_ALLOW_ROOT. The rule is pure (table below); `bin/orchestrator` applies
 * it before it opens anything, with one line per reason and exit code 2.
 */
import { randomBytes } from 'node:crypto';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { configWith } from '../../src/config.js';
import type { Role } from '../../src/runtime.js';
import { isLoopback, startupRefusals, startupWarnings } from '../../src/security.js';
import { transportNames } from '../../src/transport/subjects.js';
import { createTestDatabase, type TestDatabase } from '../support/database.js';
import {
  type OrchestratorProcess,
  startOrchestrator,
  waitUntil,
} from '../support/orchestrator-process.js';
import { natsAdmin } from '../support/transport.js';

describe('isLoopback', () => {
  it.each([
    'localhost',
    'LOCALHOST',
    'localhost.',
    '127.0.0.1',
    '127.9.8.7',
    '127.1',
    '::1',
    '[::1]',
    '0:0:0:0:0:0:0:1',
    '::ffff:127.0.0.1',
  ])('%s is loopback', (host) => {
    expect(isLoopback(host)).toBe(true);
  });

  it.each([
    '0.0.0.0',
    '::',
    '',
    '10.0.0.1',
    '128.0.0.1',
    '127.0.0.1.example.com',
    'localhost.example.com',
    'myhost',
    '::2',
    '::ffff:10.0.0.1',
    '127.0.0.256',
  ])('%j is not', (host) => {
    expect(isLoopback(host)).toBe(false);
  });
});

describe('startupRefusals', () => {
  const refusals = (env: Record<string, string>, role: Role, uid: number | undefined = 1000) =>
    startupRefusals(configWith(env), role, uid);
  const SHELL = { ENABLE_SHELL_EXECUTOR: '1' };
  const OPEN = { HOST: '0.0.0.0' };
  const TOKEN = { API_TOKEN: 'secret' };

  it('the defaults start: loopback, no shell, not root', () => {
    for (const role of ['all', 'api', 'worker'] as const) {
      expect(refusals({}, role)).toEqual([]);
      expect(refusals({}, role, 0)).toEqual([]);
      expect(refusals({}, role, undefined)).toEqual([]);
    }
  });

  it('an HTTP role on a non-loopback HOST needs API_TOKEN; a worker serves nothing', () => {
    for (const role of ['all', 'api'] as const) {
      const [line, ...more] = refusals(OPEN, role);
      expect(more).toEqual([]);
      expect(line).toMatch(/^HOST=0\.0\.0\.0 is not a loopback address and API_TOKEN is unset/);
      expect(line).toMatch(/set API_TOKEN, or HOST=127\.0\.0\.1$/);
      expect(refusals({ ...OPEN, ...TOKEN }, role)).toEqual([]);
      expect(refusals({ HOST: 'localhost' }, role)).toEqual([]);
    }
    expect(refusals(OPEN, 'worker')).toEqual([]);
  });

  it('a process that serves HTTP and runs shell tasks needs API_TOKEN even on loopback', () => {
    const [line, ...more] = refusals(SHELL, 'all');
    expect(more).toEqual([]);
    expect(line).toMatch(/ENABLE_SHELL_EXECUTOR=1 and API_TOKEN is unset/);
    expect(line).toMatch(/set API_TOKEN/);
    expect(refusals({ ...SHELL, ...TOKEN }, 'all')).toEqual([]);
    expect(refusals({ ...SHELL, ...OPEN }, 'all')).toHaveLength(1);
    // An api process runs no tasks, whatever its flag says; a worker serves no HTTP.
    expect(refusals(SHELL, 'api')).toEqual([]);
    expect(refusals(SHELL, 'worker')).toEqual([]);
  });

  it('shell tasks as root need SHELL_ALLOW_ROOT, in the roles that run them', () => {
    for (const role of ['all', 'worker'] as const) {
      const lines = refusals({ ...SHELL, ...TOKEN }, role, 0);
      expect(lines).toEqual([expect.stringMatching(/as root \(uid 0\).*SHELL_ALLOW_ROOT=1/)]);
      expect(refusals({ ...SHELL, ...TOKEN, SHELL_ALLOW_ROOT: '1' }, role, 0)).toEqual([]);
    }
    expect(refusals(SHELL, 'api', 0)).toEqual([]);
    expect(refusals({ ...SHELL, ...OPEN }, 'all', 0)).toHaveLength(2);
  });

  it('warns a shell worker without a token that its API must require one, and about secrets passed through', () => {
    expect(startupWarnings(configWith(SHELL), 'worker')).toEqual([
      expect.stringMatching(/runs shell tasks created through the API.*it must require API_TOKEN$/),
    ]);
    expect(startupWarnings(configWith({ ...SHELL, ...TOKEN }), 'worker')).toEqual([]);
    expect(startupWarnings(configWith(SHELL), 'all')).toEqual([]);
    const passing = configWith({ ...SHELL, ...TOKEN, SHELL_ENV_PASSTHROUGH: 'LC_ALL,API_TOKEN' });
    expect(startupWarnings(passing, 'all')).toEqual([
      expect.stringMatching(/^SHELL_ENV_PASSTHROUGH gives shell tasks API_TOKEN:/),
    ]);
  });
});

describe('bin/orchestrator refuses to start', () => {
  let db: TestDatabase;
  const suffix = randomBytes(3).toString('hex').toUpperCase();
  const started: OrchestratorProcess[] = [];
  beforeAll(async () => {
    db = await createTestDatabase('startup_security');
  });
  afterAll(async () => {
    for (const p of started) p.child.kill('SIGKILL');
    await db.drop();
    const admin = await natsAdmin();
    await admin.close([transportNames(`sec${suffix}`, `SEC_${suffix}`)]);
  });

  /** Everything a process needs to start for real, so that only the refusal can stop it. */
  const env = (more: Record<string, string>) => ({
    DATABASE_URL: db.url,
    PORT: '0',
    NATS_PREFIX: `sec${suffix}`,
    NATS_STREAM: `SEC_${suffix}`,
    LOG_LEVEL: 'warn',
    ...more,
  });

  /** The exit code, or `started` if it started (and was then stopped). */
  async function outcome(p: OrchestratorProcess): Promise<number | null | 'started'> {
    started.push(p);
    await waitUntil(
      () => p.child.exitCode !== null || /orchestrator (listening|worker running)/.test(p.out()),
      30_000,
      'the orchestrator to start or exit',
    );
    if (p.child.exitCode !== null) return p.exited;
    p.child.kill('SIGKILL');
    return 'started';
  }

  it('an all process with the shell executor on every interface and no token', async () => {
    const p = startOrchestrator(['all'], env({ HOST: '0.0.0.0', ENABLE_SHELL_EXECUTOR: '1' }));
    expect(await outcome(p)).toBe(2);
    const lines = p.err().trim().split('\n');
    expect(lines[0]).toMatch(/^refusing to start: HOST=0\.0\.0\.0 is not a loopback address/);
    expect(lines[0]).toMatch(/set API_TOKEN/);
    if (process.getuid?.() === 0) expect(lines[1]).toMatch(/SHELL_ALLOW_ROOT=1/);
    expect(lines).toHaveLength(process.getuid?.() === 0 ? 2 : 1);
    expect(p.out()).toBe('');
  });

  it.runIf(process.getuid?.() === 0)(
    'a shell worker as root without SHELL_ALLOW_ROOT',
    async () => {
      const p = startOrchestrator(['worker'], env({ ENABLE_SHELL_EXECUTOR: '1' }));
      expect(await outcome(p)).toBe(2);
      expect(p.err().trim()).toMatch(
        /^refusing to start: ENABLE_SHELL_EXECUTOR=1 as root \(uid 0\)/,
      );
    },
  );

  it('starts once the token (and, as root, the opt-in) are set, and requires the token', async () => {
    const token = randomBytes(8).toString('hex');
    const p = startOrchestrator(
      ['all'],
      env({
        ENABLE_SHELL_EXECUTOR: '1',
        API_TOKEN: token,
        ...(process.getuid?.() === 0 ? { SHELL_ALLOW_ROOT: '1' } : {}),
      }),
    );
    started.push(p);
    const url = await p.url(30_000);
    expect((await fetch(`${url}/tickets`)).status).toBe(401);
    const ok = await fetch(`${url}/tickets`, { headers: { authorization: `Bearer ${token}` } });
    expect(ok.status).toBe(200);
    p.child.kill('SIGTERM');
    expect(await p.exited).toBe(0);
  });
});
