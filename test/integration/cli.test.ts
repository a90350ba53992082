/**
 * `bin/orchestrator` as a user runs it: prints its URL, serves, exits 0 on SIGTERM; refuses
 * bad configuration with one line per problem; names the URL of a service it cannot reach
 * instead of hanging.
 */
import type { ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { transportNames } from '../../src/transport/subjects.js';
import { createTestDatabase, type TestDatabase } from '../support/database.js';
import { startOrchestrator } from '../support/orchestrator-process.js';
import { natsAdmin } from '../support/transport.js';

let db: TestDatabase;
const suffix = randomBytes(3).toString('hex').toUpperCase();

beforeAll(async () => {
  db = await createTestDatabase('cli');
});
afterAll(async () => {
  await db.drop();
  const admin = await natsAdmin();
  await admin.close([transportNames(`cli${suffix}`, `CLI_${suffix}`)]);
});

function run(args: string[], env: Record<string, string>) {
  const p = startOrchestrator(args, env);
  return { child: p.child, exited: p.exited, out: p.out, err: p.err };
}

const baseEnv = () => ({
  DATABASE_URL: db.url,
  PORT: '0',
  NATS_PREFIX: `cli${suffix}`,
  NATS_STREAM: `CLI_${suffix}`,
  LOG_LEVEL: 'warn',
});

describe('bin/orchestrator', () => {
  let proc: { child: ChildProcess; exited: Promise<number | null> } | null = null;
  afterAll(() => {
    proc?.child.kill('SIGKILL');
  });

  it('serves, reports ready, and exits 0 on SIGTERM', async () => {
    const p = startOrchestrator(['api'], baseEnv());
    proc = p;
    const url = await p.url(20_000);
    expect(p.out()).toMatch(/role=api/);
    const ready = await fetch(`${url}/readyz`);
    expect(ready.status).toBe(200);
    const created = await fetch(`${url}/tickets`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ title: 'from the cli test' }),
    });
    expect(created.status).toBe(201);
    p.child.kill('SIGTERM');
    expect(await p.exited).toBe(0);
  });

  it('refuses bad configuration with one line per problem', async () => {
    const p = run(['all'], { ...baseEnv(), PORT: 'eighty', LOG_LEVEL: 'loud', LEASE_MS: '-5' });
    expect(await p.exited).toBe(2);
    const lines = p.err().trim().split('\n');
    expect(lines[0]).toMatch(/invalid configuration/);
    expect(p.err()).toMatch(/PORT="eighty"/);
    expect(p.err()).toMatch(/LOG_LEVEL="loud"/);
    expect(p.err()).toMatch(/LEASE_MS="-5"/);
  });

  it('refuses an unknown role', async () => {
    const p = run(['scheduler'], baseEnv());
    expect(await p.exited).toBe(2);
    expect(p.err()).toMatch(/unknown role "scheduler"/);
  });

  it('names an unreachable NATS instead of hanging', async () => {
    const p = run(['worker'], { ...baseEnv(), NATS_URL: 'nats://127.0.0.1:1' });
    expect(await p.exited).toBe(1);
    expect(p.err()).toMatch(/nats:\/\/127\.0\.0\.1:1/);
  });
});
