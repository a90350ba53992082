/**
 * Private temporary directories that go away with the tests that made them, passed or
 * failed, so a run leaves nothing in the system's temp directory.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, onTestFinished } from 'vitest';

const make = (prefix: string) => mkdtempSync(join(tmpdir(), prefix));
const remove = (dir: string) => () => rmSync(dir, { recursive: true, force: true });

/** For a file or a describe block: removed after its last test. */
export function tempDir(prefix: string): string {
  const dir = make(prefix);
  afterAll(remove(dir));
  return dir;
}

/** Inside a test: removed when that test ends. */
export function testTempDir(prefix: string): string {
  const dir = make(prefix);
  onTestFinished(remove(dir));
  return dir;
}
