/**
 * The built-in workers of one process: `concurrency` slots, each a loop of claim-and-START,
 * run the executor while heartbeating, then COMPLETE or FAIL, every event carrying the
 * claim's fencing token. Claims are shared so that a task costs the worker less than one
 * commit: a slot that settles a task claims its next one in the same transaction, which the
 * slots that finished in the same turn of the event loop share (see `flushSoon`), and of the
 * idle slots only one long-polls, claiming for all of them at once when work turns up. While
 * tasks are short, those transactions also claim tasks ahead (`claimAhead` per slot), held
 * `claimed` in the pool's name: a slot that finishes goes on to one at once, without waiting
 * for its settle, and sends its START with the next transaction (one write with its COMPLETE
 * when it ends first). So a transaction settles and claims what all slots did meanwhile,
 * while no more than `concurrency` tasks run. A
 * heartbeat refused as stale means the lease is gone: the executor is aborted and its
 * outcome dropped. `stop(graceMs)` stops claiming at once, lets running tasks finish within
 * the grace period, then aborts them and RELEASEs each so that another worker can claim it
 * at once instead of after a full lease.
 */
import { setMaxListeners } from 'node:events';
import type { DecideEvent } from '../actors/decide.js';
import type { ActorHost, UnitOfWork } from '../actors/host.js';
import type { Config } from '../config.js';
import { IllegalTransition, NotFound, StaleToken } from '../errors.js';
import { type Logger, lazyChild } from '../log.js';
import type { Json } from '../machines/domain-events.js';
import type { ClaimedTask, ClaimService } from './claims.js';
import { type Executor, type ExecutorRegistry, failureText } from './executors/executor.js';
import { createExecutors } from './executors/index.js';
import { OutputBatcher, type OutputWriter } from './output-batcher.js';

export interface WorkerPoolOptions {
  /** `WORKER_ID`; slot n claims as `${workerId}#${n}`, tasks held ahead as `${workerId}#ahead`. */
  workerId: string;
  /** `WORKER_CONCURRENCY`: tasks run at once by this pool. */
  concurrency: number;
  /** `HEARTBEAT_MS`: how often a running task's lease is extended. */
  heartbeatMs: number;
  /** Length of one claim long poll (capped by the claim service). */
  claimWaitMs?: number;
  /** Task types to take; all when unset. */
  types?: string[];
  /**
   * After the grace period, how long an aborted executor may take to stop. One that takes
   * longer is left running un-heartbeated: its task is reclaimed after its lease, never
   * released while its work may still be going on.
   */
  abortWaitMs?: number;
  /** Where executors' output goes (the task output store); none when unset. */
  output?: OutputWriter;
  /**
   * `WORKER_CLAIM_AHEAD`: tasks per slot the pool may hold claimed (not started) for its
   * slots to begin as soon as they are free, while its tasks are short (see `aheadWanted`).
   * 0 or unset: none.
   */
  claimAhead?: number;
}

export interface WorkerStats {
  slots: number;
  /** Tasks being executed now. */
  running: number;
  /** Tasks claimed ahead and held for a free slot, not started. */
  held: number;
  claims: number;
  completions: number;
  failures: number;
  /** Tasks given back unfinished at shutdown. */
  releases: number;
  /** Claims lost to lease expiry (stale heartbeat, or a COMPLETE/FAIL refused as stale). */
  leaseLosses: number;
}

/** The pool a `worker` process runs, from its configuration; stop it with SHUTDOWN_GRACE_MS. */
export function createWorkerPool(
  host: ActorHost,
  claims: ClaimService,
  config: Config,
  log: Logger,
  output?: OutputWriter,
): WorkerPool {
  if (config.HEARTBEAT_MS >= config.LEASE_MS) {
    log.warn(
      { HEARTBEAT_MS: config.HEARTBEAT_MS, LEASE_MS: config.LEASE_MS },
      'HEARTBEAT_MS is not below LEASE_MS: running tasks will lose their leases',
    );
  }
  return new WorkerPool(host, claims, createExecutors(config), log.child({ component: 'worker' }), {
    workerId: config.WORKER_ID,
    concurrency: config.WORKER_CONCURRENCY,
    heartbeatMs: config.HEARTBEAT_MS,
    claimWaitMs: config.CLAIM_MAX_WAIT_MS,
    claimAhead: config.WORKER_CLAIM_AHEAD,
    output,
  });
}

type AbortCause = 'lease' | 'shutdown';

interface Execution {
  taskId: string;
  token: string;
  abort: AbortController;
  cause: AbortCause | null;
  /** Set when stop() gives up waiting: no more heartbeats, the lease runs out. */
  abandoned: boolean;
  /** A task claimed ahead: its START, sent as its executor begins (see `execute`). */
  start?: Settlement;
}

type Report = 'ok' | 'stale' | 'error';

/**
 * Events of one task for the next settle-and-claim transaction: a slot's COMPLETE or FAIL,
 * the START of a task claimed ahead, or both. `done` answers with the task claimed for the
 * slot in that transaction when `wantsNext`; if the transaction fails, with the events
 * reported alone (`reportAll`).
 */
interface Settlement {
  exec: Execution;
  workerId: string;
  events: DecideEvent[];
  wantsNext: boolean;
  done: Promise<{ report: Report; next: ClaimedTask | null }>;
  resolve: (next: ClaimedTask | null) => void;
  reject: (error: unknown) => void;
}

const REPORT_TRIES = 5;
/**
 * Settle-and-claim transactions of one pool in flight at once. One alone left the pool waiting
 * on it (a slot finishing meanwhile waited a whole transaction before its own began); more
 * than two made the batches smaller without draining faster (BENCHMARKS section 21).
 */
const SETTLE_LANES = 2;
const IDLE_POLL_MS = 500;
/**
 * Claiming ahead pays while tasks are short: a task held for a slot waits for the slot's
 * current task, and is work no other worker can take meanwhile. Above this mean run time
 * the pool claims no more ahead (those it holds are begun, or released, as slots free up).
 */
const AHEAD_MAX_RUN_MS = 50;
/** Weight of the newest run in the mean run time. */
const RUN_MS_WEIGHT = 0.1;

export class WorkerPool {
  private readonly counters = {
    claims: 0,
    completions: 0,
    failures: 0,
    releases: 0,
    leaseLosses: 0,
  };
  private readonly executions = new Set<Execution>();
  private loops: Promise<void>[] = [];
  private stopping = false;
  private claimAbort = new AbortController();
  /** Whether one idle slot is in the claim long poll (it claims for every idle slot). */
  private polling = false;
  /**
   * Idle slots waiting for the polling slot to claim a task for them, by slot id, in
   * arrival order; `poll` hands the first the long poll when the polling slot leaves it.
   * Only the polling slot claims for them, so no two claims are ever made for one slot.
   */
  private readonly idle = new Map<string, (next: ClaimedTask | 'poll' | null) => void>();
  /** Slots' COMPLETEs and FAILs waiting for the next settle-and-claim transaction. */
  private readonly settling: Settlement[] = [];
  /** Settle-and-claim transactions running (at most SETTLE_LANES; see `flushSoon`). */
  private settlingNow = 0;
  private flushQueued = false;
  /**
   * Tasks claimed ahead, oldest first (`claimed`, for the next slot that is free), each with
   * the end of its lease (epoch ms).
   */
  private readonly ahead: { c: ClaimedTask; expires: number }[] = [];
  /** Tasks being claimed ahead by transactions in flight. */
  private aheadClaiming = 0;
  /** While tasks are held: releases those whose lease would end before a slot begins them. */
  private aheadSweep: NodeJS.Timeout | null = null;
  /** Moving mean of executors' run times (ms); null before the first. */
  private meanRunMs: number | null = null;
  /**
   * Work no slot waits for (the settle of a slot that went on to a task claimed ahead, a
   * release, a settle-and-claim transaction): `stop` waits for it.
   */
  private readonly detached = new Set<Promise<unknown>>();

  /** The name tasks are claimed ahead in: the pool's, not a slot's (any slot may begin them). */
  private readonly aheadId: string;

  constructor(
    private readonly host: ActorHost,
    private readonly claims: ClaimService,
    private readonly executors: ExecutorRegistry,
    private readonly log: Logger,
    private readonly options: WorkerPoolOptions,
  ) {
    this.aheadId = `${options.workerId}#ahead`;
  }

  stats(): WorkerStats {
    return {
      slots: this.options.concurrency,
      running: this.executions.size,
      held: this.ahead.length,
      ...this.counters,
    };
  }

  /** Starts the slots; a no-op while running or when no executor is registered. */
  start(): void {
    if (this.loops.length > 0) return;
    if (this.executors.names().length === 0) {
      this.log.warn('no executors registered: the worker pool claims nothing');
      return;
    }
    this.stopping = false;
    this.claimAbort = new AbortController();
    // Every idle slot listens for the same abort.
    setMaxListeners(0, this.claimAbort.signal);
    for (let slot = 1; slot <= this.options.concurrency; slot++) {
      this.loops.push(this.slotLoop(`${this.options.workerId}#${slot}`));
    }
  }

  /**
   * Clean shutdown: no new claims from now on; tasks still running after `graceMs` are
   * aborted and released, and so is every task held ahead. Resolves when every slot is idle
   * (or abandoned, see abortWaitMs).
   */
  async stop(graceMs: number): Promise<void> {
    this.stopping = true;
    this.claimAbort.abort('worker pool stopping');
    for (const [id, hand] of [...this.idle]) {
      this.idle.delete(id);
      hand(null);
    }
    const idle = Promise.all(this.loops);
    if (!(await settlesWithin(idle, graceMs))) {
      this.log.info(
        {
          graceMs,
          running: [...this.executions].map((e) => e.taskId),
          detached: this.detached.size,
        },
        'shutdown grace over: aborting the tasks still running',
      );
      for (const e of this.executions) {
        e.cause ??= 'shutdown';
        e.abort.abort('worker shutting down');
      }
      const waitMs = this.options.abortWaitMs ?? 10_000;
      if (!(await settlesWithin(idle, waitMs))) {
        for (const e of this.executions) {
          e.abandoned = true;
          this.log.error(
            { taskId: e.taskId },
            'executor ignored its abort; its task is left to lease expiry',
          );
        }
      }
    }
    await this.drainDetached();
    if (this.aheadSweep) clearInterval(this.aheadSweep);
    this.aheadSweep = null;
    // Claimed ahead and never begun: back to the queue at once, for any worker.
    for (const { c } of this.ahead.splice(0)) {
      await this.release(this.execution(c), 'worker shutting down', this.log);
    }
    await this.drainDetached();
    this.loops = [];
  }

  /** Waits until nothing detached is left (what ends may start more). */
  private async drainDetached(): Promise<void> {
    while (this.detached.size > 0) await Promise.allSettled([...this.detached]);
  }

  private detach(work: Promise<unknown>): void {
    const tracked = work.catch((error: unknown) => {
      this.log.error({ err: error }, 'worker bookkeeping failed');
    });
    this.detached.add(tracked);
    void tracked.finally(() => this.detached.delete(tracked));
  }

  private async slotLoop(workerId: string): Promise<void> {
    const log = this.log.child({ workerId });
    let failures = 0;
    // The task claimed in the same transaction that settled this slot's last one.
    let carried: ClaimedTask | null = null;
    while (!this.stopping || carried) {
      let claimed = carried ?? (this.stopping ? null : this.takeAhead());
      carried = null;
      if (!claimed) {
        const generation = this.claims.wakeups.generation;
        const asked = Date.now();
        try {
          claimed = await this.next(workerId);
          failures = 0;
        } catch (error) {
          failures++;
          log.warn({ err: error }, 'claim failed; trying again');
          await delay(Math.min(5_000, 100 * 2 ** Math.min(failures, 6)), this.claimAbort.signal);
          continue;
        }
        if (!claimed) {
          // A service that does not long-poll (CLAIM_MAX_WAIT_MS=0) must not make this a busy loop.
          if (
            !this.stopping &&
            Date.now() - asked < IDLE_POLL_MS &&
            this.claims.wakeups.generation === generation
          ) {
            await this.claims.wakeups.wait(IDLE_POLL_MS, this.claimAbort.signal);
          }
          continue;
        }
      }
      this.counters.claims++;
      carried = await this.execute(claimed, workerId, log);
    }
  }

  /**
   * The next task for an idle slot: while another idle slot long-polls, wait for it to
   * claim one for this slot too; else long-poll for every idle slot.
   */
  private async next(workerId: string): Promise<ClaimedTask | null> {
    for (;;) {
      if (this.stopping) return null;
      if (!this.polling) return this.poll(workerId);
      const got = await new Promise<ClaimedTask | 'poll' | null>((resolve) =>
        this.idle.set(workerId, resolve),
      );
      if (got !== 'poll') return got;
    }
  }

  /** The long poll of the idle slots: each attempt claims one task per slot idle then. */
  private async poll(workerId: string): Promise<ClaimedTask | null> {
    this.polling = true;
    try {
      const claimed = await this.claims.claimMany(this.claimRequest(), () => [
        workerId,
        ...this.idle.keys(),
      ]);
      let mine: ClaimedTask | null = null;
      for (const c of claimed) {
        const slot = c.task.workerId ?? '';
        const hand = this.idle.get(slot);
        if (slot === workerId) mine = c;
        else if (hand) {
          this.idle.delete(slot);
          hand(c);
        } else if (!this.stopping) {
          // Its slot took a task claimed ahead meanwhile: the next free slot runs this one.
          this.holdAhead(c);
        } else {
          // Its slot stopped waiting (the pool is stopping): nobody here will run it.
          await this.release(this.execution(c), 'worker shutting down', this.log);
        }
      }
      return mine;
    } finally {
      this.polling = false;
      // Someone must go on polling for the slots still idle.
      const [first] = this.idle;
      if (first) {
        this.idle.delete(first[0]);
        first[1]('poll');
      }
    }
  }

  private claimRequest() {
    return {
      executors: this.executors.names(),
      types: this.options.types,
      waitMs: this.options.claimWaitMs ?? 30_000,
      signal: this.claimAbort.signal,
      start: true,
    };
  }

  /** Runs one claimed task to its end; returns the task claimed along with settling it. */
  private async execute(
    claimed: ClaimedTask,
    workerId: string,
    slotLog: Logger,
  ): Promise<ClaimedTask | null> {
    const { task, token } = claimed;
    const log = lazyChild(slotLog, { taskId: task.id, attempt: task.attempt });
    const exec = this.execution(claimed);
    const executor = this.executors.get(task.executor);
    this.executions.add(exec);
    try {
      if (this.stopping || !executor) {
        // Claimed as the pool began to stop (or, impossibly, for an unknown executor).
        const reason = executor ? 'worker shutting down' : `no executor ${task.executor}`;
        await this.release(exec, reason, log);
        return null;
      }
      // Claimed with `start`, the task is running already: one commit fewer per task. One
      // claimed ahead is begun at once, its START sent with the pool's next transaction (with
      // its COMPLETE, if it ends first); a refused START stops it like a lost lease.
      if (task.state !== 'running') {
        exec.start = this.enqueue(exec, [{ type: 'START', token }], workerId, false, log);
        void exec.start.done.then(({ report }) => {
          if (report === 'ok') return;
          exec.cause ??= 'lease';
          exec.abort.abort('START refused');
        });
      }
      const outcome = await this.runWithHeartbeat(exec, executor, task, log);
      if (exec.abandoned) return null;
      return await this.settle(exec, outcome, workerId, log);
    } finally {
      this.executions.delete(exec);
    }
  }

  private execution({ task, token }: ClaimedTask): Execution {
    return { taskId: task.id, token, abort: new AbortController(), cause: null, abandoned: false };
  }

  private async runWithHeartbeat(
    exec: Execution,
    executor: Executor,
    task: ClaimedTask['task'],
    log: Logger,
  ): Promise<{ ok: true; result: Json } | { ok: false; error: unknown }> {
    const heartbeat = this.heartbeat(exec, task.leaseExpiresAt, log);
    const output = this.options.output
      ? new OutputBatcher(this.options.output, task.id, exec.token, log)
      : null;
    const began = performance.now();
    try {
      const { result } = await executor.run(task, {
        signal: exec.abort.signal,
        attempt: task.attempt,
        token: exec.token,
        log,
        ...(output ? { output: (stream, text) => output.push(stream, text) } : {}),
      });
      return { ok: true, result };
    } catch (error) {
      return { ok: false, error };
    } finally {
      const ran = performance.now() - began;
      this.meanRunMs =
        this.meanRunMs === null ? ran : this.meanRunMs + RUN_MS_WEIGHT * (ran - this.meanRunMs);
      // Before COMPLETE or FAIL: once the task settles, its output is refused.
      await output?.close();
      await heartbeat.stop();
    }
  }

  private async settle(
    exec: Execution,
    outcome: { ok: true; result: Json } | { ok: false; error: unknown },
    workerId: string,
    log: Logger,
  ): Promise<ClaimedTask | null> {
    const { token } = exec;
    if (!outcome.ok && exec.cause === 'lease') {
      this.counters.leaseLosses++;
      log.warn('lease lost: the task was aborted and belongs to no one here any more');
      return null;
    }
    if (!outcome.ok && exec.cause === 'shutdown') {
      await this.release(exec, 'worker shutting down', log);
      return null;
    }
    // Even after a lost lease: the token decides, and a stale one changes nothing.
    const event: DecideEvent = outcome.ok
      ? { type: 'COMPLETE', token, result: outcome.result }
      : { type: 'FAIL', token, error: failureText(outcome.error) };
    if (event.type === 'FAIL') log.info({ error: event.error }, 'task failed');
    // With a task claimed ahead to go on to, the slot does not wait for this settle.
    const wantsNext = this.ahead.length === 0;
    const settled = this.settleAndClaim(exec, event, workerId, wantsNext, log).then((r) => {
      if (r.report === 'ok') {
        if (event.type === 'COMPLETE') this.counters.completions++;
        else this.counters.failures++;
      } else if (r.report === 'stale' || exec.cause === 'lease') {
        this.counters.leaseLosses++;
      }
      return r.next;
    });
    if (wantsNext) return settled;
    this.detach(settled);
    return null;
  }

  /**
   * Settles the task and, in the same transaction, claims this slot's next task (when it
   * `wantsNext`). If that transaction fails for any reason (a refusal, a lost connection),
   * none of it happened: the events are then reported alone, and the slot claims as usual.
   */
  private async settleAndClaim(
    exec: Execution,
    event: DecideEvent,
    workerId: string,
    wantsNext: boolean,
    log: Logger,
  ): Promise<{ report: Report; next: ClaimedTask | null }> {
    const start = exec.start;
    if (start && this.settling.includes(start)) {
      // Its START has not gone out yet: one write of the task for both.
      start.events.push(event);
      start.workerId = workerId;
      start.wantsNext = wantsNext;
      return start.done;
    }
    if (start) {
      const started = await start.done;
      if (started.report !== 'ok') return { report: started.report, next: null };
    }
    if (this.stopping || exec.abandoned) {
      return { report: await this.reportAll(exec, [event], log), next: null };
    }
    return this.enqueue(exec, [event], workerId, wantsNext, log).done;
  }

  /** Queues `events` of one task for the next settle-and-claim transaction. */
  private enqueue(
    exec: Execution,
    events: DecideEvent[],
    workerId: string,
    wantsNext: boolean,
    log: Logger,
  ): Settlement {
    const entry = { exec, workerId, events, wantsNext } as Settlement;
    entry.done = new Promise((resolve) => {
      entry.resolve = (next) => resolve({ report: 'ok', next });
      entry.reject = (error) => {
        if (!isRefusal(error)) {
          log.warn({ err: error, events: entry.events.map((e) => e.type) }, 'settle failed');
        }
        resolve(this.reportAll(exec, entry.events, log).then((report) => ({ report, next: null })));
      };
    });
    this.settling.push(entry);
    this.flushSoon();
    return entry;
  }

  /** Reports events alone, in order, up to the first that is not accepted. */
  private async reportAll(exec: Execution, events: DecideEvent[], log: Logger): Promise<Report> {
    for (const event of events) {
      const r = await this.report(exec, event, log);
      if (r !== 'ok') return r;
    }
    return 'ok';
  }

  /**
   * The oldest task held ahead. Those held too long (see `sweepAhead`) are released; they
   * are the oldest, so only the head of the queue is looked at.
   */
  private takeAhead(): ClaimedTask | null {
    const soon = Date.now() + this.options.heartbeatMs;
    for (;;) {
      const held = this.ahead.shift();
      if (!held) return null;
      if (held.expires > soon) return held.c;
      this.releaseHeld(held.c);
    }
  }

  /**
   * Releases the held tasks whose lease would end before a first heartbeat: every slot stayed
   * busy longer than the tasks' lease allows (a run far longer than the mean). Released, not
   * left to expire, so that a task nobody began is not charged an attempt.
   */
  private sweepAhead(): void {
    const soon = Date.now() + this.options.heartbeatMs;
    const keep = this.ahead.splice(0).filter((held) => {
      if (held.expires > soon) return true;
      this.releaseHeld(held.c);
      return false;
    });
    this.ahead.push(...keep);
    if (this.ahead.length === 0 && this.aheadSweep) {
      clearInterval(this.aheadSweep);
      this.aheadSweep = null;
    }
  }

  /** Gives back a held task nobody began, not charged (see `sweepAhead`). */
  private releaseHeld(c: ClaimedTask): void {
    this.detach(this.release(this.execution(c), 'held too long for a free slot', this.log));
  }

  /**
   * A task for no slot in particular: to a slot waiting for the long poll, or held for the
   * next one that is free.
   */
  private holdAhead(c: ClaimedTask): void {
    if (this.stopping) {
      this.detach(this.release(this.execution(c), 'worker shutting down', this.log));
      return;
    }
    const [waiting] = this.idle;
    if (waiting) {
      this.idle.delete(waiting[0]);
      waiting[1](c);
      return;
    }
    const held = {
      c,
      expires: c.task.leaseExpiresAt ? Date.parse(c.task.leaseExpiresAt) : Infinity,
    };
    // One already STARTed (claimed for a slot that went on to another) goes first.
    if (c.task.state === 'running') this.ahead.unshift(held);
    else this.ahead.push(held);
    this.aheadSweep ??= setInterval(
      () => this.sweepAhead(),
      Math.max(50, Math.floor(this.options.heartbeatMs / 2)),
    );
  }

  /**
   * How many more tasks to claim ahead in a transaction that claims `forSlots` for slots:
   * up to `claimAhead` per slot held or being claimed, while the mean run time is short.
   */
  private aheadWanted(forSlots: number): number {
    const perSlot = this.options.claimAhead ?? 0;
    if (perSlot <= 0 || this.stopping) return 0;
    if (this.meanRunMs === null || this.meanRunMs > AHEAD_MAX_RUN_MS) return 0;
    const target = perSlot * this.options.concurrency;
    return Math.max(0, target - this.ahead.length - this.aheadClaiming - forSlots);
  }

  /**
   * Starts a settle-and-claim transaction for the settlements waiting, unless SETTLE_LANES
   * are running: those that arrive meanwhile wait for one to end and then go together, so
   * slots finishing at once share one transaction (one lookup of candidates, their writes
   * pipelined, one commit) instead of each paying for its own. One that finds a lane free
   * starts at the end of this turn of the event loop (setImmediate), so that the slots whose
   * executors finish in the same turn (timers or I/O callbacks of one poll) go together: a
   * microtask went alone more often and drained a tenth slower (BENCHMARKS section 21).
   */
  private flushSoon(): void {
    if (this.settlingNow >= SETTLE_LANES || this.flushQueued) return;
    this.flushQueued = true;
    setImmediate(() => {
      this.flushQueued = false;
      this.detach(this.flush());
    });
  }

  private async flush(): Promise<void> {
    if (this.settlingNow >= SETTLE_LANES || this.settling.length === 0) return;
    const batch = this.settling.splice(0);
    this.settlingNow++;
    // Slots of a pool that began to stop claim nothing more; they still settle.
    const claimers = this.stopping ? [] : batch.filter((s) => s.wantsNext).map((s) => s.workerId);
    const ahead = this.aheadWanted(claimers.length);
    this.aheadClaiming += ahead;
    try {
      const claimed = await this.claims.settleAndClaim(
        this.claimRequest(),
        claimers,
        // One send for all of them: their rows are written by one statement where they can be.
        [
          (uow: UnitOfWork) =>
            uow.sendMany(
              'task',
              batch.map((s) => ({ id: s.exec.taskId, events: s.events.map((e) => () => e) })),
            ),
        ],
        ahead > 0 ? { workerId: this.aheadId, count: ahead } : undefined,
      );
      const bySlot = new Map<string, ClaimedTask>();
      for (const c of claimed) {
        if (c.task.workerId === this.aheadId) this.holdAhead(c);
        else bySlot.set(c.task.workerId ?? '', c);
      }
      for (const s of batch) s.resolve(s.wantsNext ? (bySlot.get(s.workerId) ?? null) : null);
    } catch (error) {
      for (const s of batch) s.reject(error);
    } finally {
      this.aheadClaiming -= ahead;
      this.settlingNow--;
      if (this.settling.length > 0) this.flushSoon();
    }
  }

  private async release(exec: Execution, reason: string, log: Logger): Promise<void> {
    const r = await this.report(exec, { type: 'RELEASE', token: exec.token, reason }, log);
    if (r === 'ok') this.counters.releases++;
    if (r === 'stale') this.counters.leaseLosses++;
  }

  /**
   * Extends the lease every `heartbeatMs`. A refusal (stale token, a state that no longer
   * takes heartbeats) means another claim owns the task now: abort the executor. If
   * heartbeats fail for other reasons until the lease's own end, the lease is presumed lost.
   */
  private heartbeat(exec: Execution, leaseExpiresAt: string | null, log: Logger) {
    let expiresAt = leaseExpiresAt ? Date.parse(leaseExpiresAt) : Number.POSITIVE_INFINITY;
    let stopped = false;
    let timer: NodeJS.Timeout | undefined;
    let inFlight: Promise<void> = Promise.resolve();
    const lost = (why: string, err?: unknown) => {
      stopped = true;
      exec.cause ??= 'lease';
      log.warn({ err }, `lease lost (${why}): aborting the executor`);
      exec.abort.abort('lease lost');
    };
    const beat = async () => {
      if (stopped || exec.abandoned) return;
      try {
        const applied = await this.host.send('task', exec.taskId, {
          type: 'HEARTBEAT',
          token: exec.token,
        });
        expiresAt =
          (applied.snapshot.context as { leaseExpiresAt: number | null }).leaseExpiresAt ??
          expiresAt;
      } catch (error) {
        if (isRefusal(error)) return lost('heartbeat refused', error);
        log.warn({ err: error }, 'heartbeat failed');
        if (Date.now() >= expiresAt) return lost('no heartbeat succeeded within the lease');
      }
      schedule();
    };
    const schedule = () => {
      if (stopped) return;
      timer = setTimeout(() => {
        inFlight = beat();
      }, this.options.heartbeatMs);
    };
    schedule();
    return {
      stop: async () => {
        stopped = true;
        clearTimeout(timer);
        await inFlight;
      },
    };
  }

  /**
   * Sends a worker event; retries errors that are not a refusal (a dropped connection), which
   * is safe because the token fences every retry. Never retries a refusal.
   */
  private async report(exec: Execution, event: DecideEvent, log: Logger): Promise<Report> {
    for (let attempt = 1; ; attempt++) {
      try {
        await this.host.send('task', exec.taskId, event);
        return 'ok';
      } catch (error) {
        if (isRefusal(error)) {
          log.warn({ err: error, event: event.type }, `${event.type} refused: dropped`);
          return 'stale';
        }
        if (attempt >= REPORT_TRIES) {
          log.error({ err: error, event: event.type }, `${event.type} failed; giving up`);
          return 'error';
        }
        await delay(100 * 2 ** attempt);
      }
    }
  }
}

/** The task is no longer ours to report on: another claim holds it, or it moved on. */
function isRefusal(error: unknown): boolean {
  return (
    error instanceof StaleToken || error instanceof IllegalTransition || error instanceof NotFound
  );
}

/** True when `work` settles within `ms`; the timer never outlives the answer. */
async function settlesWithin(work: Promise<unknown>, ms: number): Promise<boolean> {
  const timeout = new AbortController();
  const timedOut = delay(ms, timeout.signal).then(() => !timeout.signal.aborted);
  try {
    return await Promise.race([work.then(() => true), timedOut.then((t) => !t)]);
  } finally {
    timeout.abort();
  }
}

function delay(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    if (signal?.aborted) return resolve();
    const done = () => {
      clearTimeout(timer);
      signal?.removeEventListener('abort', done);
      resolve();
    };
    const timer = setTimeout(done, ms);
    signal?.addEventListener('abort', done, { once: true });
  });
}
