/**
 * Wake-ups for idle claimers. A claim that finds nothing waits here instead of sleeping in a
 * loop; it is woken when this process commits a change that may make a task claimable, or
 * when a dispatch message arrives from another process over NATS. A fallback poll still
 * runs, since a wake-up is a latency optimisation and never the only way to find work.
 *
 * Waiters queue in arrival order, each with the filter of what it claims, and each freed
 * task wakes one of them: the first whose filter takes it. Waking all of them sent every
 * idle claimer into a claim transaction per commit, for one winner. What cannot be told
 * apart (a freed worktree or type slot unblocks a task we do not know) wakes the first
 * waiter of each kind of claimer, which is still one per kind, not one per waiter.
 *
 * Plain collections, not an @xstate/store: the queue holds resolve callbacks, which are not
 * state to snapshot, and a notify must pick and remove its waiters in one synchronous step.
 */

/** What a claimer takes: the executors it runs, and the task types (all when absent). */
export interface WaiterFilter {
  executors: readonly string[];
  types?: readonly string[] | undefined;
}

/** Something that may have become claimable; without an executor, nobody knows what. */
export interface Freed {
  executor?: string | undefined;
  type?: string | undefined;
}

/** Why a wait ended; `woken` carries what woke it, to pass on if it is not used. */
export type WaitResult = { woken: Freed } | 'timeout' | 'aborted';

interface Waiter {
  filter: WaiterFilter | undefined;
  kind: string;
  wake: (freed: Freed) => void;
}

const MAX_POLL_KINDS = 1_000;

export class Wakeups {
  /** In arrival order (a Set iterates in insertion order): the longest waiting wakes first. */
  private readonly waiters = new Set<Waiter>();
  /** Increments on every notify, so a claimer can tell it missed nothing while it looked. */
  generation = 0;
  /** Waiters woken so far (a notify that finds nobody counts nothing). */
  woken = 0;

  /** When a waiter of each kind last took its fallback poll (see `pollTurn`). */
  private readonly lastPoll = new Map<string, number>();

  /**
   * Whether a waiter whose fallback poll came due should look now. One waiter per kind
   * polls per interval: the poll only finds what no wake-up announced (a worktree or a type
   * slot freed in another process), and whoever finds it wakes the next waiter if more work
   * is queued. Without this, N idle claimers ran N claim transactions per interval.
   */
  pollTurn(filter: WaiterFilter | undefined, intervalMs: number, now = Date.now()): boolean {
    const kind = kindOf(filter);
    const last = this.lastPoll.get(kind);
    // Arrival order staggers the waiters' timers: a poll within 90% of the interval counts.
    if (last !== undefined && now - last < intervalMs * 0.9) return false;
    // Kinds come from clients' type lists; forgetting them only costs an extra poll.
    if (this.lastPoll.size >= MAX_POLL_KINDS) this.lastPoll.clear();
    this.lastPoll.set(kind, now);
    return true;
  }

  /** Claimers waiting now. */
  get waiting(): number {
    return this.waiters.size;
  }

  /** One wake per freed item (an item nobody waits for wakes nobody). */
  notify(freed: readonly Freed[] = [{}]): void {
    this.generation++;
    for (const f of freed) {
      if (f.executor === undefined) this.wakeEachKind(f);
      else this.wakeFirst(f);
    }
  }

  /** Resolves on a wake-up meant for this waiter, after `ms`, or when `signal` aborts. */
  wait(ms: number, signal?: AbortSignal, filter?: WaiterFilter): Promise<WaitResult> {
    return new Promise((resolve) => {
      if (signal?.aborted) return resolve('aborted');
      const end = (result: WaitResult) => {
        clearTimeout(timer);
        this.waiters.delete(waiter);
        signal?.removeEventListener('abort', onAbort);
        resolve(result);
      };
      const onAbort = () => end('aborted');
      const waiter: Waiter = {
        filter,
        kind: kindOf(filter),
        wake: (freed) => end({ woken: freed }),
      };
      const timer = setTimeout(() => end('timeout'), ms);
      this.waiters.add(waiter);
      signal?.addEventListener('abort', onAbort, { once: true });
    });
  }

  private wakeFirst(freed: Freed): void {
    for (const w of this.waiters) {
      if (takes(w.filter, freed)) {
        this.woken++;
        w.wake(freed);
        return;
      }
    }
  }

  private wakeEachKind(freed: Freed): void {
    const seen = new Set<string>();
    for (const w of [...this.waiters]) {
      if (seen.has(w.kind)) continue;
      seen.add(w.kind);
      this.woken++;
      w.wake(freed);
    }
  }
}

function takes(filter: WaiterFilter | undefined, freed: Freed): boolean {
  if (!filter) return true;
  if (freed.executor !== undefined && !filter.executors.includes(freed.executor)) return false;
  if (!filter.types || filter.types.length === 0 || freed.type === undefined) return true;
  return filter.types.includes(freed.type);
}

function kindOf(filter: WaiterFilter | undefined): string {
  if (!filter) return '*';
  return JSON.stringify([[...filter.executors].sort(), [...(filter.types ?? [])].sort()]);
}
