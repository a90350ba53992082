/**
 * `bin/orchestrator agent -- COMMAND` against a real `api` runtime: a result file becomes
 * the task's result, a failing command fails the task with its stderr tail, stdout and
 * stderr arrive as output, a cancel kills the command's whole process group (a grandchild
 * that ignores SIGTERM included) within a heartbeat plus the kill grace, two tasks with one
 * `worktree` run one after the other in one git worktree, and SIGTERM to the agent stops
 * the command before its task is RELEASEd.
 */
import { execFileSync } from 'node:child_process';
import { chmodSync, existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { worktreeName } from '../../src/agent/workdirs.js';
import { OrchestratorClient } from '../../src/client/index.js';
import { type ApiRuntime, startApi } from '../support/api-runtime.js';
import {
  type OrchestratorProcess,
  startOrchestrator,
  waitUntil,
} from '../support/orchestrator-process.js';

const LEASE_MS = 3_000;
const GRACE_MS = 1_000;
let api: ApiRuntime;
let client: OrchestratorClient;
const dir = mkdtempSync(join(tmpdir(), 'orch-agent-cli-'));
const agents: OrchestratorProcess[] = [];

beforeAll(async () => {
  api = await startApi('agent_cli', { LEASE_MS: String(LEASE_MS), CLAIM_MAX_WAIT_MS: '1000' });
  client = new OrchestratorClient({ url: api.url });
}, 60_000);
afterEach(async () => {
  for (const a of agents.splice(0)) {
    if (a.child.exitCode === null) {
      a.child.kill('SIGKILL');
      await a.exited;
    }
  }
});
afterAll(async () => {
  await api?.stop();
  rmSync(dir, { recursive: true, force: true });
  rmSync(`${dir}/repo.worktrees`, { recursive: true, force: true });
});

/** True while the process exists and is not a zombie waiting to be reaped. */
function alive(pid: number): boolean {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    return stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3) !== 'Z';
  } catch {
    return false;
  }
}

function script(name: string, body: string): string {
  const file = join(dir, name);
  writeFileSync(file, `#!/bin/sh\n${body}\n`);
  chmodSync(file, 0o755);
  return file;
}

async function startAgent(args: string[], env: Record<string, string> = {}) {
  const agent = startOrchestrator(['agent', ...args], {
    ORCHESTRATOR_URL: api.url,
    SHUTDOWN_GRACE_MS: String(GRACE_MS),
    ...env,
  });
  agents.push(agent);
  await waitUntil(
    () => /working for/.test(agent.out()) || agent.child.exitCode !== null,
    30_000,
    'the agent to start',
  );
  if (agent.child.exitCode !== null) throw new Error(`agent exited: ${agent.err()}`);
  return agent;
}

async function ticketWith(type: string, tasks: Record<string, unknown>[]) {
  const ticket = await client.createTicket({ title: type });
  await client.sendTicketEvent(ticket.id, { type: 'START' });
  const out = [];
  for (const t of tasks) out.push(await client.addTask(ticket.id, { type, ...t }));
  return { ticket, tasks: out };
}

async function settled(taskId: string, states = ['completed', 'failed', 'cancelled']) {
  await waitUntil(
    async () => states.includes((await client.getTask(taskId)).state),
    30_000,
    `task ${taskId} to settle`,
  );
  return client.getTask(taskId);
}

describe('bin/orchestrator agent', () => {
  it('exit 0 with a result file: COMPLETE with its JSON; stdout and stderr arrive as output; the environment is the documented one', async () => {
    const cmd = script(
      'result.sh',
      [
        'echo "working on $TASK_TYPE"',
        'echo "a warning" >&2',
        'names=$(env | cut -d= -f1 | sort | tr "\\n" " ")',
        'printf \'{"id":"%s","ticket":"%s","type":"%s","attempt":%s,"payload":%s,"feedback":"%s","url":"%s","arg":"%s","env":"%s"}\' \\',
        '  "$TASK_ID" "$TICKET_ID" "$TASK_TYPE" "$TASK_ATTEMPT" "$TASK_PAYLOAD" "$TASK_FEEDBACK" "$ORCHESTRATOR_URL" "$1" "$names" > "$TASK_RESULT_FILE"',
      ].join('\n'),
    );
    const { ticket, tasks } = await ticketWith('cli_result', [{ payload: { n: 42, s: 'x y' } }]);
    await startAgent(['--types', 'cli_result', '--', cmd, 'first arg'], {
      SECRET_OF_THE_AGENT: 'do-not-leak',
      API_TOKEN: 'not-for-commands',
      WORKER_ID: 'cli-1',
    });
    const done = await settled(tasks[0]!.id);
    expect(done.state).toBe('completed');
    const result = done.result as Record<string, unknown>;
    expect(result).toMatchObject({
      id: done.id,
      ticket: ticket.id,
      type: 'cli_result',
      attempt: 1,
      payload: { n: 42, s: 'x y' },
      feedback: '',
      url: api.url,
      arg: 'first arg',
    });
    const names = String(result.env).trim().split(' ');
    expect(names).not.toContain('SECRET_OF_THE_AGENT');
    expect(names).not.toContain('API_TOKEN');
    expect(names).toEqual(
      expect.arrayContaining(['PATH', 'HOME', 'TASK_ID', 'TASK_RESULT_FILE', 'TASK_PAYLOAD']),
    );
    expect(done.workerId).toBe('cli-1');
    const output = (await client.readOutput(done.id)).chunks;
    const text = (stream: string) =>
      output
        .filter((c) => c.stream === stream)
        .map((c) => c.text)
        .join('');
    expect(text('stdout')).toBe('working on cli_result\n');
    expect(text('stderr')).toBe('a warning\n');
    expect(text('log')).toContain(cmd);
  });

  it('exit 0 without a result file: {exitCode, stdoutTail}; a result file that is not JSON: FAIL saying so', async () => {
    const cmd = script(
      'plain.sh',
      'echo "plain $TASK_PAYLOAD"\nif [ "$TASK_PAYLOAD" = \'{"bad":true}\' ]; then echo "{nope" > "$TASK_RESULT_FILE"; fi',
    );
    const { tasks } = await ticketWith('cli_plain', [
      { payload: { bad: false }, maxAttempts: 1 },
      { payload: { bad: true }, maxAttempts: 1 },
    ]);
    await startAgent(['--types', 'cli_plain', '--', cmd]);
    const plain = await settled(tasks[0]!.id);
    expect(plain.state).toBe('completed');
    expect(plain.result).toEqual({ exitCode: 0, stdoutTail: 'plain {"bad":false}\n' });
    const bad = await settled(tasks[1]!.id);
    expect(bad.state).toBe('failed');
    expect(bad.error).toMatch(/TASK_RESULT_FILE is not valid JSON/);
    expect(bad.error).toContain('{nope');
  });

  it('a non-zero exit: FAIL with the stderr tail', async () => {
    const cmd = script(
      'fail.sh',
      'echo "trying"\nhead -c 10000 /dev/zero | tr "\\0" a >&2\necho "" >&2\necho "the real reason" >&2\nexit 3',
    );
    const { tasks } = await ticketWith('cli_fail', [{ maxAttempts: 1 }]);
    await startAgent(['--types', 'cli_fail', '--', cmd]);
    const failed = await settled(tasks[0]!.id);
    expect(failed.state).toBe('failed');
    expect(failed.error).toMatch(/exited with code 3/);
    expect(failed.error).toMatch(/the real reason$/);
    // A tail, not all of it.
    expect(failed.error!.length).toBeLessThan(5_000);
  });

  it('a cancel kills the process group, a grandchild that ignores SIGTERM included, within a heartbeat and the grace', async () => {
    const marks = join(dir, 'cancel');
    execFileSync('mkdir', ['-p', marks]);
    const cmd = script(
      'long.sh',
      [
        '(trap "" TERM; exec sleep 300) &',
        'echo $! > "$MARKS/grandchild.pid"',
        'echo $$ > "$MARKS/child.pid"',
        'echo started',
        'wait',
      ].join('\n'),
    );
    const { tasks } = await ticketWith('cli_cancel', [{}]);
    const agent = await startAgent(['--types', 'cli_cancel', '--env', 'MARKS', '--', cmd], {
      MARKS: marks,
    });
    await waitUntil(
      () => existsSync(join(marks, 'grandchild.pid')) && existsSync(join(marks, 'child.pid')),
      20_000,
      'the command to start',
    );
    const pids = ['child', 'grandchild'].map((n) =>
      Number(readFileSync(join(marks, `${n}.pid`), 'utf8')),
    );
    expect(pids.every(alive)).toBe(true);
    // Just past a heartbeat, so the next one is a whole interval away.
    await new Promise((r) => setTimeout(r, LEASE_MS / 3 + 50));
    const cancelledAt = Date.now();
    await client.cancelTask(tasks[0]!.id, 'not needed');
    await waitUntil(() => !pids.some(alive), 10_000, 'the process group to die');
    // A heartbeat's interval to hear of it, the grace before SIGKILL, and a round trip.
    expect(Date.now() - cancelledAt).toBeLessThan(LEASE_MS / 3 + GRACE_MS + 1_000);
    expect((await client.getTask(tasks[0]!.id)).state).toBe('cancelled');
    await waitUntil(() => /stopped/.test(agent.err()), 5_000, 'the agent to say so');
  });

  it('two tasks with one worktree run one after the other in one git worktree of --repo; a task without one gets a temporary directory', async () => {
    const repo = join(dir, 'repo');
    execFileSync('sh', [
      '-c',
      `git init -q "${repo}" && cd "${repo}" && echo hi > README && git add README && git -c user.email=t@e -c user.name=t commit -qm init`,
    ]);
    const cmd = script(
      'commit.sh',
      [
        'echo "start $TASK_ID" >> log.txt',
        'sleep 0.7',
        'echo "end $TASK_ID" >> log.txt',
        'if [ -z "$(git rev-parse --show-prefix 2>/dev/null && echo repo)" ]; then',
        '  printf \'{"cwd":"%s","commits":0}\' "$(pwd -P)" > "$TASK_RESULT_FILE"; exit 0',
        'fi',
        'git add log.txt && git -c user.email=a@e -c user.name=agent commit -qm "$TASK_ID"',
        'printf \'{"cwd":"%s","commits":%s}\' "$(pwd -P)" "$(git rev-list --count HEAD)" > "$TASK_RESULT_FILE"',
      ].join('\n'),
    );
    const { tasks } = await ticketWith('cli_worktree', [
      { worktree: 'feature/x y' },
      { worktree: 'feature/x y' },
      {},
    ]);
    await startAgent(['--types', 'cli_worktree', '--concurrency', '3', '--repo', repo, '--', cmd]);
    const [a, b, c] = await Promise.all(tasks.map((t) => settled(t.id)));
    for (const t of [a, b, c]) expect([t!.state, t!.error]).toEqual(['completed', null]);
    const ra = a!.result as { cwd: string; commits: number };
    const rb = b!.result as { cwd: string; commits: number };
    expect(ra.cwd).toBe(rb.cwd);
    expect(ra.cwd).toBe(join(`${repo}.worktrees`, worktreeName('feature/x y')));
    // One after the other, each seeing the other's commit (the second has three commits).
    expect([ra.commits, rb.commits].sort()).toEqual([2, 3]);
    const log = readFileSync(join(ra.cwd, 'log.txt'), 'utf8').trim().split('\n');
    const [first, second] = ra.commits === 2 ? [a!.id, b!.id] : [b!.id, a!.id];
    expect(log).toEqual([`start ${first}`, `end ${first}`, `start ${second}`, `end ${second}`]);
    // A worktree of the repository, on its own branch.
    const common = execFileSync(
      'git',
      ['rev-parse', '--path-format=absolute', '--git-common-dir'],
      {
        cwd: ra.cwd,
      },
    )
      .toString()
      .trim();
    expect(common).toBe(join(repo, '.git'));
    const branch = execFileSync('git', ['branch', '--show-current'], { cwd: ra.cwd }).toString();
    expect(branch.trim()).toBe(`orchestrator/${worktreeName('feature/x y')}`);
    // The worktree-less task ran elsewhere, in a directory removed afterwards.
    const rc = c!.result as { cwd: string; commits: number };
    expect(rc.cwd).not.toBe(ra.cwd);
    expect(existsSync(rc.cwd)).toBe(false);
  });

  it('SIGTERM: no new claims; after the grace the command is stopped, then its task RELEASEd; exit 0', async () => {
    const marks = join(dir, 'term');
    execFileSync('mkdir', ['-p', marks]);
    // It takes half a second to stop: time in which its task must not be free yet.
    const cmd = script(
      'wait.sh',
      'echo $$ > "$MARKS/child.pid"\ntrap \'sleep 0.5; exit 0\' TERM\nsleep 300 &\nwait',
    );
    const { tasks } = await ticketWith('cli_term', [{}]);
    const agent = await startAgent(['--types', 'cli_term', '--env', 'MARKS', '--', cmd], {
      MARKS: marks,
    });
    await waitUntil(() => existsSync(join(marks, 'child.pid')), 20_000, 'the command to start');
    const pid = Number(readFileSync(join(marks, 'child.pid'), 'utf8'));
    agent.child.kill('SIGTERM');
    // Whenever the task is seen back in pending, its command is already gone.
    let back = await client.getTask(tasks[0]!.id);
    while (back.state === 'running') {
      await new Promise((r) => setTimeout(r, 20));
      back = await client.getTask(tasks[0]!.id);
    }
    expect(alive(pid)).toBe(false);
    expect(back).toMatchObject({ state: 'pending', attempt: 1, attemptsUsed: 0 });
    expect(await agent.exited).toBe(0);
  });

  it('examples/agents/fake-coding-agent.sh commits in its worktree and reports the commit', async () => {
    const repo = join(dir, 'example-repo');
    execFileSync('sh', [
      '-c',
      `git init -q "${repo}" && cd "${repo}" && echo hi > README && git add README && git -c user.email=t@e -c user.name=t commit -qm init`,
    ]);
    const example = new URL('../../examples/agents/fake-coding-agent.sh', import.meta.url).pathname;
    const { ticket, tasks } = await ticketWith('cli_example', [
      { worktree: 'example', payload: { prompt: 'add a dark mode toggle' } },
    ]);
    await startAgent(['--types', 'cli_example', '--repo', repo, '--', example]);
    const done = await settled(tasks[0]!.id);
    expect([done.state, done.error]).toEqual(['completed', null]);
    const result = done.result as { summary: string; commit: string };
    expect(result.summary).toBe(`wrote notes/${ticket.id}.md`);
    const wt = join(`${repo}.worktrees`, 'example');
    expect(execFileSync('git', ['rev-parse', 'HEAD'], { cwd: wt }).toString().trim()).toBe(
      result.commit,
    );
    const out = (await client.readOutput(done.id)).chunks.map((c) => c.text).join('');
    expect(out).toContain('add a dark mode toggle');
  });

  it('refuses a bad command line with exit 2 and the usage', async () => {
    for (const args of [
      ['--', 'no-such-command-here'],
      ['--concurrency', '0', '--', 'true'],
      ['--repo', dir, '--', 'true'],
      [],
    ]) {
      const p = startOrchestrator(['agent', ...args], { ORCHESTRATOR_URL: api.url });
      expect(await p.exited).toBe(2);
      expect(p.err()).toMatch(/usage: orchestrator agent/);
    }
  });
});
