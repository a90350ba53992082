/**
 * OPS_PORT: a `worker` process, which has no API, serves the probes and its own metrics;
 * `/metrics` asks for the API token, the probes do not; nothing else is served there; an
 * `all` process serves both listeners; a port already taken or equal to PORT stops the
 * process with a message naming the variable; SIGTERM closes the listener and exits 0.
 */
import { createServer, type Server } from 'node:net';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { loadConfig, roleConfigProblems } from '../../src/config.js';
import { createTestDatabase, type TestDatabase } from '../support/database.js';
import { type OrchestratorProcess, startOrchestrator } from '../support/orchestrator-process.js';
import { NATS_URL, natsAdmin, testNames } from '../support/transport.js';
import { type TestProcess, testProcess, until } from '../support/worker-process.js';

const names = testNames();
const TOKEN = 'ops-port-test-token';
const started: OrchestratorProcess[] = [];
let db: TestDatabase;
let p: TestProcess;

beforeAll(async () => {
  db = await createTestDatabase('ops_port');
  p = testProcess(db.pool(4));
});
afterAll(async () => {
  for (const c of started) c.child.kill('SIGKILL');
  await p.close();
  await db.drop();
  const admin = await natsAdmin();
  await admin.close([names]);
});

function start(role: string, env: Record<string, string> = {}): OrchestratorProcess {
  const c = startOrchestrator([role], {
    DATABASE_URL: db.url,
    NATS_URL,
    NATS_PREFIX: names.prefix,
    NATS_STREAM: names.stream,
    LOG_LEVEL: 'warn',
    PORT: '0',
    OPS_PORT: '0',
    API_TOKEN: TOKEN,
    ...env,
  });
  started.push(c);
  return c;
}

const auth = { authorization: `Bearer ${TOKEN}` };

/** One sample's value from Prometheus text, by its exact name and labels. */
function sample(text: string, series: string): number | undefined {
  const line = text.split('\n').find((l) => l.startsWith(`${series} `));
  return line === undefined ? undefined : Number(line.slice(series.length + 1));
}

describe('OPS_PORT', () => {
  it('a worker serves its probes and live metrics there, and only those', async () => {
    const worker = start('worker', { WORKER_ID: 'ops-w', WORKER_CONCURRENCY: '3' });
    const ops = await worker.opsUrl();
    expect(worker.out()).toMatch(/orchestrator worker running, ops on http:\/\/127\.0\.0\.1:\d+ /);

    expect((await fetch(`${ops}/healthz`)).status).toBe(200);
    const ready = await fetch(`${ops}/readyz`);
    expect(ready.status).toBe(200);
    expect(await ready.json()).toEqual({
      ready: true,
      postgres: true,
      nats: true,
      migrations: true,
    });

    const refused = await fetch(`${ops}/metrics`);
    expect(refused.status).toBe(401);
    expect(await refused.json()).toMatchObject({ error: 'unauthorized' });
    const wrong = await fetch(`${ops}/metrics`, { headers: { authorization: 'Bearer nope' } });
    expect(wrong.status).toBe(401);

    // The figures are this worker's own: it completes a task, and its counter shows it.
    const ticket = await p.ticket();
    const task = await p.task(ticket, { type: 'x', executor: 'sleep', payload: { ms: 1 } });
    await until(async () => {
      const [row] = await db.sql<{ state: string }[]>`select state from tasks where id = ${task}`;
      return row?.state === 'completed';
    }, 20_000);
    const metrics = await fetch(`${ops}/metrics`, { headers: auth });
    expect(metrics.status).toBe(200);
    expect(metrics.headers.get('content-type')).toMatch(/^text\/plain; version=0\.0\.4/);
    const text = await metrics.text();
    expect(sample(text, 'orch_worker_slots')).toBe(3);
    expect(sample(text, 'orch_worker_events_total{outcome="completions"}')).toBe(1);
    expect(sample(text, 'process_resident_memory_bytes')).toBeGreaterThan(10_000_000);
    expect(sample(text, 'orch_entities{entity="task",state="completed"}')).toBe(1);
    // Scrapes of this listener are observed by it, as the API's are.
    expect(text).toMatch(
      /http_request_duration_seconds_count\{method="GET",route="\/readyz",status="200"\} 1$/m,
    );
    // No family twice: Prometheus would refuse the whole scrape.
    const families = [...text.matchAll(/^# TYPE (\S+)/gm)].map((m) => m[1]);
    expect(new Set(families).size).toBe(families.length);

    // Nothing of the API is here, with or without the token.
    for (const [method, path] of [
      ['GET', '/tickets'],
      ['POST', '/tickets'],
      ['GET', '/'],
      ['POST', '/metrics'],
    ] as const) {
      const res = await fetch(`${ops}${path}`, { method, headers: auth });
      expect(res.status, `${method} ${path}`).toBe(404);
      expect(await res.json()).toMatchObject({ error: 'not_found' });
    }

    worker.child.kill('SIGTERM');
    expect(await worker.exited).toBe(0);
    await expect(fetch(`${ops}/healthz`)).rejects.toThrow();
  }, 60_000);

  it('an all process serves the API on PORT and the probes on OPS_PORT', async () => {
    const all = start('all');
    const [api, ops] = await Promise.all([all.url(), all.opsUrl()]);
    expect(api).not.toBe(ops);
    expect((await fetch(`${api}/tickets`, { headers: auth })).status).toBe(200);
    expect((await fetch(`${ops}/tickets`, { headers: auth })).status).toBe(404);
    const text = await (await fetch(`${ops}/metrics`, { headers: auth })).text();
    expect(sample(text, 'orch_worker_slots')).toBeGreaterThan(0);
    all.child.kill('SIGTERM');
    expect(await all.exited).toBe(0);
  }, 60_000);

  it('a port already taken stops the process with the variable named', async () => {
    const taken: Server = createServer();
    await new Promise<void>((r) => taken.listen(0, '127.0.0.1', r));
    const port = (taken.address() as { port: number }).port;
    try {
      const worker = start('worker', { OPS_PORT: String(port) });
      expect(await worker.exited).toBe(1);
      expect(worker.err()).toContain(`cannot listen on 127.0.0.1:${port} (OPS_PORT): EADDRINUSE`);
    } finally {
      await new Promise((r) => taken.close(r));
    }
  }, 60_000);

  it("is refused when it equals the API's PORT, and validated as a port", async () => {
    const all = start('all', { PORT: '4000', OPS_PORT: '4000' });
    expect(await all.exited).toBe(2);
    expect(all.err()).toContain('OPS_PORT=4000: must differ from PORT, where the API listens');
    // A worker serves no API: its PORT is not in use.
    const worker = loadConfig({ PORT: '4000', OPS_PORT: '4000' });
    expect(roleConfigProblems(worker, 'worker')).toEqual([]);
    expect(roleConfigProblems(worker, 'api')).toHaveLength(1);
    expect(() => loadConfig({ OPS_PORT: '70000' })).toThrow(/OPS_PORT/);
    expect(() => loadConfig({ OPS_PORT: 'x' })).toThrow(/OPS_PORT/);
    expect(roleConfigProblems(loadConfig({ PORT: '0', OPS_PORT: '0' }), 'all')).toEqual([]);
    expect(loadConfig({}).OPS_PORT).toBeUndefined();
  });
});
