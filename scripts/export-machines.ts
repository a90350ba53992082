/**
 * Writes the machine documents under docs/machines: `<name>.json` (load it in the Stately
 * visualizer) and `<name>.mmd` (Mermaid). Run with `npm run machines:export` after changing
 * a machine, and commit the result.
 */
import { mkdirSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { machineDefinitions, toMermaid } from '../src/machines/export.js';
import { ENTITY_TYPES } from '../src/machines/index.js';

const outDir = join(dirname(fileURLToPath(import.meta.url)), '..', 'docs', 'machines');
mkdirSync(outDir, { recursive: true });
const definitions = machineDefinitions();
for (const name of ENTITY_TYPES) {
  const json = join(outDir, `${name}.json`);
  const mmd = join(outDir, `${name}.mmd`);
  writeFileSync(json, `${JSON.stringify(definitions[name], null, 2)}\n`);
  writeFileSync(mmd, toMermaid(name));
  console.log(`wrote ${json} and ${mmd}`);
}
