import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ActorHost } from '../../src/actors/host.js';
import { updateTaskRows } from '../../src/persistence/actor-rows.js';
import type { Tx } from '../../src/persistence/db.js';
import { readAfter } from '../../src/persistence/outbox-rows.js';
import { tasksProgressTold } from '../../src/persistence/reaction-rows.js';
import { writeTasksNews } from '../../src/persistence/ticket-task-rows.js';
import { createTestDatabase, type TestDatabase } from '../support/database.js';
import {
  explaining,
  genericPlans,
  type PlanNode,
  planNodes,
  seqScanned,
} from '../support/explain.js';
import { TASK_DEFAULTS, taskInput, ticketInput } from '../support/fixtures.js';
import { bumpedTaskWrite } from '../support/task-row-write.js';

let db: TestDatabase;
let host: ActorHost;
const BULK_TASKS = 2_000;

beforeAll(async () => {
  db = await createTestDatabase('small_table_plans');
  host = new ActorHost(db.sql, { taskDefaults: TASK_DEFAULTS });
  await db.sql.begin(async (tx) => {
    await tx`insert into tickets (id, state, phase, title, machine_version, snapshot, version,
        seq, created_at, updated_at)
      values ('bulk-tk', 'requirements', 'requirements', 'bulk', 1, '{}'::jsonb, 1, 1, now(), now())`;
    await tx`insert into tasks (id, ticket_id, type, phase, state, executor, priority, attempt,
        machine_version, snapshot, version, seq, created_at, updated_at)
      select 'bulk-ts-' || g, 'bulk-tk', 'x', 'requirements',
        case when g % 2 = 0 then 'completed' else 'pending' end, 'sleep', 0, 0, 1, '{}'::jsonb,
        3, 3, now(), now()
      from generate_series(1, ${BULK_TASKS}) g`;
    await tx`insert into events (event_id, entity_type, entity_id, seq, type, data, at)
      select gen_random_uuid(), 'task', 'bulk-ts-' || g, s, 'task.bulk', '{}'::jsonb, now()
      from generate_series(1, ${BULK_TASKS}) g, generate_series(1, 3) s
      order by g, s`;
    await tx`insert into ticket_tasks (task_id, ticket_id, phase, round, type, state, seq)
      select 'bulk-ts-' || g, 'bulk-tk', 'requirements', 0, 'x', 'pending', 1
      from generate_series(1, ${BULK_TASKS}) g`;
  });
  await db.sql`analyze tasks`;
  await db.sql`analyze events`;
  await db.sql`analyze ticket_tasks`;
});
afterAll(() => db.drop());

describe('hot statements on a small database', () => {
  it("a pool's settles in one statement find their rows by index, not by reading every task", async () => {
    const ticket = await host.create('ticket', ticketInput());
    const ids: string[] = [];
    for (let i = 0; i < 4; i++) ids.push((await host.create('task', taskInput(ticket.id))).id);
    const plans: PlanNode[] = [];
    const sql = explaining(db.sql as unknown as Tx, (p) => plans.push(p));
    const written = await updateTaskRows(
      sql,
      await Promise.all(ids.map((id) => bumpedTaskWrite(db.sql, id, Date.now()))),
    );
    expect(plans).toHaveLength(1);
    expect(seqScanned(plans[0] as PlanNode), JSON.stringify(plans[0])).toEqual([]);
    // Planned and then really run: every row written, with its event.
    expect(written.map((w) => w?.entries.length)).toEqual([1, 1, 1, 1]);
    const versions = await db.sql<{ version: number }[]>`
      select version from tasks where id = any(${ids}) order by id`;
    expect(versions.map((v) => v.version)).toEqual([2, 2, 2, 2]);
  });

  it("the relay's read finds each event's predecessor by index, not by hashing the whole log", async () => {
    const plans: PlanNode[] = [];
    const items = await db.sql.begin((tx) =>
      readAfter(
        explaining(tx as unknown as Tx, (p) => plans.push(p)),
        null,
        512,
      ),
    );
    expect(items.length).toBeGreaterThan(0);
    // The bulk events are each their entity's 1st to 3rd, so all but the first have one.
    expect(items.filter((i) => i.pred !== null).length).toBeGreaterThan(items.length / 2);
    expect(plans).toHaveLength(1);
    expect(seqScanned(plans[0] as PlanNode), JSON.stringify(plans[0])).not.toContain('events');
  });

  it("the task_state reaction's read and news update keep to ticket_tasks' key in their generic plans", async () => {
    const ids = ['bulk-ts-11', 'bulk-ts-13', 'bulk-ts-15'];
    let told: Awaited<ReturnType<typeof tasksProgressTold>> = new Map();
    const plans = await genericPlans(db.url, async (sql) => {
      told = await tasksProgressTold(sql, ids);
      await writeTasksNews(
        sql,
        ids.map((taskId) => ({ taskId, state: 'completed', seq: 5 })),
      );
    });
    // Really run too: read as stored, then written.
    expect([...told.values()].map((t) => t.told?.state)).toEqual(['pending', 'pending', 'pending']);
    const rows = await db.sql<{ state: string }[]>`
      select state from ticket_tasks where task_id = any(${ids})`;
    expect(rows.map((r) => r.state)).toEqual(['completed', 'completed', 'completed']);
    // The read and the update (the driver's own catalog query comes along).
    const ours = plans.filter((p) =>
      planNodes(p).some((n) => n['Relation Name'] === 'ticket_tasks'),
    );
    expect(ours).toHaveLength(2);
    for (const plan of ours) {
      expect(seqScanned(plan), JSON.stringify(plan)).not.toContain('ticket_tasks');
    }
  });
});
