/**
 * The HTTP server around the app: Node's http server with @hono/node-server's listener, plus
 * the answers Node gives on its own (a malformed request line, oversized headers, a request
 * with no usable URL) in the API's JSON error shape, as CONTRACT section 2 asks of every error.
 */
import { createServer, type Server, STATUS_CODES } from 'node:http';
import type { Socket } from 'node:net';
import { getRequestListener, RequestError } from '@hono/node-server';
import { refusedRequest } from './errors.js';

export interface HttpServerOptions {
  port: number;
  hostname: string;
}

type Fetch = (request: Request, env: unknown) => Response | Promise<Response>;

const json = (status: number, body: unknown) =>
  new Response(JSON.stringify(body), {
    status,
    headers: { 'Content-Type': 'application/json', Connection: 'close' },
  });

/** Starts listening; resolve on the server's `listening` event. */
export function startHttpServer(fetch: Fetch, options: HttpServerOptions): Server {
  const listener = getRequestListener(fetch, {
    // Only what happens before the app runs lands here: the app answers its own errors.
    errorHandler: (error) => {
      if (error instanceof RequestError) {
        const { status, body } = refusedRequest('REQUEST_TARGET');
        return json(status, body);
      }
      return json(500, { error: 'internal', message: 'internal error' });
    },
  });
  // Node would answer a missing Host with a bare 400 of its own; the listener refuses it
  // (no default hostname is passed) through the handler above instead.
  const server = createServer({ requireHostHeader: false }, listener);
  server.on('clientError', answerClientError);
  server.listen(options.port, options.hostname);
  return server;
}

/**
 * Node's default `clientError` behaviour with a JSON body: answer unless a response is
 * already under way on the socket (that would corrupt it), then close the connection.
 */
function answerClientError(error: NodeJS.ErrnoException, socket: Socket): void {
  const inFlight = (socket as { _httpMessage?: { headersSent?: boolean } })._httpMessage;
  if (error.code === 'ECONNRESET' || !socket.writable || inFlight?.headersSent) {
    socket.destroy();
    return;
  }
  const { status, body } = refusedRequest(error.code);
  const text = JSON.stringify(body);
  socket.end(
    `HTTP/1.1 ${status} ${STATUS_CODES[status] ?? ''}\r\n` +
      'Content-Type: application/json\r\n' +
      `Content-Length: ${Buffer.byteLength(text)}\r\n` +
      `Connection: close\r\n\r\n${text}`,
    () => socket.destroy(),
  );
}
