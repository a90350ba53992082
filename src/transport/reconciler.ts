/**
 * The reconciler: Postgres is the source of truth, and JetStream may lose acknowledged
 * messages. On a slow interval, in every process, it finds in Postgres (queries in
 * src/persistence) where a reaction's effect is missing and runs the same policy
 * (src/policies) the reaction would have:
 * - a ticket whose record of a task's state is behind the task → `TASK_STATE` (which advances
 *   or blocks it when that is due);
 * - a cancelled ticket with open tasks → `CANCEL` them;
 * - a waiting task whose dependencies all completed → `DEPS_MET`; one with a cancelled
 *   dependency → `CANCEL` (the dependency policy, had its transaction not run it);
 * - pending tasks waiting longer than the grace period → one dispatch wake-up.
 * Sweeps walk partial indexes in keyset order, a bounded batch at a time. Only rows untouched
 * for `graceMs` are considered, so it does not race reactions that are merely in flight.
 */
import type { NatsConnection } from '@nats-io/transport-node';
import type { ActorHost } from '../actors/host.js';
import type { Logger } from '../log.js';
import type { Sql } from '../persistence/db.js';
import { settledWaitingTasks } from '../persistence/dependency-rows.js';
import {
  driftedTasks,
  openTasksAfter,
  openTicketIdsAfter,
  stalePendingTask,
} from '../persistence/reaction-rows.js';
import { cancelOpenTasks, forwardTaskState, settleWaitingTask } from '../policies/index.js';
import { publishDispatch } from './dispatch.js';
import type { TransportNames } from './subjects.js';

export interface ReconcilerOptions {
  sql: Sql;
  host: ActorHost;
  log: Logger;
  names: TransportNames;
  /** For dispatch wake-ups; none are sent without it. */
  nc?: NatsConnection;
  intervalMs: number;
  /** Rows per query. */
  batchSize?: number;
  /** Batches per sweep and run; the cursor carries over to the next run. */
  maxBatches?: number;
  /** Rows changed more recently than this are left to the reactions. */
  graceMs?: number;
}

export interface ReconcilerStats {
  runs: number;
  ticketsFixed: number;
  tasksCancelled: number;
  /** Waiting tasks released or cancelled because their dependencies had settled. */
  waitingSettled: number;
  dispatches: number;
  errors: number;
}

export interface ReconcileResult {
  ticketsFixed: number;
  tasksCancelled: number;
  dispatched: boolean;
}

export class Reconciler {
  readonly stats: ReconcilerStats = {
    runs: 0,
    ticketsFixed: 0,
    tasksCancelled: 0,
    waitingSettled: 0,
    dispatches: 0,
    errors: 0,
  };
  private timer: NodeJS.Timeout | null = null;
  private running: Promise<ReconcileResult> | null = null;
  private ticketCursor = '';
  private taskCursor: [string, string] = ['', ''];
  private readonly batchSize: number;
  private readonly maxBatches: number;
  private readonly graceMs: number;

  constructor(private readonly o: ReconcilerOptions) {
    this.batchSize = o.batchSize ?? 500;
    this.maxBatches = o.maxBatches ?? 10;
    this.graceMs = o.graceMs ?? Math.min(o.intervalMs, 10_000);
  }

  start(): void {
    if (this.timer) return;
    this.timer = setInterval(() => {
      void this.runOnce().catch((error) => {
        this.stats.errors++;
        this.o.log.warn({ err: error }, 'reconcile run failed');
      });
    }, this.o.intervalMs);
    this.timer.unref();
  }

  async stop(): Promise<void> {
    if (this.timer) clearInterval(this.timer);
    this.timer = null;
    await this.running?.catch(() => undefined);
  }

  /** One run of every sweep (a run already under way is joined, not repeated). */
  runOnce(): Promise<ReconcileResult> {
    this.running ??= this.doRun().finally(() => {
      this.running = null;
    });
    return this.running;
  }

  private async doRun(): Promise<ReconcileResult> {
    this.stats.runs++;
    const ticketsFixed = await this.sweepTaskStates();
    const tasksCancelled = await this.sweepCancelled();
    await this.sweepWaiting();
    const dispatched = await this.dispatchWaiting();
    if (ticketsFixed + tasksCancelled > 0) {
      this.o.log.info({ ticketsFixed, tasksCancelled }, 'reconciler applied missed reactions');
    }
    return { ticketsFixed, tasksCancelled, dispatched };
  }

  /** Tickets whose record of a task is older than the task and says another state. */
  private async sweepTaskStates(): Promise<number> {
    const { sql } = this.o;
    let fixed = 0;
    for (let b = 0; b < this.maxBatches; b++) {
      const ids = await openTicketIdsAfter(sql, this.ticketCursor, this.batchSize);
      if (ids.length === 0) {
        this.ticketCursor = '';
        break;
      }
      this.ticketCursor = ids[ids.length - 1] as string;
      for (const taskId of await driftedTasks(sql, ids, this.graceMs)) {
        const { value } = await this.o.host.transact((uow) => forwardTaskState(uow, taskId));
        if (value) fixed++;
      }
      if (ids.length < this.batchSize) {
        this.ticketCursor = '';
        break;
      }
    }
    this.stats.ticketsFixed += fixed;
    return fixed;
  }

  /** Open tasks of cancelled tickets. */
  private async sweepCancelled(): Promise<number> {
    const { sql } = this.o;
    let cancelled = 0;
    for (let b = 0; b < this.maxBatches; b++) {
      const rows = await openTasksAfter(sql, this.taskCursor, this.batchSize);
      const last = rows[rows.length - 1];
      if (!last) {
        this.taskCursor = ['', ''];
        break;
      }
      this.taskCursor = [last.ticketId, last.id];
      const tickets = [...new Set(rows.filter((r) => r.ticketCancelled).map((r) => r.ticketId))];
      for (const ticketId of tickets) {
        const { value } = await this.o.host.transact((uow) => cancelOpenTasks(uow, ticketId));
        cancelled += value;
      }
      if (rows.length < this.batchSize) {
        this.taskCursor = ['', ''];
        break;
      }
    }
    this.stats.tasksCancelled += cancelled;
    return cancelled;
  }

  /** Waiting tasks whose dependencies settled without the dependency policy acting. */
  private async sweepWaiting(): Promise<number> {
    let settled = 0;
    for (const t of await settledWaitingTasks(this.o.sql, this.graceMs, this.batchSize)) {
      const { value } = await this.o.host.transact((uow) =>
        settleWaitingTask(uow, t.id, t.depCancelled),
      );
      if (value) settled++;
    }
    this.stats.waitingSettled += settled;
    return settled;
  }

  /** A pending task older than the grace period may have missed its dispatch: wake claimers. */
  private async dispatchWaiting(): Promise<boolean> {
    if (!this.o.nc || this.o.nc.isClosed()) return false;
    const taskId = await stalePendingTask(this.o.sql, this.graceMs);
    if (!taskId) return false;
    publishDispatch(this.o.nc, this.o.names, { taskId, event: 'reconcile' });
    this.stats.dispatches++;
    return true;
  }
}
