/**
 * A process of its own that runs one host operation and reports how it ended, for tests that
 * kill its Postgres backend mid-transaction (seed-state.test.ts). Run it with
 * `node --import tsx test/support/seed-victim.ts <start|add-task> <database url> <ticket> [task]`.
 * It prints `begun` once it is about to write, then `committed` or `failed: <message>`.
 */
import { Commands } from '../../src/actors/commands.js';
import { ActorHost } from '../../src/actors/host.js';
import { createSql } from '../../src/persistence/db.js';
import { TASK_DEFAULTS } from './fixtures.js';

const [op, url, ticketId, taskId] = process.argv.slice(2);
if (!url || !ticketId || (op !== 'start' && op !== 'add-task')) {
  process.stderr.write('usage: seed-victim <start|add-task> <database url> <ticket> [task]\n');
  process.exit(2);
}
const sql = createSql(url, { max: 2, applicationName: 'seed-victim' });
const host = new ActorHost(sql, { taskDefaults: TASK_DEFAULTS });
const commands = new Commands(host, { stuckAfterMs: 3_600_000, diagnosticCooldownMs: 3_600_000 });
process.stdout.write('begun\n');
try {
  if (op === 'start') await host.send('ticket', ticketId, { type: 'START' });
  else await host.transact((uow) => commands.addTask(uow, ticketId, { id: taskId, type: 'x' }));
  process.stdout.write('committed\n');
} catch (error) {
  process.stdout.write(`failed: ${error instanceof Error ? error.message : String(error)}\n`);
}
await sql.end({ timeout: 1 }).catch(() => {});
process.exit(0);
