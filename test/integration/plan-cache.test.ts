/**
 * The hot statements whose batch changes from call to call keep one generic plan. Postgres
 * plans a prepared statement again on each call while a custom plan looks cheaper than the
 * generic one; a bound array (whose length a custom plan knows) or a bound `limit` made that
 * so on every call, and the relay's read, the reaction's reads and writes and the live feed's
 * page were planned each time, at about what they took to run. Each statement here is run a
 * dozen times on one connection with batches of different sizes; Postgres's own count of the
 * session's plans (`pg_prepared_statements`) must show the generic plan taking over after
 * its five custom ones.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Commands } from '../../src/actors/commands.js';
import { ActorHost } from '../../src/actors/host.js';
import type { Sql } from '../../src/persistence/db.js';
import { findEvents } from '../../src/persistence/event-log.js';
import { readFeedPage } from '../../src/persistence/feed-rows.js';
import { readAfter, readHeldDue } from '../../src/persistence/outbox-rows.js';
import { tasksProgressTold, ticketIdsOfTasks } from '../../src/persistence/reaction-rows.js';
import { writeTasksNews } from '../../src/persistence/ticket-task-rows.js';
import { createTestDatabase, type TestDatabase } from '../support/database.js';
import { TASK_DEFAULTS } from '../support/fixtures.js';

let db: TestDatabase;
/** One connection: prepared statements and their plan counts belong to a session. */
let one: Sql;
let taskIds: string[] = [];
let eventIds: string[] = [];
let positions: { tx: string; pos: number }[] = [];

const CALLS = 12;
/** Batch sizes that differ from call to call, as a reaction's or relay's batches do. */
const size = (i: number) => [1, 8, 3, 12][i % 4] as number;

beforeAll(async () => {
  db = await createTestDatabase('plan_cache');
  const host = new ActorHost(db.sql, { taskDefaults: TASK_DEFAULTS });
  const commands = new Commands(host, { stuckAfterMs: 3_600_000, diagnosticCooldownMs: 3_600_000 });
  const { value } = await host.transact(async (uow) => {
    const t = await commands.createTicket(uow, { title: 'plans' });
    await uow.send('ticket', t.id, { type: 'START' });
    const ids: string[] = [];
    for (let i = 0; i < 12; i++) ids.push((await commands.addTask(uow, t.id, { type: 'b' })).id);
    return ids;
  });
  taskIds = value;
  // Tables of the size a busy database has: on a handful of rows every plan is a scan of a
  // page or two and costs the same, custom or generic.
  await db.sql.unsafe(`
    insert into tickets (id, state, phase, title, machine_version, snapshot, version, seq,
      created_at, updated_at)
    values ('tkt_pad', 'backlog', 'backlog', 'pad', 1, '{}', 1, 1, now(), now());
    insert into tasks (id, ticket_id, type, phase, state, executor, priority, attempt,
      machine_version, snapshot, version, seq, created_at, updated_at)
    select 'tsk_pad_' || g, 'tkt_pad', 'b', 'backlog', 'completed', 'sleep', 0, 1, 1, '{}', 1, 1,
      now(), now()
    from generate_series(1, 20000) g;
    insert into ticket_tasks (task_id, ticket_id, phase, round, type, state, seq)
    select 'tsk_pad_' || g, 'tkt_pad', 'backlog', 0, 'b', 'completed', 1
    from generate_series(1, 20000) g;
    insert into events (event_id, entity_type, entity_id, seq, type, data, at)
    select gen_random_uuid(), 'task', 'tsk_pad_' || (g % 20000), g / 20000 + 1, 'task.completed',
      '{}', now()
    from generate_series(1, 60000) g;
    analyze tickets; analyze tasks; analyze ticket_tasks; analyze events;`);
  const events = await db.sql<{ event_id: string; tx: string; pos: number }[]>`
    select event_id, tx::text as tx, pos from events order by pos`;
  eventIds = events.map((e) => e.event_id);
  positions = events.map((e) => ({ tx: e.tx, pos: e.pos }));
  one = db.pool(1);
});
afterAll(() => db.drop());

/** This session's plan counts of the prepared statement whose text holds `marker`. */
async function plans(marker: string): Promise<{ generic: number; custom: number }> {
  const rows = await one<{ generic: number; custom: number }[]>`
    select generic_plans::int as generic, custom_plans::int as custom
    from pg_prepared_statements where statement like ${`%${marker}%`}
      and statement not like '%pg_prepared_statements%'`;
  expect(rows).toHaveLength(1);
  return rows[0] as { generic: number; custom: number };
}

function expectGeneric(p: { generic: number; custom: number }): void {
  // Postgres always tries five custom plans before it weighs the generic one.
  expect(p.custom).toBeLessThanOrEqual(5);
  expect(p.generic).toBe(CALLS - p.custom);
}

describe('statements with a batch that changes size keep their generic plan', () => {
  it('the reaction check of events by id', async () => {
    for (let i = 0; i < CALLS; i++) {
      const found = await findEvents(one, eventIds.slice(i % 3, (i % 3) + size(i)));
      expect(found.size).toBe(size(i));
    }
    expectGeneric(await plans('where event_id = any('));
  });

  it("the reaction's read of tasks and what their ticket was told, and of their tickets", async () => {
    for (let i = 0; i < CALLS; i++) {
      const ids = taskIds.slice(0, size(i));
      expect((await tasksProgressTold(one, ids)).size).toBe(ids.length);
      expect((await ticketIdsOfTasks(one, ids)).size).toBe(ids.length);
    }
    expectGeneric(await plans('as told_state'));
    expectGeneric(await plans('select id, ticket_id from tasks where id = any('));
  });

  it("the reaction's write of the news its ticket was told", async () => {
    for (let i = 0; i < CALLS; i++) {
      const items = taskIds
        .slice(0, size(i))
        .map((taskId) => ({ taskId, state: 'pending' as const, seq: 100 + i }));
      await writeTasksNews(one, items);
    }
    expectGeneric(await plans('update ticket_tasks t set state = n.state'));
  });

  it("the relay's reads, from its cursor and from a position", async () => {
    await one.begin(async (tx) => {
      for (let i = 0; i < CALLS; i++) {
        expect((await readAfter(tx, null, 16)).length).toBe(Math.min(16, positions.length));
        const from = positions[i] as { tx: string; pos: number };
        const read = await readAfter(tx, from, 16);
        expect(read[0]?.pos).toBe(positions[i + 1]?.pos);
        await readHeldDue(tx, 16);
      }
    });
    expectGeneric(await plans('from (select tx, pos from relay_cursor limit 1) c'));
    expectGeneric(await plans('::bigint as pos) c'));
    expectGeneric(await plans('with heads as'));
  });

  it("the live feed's page", async () => {
    for (let i = 0; i < CALLS; i++) {
      const page = await readFeedPage(one, positions[i]?.pos ?? 0, 8);
      expect(page.entries[0]?.pos).toBe(positions[i + 1]?.pos);
    }
    expectGeneric(await plans('left join lateral'));
  });
});
