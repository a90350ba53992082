/**
 * The shell executor's output reaches the task output store while the command runs
 * (batched, with the claim's attempt and each line's stream), and a store that fails or
 * refuses never changes the task's outcome.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { OrchestratorClient } from '../../src/client/index.js';
import { StaleToken } from '../../src/errors.js';
import { silentLogger } from '../../src/log.js';
import { type Runtime, startRuntime } from '../../src/runtime.js';
import { OutputBatcher, type OutputWriter } from '../../src/workers/output-batcher.js';
import { testRuntimeConfig } from '../support/api-runtime.js';
import { createTestDatabase, type TestDatabase } from '../support/database.js';
import { waitUntil } from '../support/orchestrator-process.js';
import { natsAdmin, testNames } from '../support/transport.js';

const names = testNames();
let db: TestDatabase;
let runtime: Runtime;
let client: OrchestratorClient;

beforeAll(async () => {
  db = await createTestDatabase('shell_output');
  runtime = await startRuntime(
    testRuntimeConfig(db, names, {
      ENABLE_SHELL_EXECUTOR: '1',
      // Tests run as root in CI: opt in as an operator would.
      ...(process.getuid?.() === 0 ? { SHELL_ALLOW_ROOT: '1' } : {}),
      WORKER_CONCURRENCY: '2',
    }),
    'all',
    silentLogger(),
  );
  client = new OrchestratorClient({ url: runtime.url! });
});
afterAll(async () => {
  await runtime?.stop();
  const admin = await natsAdmin();
  await admin.close([names]);
  await db?.drop();
});

async function shellTask(command: string) {
  const ticket = await client.createTicket({ title: 'shell output' });
  await client.sendTicketEvent(ticket.id, { type: 'START' });
  return client.addTask(ticket.id, { type: 'sh', executor: 'shell', payload: { command } });
}

const textOf = (chunks: { stream: string; text: string }[], stream: string) =>
  chunks
    .filter((c) => c.stream === stream)
    .map((c) => c.text)
    .join('');

describe('shell executor output', () => {
  it('streams stdout and stderr into GET /tasks/:id/output while the command runs', async () => {
    const task = await shellTask(
      "printf 'one\\ntwo\\n'; echo oops >&2; printf 'caf\\303'; sleep 1.5; printf '\\251 three\\n'",
    );
    // Seen while the task still runs: streamed, not written at the end.
    let seenRunning = false;
    await waitUntil(
      async () => {
        const [page, now] = await Promise.all([
          client.readOutput(task.id),
          client.getTask(task.id),
        ]);
        if (now.state === 'running' && textOf(page.chunks, 'stdout').includes('two\n')) {
          seenRunning = true;
        }
        return seenRunning || now.state === 'completed';
      },
      20_000,
      'output of the running task',
    );
    expect(seenRunning).toBe(true);
    await waitUntil(
      async () => (await client.getTask(task.id)).state === 'completed',
      20_000,
      'the task to complete',
    );
    const page = await client.readOutput(task.id);
    // A character split across two writes (é) arrives whole.
    expect(textOf(page.chunks, 'stdout')).toBe('one\ntwo\ncafé three\n');
    expect(textOf(page.chunks, 'stderr')).toBe('oops\n');
    expect(page.chunks.every((c) => c.attempt === 1)).toBe(true);
    expect(page.truncated).toBe(false);
  });

  it('a failing command still fails with its tails; its output is there too', async () => {
    const t2 = await shellTask('echo before; echo broken >&2; exit 3');
    await waitUntil(
      async () => ['failed', 'retry_wait'].includes((await client.getTask(t2.id)).state),
      20_000,
      'the task to fail',
    );
    const after = await client.getTask(t2.id);
    expect(after.error).toContain('broken');
    const page = await client.readOutput(t2.id);
    expect(textOf(page.chunks, 'stdout')).toContain('before\n');
    expect(textOf(page.chunks, 'stderr')).toContain('broken\n');
  });
});

describe('OutputBatcher', () => {
  const log = silentLogger();

  it('a store that throws drops the batch; close() still resolves', async () => {
    let calls = 0;
    const writer: OutputWriter = {
      write: async () => {
        calls++;
        throw new Error('database away');
      },
    };
    const b = new OutputBatcher(writer, 'tsk_x', 'tok', log, { flushMs: 5 });
    b.push('stdout', 'a\n');
    await new Promise((r) => setTimeout(r, 30));
    b.push('stdout', 'b\n');
    await expect(b.close()).resolves.toBeUndefined();
    expect(calls).toBe(2);
  });

  it('a refusal (stale token) turns it off: nothing more is sent', async () => {
    const sent: string[] = [];
    const writer: OutputWriter = {
      write: async (_id, _token, chunks) => {
        sent.push(...chunks.map((c) => c.text));
        throw new StaleToken('tsk_x', 2);
      },
    };
    const b = new OutputBatcher(writer, 'tsk_x', 'tok', log, { flushMs: 5 });
    b.push('stdout', 'first\n');
    await b.flush();
    b.push('stdout', 'second\n');
    await b.close();
    expect(sent).toEqual(['first\n']);
  });

  it('flushes at flushBytes without waiting, and bounds what it holds while the store is slow', async () => {
    const batches: { stream: string; text: string }[][] = [];
    let release: () => void = () => {};
    const gate = new Promise<void>((r) => {
      release = r;
    });
    const writer: OutputWriter = {
      write: async (_id, _token, chunks) => {
        batches.push(chunks);
        await gate;
      },
    };
    const b = new OutputBatcher(writer, 'tsk_x', 'tok', log, {
      flushMs: 60_000,
      flushBytes: 1_000,
      maxBufferedBytes: 10_000,
    });
    b.push('stdout', 'x'.repeat(1_000));
    await new Promise((r) => setTimeout(r, 10));
    expect(batches.length).toBe(1); // sent at once, not after flushMs
    // While that write hangs, 50,000 more characters arrive: the next batch is bounded.
    for (let i = 0; i < 50; i++) b.push('stdout', 'y'.repeat(1_000));
    release();
    await b.close();
    // One write in flight at a time: the rest waited in the buffer, cut to its bound.
    const rest = batches.slice(1).flat();
    const kept = rest.filter((c) => c.stream === 'stdout').reduce((n, c) => n + c.text.length, 0);
    expect(kept).toBeLessThanOrEqual(10_000);
    expect(kept).toBeGreaterThan(0);
    const note = rest.find((c) => c.stream === 'log');
    expect(note?.text).toBe(`[${50_000 - kept} characters of output dropped]\n`);
  });
});
