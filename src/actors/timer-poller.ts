/**
 * The durable timer poller: one per process. It claims due timer rows with
 * `FOR UPDATE SKIP LOCKED` (so each fires once across all processes) and finds passed task
 * leases by their column, fires each through the host, and sleeps until the next due time,
 * `TIMER_POLL_MS` at most. A commit of this process that sets something due sooner than
 * that wakes it at once and, after the commit, NOTIFYs the other processes' pollers (one
 * NOTIFY in flight at a time; what arrives meanwhile is folded into the next). Timers outlive
 * any process: they are rows, not setTimeouts.
 */
import type { Logger } from '../log.js';
import type { Sql } from '../persistence/db.js';
import { dueLeases, nextLeaseDelay } from '../persistence/lease-rows.js';
import {
  claimDueTimers,
  nextTimerDelay,
  notifyTimer,
  releaseTimer,
  TIMER_CHANNEL,
  type TimerRow,
} from '../persistence/timer-rows.js';
import type { ActorHost, Applied } from './host.js';

/** How long a claimed timer stays claimed by default. */
const CLAIM_LEASE_MS = 30_000;
/** Bound of the failure counts kept for backoff (each is one claimed timer's). */
const FAILURES_TRACKED = 10_000;

export interface TimerPollerOptions {
  pollMs: number;
  batch?: number;
  /** How long a claimed row stays claimed: a poller that dies mid-fire is taken over after it. */
  claimLeaseMs?: number;
}

export class TimerPoller {
  private running = false;
  private wake: (() => void) | null = null;
  /**
   * A wake asked for while the loop was not asleep (firing, or reading the next due time):
   * the loop looks again instead of sleeping, or a commit landing just after that read
   * would wait a whole poll interval.
   */
  private woken = false;
  private loop: Promise<void> | null = null;
  private unlisten: (() => Promise<void>) | null = null;
  private offCommit: (() => void) | null = null;
  /** The soonest due time still to NOTIFY, and whether a NOTIFY is in flight. */
  private notifyDue: number | null = null;
  private notifying = false;
  /** Failed fires per claimed timer (by token), for the backoff of its next claim. */
  private readonly failures = new Map<string, number>();
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
      if (!Number.isFinite(due) || due - Date.now() < this.options.pollMs) this.wakeUp();
    });
    this.unlisten = listener.unlisten;
    this.offCommit = this.host.onCommit((applied) => this.committed(applied));
    this.loop = this.run();
  }

  async stop(): Promise<void> {
    this.running = false;
    this.offCommit?.();
    this.offCommit = null;
    this.wakeUp();
    await this.loop;
    await this.unlisten?.().catch(() => {});
  }

  /**
   * After a commit: a timer or lease due within the poll interval needs a wake (here, and in
   * the other processes); one due later is found by the poll anyway.
   */
  private committed(applied: Applied[]): void {
    let soonest = Number.POSITIVE_INFINITY;
    for (const a of applied) if (a.dueAt !== undefined && a.dueAt < soonest) soonest = a.dueAt;
    if (soonest - Date.now() >= this.options.pollMs) return;
    this.wakeUp();
    this.notifyDue = Math.min(this.notifyDue ?? soonest, soonest);
    if (!this.notifying) void this.notifyAll();
  }

  private wakeUp(): void {
    this.woken = true;
    this.wake?.();
  }

  private async notifyAll(): Promise<void> {
    this.notifying = true;
    try {
      while (this.notifyDue !== null) {
        const due = this.notifyDue;
        this.notifyDue = null;
        // Best effort: a poller that misses it still finds the timer by its next poll.
        await notifyTimer(this.sql, due).catch((err: unknown) =>
          this.log.warn({ err }, 'timer notify failed'),
        );
      }
    } finally {
      this.notifying = false;
    }
  }

  /**
   * Fires every timer and lease that is due now; returns how many it found (used by tests and
   * the loop).
   */
  async tick(): Promise<number> {
    const batch = this.options.batch ?? 100;
    // Settled one by one: timers claimed (committed) while the lease read failed must still
    // fire now, or they stay claimed, and unfired, for the whole claim lease.
    const [claimed, found] = await Promise.allSettled([
      claimDueTimers(this.sql, batch, this.options.claimLeaseMs ?? CLAIM_LEASE_MS),
      dueLeases(this.sql, batch),
    ]);
    const due = claimed.status === 'fulfilled' ? claimed.value : [];
    const leases = found.status === 'fulfilled' ? found.value : [];
    const [timerResults, leaseResults] = await Promise.all([
      Promise.allSettled(due.map((t) => this.host.fireTimer(t))),
      Promise.allSettled(leases.map((id) => this.host.expireLease(id))),
    ]);
    await Promise.all(
      timerResults.map((r, i) => {
        const t = due[i] as TimerRow;
        if (r.status === 'fulfilled') {
          this.failures.delete(t.token);
          return undefined;
        }
        this.log.warn({ err: r.reason, entityId: t.entityId, timer: t.key }, 'timer failed');
        return this.handBack(t);
      }),
    );
    leaseResults.forEach((r, i) => {
      // The deadline stays in its column: the next poll tries again.
      if (r.status === 'rejected') {
        this.log.warn({ err: r.reason, entityId: leases[i] }, 'lease expiry failed');
      }
    });
    const fired = [...timerResults, ...leaseResults].filter(
      (r) => r.status === 'fulfilled' && r.value !== null,
    ).length;
    this.fired += fired;
    // The poll failed all the same: the loop backs off before the next.
    if (claimed.status === 'rejected') throw claimed.reason;
    if (found.status === 'rejected') throw found.reason;
    return Math.max(due.length, leases.length);
  }

  /**
   * A failed fire's claim goes back soon, sooner than its lease: a task's retry is not held
   * up for the claim lease by one dropped connection. Repeated failures of the same timer
   * back off up to the lease. If the hand-back fails too, the lease still frees the row.
   */
  private async handBack(t: TimerRow): Promise<void> {
    const n = (this.failures.get(t.token) ?? 0) + 1;
    if (this.failures.size >= FAILURES_TRACKED) this.failures.clear();
    this.failures.set(t.token, n);
    const leaseMs = this.options.claimLeaseMs ?? CLAIM_LEASE_MS;
    const afterMs = Math.min(
      leaseMs,
      Math.max(this.options.pollMs, 250) * 2 ** Math.min(n - 1, 16),
    );
    await releaseTimer(this.sql, t, afterMs).catch((err: unknown) =>
      this.log.warn({ err, entityId: t.entityId, timer: t.key }, 'timer hand-back failed'),
    );
  }

  private async run(): Promise<void> {
    let failures = 0;
    while (this.running) {
      let sleepMs = this.options.pollMs;
      this.woken = false;
      try {
        const claimed = await this.tick();
        failures = 0;
        if (claimed >= (this.options.batch ?? 100)) continue;
        const nexts = await Promise.all([nextTimerDelay(this.sql), nextLeaseDelay(this.sql)]);
        for (const next of nexts) {
          if (next !== null) sleepMs = Math.min(sleepMs, Math.ceil(next) + 1);
        }
      } catch (error) {
        failures++;
        sleepMs = Math.min(5_000, this.options.pollMs * 2 ** Math.min(failures, 5));
        this.log.warn({ err: error }, 'timer poll failed; retrying');
      }
      if (this.woken && failures === 0) continue;
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
