/**
 * A ticket with N tasks (default 5,000) read over HTTP, page by page, while a real
 * `bin/orchestrator all` process drains it: the requirement is that such a ticket stays
 * readable in milliseconds while its tasks run.
 *
 * Setup (in this process): one ticket, started, and N `sleep` tasks of 0 ms added 100 per
 * transaction; a second, 10-task ticket the same way. Their events are relayed and reacted
 * to before the child starts. Then a `bin/orchestrator all` process (WORKER_CONCURRENCY=8)
 * drains both while this process reads, one request at a time, back to back:
 * `GET /tickets/:id` (the ticket with its first page of tasks and `tasksNext`), then
 * `GET /tickets/:id/tasks?cursor=…` for the next page, walking the whole list over the rounds
 * and starting again from `tasksNext` after the last page. Each kind's latency (request sent
 * to body parsed) is kept apart, and so are the tasks completed meanwhile (drain rate).
 *
 * Baselines from the same process and run, once every task is complete and the tickets
 * have advanced: the same reads on the big ticket, idle, and on the 10-task ticket, idle.
 *
 * BENCH_BIG_TICKET_SPLIT=1 runs an `api` process for the reads and a `worker` process for the
 * draining instead of one `all` process; BENCH_DEBUG=1 also lists the slowest reads while
 * draining with when they happened (start-up or steady state).
 */

import { type ChildProcess, spawn } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { Commands } from '../src/actors/commands.js';
import { ActorHost } from '../src/actors/host.js';
import { freePort } from '../src/infra/free-port.js';
import { anyUnpublished } from '../src/persistence/outbox-rows.js';
import { TICKET_TASKS_PAGE } from '../src/persistence/queries.js';
import { settleSetup } from './fixtures.js';
import {
  benchNames,
  dropStreams,
  NATS_URL,
  scratchDatabase,
  waitForConnections,
} from './scratch.js';
import { ms, n0, print, ratio, sleep, summarize, table, until } from './stats.js';

const POOL_MAX = 10;
const ADDS_PER_TRANSACTION = 100;
const SMALL_TASKS = 10;

interface Kind {
  samples: number[];
  /** Tasks per page seen (items of the page). */
  pageSize: number;
  /** Largest response body seen, in bytes. */
  bytes: number;
  /** When each sample was taken, in seconds since the reads began (BENCH_DEBUG). */
  at: number[];
}

interface Reads {
  ticket: Kind;
  page: Kind;
  seconds: number;
}

export async function bigTicketSection(o: { tasks: number; seconds: number }): Promise<void> {
  // BENCH_BIG_TICKET_SPLIT=1: an `api` process serves the reads and a `worker` process
  // drains, to tell the HTTP server's own share of the latency from the shared event loop's.
  const split = process.env.BENCH_BIG_TICKET_SPLIT === '1';
  print('## A ticket with N tasks read page by page while it drains');
  print(
    `\none ticket of ${n0(o.tasks)} \`sleep\` tasks (0 ms) drained by ${split ? 'a `bin/orchestrator worker` process (WORKER_CONCURRENCY=8) while this process reads it over HTTP from a `bin/orchestrator api` process' : 'a `bin/orchestrator all` process (WORKER_CONCURRENCY=8) while this process reads it over HTTP from the same process'}, one request at a time\n`,
  );
  const db = await scratchDatabase('bigticket', { max: POOL_MAX });
  const names = benchNames();
  const children: ChildProcess[] = [];
  try {
    const host = new ActorHost(db.sql, {
      taskDefaults: { maxAttempts: 3, leaseMs: 30_000, retryBaseMs: 1_000 },
    });
    const commands = new Commands(host, {
      stuckAfterMs: 3_600_000,
      diagnosticCooldownMs: 3_600_000,
    });
    const ticketWith = async (tasks: number): Promise<string> => {
      // Started first, so that its tasks belong to the phase it is in and complete it.
      const { value: id } = await host.transact(async (uow) => {
        const t = await commands.createTicket(uow, { title: `bench ${tasks} tasks` });
        await uow.send('ticket', t.id, { type: 'START' });
        return t.id;
      });
      for (let added = 0; added < tasks; added += ADDS_PER_TRANSACTION) {
        const n = Math.min(ADDS_PER_TRANSACTION, tasks - added);
        await host.transact(async (uow) => {
          for (let i = 0; i < n; i++) {
            await commands.addTask(uow, id, {
              type: 'bench',
              executor: 'sleep',
              payload: { ms: 0 },
            });
          }
        });
      }
      return id;
    };
    const setupStarted = performance.now();
    const big = await ticketWith(o.tasks);
    const small = await ticketWith(SMALL_TASKS);
    const setupSeconds = (performance.now() - setupStarted) / 1000;

    // Relay the setup's events and let every reaction settle before the process starts.
    await settleSetup(db.sql, host, names);
    const [p] = await db.sql<{ phase: string }[]>`select phase from tickets where id = ${big}`;
    const phase = p?.phase;
    if (!phase) throw new Error('bench: the big ticket has no phase');

    const notCompleted = async (ticketId: string): Promise<number> => {
      const [r] = await db.sql<{ n: number }[]>`
        select count(*)::int as n from tasks where ticket_id = ${ticketId} and state <> 'completed'`;
      return r?.n ?? -1;
    };
    if ((await notCompleted(big)) !== o.tasks) {
      throw new Error('bench: the big ticket does not hold its tasks, all pending');
    }

    const roles = split ? (['api', 'worker'] as const) : (['all'] as const);
    await waitForConnections((POOL_MAX + 10) * roles.length, 'bigticket process');
    const port = await freePort();
    const base = `http://127.0.0.1:${port}`;
    const bin = fileURLToPath(new URL('../bin/orchestrator', import.meta.url));
    const nodeArgs = (process.env.BENCH_WORKER_NODE_ARGS ?? '').split(' ').filter(Boolean);
    let dead = false;
    const exits: Promise<unknown>[] = [];
    for (const role of roles) {
      const c = spawn(process.execPath, [...nodeArgs, bin, role], {
        env: {
          ...process.env,
          DATABASE_URL: db.url,
          NATS_URL,
          NATS_PREFIX: names.prefix,
          NATS_STREAM: names.stream,
          HOST: '127.0.0.1',
          PORT: String(port),
          API_TOKEN: '',
          WORKFLOWS_DIR: '',
          WORKER_CONCURRENCY: '8',
          DB_POOL_MAX: String(POOL_MAX),
          LOG_LEVEL: process.env.BENCH_WORKER_LOG_LEVEL ?? 'warn',
        },
        stdio: ['ignore', process.env.BENCH_DEBUG ? 'inherit' : 'ignore', 'inherit'],
      });
      children.push(c);
      exits.push(
        new Promise((resolve) => c.once('exit', resolve)).then((code) => {
          dead = true;
          return code;
        }),
      );
    }
    const exited = Promise.all(exits);
    const alive = () => {
      if (dead) throw new Error('bench: an orchestrator process exited');
    };
    const spawned = performance.now();
    await until(
      async () => {
        alive();
        const res = await fetch(`${base}/readyz`).catch(() => null);
        if (!res) return false;
        await res.arrayBuffer();
        return res.status === 200;
      },
      120_000,
      'the orchestrator process to be ready',
      50,
    );
    const readyAfter = (performance.now() - spawned) / 1000;

    const get = async (path: string, kind: Kind): Promise<unknown> => {
      const res = await fetch(`${base}${path}`);
      const text = await res.text();
      if (res.status !== 200) throw new Error(`bench: GET ${path} answered ${res.status}: ${text}`);
      kind.bytes = Math.max(kind.bytes, Buffer.byteLength(text));
      return JSON.parse(text);
    };
    /** Reads `id` round after round until `done()` is true (checked between rounds). */
    const readWhile = async (id: string, done: () => boolean): Promise<Reads> => {
      const reads: Reads = {
        ticket: { samples: [], pageSize: 0, bytes: 0, at: [] },
        page: { samples: [], pageSize: 0, bytes: 0, at: [] },
        seconds: 0,
      };
      const started = performance.now();
      let cursor: string | null = null;
      while (!done()) {
        alive();
        let t0 = performance.now();
        const ticket = (await get(`/tickets/${id}`, reads.ticket)) as {
          tasks: unknown[];
          tasksNext: string | null;
        };
        reads.ticket.samples.push(performance.now() - t0);
        reads.ticket.at.push((t0 - started) / 1000);
        reads.ticket.pageSize = Math.max(reads.ticket.pageSize, ticket.tasks.length);
        cursor ??= ticket.tasksNext;
        if (!cursor) continue; // one page holds every task: nothing further to walk
        t0 = performance.now();
        const page = (await get(
          `/tickets/${id}/tasks?cursor=${encodeURIComponent(cursor)}`,
          reads.page,
        )) as {
          items: unknown[];
          nextCursor: string | null;
        };
        reads.page.samples.push(performance.now() - t0);
        reads.page.at.push((t0 - started) / 1000);
        reads.page.pageSize = Math.max(reads.page.pageSize, page.items.length);
        cursor = page.nextCursor;
      }
      reads.seconds = (performance.now() - started) / 1000;
      return reads;
    };

    // While draining: the reads stop when the big ticket has no task left not completed.
    let draining = true;
    const leftAtStart = await notCompleted(big);
    const watchStarted = performance.now();
    const watcher = (async () => {
      try {
        while (draining) {
          alive();
          if ((await notCompleted(big)) === 0) return;
          if (performance.now() - watchStarted > 1_800_000) {
            throw new Error('bench: timed out waiting for the big ticket to drain');
          }
          await sleep(100);
        }
      } finally {
        draining = false; // the reads stop too, whether it drained or failed
      }
    })();
    const whileDraining = await readWhile(big, () => !draining).finally(() => {
      draining = false;
    });
    await watcher;
    const drained = leftAtStart;

    // Idle: every task complete, both tickets advanced, nothing left to relay.
    await until(
      async () => {
        alive();
        const [r] = await db.sql<{ tasks: number; tickets: number }[]>`
          select (select count(*)::int from tasks where state <> 'completed') as tasks,
            (select count(*)::int from tickets where phase = ${phase}) as tickets`;
        return r?.tasks === 0 && r?.tickets === 0 && !(await anyUnpublished(db.sql));
      },
      300_000,
      'every task to complete and both tickets to advance',
      100,
    );
    await sleep(1_000);
    const timed = (seconds: number) => {
      const end = performance.now() + seconds * 1000;
      return () => performance.now() >= end;
    };
    const bigIdle = await readWhile(big, timed(o.seconds));
    const smallIdle = await readWhile(small, timed(o.seconds));

    for (const c of children) c.kill('SIGTERM');
    const codes = await Promise.race([exited, sleep(15_000).then(() => 'timeout' as const)]);

    if (process.env.BENCH_DEBUG) {
      for (const [kind, k] of [
        ['ticket', whileDraining.ticket],
        ['page', whileDraining.page],
      ] as const) {
        const slowest = k.samples
          .map((v, i) => [v, k.at[i] ?? 0] as const)
          .sort((a, b) => b[0] - a[0])
          .slice(0, 15)
          .map(([v, at]) => `${ms(v)} ms at ${at.toFixed(1)} s`);
        process.stderr.write(`slowest ${kind} reads while draining: ${slowest.join(', ')}\n`);
      }
    }
    const rows: (string | number)[][] = [];
    const row = (label: string, loaded: Kind, idle: Kind, seconds: number) => {
      const l = summarize(loaded.samples, whileDraining.seconds);
      const i = summarize(idle.samples, seconds);
      const max = loaded.samples.length ? (loaded.samples[loaded.samples.length - 1] ?? 0) : 0;
      rows.push([
        label,
        n0(l.count),
        ms(l.p50),
        ms(l.p99),
        ms(max),
        n0(i.count),
        ms(i.p50),
        ms(i.p99),
        ratio(l.p50, i.p50),
        ratio(l.p99, i.p99),
      ]);
    };
    row(
      `GET /tickets/:id (${n0(o.tasks)} tasks) vs same idle`,
      whileDraining.ticket,
      bigIdle.ticket,
      bigIdle.seconds,
    );
    row(
      `GET /tickets/:id/tasks?cursor (${n0(o.tasks)}) vs same idle`,
      whileDraining.page,
      bigIdle.page,
      bigIdle.seconds,
    );
    row(
      `GET /tickets/:id (${n0(o.tasks)} tasks) vs ${SMALL_TASKS}-task idle`,
      whileDraining.ticket,
      smallIdle.ticket,
      smallIdle.seconds,
    );
    print(
      table(
        [
          'read',
          'draining n',
          'p50 ms',
          'p99 ms',
          'max ms',
          'idle n',
          'idle p50',
          'idle p99',
          'p50 ratio',
          'p99 ratio',
        ],
        rows,
      ),
    );
    print();
    print(
      `- while draining: ${whileDraining.seconds.toFixed(1)} s of reads, ${n0(drained)} tasks completed meanwhile (${n0(drained / whileDraining.seconds)} tasks/s); the process was ready ${readyAfter.toFixed(1)} s after spawning and its workers claim from start-up, so the reads began with ${n0(leftAtStart)} of ${n0(o.tasks)} tasks not completed.`,
    );
    print(
      `- page size: ${whileDraining.ticket.pageSize} tasks in GET /tickets/:id (TICKET_TASKS_PAGE ${TICKET_TASKS_PAGE}), ${Math.max(whileDraining.page.pageSize, bigIdle.page.pageSize)} per GET /tickets/:id/tasks page (its default limit); each round reads the ticket, then the next page, walking all ${n0(Math.ceil(o.tasks / TICKET_TASKS_PAGE))} pages and starting again.`,
    );
    print(
      `- response bodies, largest: GET /tickets/:id ${n0(whileDraining.ticket.bytes)} bytes (${n0(bigIdle.ticket.bytes)} idle, ${n0(smallIdle.ticket.bytes)} for the ${SMALL_TASKS}-task ticket, whose page holds ${smallIdle.ticket.pageSize} tasks: that row compares pages of different sizes as well), a tasks page ${n0(Math.max(whileDraining.page.bytes, bigIdle.page.bytes))} bytes.`,
    );
    print(
      `- idle: after every task completed and both tickets advanced, ${o.seconds} s each on the ${n0(o.tasks)}-task ticket and on a ${SMALL_TASKS}-task ticket (its GET /tickets/:id/tasks reads: none, one page holds it). Setup: ${setupSeconds.toFixed(1)} s to add the tasks, ${ADDS_PER_TRANSACTION} per transaction; ${split ? 'the processes' : 'the process'} exited with ${String(codes)} on SIGTERM.`,
    );
  } finally {
    for (const c of children) if (c.exitCode === null && c.signalCode === null) c.kill('SIGKILL');
    await dropStreams(names).catch(() => {});
    await db.drop();
  }
}
