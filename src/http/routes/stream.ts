/**
 * `GET /events/stream`: Server-Sent Events of every domain event, in event-log order, from
 * the process's one live feed. `id:` is the event's log position (`pos`), `event:` the type,
 * `data:` the log entry. `Last-Event-ID` (or `?after=`) resumes after a position, exactly
 * (`?after=new`: from now on); `?entityId=` filters. Each client has a bounded queue: one
 * that cannot keep up reads from Postgres at its own pace instead of slowing the server or
 * anyone else. A comment every keep-alive interval keeps proxies open. At most
 * SSE_MAX_CLIENTS streams are open per process: beyond, 503 `unavailable` with `Retry-After`.
 * `HEAD` answers the status and headers a `GET` would get now, without opening anything.
 */
import type { ServerResponse } from 'node:http';
import { RESPONSE_ALREADY_SENT } from '@hono/node-server/utils/response';
import { type Context, Hono } from 'hono';
import { streamSSE } from 'hono/streaming';
import { StreamQuery } from '../../api/schemas.js';
import { InvalidInput, Unavailable } from '../../errors.js';
import { requestHeader } from '../node-io.js';
import { validate } from '../request.js';
import type { AppEnv, AppServices, EventFeed, StreamMessage } from '../services.js';

/** Where a client's frames go: the Node response itself, or a web stream. */
interface SseSink {
  /** Resolves once the bytes are handed on (after `drain` when the socket is full). */
  write(bytes: Uint8Array | string): Promise<unknown>;
  /** Calls `listener` when the client hangs up. */
  onAbort(listener: () => void): void;
  /** Cuts the response off (a client that cannot keep up). */
  abort(): void;
  /** Ends the response once the client's stream is over. */
  end(): void;
}

const SSE_HEADERS = {
  'Content-Type': 'text/event-stream',
  'Cache-Control': 'no-cache',
  Connection: 'keep-alive',
} as const;

/**
 * The Node response of a request served by @hono/node-server, written directly: a web
 * stream in between (Hono's `streamSSE`, then the server piping it into the response) cost
 * a third of the server's CPU per client per event with 1,000 clients. Null elsewhere (a
 * test's `app.request`, another runtime): those get `streamSSE`.
 */
function nodeSink(c: Context<AppEnv>): SseSink | null {
  const outgoing = (c.env as { outgoing?: ServerResponse } | undefined)?.outgoing;
  if (!outgoing || outgoing.headersSent) return null;
  outgoing.writeHead(200, { ...SSE_HEADERS, 'X-Request-Id': c.get('requestId') });
  outgoing.flushHeaders();
  return {
    write: (bytes) =>
      new Promise<void>((resolve) => {
        if (outgoing.destroyed || outgoing.writableEnded) return resolve();
        if (outgoing.write(bytes)) return resolve();
        // The socket's buffer is full: go on when it drains, or when the client is gone.
        const done = () => {
          outgoing.off('drain', done);
          outgoing.off('close', done);
          resolve();
        };
        outgoing.on('drain', done);
        outgoing.on('close', done);
      }),
    onAbort: (listener) => {
      outgoing.once('close', listener);
    },
    abort: () => {
      outgoing.destroy();
    },
    end: () => {
      if (!outgoing.writableEnded) outgoing.end();
    },
  };
}

/**
 * An event's SSE frame (the layout of hono's `writeSSE`), encoded once per event however
 * many clients receive it: the live feed hands every client the same entry object.
 */
const frames = new WeakMap<object, Uint8Array>();
const encoder = new TextEncoder();
function frame(m: StreamMessage): Uint8Array {
  let bytes = frames.get(m.entry);
  if (bytes === undefined) {
    const { seq, entityId, entityType, type, data, at } = m.entry;
    const json = JSON.stringify({ seq, entityId, entityType, type, data, at });
    // Event types are machine-defined names; a line break would end the field early.
    const event = type.replace(/[\r\n]/g, ' ');
    bytes = encoder.encode(`event: ${event}\ndata: ${json}\nid: ${m.position}\n\n`);
    frames.set(m.entry, bytes);
  }
  return bytes;
}

export function streamRoutes(s: AppServices): Hono<AppEnv> {
  const app = new Hono<AppEnv>();
  const keepAliveMs = s.sse?.keepAliveMs ?? 15_000;
  const bufferLimit = s.sse?.bufferLimit ?? 1_000;
  const maxClients = s.config.SSE_MAX_CLIENTS;
  // A plain counter, not an @xstate/store: admission must be decided and taken in one
  // synchronous step, and nothing subscribes to the count.
  let clients = 0;

  app.get('/events/stream', async (c) => {
    const q = validate(StreamQuery, c.req.query(), 'query');
    const header = requestHeader(c, 'last-event-id');
    let after: number | 'new' = q.after ?? 0;
    if (header !== undefined && header.trim() !== '') {
      if (!/^\d{1,15}$/.test(header.trim())) {
        throw new InvalidInput('Last-Event-ID must be a stream position', [
          { path: 'Last-Event-ID', message: 'not a non-negative integer' },
        ]);
      }
      after = Number(header.trim());
    }
    const source = s.events;
    if (!source) throw new Unavailable('the live event stream is not configured');
    if (clients >= maxClients) {
      throw new Unavailable(
        `the live event stream is at its limit of ${maxClients} clients (SSE_MAX_CLIENTS); retry`,
      );
    }
    // Hono answers HEAD by running the GET handler and dropping the body: a stream opened
    // here would never be read nor closed.
    if (c.req.method === 'HEAD') {
      return c.body(null, 200, {
        'Content-Type': 'text/event-stream',
        'Cache-Control': 'no-cache',
      });
    }
    const log = s.log.child({ requestId: c.get('requestId'), route: 'sse' });

    clients++;
    const pump = async (stream: SseSink) => {
      // Each queued message with the resolver of the promise its delivery waits on: a source
      // that waits (the live feed) keeps this queue at one, and holds the backlog itself.
      const queue: { m: StreamMessage; written: () => void }[] = [];
      let lastSent = after === 'new' ? 0 : after;
      let wake: (() => void) | null = null;
      let done = false;
      const finish = () => {
        done = true;
        for (const q of queue.splice(0)) q.written();
        wake?.();
      };
      stream.onAbort(finish);
      c.req.raw.signal.addEventListener('abort', finish, { once: true });
      if (c.req.raw.signal.aborted) finish();
      let feed: EventFeed | null = null;
      const keepAlive = setInterval(() => void stream.write(': keep-alive\n\n'), keepAliveMs);
      try {
        feed = await source.subscribeEvents(
          after,
          q.entityId,
          (m) =>
            new Promise<void>((written) => {
              if (done) return written();
              if (queue.length >= bufferLimit) {
                log.warn({ bufferLimit, lastSent }, 'slow SSE client disconnected');
                written();
                finish();
                stream.abort();
                return;
              }
              queue.push({ m, written });
              wake?.();
            }),
          { bufferLimit },
        );
        // The feed ended on its own (the process stops): end the response; the client resumes.
        void feed.done?.then(finish, finish);
        await stream.write(': connected\n\n');
        while (!done) {
          if (queue.length === 0) {
            await new Promise<void>((resolve) => {
              wake = resolve;
            });
            wake = null;
            continue;
          }
          // Everything queued goes out in one write: under a burst, one syscall per client
          // per batch instead of per event.
          const batch = queue.splice(0);
          try {
            const chunks: Uint8Array[] = [];
            for (const { m } of batch) {
              // A message the client already has (a source that repeats itself).
              if (m.position <= lastSent) continue;
              chunks.push(frame(m));
              lastSent = m.position;
            }
            if (chunks.length > 0) {
              await stream.write(
                chunks.length === 1 ? (chunks[0] as Uint8Array) : Buffer.concat(chunks),
              );
            }
          } finally {
            for (const { written } of batch) written();
          }
        }
      } catch (error) {
        log.error({ err: error }, 'SSE stream failed');
      } finally {
        clearInterval(keepAlive);
        c.req.raw.signal.removeEventListener('abort', finish);
        finish();
        stream.end();
        try {
          await feed?.close();
        } catch {
          // The feed bounds its own close; nothing more to do for a client that is gone.
        } finally {
          clients--;
        }
      }
    };
    const direct = nodeSink(c);
    if (direct) {
      void pump(direct);
      // @hono/node-server's marker: it writes nothing more. (A header the app's middleware
      // sets on it afterwards, X-Request-Id, is ignored; the head above carries it.)
      return RESPONSE_ALREADY_SENT;
    }
    // streamSSE ends the response itself when the callback returns.
    return streamSSE(c, (stream) =>
      pump({
        write: (bytes) => stream.write(bytes),
        onAbort: (listener) => stream.onAbort(listener),
        abort: () => stream.abort(),
        end: () => {},
      }),
    );
  });

  return app;
}
