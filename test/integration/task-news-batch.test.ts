/**
 * A ticket told the news of many of its tasks at once (the task_state reaction's batch):
 * the news is recorded in one statement and reaches the ticket as runs of events, each run
 * written as ONE compare-and-set of the ticket's row. A run ends at the first event that
 * changes the ticket's state, so what follows a change (a block, an advance) happens before
 * the next news, exactly as when each task's news is sent alone.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Commands } from '../../src/actors/commands.js';
import { ActorHost } from '../../src/actors/host.js';
import { forwardTaskStates, forwardTicketNews } from '../../src/policies/index.js';
import { createTestDatabase, type TestDatabase } from '../support/database.js';
import { TASK_DEFAULTS } from '../support/fixtures.js';

let db: TestDatabase;
let host: ActorHost;
let commands: Commands;

beforeAll(async () => {
  db = await createTestDatabase('task_news_batch');
  host = new ActorHost(db.sql, { taskDefaults: TASK_DEFAULTS });
  commands = new Commands(host, { stuckAfterMs: 3_600_000, diagnosticCooldownMs: 3_600_000 });
  await db.sql.unsafe(`
    create table ticket_writes (id text not null, version int not null);
    create function count_ticket_write() returns trigger language plpgsql as $$
    begin insert into ticket_writes values (new.id, new.version); return new; end $$;
    create trigger count_ticket_write after update on tickets
      for each row execute function count_ticket_write();`);
});
afterAll(() => db.drop());

async function ticketWithTasks(n: number, maxAttempts = 3) {
  const { value } = await host.transact(async (uow) => {
    const t = await commands.createTicket(uow, { title: 'news' });
    await uow.send('ticket', t.id, { type: 'START' });
    const ids: string[] = [];
    for (let i = 0; i < n; i++) {
      ids.push((await commands.addTask(uow, t.id, { type: 'build', maxAttempts })).id);
    }
    return { ticketId: t.id, ids };
  });
  return value;
}

async function run(id: string, outcome: 'COMPLETE' | 'FAIL'): Promise<void> {
  const claimed = await host.send('task', id, { type: 'CLAIM', workerId: 'w' });
  const token = (claimed.snapshot.context as { token: string }).token;
  await host.send('task', id, { type: 'START', token });
  await host.send(
    'task',
    id,
    outcome === 'COMPLETE' ? { type: 'COMPLETE', token } : { type: 'FAIL', token, error: 'no' },
  );
}

async function writesOf(ticketId: string): Promise<number> {
  const [r] = await db.sql<{ n: number }[]>`
    select count(*)::int as n from ticket_writes where id = ${ticketId}`;
  return r?.n ?? 0;
}

describe('news of many tasks for one ticket', () => {
  it('twenty completions reach the ticket in one write, and it advances once', async () => {
    const { ticketId, ids } = await ticketWithTasks(20);
    for (const id of ids) await run(id, 'COMPLETE');
    const before = await writesOf(ticketId);
    const { value: applied } = await host.transact((uow) => forwardTaskStates(uow, ids));
    expect(await writesOf(ticketId)).toBe(before + 1);
    expect(applied).toHaveLength(20);
    expect(applied.map((a) => a.version)).toEqual(
      applied.map((_, i) => (applied[0]?.version ?? 0) + i),
    );
    const [row] = await db.sql<
      { state: string }[]
    >`select state from tickets where id = ${ticketId}`;
    expect(row?.state).toBe('design');
    const changes = await db.sql`select 1 from events
      where entity_id = ${ticketId} and type = 'ticket.phase_changed'`;
    expect(changes).toHaveLength(2); // START, then the advance
    // Repeated news changes nothing and writes nothing.
    await host.transact((uow) => forwardTaskStates(uow, ids));
    expect(await writesOf(ticketId)).toBe(before + 1);
  });

  it('a run ends at the news that blocks the ticket; the rest follows in a second write', async () => {
    const { ticketId, ids } = await ticketWithTasks(3, 1);
    const [failing, ...rest] = ids as [string, ...string[]];
    await run(failing, 'FAIL');
    for (const id of rest) await run(id, 'COMPLETE');
    const before = await writesOf(ticketId);
    const { value: applied } = await host.transact((uow) =>
      forwardTaskStates(uow, [failing, ...rest]),
    );
    expect(await writesOf(ticketId)).toBe(before + 2);
    expect(applied.map((a) => [a.from, a.state])).toEqual([
      ['requirements', 'blocked'],
      ['blocked', 'blocked'],
      ['blocked', 'blocked'],
    ]);
  });

  it('told under the wrong ticket, a task is left out and its news stays to tell', async () => {
    const a = await ticketWithTasks(1);
    const b = await ticketWithTasks(1);
    const taskOfA = a.ids[0] as string;
    await run(taskOfA, 'COMPLETE');
    const before = await writesOf(b.ticketId);
    const { value: wrong } = await host.transact((uow) =>
      forwardTicketNews(uow, b.ticketId, [taskOfA]),
    );
    expect(wrong).toEqual([]);
    expect(await writesOf(b.ticketId)).toBe(before);
    const [row] = await db.sql<{ seq: number }[]>`
      select seq from ticket_tasks where task_id = ${taskOfA}`;
    expect(row?.seq).toBe(0);
    const { value: right } = await host.transact((uow) =>
      forwardTicketNews(uow, a.ticketId, [taskOfA]),
    );
    expect(right.map((x) => x.state)).toEqual(['design']);
  });

  it('many tellers of one ticket at once: no deadlock, each task counted once', async () => {
    const { ticketId, ids } = await ticketWithTasks(30);
    for (const id of ids) await run(id, 'COMPLETE');
    // Overlapping sets in different orders, each its own unit of work, all at once: the
    // host's lanes run them in several transactions side by side.
    const sets = Array.from({ length: 24 }, (_, i) => {
      const start = (i * 7) % ids.length;
      const part = [...ids.slice(start), ...ids.slice(0, start)].slice(0, 12);
      return i % 2 === 0 ? part : part.reverse();
    });
    await Promise.all([
      ...sets.map((set) => host.transact((uow) => forwardTicketNews(uow, ticketId, set))),
      host.transact((uow) => forwardTaskStates(uow, ids)),
    ]);
    await host.transact((uow) => forwardTaskStates(uow, ids));
    const told = await db.sql<{ state: string }[]>`
      select state from ticket_tasks where ticket_id = ${ticketId}`;
    expect(told.map((r) => r.state)).toEqual(ids.map(() => 'completed'));
    const [ticket] = await db.sql<{ state: string; counts: unknown }[]>`
      select state, snapshot -> 'context' -> 'counts' -> 'requirements' as counts
      from tickets where id = ${ticketId}`;
    expect(ticket?.state).toBe('design');
    // Counted once each: a teller that read the ticket before another's commit lost its
    // compare-and-set and ran again on what the other wrote.
    expect(ticket?.counts).toEqual({ work: { completed: 30 } });
    const advances = await db.sql`select 1 from events
      where entity_id = ${ticketId} and type = 'ticket.phase_changed'`;
    expect(advances).toHaveLength(2); // START, then one advance
  });
});
