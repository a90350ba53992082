/**
 * Every transaction begins with BEGIN, and group commit runs each unit of a shared
 * transaction in a savepoint. postgres.js 3.4.9
 * awaited every BEGIN and SAVEPOINT before running the body, a round trip that carries
 * nothing back; our postinstall patch (scripts/patch-deps.mjs) sends each ahead of the
 * body's first statements instead. These tests hold the patch to that, and to what a
 * transaction and a savepoint mean: a failed body is rolled back alone, a savepoint that
 * cannot be taken still fails, and the body's statements never run outside the transaction.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { Sql } from '../../src/persistence/db.js';
import { createTestDatabase, type TestDatabase } from '../support/database.js';
import { recordingSql } from '../support/statement-log.js';

let db: TestDatabase;
let sql: Sql;
beforeAll(async () => {
  db = await createTestDatabase('driver_savepoint');
  sql = db.sql;
  await sql`create table marks (n int primary key)`;
});
afterAll(() => db.drop());

describe('transactions on the patched driver', () => {
  it("sends the body's first statement in the same turn as the BEGIN", async () => {
    const rec = recordingSql(db.url, 1);
    try {
      await rec.sql.begin(async (tx) => {
        await tx`insert into marks values (100)`;
      });
      const begin = rec.sent.findIndex((s) => /^begin/i.test(s.query));
      const insert = rec.sent.findIndex((s) => s.query.includes('insert into marks'));
      expect(begin).toBeGreaterThanOrEqual(0);
      expect(insert).toBe(begin + 1);
      expect(rec.sent[insert]?.turn).toBe(rec.sent[begin]?.turn);
    } finally {
      await rec.sql.end();
    }
    expect(await sql`select n from marks where n = 100`).toHaveLength(1);
  });

  it('runs the body inside the transaction: a failure rolls back what it wrote', async () => {
    await expect(
      sql.begin(async (tx) => {
        await tx`insert into marks values (101)`;
        await tx`select 1/0`;
      }),
    ).rejects.toMatchObject({ code: '22012' });
    expect(await sql`select n from marks where n = 101`).toHaveLength(0);
  });

  it('keeps transactions apart when more run at once than there are connections', async () => {
    const rec = recordingSql(db.url, 2);
    try {
      // 40 transactions on 2 connections: most BEGINs wait for a connection; each body's
      // rows must land, or vanish, with its own transaction only.
      const results = await Promise.allSettled(
        Array.from({ length: 40 }, (_, i) =>
          rec.sql.begin(async (tx) => {
            await tx`insert into marks values (${200 + i})`;
            if (i % 4 === 0) throw new Error('rolled back on purpose');
            await tx`insert into marks values (${300 + i})`;
          }),
        ),
      );
      expect(results.filter((r) => r.status === 'rejected')).toHaveLength(10);
    } finally {
      await rec.sql.end();
    }
    const rows = await sql<{ n: number }[]>`select n from marks where n >= 200 and n < 400`;
    const kept = Array.from({ length: 40 }, (_, i) => i).filter((i) => i % 4 !== 0);
    expect(rows.map((r) => r.n).sort((a, b) => a - b)).toEqual([
      ...kept.map((i) => 200 + i),
      ...kept.map((i) => 300 + i),
    ]);
  });

  it('still awaits a BEGIN with options before the body (the server may refuse them)', async () => {
    const rows = await sql.begin('isolation level serializable', async (tx) => {
      return tx<{ level: string }[]>`select current_setting('transaction_isolation') as level`;
    });
    expect(rows[0]?.level).toBe('serializable');
  });
});

describe('savepoints on the patched driver', () => {
  it('runs the savepoint body before the server has answered the SAVEPOINT', async () => {
    let serverAnswered = false;
    let bodyStartedFirst = false;
    await sql.begin(async (tx) => {
      await tx`select 1`;
      // I/O results arrive after setImmediate callbacks of this turn: a body that starts
      // only after the SAVEPOINT's answer starts after this one has run.
      setImmediate(() => {
        serverAnswered = true;
      });
      await tx.savepoint(async (sp) => {
        bodyStartedFirst = !serverAnswered;
        await sp`insert into marks values (1)`;
      });
    });
    expect(bodyStartedFirst).toBe(true);
    const rows = await sql<{ n: number }[]>`select n from marks where n = 1`;
    expect(rows).toHaveLength(1);
  });

  it('rolls a failed body back to its savepoint and keeps the rest of the transaction', async () => {
    await sql.begin(async (tx) => {
      await tx`insert into marks values (2)`;
      await expect(
        tx.savepoint(async (sp) => {
          await sp`insert into marks values (3)`;
          await sp`insert into marks values (2)`; // duplicate key: the body fails
        }),
      ).rejects.toMatchObject({ code: '23505' });
      await tx`insert into marks values (4)`;
    });
    const rows = await sql<{ n: number }[]>`select n from marks where n between 2 and 4 order by n`;
    expect(rows.map((r) => r.n)).toEqual([2, 4]);
  });

  it('fails a savepoint the server refuses, though its body issued nothing', async () => {
    let savepoint: 'kept' | 'refused' = 'kept';
    await expect(
      sql.begin(async (tx) => {
        // The transaction is aborted: the SAVEPOINT itself is refused (25P02).
        await tx`select 1/0`.catch(() => {});
        savepoint = await tx
          .savepoint(async () => 'nothing')
          .then(
            () => 'kept' as const,
            () => 'refused' as const,
          );
      }),
    ).rejects.toThrow();
    expect(savepoint).toBe('refused');
  });
});
