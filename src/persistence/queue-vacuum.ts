/**
 * Vacuums the tables work flows through once enough of their rows are dead. Every
 * transition leaves a dead row behind in `events` (published), `tasks` (claimed, settled)
 * or `timers` (fired), and until a vacuum its entries stay in the indexes that the relay,
 * the claim and the timer poller scan from their dead end. Autovacuum may be off, or wait
 * for a fifth of a large table to die; this does not wait for it. Every process runs it;
 * an advisory lock lets one at a time work, and a table below the threshold costs one read
 * of the statistics.
 */
import type { Logger } from '../log.js';
import type { Sql } from './db.js';

/** The tables with hot scans over rows that die as work flows. */
export const QUEUE_TABLES = ['events', 'tasks', 'timers'] as const;

/** Arbitrary, fixed: identifies "the queue vacuum" among advisory locks. */
const VACUUM_LOCK_ID = 7_402_615_011;

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

/** Runs `vacuumQueueTables` every `intervalMs` in the background. */
export class QueueVacuum {
  private timer: NodeJS.Timeout | null = null;
  private running: Promise<unknown> = Promise.resolve();
  private current: { cancel(): void } | null = null;
  private stopped = false;

  constructor(
    private readonly sql: Sql,
    private readonly log: Logger,
    private readonly options: { intervalMs: number; deadRows: number },
  ) {}

  start(): void {
    if (this.options.intervalMs <= 0) return;
    this.stopped = false;
    this.schedule();
  }

  /** Cancels a VACUUM under way (it leaves nothing half-done) and waits for the run to end. */
  async stop(): Promise<void> {
    this.stopped = true;
    if (this.timer) clearTimeout(this.timer);
    this.timer = null;
    this.current?.cancel();
    await this.running;
  }

  private schedule(): void {
    if (this.stopped) return;
    this.timer = setTimeout(() => {
      this.running = vacuumQueueTables(this.sql, this.options.deadRows, (q) => {
        this.current = q;
      })
        .then((r) => {
          if (r.vacuumed.length > 0) this.log.debug({ tables: r.vacuumed }, 'vacuumed');
        })
        .catch((err: unknown) => {
          if (!this.stopped) this.log.warn({ err }, 'queue vacuum failed; retrying');
        })
        .finally(() => {
          this.current = null;
          this.schedule();
        });
    }, this.options.intervalMs);
    this.timer.unref();
  }
}
