/** Helpers for the servers the orchestrator may run as its children (PostgreSQL, NATS). */
import { readFile } from 'node:fs/promises';

export function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (error) {
    return (error as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/** Asks a process to stop with `signal`, then SIGKILL if it is still there after `waitMs`. */
export async function stopPid(pid: number, signal: NodeJS.Signals, waitMs = 10_000): Promise<void> {
  try {
    process.kill(pid, signal);
  } catch {
    return;
  }
  for (let waited = 0; waited < waitMs && alive(pid); waited += 50) {
    await new Promise((r) => setTimeout(r, 50));
  }
  if (alive(pid)) process.kill(pid, 'SIGKILL');
}

/** The command line of a live process (Linux /proc), to check a pid is still what we think. */
export async function commandLine(pid: number): Promise<string> {
  const raw = await readFile(`/proc/${pid}/cmdline`, 'utf8').catch(() => '');
  return raw.replaceAll('\0', ' ');
}
