// Patches @nats-io/nats-core 3.3.1. Idempotent; run by `postinstall` after patch-postgres.mjs.
//
// 1. answered-request: a request (every JetStream publish is one) that got its answer
//    called `cancel()` to unregister itself, and `cancel()` built a
//    `RequestError("cancelled")` to reject the promise that had just been resolved: an Error
//    and its stack trace per publish, for nothing (1.6% of a draining worker's CPU). An
//    answered request now unregisters without building one; `cancel()` itself is unchanged.
import { readFileSync, writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';

const require = createRequire(import.meta.url);
const root = dirname(require.resolve('@nats-io/nats-core'));
const { version } = JSON.parse(readFileSync(join(root, '..', 'package.json'), 'utf8'));
const EXPECTED = '3.3.1';

const mark = '/* orchestrator-patch: answered-request */';
const path = join(root, 'request.js');
let text = readFileSync(path, 'utf8');
if (!text.includes(mark)) {
  const from =
    '            this.deferred.resolve(msg);\n        }\n        this.cancel();\n    }\n    cancel(err) {';
  const to = `            this.deferred.resolve(msg);\n        }\n        ${mark}\n        this.mux.cancel(this);\n    }\n    cancel(err) {`;
  if (!text.includes(from)) {
    process.stderr.write(
      `patch-nats: @nats-io/nats-core ${version} request.js does not contain the expected code; not patched\n`,
    );
    process.exit(version === EXPECTED ? 1 : 0);
  }
  text = text.replace(from, to);
  writeFileSync(path, text);
  process.stdout.write(`patch-nats: @nats-io/nats-core ${version}: request.js patched\n`);
}
