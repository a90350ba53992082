/**
 * Tickets and tasks per state, kept by migration 0005: the write side is a trigger that
 * appends one delta row per change in the writing transaction; this module reads the
 * totals plus the pending deltas, and folds the deltas into the totals, from any process.
 */
import type { Logger } from '../log.js';
import type { EntityType } from '../machines/index.js';
import type { Db, Sql, Tx } from './db.js';
import { Periodic } from './periodic.js';

export interface StateCount {
  entityType: EntityType;
  state: string;
  n: number;
}

/** Arbitrary, fixed: identifies "the state-count fold" among advisory locks. */
const FOLD_LOCK_ID = 7_402_615_005;
/** Deltas moved per fold statement: bounds one transaction's size after a long backlog. */
const FOLD_BATCH = 10_000;

/**
 * One statement, so one snapshot: a fold that commits meanwhile is seen wholly or not at all.
 * Its cost is the number of states plus the deltas not folded yet (bounded by the fold
 * interval), never the number of tickets or tasks. A state that has had entities and has
 * none now reads 0, so its gauge does not vanish.
 */
export const STATE_COUNTS_SQL = `
  select entity_type as "entityType", state, sum(n)::bigint as n from (
    select entity_type, state, n from state_counts
    union all
    select d.entity_type, c.state, c.n from state_count_deltas d,
      lateral (values (d.from_state, -1), (d.to_state, 1)) as c (state, n)
    where c.state is not null
  ) all_counts
  group by entity_type, state
  order by entity_type, state`;

export async function readStateCounts(db: Db): Promise<StateCount[]> {
  const rows =
    await db.unsafe<{ entityType: EntityType; state: string; n: string }[]>(STATE_COUNTS_SQL);
  return rows.map((r) => ({ entityType: r.entityType, state: r.state, n: Number(r.n) }));
}

/**
 * Moves pending deltas into `state_counts`; returns how many it moved (0 when another
 * process is folding now). Each batch is one transaction: a crash rolls it back whole, and
 * the deltas stay for the next fold.
 */
export async function foldStateCounts(sql: Sql, batch = FOLD_BATCH): Promise<number> {
  let moved = 0;
  for (;;) {
    const n = await sql.begin((tx) => foldBatch(tx as unknown as Tx, batch));
    if (n === null || n === 0) return moved;
    moved += n;
    if (n < batch) return moved;
  }
}

/**
 * One batch of a fold, in the caller's transaction; null when another process holds the
 * fold lock. Under the lock only one transaction deletes deltas at a time, so none is
 * counted twice and two folds never deadlock on each other's rows.
 */
export async function foldBatch(tx: Tx, batch = FOLD_BATCH): Promise<number | null> {
  const [lock] = await tx<
    { ok: boolean }[]
  >`select pg_try_advisory_xact_lock(${FOLD_LOCK_ID}) as ok`;
  if (!lock?.ok) return null;
  const [r] = await tx<{ n: number }[]>`
    with folded as (
      delete from state_count_deltas
      where ctid = any(array(select ctid from state_count_deltas limit ${batch}))
      returning entity_type, from_state, to_state
    ), sums as (
      select f.entity_type, c.state, sum(c.n) as n from folded f,
        lateral (values (f.from_state, -1), (f.to_state, 1)) as c (state, n)
      where c.state is not null
      group by f.entity_type, c.state
    ), upserted as (
      insert into state_counts (entity_type, state, n)
      select entity_type, state, n from sums
      on conflict (entity_type, state) do update set n = state_counts.n + excluded.n
    )
    select count(*)::int as n from folded`;
  return r?.n ?? 0;
}

/** Folds every `intervalMs` in the background; every process runs one (they take turns). */
export class StateCountFolder {
  private readonly periodic: Periodic;

  constructor(sql: Sql, log: Logger, intervalMs = 2_000) {
    this.periodic = new Periodic(intervalMs, () =>
      foldStateCounts(sql).catch((err: unknown) =>
        log.warn({ err }, 'state count fold failed; retrying'),
      ),
    );
  }

  start(): void {
    this.periodic.start();
  }

  stop(): Promise<void> {
    return this.periodic.stop();
  }
}
