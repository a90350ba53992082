/**
 * The one claim protocol, shared by the built-in workers and outside agents
 * (`POST /tasks/claim`): pick the best claimable task and send it `CLAIM` through its actor
 * in the same transaction, so a task is claimed once even with many claimers in many
 * processes. A task whose worktree is held, or whose type is at its cluster-wide cap,
 * is skipped and stays pending.
 */
import type { ActorHost, Applied } from '../actors/host.js';
import { type TaskView, taskView } from '../actors/views.js';
import { ACTIVE_TASK_STATES, type TaskState } from '../machines/task.js';
import { belowCap, lockCandidates, typesAtCap, worktreeFree } from '../persistence/claim-rows.js';
import { sqlState } from '../persistence/db.js';
import type { Wakeups } from './wakeups.js';

export interface ClaimRequest {
  workerId: string;
  /** Executors this claimer runs; agents over HTTP claim `external` tasks. */
  executors?: string[];
  types?: string[] | undefined;
  /** Long poll: wait up to this long for a task (capped by the service). */
  waitMs?: number;
  /** Ends a long poll early (shutdown, a closed HTTP request); no claim is tried after it. */
  signal?: AbortSignal;
}

export interface ClaimedTask {
  task: TaskView;
  token: string;
}

export interface ClaimOptions {
  /** Cluster-wide caps on claimed/running tasks per type. */
  typeLimits: Record<string, number>;
  maxWaitMs: number;
  /** Fallback poll while waiting, in case a wake-up was lost. */
  pollMs?: number;
}

/**
 * Rows locked per attempt. Small, so that concurrent claimers each lock different rows
 * (SKIP LOCKED) instead of one claimer holding the whole head of the queue.
 */
const CANDIDATES_PER_TRY = 2;
const DEADLOCK_DETECTED = '40P01';

/** One per process: it subscribes to the host's commits for as long as it lives (see `close`). */
export class ClaimService {
  claims = 0;
  private readonly unsubscribe: () => void;

  constructor(
    private readonly host: ActorHost,
    readonly wakeups: Wakeups,
    private readonly options: ClaimOptions,
  ) {
    // Waiting claimers in this process wake on every local commit that may free work;
    // commits in other processes reach them through `wakeups.notify()` from NATS.
    this.unsubscribe = host.onCommit((applied) => {
      if (freesWork(applied)) wakeups.notify();
    });
  }

  /** Stops listening to the host's commits. */
  close(): void {
    this.unsubscribe();
  }

  async claim(req: ClaimRequest): Promise<ClaimedTask | null> {
    const deadline = Date.now() + Math.min(req.waitMs ?? 0, this.options.maxWaitMs);
    for (;;) {
      if (req.signal?.aborted) return null;
      const generation = this.wakeups.generation;
      const claimed = await this.claimOnce(req);
      if (claimed) return claimed;
      const left = deadline - Date.now();
      if (left <= 0) return null;
      // Something changed while we looked: look again before sleeping.
      if (this.wakeups.generation !== generation) continue;
      await this.wakeups.wait(Math.min(left, this.options.pollMs ?? 1_000), req.signal);
    }
  }

  async claimOnce(req: ClaimRequest): Promise<ClaimedTask | null> {
    const executors = req.executors ?? ['external'];
    if (executors.length === 0) return null;
    const limits = this.options.typeLimits;
    try {
      const { value } = await this.host.transact(async (uow) => {
        const excludeTypes = await typesAtCap(uow.tx, limits);
        const candidates = await lockCandidates(
          uow.tx,
          { executors, types: req.types, excludeTypes },
          CANDIDATES_PER_TRY,
        );
        // At most one cap lock per transaction: the only lock a claim waits for, so two
        // claims never wait for each other in a cycle.
        let capLocked: string | null = null;
        for (const c of candidates) {
          if (c.worktree !== null && !(await worktreeFree(uow.tx, c.worktree))) continue;
          const cap = limits[c.type];
          if (cap !== undefined) {
            if (capLocked !== null && capLocked !== c.type) continue;
            capLocked = c.type;
            if (!(await belowCap(uow.tx, c.type, cap))) continue;
          }
          return uow.send('task', c.id, { type: 'CLAIM', workerId: req.workerId });
        }
        return null;
      });
      if (!value) return null;
      this.claims++;
      return toClaimed(value);
    } catch (error) {
      // Not expected (see above), but a deadlock costs a retry, never a failed claim.
      if (sqlState(error) === DEADLOCK_DETECTED) return null;
      throw error;
    }
  }
}

function toClaimed(applied: Applied): ClaimedTask {
  const task = taskView(applied.snapshot, applied.version);
  const token = (applied.snapshot.context as { token: string }).token;
  return { task, token };
}

const isActive = (state: string | null) => ACTIVE_TASK_STATES.includes(state as TaskState);

/**
 * Applied changes that may make a task claimable: a task became pending (created, retried,
 * released, requeued) or left `claimed`/`running` (its worktree and type slot are free).
 * START and HEARTBEAT stay active and wake nobody.
 */
export function freesWork(applied: Applied[]): boolean {
  return applied.some(
    (a) =>
      a.entityType === 'task' &&
      (a.state === 'pending' || (isActive(a.from) && !isActive(a.state))),
  );
}
