/**
 * The one claim protocol, shared by the built-in workers and outside agents
 * (`POST /tasks/claim`): pick the best claimable task and send it `CLAIM` through its actor
 * in the same transaction, so a task is claimed once even with many claimers in many
 * processes. A task whose worktree is held, or whose type is at its cluster-wide cap,
 * is skipped and stays pending.
 */
import type { DecideEvent, PersistedSnapshot } from '../actors/decide.js';
import type { ActorHost, Applied, UnitOfWork } from '../actors/host.js';
import { type TaskView, taskView } from '../actors/views.js';
import { Unavailable } from '../errors.js';
import { ACTIVE_TASK_STATES, type TaskContext, type TaskState } from '../machines/task.js';
import {
  belowCap,
  type Candidate,
  lockCandidates,
  typesAtCap,
  worktreeFree,
} from '../persistence/claim-rows.js';
import { sqlState } from '../persistence/db.js';
import type { Freed, Wakeups } from './wakeups.js';

export interface ClaimRequest {
  workerId: string;
  /** Executors this claimer runs; agents over HTTP claim `external` tasks. */
  executors?: string[];
  types?: string[] | undefined;
  /** Long poll: wait up to this long for a task (capped by the service). */
  waitMs?: number;
  /** Ends a long poll early (shutdown, a closed HTTP request); no claim is tried after it. */
  signal?: AbortSignal;
  /**
   * Also START the task, with the claim's token, in the claim's own transaction: for a
   * claimer that begins work at once (the built-in workers), one commit instead of two. The
   * task comes back `running`; an agent over HTTP claims without it and STARTs when ready.
   */
  start?: boolean;
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
  /** Claims waiting at once in this process (CLAIM_MAX_WAITERS); beyond, `Unavailable`. */
  maxWaiters?: number;
}

/**
 * Tasks claimed beyond the claimers of a settle, all in one name and not STARTed: a worker
 * pool holds them `claimed` until a slot is free to begin one (`WorkerPool`, claim ahead).
 */
export interface ClaimAhead {
  workerId: string;
  count: number;
}

/** One claim of an attempt: in whose name, and whether START goes with it. */
interface Claimer {
  workerId: string;
  start: boolean;
}

/** The claimers' claims (START with each as the request says), then `ahead`'s, unstarted. */
function withAhead(
  req: Omit<ClaimRequest, 'workerId'>,
  claimers: readonly string[],
  ahead?: ClaimAhead,
): Claimer[] {
  const held = ahead ? Array.from({ length: ahead.count }, () => ahead.workerId) : [];
  return [
    ...claimers.map((workerId) => ({ workerId, start: req.start === true })),
    ...held.map((workerId) => ({ workerId, start: false })),
  ];
}

/** A dispatch wake-up from NATS: the task that became claimable, when known. */
export interface Dispatch {
  taskId: string;
  executor?: string;
  type?: string;
}

/**
 * Rows locked per attempt for one claimer (one more per further claimer of a batch). Small,
 * so that concurrent claimers each lock different rows (SKIP LOCKED) instead of one claimer
 * holding the whole head of the queue.
 */
const CANDIDATES_PER_TRY = 2;
const DEADLOCK_DETECTED = '40P01';
const DEFAULT_MAX_WAITERS = 1_024;
/** How long a local wake-up stands in for the dispatch message of the same task. */
const LOCAL_WAKE_TTL_MS = 10_000;
const LOCAL_WAKES_MAX = 10_000;

/** One per process: it subscribes to the host's commits for as long as it lives (see `close`). */
export class ClaimService {
  /** Tasks claimed. */
  claims = 0;
  /** Claim transactions run (won or not): what idle claimers cost the database. */
  attempts = 0;
  /** Claims in a long poll now, whether asleep or looking. */
  private waiting = 0;
  private readonly maxWaiters: number;
  /**
   * Tasks this process freed and already woke a local waiter for, with the count of wakes
   * whose dispatch message (published for other processes, received here too) is still due.
   */
  private readonly localWakes = new Map<string, { n: number; at: number }>();
  private readonly unsubscribe: () => void;

  constructor(
    private readonly host: ActorHost,
    readonly wakeups: Wakeups,
    private readonly options: ClaimOptions,
  ) {
    this.maxWaiters = options.maxWaiters ?? DEFAULT_MAX_WAITERS;
    // Waiting claimers in this process wake on every local commit that may free work;
    // commits in other processes reach them through `dispatched()` from NATS.
    this.unsubscribe = host.onCommit((applied) => {
      const freed = freedBy(applied, options.typeLimits);
      if (freed.length === 0) return;
      for (const a of applied) if (isNewlyPending(a)) this.rememberLocalWake(a.id);
      wakeups.notify(freed);
    });
  }

  /** Stops listening to the host's commits. */
  close(): void {
    this.unsubscribe();
  }

  /** Claims in a long poll now. */
  get waiters(): number {
    return this.waiting;
  }

  /**
   * A dispatch message: wakes one waiter for the task, unless this process committed the
   * change itself and woke one already (a second wake would only lose the race).
   */
  dispatched(msg: Dispatch): void {
    const local = msg.taskId ? this.localWakes.get(msg.taskId) : undefined;
    if (local && Date.now() - local.at < LOCAL_WAKE_TTL_MS) {
      if (--local.n === 0) this.localWakes.delete(msg.taskId);
      return;
    }
    this.wakeups.notify([{ executor: msg.executor, type: msg.type }]);
  }

  /**
   * Claims a task, waiting up to `waitMs` for one. Throws `Unavailable` when the wait would
   * exceed CLAIM_MAX_WAITERS (a claimer that finds a task at once never counts).
   */
  async claim(req: ClaimRequest): Promise<ClaimedTask | null> {
    const [claimed] = await this.poll(req, () => [req.workerId]);
    return claimed ?? null;
  }

  /**
   * Like `claim`, for several claimers of one process at once (a worker pool's idle slots):
   * each attempt claims up to one task per id `claimers()` returns at that moment, in ONE
   * transaction, the i-th task claimed in the name of the i-th claimer. Resolves with what
   * one attempt claimed (in that order), or nothing when the wait ran out.
   */
  async claimMany(
    req: Omit<ClaimRequest, 'workerId'>,
    claimers: () => string[],
  ): Promise<ClaimedTask[]> {
    return this.poll(req, claimers);
  }

  private async poll(
    req: Omit<ClaimRequest, 'workerId'>,
    claimers: () => string[],
  ): Promise<ClaimedTask[]> {
    const deadline = Date.now() + Math.min(req.waitMs ?? 0, this.options.maxWaitMs);
    const filter = { executors: req.executors ?? ['external'], types: req.types };
    let admitted = false;
    // A wake-up this claimer took and has not yet used for an attempt.
    let unused: Freed | null = null;
    const pollMs = this.options.pollMs ?? 1_000;
    // False when this claimer's fallback poll came due but another of its kind just polled.
    let look = true;
    try {
      for (;;) {
        if (req.signal?.aborted) return [];
        const generation = this.wakeups.generation;
        if (look) {
          const ids = claimers();
          const claimed =
            ids.length === 1
              ? [await this.claimOnce({ ...req, workerId: ids[0] as string })].filter(
                  (c): c is ClaimedTask => c !== null,
                )
              : await this.claimFor(req, ids);
          unused = null;
          if (claimed.length > 0) return claimed;
        }
        look = true;
        const left = deadline - Date.now();
        if (left <= 0) return [];
        // Something changed while we looked: look again before sleeping.
        if (this.wakeups.generation !== generation) continue;
        if (!admitted) {
          if (this.waiting >= this.maxWaiters) {
            throw new Unavailable(
              `${this.waiting} claims are already waiting in this process (CLAIM_MAX_WAITERS); retry`,
            );
          }
          this.waiting++;
          admitted = true;
        }
        const r = await this.wakeups.wait(Math.min(left, pollMs), req.signal, filter);
        if (typeof r === 'object') unused = r.woken;
        else if (r === 'timeout') look = this.wakeups.pollTurn(filter, pollMs);
      }
    } finally {
      if (admitted) this.waiting--;
      // Woken for a task but gone before looking (aborted, or the attempt threw): the task
      // is still there, so the wake-up goes to the next waiter rather than being lost.
      if (unused) this.wakeups.notify([unused]);
    }
  }

  /** One claim attempt for one claimer, no waiting (every single claim's attempt). */
  async claimOnce(req: ClaimRequest): Promise<ClaimedTask | null> {
    const [claimed] = await this.claimFor(req, [req.workerId]);
    return claimed ?? null;
  }

  /** One attempt for several claimers: at most one task each, in one transaction. */
  private async claimFor(
    req: Omit<ClaimRequest, 'workerId'>,
    claimers: string[],
  ): Promise<ClaimedTask[]> {
    const all = withAhead(req, claimers);
    try {
      const { value } = await this.host.transact((uow) => this.claimIn(uow, req, all));
      return this.claimed(value);
    } catch (error) {
      // Not expected (see claimIn), but a deadlock costs a retry, never a failed claim.
      if (sqlState(error) === DEADLOCK_DETECTED) return [];
      throw error;
    }
  }

  /**
   * `settles` (workers' COMPLETEs or FAILs, one per slot that finished a task), then a claim
   * attempt for `claimers`, in ONE transaction: slots that settle their tasks and take the
   * next pay one commit for all of it. The settles run side by side, their writes pipelined
   * on the transaction's connection (they concern distinct tasks; if two of them release the
   * same dependent, the second loses its compare-and-set and the whole unit runs again).
   * Whatever one throws (a refusal, a stale token) aborts the whole transaction, claims
   * included; the callers then settle alone. `ahead` claims that many more after the
   * claimers' (fewer if fewer are claimable), unSTARTed, in its own name.
   */
  async settleAndClaim(
    req: Omit<ClaimRequest, 'workerId'>,
    claimers: string[],
    settles: readonly ((uow: UnitOfWork) => Promise<unknown>)[],
    ahead?: ClaimAhead,
  ): Promise<ClaimedTask[]> {
    const settleAll = (uow: UnitOfWork) => settledAll(settles.map((settle) => settle(uow)));
    const all = withAhead(req, claimers, ahead);
    const { value } = await this.host.transact(async (uow) => {
      // Without type caps the candidates do not depend on the settles (they are pending, the
      // settled tasks are not): their lookup goes out beside the settles' writes, one round
      // trip for all. With caps, the count must see the settled tasks leave their types' slots.
      if (Object.keys(this.options.typeLimits).length > 0) {
        await settleAll(uow);
        return this.claimIn(uow, req, all);
      }
      const locked = this.lockFor(uow, req, all);
      // If a settle throws, the transaction rolls back with these locks; nobody awaits them.
      locked.catch(() => {});
      await settleAll(uow);
      return this.claimFrom(uow, all, await locked);
    });
    return this.claimed(value);
  }

  private claimed(value: { applied: Applied[]; next: Candidate | undefined }): ClaimedTask[] {
    this.claims += value.applied.length;
    // More work is queued behind these tasks: wake the next claimer now rather than on its
    // fallback poll (a single wake-up may stand for several freed tasks).
    if (value.next) {
      this.wakeups.notify([{ executor: value.next.executor, type: value.next.type }]);
    }
    return value.applied.map(toClaimed);
  }

  /**
   * Claims (and with `start`, STARTs) up to one task per claimer within `uow`: the best
   * candidates, locked with SKIP LOCKED, each sent CLAIM through its actor. At most one cap
   * lock per transaction: the only lock a claim waits for, so two claims never wait for
   * each other in a cycle.
   */
  private async claimIn(
    uow: UnitOfWork,
    req: Omit<ClaimRequest, 'workerId'>,
    claimers: Claimer[],
  ): Promise<{ applied: Applied[]; next: Candidate | undefined }> {
    return this.claimFrom(uow, claimers, await this.lockFor(uow, req, claimers));
  }

  /** The best candidates for `claimers`, locked with SKIP LOCKED (none for no executor). */
  private async lockFor(
    uow: UnitOfWork,
    req: Omit<ClaimRequest, 'workerId'>,
    claimers: Claimer[],
  ): Promise<Candidate[]> {
    const executors = req.executors ?? ['external'];
    if (executors.length === 0 || claimers.length === 0) return [];
    this.attempts++;
    const excludeTypes = await typesAtCap(uow.tx, this.options.typeLimits);
    return lockCandidates(
      uow.tx,
      { executors, types: req.types, excludeTypes },
      claimers.length + CANDIDATES_PER_TRY - 1,
    );
  }

  /**
   * Sends CLAIM (and START) to the locked `candidates`, at most one per claimer. A candidate
   * with neither a worktree nor a capped type needs no check, so its writes go out without
   * waiting for the earlier claims' answers (pipelined: one round trip for all of them); one
   * with a check waits for what came before it, since the check must see those claims.
   */
  private async claimFrom(
    uow: UnitOfWork,
    claimers: Claimer[],
    candidates: Candidate[],
  ): Promise<{ applied: Applied[]; next: Candidate | undefined }> {
    const limits = this.options.typeLimits;
    const claimEvents = ({
      workerId,
      start,
    }: Claimer): ((s: PersistedSnapshot) => DecideEvent)[] => {
      const claim = () => ({ type: 'CLAIM', workerId });
      // With `start`, CLAIM and START write the row and their events once, not twice.
      return start
        ? [
            claim,
            (s: PersistedSnapshot) => ({
              type: 'START',
              token: (s.context as { token: string }).token,
            }),
          ]
        : [claim];
    };
    if (candidates.every((c) => c.worktree === null && limits[c.type] === undefined)) {
      // Nothing to check: every claim goes out in one turn, the last write of this unit of
      // work (the callers send nothing after the claims), so the COMMIT can follow them.
      const chosen = candidates.slice(0, claimers.length);
      for (const c of chosen) uow.adopt(c.row);
      const applied = await uow.sendMany(
        'task',
        chosen.map((c, i) => ({ id: c.id, events: claimEvents(claimers[i] as Claimer) })),
        { last: true },
      );
      return { applied, next: candidates[chosen.length] };
    }
    const sent: Promise<Applied>[] = [];
    let capLocked: string | null = null;
    let next: Candidate | undefined;
    for (const [i, c] of candidates.entries()) {
      const claimer = claimers[sent.length];
      if (claimer === undefined) {
        next = c;
        break;
      }
      const cap = limits[c.type];
      if (c.worktree !== null || cap !== undefined) {
        // Both checks see this transaction's own claims: a second task of a worktree or of a
        // type at its cap is skipped like one held elsewhere.
        await settledAll(sent);
        if (c.worktree !== null && !(await worktreeFree(uow.tx, c.worktree))) continue;
        if (cap !== undefined) {
          if (capLocked !== null && capLocked !== c.type) continue;
          capLocked = c.type;
          if (!(await belowCap(uow.tx, c.type, cap))) continue;
        }
      }
      uow.adopt(c.row);
      sent.push(uow.sendEach('task', c.id, claimEvents(claimer)));
      if (sent.length === claimers.length) {
        next = candidates[i + 1];
        break;
      }
    }
    return { applied: await settledAll(sent), next };
  }

  private rememberLocalWake(taskId: string): void {
    const now = Date.now();
    const prior = this.localWakes.get(taskId);
    this.localWakes.delete(taskId);
    const n = prior && now - prior.at < LOCAL_WAKE_TTL_MS ? prior.n + 1 : 1;
    this.localWakes.set(taskId, { n, at: now });
    // Bounded: the oldest entries go first (a Map iterates in insertion order); a dispatch
    // that finds no entry only costs one extra wake-up.
    while (this.localWakes.size > LOCAL_WAKES_MAX) {
      const oldest = this.localWakes.keys().next().value;
      if (oldest === undefined) break;
      this.localWakes.delete(oldest);
    }
  }
}

/**
 * Every one of `sent` answered (none left running on the transaction), then their values;
 * the first failure if any failed.
 */
async function settledAll<T>(sent: Promise<T>[]): Promise<T[]> {
  const outcomes = await Promise.allSettled(sent);
  const failed = outcomes.find((o) => o.status === 'rejected');
  if (failed) throw failed.reason;
  return outcomes.map((o) => (o as PromiseFulfilledResult<T>).value);
}

function toClaimed(applied: Applied): ClaimedTask {
  const task = taskView(applied.snapshot, applied.version, applied.feedback ?? null);
  const token = (applied.snapshot.context as { token: string }).token;
  return { task, token };
}

const isActive = (state: string | null) => ACTIVE_TASK_STATES.includes(state as TaskState);

const isNewlyPending = (a: Applied) => a.entityType === 'task' && a.state === 'pending';

/**
 * What each applied change freed, one entry per task: a pending task by its executor and
 * type; a task leaving `claimed`/`running` frees its worktree or its capped type's slot for
 * some other task we cannot name (an entry without an executor). A task that held neither
 * frees nothing anyone waits for.
 */
export function freedBy(applied: Applied[], typeLimits: Record<string, number>): Freed[] {
  const out: Freed[] = [];
  for (const a of applied) {
    if (a.entityType !== 'task') continue;
    const ctx = a.snapshot.context as Partial<TaskContext>;
    if (a.state === 'pending') {
      out.push({ executor: ctx.executor, type: ctx.type });
    } else if (isActive(a.from) && !isActive(a.state)) {
      const capped = ctx.type !== undefined && typeLimits[ctx.type] !== undefined;
      if (ctx.worktree || capped) out.push({});
    }
  }
  return out;
}
