/** Migrations: three processes starting at once apply each migration exactly once. */
import { afterAll, beforeAll, expect, it } from 'vitest';
import { loadMigrations, migrate, migrationsApplied } from '../../src/persistence/migrate.js';
import { createTestDatabase, type TestDatabase } from '../support/database.js';

let db: TestDatabase;
beforeAll(async () => {
  db = await createTestDatabase('migrate', { migrate: false });
});
afterAll(() => db.drop());

it('three concurrent migration runs: each migration applied once', async () => {
  const pools = [db.pool(2), db.pool(2), db.pool(2)];
  const applied = await Promise.all(pools.map((p) => migrate(p)));
  const all = (await loadMigrations()).map((m) => m.name);
  expect(applied.flat().sort()).toEqual(all);
  const rows = await db.sql<{ name: string }[]>`select name from schema_migrations order by name`;
  expect(rows.map((r) => r.name)).toEqual(all);
  expect(await migrationsApplied(db.sql)).toBe(true);
  expect(await migrate(db.sql)).toEqual([]);
});

it('the event log indexes no event id: messages are checked at the place they name', async () => {
  const indexes = await db.sql<{ indexdef: string }[]>`
    select indexdef from pg_indexes where tablename = 'events'`;
  expect(indexes.some((i) => /\(entity_id, seq\)/.test(i.indexdef))).toBe(true);
  expect(indexes.filter((i) => /event_id/.test(i.indexdef))).toEqual([]);
});
