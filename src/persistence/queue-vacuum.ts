/**
 * Vacuums the tables work flows through once enough of their rows are dead. Transitions
 * leave dead rows behind in `tasks` (claimed, settled) and `timers` (fired), and until a
 * vacuum their entries stay in the indexes that the claim and the timer poller scan from
 * their dead end. (`events` only grows: the relay follows it with a cursor.) Autovacuum may be off, or wait
 * for a fifth of a large table to die; this does not wait for it. Every process runs it;
 * an advisory lock lets one at a time work, and a table below the threshold costs one read
 * of the statistics.
 */
import type { Logger } from '../log.js';
import type { Sql } from './db.js';
import { Periodic } from './periodic.js';

/** The tables with hot scans over rows that die as work flows. */
export const QUEUE_TABLES = ['tasks', 'timers'] as const;

/** Arbitrary, fixed: identifies "the queue vacuum" among advisory locks. */
export const VACUUM_LOCK_ID = 7_402_615_011;

/** Dead rows per queue table of the current schema, as the statistics last reported them. */
export async function deadRows(sql: Sql): Promise<Map<string, number>> {
  const rows = await sql<{ relname: string; dead: number }[]>`
    select relname, n_dead_tup::int8::float8 as dead from pg_stat_user_tables
    where schemaname = current_schema() and relname in ${sql([...QUEUE_TABLES])}`;
  return new Map(rows.map((r) => [r.relname, r.dead]));
}

export interface VacuumRun {
  /** Tables vacuumed, in order. */
  vacuumed: string[];
  /** False when another process held the lock (nothing was done). */
  ran: boolean;
}

/**
 * Vacuums (indexes included) each queue table with at least `threshold` dead rows, on a
 * connection of its own: VACUUM cannot run in a transaction. `onQuery` receives each VACUUM
 * as it starts, so a stop can cancel it.
 */
export async function vacuumQueueTables(
  sql: Sql,
  threshold: number,
  onQuery: (query: { cancel(): void }) => void = () => {},
): Promise<VacuumRun> {
  // Read first on the pool: most runs find nothing to do and need no connection of their own.
  const before = await deadRows(sql);
  if (!QUEUE_TABLES.some((t) => (before.get(t) ?? 0) >= threshold)) {
    return { vacuumed: [], ran: true };
  }
  const conn = await sql.reserve();
  try {
    const [lock] = await conn<{ ok: boolean }[]>`
      select pg_try_advisory_lock(${VACUUM_LOCK_ID}) as ok`;
    if (!lock?.ok) return { vacuumed: [], ran: false };
    try {
      // Again under the lock: another process may have vacuumed meanwhile.
      const dead = await deadRows(conn as unknown as Sql);
      const vacuumed: string[] = [];
      for (const table of QUEUE_TABLES) {
        if ((dead.get(table) ?? 0) < threshold) continue;
        // Index cleanup forced: with few dead pages Postgres skips the indexes, and their dead
        // entries are what the scans walk.
        const query = conn.unsafe(`vacuum (index_cleanup on) ${table}`);
        onQuery(query);
        await query;
        vacuumed.push(table);
      }
      return { vacuumed, ran: true };
    } finally {
      await conn`select pg_advisory_unlock(${VACUUM_LOCK_ID})`;
    }
  } finally {
    conn.release();
  }
}

/**
 * The tables whose hot statements Postgres runs on a generic plan: a prepared statement's plan
 * is made at its first calls, from the table as it is then, and kept until the table's next
 * analyze. Prepared while a table held a few rows, the task rows' write kept a sequential scan
 * of `tasks`, 19.6 ms a call at 100,000 rows, and a fresh deployment's first burst drained at a
 * third of its rate until autovacuum came by (BENCHMARKS section 29).
 */
export const PLANNED_TABLES = ['tasks', 'events', 'ticket_tasks', 'timers', 'tickets'] as const;

/** Arbitrary, fixed: identifies "the growth analyze" among advisory locks. */
export const ANALYZE_LOCK_ID = 7_402_615_012;

/** Tables with fewer live rows are left to autovacuum: their plans are cheap either way. */
export const GROWN_MIN_ROWS = 1_000;

/** How often each process looks for grown tables, at most (the vacuum's interval if shorter). */
export const GROWTH_CHECK_MS = 5_000;

/**
 * Analyzes each of PLANNED_TABLES whose live rows have doubled since its last analyze (and
 * number at least `minRows`), one process at a time; returns the tables analyzed. The analyze
 * makes every session plan its statements on the table again. Autovacuum's analyze waits for
 * a tenth of the table to change and for its next round; a queue filled in a burst ran on the
 * small table's plans meanwhile.
 */
export async function analyzeGrownTables(sql: Sql, minRows = GROWN_MIN_ROWS): Promise<string[]> {
  return sql.begin(async (tx) => {
    const [lock] = await tx<{ ok: boolean }[]>`
      select pg_try_advisory_xact_lock(${ANALYZE_LOCK_ID}) as ok`;
    if (!lock?.ok) return [];
    // A vacuum or analyze of the table under way holds it: wait a little, then try next time.
    await tx`set local lock_timeout = '2s'`;
    const grown = await tx<{ name: (typeof PLANNED_TABLES)[number] }[]>`
      select s.relname::text as name
      from pg_stat_user_tables s join pg_class c on c.oid = s.relid
      where s.schemaname = current_schema() and s.relname in ${tx([...PLANNED_TABLES])}
        and s.n_live_tup >= ${minRows} and s.n_live_tup >= 2 * greatest(c.reltuples, 0)
      order by s.relname`;
    const analyzed: string[] = [];
    for (const { name } of grown) {
      // Only names from PLANNED_TABLES reach the text.
      if (!(PLANNED_TABLES as readonly string[]).includes(name)) continue;
      await tx.unsafe(`analyze ${name}`);
      analyzed.push(name);
    }
    return analyzed;
  });
}

/**
 * Runs `vacuumQueueTables` every `intervalMs` in the background (0: never), and
 * `analyzeGrownTables` every GROWTH_CHECK_MS (or `intervalMs` if shorter; 0: never).
 */
export class QueueVacuum {
  private readonly periodic: Periodic;
  private readonly growth: Periodic;
  private current: { cancel(): void } | null = null;

  constructor(sql: Sql, log: Logger, options: { intervalMs: number; deadRows: number }) {
    this.growth = new Periodic(Math.min(options.intervalMs, GROWTH_CHECK_MS), async () => {
      try {
        const tables = await analyzeGrownTables(sql);
        if (tables.length > 0) log.debug({ tables }, 'analyzed grown tables');
      } catch (err) {
        if (!this.growth.stopping) log.warn({ err }, 'growth analyze failed; retrying');
      }
    });
    this.periodic = new Periodic(options.intervalMs, async () => {
      try {
        const r = await vacuumQueueTables(sql, options.deadRows, (q) => {
          this.current = q;
        });
        if (r.vacuumed.length > 0) log.debug({ tables: r.vacuumed }, 'vacuumed');
      } catch (err) {
        if (!this.periodic.stopping) log.warn({ err }, 'queue vacuum failed; retrying');
      } finally {
        this.current = null;
      }
    });
  }

  start(): void {
    this.periodic.start();
    this.growth.start();
  }

  /** Cancels a VACUUM under way (it leaves nothing half-done) and waits for the runs to end. */
  async stop(): Promise<void> {
    const stopped = Promise.all([this.periodic.stop(), this.growth.stop()]);
    this.current?.cancel();
    await stopped;
  }
}
