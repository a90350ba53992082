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

it("a task's news rewrites its ticket_tasks row in place (a HOT update, no index entry)", async () => {
  // Rows as tasks are added: many inserted together, so without free room their pages fill.
  await db.sql`insert into ticket_tasks (task_id, ticket_id, phase, round, type, state, seq)
    select 'hot-' || g, 'hot-ticket', 'requirements', 1, 'x', 'pending', 1
    from generate_series(1, 2000) g`;
  // Each task's news, one row at a time, as reactions write it.
  for (let g = 1; g <= 2000; g += 10) {
    await db.sql`update ticket_tasks set state = 'completed', seq = 3
      where task_id = ${`hot-${g}`}`;
  }
  await db.sql`select pg_stat_force_next_flush()`;
  const [s] = await db.sql<{ upd: number; hot: number }[]>`
    select n_tup_upd::int as upd, n_tup_hot_upd::int as hot
    from pg_stat_user_tables where relname = 'ticket_tasks'`;
  expect(s?.upd).toBe(200);
  expect(s?.hot).toBe(200);
});
