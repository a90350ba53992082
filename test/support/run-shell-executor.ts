/**
 * A process that runs one shell command through the ShellExecutor and waits: the shell
 * test SIGKILLs it to check that the command's process group dies with it.
 * Usage: node --import tsx test/support/run-shell-executor.ts '<command>'
 */
import { silentLogger } from '../../src/log.js';
import { ShellExecutor } from '../../src/workers/executors/shell.js';

const command = process.argv[2] ?? 'sleep 30';
const task = { id: 'ts-killed', ticketId: 'tk-killed', payload: { command } } as never;
// A test harness: it may run as root (CI does), as SHELL_ALLOW_ROOT=1 allows.
await new ShellExecutor({ timeoutMs: 60_000, allowRoot: true })
  .run(task, { signal: new AbortController().signal, attempt: 1, token: 't', log: silentLogger() })
  .catch(() => {});
