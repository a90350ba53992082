/**
 * When no `NATS_URL` was given and nothing answers on the default port, the orchestrator
 * starts `nats-server` from the PATH as its child, with JetStream and its store under
 * `<DATA_DIR>/nats`, and stops it on exit. Without one installed it says how to get one.
 */
import { type ChildProcess, spawn, spawnSync } from 'node:child_process';
import { mkdir, readFile, rm, writeFile } from 'node:fs/promises';
import { resolve } from 'node:path';
import { Unavailable } from '../errors.js';
import type { Logger } from '../log.js';
import { freePort, reachable } from './free-port.js';
import { alive, commandLine, stopPid } from './processes.js';

export const DEFAULT_NATS_URL = 'nats://127.0.0.1:4222';

export interface NatsEndpoint {
  url: string;
  stop(): Promise<void>;
}

const INSTALL_HINT = [
  'No NATS server answers at nats://127.0.0.1:4222 and no `nats-server` is installed.',
  'Install one: Debian/Ubuntu `apt-get install nats-server`, macOS `brew install nats-server`,',
  'or run the official container: `docker run -p 4222:4222 nats -js`.',
  'Or point NATS_URL at a running server with JetStream enabled (e.g. NATS_URL=nats://host:4222).',
].join('\n');

export interface NatsDefaults {
  /** Where an unconfigured orchestrator looks first (the default URL's port). */
  probePort?: number;
  /** The server binary looked up on the PATH. */
  binary?: string;
}

export async function resolveNats(
  configured: string | undefined,
  dataDir: string,
  log: Logger,
  defaults: NatsDefaults = {},
): Promise<NatsEndpoint> {
  if (configured) return { url: configured, stop: async () => {} };
  const probePort = defaults.probePort ?? 4222;
  if (await reachable('127.0.0.1', probePort)) {
    return { url: `nats://127.0.0.1:${probePort}`, stop: async () => {} };
  }
  const binary = defaults.binary ?? 'nats-server';
  if (spawnSync(binary, ['--version']).error) throw new Unavailable(INSTALL_HINT);
  const storeDir = resolve(dataDir, 'nats');
  await mkdir(storeDir, { recursive: true });
  const stateFile = resolve(dataDir, 'nats.state');
  const previous = await readState(stateFile, storeDir);
  if (previous) {
    if (previous.owner !== process.pid && alive(previous.owner)) {
      // Another orchestrator in this directory runs it: share it, and leave stopping to it.
      log.info(
        { port: previous.port, owner: previous.owner },
        'sharing the nats-server of process',
      );
      return { url: `nats://127.0.0.1:${previous.port}`, stop: async () => {} };
    }
    // Left running by an orchestrator that was killed (kill -9 cannot stop its children).
    log.warn({ natsPid: previous.pid }, 'stopping a nats-server left by a killed process');
    await stopPid(previous.pid, 'SIGTERM');
  }
  const port = await freePort();
  const child = spawn(binary, ['-a', '127.0.0.1', '-p', String(port), '-js', '-sd', storeDir], {
    stdio: ['ignore', 'ignore', 'pipe'],
  });
  child.stderr?.on('data', (b: Buffer) =>
    log.debug({ component: 'nats-server' }, b.toString().trim()),
  );
  const deadline = Date.now() + 10_000;
  while (!(await reachable('127.0.0.1', port, 200))) {
    if (child.exitCode !== null || Date.now() > deadline) {
      child.kill('SIGKILL');
      throw new Unavailable(`nats-server did not start on 127.0.0.1:${port}`);
    }
    await new Promise((r) => setTimeout(r, 50));
  }
  const state: ChildState = { owner: process.pid, pid: child.pid ?? 0, port };
  await writeFile(stateFile, JSON.stringify(state));
  log.info({ port, storeDir }, 'started nats-server as a child process');
  return {
    url: `nats://127.0.0.1:${port}`,
    stop: async () => {
      await stopChild(child);
      await rm(stateFile, { force: true });
    },
  };
}

interface ChildState {
  owner: number;
  pid: number;
  port: number;
}

/** The nats-server a previous start left, if it still runs with this store directory. */
async function readState(file: string, storeDir: string): Promise<ChildState | null> {
  const text = await readFile(file, 'utf8').catch(() => null);
  if (text === null) return null;
  try {
    const s = JSON.parse(text) as ChildState;
    if (!(s.pid > 0) || !alive(s.pid)) return null;
    // A recycled pid is not ours to stop or share.
    return (await commandLine(s.pid)).includes(storeDir) ? s : null;
  } catch {
    return null;
  }
}

function stopChild(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null) return Promise.resolve();
  return new Promise((resolve) => {
    const timer = setTimeout(() => child.kill('SIGKILL'), 5_000);
    child.once('exit', () => {
      clearTimeout(timer);
      resolve();
    });
    child.kill('SIGTERM');
  });
}
