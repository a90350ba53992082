/**
 * The actor host against a real Postgres: compare-and-set under concurrent writers from two
 * pools (two "processes"), gap-free seq, one phase change out of 50 racing copies of the news
 * that finishes a phase, atomicity
 * under an injected fault, idempotency keys, stale caches and machine versions.
 */
import { readFileSync } from 'node:fs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Commands } from '../../src/actors/commands.js';
import { ActorHost } from '../../src/actors/host.js';
import { Conflict, IllegalTransition, UnsupportedSnapshot } from '../../src/errors.js';
import { unpublishedCount } from '../../src/persistence/outbox-rows.js';
import { forwardTaskState } from '../../src/policies/index.js';
import { createTestDatabase, type TestDatabase } from '../support/database.js';
import { TASK_DEFAULTS, taskInput, ticketInput } from '../support/fixtures.js';

let db: TestDatabase;
let hostA: ActorHost;
let hostB: ActorHost;

beforeAll(async () => {
  db = await createTestDatabase('host');
  hostA = new ActorHost(db.pool(10), { taskDefaults: TASK_DEFAULTS });
  hostB = new ActorHost(db.pool(10), { taskDefaults: TASK_DEFAULTS });
});
afterAll(() => db.drop());

async function seqsOf(entityId: string): Promise<number[]> {
  const rows = await db.sql<
    { seq: number }[]
  >`select seq from events where entity_id = ${entityId} order by seq`;
  return rows.map((r) => r.seq);
}

const range = (n: number) => Array.from({ length: n }, (_, i) => i + 1);

async function complete(host: ActorHost, taskId: string): Promise<void> {
  const claimed = await host.send('task', taskId, { type: 'CLAIM', workerId: 'w1' });
  const token = (claimed.snapshot.context as { token: string }).token;
  await host.send('task', taskId, { type: 'START', token });
  await host.send('task', taskId, { type: 'COMPLETE', token });
}

describe('concurrent writers', () => {
  it('200 concurrent BLOCK/UNBLOCK from two pools: only legal ones applied, seq gap-free', async () => {
    const t = await hostA.create('ticket', ticketInput());
    await hostA.send('ticket', t.id, { type: 'START' });
    const events = Array.from({ length: 200 }, (_, i) =>
      i % 2 === 0 ? { type: 'BLOCK', reason: `r${i}` } : { type: 'UNBLOCK' },
    );
    const results = await Promise.allSettled(
      events.map((e, i) => (i % 4 < 2 ? hostA : hostB).send('ticket', t.id, e)),
    );
    const ok = results.filter((r) => r.status === 'fulfilled').length;
    const refused = results.filter(
      (r) => r.status === 'rejected' && r.reason instanceof IllegalTransition,
    ).length;
    expect(ok + refused).toBe(200);
    expect(ok).toBeGreaterThan(0);

    const log = await db.sql<{ seq: number; type: string }[]>`
      select seq, type from events where entity_id = ${t.id} order by seq`;
    expect(log.map((r) => r.seq)).toEqual(range(2 + ok));
    // Legal only: after the phase change, blocked and unblocked strictly alternate.
    const tail = log.slice(2).map((r) => r.type);
    tail.forEach((type, i) => {
      expect(type).toBe(i % 2 === 0 ? 'ticket.blocked' : 'ticket.unblocked');
    });
    const [row] = await db.sql<{ version: number; seq: number }[]>`
      select version, seq from tickets where id = ${t.id}`;
    expect(row).toEqual({ version: 2 + ok, seq: 2 + ok });
  });

  it('200 concurrent task events from two pools: one claim wins, the log stays gap-free', async () => {
    const commands = new Commands(hostA, { stuckAfterMs: 3_600_000, diagnosticCooldownMs: 0 });
    const { value: ticket } = await hostA.transact((u) => commands.createTicket(u, { title: 't' }));
    const { value: task } = await hostA.transact((u) =>
      commands.addTask(u, ticket.id, { type: 'x', maxAttempts: 1000 }),
    );
    const results = await Promise.allSettled(
      range(200).map((i) =>
        (i % 2 ? hostA : hostB).send('task', task.id, { type: 'CLAIM', workerId: `w${i}` }),
      ),
    );
    expect(results.filter((r) => r.status === 'fulfilled')).toHaveLength(1);
    expect(await seqsOf(task.id)).toEqual([1, 2]);
  });

  it('the news that finishes a phase, 50 times from two pools: exactly one phase change', async () => {
    const commands = new Commands(hostA, { stuckAfterMs: 3_600_000, diagnosticCooldownMs: 0 });
    const { value: t } = await hostA.transact((u) => commands.createTicket(u, { title: 'adv' }));
    await hostA.send('ticket', t.id, { type: 'START' });
    // Two tasks: "a" completed, "b" open. The news that settles "b" finishes the phase.
    const { value: a } = await hostA.transact((u) => commands.addTask(u, t.id, { type: 'x' }));
    const { value: b } = await hostA.transact((u) => commands.addTask(u, t.id, { type: 'x' }));
    await complete(hostA, a.id);
    await hostA.transact((u) => forwardTaskState(u, a.id));
    const before = await db.sql`select state from tickets where id = ${t.id}`;
    expect(before[0]?.state).toBe('requirements');
    await hostA.send('task', b.id, { type: 'CANCEL', reason: 'not needed' });
    // The same news, redelivered by several handlers, beside operators pressing ADVANCE: it is
    // told once (the task's row beside the ticket refuses the repeats), and the automatic
    // advance (an eventless transition) happens once; no ADVANCE is accepted, as no state at
    // rest is a complete phase.
    const results = await Promise.allSettled(
      range(50).map((i) => {
        const host = i % 2 ? hostA : hostB;
        if (i % 5 === 0) return host.send('ticket', t.id, { type: 'ADVANCE' });
        return host.transact((u) => forwardTaskState(u, b.id)).then((r) => r.value);
      }),
    );
    const told = results.filter((r) => r.status === 'fulfilled' && r.value !== null);
    expect(told).toHaveLength(1);
    for (const r of results) {
      if (r.status === 'rejected') expect(r.reason).toBeInstanceOf(IllegalTransition);
    }
    expect(results.filter((r) => r.status === 'rejected')).toHaveLength(10);
    const changes = await db.sql`select type, data from events
      where entity_id = ${t.id} and type = 'ticket.phase_changed' and data->>'to' = 'design'`;
    expect(changes).toHaveLength(1);
    const after = await db.sql`select state from tickets where id = ${t.id}`;
    expect(after[0]?.state).toBe('design');
  });
});

describe('atomicity', () => {
  beforeAll(async () => {
    // Fault injection: an event-log row for a listed entity fails inside the transaction,
    // after the snapshot and the row itself were written.
    await db.sql.unsafe(`
      create table fault_injection (entity_id text primary key);
      create function fail_event() returns trigger language plpgsql as $$
      begin
        if exists (select 1 from fault_injection where entity_id = new.entity_id) then
          raise exception 'injected fault for %', new.entity_id;
        end if;
        return new;
      end $$;
      create trigger event_fault after insert on events for each row execute function fail_event();`);
  });

  it('a transaction failing after the snapshot and its event row leaves nothing', async () => {
    const t = await hostA.create('ticket', ticketInput());
    await db.sql`insert into fault_injection values (${t.id})`;
    await expect(hostA.send('ticket', t.id, { type: 'START' })).rejects.toThrow(/injected fault/);
    const [row] = await db.sql`select state, version, seq from tickets where id = ${t.id}`;
    expect(row).toEqual({ state: 'backlog', version: 1, seq: 1 });
    expect(await seqsOf(t.id)).toEqual([1]);
    // Only the creation's event waits for the relay.
    expect(await unpublishedCount(db.sql, [t.id])).toBe(1);
    // The cache did not keep the failed state: once the fault is gone, START applies.
    await db.sql`delete from fault_injection where entity_id = ${t.id}`;
    const applied = await hostA.send('ticket', t.id, { type: 'START' });
    expect(applied.state).toBe('requirements');
    expect(await seqsOf(t.id)).toEqual([1, 2]);
  });

  it('a creation that fails at its event row leaves no row, no event, no timer', async () => {
    const input = ticketInput();
    await db.sql`insert into fault_injection values (${input.id})`;
    await expect(hostA.create('ticket', input)).rejects.toThrow(/injected fault/);
    expect(await db.sql`select 1 from tickets where id = ${input.id}`).toHaveLength(0);
    expect(await seqsOf(input.id)).toEqual([]);
  });

  it('an illegal event writes nothing', async () => {
    const t = await hostA.create('ticket', ticketInput());
    await expect(hostA.send('ticket', t.id, { type: 'ADVANCE' })).rejects.toBeInstanceOf(
      IllegalTransition,
    );
    const [row] = await db.sql`select state, version from tickets where id = ${t.id}`;
    expect(row).toEqual({ state: 'backlog', version: 1 });
  });

  it('events sent in turn to one actor: a refusal of the last writes none of them', async () => {
    const t = await hostA.create('ticket', ticketInput());
    await expect(
      hostA.transact((uow) =>
        uow.sendEach('ticket', t.id, [() => ({ type: 'START' }), () => ({ type: 'START' })]),
      ),
    ).rejects.toBeInstanceOf(IllegalTransition);
    const [row] = await db.sql`select state, version, seq from tickets where id = ${t.id}`;
    expect(row).toEqual({ state: 'backlog', version: 1, seq: 1 });
    expect(await seqsOf(t.id)).toEqual([1]);
    // Accepted, each counts as a transition of its own: versions and seqs follow each other.
    const { applied } = await hostA.transact((uow) =>
      uow.sendEach('ticket', t.id, [() => ({ type: 'START' }), () => ({ type: 'BLOCK' })]),
    );
    expect(applied.map((a) => [a.event, a.from, a.state, a.version])).toEqual([
      ['START', 'backlog', 'requirements', 2],
      ['BLOCK', 'requirements', 'blocked', 3],
    ]);
    expect(applied.map((a) => a.events.map((e) => e.seq))).toEqual([[2], [3]]);
    const [after] = await db.sql`select state, version, seq from tickets where id = ${t.id}`;
    expect(after).toEqual({ state: 'blocked', version: 3, seq: 3 });
  });
});

describe('caches across processes', () => {
  it('a stale cache never answers for Postgres', async () => {
    const t = await hostA.create('ticket', ticketInput());
    await hostA.send('ticket', t.id, { type: 'START' }); // A caches "requirements"
    await hostB.send('ticket', t.id, { type: 'BLOCK', reason: 'elsewhere' }); // B moves it on
    // UNBLOCK is illegal in A's cached state but legal in the stored one: it applies.
    const unblocked = await hostA.send('ticket', t.id, { type: 'UNBLOCK' });
    expect(unblocked.state).toBe('requirements');
    await hostB.send('ticket', t.id, { type: 'CANCEL' });
    // BLOCK is legal in A's cached state but not in the stored one: refused, nothing written.
    await expect(hostA.send('ticket', t.id, { type: 'BLOCK', reason: 'x' })).rejects.toBeInstanceOf(
      IllegalTransition,
    );
    expect(await seqsOf(t.id)).toEqual(range(5));
  });

  it('a version-1 ticket (every task in its snapshot) is upgraded on load and its rows agree', async () => {
    const commands = new Commands(hostA, { stuckAfterMs: 3_600_000, diagnosticCooldownMs: 0 });
    const { value: t } = await hostA.transact((u) => commands.createTicket(u, { title: 'v1' }));
    await hostA.send('ticket', t.id, { type: 'START' });
    const { value: a } = await hostA.transact((u) => commands.addTask(u, t.id, { type: 'x' }));
    // The ticket as version 1 stored it: task a current and pending, an older round's task
    // still running (set aside by a send-back), and no rows beside it yet.
    const tasks = {
      [a.id]: { phase: 'requirements', type: 'x', state: 'pending', seq: 0 },
      [`${t.id}-old`]: {
        phase: 'requirements',
        type: 'x',
        state: 'running',
        seq: 3,
        superseded: true,
      },
    };
    await db.sql`update tickets set machine_version = 1,
      snapshot = jsonb_set(snapshot #- '{context,counts}' #- '{context,openDiagnostics}',
        '{context,tasks}', ${db.sql.json(tasks)})
      where id = ${t.id}`;
    await db.sql`delete from ticket_tasks where ticket_id = ${t.id}`;
    // The migration's fill, as it ran on the rows a version-1 deployment left.
    const migration = readFileSync('src/persistence/migrations/0008-ticket-counts.sql', 'utf8');
    await db.sql.unsafe(migration.slice(migration.indexOf('insert into ticket_tasks')));
    const rows = await db.sql`select task_id, round, state, seq from ticket_tasks
      where ticket_id = ${t.id} order by round`;
    expect(rows).toEqual([
      { task_id: `${t.id}-old`, round: -1, state: 'running', seq: 3 },
      { task_id: a.id, round: 0, state: 'pending', seq: 0 },
    ]);
    hostA.forget();
    hostB.forget();
    // The older round's running task does not hold the phase: a's completion advances it.
    await complete(hostA, a.id);
    const { value: told } = await hostA.transact((u) => forwardTaskState(u, a.id));
    expect(told?.state).toBe('design');
    const [row] = await db.sql<{ machine_version: number; context: Record<string, unknown> }[]>`
      select machine_version, snapshot -> 'context' as context from tickets where id = ${t.id}`;
    expect(row?.machine_version).toBe(2);
    expect(row?.context.tasks).toBeUndefined();
    expect(row?.context.counts).toEqual({ requirements: { work: { completed: 1 } } });
    expect(row?.context.openDiagnostics).toBe(0);
  });

  it('a snapshot of an unknown machine version is refused with a clear error', async () => {
    const t = await hostA.create('ticket', ticketInput());
    await db.sql`update tickets set machine_version = 99 where id = ${t.id}`;
    hostA.forget();
    await expect(hostA.send('ticket', t.id, { type: 'START' })).rejects.toBeInstanceOf(
      UnsupportedSnapshot,
    );
  });
});

describe('idempotency keys', () => {
  it('20 concurrent requests with one key have one effect and one answer', async () => {
    const commands = new Commands(hostA, { stuckAfterMs: 3_600_000, diagnosticCooldownMs: 0 });
    const request = JSON.stringify({ title: 'once' });
    const responses = await Promise.all(
      range(20).map((i) =>
        (i % 2 ? hostA : hostB).idempotent(
          { scope: 'anonymous', key: 'k-once', request },
          async (uow) => {
            const t = await commands.createTicket(uow, { title: 'once' });
            return { status: 201, body: { id: t.id } };
          },
        ),
      ),
    );
    const ids = new Set(responses.map((r) => (r.body as { id: string }).id));
    expect(ids.size).toBe(1);
    const rows = await db.sql`select count(*)::int as n from tickets where title = 'once'`;
    expect(rows[0]?.n).toBe(1);
    await expect(
      hostA.idempotent(
        { scope: 'anonymous', key: 'k-once', request: '{"title":"other"}' },
        async () => ({
          status: 201,
          body: {},
        }),
      ),
    ).rejects.toBeInstanceOf(Conflict);
  });
});

describe('actor cache', () => {
  it('holds at most cacheMaxBytes of snapshots, however large the payloads', async () => {
    const cap = 4 * 1024 * 1024;
    const host = new ActorHost(db.sql, { taskDefaults: TASK_DEFAULTS, cacheMaxBytes: cap });
    const ticket = await host.create('ticket', ticketInput());
    const blob = 'x'.repeat(100_000);
    const ids: string[] = [];
    for (let i = 0; i < 60; i++) {
      const task = await host.create('task', taskInput(ticket.id, { payload: { blob, i } }));
      ids.push(task.id);
      expect(host.cachedBytes).toBeLessThanOrEqual(cap);
    }
    // 60 rows of ~100 kB are 6 MB: the oldest went, the newest are still served from memory.
    expect(host.cachedBytes).toBeGreaterThan(cap - 2 * 100_000);
    expect(host.cachedActors).toBeLessThan(60);
    expect(host.cached(`task:${ids[59]}`)?.id).toBe(ids[59]);
    expect(host.cached(`task:${ids[0]}`)).toBeUndefined();

    // An evicted actor is read back from Postgres and keeps working.
    const cancelled = await host.send('task', ids[0] as string, { type: 'CANCEL' });
    expect(cancelled.state).toBe('cancelled');
    expect(host.cachedBytes).toBeLessThanOrEqual(cap);

    // A row larger than its share of the cap is never cached.
    const before = host.cachedBytes;
    const huge = await host.create(
      'task',
      taskInput(ticket.id, { payload: { blob: 'y'.repeat(cap / 8) } }),
    );
    expect(host.cached(`task:${huge.id}`)).toBeUndefined();
    expect(host.cachedBytes).toBeLessThanOrEqual(before);
    const moved = await host.send('task', huge.id, { type: 'CANCEL' });
    expect(moved.state).toBe('cancelled');
  });
});

describe('entering a phase that is already complete', () => {
  it('advances at once when its tasks finished while the ticket was in backlog', async () => {
    const commands = new Commands(hostA, { stuckAfterMs: 3_600_000, diagnosticCooldownMs: 0 });
    const { value: t } = await hostA.transact((u) => commands.createTicket(u, { title: 'early' }));
    const { value: task } = await hostA.transact((u) => commands.addTask(u, t.id, { type: 'x' }));
    await complete(hostA, task.id);
    expect((await hostA.transact((u) => forwardTaskState(u, task.id))).value?.state).toBe(
      'backlog',
    );
    const started = await hostA.send('ticket', t.id, { type: 'START' });
    // The answer is the ticket after the automatic advance of the same step.
    expect(started.state).toBe('design');
    const [row] = await db.sql`select state from tickets where id = ${t.id}`;
    expect(row?.state).toBe('design');
    const changes = await db.sql<{ to: string }[]>`select data->>'to' as to from events
      where entity_id = ${t.id} and type = 'ticket.phase_changed' order by seq`;
    expect(changes.map((c) => c.to)).toEqual(['requirements', 'design']);
  });
});
