/**
 * Bench section `scrape`: what reading the per-state counts for /metrics costs with 1,000
 * and with 100,000 tasks stored, beside the group-by over the tables it replaced (the raw
 * baseline, same run, same data). Rows are seeded with plain SQL, then folded.
 */
import { foldStateCounts, readStateCounts } from '../src/persistence/state-counts.js';
import { scratchDatabase } from './scratch.js';
import { ms, n0, print, ratio, summarize, table } from './stats.js';

const STATES = ['pending', 'claimed', 'running', 'retry_wait', 'completed', 'failed', 'cancelled'];

export interface ScrapeOptions {
  /** Stored task counts to measure at, ascending. */
  sizes: number[];
  /** Reads per figure. */
  reads: number;
}

async function timeReads(reads: number, read: () => Promise<unknown>) {
  const samples: number[] = [];
  await read(); // warm the plan and the cache
  for (let i = 0; i < reads; i++) {
    const t0 = performance.now();
    await read();
    samples.push(performance.now() - t0);
  }
  return summarize(samples, 0);
}

export async function scrapeSection(o: ScrapeOptions): Promise<void> {
  print('## /metrics state counts: totals + pending deltas vs a group-by over the tables');
  print(
    `tasks seeded with insert ... select generate_series (snapshots ~1 KiB), then folded; ${o.reads} reads per figure\n`,
  );
  const db = await scratchDatabase('scrape', { max: 4 });
  try {
    const { sql } = db;
    await sql`insert into tickets (id, state, phase, title, machine_version, snapshot, version,
        seq, created_at, updated_at)
      values ('bench-ticket', 'implementation', 'implementation', 'bench', 1, '{}', 1, 0,
        now(), now())`;
    const groupBy = () => sql`
      select 'ticket' as "entityType", state, count(*)::int as n from tickets group by state
      union all
      select 'task' as "entityType", state, count(*)::int as n from tasks group by state`;
    const rows: (string | number)[][] = [];
    let stored = 0;
    for (const size of o.sizes) {
      const t0 = performance.now();
      await sql`insert into tasks (id, ticket_id, type, phase, state, executor, priority, attempt,
          machine_version, snapshot, version, seq, created_at, updated_at)
        select 'bench-' || g, 'bench-ticket', 'work', 'implementation',
          (${STATES}::text[])[1 + g % ${STATES.length}], 'external', 0, 1, 1,
          jsonb_build_object('value', 'completed', 'context', jsonb_build_object('pad', repeat('x', 1000))),
          1, 1, now(), now()
        from generate_series(${stored + 1}::int, ${size}::int) g`;
      const seeded = performance.now() - t0;
      const f0 = performance.now();
      const folded = await foldStateCounts(sql);
      const foldMs = performance.now() - f0;
      await sql`vacuum analyze tasks`;
      await sql`vacuum analyze state_count_deltas`;
      stored = size;
      const counts = await timeReads(o.reads, () => readStateCounts(sql));
      const raw = await timeReads(o.reads, groupBy);
      // Exactness is the point: the two must agree before either figure means anything.
      const total = (await readStateCounts(sql))
        .filter((c) => c.entityType === 'task')
        .reduce((s, c) => s + c.n, 0);
      if (total !== size) throw new Error(`bench: counts say ${total} tasks, ${size} stored`);
      rows.push([
        n0(size),
        ms(counts.p50),
        ms(counts.p99),
        ms(raw.p50),
        ms(raw.p99),
        ratio(raw.p50, counts.p50),
        `${n0(folded)} in ${ms(foldMs)} ms (seed ${ms(seeded)} ms)`,
      ]);
    }
    print(
      table(
        [
          'tasks stored',
          'counts p50 ms',
          'counts p99 ms',
          'group-by p50 ms',
          'group-by p99 ms',
          'group-by / counts',
          'deltas folded',
        ],
        rows,
      ),
    );
  } finally {
    await db.drop();
  }
}
