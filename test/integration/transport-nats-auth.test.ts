/**
 * Connecting to a NATS server that asks for credentials: user and password in the URL (which
 * nats.js alone would drop), TLS with a private CA, unreadable credential files, and no
 * password in any message. Each case runs its own `nats-server` child.
 */

import { type ChildProcess, execFileSync, spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { jetstreamManager } from '@nats-io/jetstream';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { ActorHost } from '../../src/actors/host.js';
import { ConfigError } from '../../src/config.js';
import { Unavailable } from '../../src/errors.js';
import { freePort, reachable } from '../../src/infra/free-port.js';
import { unpublishedCount } from '../../src/persistence/outbox-rows.js';
import { connectNats, redactNatsUrl, splitCredentials } from '../../src/transport/nats.js';
import { createTestDatabase } from '../support/database.js';
import { TASK_DEFAULTS } from '../support/fixtures.js';
import { startTransport, testNames } from '../support/transport.js';

const NATS_SERVER = '/usr/sbin/nats-server';
let dir: string;
const children: ChildProcess[] = [];

beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'orch-nats-auth-'));
});
afterEach(() => {
  for (const c of children.splice(0)) c.kill('SIGTERM');
});
afterAll(() => rm(dir, { recursive: true, force: true }));

/** A nats-server child with JetStream and `args`; resolves with its port once it listens. */
async function natsServer(args: string[]): Promise<number> {
  const port = await freePort();
  const store = await mkdtemp(join(dir, 'js-'));
  const child = spawn(
    NATS_SERVER,
    ['-a', '127.0.0.1', '-p', String(port), '-js', '-sd', store, ...args],
    {
      stdio: 'ignore',
    },
  );
  children.push(child);
  const deadline = Date.now() + 10_000;
  while (!(await reachable('127.0.0.1', port, 200))) {
    if (child.exitCode !== null || Date.now() > deadline)
      throw new Error('nats-server did not start');
    await new Promise((r) => setTimeout(r, 50));
  }
  return port;
}

describe('NATS credentials', () => {
  const user = 'orch';
  const pass = 'p@ss:w/rd s3cret';
  const encoded = `${user}:${encodeURIComponent(pass)}`;

  it('user and password in the URL are used; without them the start fails clearly, naming no password', async () => {
    const port = await natsServer(['--user', user, '--pass', pass]);
    const nc = await connectNats(`nats://${encoded}@127.0.0.1:${port}`, { timeoutMs: 3_000 });
    const jsm = await jetstreamManager(nc);
    await jsm.streams.add({ name: 'AUTH_CHECK', subjects: ['auth.>'] });
    expect((await jsm.streams.info('AUTH_CHECK')).config.name).toBe('AUTH_CHECK');
    await nc.close();

    const none = await connectNats(`nats://127.0.0.1:${port}`, { timeoutMs: 3_000 }).catch(
      (e: unknown) => e,
    );
    expect(none).toBeInstanceOf(Unavailable);
    expect((none as Error).message).toMatch(/Authorization/i);
    expect((none as Error).message).toContain(`nats://127.0.0.1:${port}`);

    const wrongPass = 'wrong-secret-42';
    const wrong = await connectNats(`nats://${user}:${wrongPass}@127.0.0.1:${port}`, {
      timeoutMs: 3_000,
    }).catch((e: unknown) => e);
    expect(wrong).toBeInstanceOf(Unavailable);
    expect((wrong as Error).message).toMatch(/Authorization/i);
    expect((wrong as Error).message).not.toContain(wrongPass);
    expect((wrong as Error).message).toContain(`nats://${user}:***@127.0.0.1:${port}`);
  });

  it('the transport starts with the URL credentials and publishes its outbox', async () => {
    const port = await natsServer(['--user', user, '--pass', pass]);
    const db = await createTestDatabase('transport_auth');
    try {
      const host = new ActorHost(db.sql, { taskDefaults: TASK_DEFAULTS });
      const names = testNames();
      const t = await startTransport(db.sql, host, names, {
        natsUrl: `nats://${encoded}@127.0.0.1:${port}`,
        reactions: () => [],
        enableReconciler: false,
      });
      try {
        expect(t.connected()).toBe(true);
        await host.create('ticket', {
          id: `tk-auth-${names.prefix}`,
          title: 'auth',
          stuckAfterMs: 3_600_000,
          diagnosticCooldownMs: 3_600_000,
        });
        const deadline = Date.now() + 10_000;
        let left = 1;
        while (left > 0 && Date.now() < deadline) {
          left = await unpublishedCount(db.sql);
          await new Promise((r) => setTimeout(r, 50));
        }
        expect(left).toBe(0);
        expect((await t.jsm.streams.info(names.stream)).state.messages).toBe(1);
      } finally {
        await t.stop();
      }
      const failed = await startTransport(db.sql, host, testNames(), {
        natsUrl: `nats://127.0.0.1:${port}`,
      }).catch((e: unknown) => e);
      expect(failed).toBeInstanceOf(Unavailable);
      expect((failed as Error).message).toMatch(/Authorization/i);
    } finally {
      await db.drop();
    }
  });

  it('URL credentials are split from the server list and redacted in messages', () => {
    expect(splitCredentials(`nats://${encoded}@h1:4222,nats://h2:4222`)).toEqual({
      servers: ['nats://h1:4222', 'nats://h2:4222'],
      user,
      pass,
    });
    expect(splitCredentials('tls://tok3n@h:4222')).toEqual({
      servers: ['tls://h:4222'],
      token: 'tok3n',
    });
    expect(splitCredentials('nats://h:4222')).toEqual({ servers: ['nats://h:4222'] });
    expect(redactNatsUrl(`nats://${encoded}@h1:4222,nats://tok3n@h2:4222`)).toBe(
      'nats://orch:***@h1:4222,nats://***@h2:4222',
    );
  });

  it('an unreadable credentials or TLS file is a configuration error naming its variable', async () => {
    const missing = join(dir, 'missing.creds');
    const creds = await connectNats('nats://127.0.0.1:4222', {
      auth: { credsFile: missing },
    }).catch((e: unknown) => e);
    expect(creds).toBeInstanceOf(ConfigError);
    expect((creds as Error).message).toContain('NATS_CREDS');
    expect((creds as Error).message).toContain(missing);
    const garbage = join(dir, 'garbage.creds');
    await writeFile(garbage, 'not a creds file');
    const bad = await connectNats('nats://127.0.0.1:4222', { auth: { credsFile: garbage } }).catch(
      (e: unknown) => e,
    );
    expect(bad).toBeInstanceOf(ConfigError);
    expect((bad as Error).message).toContain('NATS_CREDS');
    for (const [variable, auth] of [
      ['NATS_TLS_CA', { tlsCaFile: missing }],
      ['NATS_TLS_CERT', { tlsCertFile: missing, tlsKeyFile: garbage }],
      ['NATS_TLS_KEY', { tlsCertFile: garbage, tlsKeyFile: missing }],
    ] as const) {
      const e = await connectNats('nats://127.0.0.1:4222', { auth }).catch((x: unknown) => x);
      expect(e).toBeInstanceOf(ConfigError);
      expect((e as Error).message).toContain(variable);
    }
    const half = await connectNats('nats://127.0.0.1:4222', {
      auth: { tlsCertFile: garbage },
    }).catch((e: unknown) => e);
    expect(half).toBeInstanceOf(ConfigError);
    expect((half as Error).message).toContain('NATS_TLS_KEY');
  });
});

describe.skipIf(!existsSync('/usr/bin/openssl'))('NATS over TLS', () => {
  it('with NATS_TLS_CA the client trusts a server signed by a private CA; without it, it does not', async () => {
    const tls = await mkdtemp(join(dir, 'tls-'));
    const openssl = (...args: string[]) =>
      execFileSync('openssl', args, { cwd: tls, stdio: 'ignore' });
    const ec = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes'];
    openssl(
      'req',
      '-x509',
      ...ec,
      '-keyout',
      'ca.key',
      '-out',
      'ca.pem',
      '-days',
      '1',
      '-subj',
      '/CN=orch test CA',
    );
    openssl('req', ...ec, '-keyout', 'server.key', '-out', 'server.csr', '-subj', '/CN=127.0.0.1');
    await writeFile(join(tls, 'ext.cnf'), 'subjectAltName=IP:127.0.0.1,DNS:localhost\n');
    openssl(
      'x509',
      '-req',
      '-in',
      'server.csr',
      '-CA',
      'ca.pem',
      '-CAkey',
      'ca.key',
      '-CAcreateserial',
      '-out',
      'server.pem',
      '-days',
      '1',
      '-extfile',
      'ext.cnf',
    );
    const port = await natsServer([
      '--tls',
      '--tlscert',
      join(tls, 'server.pem'),
      '--tlskey',
      join(tls, 'server.key'),
    ]);

    const nc = await connectNats(`nats://127.0.0.1:${port}`, {
      timeoutMs: 3_000,
      auth: { tlsCaFile: join(tls, 'ca.pem') },
    });
    await nc.flush();
    expect(nc.info?.tls_required).toBe(true);
    await nc.close();

    const untrusted = await connectNats(`nats://127.0.0.1:${port}`, { timeoutMs: 3_000 }).catch(
      (e: unknown) => e,
    );
    expect(untrusted).toBeInstanceOf(Unavailable);
    expect((untrusted as Error).message).toMatch(/certificate/i);
  });
});
