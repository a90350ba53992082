/**
 * The write-now mark (scripts/patch-deps.mjs, write-now; `writeNow` in db.ts): a query marked
 * so reaches Postgres as soon as it is handed to its connection, while this thread is still
 * busy in the same turn; unmarked, it waits for the turn's end. The relay asks for its next
 * batch that way before building the current batch's publishes.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createSql, type Sql, writeNow } from '../../src/persistence/db.js';
import { createTestDatabase, type TestDatabase } from '../support/database.js';

let db: TestDatabase;
let sql: Sql;
beforeAll(async () => {
  db = await createTestDatabase('driver_write_now');
  sql = createSql(db.url, { max: 1 });
  await sql`select clock_timestamp() as at`;
});
afterAll(async () => {
  await sql.end();
  await db.drop();
});

const BUSY_MS = 300;

/**
 * When Postgres ran the query, against the turn it was sent in: the query is handed over,
 * then the thread stays busy for BUSY_MS without yielding to the event loop.
 */
async function ranAt(
  marked: boolean,
): Promise<{ ranMs: number; busyFrom: number; busyTo: number }> {
  const query = sql<{ at: Date }[]>`select clock_timestamp() as at`;
  const pending = (marked ? writeNow(query) : query).execute();
  // Microtasks only: the connection takes the query, the turn goes on.
  for (let i = 0; i < 3; i++) await null;
  const busyFrom = Date.now();
  while (Date.now() - busyFrom < BUSY_MS) {
    // The rest of the turn: the thread's own work.
  }
  const busyTo = Date.now();
  const [row] = await pending;
  return { ranMs: row!.at.getTime(), busyFrom, busyTo };
}

describe('a query marked write-now', () => {
  it('runs while the thread that sent it is still busy in its turn', async () => {
    const t = await ranAt(true);
    expect(t.ranMs).toBeLessThan(t.busyTo - BUSY_MS / 2);
  });

  it('where an unmarked one waits for the end of the turn', async () => {
    const t = await ranAt(false);
    expect(t.ranMs).toBeGreaterThanOrEqual(t.busyTo - 5);
  });
});
