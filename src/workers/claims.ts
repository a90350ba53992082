/**
 * The one claim protocol, shared by the built-in workers and outside agents
 * (`POST /tasks/claim`): pick the best claimable task and send it `CLAIM` through its actor
 * in the same transaction, so a task is claimed once even with many claimers in many
 * processes. A task whose worktree is held, or whose type is at its cluster-wide cap,
 * is skipped and stays pending.
 */
import type { ActorHost, Applied } from '../actors/host.js';
import { type TaskView, taskView } from '../actors/views.js';
import { belowCap, lockCandidates, typesAtCap, worktreeFree } from '../persistence/claim-rows.js';
import type { Wakeups } from './wakeups.js';

export interface ClaimRequest {
  workerId: string;
  /** Executors this claimer runs; agents over HTTP claim `external` tasks. */
  executors?: string[];
  types?: string[] | undefined;
  /** Long poll: wait up to this long for a task (capped by the service). */
  waitMs?: number;
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

export class ClaimService {
  claims = 0;

  constructor(
    private readonly host: ActorHost,
    private readonly wakeups: Wakeups,
    private readonly options: ClaimOptions,
  ) {}

  async claim(req: ClaimRequest): Promise<ClaimedTask | null> {
    const deadline = Date.now() + Math.min(req.waitMs ?? 0, this.options.maxWaitMs);
    for (;;) {
      const generation = this.wakeups.generation;
      const claimed = await this.claimOnce(req);
      if (claimed) return claimed;
      const left = deadline - Date.now();
      if (left <= 0 || req.signal?.aborted) return null;
      // Something changed while we looked: look again before sleeping.
      if (this.wakeups.generation !== generation) continue;
      await this.wakeups.wait(Math.min(left, this.options.pollMs ?? 1_000), req.signal);
    }
  }

  async claimOnce(req: ClaimRequest): Promise<ClaimedTask | null> {
    const executors = req.executors ?? ['external'];
    const { value } = await this.host.transact(async (uow) => {
      const excludeTypes = await typesAtCap(uow.tx, this.options.typeLimits);
      const candidates = await lockCandidates(
        uow.tx,
        { executors, types: req.types, excludeTypes },
        CANDIDATES_PER_TRY,
      );
      for (const c of candidates) {
        if (c.worktree !== null && !(await worktreeFree(uow.tx, c.worktree))) continue;
        const cap = this.options.typeLimits[c.type];
        if (cap !== undefined && !(await belowCap(uow.tx, c.type, cap))) continue;
        return uow.send('task', c.id, { type: 'CLAIM', workerId: req.workerId });
      }
      return null;
    });
    if (!value) return null;
    this.claims++;
    return toClaimed(value);
  }
}

function toClaimed(applied: Applied): ClaimedTask {
  const task = taskView(applied.snapshot, applied.version);
  const token = (applied.snapshot.context as { token: string }).token;
  return { task, token };
}

/** Applied changes that may make a task claimable (new, retried, or a slot freed). */
export function freesWork(applied: Applied[]): boolean {
  return applied.some(
    (a) =>
      a.entityType === 'task' &&
      (a.state === 'pending' || a.from === 'claimed' || a.from === 'running'),
  );
}
