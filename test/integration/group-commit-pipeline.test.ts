/**
 * The group committer's transaction on a reserved connection: BEGIN (and each SAVEPOINT of a
 * shared batch) goes out with the statement after it instead of costing a round trip of its
 * own; a failure of BEGIN or of the connection is what the units are answered with; and a
 * connection that broke or a pool that ends is never left in a bad state.
 */
import net from 'node:net';
import postgres from 'postgres';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { GroupCommit } from '../../src/actors/group-commit.js';
import { createSql, type Sql, type Tx } from '../../src/persistence/db.js';
import { createTestDatabase, type TestDatabase } from '../support/database.js';

let db: TestDatabase;
beforeAll(async () => {
  db = await createTestDatabase('group_commit_pipeline', { migrate: false });
  await db.sql`create table marks (id text primary key)`;
});
afterAll(() => db.drop());

/** A one-connection pool that counts its socket writes (one per flight of statements). */
function countingPool(): { sql: Sql; writes: () => number } {
  const url = new URL(db.url);
  let writes = 0;
  // `socket` (a connected socket for each connection) is in postgres.js, not in its types.
  const options = {
    max: 1,
    onnotice: () => {},
    socket: () =>
      new Promise<net.Socket>((resolve, reject) => {
        const s = net.connect(Number(url.port || 5432), url.hostname);
        const write = s.write.bind(s) as (...args: unknown[]) => boolean;
        s.write = ((...args: unknown[]) => {
          writes++;
          return write(...args);
        }) as typeof s.write;
        s.once('connect', () => resolve(s));
        s.once('error', reject);
      }),
  };
  const sql = postgres(
    db.url,
    options as postgres.Options<Record<string, never>>,
  ) as unknown as Sql;
  return { sql, writes: () => writes };
}

const unit = (run: (tx: Tx) => Promise<unknown>) => ({ run: (tx: Tx) => run(tx) });

describe('pipelined transaction', () => {
  it('a lone unit: BEGIN goes out with its first statement (2 flights, not 3)', async () => {
    const { sql, writes } = countingPool();
    await sql`select 1`; // connected, types fetched
    const gc = new GroupCommit(sql, { maxUnits: 1, lanes: 1 }, () => undefined);
    const before = writes();
    const value = await gc.submit(
      unit(async (tx) => (await tx<{ n: number }[]>`select 41 + 1 as n`)[0]?.n),
    );
    expect(value).toBe(42);
    expect(writes() - before).toBe(2); // BEGIN + select; COMMIT
    await sql.end();
  });

  it('a shared batch: BEGIN, SET LOCAL and each SAVEPOINT go out with a statement', async () => {
    const { sql, writes } = countingPool();
    await sql`select 1`;
    const gc = new GroupCommit(sql, { maxUnits: 8, lanes: 1 }, () => undefined);
    const before = writes();
    const values = await Promise.all([
      gc.submit(unit(async (tx) => (await tx`insert into marks values ('a') returning id`)[0]?.id)),
      gc.submit(unit(async (tx) => (await tx`insert into marks values ('b') returning id`)[0]?.id)),
    ]);
    expect(values).toEqual(['a', 'b']);
    expect(gc.stats.largestBatch).toBe(2);
    // BEGIN + SET LOCAL + SAVEPOINT s0 + insert; SAVEPOINT s1 + insert; COMMIT.
    expect(writes() - before).toBe(3);
    await sql.end();
  });

  it('a unit that catches its failed statement is answered with that failure', async () => {
    const sql = db.pool(1);
    const gc = new GroupCommit(sql, { maxUnits: 8, lanes: 1 }, () => undefined);
    const caught = unit(async (tx) => {
      await tx`insert into marks values ('c')`;
      await tx`select 1 / 0`.catch(() => {});
      return 'done';
    });
    await expect(gc.submit(caught)).rejects.toMatchObject({ code: '22012' });
    const [alone, fine] = await Promise.allSettled([
      gc.submit(caught),
      gc.submit(unit(async (tx) => tx`insert into marks values ('d')`)),
    ]);
    expect(alone).toMatchObject({ status: 'rejected', reason: { code: '22012' } });
    expect(fine.status).toBe('fulfilled');
    expect(await db.sql`select id from marks where id in ('c', 'd') order by id`).toEqual([
      { id: 'd' },
    ]);
  });
});

describe('a failed BEGIN or a broken connection', () => {
  it('a connection killed before BEGIN: answered with its loss, and the pool works on', async () => {
    const pool = createSql(db.url, { max: 1, applicationName: 'killed-before-begin' });
    // Reserves as the pool does, then has the backend killed before the batch's BEGIN.
    const killing = {
      reserve: async () => {
        const reserved = await pool.reserve();
        const [row] = await reserved<{ pid: number }[]>`select pg_backend_pid() as pid`;
        await db.sql`select pg_terminate_backend(${row?.pid ?? 0})`;
        await new Promise((r) => setTimeout(r, 100)); // the driver has seen the socket close
        return reserved;
      },
    } as unknown as Sql;
    const gc = new GroupCommit(killing, { maxUnits: 1, lanes: 1 }, () => undefined);
    await expect(
      gc.submit(unit(async (tx) => tx`insert into marks values ('killed')`)),
    ).rejects.toMatchObject({ code: 'CONNECTION_CLOSED' });
    expect(gc.stats.failedCommits).toBe(1);
    // The dead connection was not handed back: the pool's only connection reconnects.
    for (let i = 0; i < 3; i++) expect(await pool`select 1 as ok`).toEqual([{ ok: 1 }]);
    expect(await db.sql`select 1 from marks where id = 'killed'`).toEqual([]);
    await pool.end({ timeout: 1 });
  });

  it('a BEGIN that fails (a session left in an aborted transaction) is the error answered', async () => {
    const pool = createSql(db.url, { max: 1 });
    let spoiled = false;
    const aborted = {
      reserve: async () => {
        const reserved = await pool.reserve();
        if (!spoiled) {
          spoiled = true;
          await reserved`begin`;
          await reserved`select 1 / 0`.catch(() => {});
        }
        return reserved;
      },
    } as unknown as Sql;
    const gc = new GroupCommit(aborted, { maxUnits: 1, lanes: 1 }, () => undefined);
    const failed = await gc
      .submit(unit(async (tx) => tx`insert into marks values ('aborted')`))
      .catch((e: unknown) => e as { code?: string; query?: string });
    expect(failed).toMatchObject({ code: '25P02' });
    expect((failed as { query?: string }).query).toBe('begin');
    expect(gc.stats.failedCommits).toBe(1);
    // Rolled back before release: the next transaction on the same connection is clean.
    expect(await gc.submit(unit(async (tx) => (await tx`select 7 as n`)[0]?.n))).toBe(7);
    expect(await pool`select 1 as ok`).toEqual([{ ok: 1 }]);
    await pool.end({ timeout: 1 });
  });
});

describe('an ending pool', () => {
  it('end() during a batch returns once it is done, and a later unit gets CONNECTION_ENDED', async () => {
    const pool = createSql(db.url, { max: 2 });
    const gc = new GroupCommit(pool, { maxUnits: 1, lanes: 1 }, () => undefined);
    const running = gc.submit(
      unit(async (tx) => {
        await tx`select pg_sleep(0.2)`;
        return 'committed';
      }),
    );
    await new Promise((r) => setTimeout(r, 50));
    const started = Date.now();
    const ended = pool.end();
    expect(await running).toBe('committed');
    await ended;
    expect(Date.now() - started).toBeLessThan(2000);
    await expect(gc.submit(unit(async (tx) => tx`select 1`))).rejects.toMatchObject({
      code: 'CONNECTION_ENDED',
    });
  });
});
