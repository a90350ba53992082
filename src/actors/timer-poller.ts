/**
 * The durable timer poller: one per process. It claims due timer rows with
 * `FOR UPDATE SKIP LOCKED` (so each fires once across all processes), fires each through the
 * host, and sleeps until the next due time, `TIMER_POLL_MS` at most, or until a NOTIFY says
 * a sooner timer was written. Timers outlive any process: they are rows, not setTimeouts.
 */
import type { Logger } from '../log.js';
import type { Sql } from '../persistence/db.js';
import { claimDueTimers, nextTimerDelay, TIMER_CHANNEL } from '../persistence/timer-rows.js';
import type { ActorHost } from './host.js';

export interface TimerPollerOptions {
  pollMs: number;
  batch?: number;
  /** How long a claimed row stays claimed: a poller that dies mid-fire is taken over after it. */
  claimLeaseMs?: number;
}

export class TimerPoller {
  private running = false;
  private wake: (() => void) | null = null;
  private loop: Promise<void> | null = null;
  private unlisten: (() => Promise<void>) | null = null;
  fired = 0;

  constructor(
    private readonly host: ActorHost,
    private readonly sql: Sql,
    private readonly log: Logger,
    private readonly options: TimerPollerOptions,
  ) {}

  async start(): Promise<void> {
    if (this.running) return;
    this.running = true;
    const listener = await this.sql.listen(TIMER_CHANNEL, (payload) => {
      const due = Number(payload);
      if (!Number.isFinite(due) || due - Date.now() < this.options.pollMs) this.wake?.();
    });
    this.unlisten = listener.unlisten;
    this.loop = this.run();
  }

  async stop(): Promise<void> {
    this.running = false;
    this.wake?.();
    await this.loop;
    await this.unlisten?.().catch(() => {});
  }

  /** Fires every timer that is due now; returns how many fired (used by tests and the loop). */
  async tick(): Promise<number> {
    const batch = this.options.batch ?? 100;
    const due = await claimDueTimers(this.sql, batch, this.options.claimLeaseMs ?? 30_000);
    const results = await Promise.allSettled(due.map((t) => this.host.fireTimer(t)));
    results.forEach((r, i) => {
      if (r.status === 'rejected') {
        const t = due[i];
        // The row stays claimed until its lease passes, then another poll retries it.
        this.log.warn({ err: r.reason, entityId: t?.entityId, timer: t?.key }, 'timer failed');
      }
    });
    const fired = results.filter((r) => r.status === 'fulfilled' && r.value !== null).length;
    this.fired += fired;
    return due.length;
  }

  private async run(): Promise<void> {
    let failures = 0;
    while (this.running) {
      let sleepMs = this.options.pollMs;
      try {
        const claimed = await this.tick();
        failures = 0;
        if (claimed >= (this.options.batch ?? 100)) continue;
        const next = await nextTimerDelay(this.sql);
        if (next !== null) sleepMs = Math.min(sleepMs, Math.ceil(next) + 1);
      } catch (error) {
        failures++;
        sleepMs = Math.min(5_000, this.options.pollMs * 2 ** Math.min(failures, 5));
        this.log.warn({ err: error }, 'timer poll failed; retrying');
      }
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, sleepMs);
        this.wake = () => {
          clearTimeout(timer);
          resolve();
        };
      });
      this.wake = null;
    }
  }
}
