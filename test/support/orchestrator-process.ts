/**
 * Runs `bin/orchestrator` as a child process, as a user would: captures its output, reads
 * the URL it prints, and waits for its exit code.
 */
import { type ChildProcess, spawn } from 'node:child_process';
import { join } from 'node:path';

const BIN = new URL('../../bin/orchestrator', import.meta.url).pathname;

export interface OrchestratorProcess {
  child: ChildProcess;
  exited: Promise<number | null>;
  out(): string;
  err(): string;
  /** Resolves with the URL once the process printed it. */
  url(timeoutMs?: number): Promise<string>;
  /** Resolves with the OPS_PORT listener's URL once the process printed it. */
  opsUrl(timeoutMs?: number): Promise<string>;
}

export function startOrchestrator(
  args: string[],
  env: Record<string, string>,
  cwd?: string,
): OrchestratorProcess {
  return run(BIN, args, env, cwd);
}

/** `bin/orchestrator` of the package copy at `root`, run there. */
export function spawnIn(
  root: string,
  args: string[],
  env: Record<string, string>,
): OrchestratorProcess {
  return run(join(root, 'bin/orchestrator'), args, env, root);
}

function run(
  bin: string,
  args: string[],
  env: Record<string, string>,
  cwd: string | undefined,
): OrchestratorProcess {
  const child = spawn(process.execPath, [bin, ...args], {
    env: { PATH: process.env.PATH ?? '', HOME: process.env.HOME ?? '/tmp', ...env },
    stdio: ['ignore', 'pipe', 'pipe'],
    ...(cwd ? { cwd } : {}),
  });
  let stdout = '';
  let stderr = '';
  child.stdout?.on('data', (b: Buffer) => {
    stdout += b.toString();
  });
  child.stderr?.on('data', (b: Buffer) => {
    stderr += b.toString();
  });
  const exited = new Promise<number | null>((resolve) =>
    child.once('exit', (code) => resolve(code)),
  );
  const printed = async (pattern: RegExp, timeoutMs: number): Promise<string> => {
    await waitUntil(
      () => pattern.test(stdout) || child.exitCode !== null,
      timeoutMs,
      `the orchestrator to print ${pattern}`,
    );
    const url = pattern.exec(stdout)?.[1];
    if (!url) throw new Error(`orchestrator exited early:\n${stdout}\n${stderr}`);
    return url;
  };
  return {
    child,
    exited,
    out: () => stdout,
    err: () => stderr,
    url: (timeoutMs = 30_000) => printed(/listening on (http:\/\/[^\s,]+)/, timeoutMs),
    opsUrl: (timeoutMs = 30_000) => printed(/ops on (http:\/\/[^\s,]+)/, timeoutMs),
  };
}

export async function waitUntil(
  check: () => boolean | Promise<boolean>,
  timeoutMs: number,
  what: string,
): Promise<void> {
  const end = Date.now() + timeoutMs;
  while (!(await check())) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}
