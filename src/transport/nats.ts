/**
 * The NATS connection: the first connect has a deadline and fails with an `Unavailable` that
 * names the URL (never its password); after that the client reconnects forever, buffering
 * publishes meanwhile (the outbox relay retries anything that timed out).
 *
 * Authentication: a credentials file (`NATS_CREDS`), TLS files (`NATS_TLS_CA`,
 * `NATS_TLS_CERT`, `NATS_TLS_KEY`) and `user:pass@` or `token@` in the URL. nats.js v3 drops
 * a URL's userinfo when it parses the server list, so it is taken out here and passed as
 * `user`/`pass` (or `token`). The files are read at start: one that cannot be read is a
 * `ConfigError` naming its variable, not a connection failure later.
 */
import { readFileSync } from 'node:fs';
import {
  type ConnectionOptions,
  connect,
  credsAuthenticator,
  type NatsConnection,
  type TlsOptions,
} from '@nats-io/transport-node';
import { ConfigError } from '../config.js';
import { Unavailable } from '../errors.js';
import type { Logger } from '../log.js';

/** Paths of the credentials and TLS files; any TLS file turns TLS on. */
export interface NatsAuthFiles {
  /** NATS_CREDS: a credentials file (user JWT and nkey seed). */
  credsFile?: string | undefined;
  /** NATS_TLS_CA: CA bundle that signed the server's certificate. */
  tlsCaFile?: string | undefined;
  /** NATS_TLS_CERT and NATS_TLS_KEY: a client certificate and its key. */
  tlsCertFile?: string | undefined;
  tlsKeyFile?: string | undefined;
}

export interface ConnectOptions {
  /** Deadline of the first connect, in ms. */
  timeoutMs?: number;
  /** Connection name shown by the server's monitoring. */
  name?: string;
  log?: Logger;
  auth?: NatsAuthFiles;
}

export async function connectNats(
  url: string,
  options: ConnectOptions = {},
): Promise<NatsConnection> {
  const shown = redactNatsUrl(url);
  const { servers, user, pass, token } = splitCredentials(url);
  const auth = readAuthFiles(options.auth ?? {});
  let nc: NatsConnection;
  try {
    nc = await connect({
      servers,
      name: options.name ?? 'orchestrator',
      timeout: options.timeoutMs ?? 5_000,
      maxReconnectAttempts: -1,
      reconnectTimeWait: 500,
      pingInterval: 10_000,
      // Every JetStream publish is a request, and by default each request captures a stack
      // at its start (an Error for the request, another for its timeout) in case it fails:
      // the relay paid that for every event. A failure keeps its class and its cause.
      noAsyncTraces: true,
      ...(user !== undefined ? { user, pass: pass ?? '' } : {}),
      ...(token !== undefined ? { token } : {}),
      ...auth,
    });
  } catch (error) {
    const reason = error instanceof Error ? error.message : String(error);
    throw new Unavailable(`NATS at ${shown} is not reachable: ${scrub(reason, pass, token)}`, {
      cause: error,
    });
  }
  const log = options.log;
  if (log) void watchStatus(nc, shown, log);
  return nc;
}

/** The URL (or comma-separated list) with every password or token replaced by `***`. */
export function redactNatsUrl(url: string): string {
  return url
    .split(',')
    .map((u) => {
      const m = USERINFO.exec(u.trim());
      if (!m) return u.trim();
      const [, scheme = '', info = '', rest = ''] = m;
      const colon = info.indexOf(':');
      return `${scheme}${colon >= 0 ? `${info.slice(0, colon)}:***` : '***'}@${rest}`;
    })
    .join(',');
}

/** `scheme://userinfo@host...`: the scheme is optional, the userinfo ends at the last `@`. */
const USERINFO = /^([a-z][a-z0-9+.-]*:\/\/)?([^/]*)@([^@]*)$/i;

interface SplitUrl {
  servers: string[];
  user?: string;
  pass?: string;
  token?: string;
}

/** Takes the credentials out of the server URLs (the first URL that has some wins). */
export function splitCredentials(url: string): SplitUrl {
  const out: SplitUrl = { servers: [] };
  let found = false;
  for (const raw of url.split(',')) {
    const u = raw.trim();
    if (!u) continue;
    const m = USERINFO.exec(u);
    if (!m) {
      out.servers.push(u);
      continue;
    }
    const [, scheme = '', info = '', rest = ''] = m;
    out.servers.push(`${scheme}${rest}`);
    if (found) continue;
    found = true;
    const colon = info.indexOf(':');
    if (colon >= 0) {
      out.user = decode(info.slice(0, colon));
      out.pass = decode(info.slice(colon + 1));
    } else {
      out.token = decode(info);
    }
  }
  return out;
}

function decode(s: string): string {
  try {
    return decodeURIComponent(s);
  } catch {
    return s;
  }
}

function scrub(text: string, ...secrets: (string | undefined)[]): string {
  let out = text;
  for (const s of secrets) if (s) out = out.split(s).join('***');
  return out;
}

function readAuthFiles(files: NatsAuthFiles): Pick<ConnectionOptions, 'authenticator' | 'tls'> {
  const out: Pick<ConnectionOptions, 'authenticator' | 'tls'> = {};
  if (files.credsFile) {
    const creds = readConfigured('NATS_CREDS', files.credsFile);
    if (!creds.includes('-----BEGIN NATS USER JWT-----') || !/SEED/.test(creds)) {
      throw new ConfigError([
        `NATS_CREDS: ${files.credsFile} is not a NATS credentials file (user JWT and nkey seed)`,
      ]);
    }
    out.authenticator = credsAuthenticator(new TextEncoder().encode(creds));
  }
  if (Boolean(files.tlsCertFile) !== Boolean(files.tlsKeyFile)) {
    throw new ConfigError(['NATS_TLS_CERT and NATS_TLS_KEY must be set together']);
  }
  if (files.tlsCaFile || files.tlsCertFile) {
    const tls: TlsOptions = {};
    if (files.tlsCaFile) tls.ca = readConfigured('NATS_TLS_CA', files.tlsCaFile);
    if (files.tlsCertFile) tls.cert = readConfigured('NATS_TLS_CERT', files.tlsCertFile);
    if (files.tlsKeyFile) tls.key = readConfigured('NATS_TLS_KEY', files.tlsKeyFile);
    out.tls = tls;
  }
  return out;
}

function readConfigured(variable: string, path: string): string {
  try {
    return readFileSync(path, 'utf8');
  } catch (error) {
    const reason = (error as NodeJS.ErrnoException).code ?? String(error);
    throw new ConfigError([`${variable}: cannot read ${path} (${reason})`]);
  }
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
