import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ActorHost, type Applied } from '../../src/actors/host.js';
import { casLost, updateTaskRows } from '../../src/persistence/actor-rows.js';
import { createTestDatabase, type TestDatabase } from '../support/database.js';
import { TASK_DEFAULTS, taskInput, ticketInput } from '../support/fixtures.js';
import { recordingSql } from '../support/statement-log.js';
import { bumpedTaskWrite } from '../support/task-row-write.js';

let db: TestDatabase;
let host: ActorHost;
beforeAll(async () => {
  db = await createTestDatabase('task_rows_write');
  host = new ActorHost(db.sql, { taskDefaults: TASK_DEFAULTS });
});
afterAll(() => db.drop());

async function pendingTasks(n: number): Promise<string[]> {
  const ticket = await host.create('ticket', ticketInput());
  const ids: string[] = [];
  for (let i = 0; i < n; i++) {
    ids.push((await host.create('task', taskInput(ticket.id, { executor: 'rows' }))).id);
  }
  return ids;
}

async function logOf(id: string) {
  return db.sql<{ seq: number; type: string; pos: number }[]>`
    select seq, type, pos from events where entity_id = ${id} order by seq`;
}

describe('several tasks in one statement', () => {
  it('claims and starts three tasks in one statement, each with its events in order', async () => {
    const ids = await pendingTasks(3);
    const rec = recordingSql(db.url, 1);
    try {
      const other = new ActorHost(rec.sql, { taskDefaults: TASK_DEFAULTS });
      const { value } = await other.transact((uow) =>
        uow.sendMany(
          'task',
          ids.map((id, i) => ({
            id,
            events: [
              () => ({ type: 'CLAIM', workerId: `w#${i}` }),
              (s) => ({ type: 'START', token: (s.context as { token: string }).token }),
            ],
          })),
        ),
      );
      expect(value.map((a) => [a.id, a.state])).toEqual(ids.map((id) => [id, 'running']));
      const writes = rec.sent.filter((s) => /update\s+tasks\s+t\s+set/i.test(s.query));
      expect(writes).toHaveLength(1);
      for (const [i, id] of ids.entries()) {
        const log = await logOf(id);
        expect(log.map((e) => [e.seq, e.type])).toEqual([
          [1, 'task.created'],
          [2, 'task.claimed'],
          [3, 'task.started'],
        ]);
        // What the host answered (the START's event) is what was stored, position included.
        const answered = value[i]?.events.map((e) => [e.seq, e.pos]);
        expect(answered).toEqual([[3, Number(log[2]?.pos)]]);
        expect(Number(log[2]?.pos)).toBeGreaterThan(Number(log[1]?.pos));
      }
      const rows = await db.sql<{ state: string; worker_id: string; lease: Date | null }[]>`
        select state, worker_id, lease_expires_at as lease from tasks
        where id = any(${ids}::text[]) order by worker_id`;
      expect(rows.map((r) => [r.state, r.worker_id])).toEqual([
        ['running', 'w#0'],
        ['running', 'w#1'],
        ['running', 'w#2'],
      ]);
      for (const r of rows) expect(r.lease).not.toBeNull();
    } finally {
      await rec.sql.end();
    }
  });

  it('a lost compare-and-set writes nothing of its task and the others are written', async () => {
    const [a, b] = (await pendingTasks(2)) as [string, string];
    const writes = [
      await bumpedTaskWrite(db.sql, a, Date.now()),
      await bumpedTaskWrite(db.sql, b, Date.now()),
    ];
    // b moved on after it was read: its expected version is one behind.
    await db.sql`update tasks set version = version + 1 where id = ${b}`;
    const out = await db.sql.begin((tx) => updateTaskRows(tx, writes));
    expect(out[0]?.entries.map((e) => e.type)).toEqual(['task.test']);
    expect(out[1]).toBeNull();
    expect((await logOf(a)).map((e) => e.type)).toEqual(['task.created', 'task.test']);
    expect((await logOf(b)).map((e) => e.type)).toEqual(['task.created']);
  });

  it('with failIfLost, a lost compare-and-set fails the statement and nothing is written', async () => {
    const [a, b] = (await pendingTasks(2)) as [string, string];
    const writes = [
      await bumpedTaskWrite(db.sql, a, Date.now()),
      await bumpedTaskWrite(db.sql, b, Date.now()),
    ];
    await db.sql`update tasks set version = version + 1 where id = ${b}`;
    const failed = await db.sql
      .begin((tx) => updateTaskRows(tx, writes, { failIfLost: true }))
      .then(
        () => null,
        (error: unknown) => error,
      );
    expect(casLost(failed)).toBe(true);
    expect((await logOf(a)).map((e) => e.type)).toEqual(['task.created']);
    const [row] = await db.sql<{ version: number }[]>`select version from tasks where id = ${a}`;
    expect(row?.version).toBe(1);
  });

  it('a stale cached row makes the unit run again: every task written once, seqs gap-free', async () => {
    const ids = await pendingTasks(3);
    const claimAll = (h: ActorHost) =>
      h.transact((uow) =>
        uow.sendMany(
          'task',
          ids.map((id) => ({ id, events: [() => ({ type: 'CLAIM', workerId: 'w' })] })),
        ),
      );
    const cached = new ActorHost(db.sql, { taskDefaults: TASK_DEFAULTS });
    const fresh = new ActorHost(db.pool(2), { taskDefaults: TASK_DEFAULTS });
    const first = await claimAll(cached);
    // Another process releases one of them: `cached` still holds its claimed row.
    const stale = ids[1] as string;
    const token = ((first.value[1] as Applied).snapshot.context as { token: string }).token;
    await fresh.send('task', stale, { type: 'RELEASE', token });
    const conflicts = cached.stats.conflicts;
    // Each task is sent what its state (as this host believes it) accepts: the released one
    // is still claimed in `cached`, so its START is decided on a stale row.
    const { value } = await cached.transact((uow) =>
      uow.sendMany(
        'task',
        ids.map((id) => ({
          id,
          events: [
            (s) =>
              s.value === 'pending'
                ? { type: 'CLAIM', workerId: 'w2' }
                : { type: 'START', token: (s.context as { token: string }).token },
          ],
        })),
      ),
    );
    expect(value.map((a) => a.state)).toEqual(['running', 'claimed', 'running']);
    expect(cached.stats.conflicts).toBe(conflicts + 1);
    for (const id of ids) {
      const seqs = (await logOf(id)).map((e) => e.seq);
      expect(seqs).toEqual(seqs.map((_, i) => i + 1));
    }
    expect((await logOf(stale)).map((e) => e.type)).toEqual([
      'task.created',
      'task.claimed',
      'task.released',
      'task.claimed',
    ]);
  });
});
