/**
 * Applies the numbered SQL files in `migrations/` in order, each once, recorded in
 * `schema_migrations`. Any number of processes may start at once: a transaction-scoped
 * advisory lock makes them take turns, and the later ones find nothing left to apply.
 */
import { readdir, readFile } from 'node:fs/promises';
import { fileURLToPath } from 'node:url';
import type { Sql } from './db.js';

const MIGRATIONS_DIR = fileURLToPath(new URL('./migrations/', import.meta.url));
/** Arbitrary, fixed: identifies "the migration lock" among advisory locks. */
const MIGRATION_LOCK_ID = 7_402_615_001;

export interface Migration {
  name: string;
  sql: string;
}

export async function loadMigrations(dir = MIGRATIONS_DIR): Promise<Migration[]> {
  const files = (await readdir(dir)).filter((f) => f.endsWith('.sql')).sort();
  return Promise.all(
    files.map(async (name) => ({ name, sql: await readFile(`${dir}${name}`, 'utf8') })),
  );
}

/** Returns the names this call applied (empty when another process got there first). */
export async function migrate(sql: Sql, migrations?: Migration[]): Promise<string[]> {
  const all = migrations ?? (await loadMigrations());
  return sql.begin(async (tx) => {
    await tx`select pg_advisory_xact_lock(${MIGRATION_LOCK_ID})`;
    await tx`create table if not exists schema_migrations (
      name text primary key, applied_at timestamptz not null default now())`;
    const done = new Set(
      (await tx<{ name: string }[]>`select name from schema_migrations`).map((r) => r.name),
    );
    const applied: string[] = [];
    for (const m of all) {
      if (done.has(m.name)) continue;
      await tx.unsafe(m.sql);
      await tx`insert into schema_migrations (name) values (${m.name})`;
      applied.push(m.name);
    }
    return applied;
  });
}

/** True when every known migration is recorded (used by /readyz). */
export async function migrationsApplied(sql: Sql): Promise<boolean> {
  const all = await loadMigrations();
  const rows = await sql<{ n: number }[]>`
    select count(*)::int as n from schema_migrations where name in ${sql(all.map((m) => m.name))}`;
  return rows[0]?.n === all.length;
}
