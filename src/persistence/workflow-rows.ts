/**
 * SQL for the workflow registry: immutable (name, version) rows. Registrations of one name
 * take turns on a transaction-scoped advisory lock, so concurrent registrations never skip
 * or repeat a version, and the same definition (by canonical hash) finds its version.
 */
import type { Db, Sql } from './db.js';

export interface WorkflowRow {
  name: string;
  version: number;
  definition: unknown;
  hash: string;
  createdAt: Date;
}

interface RawRow {
  name: string;
  version: number;
  definition: unknown;
  hash: string;
  created_at: Date;
}

const toRow = (r: RawRow): WorkflowRow => ({
  name: r.name,
  version: r.version,
  definition: r.definition,
  hash: r.hash,
  createdAt: r.created_at,
});

/** Arbitrary, fixed: the namespace of "a workflow name's registration lock". */
const REGISTER_LOCK_NS = 7_402_606;

/**
 * Inserts the definition as the name's next version, unless a version with the same hash
 * exists: then returns that one with `created: false`.
 */
export async function registerWorkflowRow(
  sql: Sql,
  name: string,
  definition: unknown,
  hash: string,
): Promise<{ row: WorkflowRow; created: boolean }> {
  return sql.begin(async (tx) => {
    await tx`select pg_advisory_xact_lock(${REGISTER_LOCK_NS}, hashtext(${name}))`;
    const same = await tx<RawRow[]>`select name, version, definition, hash, created_at
      from workflows where name = ${name} and hash = ${hash}`;
    if (same[0]) return { row: toRow(same[0]), created: false };
    const inserted = await tx<RawRow[]>`insert into workflows (name, version, definition, hash)
      select ${name}, coalesce(max(version), 0) + 1, ${tx.json(definition as never)}, ${hash}
      from workflows where name = ${name}
      returning name, version, definition, hash, created_at`;
    return { row: toRow(inserted[0] as RawRow), created: true };
  }) as Promise<{ row: WorkflowRow; created: boolean }>;
}

export async function loadWorkflowRow(
  db: Db,
  name: string,
  version: number,
): Promise<WorkflowRow | null> {
  const rows = await db<RawRow[]>`select name, version, definition, hash, created_at
    from workflows where name = ${name} and version = ${version}`;
  return rows[0] ? toRow(rows[0]) : null;
}

export async function latestWorkflowRow(db: Db, name: string): Promise<WorkflowRow | null> {
  const rows = await db<RawRow[]>`select name, version, definition, hash, created_at
    from workflows where name = ${name} order by version desc limit 1`;
  return rows[0] ? toRow(rows[0]) : null;
}

/** The latest version of each name, by name, at most `limit`. */
export async function latestWorkflowRows(db: Db, limit: number): Promise<WorkflowRow[]> {
  const rows = await db<RawRow[]>`select distinct on (name) name, version, definition, hash,
      created_at
    from workflows order by name, version desc limit ${limit}`;
  return rows.map(toRow);
}

/** Versions of one name with their creation time, oldest first, at most `limit`. */
export async function workflowVersions(
  db: Db,
  name: string,
  limit: number,
): Promise<{ version: number; createdAt: Date }[]> {
  const rows = await db<{ version: number; created_at: Date }[]>`
    select version, created_at from workflows where name = ${name}
    order by version limit ${limit}`;
  return rows.map((r) => ({ version: r.version, createdAt: r.created_at }));
}
