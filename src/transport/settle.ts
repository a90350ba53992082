/**
 * Waits for a promise at most `ms`: true if it settled (resolved or rejected) in time. Used
 * where shutting down must not hang on a server that is gone.
 */
export async function settleWithin(p: Promise<unknown>, ms: number): Promise<boolean> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<false>((resolve) => {
    timer = setTimeout(() => resolve(false), ms);
  });
  try {
    return await Promise.race([
      p.then(
        () => true,
        () => true,
      ),
      timeout,
    ]);
  } finally {
    clearTimeout(timer);
  }
}

/**
 * Runs `stop` and, if it is still running after `slowMs`, warns with `part` named (once):
 * a shutdown that hangs then says where.
 */
export async function namedStop(
  log: { warn(obj: object, msg: string): void },
  part: string,
  stop: () => Promise<unknown>,
  slowMs = 5_000,
): Promise<void> {
  const slow = setTimeout(() => log.warn({ part, ms: slowMs }, 'still stopping'), slowMs);
  try {
    await stop();
  } finally {
    clearTimeout(slow);
  }
}
