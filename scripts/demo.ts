/**
 * `npm run demo`: real flow on the dashboard within seconds. Against a running orchestrator
 * (ORCHESTRATOR_URL, default http://127.0.0.1:3000) or, if none answers, one it starts in
 * this process with demo timings. It creates tickets whose `sleep` tasks carry them through
 * every phase, one task that fails once and is retried, and one ticket whose task nobody
 * claims, so it goes stuck and gets a diagnostic task.
 */
import { randomBytes } from 'node:crypto';
import { configWith } from '../src/config.js';
import { createLogger } from '../src/log.js';
import { type Runtime, startRuntime } from '../src/runtime.js';

const out = (line: string) => process.stdout.write(`${line}\n`);

/** The bearer token of the orchestrator driven: API_TOKEN, or one made up for our own. */
let token = process.env.API_TOKEN ?? '';

async function reachable(url: string): Promise<boolean> {
  try {
    const res = await fetch(`${url}/healthz`, { signal: AbortSignal.timeout(1_000) });
    return res.ok;
  } catch {
    return false;
  }
}

async function api<T>(base: string, method: string, path: string, body?: unknown): Promise<T> {
  const res = await fetch(`${base}${path}`, {
    method,
    headers: {
      'content-type': 'application/json',
      ...(token ? { authorization: `Bearer ${token}` } : {}),
    },
    ...(body === undefined ? {} : { body: JSON.stringify(body) }),
  });
  const text = await res.text();
  if (!res.ok) throw new Error(`${method} ${path} → ${res.status} ${text}`);
  return (text ? JSON.parse(text) : null) as T;
}

interface Ticket {
  id: string;
  state: string;
  phase: string | null;
  diagnostics: number;
}

/** Adds the tasks of each phase as the ticket enters it, until it is done. */
async function drive(base: string, title: string, tasksPerPhase: (phase: string) => unknown[]) {
  const t = await api<Ticket>(base, 'POST', '/tickets', { title });
  await api(base, 'POST', `/tickets/${t.id}/events`, { type: 'START' });
  const seeded = new Set<string>();
  for (;;) {
    const now = await api<Ticket>(base, 'GET', `/tickets/${t.id}`);
    if (now.state === 'done' || now.state === 'cancelled' || now.state === 'blocked') {
      out(`  ${title}: ${now.state}`);
      return;
    }
    if (now.phase && !seeded.has(now.phase)) {
      seeded.add(now.phase);
      for (const task of tasksPerPhase(now.phase)) {
        await api(base, 'POST', `/tickets/${t.id}/tasks`, task);
      }
    }
    await new Promise((r) => setTimeout(r, 300));
  }
}

const sleepTasks = (ms: number, n: number) => (phase: string) =>
  Array.from({ length: n }, (_, i) => ({
    type: `${phase}_work`,
    executor: 'sleep',
    payload: { ms: ms + i * 300 },
  }));

const withFlakyBuild = (phase: string) => [
  ...sleepTasks(600, 1)(phase),
  ...(phase === 'implementation'
    ? [
        {
          type: 'flaky_build',
          executor: 'shell',
          maxAttempts: 3,
          // Fails on its first attempt, succeeds on the retry: watch task.retry_scheduled.
          payload: { command: 'echo "attempt $TASK_ATTEMPT"; [ "$TASK_ATTEMPT" -ge 2 ]' },
        },
      ]
    : []),
];

async function watchStuck(base: string, id: string): Promise<void> {
  for (let i = 0; i < 120; i++) {
    const s = await api<Ticket>(base, 'GET', `/tickets/${id}`);
    if (s.diagnostics > 0) {
      out('  Stuck ticket: no progress, so a diagnostic task was spawned');
      return;
    }
    await new Promise((r) => setTimeout(r, 500));
  }
  out('  Stuck ticket: no diagnostic yet (one appears after STUCK_AFTER_MS without progress)');
}

async function main(): Promise<void> {
  let base = (process.env.ORCHESTRATOR_URL ?? 'http://127.0.0.1:3000').replace(/\/$/, '');
  let runtime: Runtime | null = null;
  if (await reachable(base)) {
    out(`using the orchestrator at ${base} (stuck checks follow its STUCK_AFTER_MS;`);
    out('the flaky task needs ENABLE_SHELL_EXECUTOR=1 there)');
  } else {
    out(`no orchestrator at ${base}: starting one in this process with demo timings`);
    // It runs shell tasks, so its API requires a token (the dashboard asks for it).
    if (!token) {
      token = randomBytes(12).toString('hex');
      out(`API token (the dashboard asks for it): ${token}`);
    }
    const config = configWith({
      PORT: process.env.PORT ?? '3000',
      ...(process.env.DATABASE_URL ? { DATABASE_URL: process.env.DATABASE_URL } : {}),
      ...(process.env.NATS_URL ? { NATS_URL: process.env.NATS_URL } : {}),
      ...(process.env.NATS_PREFIX ? { NATS_PREFIX: process.env.NATS_PREFIX } : {}),
      ...(process.env.NATS_STREAM ? { NATS_STREAM: process.env.NATS_STREAM } : {}),
      ENABLE_SHELL_EXECUTOR: '1',
      API_TOKEN: token,
      // The demo's shell task is its own `echo`; as root (a container) it opts in.
      ...(process.getuid?.() === 0 ? { SHELL_ALLOW_ROOT: '1' } : {}),
      STUCK_AFTER_MS: '4000',
      DIAGNOSTIC_COOLDOWN_MS: '30000',
      RETRY_BASE_MS: '500',
      LEASE_MS: '5000',
      HEARTBEAT_MS: '1000',
      TIMER_POLL_MS: '200',
      LOG_LEVEL: process.env.LOG_LEVEL ?? 'warn',
    });
    runtime = await startRuntime(config, 'all', createLogger(config.LOG_LEVEL));
    base = runtime.url ?? base;
  }
  out(`\n  dashboard:    ${base}/`);
  out(
    `  live events:  curl -N ${token ? '-H "authorization: Bearer $API_TOKEN" ' : ''}${base}/events/stream`,
  );
  out(`  metrics:      ${base}/metrics\n`);

  out('driving tickets (each phase gets its tasks as the ticket enters it):');
  const stuck = await api<Ticket>(base, 'POST', '/tickets', {
    title: 'Stuck: waits for an outside agent',
  });
  await api(base, 'POST', `/tickets/${stuck.id}/events`, { type: 'START' });
  await api(base, 'POST', `/tickets/${stuck.id}/tasks`, { type: 'review', executor: 'external' });
  await Promise.all([
    drive(base, 'Login page', sleepTasks(800, 2)),
    drive(base, 'Search API', sleepTasks(500, 1)),
    drive(base, 'Flaky build', withFlakyBuild),
    watchStuck(base, stuck.id),
  ]);
  out(`\nthe stuck ticket still waits for an agent; claim its task as one would:
  curl -s -XPOST ${base}/tasks/claim -H 'content-type: application/json' -d '{"workerId":"me","waitMs":1000}'`);
  if (runtime) {
    out('\nthe orchestrator keeps running for the dashboard; Ctrl-C stops it');
    const rt = runtime;
    const stop = () => {
      void rt.stop().then(() => process.exit(0));
    };
    process.once('SIGINT', stop);
    process.once('SIGTERM', stop);
  }
}

await main();
