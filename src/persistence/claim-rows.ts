/**
 * SQL of the claim protocol. Candidates are pending tasks in priority-then-age order, read
 * with `FOR UPDATE SKIP LOCKED` so concurrent claimers never pick the same row. A
 * worktree or a capped task type is serialised with a transaction-scoped advisory lock
 * before it is checked, so the check holds until the claim commits, in every process.
 */
import { type ActorRow, type RawRow, toRow } from './actor-rows.js';
import type { Tx } from './db.js';

export interface ClaimFilter {
  executors: string[];
  /** Task types to take; undefined = any. */
  types?: string[] | undefined;
  /** Types at their cap right now: skipped without locking their rows. */
  excludeTypes?: string[];
}

export interface Candidate {
  id: string;
  type: string;
  executor: string;
  worktree: string | null;
  /**
   * The task's whole row, read under the candidate's lock: current within the transaction, so
   * the claim decides on it without reading the row a second time.
   */
  row: ActorRow;
}

type CandidateRaw = RawRow & Omit<Candidate, 'row'>;

const LOCK_NS_WORKTREE = 7_402_616;
const LOCK_NS_TYPE_CAP = 7_402_617;

export async function lockCandidates(
  tx: Tx,
  filter: ClaimFilter,
  limit: number,
): Promise<Candidate[]> {
  const types = filter.types && filter.types.length > 0 ? filter.types : null;
  const rows = await tx<CandidateRaw[]>`
    select id, type, executor, worktree, machine_version, snapshot, version, seq, feedback
    from tasks
    where state = 'pending' and executor in ${tx(filter.executors)}
      ${types ? tx`and type in ${tx(types)}` : tx``}
      ${filter.excludeTypes?.length ? tx`and type not in ${tx(filter.excludeTypes)}` : tx``}
      and (worktree is null or not exists (
        select 1 from tasks held where held.worktree = tasks.worktree
          and held.state in ('claimed', 'running')))
    order by priority desc, created_at, id
    limit ${limit}
    for update skip locked`;
  return rows.map((r) => ({
    id: r.id,
    type: r.type,
    executor: r.executor,
    worktree: r.worktree,
    row: toRow('task', r),
  }));
}

/**
 * Takes the worktree's lock until commit without waiting for it; true when the lock was free
 * and no other task holds the worktree. A lock held elsewhere means another claim of this
 * worktree is being decided right now: skipping it (rather than waiting) keeps claim
 * transactions to at most one blocking lock each, so they cannot deadlock.
 */
export async function worktreeFree(tx: Tx, worktree: string): Promise<boolean> {
  const [lock] = await tx<{ ok: boolean }[]>`
    select pg_try_advisory_xact_lock(${LOCK_NS_WORKTREE}, hashtext(${worktree})) as ok`;
  if (!lock?.ok) return false;
  const rows = await tx`select 1 from tasks where worktree = ${worktree}
    and state in ('claimed', 'running') limit 1`;
  return rows.length === 0;
}

/** Locks the type's cap until commit; true when fewer than `cap` tasks of it are active. */
export async function belowCap(tx: Tx, type: string, cap: number): Promise<boolean> {
  await tx`select pg_advisory_xact_lock(${LOCK_NS_TYPE_CAP}, hashtext(${type}))`;
  const rows = await tx<{ n: number }[]>`select count(*)::int as n from tasks
    where type = ${type} and state in ('claimed', 'running')`;
  return (rows[0]?.n ?? 0) < cap;
}

/** Capped types whose active count has reached the cap (read without locks: a pre-filter). */
export async function typesAtCap(tx: Tx, caps: Record<string, number>): Promise<string[]> {
  const types = Object.keys(caps);
  if (types.length === 0) return [];
  const rows = await tx<{ type: string; n: number }[]>`select type, count(*)::int as n from tasks
    where type in ${tx(types)} and state in ('claimed', 'running') group by type`;
  return rows.filter((r) => r.n >= (caps[r.type] ?? Number.POSITIVE_INFINITY)).map((r) => r.type);
}
