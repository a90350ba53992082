// Patches postgres.js 3.4.9 (porsager/postgres#1154, #1208; the fix proposed in #1209):
// when the server kills a backend inside a transaction, the driver writes the ROLLBACK to a
// socket that is already gone and throws an uncatchable TypeError from a setImmediate,
// crashing the process. With the patch the write settles its queries with CONNECTION_CLOSED
// instead, and a closed connection forgets its pending write timer. Idempotent; run by
// `postinstall`, so `npm ci` always yields a patched driver.
import { readFileSync, writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';

const require = createRequire(import.meta.url);
// The package's exports hide package.json: resolve its CommonJS entry and walk up to the root.
const root = join(dirname(require.resolve('postgres')), '..', '..');
const { version } = JSON.parse(readFileSync(join(root, 'package.json'), 'utf8'));
const MARK = '/* orchestrator-patch: closed-socket */';

const edits = [
  [
    '  function nextWrite(fn) {\n    const x = socket.write(chunk, fn)',
    `  function nextWrite(fn) {\n    ${MARK}\n    if (socket === null) {\n      chunk = nextWriteTimer = null\n      error(Errors.connection('CONNECTION_CLOSED', options))\n      return false\n    }\n    const x = socket.write(chunk, fn)`,
  ],
  [
    '    remaining = 0\n    incomings = null\n    clearImmediate(nextWriteTimer)\n',
    '    remaining = 0\n    incomings = null\n    clearImmediate(nextWriteTimer)\n    nextWriteTimer = null\n    chunk = null\n',
  ],
];

let patched = 0;
for (const file of ['src/connection.js', 'cjs/src/connection.js']) {
  const path = join(root, file);
  let text = readFileSync(path, 'utf8');
  if (text.includes(MARK)) continue;
  for (const [from, to] of edits) {
    if (!text.includes(from)) {
      process.stderr.write(
        `patch-postgres: postgres ${version} ${file} does not contain the expected code; not patched\n`,
      );
      process.exit(version === '3.4.9' ? 1 : 0);
    }
    text = text.replace(from, to);
  }
  writeFileSync(path, text);
  patched++;
}
process.stdout.write(`patch-postgres: postgres ${version}: ${patched} file(s) patched\n`);
