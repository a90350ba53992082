/**
 * 200 tasks through four SDK agent processes (the client imported by its package name),
 * with agents killed with SIGKILL mid-task and restarted, and tasks cancelled as they run:
 * every task ends completed exactly once or cancelled; no two attempts of a task ever run
 * at the same time (each attempt's start and end times, from marker files); and each agent
 * stopped with SIGTERM exits by itself, so no heartbeat loop or timer outlived work().
 */
import { type ChildProcess, spawn } from 'node:child_process';
import { readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { IllegalTransitionError, OrchestratorClient } from '../../src/client/index.js';
import { type ApiRuntime, startApi } from '../support/api-runtime.js';
import { tempDir } from '../support/temp-dir.js';

const TASKS = 200;
const LEASE_MS = 2_000;
const SCRIPT = new URL('../support/sdk-agent.ts', import.meta.url).pathname;
const dir = tempDir('orch-sdk-agents-');
let api: ApiRuntime;
let client: OrchestratorClient;

interface AgentProcess {
  id: string;
  child: ChildProcess;
  exited: Promise<number | null>;
  killedAt?: number;
  out: () => string;
}
const agents: AgentProcess[] = [];

beforeAll(async () => {
  api = await startApi('sdk_agents', {
    LEASE_MS: String(LEASE_MS),
    CLAIM_MAX_WAIT_MS: '1000',
    RETRY_BASE_MS: '50',
    MAX_ATTEMPTS: '30',
  });
  client = new OrchestratorClient({ url: api.url });
}, 60_000);
afterAll(async () => {
  for (const a of agents) if (a.child.exitCode === null) a.child.kill('SIGKILL');
  await api?.stop();
});

function startAgent(id: string): AgentProcess {
  const child = spawn(process.execPath, ['--import', 'tsx', SCRIPT], {
    env: {
      PATH: process.env.PATH ?? '',
      HOME: process.env.HOME ?? '/tmp',
      ORCHESTRATOR_URL: api.url,
      WORKER_ID: id,
      MARKER_DIR: dir,
    },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let out = '';
  child.stdout?.on('data', (b: Buffer) => {
    out += b.toString();
  });
  child.stderr?.on('data', (b: Buffer) => {
    out += b.toString();
  });
  const exited = new Promise<number | null>((r) => child.once('exit', (code) => r(code)));
  const a: AgentProcess = { id, child, exited, out: () => out };
  agents.push(a);
  return a;
}

interface Mark {
  event: 'start' | 'end' | 'abort';
  at: number;
  workerId: string;
  reason?: string;
}

function marks(): Map<string, Map<number, Mark[]>> {
  const byTask = new Map<string, Map<number, Mark[]>>();
  for (const f of readdirSync(dir)) {
    const m = /^(.+)\.(\d+)$/.exec(f);
    if (!m) continue;
    // Only whole lines: read while the run goes on, a file may have been created by an
    // agent's append and not written yet (each mark is one write, so a line is never torn).
    const lines = readFileSync(join(dir, f), 'utf8').split('\n').slice(0, -1);
    if (lines.length === 0) continue;
    const attempts = byTask.get(m[1]!) ?? new Map<number, Mark[]>();
    attempts.set(
      Number(m[2]),
      lines.map((l) => JSON.parse(l) as Mark),
    );
    byTask.set(m[1]!, attempts);
  }
  return byTask;
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const pick = <T>(xs: T[]): T => xs[Math.floor(Math.random() * xs.length)]!;

it(`${TASKS} tasks, 4 SDK agent processes, kill -9 and restarts, cancellations`, async () => {
  const tickets = await Promise.all(
    Array.from({ length: 10 }, async (_, i) => {
      const t = await client.createTicket({ title: `sdk ${i}` });
      await client.sendTicketEvent(t.id, { type: 'START' });
      return t;
    }),
  );
  const ids: string[] = [];
  for (let i = 0; i < TASKS; i++) {
    const task = await client.addTask(tickets[i % 10]!.id, {
      type: 'sdk',
      // One in ten runs long enough to be cancelled mid-run.
      payload: { ms: i % 10 === 0 ? 3_000 : 100 + Math.floor(Math.random() * 400) },
    });
    ids.push(task.id);
  }
  const long = new Set(ids.filter((_, i) => i % 10 === 0));
  let generation = 0;
  for (const n of [1, 2, 3, 4]) startAgent(`a${n}-${generation}`);

  const final = async () => {
    let open = 0;
    for (let i = 0; i < ids.length; i += 50) {
      const page = await Promise.all(ids.slice(i, i + 50).map((id) => client.getTask(id)));
      open += page.filter((t) => t.state !== 'completed' && t.state !== 'cancelled').length;
    }
    return open;
  };

  // Chaos: kill a live agent mid-task every so often (and start a new one), cancel tasks.
  const cancelled = new Set<string>();
  const kills: AgentProcess[] = [];
  const deadline = Date.now() + 150_000;
  let rounds = 0;
  while ((await final()) > 0) {
    expect(Date.now(), 'all tasks final in time').toBeLessThan(deadline);
    rounds++;
    if (kills.length < 6 && rounds % 2 === 0) {
      const alive = agents.filter((a) => a.child.exitCode === null && a.killedAt === undefined);
      const running = new Set(
        [...marks().values()].flatMap((at) =>
          [...at.values()]
            .filter((ms) => ms.length === 1 && ms[0]!.event === 'start')
            .map((ms) => ms[0]!.workerId),
        ),
      );
      const victim = alive.find((a) => running.has(a.id));
      if (victim) {
        victim.killedAt = Date.now();
        victim.child.kill('SIGKILL');
        await victim.exited;
        kills.push(victim);
        generation++;
        startAgent(`${victim.id.split('-')[0]}-${generation}`);
      }
    }
    if (cancelled.size < 20) {
      // Every other one while an agent runs it, so the abort has to reach the agent. An
      // attempt of a killed agent never gets its end marker: only live agents' count.
      const killed = new Set(kills.map((k) => k.id));
      const now = Date.now();
      const running = [...marks().entries()]
        .flatMap(([task, at]) =>
          [...at.values()]
            .filter((ms) => ms.length === 1 && !killed.has(ms[0]!.workerId))
            .map((ms) => ({ task, at: ms[0]!.at })),
        )
        .sort((a, b) => b.at - a.at);
      // Prefer a 3 s task started lately: a short one, or one near its end, may finish before
      // the cancel reaches its agent.
      const mid = running.find((r) => long.has(r.task) && now - r.at < 1_500) ?? running[0];
      const id = rounds % 2 === 1 && mid ? mid.task : pick(ids);
      try {
        await client.cancelTask(id, 'chaos');
        cancelled.add(id);
      } catch (error) {
        if (!(error instanceof IllegalTransitionError)) throw error;
      }
    }
    await sleep(400);
  }
  expect(kills.length).toBeGreaterThanOrEqual(3);

  // Each live agent stops on SIGTERM and its process ends by itself.
  const live = agents.filter((a) => a.child.exitCode === null && a.killedAt === undefined);
  for (const a of live) a.child.kill('SIGTERM');
  const codes = await Promise.all(
    live.map((a) => Promise.race([a.exited, sleep(15_000).then(() => `hung:\n${a.out()}`)])),
  );
  expect(codes).toEqual(live.map(() => 0));
  for (const a of live) {
    const { resources } = JSON.parse(readFileSync(join(dir, `exit-${a.id}.json`), 'utf8')) as {
      resources: string[];
    };
    expect(
      resources.filter((r) => r === 'Timeout'),
      a.id,
    ).toEqual([]);
  }

  // Completed once, or cancelled; the cancelled ones include every task we cancelled.
  const tasks = await Promise.all(ids.map((id) => client.getTask(id)));
  const completed = tasks.filter((t) => t.state === 'completed');
  expect(completed.length + tasks.filter((t) => t.state === 'cancelled').length).toBe(TASKS);
  for (const id of cancelled) expect(tasks.find((t) => t.id === id)?.state).toBe('cancelled');
  for (const t of tasks) {
    const types = (await client.taskEvents(t.id)).events.map((e) => e.type);
    expect(types.filter((x) => x === 'task.completed').length, t.id).toBe(
      t.state === 'completed' ? 1 : 0,
    );
  }
  // The result names the attempt that completed it, and that attempt ran to its end.
  const all = marks();
  for (const t of completed) {
    const r = t.result as { attempt: number; workerId: string };
    expect(r.attempt).toBe(t.attempt);
    expect(
      all
        .get(t.id)
        ?.get(r.attempt)
        ?.map((m) => m.event),
    ).toEqual(['start', 'end']);
  }

  // No two attempts of a task overlap. An attempt with no end marker was killed: it
  // ended when its process did.
  const killedAt = new Map(kills.map((k) => [k.id, k.killedAt!]));
  let attempts = 0;
  for (const [task, byAttempt] of all) {
    const spans = [...byAttempt.entries()]
      .sort(([a], [b]) => a - b)
      .map(([attempt, ms]) => {
        const start = ms[0]!;
        const end = ms[1]?.at ?? killedAt.get(start.workerId);
        expect(end, `${task}.${attempt} has an end or a killed process`).toBeDefined();
        return { attempt, start: start.at, end: end! };
      });
    attempts += spans.length;
    for (let i = 1; i < spans.length; i++) {
      expect(
        spans[i]!.start,
        `${task} attempt ${spans[i]!.attempt} overlaps`,
      ).toBeGreaterThanOrEqual(spans[i - 1]!.end);
    }
  }
  const aborted = [...all.values()]
    .flatMap((m) => [...m.values()])
    .filter((ms) => ms[1]?.event === 'abort');
  // Cancelling a running task aborted its handler (the agent was told, by heartbeat or stream).
  expect(aborted.filter((ms) => ms[1]!.reason === 'cancelled').length).toBeGreaterThan(0);
  console.log(
    `${TASKS} tasks: ${completed.length} completed, ${TASKS - completed.length} cancelled; ` +
      `${attempts} attempts, ${kills.length} agents killed, ${aborted.length} aborted ` +
      `(${aborted.map((ms) => ms[1]!.reason).join(',')})`,
  );
}, 240_000);
