/**
 * Task output: lines/s accepted by POST /tasks/:id/output at 16 concurrent writers (one
 * running task each, the client in another process, fetch with keep-alive), at 1 and 10
 * lines per request, beside POST /tasks/:id/events HEARTBEAT on the same tasks in the same
 * run: what a line of output costs next to the cheapest transition. The server's group
 * commit is shown as requests per transaction.
 */
import type { ChildProcess } from 'node:child_process';
import type { Server } from 'node:http';
import { Commands } from '../src/actors/commands.js';
import { ActorHost } from '../src/actors/host.js';
import { TaskOutput } from '../src/actors/output.js';
import { configWith } from '../src/config.js';
import { createApp } from '../src/http/app.js';
import { machineCatalog } from '../src/http/machines.js';
import { silentLogger } from '../src/log.js';
import { Queries } from '../src/persistence/queries.js';
import { ClaimService } from '../src/workers/claims.js';
import { Wakeups } from '../src/workers/wakeups.js';
import { listen, runningTasks } from './fixtures.js';
import { forkTs, isType, nextMessage, scratchDatabase } from './scratch.js';
import { type LatencyStats, ms, n0, print, ratio, table } from './stats.js';

const WRITERS = 16;
const TASK_DEFAULTS = { maxAttempts: 3, leaseMs: 600_000, retryBaseMs: 1_000 };
type Loaded = LatencyStats & { type: 'loaded'; errors: number };

export async function outputSection(o: { seconds: number }): Promise<void> {
  print('## Task output');
  const db = await scratchDatabase('output', { max: 20 });
  const host = new ActorHost(db.sql, { taskDefaults: TASK_DEFAULTS });
  const commands = new Commands(host, { stuckAfterMs: 3_600_000, diagnosticCooldownMs: 3_600_000 });
  const claims = new ClaimService(host, new Wakeups(), { typeLimits: {}, maxWaitMs: 0 });
  // The default cap (1 MiB): long runs trim on every write, as a chatty task would.
  const output = new TaskOutput(db.sql, { maxBytes: 1_048_576, host });
  let child: ChildProcess | null = null;
  let server: Server | null = null;
  try {
    await output.start();
    const app = createApp({
      host,
      commands,
      claims,
      queries: new Queries(db.sql),
      machines: machineCatalog(),
      log: silentLogger(),
      config: configWith({ CLAIM_MAX_WAIT_MS: '0' }),
      output,
      ready: async () => ({ postgres: true, nats: true, migrations: true }),
    });
    const listening = await listen(app.fetch);
    server = listening.server;
    const url = listening.url;
    const tasks = await runningTasks(host, commands, WRITERS);

    child = forkTs('./http-load.ts');
    const c = child;
    const load = async (paths: string[], bodies: string[]) => {
      c.send({
        type: 'load',
        url,
        method: 'POST',
        paths,
        bodies,
        concurrency: WRITERS,
        seconds: o.seconds,
      });
      const r = await nextMessage<Loaded>(c, isType<Loaded>('loaded'));
      if (r.errors > 0) print(`!! ${r.errors} non-2xx answers to POST ${paths[0]}`);
      return r;
    };
    const line = `${'x'.repeat(79)}\n`;
    const outputBody = (t: { token: string }, lines: number) =>
      JSON.stringify({
        token: t.token,
        chunks: Array.from({ length: lines }, (_, i) => ({
          stream: i % 2 ? 'stderr' : 'stdout',
          text: line,
        })),
      });
    const rows: (string | number)[][] = [];
    const heartbeat = await load(
      tasks.map((t) => `/tasks/${t.id}/events`),
      tasks.map((t) => JSON.stringify({ type: 'HEARTBEAT', token: t.token })),
    );
    rows.push([
      'POST /tasks/:id/events HEARTBEAT',
      n0(heartbeat.perSecond),
      '-',
      ms(heartbeat.p50),
      ms(heartbeat.p99),
      '-',
      '1.00',
    ]);
    for (const lines of [1, 10]) {
      const before = { ...output.stats };
      const r = await load(
        tasks.map((t) => `/tasks/${t.id}/output`),
        tasks.map((t) => outputBody(t, lines)),
      );
      const requests = output.stats.requests - before.requests;
      const commits = output.stats.commits - before.commits;
      rows.push([
        `POST /tasks/:id/output, ${lines} line${lines > 1 ? 's' : ''} of 80 B`,
        n0(r.perSecond),
        n0(r.perSecond * lines),
        ms(r.p50),
        ms(r.p99),
        (requests / Math.max(1, commits)).toFixed(1),
        ratio(r.perSecond, heartbeat.perSecond),
      ]);
    }
    print(
      `\n### ${WRITERS} concurrent writers, one running task each (client in another process)\n`,
    );
    print(
      table(
        [
          'request',
          'req/s',
          'lines/s',
          'p50 ms',
          'p99 ms',
          'requests per commit',
          'req/s vs HEARTBEAT',
        ],
        rows,
      ),
    );
  } finally {
    child?.disconnect();
    claims.close();
    if (server) {
      const s = server;
      await new Promise<void>((resolve) => {
        s.close(() => resolve());
        if ('closeAllConnections' in s) s.closeAllConnections();
      });
    }
    await output.stop();
    await db.drop();
  }
}
