/**
 * The NATS connection: the first connect has a deadline and fails with an `Unavailable` that
 * names the URL; after that the client reconnects forever, buffering publishes meanwhile
 * (the outbox relay retries anything that timed out).
 */
import { connect, type NatsConnection } from '@nats-io/transport-node';
import { Unavailable } from '../errors.js';
import type { Logger } from '../log.js';

export interface ConnectOptions {
  /** Deadline of the first connect, in ms. */
  timeoutMs?: number;
  /** Connection name shown by the server's monitoring. */
  name?: string;
  log?: Logger;
}

export async function connectNats(
  url: string,
  options: ConnectOptions = {},
): Promise<NatsConnection> {
  let nc: NatsConnection;
  try {
    nc = await connect({
      servers: url,
      name: options.name ?? 'orchestrator',
      timeout: options.timeoutMs ?? 5_000,
      maxReconnectAttempts: -1,
      reconnectTimeWait: 500,
      pingInterval: 10_000,
    });
  } catch (error) {
    const reason = error instanceof Error ? error.message : String(error);
    throw new Unavailable(`NATS at ${url} is not reachable: ${reason}`, { cause: error });
  }
  const log = options.log;
  if (log) void watchStatus(nc, url, log);
  return nc;
}

async function watchStatus(nc: NatsConnection, url: string, log: Logger): Promise<void> {
  try {
    for await (const s of nc.status()) {
      if (s.type === 'disconnect') log.warn({ url }, 'NATS disconnected; reconnecting');
      else if (s.type === 'reconnect') log.info({ url }, 'NATS reconnected');
      else if (s.type === 'error') log.warn({ url, err: s.error }, 'NATS error');
    }
  } catch {
    // the iterator ends with the connection
  }
}
