/**
 * The pipelined COMMIT (scripts/patch-deps.mjs, pipelined-commit; `commitAhead` in db.ts) and
 * group commit's use of it: a unit of work that says it is final lets its transaction's
 * COMMIT go out behind its last statements instead of a round trip after their answers.
 * What must hold: the COMMIT goes in the same turn as the statements before it; a statement
 * that fails turns it into a rollback; no statement ever runs after it (outside the
 * transaction); and a batch that committed is answered as committed, never run again.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { GroupCommit } from '../../src/actors/group-commit.js';
import { commitAhead, type Sql, type Tx } from '../../src/persistence/db.js';
import { createTestDatabase, type TestDatabase } from '../support/database.js';
import { recordingSql } from '../support/statement-log.js';

let db: TestDatabase;
let sql: Sql;
beforeAll(async () => {
  db = await createTestDatabase('driver_pipelined_commit');
  sql = db.sql;
  await sql`create table marks (n int primary key)`;
});
afterAll(() => db.drop());

async function marked(n: number): Promise<boolean> {
  return (await sql`select 1 from marks where n = ${n}`).length === 1;
}

describe('the pipelined COMMIT on the patched driver', () => {
  it('goes out in the same turn as the statement before it, and commits', async () => {
    const rec = recordingSql(db.url, 1);
    try {
      // Warm the statement: its first run on a connection describes it first, in a turn of
      // its own.
      await rec.sql`insert into marks values (1) on conflict do nothing`;
      rec.sent.length = 0;
      let answer: { command: string } | null = null;
      await rec.sql.begin(async (t) => {
        const tx = t as unknown as Tx;
        const insert = tx`insert into marks values (2)`.execute();
        answer = await commitAhead(tx);
        await insert;
      });
      expect(answer).toMatchObject({ command: 'COMMIT' });
      const insert = rec.sent.find((s) => s.query.includes('values (2)'));
      const commit = rec.sent.find((s) => s.query.trim() === 'commit');
      expect(commit?.turn).toBe(insert?.turn);
      expect(rec.sent.filter((s) => s.query.trim() === 'commit')).toHaveLength(1);
    } finally {
      await rec.sql.end();
    }
    expect(await marked(2)).toBe(true);
  });

  it('rolls back when a statement before it failed, and the scope throws that failure', async () => {
    let answer: { command: string } | null = null;
    await expect(
      sql.begin(async (t) => {
        const tx = t as unknown as Tx;
        await tx`insert into marks values (3)`;
        const bad = tx`select 1/0`.execute();
        answer = await commitAhead(tx);
        await bad;
      }),
    ).rejects.toMatchObject({ code: '22012' });
    expect(answer).toMatchObject({ command: 'ROLLBACK' });
    expect(await marked(3)).toBe(false);
  });

  it('refuses a statement handed over after it: nothing runs outside the transaction', async () => {
    await expect(
      sql.begin(async (t) => {
        const tx = t as unknown as Tx;
        const first = tx`insert into marks values (4)`.execute();
        const done = commitAhead(tx);
        // Awaited, not executed at once: handed to the connection after the COMMIT.
        await tx`insert into marks values (5)`;
        await Promise.all([first, done]);
      }),
    ).rejects.toMatchObject({ code: 'SENT_AFTER_COMMIT' });
    expect(await marked(4)).toBe(true);
    expect(await marked(5)).toBe(false);
  });
});

describe('group commit with final units', () => {
  function committer(): GroupCommit<null> {
    return new GroupCommit(sql, { maxUnits: 8, lanes: 1 }, () => null);
  }

  it('commits behind the last statement of a unit that says it is final', async () => {
    const rec = recordingSql(db.url, 2);
    try {
      await rec.sql`insert into marks values (9) on conflict do nothing`;
      rec.sent.length = 0;
      const gc = new GroupCommit(rec.sql, { maxUnits: 8, lanes: 1 }, () => null);
      const value = await gc.submit({
        run: async (tx, _batch, final) => {
          const insert = tx`insert into marks values (10)`.execute();
          final();
          await insert;
          return 'ok';
        },
      });
      expect(value).toBe('ok');
      const insert = rec.sent.find((s) => s.query.includes('values (10)'));
      const commit = rec.sent.find((s) => s.query.trim() === 'commit');
      expect(commit?.turn).toBe(insert?.turn);
    } finally {
      await rec.sql.end();
    }
    expect(await marked(10)).toBe(true);
  });

  it('a final unit whose statement fails is answered with it, and the others run again', async () => {
    const gc = committer();
    const ran: number[] = [];
    const failing = gc.submit({
      keys: ['a'],
      run: async (tx, _batch, final) => {
        const bad = tx`insert into marks values (20), (20)`.execute();
        final();
        await bad;
      },
    });
    const other = gc.submit({
      keys: ['b'],
      run: async (tx) => {
        ran.push(21);
        await tx`insert into marks values (21)`;
      },
    });
    await expect(failing).rejects.toMatchObject({ code: '23505' });
    await other;
    expect(await marked(20)).toBe(false);
    expect(await marked(21)).toBe(true);
    // Rolled back with the failing unit, then run again alone.
    expect(ran).toEqual([21, 21]);
  });

  it('a unit that fails in JS after saying it is final: the batch committed, nothing runs again', async () => {
    const gc = committer();
    const ran: number[] = [];
    const broken = gc.submit({
      keys: ['c'],
      run: async (tx, _batch, final) => {
        const insert = tx`insert into marks values (30)`.execute();
        final();
        await insert;
        // Long enough for the other unit to finish and the COMMIT to go out.
        await new Promise((resolve) => setTimeout(resolve, 50));
        throw new Error('broke its promise to be final');
      },
    });
    const other = gc.submit({
      keys: ['d'],
      run: async (tx) => {
        ran.push(31);
        await tx`insert into marks values (31)`;
        return 31;
      },
    });
    await expect(broken).rejects.toThrow('broke its promise');
    expect(await other).toBe(31);
    expect(ran).toEqual([31]);
    // Its write committed with the batch: the answer says it failed, the commit stands.
    expect(await marked(30)).toBe(true);
    expect(await marked(31)).toBe(true);
  });

  it('never commits early after a unit failed in JS before its statements', async () => {
    const gc = committer();
    const refused = gc.submit({
      keys: ['e'],
      run: async (tx) => {
        await tx`insert into marks values (40)`;
        throw new Error('refused after writing');
      },
    });
    const final = gc.submit({
      keys: ['f'],
      run: async (tx, _batch, done) => {
        const insert = tx`insert into marks values (41)`.execute();
        done();
        await insert;
      },
    });
    await expect(refused).rejects.toThrow('refused after writing');
    await final;
    // The refusing unit's write was rolled back with its transaction; the other ran again.
    expect(await marked(40)).toBe(false);
    expect(await marked(41)).toBe(true);
  });
});
