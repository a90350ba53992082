/**
 * Group commit runs each unit of a shared transaction in a savepoint. postgres.js 3.4.9
 * awaited every SAVEPOINT before running the unit, a round trip that carries nothing back;
 * our postinstall patch (scripts/patch-postgres.mjs) sends it ahead of the unit's first
 * statements instead. These tests hold the patch to that, and to the savepoint's meaning:
 * a failed unit is rolled back alone, and a savepoint that cannot be taken still fails.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { Sql } from '../../src/persistence/db.js';
import { createTestDatabase, type TestDatabase } from '../support/database.js';

let db: TestDatabase;
let sql: Sql;
beforeAll(async () => {
  db = await createTestDatabase('driver_savepoint');
  sql = db.sql;
  await sql`create table marks (n int primary key)`;
});
afterAll(() => db.drop());

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
