/**
 * A Postgres database of its own for one test file: created from scratch with a random
 * name, migrated, and dropped afterwards, so files run in parallel and a failed run leaves
 * nothing that breaks the next one.
 */
import { randomBytes } from 'node:crypto';
import postgres from 'postgres';
import { createSql, type Sql } from '../../src/persistence/db.js';
import { migrate } from '../../src/persistence/migrate.js';

const ADMIN_URL = process.env.TEST_DATABASE_URL ?? 'postgres://postgres@127.0.0.1:5432/postgres';

export interface TestDatabase {
  url: string;
  name: string;
  sql: Sql;
  /** Another pool on the same database: a second "process". */
  pool(max?: number): Sql;
  drop(): Promise<void>;
}

export async function createTestDatabase(
  label: string,
  options: { migrate?: boolean } = {},
): Promise<TestDatabase> {
  const name = `orch_t_${label.replace(/[^a-z0-9]/gi, '_').toLowerCase()}_${randomBytes(4).toString('hex')}`;
  const admin = postgres(ADMIN_URL, { max: 1, onnotice: () => {} });
  await admin.unsafe(`create database ${name}`);
  await admin.end();
  const url = new URL(ADMIN_URL);
  url.pathname = `/${name}`;
  const pools: Sql[] = [];
  const pool = (max = 10): Sql => {
    const s = createSql(url.toString(), { max });
    pools.push(s);
    return s;
  };
  const sql = pool();
  if (options.migrate !== false) await migrate(sql);
  return {
    url: url.toString(),
    name,
    sql,
    pool,
    async drop() {
      await Promise.all(pools.map((p) => p.end({ timeout: 1 })));
      const a = postgres(ADMIN_URL, { max: 1, onnotice: () => {} });
      await a.unsafe(`drop database if exists ${name} with (force)`);
      await a.end();
    },
  };
}
