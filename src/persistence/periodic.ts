/**
 * A background job run every `intervalMs`, counted from the end of the previous run, until
 * stopped. The timer never keeps the process alive; `stop()` waits for a run under way.
 */
export class Periodic {
  private timer: NodeJS.Timeout | null = null;
  private running: Promise<unknown> = Promise.resolve();
  private stopped = true;

  constructor(
    private readonly intervalMs: number,
    /** One run; it must settle its own errors (a rejection is ignored). */
    private readonly work: () => Promise<unknown>,
  ) {}

  /** Does nothing for an interval of 0 or less (the job is off) or when already started. */
  start(): void {
    if (this.intervalMs <= 0 || !this.stopped) return;
    this.stopped = false;
    this.schedule();
  }

  /** True once `stop()` was called. */
  get stopping(): boolean {
    return this.stopped;
  }

  async stop(): Promise<void> {
    this.stopped = true;
    if (this.timer) clearTimeout(this.timer);
    this.timer = null;
    await this.running;
  }

  private schedule(): void {
    if (this.stopped) return;
    this.timer = setTimeout(() => {
      this.running = this.work()
        .catch(() => {})
        .finally(() => this.schedule());
    }, this.intervalMs);
    this.timer.unref();
  }
}
