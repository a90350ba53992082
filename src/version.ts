/**
 * What this process runs: the package's version, and whether its code is the compiled build
 * (dist/) or the TypeScript sources (bin/orchestrator picks; see there).
 */
import { readFileSync } from 'node:fs';

export function packageVersion(): string {
  try {
    // src/version.ts and dist/version.js both sit one level under the package root.
    const pkg = JSON.parse(readFileSync(new URL('../package.json', import.meta.url), 'utf8'));
    return String(pkg.version ?? '0.0.0');
  } catch {
    return '0.0.0';
  }
}

export function codeOrigin(): 'build' | 'source' {
  return import.meta.url.endsWith('.ts') ? 'source' : 'build';
}
