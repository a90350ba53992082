/**
 * With no NATS_URL and nothing on the default port, the orchestrator runs `nats-server` from
 * the PATH as its child (JetStream, store under DATA_DIR) and stops it on exit; with no
 * nats-server installed it says how to get one instead of hanging.
 */
import { mkdtemp, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { jetstreamManager } from '@nats-io/jetstream';
import { connect } from '@nats-io/transport-node';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { Unavailable } from '../../src/errors.js';
import { freePort, reachable } from '../../src/infra/free-port.js';
import { resolveNats } from '../../src/infra/nats-child.js';
import { silentLogger } from '../../src/log.js';

let dir: string;
beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'orch-nats-child-'));
});
afterAll(() => rm(dir, { recursive: true, force: true }));

it('starts nats-server with JetStream as a child when nothing answers, and stops it', async () => {
  const unused = await freePort();
  const nats = await resolveNats(undefined, dir, silentLogger(), { probePort: unused });
  expect(nats.url).not.toBe(`nats://127.0.0.1:${unused}`);
  const nc = await connect({ servers: nats.url });
  const jsm = await jetstreamManager(nc);
  await jsm.streams.add({ name: 'CHILD_CHECK', subjects: ['child.>'] });
  expect((await jsm.streams.info('CHILD_CHECK')).config.name).toBe('CHILD_CHECK');
  await nc.close();
  expect(await readdir(join(dir, 'nats'))).not.toHaveLength(0);
  await nats.stop();
  const port = Number(new URL(nats.url.replace('nats://', 'http://')).port);
  expect(await reachable('127.0.0.1', port, 300)).toBe(false);
});

it('after a kill -9 of its owner, the next start stops the orphaned child and starts anew', async () => {
  const own = await mkdtemp(join(tmpdir(), 'orch-nats-orphan-'));
  try {
    const unused = await freePort();
    const first = await resolveNats(undefined, own, silentLogger(), { probePort: unused });
    const firstPort = Number(new URL(first.url.replace('nats://', 'http://')).port);
    // Its owner "was killed": the state file names a process that no longer exists.
    const state = JSON.parse(await readFile(join(own, 'nats.state'), 'utf8'));
    await writeFile(join(own, 'nats.state'), JSON.stringify({ ...state, owner: 2 ** 22 + 7 }));
    const second = await resolveNats(undefined, own, silentLogger(), { probePort: unused });
    expect(second.url).not.toBe(first.url);
    expect(await reachable('127.0.0.1', firstPort, 300)).toBe(false);
    // While its owner lives (here: another live process, our parent), a start shares it.
    const current = JSON.parse(await readFile(join(own, 'nats.state'), 'utf8'));
    expect(current.owner).toBe(process.pid);
    await writeFile(join(own, 'nats.state'), JSON.stringify({ ...current, owner: process.ppid }));
    const sharing = await resolveNats(undefined, own, silentLogger(), { probePort: unused });
    expect(sharing.url).toBe(second.url);
    await sharing.stop(); // a sharer does not stop it
    const secondPort = Number(new URL(second.url.replace('nats://', 'http://')).port);
    expect(await reachable('127.0.0.1', secondPort, 300)).toBe(true);
    await second.stop();
    expect(await reachable('127.0.0.1', secondPort, 300)).toBe(false);
  } finally {
    await rm(own, { recursive: true, force: true });
  }
});

it('uses what answers on the default port, and a configured URL as given', async () => {
  const shared = await resolveNats(undefined, dir, silentLogger());
  expect(shared.url).toBe('nats://127.0.0.1:4222');
  const given = await resolveNats('nats://10.0.0.1:4222', dir, silentLogger());
  expect(given.url).toBe('nats://10.0.0.1:4222');
});

it('without nats-server installed, says how to install one or set NATS_URL', async () => {
  const unused = await freePort();
  const attempt = resolveNats(undefined, dir, silentLogger(), {
    probePort: unused,
    binary: 'nats-server-not-installed',
  });
  await expect(attempt).rejects.toBeInstanceOf(Unavailable);
  await expect(attempt).rejects.toThrow(/apt-get install nats-server[\s\S]*NATS_URL/);
});
