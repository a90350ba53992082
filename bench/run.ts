/**
 * `npm run bench`: prints each figure beside its raw baseline from the same run.
 * Uses BENCH_DATABASE_URL's server (default: the local PostgreSQL) and a scratch database
 * of its own, dropped afterwards. BENCH_SECONDS sets the duration of each measurement.
 */
import { randomBytes } from 'node:crypto';
import os from 'node:os';
import postgres from 'postgres';
import { createSql } from '../src/persistence/db.js';
import { migrate } from '../src/persistence/migrate.js';
import { benchHost, benchRaw } from './host-vs-raw.js';
import { fmt } from './stats.js';

const ADMIN_URL = process.env.BENCH_DATABASE_URL ?? 'postgres://postgres@127.0.0.1:5432/postgres';
const seconds = Number(process.env.BENCH_SECONDS ?? 3);
const concurrencies = (process.env.BENCH_CONCURRENCY ?? '1,8,64').split(',').map(Number);

async function main(): Promise<void> {
  const name = `orch_bench_${randomBytes(4).toString('hex')}`;
  const admin = postgres(ADMIN_URL, { max: 1, onnotice: () => {} });
  await admin.unsafe(`create database ${name}`);
  const url = new URL(ADMIN_URL);
  url.pathname = `/${name}`;
  const sql = createSql(url.toString(), { max: 70 });
  try {
    await migrate(sql);
    const pg = await sql<{ v: string }[]>`select current_setting('server_version') as v`;
    process.stdout.write(
      `machine: ${os.cpus().length} cores, ${os.cpus()[0]?.model ?? '?'}; node ${process.version}; PostgreSQL ${pg[0]?.v}\n`,
    );
    process.stdout.write(
      `each figure: ${seconds}s; entities alternate BLOCK/UNBLOCK (1 event, outbox, timer per transition)\n\n`,
    );
    process.stdout.write(
      'concurrency |  host tx/s |   raw tx/s |  ratio | host p50 ms | raw p50 ms | host p99 ms | raw p99 ms\n',
    );
    process.stdout.write(
      '------------|------------|------------|--------|-------------|------------|-------------|-----------\n',
    );
    for (const c of concurrencies) {
      const raw = await benchRaw(sql, c, seconds * 1000);
      const host = await benchHost(sql, c, seconds * 1000);
      process.stdout.write(
        `${String(c).padStart(11)} | ${fmt(host.perSecond, 0)}  | ${fmt(raw.perSecond, 0)}  | ${(host.perSecond / raw.perSecond).toFixed(2).padStart(6)} | ${fmt(host.p50, 2)}   | ${fmt(raw.p50, 2)}  | ${fmt(host.p99, 2)}   | ${fmt(raw.p99, 2)}\n`,
      );
    }
  } finally {
    await sql.end({ timeout: 2 });
    await admin.unsafe(`drop database if exists ${name} with (force)`);
    await admin.end();
  }
}

await main();
