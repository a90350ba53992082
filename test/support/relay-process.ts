/**
 * A process of its own that runs one outbox relay, for tests that kill it mid-round
 * (transport-event-log-outbox.test.ts). Run it with
 * `node --import tsx test/support/relay-process.ts <database url> <nats url> <prefix> <stream>`.
 * Its Postgres sessions are named `relay-victim`; it prints `started` once the relay runs.
 */
import { jetstreamManager } from '@nats-io/jetstream';
import { connect } from '@nats-io/transport-node';
import { silentLogger } from '../../src/log.js';
import { createSql } from '../../src/persistence/db.js';
import { OutboxRelay } from '../../src/transport/outbox-relay.js';
import { transportNames } from '../../src/transport/subjects.js';

const [url, natsUrl, prefix, stream] = process.argv.slice(2);
if (!url || !natsUrl || !prefix || !stream) {
  process.stderr.write('usage: relay-process <database url> <nats url> <prefix> <stream>\n');
  process.exit(2);
}
const sql = createSql(url, { max: 4, applicationName: 'relay-victim' });
const nc = await connect({ servers: natsUrl });
const relay = new OutboxRelay({
  sql,
  nc,
  jsm: await jetstreamManager(nc),
  names: transportNames(prefix, stream),
  log: silentLogger(),
  pollMs: 50,
  streamCheckMs: 0,
});
await relay.start();
process.stdout.write('started\n');
// Runs until killed.
setInterval(() => {}, 60_000);
