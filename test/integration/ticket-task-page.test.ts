/**
 * A page of a large ticket's tasks costs the page, not the ticket: whatever plan Postgres
 * picks, the snapshots are trimmed (parsed and rewritten) only for the rows the limit keeps.
 * Its plan for a ticket its statistics do not know yet sorts all of the ticket's remaining
 * tasks to keep a page of them; the trimming must not run below that sort.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ticketTaskPageRows } from '../../src/persistence/queries.js';
import { createTestDatabase, type TestDatabase } from '../support/database.js';

const TASKS = 3_000;
const TICKET = 'tkt_large';

let db: TestDatabase;
beforeAll(async () => {
  db = await createTestDatabase('ticket_task_page');
  await db.sql`insert into tickets (id, state, phase, title, machine_version, snapshot,
      version, seq, created_at, updated_at)
    values (${TICKET}, 'in_progress', 'implementation', 'large', 1, '{}', 1, 0, now(), now())`;
  // Rows written moments ago, as a ticket filled through the API is: not yet analyzed. Their
  // created_at is whole milliseconds, as the application writes it.
  await db.sql`insert into tasks (id, ticket_id, type, phase, state, executor, priority,
      attempt, machine_version, snapshot, version, seq, created_at, updated_at)
    select 'tsk_' || lpad(g::text, 5, '0'), ${TICKET}, 'bench', 'implementation', 'pending',
      'sleep', 0, 0, 1,
      jsonb_build_object('value', 'pending', 'context',
        jsonb_build_object('payload', jsonb_build_object('ms', 0, 'n', g), 'result', null)),
      1, 0, date_trunc('milliseconds', now()) - make_interval(secs => ${TASKS} - g), now()
    from generate_series(1, ${TASKS}) g`;
});
afterAll(async () => {
  await db.drop();
});

interface PlanNode {
  'Node Type': string;
  Output?: string[];
  Plans?: PlanNode[];
}

/** Every node under a Limit node, at any depth. */
function belowLimits(node: PlanNode, underLimit = false, out: PlanNode[] = []): PlanNode[] {
  if (underLimit) out.push(node);
  for (const child of node.Plans ?? []) {
    belowLimits(child, underLimit || node['Node Type'] === 'Limit', out);
  }
  return out;
}

async function plan(cursor: { createdAt: Date; id: string } | null): Promise<PlanNode> {
  const [row] = await db.sql<{ 'QUERY PLAN': [{ Plan: PlanNode }] }[]>`
    explain (verbose, format json) ${ticketTaskPageRows(db.sql, TICKET, cursor, 101)}`;
  const root = row?.['QUERY PLAN'][0].Plan;
  if (!root) throw new Error('no plan');
  return root;
}

describe('a page of a large ticket', () => {
  it('trims snapshots only above the limit, for the first page and a later one', async () => {
    const first = await ticketTaskPageRows(db.sql, TICKET, null, 101);
    expect(first).toHaveLength(101);
    expect(first[0]?.snapshot.context).toEqual({});
    const last = first[99];
    if (!last) throw new Error('no row');
    const cursor = { createdAt: last.created_at, id: last.id };
    const next = await ticketTaskPageRows(db.sql, TICKET, cursor, 101);
    expect(next[0]?.id).toBe('tsk_00101');
    for (const root of [await plan(null), await plan(cursor)]) {
      const under = belowLimits(root);
      expect(under.length).toBeGreaterThan(0);
      const trimmedBelow = under.filter((n) => (n.Output ?? []).some((o) => o.includes('#-')));
      expect(trimmedBelow.map((n) => n['Node Type'])).toEqual([]);
    }
  });
});
