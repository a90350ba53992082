/**
 * Wake-ups for idle claimers. A claim that finds nothing waits here instead of sleeping in a
 * loop; it is woken when this process commits a change that may make a task claimable, or
 * when a dispatch message arrives from another process over NATS. A fallback poll still
 * runs, since a wake-up is a latency optimisation and never the only way to find work.
 */
export class Wakeups {
  private waiters = new Set<() => void>();
  /** Increments on every notify, so a waiter can tell it missed nothing. */
  generation = 0;

  notify(): void {
    this.generation++;
    const waiters = this.waiters;
    this.waiters = new Set();
    for (const wake of waiters) wake();
  }

  /** Resolves on the next notify, after `ms`, or when `signal` aborts. */
  wait(ms: number, signal?: AbortSignal): Promise<void> {
    return new Promise((resolve) => {
      if (signal?.aborted) return resolve();
      const done = () => {
        clearTimeout(timer);
        this.waiters.delete(done);
        signal?.removeEventListener('abort', done);
        resolve();
      };
      const timer = setTimeout(done, ms);
      this.waiters.add(done);
      signal?.addEventListener('abort', done, { once: true });
    });
  }
}
