/**
 * Task output (CONTRACT section 6): a worker appends chunks with its claim's token, anyone
 * reads them by page or follows them live over Server-Sent Events. Output is not part of
 * the event log; a task keeps at most OUTPUT_MAX_BYTES of it (the oldest chunks go).
 */
import { Hono } from 'hono';
import { streamSSE } from 'hono/streaming';
import { SETTLED_TASK_STATES } from '../../actors/output.js';
import {
  OUTPUT_CHUNK_MAX_BYTES,
  OUTPUT_CHUNKS_MAX,
  OutputBody,
  OutputQuery,
  OutputStreamQuery,
} from '../../api/schemas.js';
import { InvalidInput, NotFound, Unavailable } from '../../errors.js';
import { HttpProblem } from '../errors.js';
import { requestHeader } from '../node-io.js';
import { idempotencyOf, readJson, validate } from '../request.js';
import type { AppEnv, AppServices } from '../services.js';
import { pathId } from './tickets.js';

/** Chunks read from Postgres per query while a stream catches up. */
const STREAM_PAGE = 500;

export function outputRoutes(s: AppServices): Hono<AppEnv> {
  const app = new Hono<AppEnv>();
  const keepAliveMs = s.sse?.keepAliveMs ?? 15_000;
  const maxStreams = s.config.SSE_MAX_CLIENTS;
  const chunkMaxBytes = Math.min(OUTPUT_CHUNK_MAX_BYTES, s.config.OUTPUT_MAX_BYTES);
  // Taken and checked in one synchronous step, as in stream.ts.
  let streams = 0;

  const service = () => {
    if (!s.output) throw new Unavailable('task output is not configured in this process');
    return s.output;
  };

  /** 202 `{firstSeq, lastSeq, attempt}`; 409 stale_token or illegal_transition. */
  app.post('/tasks/:id/output', async (c) => {
    const id = pathId(c.req.param('id'), 'task');
    const output = service();
    const raw = await readJson(c);
    const given = (raw as { chunks?: unknown } | null)?.chunks;
    if (Array.isArray(given) && given.length > OUTPUT_CHUNKS_MAX) {
      const message = `${given.length} chunks, over the ${OUTPUT_CHUNKS_MAX}-chunk cap`;
      throw new HttpProblem('payload_too_large', `chunks: ${message}`, [
        { path: 'chunks', message },
      ]);
    }
    const body = validate(OutputBody, raw, 'body');
    body.chunks.forEach((chunk, i) => {
      const bytes = Buffer.byteLength(chunk.text, 'utf8');
      if (bytes <= chunkMaxBytes) return;
      const message = `${bytes} bytes of UTF-8, over the ${chunkMaxBytes}-byte cap of a chunk`;
      throw new HttpProblem('payload_too_large', `chunks.${i}.text is ${message}`, [
        { path: `chunks.${i}.text`, message },
      ]);
    });
    const idem = idempotencyOf(c, raw);
    if (!idem) {
      return c.json(await output.write(id, body.token, body.chunks), 202);
    }
    // A keyed write commits with its key's record: one effect however often it is sent.
    const res = await s.host.idempotent(idem, async (uow) => ({
      status: 202,
      body: await output.writeIn(uow.tx, id, body.token, body.chunks),
    }));
    return c.json(res.body as object, res.status as 202);
  });

  app.get('/tasks/:id/output', async (c) => {
    const id = pathId(c.req.param('id'), 'task');
    const q = validate(OutputQuery, c.req.query(), 'query');
    const page = await service().read(id, q.after, q.limit);
    if (!page) throw new NotFound('task', id);
    return c.json({ chunks: page.chunks, truncated: page.truncated });
  });

  /**
   * SSE: `id:` the chunk's seq, `event: output`, `data:` the chunk. Resumes after
   * `Last-Event-ID` (or `?after=`). Chunks trimmed away before the client read them show as
   * one `event: truncated` `{from, to}`. When the task is settled (completed, cancelled,
   * failed) and its output delivered: `event: end` `{state, truncated}`, then the stream ends.
   */
  app.get('/tasks/:id/output/stream', async (c) => {
    const id = pathId(c.req.param('id'), 'task');
    const q = validate(OutputStreamQuery, c.req.query(), 'query');
    let after = q.after ?? 0;
    const header = requestHeader(c, 'last-event-id')?.trim();
    if (header) {
      if (!/^\d{1,15}$/.test(header)) {
        throw new InvalidInput('Last-Event-ID must be an output seq', [
          { path: 'Last-Event-ID', message: 'not a non-negative integer' },
        ]);
      }
      after = Number(header);
    }
    const output = service();
    if (streams >= maxStreams) {
      throw new Unavailable(
        `task output streams are at their limit of ${maxStreams} (SSE_MAX_CLIENTS); retry`,
      );
    }
    const first = await output.head(id);
    if (first.state === null) throw new NotFound('task', id);
    if (c.req.method === 'HEAD') {
      return c.body(null, 200, {
        'Content-Type': 'text/event-stream',
        'Cache-Control': 'no-cache',
      });
    }
    const log = s.log.child({ requestId: c.get('requestId'), route: 'output-sse', taskId: id });

    streams++;
    return streamSSE(c, async (stream) => {
      let cursor = after;
      // Level-triggered: a wake-up while a read is under way is not lost.
      let dirty = true;
      let done = false;
      let wake: (() => void) | null = null;
      const poke = () => {
        dirty = true;
        wake?.();
      };
      const finish = () => {
        done = true;
        wake?.();
      };
      stream.onAbort(finish);
      c.req.raw.signal.addEventListener('abort', finish, { once: true });
      if (c.req.raw.signal.aborted) finish();
      const unwatch = output.watch(id, poke);
      const keepAlive = setInterval(() => void stream.write(': keep-alive\n\n'), keepAliveMs);
      try {
        await stream.write(': connected\n\n');
        while (!done) {
          if (!dirty) {
            await new Promise<void>((resolve) => {
              wake = resolve;
            });
            wake = null;
            continue;
          }
          dirty = false;
          // State and last seq come from one statement: once settled, no write can follow
          // (writes hold the task row), so `lastSeq` is the end of the output.
          const head = await output.head(id);
          while (!done && head.lastSeq > cursor) {
            const rows = await output.page(id, cursor, STREAM_PAGE);
            if (rows.length === 0) break;
            const oldest = rows[0]!.seq;
            if (oldest > cursor + 1) {
              await stream.writeSSE({
                event: 'truncated',
                data: JSON.stringify({ from: cursor + 1, to: oldest - 1 }),
              });
            }
            for (const r of rows) {
              if (done) break;
              await stream.writeSSE({
                id: String(r.seq),
                event: 'output',
                data: JSON.stringify(r),
              });
              cursor = r.seq;
            }
          }
          if (!done && head.state !== null && SETTLED_TASK_STATES.has(head.state)) {
            await stream.writeSSE({
              event: 'end',
              data: JSON.stringify({ state: head.state, truncated: head.truncated }),
            });
            break;
          }
        }
      } catch (error) {
        log.error({ err: error }, 'output stream failed');
      } finally {
        clearInterval(keepAlive);
        c.req.raw.signal.removeEventListener('abort', finish);
        unwatch();
        streams--;
      }
    });
  });

  return app;
}
