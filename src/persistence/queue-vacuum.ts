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
  const conn = await sql.reserve();
  try {
    const [lock] = await conn<{ ok: boolean }[]>`
      select pg_try_advisory_lock(${VACUUM_LOCK_ID}) as ok`;
    if (!lock?.ok) return { vacuumed: [], ran: false };
    try {
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

/** Runs `vacuumQueueTables` every `intervalMs` in the background (0: never). */
export class QueueVacuum {
  private readonly periodic: Periodic;
  private current: { cancel(): void } | null = null;

  constructor(sql: Sql, log: Logger, options: { intervalMs: number; deadRows: number }) {
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
  }

  /** Cancels a VACUUM under way (it leaves nothing half-done) and waits for the run to end. */
  async stop(): Promise<void> {
    const stopped = this.periodic.stop();
    this.current?.cancel();
    await stopped;
  }
}
