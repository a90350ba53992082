// Compiles src/ to dist/ (JavaScript, what `bin/orchestrator` runs), copies the files the
// code reads at run time (migrations, the dashboard's assets), and writes dist/.build-stamp
// last. Run by `prepare`, so `npm ci` leaves a build. Types are checked by `npm run
// typecheck`, not here (`--noCheck`): a build takes seconds, not a type check's quarter minute.
//
// bin/orchestrator runs dist/ only while no file under src/ is newer than the stamp, so an
// edit never runs stale code: it falls back to the sources until the next build.
import { execFileSync } from 'node:child_process';
import { cpSync, existsSync, readdirSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join, relative } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const src = join(root, 'src');
const dist = join(root, 'dist');
// Built beside, then swapped in: a process starting meanwhile finds the old build whole, or
// no stamp (and runs the sources), never half a build.
const next = join(root, '.dist-next');
const old = join(root, '.dist-old');

rmSync(next, { recursive: true, force: true });
const tsc = createRequire(import.meta.url).resolve('typescript/bin/tsc');
execFileSync(
  process.execPath,
  [tsc, '-p', join(root, 'tsconfig.build.json'), '--noCheck', '--outDir', next],
  { stdio: 'inherit' },
);

let copied = 0;
for (const entry of readdirSync(src, { recursive: true, withFileTypes: true })) {
  if (!entry.isFile() || entry.name.endsWith('.ts')) continue;
  const from = join(entry.parentPath ?? entry.path, entry.name);
  cpSync(from, join(next, relative(src, from)));
  copied += 1;
}
writeFileSync(join(next, '.build-stamp'), `${new Date().toISOString()}\n`);
rmSync(old, { recursive: true, force: true });
if (existsSync(dist)) renameSync(dist, old);
renameSync(next, dist);
rmSync(old, { recursive: true, force: true });
process.stdout.write(`built dist/ (${copied} assets copied)\n`);
