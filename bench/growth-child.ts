/**
 * A child process of the growth section (run under tsx), driven over IPC:
 * - `memory`: caches N stored tickets in an ActorHost (a BLOCK through the host each, 100
 *   per transaction) and reports the heap growth after a full GC (needs --expose-gc).
 * - `load`: prepares the host (or raw SQL) workload of host-vs-raw.ts at a concurrency,
 *   answers `ready`, runs it for the given seconds on `go`, and answers the latency samples.
 */
import { ActorHost, type UnitOfWork } from '../src/actors/host.js';
import { createSql } from '../src/persistence/db.js';
import { prepareHost, prepareRaw } from './host-vs-raw.js';
import { type LatencyStats, pool } from './stats.js';

type Msg =
  | { type: 'memory'; url: string; ids: string[] }
  | { type: 'load'; url: string; mode: 'host' | 'raw'; concurrency: number }
  | { type: 'go'; seconds: number };

const send = (m: object) => process.send?.(m);
let run: ((durationMs: number) => Promise<LatencyStats & { samples: number[] }>) | null = null;

function heap(): number {
  const gc = (globalThis as { gc?: () => void }).gc;
  if (!gc) throw new Error('growth-child: run with --expose-gc');
  for (let i = 0; i < 4; i++) gc();
  return process.memoryUsage().heapUsed;
}

async function memory(url: string, ids: string[]): Promise<void> {
  const sql = createSql(url, { max: 4, applicationName: 'bench-memory' });
  const host = new ActorHost(sql, {
    cacheSize: ids.length + 1,
    taskDefaults: { maxAttempts: 3, leaseMs: 600_000, retryBaseMs: 1_000 },
  });
  // Warm up: code paths, prepared statements and pools exist before the first reading.
  const toggle = async (uow: UnitOfWork, id: string) => {
    const row = await uow.load('ticket', id);
    const blocked = row.snapshot.value === 'blocked';
    await uow.send('ticket', id, blocked ? { type: 'UNBLOCK' } : { type: 'BLOCK', reason: 'm' });
  };
  await host.transact(async (uow) => {
    for (const id of ids.slice(0, 50)) await toggle(uow, id);
  });
  host.forget();
  const before = heap();
  const batches = Math.ceil(ids.length / 100);
  await pool(batches, 4, async (b) => {
    await host.transact(async (uow) => {
      for (const id of ids.slice(b * 100, b * 100 + 100)) await toggle(uow, id);
    });
  });
  const after = heap();
  const cached = host.cachedActors;
  const [r] = await sql<{ bytes: number }[]>`
    select avg(length(snapshot::text))::int as bytes from tickets where id = any(${ids})`;
  send({ type: 'memory', cached, bytes: after - before, snapshotJson: r?.bytes ?? 0 });
  await sql.end();
}

process.on('message', (m: Msg) => {
  void (async () => {
    if (m.type === 'memory') await memory(m.url, m.ids);
    if (m.type === 'load') {
      const sql = createSql(m.url, { max: m.concurrency + 2, applicationName: 'bench-proc' });
      run = await (m.mode === 'host' ? prepareHost : prepareRaw)(sql, m.concurrency);
      // The untimed warm-up (WARM_UP_MS) here, so that 'go' times only the steady state.
      await run(0);
      send({ type: 'ready' });
    }
    if (m.type === 'go' && run) {
      const { samples, ...stats } = await run(m.seconds * 1000);
      send({ type: 'done', stats, samples });
    }
  })().catch((error: unknown) => {
    process.stderr.write(`growth-child: ${String(error)}\n`);
    process.exit(1);
  });
});
process.on('disconnect', () => process.exit(0));
