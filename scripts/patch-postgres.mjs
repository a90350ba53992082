// Patches postgres.js 3.4.9. Idempotent; run by `postinstall`, so `npm ci` always yields a
// patched driver.
//
// 1. closed-socket (porsager/postgres#1154, #1208; the fix proposed in #1209): when the server
//    kills a backend inside a transaction, the driver writes the ROLLBACK to a socket that is
//    already gone and throws an uncatchable TypeError from a setImmediate, crashing the
//    process. With the patch the write settles its queries with CONNECTION_CLOSED instead,
//    and a closed connection forgets its pending write timer.
// 2. pipelined-savepoint: `sql.savepoint(fn)` awaited its SAVEPOINT before running `fn`, one
//    round trip per savepoint that carries nothing back. Queries on one connection run in
//    the order they are sent, so the SAVEPOINT now goes out ahead of `fn`'s first statements,
//    in the same write, and the scope awaits its answer before it returns: if it failed, the
//    scope rolls back and throws as before. Group commit runs every unit of a shared
//    transaction in a savepoint, so this saves a round trip per unit.
import { readFileSync, writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';

const require = createRequire(import.meta.url);
// The package's exports hide package.json: resolve its CommonJS entry and walk up to the root.
const root = join(dirname(require.resolve('postgres')), '..', '..');
const { version } = JSON.parse(readFileSync(join(root, 'package.json'), 'utf8'));

const patches = [
  {
    mark: '/* orchestrator-patch: closed-socket */',
    files: ['src/connection.js', 'cjs/src/connection.js'],
    edits: (mark) => [
      [
        '  function nextWrite(fn) {\n    const x = socket.write(chunk, fn)',
        `  function nextWrite(fn) {\n    ${mark}\n    if (socket === null) {\n      chunk = nextWriteTimer = null\n      error(Errors.connection('CONNECTION_CLOSED', options))\n      return false\n    }\n    const x = socket.write(chunk, fn)`,
      ],
      [
        '    remaining = 0\n    incomings = null\n    clearImmediate(nextWriteTimer)\n',
        '    remaining = 0\n    incomings = null\n    clearImmediate(nextWriteTimer)\n    nextWriteTimer = null\n    chunk = null\n',
      ],
    ],
  },
  {
    mark: '/* orchestrator-patch: pipelined-savepoint */',
    files: ['src/index.js', 'cjs/src/index.js'],
    edits: (mark) => [
      [
        // biome-ignore lint/suspicious/noTemplateCurlyInString: the driver's source, matched as text
        '      name && await sql`savepoint ${ sql(name) }`\n',
        `      ${mark}\n      const saved = name && sql\`savepoint \${ sql(name) }\`.execute()\n`,
      ],
      [
        '        })\n\n        if (uncaughtError)\n          throw uncaughtError\n',
        '        })\n\n        saved && await saved\n        if (uncaughtError)\n          throw uncaughtError\n',
      ],
    ],
  },
];

let patched = 0;
for (const patch of patches) {
  for (const file of patch.files) {
    const path = join(root, file);
    let text = readFileSync(path, 'utf8');
    if (text.includes(patch.mark)) continue;
    for (const [from, to] of patch.edits(patch.mark)) {
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
}
process.stdout.write(`patch-postgres: postgres ${version}: ${patched} file(s) patched\n`);
