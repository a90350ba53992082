/**
 * Task output (CONTRACT section 6) over a real server, Postgres and two writer "processes"
 * (two pools, two TaskOutput services): fencing (stale token, a cancelled task), bad input
 * (oversized, non-UTF-8, NUL, unknown stream), paging, gap-free seqs under concurrent
 * writers, and 10,000 lines followed over SSE across a forced reconnect with a small cap.
 */
import type { Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { TaskOutput } from '../../src/actors/output.js';
import { startHttpServer } from '../../src/http/server.js';
import { createTestApp, type TestApp } from '../support/http-app.js';
import { type SseFrame, sseReader } from '../support/sse.js';

const CAP = 64 * 1024;
let t: TestApp;
let server: Server;
let base: string;
let output: TaskOutput;
/** A second process's writer: its own pool, its own service, no HTTP. */
let other: TaskOutput;

beforeAll(async () => {
  t = await createTestApp('task_output', {
    config: { OUTPUT_MAX_BYTES: String(CAP), SSE_MAX_CLIENTS: '4' },
  });
  // Live delivery must come from the in-process wake-up and NOTIFY, not the periodic check.
  output = new TaskOutput(t.db.sql, { maxBytes: CAP, host: t.host, checkMs: 60_000 });
  await output.start();
  t.services.output = output;
  other = new TaskOutput(t.db.pool(4), { maxBytes: CAP, checkMs: 60_000 });
  server = startHttpServer(t.app.fetch, { port: 0, hostname: '127.0.0.1' });
  await new Promise<void>((resolve) => server.once('listening', () => resolve()));
  base = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
}, 30_000);

afterAll(async () => {
  server?.closeAllConnections();
  await new Promise<void>((resolve) => server?.close(() => resolve()));
  await output?.stop();
  await other?.stop();
  await t?.close();
});

/** A running task of its own (a worktree-less external task), with its token. */
async function runningTask(): Promise<{ id: string; token: string; ticketId: string }> {
  const ticket = await t.call('POST', '/tickets', { title: 'output' });
  await t.call('POST', `/tickets/${ticket.body.id}/events`, { type: 'START' });
  const task = await t.call('POST', `/tickets/${ticket.body.id}/tasks`, { type: 'out' });
  expect(task.status).toBe(201);
  // Claim this very task: earlier tests leave claimable ones behind.
  await t.host.send('task', task.body.id, { type: 'CLAIM', workerId: 'agent-1' });
  const row = await t.call('GET', `/tasks/${task.body.id}`);
  const { value: token } = await t.host.transact(async (uow) => {
    const [r] = await uow.tx<{ token: string }[]>`
      select snapshot->'context'->>'token' as token from tasks where id = ${task.body.id}`;
    return r!.token;
  });
  const started = await t.call('POST', `/tasks/${task.body.id}/events`, { type: 'START', token });
  expect(started.status).toBe(200);
  expect(row.body.state).toBe('claimed');
  return { id: task.body.id, token, ticketId: ticket.body.id };
}

const post = (id: string, body: unknown, headers: Record<string, string> = {}) =>
  t.call('POST', `/tasks/${id}/output`, body, headers);

async function allOutput(id: string): Promise<{ seq: number; text: string; stream: string }[]> {
  const out: { seq: number; text: string; stream: string }[] = [];
  let after = 0;
  for (;;) {
    const page = await t.call('GET', `/tasks/${id}/output?after=${after}&limit=1000`);
    expect(page.status).toBe(200);
    if (page.body.chunks.length === 0) return out;
    out.push(...page.body.chunks);
    after = page.body.chunks.at(-1).seq;
  }
}

describe('POST /tasks/:id/output', () => {
  it('stores chunks with seq, attempt, stream and time; pages with after and limit', async () => {
    const task = await runningTask();
    const first = await post(task.id, {
      token: task.token,
      chunks: [
        { stream: 'stdout', text: 'one\n' },
        { stream: 'stderr', text: 'twö\n' },
      ],
    });
    expect(first.status).toBe(202);
    expect(first.body).toEqual({ firstSeq: 1, lastSeq: 2, attempt: 1 });
    const second = await post(task.id, {
      token: task.token,
      chunks: [{ stream: 'log', text: 'three' }],
    });
    expect(second.body).toEqual({ firstSeq: 3, lastSeq: 3, attempt: 1 });

    const page1 = await t.call('GET', `/tasks/${task.id}/output?limit=2`);
    expect(page1.status).toBe(200);
    expect(page1.body.truncated).toBe(false);
    expect(page1.body.chunks.map((c: { seq: number }) => c.seq)).toEqual([1, 2]);
    expect(page1.body.chunks[1]).toMatchObject({
      seq: 2,
      attempt: 1,
      stream: 'stderr',
      text: 'twö\n',
    });
    expect(Number.isNaN(Date.parse(page1.body.chunks[0].at))).toBe(false);
    const page2 = await t.call('GET', `/tasks/${task.id}/output?after=2&limit=2`);
    expect(page2.body.chunks).toMatchObject([{ seq: 3, stream: 'log', text: 'three' }]);
    const page3 = await t.call('GET', `/tasks/${task.id}/output?after=3`);
    expect(page3.body).toEqual({ chunks: [], truncated: false });

    for (const bad of [
      'after=-1',
      'after=abc',
      'after=1e3',
      'after=9007199254740993',
      'limit=0',
      'limit=1001',
      'x=1',
    ]) {
      const r = await t.call('GET', `/tasks/${task.id}/output?${bad}`);
      expect(r.status, bad).toBe(400);
      expect(r.body.error).toBe('validation_failed');
    }
    expect((await t.call('GET', '/tasks/tsk_nope/output')).status).toBe(404);
    expect(
      (await post('tsk_nope', { token: 'x', chunks: [{ stream: 'log', text: 'a' }] })).status,
    ).toBe(404);
  });

  it('refuses a stale token with 409 stale_token and the attempt; nothing is stored', async () => {
    const task = await runningTask();
    const r = await post(task.id, {
      token: 'not-the-token',
      chunks: [{ stream: 'stdout', text: 'x' }],
    });
    expect(r.status).toBe(409);
    expect(r.body).toMatchObject({ error: 'stale_token', attempt: 1 });
    expect(await allOutput(task.id)).toEqual([]);
  });

  it('answers a cancelled task with 409 illegal_transition, state cancelled; nothing is stored', async () => {
    const task = await runningTask();
    expect(
      (await post(task.id, { token: task.token, chunks: [{ stream: 'log', text: 'a' }] })).status,
    ).toBe(202);
    const cancel = await t.call('POST', `/tasks/${task.id}/events`, { type: 'CANCEL' });
    expect(cancel.body.state).toBe('cancelled');
    const r = await post(task.id, { token: task.token, chunks: [{ stream: 'log', text: 'b' }] });
    expect(r.status).toBe(409);
    expect(r.body).toMatchObject({
      error: 'illegal_transition',
      state: 'cancelled',
      event: 'OUTPUT',
    });
    expect((await allOutput(task.id)).map((c) => c.text)).toEqual(['a']);
  });

  it('refuses oversized, non-UTF-8, NUL, unpaired-surrogate and unknown-stream input; nothing is stored', async () => {
    const task = await runningTask();
    const send = (chunks: unknown) => post(task.id, { token: task.token, chunks });
    const big = await send([{ stream: 'stdout', text: 'é'.repeat(32_769) }]);
    expect(big.status).toBe(413);
    expect(big.body).toMatchObject({ error: 'payload_too_large' });
    expect(big.body.issues[0].path).toBe('chunks.0.text');
    const many = await send(Array.from({ length: 1_001 }, () => ({ stream: 'log', text: 'a' })));
    expect(many.status).toBe(413);
    expect(many.body.issues[0].path).toBe('chunks');
    const body = await send(
      Array.from({ length: 20 }, () => ({ stream: 'log', text: 'a'.repeat(60_000) })),
    );
    expect(body.status).toBe(413);

    const raw = Buffer.concat([
      Buffer.from(`{"token":"${task.token}","chunks":[{"stream":"stdout","text":"bad `),
      Buffer.from([0xff, 0xfe, 0xc3]),
      Buffer.from('"}]}'),
    ]);
    const res = await fetch(`${base}/tasks/${task.id}/output`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: raw,
    });
    expect(res.status).toBe(400);
    expect(((await res.json()) as { message: string }).message).toMatch(/UTF-8/);

    for (const text of ['nul \u0000 here', 'lone \ud800 surrogate']) {
      const r = await send([{ stream: 'stdout', text }]);
      expect(r.status, JSON.stringify(text)).toBe(400);
      expect(r.body.error).toBe('validation_failed');
    }
    const stream = await send([{ stream: 'stdin', text: 'a' }]);
    expect(stream.status).toBe(400);
    expect(stream.body.issues[0].path).toBe('chunks.0.stream');
    expect((await send([])).status).toBe(400);
    expect((await post(task.id, { chunks: [{ stream: 'log', text: 'a' }] })).status).toBe(400);
    expect(await allOutput(task.id)).toEqual([]);
  });

  it('gives concurrent writers in two processes gap-free seqs, each request in one run', async () => {
    const task = await runningTask();
    const lines = (w: number, r: number) =>
      Array.from({ length: 10 }, (_, i) => ({ stream: 'stdout' as const, text: `${w}.${r}.${i}` }));
    const results = await Promise.all(
      Array.from({ length: 40 }, async (_, i) => {
        const w = i % 4;
        if (w < 2) {
          const r = await post(task.id, { token: task.token, chunks: lines(w, i) });
          expect(r.status).toBe(202);
          return { w, i, ...r.body };
        }
        return { w, i, ...(await other.write(task.id, task.token, lines(w, i))) };
      }),
    );
    const stored = await allOutput(task.id);
    expect(stored.map((c) => c.seq)).toEqual(Array.from({ length: 400 }, (_, k) => k + 1));
    for (const r of results) {
      expect(r.lastSeq - r.firstSeq).toBe(9);
      expect(stored.slice(r.firstSeq - 1, r.lastSeq).map((c) => c.text)).toEqual(
        lines(r.w, r.i).map((l) => l.text),
      );
    }
  });

  it('an Idempotency-Key makes a repeated write one effect', async () => {
    const task = await runningTask();
    const body = { token: task.token, chunks: [{ stream: 'log', text: 'once' }] };
    const a = await post(task.id, body, { 'idempotency-key': 'out-1' });
    const b = await post(task.id, body, { 'idempotency-key': 'out-1' });
    expect(a.status).toBe(202);
    expect(b.body).toEqual(a.body);
    expect((await allOutput(task.id)).map((c) => c.text)).toEqual(['once']);
  });
});

describe('GET /tasks/:id/output/stream', () => {
  async function open(id: string, lastEventId?: string, signal?: AbortSignal) {
    const res = await fetch(`${base}/tasks/${id}/output/stream`, {
      headers: lastEventId ? { 'last-event-id': lastEventId } : {},
      signal,
    });
    expect(res.status).toBe(200);
    return sseReader(res);
  }

  it('10,000 lines arrive once, in order, across a forced reconnect; the cap holds and truncated is set', async () => {
    const task = await runningTask();
    const TOTAL = 10_000;
    const PER_REQUEST = 100;
    const text = (n: number) => `line ${String(n).padStart(5, '0')} ${'x'.repeat(20)}\n`;
    const received: number[] = [];
    const texts: string[] = [];
    let lastId = '0';
    let ended: SseFrame | null = null;

    // The writer (every other request from the other process) stays at most 1,100 lines
    // (~36 KB) ahead of the reader, so the 64 KiB cap never trims a line before it is read.
    let writing = true;
    const writer = (async () => {
      for (let n = 1; n <= TOTAL; n += PER_REQUEST) {
        while (n - received.length > 1_000) await new Promise((r) => setTimeout(r, 5));
        const chunks = Array.from({ length: PER_REQUEST }, (_, i) => ({
          stream: (i % 2 === 0 ? 'stdout' : 'stderr') as 'stdout' | 'stderr',
          text: text(n + i),
        }));
        if ((n / PER_REQUEST) % 2 < 1) {
          const r = await post(task.id, { token: task.token, chunks });
          expect(r.status).toBe(202);
        } else {
          await other.write(task.id, task.token, chunks);
        }
      }
      writing = false;
      const done = await t.call('POST', `/tasks/${task.id}/events`, {
        type: 'COMPLETE',
        token: task.token,
      });
      expect(done.body.state).toBe('completed');
    })();

    const read = async (abortAt: number | null) => {
      const abort = new AbortController();
      const sse = await open(task.id, lastId, abort.signal);
      for (;;) {
        const frame = await sse.next(20_000);
        if (frame === null) return;
        if (frame.event === 'end') {
          ended = frame;
          return;
        }
        if (frame.event !== 'output') continue;
        const chunk = JSON.parse(frame.data!);
        expect(frame.id).toBe(String(chunk.seq));
        received.push(chunk.seq);
        texts.push(chunk.text);
        lastId = frame.id!;
        if (abortAt !== null && received.length >= abortAt) {
          abort.abort();
          await sse.cancel();
          return;
        }
      }
    };
    await read(4_321);
    expect(writing).toBe(true);
    await read(null);
    await writer;

    expect(received).toEqual(Array.from({ length: TOTAL }, (_, k) => k + 1));
    expect(texts.every((s, k) => s === text(k + 1))).toBe(true);
    expect(JSON.parse((ended as SseFrame | null)?.data ?? '{}')).toEqual({
      state: 'completed',
      truncated: true,
    });
    const kept = await allOutput(task.id);
    const keptBytes = kept.reduce((sum, c) => sum + Buffer.byteLength(c.text), 0);
    expect(keptBytes).toBeLessThanOrEqual(CAP);
    expect(keptBytes).toBeGreaterThan(CAP - text(1).length);
    expect(kept.at(-1)?.seq).toBe(TOTAL);
    expect(kept[0]!.seq).toBeGreaterThan(1);
    const page = await t.call('GET', `/tasks/${task.id}/output?limit=1`);
    expect(page.body.truncated).toBe(true);
  }, 120_000);

  it('resuming after trimmed chunks says which were lost, then ends on a settled task', async () => {
    const task = await runningTask();
    const big = 'y'.repeat(30_000);
    for (let i = 0; i < 4; i++) {
      await post(task.id, { token: task.token, chunks: [{ stream: 'stdout', text: big }] });
    }
    await t.call('POST', `/tasks/${task.id}/events`, { type: 'CANCEL' });
    const sse = await open(task.id, '1');
    const frames: SseFrame[] = [];
    for (;;) {
      const f = await sse.next();
      if (f === null) break;
      if (f.event) frames.push(f);
    }
    expect(frames.map((f) => f.event)).toEqual(['truncated', 'output', 'output', 'end']);
    expect(JSON.parse(frames[0]!.data!)).toEqual({ from: 2, to: 2 });
    expect(frames.slice(1, 3).map((f) => f.id)).toEqual(['3', '4']);
    expect(JSON.parse(frames[3]!.data!)).toEqual({ state: 'cancelled', truncated: true });
  });

  it('caps open output streams per process: 503 with Retry-After', async () => {
    const task = await runningTask();
    const aborts = Array.from({ length: 4 }, () => new AbortController());
    const readers = await Promise.all(aborts.map((a) => open(task.id, undefined, a.signal)));
    const over = await fetch(`${base}/tasks/${task.id}/output/stream`);
    expect(over.status).toBe(503);
    expect(over.headers.get('retry-after')).toBe('1');
    for (const [i, r] of readers.entries()) {
      aborts[i]!.abort();
      await r.cancel();
    }
    const bad = await fetch(`${base}/tasks/${task.id}/output/stream`, {
      headers: { 'last-event-id': 'x1' },
    });
    expect(bad.status).toBe(400);
    expect((await fetch(`${base}/tasks/tsk_none/output/stream`)).status).toBe(404);
  });
});
