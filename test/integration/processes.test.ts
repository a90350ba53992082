/**
 * Several orchestrator processes as an operator runs them: the embedded database survives a
 * restart; two `all` and two `worker` processes on one database complete 200 tasks, each
 * exactly once; an unreachable database is named, not waited on forever.
 */
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import postgres from 'postgres';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { unpublishedCount } from '../../src/persistence/outbox-rows.js';
import { transportNames } from '../../src/transport/subjects.js';
import { createTestDatabase, type TestDatabase } from '../support/database.js';
import {
  type OrchestratorProcess,
  startOrchestrator,
  waitUntil,
} from '../support/orchestrator-process.js';
import { natsAdmin, testNames } from '../support/transport.js';

const names = testNames();
const natsEnv = { NATS_PREFIX: names.prefix, NATS_STREAM: names.stream };
const started: OrchestratorProcess[] = [];
let db: TestDatabase;

beforeAll(async () => {
  db = await createTestDatabase('processes');
});
afterAll(async () => {
  for (const p of started) p.child.kill('SIGKILL');
  await db.drop();
  const admin = await natsAdmin();
  await admin.close([names, transportNames(`${names.prefix}e`, `${names.stream}E`)]);
});

function start(args: string[], env: Record<string, string>, cwd?: string): OrchestratorProcess {
  const p = startOrchestrator(args, { LOG_LEVEL: 'warn', PORT: '0', ...env }, cwd);
  started.push(p);
  return p;
}

async function json<T>(url: string, init?: RequestInit): Promise<{ status: number; body: T }> {
  const res = await fetch(url, {
    ...init,
    headers: { 'content-type': 'application/json', ...init?.headers },
  });
  const text = await res.text();
  return { status: res.status, body: (text ? JSON.parse(text) : null) as T };
}

describe('the embedded database', () => {
  it('starts with no DATABASE_URL, keeps a ticket across kill -9 and restart, exits 0 on SIGTERM', {
    timeout: 180_000,
  }, async () => {
    // Private (mkdtemp makes it 0700), as a checkout in root's home: as root, the embedded
    // server runs as the postgres OS user, which cannot enter it (embedded-private.test.ts).
    const cwd = await mkdtemp(join(tmpdir(), 'orch-embedded-'));
    try {
      const env = { NATS_PREFIX: `${names.prefix}e`, NATS_STREAM: `${names.stream}E` };
      const first = start(['all'], env, cwd);
      const url = await first.url(60_000);
      expect(first.out()).toMatch(/db=embedded/);
      await waitUntil(async () => (await fetch(`${url}/readyz`)).status === 200, 20_000, 'ready');
      const created = await json<{ id: string }>(`${url}/tickets`, {
        method: 'POST',
        body: JSON.stringify({ title: 'kept across restarts' }),
      });
      expect(created.status).toBe(201);
      // kill -9 cannot stop the process's children: its PostgreSQL is left running, and
      // the next start must deal with it rather than fail on the data directory.
      first.child.kill('SIGKILL');
      await first.exited;

      const second = start(['all'], env, cwd);
      const url2 = await second.url(60_000);
      const found = await json<{ title: string }>(`${url2}/tickets/${created.body.id}`);
      expect(found.status).toBe(200);
      expect(found.body.title).toBe('kept across restarts');
      second.child.kill('SIGTERM');
      expect(await second.exited).toBe(0);
    } finally {
      await removeProject(cwd);
    }
  });

  it('replaces the fixed password of an older cluster with a random one, shared by a second process', {
    timeout: 180_000,
  }, async () => {
    const cwd = await mkdtemp(join(tmpdir(), 'orch-embedded-'));
    const env = { NATS_PREFIX: `${names.prefix}e`, NATS_STREAM: `${names.stream}E` };
    const login = async (port: number, password: string) => {
      const sql = postgres({ host: '127.0.0.1', port, user: 'postgres', password, max: 1 });
      try {
        await sql`select 1`;
        return 'ok';
      } catch (error) {
        return (error as { code?: string }).code ?? String(error);
      } finally {
        await sql.end({ timeout: 2 });
      }
    };
    try {
      const first = start(['all'], env, cwd);
      await first.url(60_000);
      const home = await clusterHome(cwd);
      const passwordFile = join(home, 'postgres.password');
      const port = Number(
        (await readFile(join(home, 'postgres', 'postmaster.pid'), 'utf8')).split('\n')[3],
      );
      const original = (await readFile(passwordFile, 'utf8')).trim();
      expect(await login(port, original)).toBe('ok');
      // What a cluster made before random passwords looks like: the fixed one, no file.
      const sql = postgres({
        host: '127.0.0.1',
        port,
        user: 'postgres',
        password: original,
        max: 1,
      });
      await sql.unsafe(`alter role postgres password 'orchestrator'`);
      await sql.end();
      await rm(passwordFile);
      first.child.kill('SIGTERM');
      expect(await first.exited).toBe(0);

      const second = start(['all'], env, cwd);
      const url = await second.url(60_000);
      const replaced = (await readFile(passwordFile, 'utf8')).trim();
      expect(replaced).not.toBe(original);
      expect(replaced).toMatch(/^[A-Za-z0-9_-]{32}$/);
      const port2 = Number(
        (await readFile(join(home, 'postgres', 'postmaster.pid'), 'utf8')).split('\n')[3],
      );
      expect(await login(port2, 'orchestrator')).toBe('28P01');
      expect(await login(port2, replaced)).toBe('ok');

      // A second process in the same directory shares the server, with the same password.
      const third = start(['all'], env, cwd);
      const url3 = await third.url(60_000);
      const created = await json<{ id: string }>(`${url3}/tickets`, {
        method: 'POST',
        body: JSON.stringify({ title: 'through the sharing process' }),
      });
      expect(created.status).toBe(201);
      expect((await json(`${url}/tickets/${created.body.id}`)).status).toBe(200);
      third.child.kill('SIGTERM');
      expect(await third.exited).toBe(0);
      second.child.kill('SIGTERM');
      expect(await second.exited).toBe(0);
      expect(second.out() + second.err() + third.out() + third.err()).not.toContain(replaced);
    } finally {
      await removeProject(cwd);
    }
  });
});

describe('the embedded database, two first starts at once', () => {
  it('one process creates the cluster, the other waits and shares it; both serve and exit 0', {
    timeout: 180_000,
  }, async () => {
    const cwd = await mkdtemp(join(tmpdir(), 'orch-embedded-'));
    const env = { NATS_PREFIX: `${names.prefix}e`, NATS_STREAM: `${names.stream}E` };
    try {
      const both = [start(['all'], env, cwd), start(['all'], env, cwd)];
      const urls = await Promise.all(both.map((p) => p.url(120_000)));
      const created = await json<{ id: string }>(`${urls[0]}/tickets`, {
        method: 'POST',
        body: JSON.stringify({ title: 'seen by both' }),
      });
      expect(created.status).toBe(201);
      expect((await json(`${urls[1]}/tickets/${created.body.id}`)).status).toBe(200);
      // The sharer stops first, so that its database stays up while it does.
      const home = await clusterHome(cwd);
      const ownerPid = Number(await readFile(join(home, 'postgres.owner'), 'utf8'));
      const owner = both.find((p) => p.child.pid === ownerPid);
      const sharer = both.find((p) => p !== owner);
      if (!owner || !sharer) throw new Error(`no process owns the server (${ownerPid})`);
      for (const p of [sharer, owner]) {
        p.child.kill('SIGTERM');
        expect(await p.exited).toBe(0);
      }
    } finally {
      await removeProject(cwd);
    }
  });
});

/** Where the embedded cluster of a project directory lives (see embedded-postgres-layout.ts). */
async function clusterHome(cwd: string): Promise<string> {
  const data = join(cwd, '.data');
  const recorded = await readFile(join(data, 'postgres.cluster'), 'utf8').catch(() => null);
  return recorded ? recorded.trim() : data;
}

async function removeProject(cwd: string): Promise<void> {
  const home = await clusterHome(cwd);
  if (!home.startsWith(cwd)) await rm(home, { recursive: true, force: true });
  await rm(cwd, { recursive: true, force: true });
}

describe('many processes on one database', () => {
  it('two all and two worker processes complete 200 tasks, each exactly once', {
    timeout: 240_000,
  }, async () => {
    const env = {
      DATABASE_URL: db.url,
      ...natsEnv,
      WORKER_CONCURRENCY: '4',
      DB_POOL_MAX: '6',
      TIMER_POLL_MS: '200',
      RECONCILE_MS: '2000',
    };
    const apis = [
      start(['all'], { ...env, WORKER_ID: 'all-1' }),
      start(['all'], { ...env, WORKER_ID: 'all-2' }),
    ];
    const cluster = [
      ...apis,
      start(['worker'], { ...env, WORKER_ID: 'worker-1' }),
      start(['worker'], { ...env, WORKER_ID: 'worker-2' }),
    ];
    const urls = await Promise.all(apis.map((p) => p.url()));

    const ticketIds: string[] = [];
    for (let i = 0; i < 20; i++) {
      const base = urls[i % 2] as string;
      const t = await json<{ id: string }>(`${base}/tickets`, {
        method: 'POST',
        body: JSON.stringify({ title: `load ${i}` }),
      });
      ticketIds.push(t.body.id);
      // Tasks first, then START: a phase's tasks are all there before it can complete (tasks
      // added while it runs may land in the next phase once it advanced).
      await Promise.all(
        Array.from({ length: 10 }, () =>
          json(`${base}/tickets/${t.body.id}/tasks`, {
            method: 'POST',
            body: JSON.stringify({ type: 'work', executor: 'sleep', payload: { ms: 5 } }),
          }),
        ),
      );
      await json(`${base}/tickets/${t.body.id}/events`, {
        method: 'POST',
        body: JSON.stringify({ type: 'START' }),
      });
    }
    await waitUntil(
      async () => {
        const rows = await db.sql`select count(*)::int as n from tasks where state = 'completed'`;
        return rows[0]?.n === 200;
      },
      90_000,
      '200 completed tasks',
    );
    const twice = await db.sql`select entity_id from events where type = 'task.completed'
      group by entity_id having count(*) <> 1`;
    expect(twice).toEqual([]);
    const workers = await db.sql<{ w: string }[]>`
      select distinct split_part(data->>'workerId', '#', 1) as w from events where type = 'task.claimed'`;
    expect(workers.length).toBeGreaterThan(1);
    // Every ticket's requirements phase completed, so each advanced to design exactly once.
    await waitUntil(
      async () => {
        const rows = await db.sql`select count(*)::int as n from tickets where state = 'design'`;
        return rows[0]?.n === 20;
      },
      30_000,
      'every ticket to advance',
    ).catch(async (error: unknown) => {
      // Say where the flow stopped: ticket states, unpublished events, dead letters.
      const states = await db.sql`select state, count(*)::int as n from tickets group by state`;
      const outbox = await unpublishedCount(db.sql);
      const dead = await db.sql`select consumer, error from dead_letters limit 5`;
      const inbox = await db.sql`select consumer, count(*)::int as n from inbox group by consumer`;
      throw new Error(`${String(error)}: ${JSON.stringify({ states, outbox, dead, inbox })}`);
    });
    const advanced = await db.sql`select entity_id, count(*)::int as n from events
      where type = 'ticket.phase_changed' and data->>'to' = 'design' group by entity_id`;
    expect(advanced).toHaveLength(20);
    expect(advanced.every((r) => r.n === 1)).toBe(true);

    await Promise.all(
      cluster.map(async (p) => {
        p.child.kill('SIGTERM');
        expect(await p.exited).toBe(0);
      }),
    );
  });

  it('an unreachable DATABASE_URL stops the process with a message naming it', async () => {
    const p = start(['api'], { DATABASE_URL: 'postgres://postgres@127.0.0.1:1/none', ...natsEnv });
    const code = await p.exited;
    expect(code).not.toBe(0);
    expect(p.err()).toMatch(/DATABASE_URL/);
  });
});
