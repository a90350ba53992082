/**
 * The actor host: the only writer of actor state. `send` loads an actor's snapshot (from a
 * bounded cache or Postgres), decides the event, and commits in ONE transaction the new
 * snapshot (compare-and-set on `version`) with its deadline column (a task's lease), its
 * event-log rows with the next `seq` (the event log is the outbox: unpublished until the relay
 * records their stream sequence) and the timers the transition set or cleared. A lost
 * compare-and-set drops the cached actor and retries that unit of work with jittered backoff.
 *
 * Units of work that arrive while the host's transactions are in flight commit together
 * (group-commit.ts), each answered with its own result after the shared commit; a unit that
 * fails rolls its batch back, and the batch's other units run again. A later unit of a batch
 * sees the rows its earlier units wrote, so two units touching one actor follow each other
 * instead of conflicting.
 *
 * Within a process, sends to one entity queue in one mailbox (no self-inflicted conflicts);
 * across processes, correctness rests on the compare-and-set alone.
 */
import { createHash, randomUUID } from 'node:crypto';
import {
  Conflict,
  IllegalTransition,
  NotFound,
  StaleToken,
  UnknownWorkflow,
  VersionConflict,
} from '../errors.js';
import type { EntityType } from '../machines/index.js';
import { MACHINES, type MachineEntry, upgradeSnapshot } from '../machines/index.js';
import type { CompiledWorkflow } from '../machines/workflow.js';
import {
  type ActorRow,
  casLost,
  DEFAULT_WORKFLOW_REF,
  type Deadline,
  dependentsFound,
  insertActorRow,
  loadActorRow,
  type TaskFeedback,
  UniqueViolation,
  updateActorRow,
  updateTaskRows,
} from '../persistence/actor-rows.js';
import { type Sql, sqlState, type Tx } from '../persistence/db.js';
import { appendEvents, type EventEntry, type NewEvent } from '../persistence/event-log.js';
import {
  findStoredResponse,
  lockIdempotencyKey,
  storeResponse,
} from '../persistence/idempotency-rows.js';
import { clearLease, lockExpiredLease } from '../persistence/lease-rows.js';
import { consumeTimer, type TimerRow, upsertTimers } from '../persistence/timer-rows.js';
import {
  afterTransition,
  dependentsChecked,
  readAheadFor,
  releasesDependents,
  rulesFollow,
} from '../policies/index.js';
import { ActorCache } from './actor-cache.js';
import {
  type DecideEvent,
  type Decision,
  decide,
  decideInitial,
  type EntityInput,
  type PersistedSnapshot,
  type TimerSpec,
} from './decide.js';
import { GroupCommit } from './group-commit.js';

export interface TaskDefaults {
  maxAttempts: number;
  leaseMs: number;
  retryBaseMs: number;
}

export interface HostOptions {
  /** Actors kept in memory between events (least recently used dropped first). */
  cacheSize?: number;
  /** Bytes of snapshot JSON kept in memory (ACTOR_CACHE_MAX_BYTES); 0 disables the cache. */
  cacheMaxBytes?: number;
  /** Attempts of one unit of work before a VersionConflict is surfaced. */
  maxAttempts?: number;
  clock?: () => number;
  /** Settings for tasks the runtime creates itself (diagnostics). */
  taskDefaults: TaskDefaults;
  /** Executor of diagnostic tasks ("external": left to agents). */
  diagnosticExecutor?: string;
  /** Finds a ticket's workflow machine by its ref; without it only `default@1` runs. */
  workflows?: WorkflowSource;
  /** Units of work committed in one transaction at most (COMMIT_BATCH_MAX); 1 turns group commit off. */
  commitBatchMax?: number;
  /** Write transactions in flight at once (COMMIT_LANES); units queue while all are busy. */
  commitLanes?: number;
}

/** Where the host finds compiled workflows (the registry). */
export interface WorkflowSource {
  /** The compiled workflow of `NAME@VERSION`; UnknownWorkflow when none is registered. */
  resolve(ref: string): Promise<CompiledWorkflow>;
}

/** What one applied event or creation produced, after commit. */
export interface Applied {
  entityType: EntityType;
  id: string;
  /** The event applied (`create` for a creation). */
  event: string;
  /** State before the event; null for a creation. */
  from: string | null;
  state: string;
  snapshot: PersistedSnapshot;
  version: number;
  events: EventEntry[];
  /** The machine the actor runs (a ticket's workflow's), for the events its state allows. */
  machine: MachineEntry;
  /** Tickets: the workflow they run, `NAME@VERSION`. */
  workflow?: string;
  /** Tasks: the feedback they were created with (null: none). */
  feedback?: TaskFeedback | null;
  /** The soonest timer or deadline this change set (epoch ms), for pollers to wake for. */
  dueAt?: number;
}

export interface CommandResult<T> {
  value: T;
  applied: Applied[];
}

type CommitListener = (applied: Applied[]) => void;

export interface IdempotencyOptions {
  /**
   * Whose key it is: keys of different scopes never meet, so one credential cannot replay
   * another's response (a claim's fencing token, say). Built by the HTTP edge.
   */
  scope: string;
  key: string;
  /** Anything that identifies the request (method, path, body); hashed and compared. */
  request: string;
}

export interface StoredResponse {
  status: number;
  body: unknown;
}

const DEFAULT_CACHE_MAX_BYTES = 64 * 1024 * 1024;
export const DEFAULT_COMMIT_BATCH_MAX = 32;
/**
 * Four, not more: each lane is a transaction and a Postgres backend contending for the same
 * cores, and fewer lanes make fuller batches; the worker pool batches its own settles, so its
 * claims no longer need a lane each (BENCHMARKS section 24).
 */
export const DEFAULT_COMMIT_LANES = 4;
/**
 * SQLSTATEs of a lost lock race: a deadlock victim, or a unit of a shared batch that waited too
 * long for a lock (group-commit.ts). Either was rolled back whole, so it may run again.
 */
const LOCK_RACES = new Set(['40P01', '55P03']);
/** Bound of `ActorHost.withDependents`. */
const KNOWN_DEPENDENTS_MAX = 50_000;

/**
 * A settling write checked for dependents in its statement and found some: its transaction
 * failed, and its unit of work runs again the long way (never seen outside `transact`).
 */
class DependentsToRelease extends Error {
  constructor(readonly taskIds: readonly string[]) {
    super(`tasks ${taskIds.join(', ')} have dependents to release`);
    this.name = 'DependentsToRelease';
  }
}

/** Rows the earlier units of one batch wrote or locked, by `type:id`. */
type BatchRows = Map<string, ActorRow>;

export class ActorHost {
  readonly sql: Sql;
  readonly clock: () => number;
  readonly taskDefaults: TaskDefaults;
  private readonly cache: ActorCache;
  private readonly maxAttempts: number;
  /** Executor of the diagnostic tasks the stuck check spawns. */
  readonly diagnosticExecutor: string;
  private readonly mailboxes = new Map<string, Promise<unknown>>();
  /**
   * Tasks found to have dependents (a dependency's insert marked them): their settling
   * writes read and release the dependents rather than checking for them. Forgotten past
   * a bound; a forgotten one costs its next settle one attempt more.
   */
  private readonly withDependents = new Set<string>();
  private readonly workflows: WorkflowSource | undefined;
  private readonly entries = new WeakMap<CompiledWorkflow, MachineEntry>();
  private readonly listeners = new Set<CommitListener>();
  /** Batches units of work into shared transactions. */
  readonly commits: GroupCommit<BatchRows>;
  /** Counters for /metrics: transitions and refusals by entity type and event. */
  readonly stats = {
    transitions: new Map<string, number>(),
    illegal: new Map<string, number>(),
    conflicts: 0,
  };

  constructor(sql: Sql, options: HostOptions) {
    this.sql = sql;
    this.clock = options.clock ?? Date.now;
    this.cache = new ActorCache({
      maxEntries: options.cacheSize ?? 10_000,
      maxBytes: options.cacheMaxBytes ?? DEFAULT_CACHE_MAX_BYTES,
    });
    this.maxAttempts = options.maxAttempts ?? 40;
    this.taskDefaults = options.taskDefaults;
    this.diagnosticExecutor = options.diagnosticExecutor ?? 'external';
    this.workflows = options.workflows;
    this.commits = new GroupCommit(
      sql,
      {
        maxUnits: options.commitBatchMax ?? DEFAULT_COMMIT_BATCH_MAX,
        lanes: options.commitLanes ?? DEFAULT_COMMIT_LANES,
      },
      () => new Map(),
    );
  }

  /** The compiled workflow a ref names (`NAME` = its latest version). */
  resolveWorkflow(ref: string): Promise<CompiledWorkflow> {
    if (!this.workflows) return Promise.reject(new UnknownWorkflow(ref));
    return this.workflows.resolve(ref);
  }

  /**
   * The machine a row runs: a task's, or its ticket's workflow's. A ref no registry knows
   * is UnknownWorkflow: the ticket is refused, never run on another machine.
   */
  async machineOf(entityType: EntityType, workflow: string | undefined): Promise<MachineEntry> {
    if (entityType !== 'ticket' || workflow === undefined || workflow === DEFAULT_WORKFLOW_REF) {
      return MACHINES[entityType];
    }
    if (!this.workflows) throw new UnknownWorkflow(workflow);
    const compiled = await this.workflows.resolve(workflow);
    let entry = this.entries.get(compiled);
    if (!entry) {
      entry = { ...MACHINES.ticket, machine: compiled.machine };
      this.entries.set(compiled, entry);
    }
    return entry;
  }

  /** Called after every commit with what it applied (in-process fan-out, metrics). */
  onCommit(listener: CommitListener): () => void {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  get cachedActors(): number {
    return this.cache.size;
  }

  /** Bytes of snapshot JSON the cache holds (at most `cacheMaxBytes`). */
  get cachedBytes(): number {
    return this.cache.bytes;
  }

  /** Applies one event to one actor, in its mailbox. */
  async send(entityType: EntityType, id: string, event: DecideEvent): Promise<Applied> {
    const key = `${entityType}:${id}`;
    return this.inMailbox(key, async () => {
      // The send is the whole unit: its write may be the transaction's last statement.
      const { value } = await this.transact(
        (uow) => uow.send(entityType, id, event, { last: true }),
        { keys: [key] },
      );
      return value;
    });
  }

  /** @internal Whether the task may have dependents (see `withDependents`). */
  mayHaveDependents(taskId: string): boolean {
    return this.withDependents.has(taskId);
  }

  private noteDependents(taskId: string): void {
    if (this.withDependents.size >= KNOWN_DEPENDENTS_MAX) this.withDependents.clear();
    this.withDependents.add(taskId);
  }

  /** Creates an actor from its machine's input. */
  async create<T extends EntityType>(entityType: T, input: EntityInput<T>): Promise<Applied> {
    const { value } = await this.transact((uow) => uow.create(entityType, input));
    return value;
  }

  /**
   * Runs `work` as one unit of work and commits everything it sent or created together, in a
   * transaction it may share with other units (group commit). `work` may run more than once
   * (a lost compare-and-set retries it; another unit's failure rolls back the transaction
   * they shared), so it must do all its writes through the unit of work or `uow.tx`.
   * `keys`: the one actor `work` is confined to and what else it holds, if so (see
   * `GroupUnit.keys`): it may then run side by side with the other units of its batch.
   */
  async transact<T>(
    work: (uow: UnitOfWork) => Promise<T>,
    options: { keys?: readonly string[] } = {},
  ): Promise<CommandResult<T>> {
    for (let attempt = 1; ; attempt++) {
      let uow = new UnitOfWork(this);
      try {
        const value = await this.commits.submit<T>({
          ...(options.keys !== undefined ? { keys: options.keys } : {}),
          // Each run starts from nothing: a rolled-back run's rows are not the truth.
          run: (tx, batch, final) => {
            uow = new UnitOfWork(this);
            return uow.run(tx, work, batch, final);
          },
          kept: (_, batch) => uow.share(batch),
          committed: () => this.committed(uow),
        });
        return { value, applied: uow.applied() };
      } catch (error) {
        for (const key of uow.loadedKeys()) this.cache.delete(key);
        // A settling task turned out to have dependents: the unit runs again the long way,
        // reading and releasing them.
        if (error instanceof DependentsToRelease && attempt < this.maxAttempts) {
          for (const id of error.taskIds) this.noteDependents(id);
          continue;
        }
        if (error instanceof IllegalTransition) {
          const key = `${error.entityType ?? 'unknown'}:${error.state}:${error.event}`;
          this.stats.illegal.set(key, (this.stats.illegal.get(key) ?? 0) + 1);
        }
        // A refusal decided on a cached row may come from a stale cache: decide again from
        // Postgres before answering.
        const staleCache =
          uow.usedCache && (error instanceof IllegalTransition || error instanceof StaleToken);
        if (staleCache && attempt < this.maxAttempts) continue;
        // A shared transaction holds several units' locks, so a lock race is lost more often:
        // the unit was rolled back with its transaction, not a fault.
        const lostRace = error instanceof VersionConflict || LOCK_RACES.has(sqlState(error) ?? '');
        if (!lostRace || attempt >= this.maxAttempts) throw error;
        this.stats.conflicts++;
        await sleep(Math.random() * Math.min(50, 2 * attempt));
      }
    }
  }

  /**
   * Runs a command at most once per idempotency key: the stored response commits in the same
   * transaction as the effect; a repeat with the same request returns it; a repeat with a
   * different request is a Conflict. Concurrent repeats wait for the first to commit.
   */
  async idempotent(
    idem: IdempotencyOptions | undefined,
    work: (uow: UnitOfWork) => Promise<StoredResponse>,
    /** The actor the command writes, if one: it then queues in that actor's mailbox, so
     * concurrent commands to one entity in this process wait in turn instead of losing
     * compare-and-sets to each other. */
    mailbox?: { entityType: EntityType; id: string },
  ): Promise<StoredResponse> {
    if (mailbox) {
      const actor = `${mailbox.entityType}:${mailbox.id}`;
      return this.inMailbox(actor, () => this.idempotentIn(idem, work, [actor]));
    }
    return this.idempotentIn(idem, work, []);
  }

  /**
   * The command of `idempotent`, in its actor's mailbox if it has one (`actors`). Confined to
   * an actor, it may run side by side with others; it then also holds its idempotency key,
   * whose advisory lock does not hold off another unit of the same transaction.
   */
  private async idempotentIn(
    idem: IdempotencyOptions | undefined,
    work: (uow: UnitOfWork) => Promise<StoredResponse>,
    actors: string[],
  ): Promise<StoredResponse> {
    const confined = actors.length > 0;
    if (!idem) return (await this.transact(work, confined ? { keys: actors } : {})).value;
    const scoped = `${idem.scope}\n${idem.key}`;
    const keys = confined ? { keys: [...actors, `idempotency:${scoped}`] } : {};
    const hash = createHash('sha256').update(idem.request).digest('hex');
    const { value } = await this.transact(async (uow) => {
      await lockIdempotencyKey(uow.tx, idem.scope, idem.key);
      const prior = await findStoredResponse(uow.tx, idem.scope, idem.key);
      if (prior) {
        if (prior.request_hash !== hash) {
          throw new Conflict(`Idempotency-Key ${idem.key} was used with a different request`);
        }
        return { status: prior.status, body: prior.body, replayed: true };
      }
      const response = await work(uow);
      await storeResponse(uow.tx, {
        scope: idem.scope,
        key: idem.key,
        requestHash: hash,
        status: response.status,
        body: response.body,
      });
      return { ...response, replayed: false };
    }, keys);
    return { status: value.status, body: value.body };
  }

  /**
   * Fires a durable timer: consumes its row (only if still the claimed one) and sends its
   * event, in one transaction. A timer whose state was left meanwhile does nothing.
   */
  async fireTimer(timer: TimerRow): Promise<Applied | null> {
    return this.fireDelayed(timer.entityType, timer.entityId, timer.event, {
      // The row is consumed either way: a delayed event its state no longer takes is moot.
      claim: (tx) => consumeTimer(tx, timer.entityId, timer.key, timer.token),
      refused: async () => {},
    });
  }

  /**
   * Fires a task's passed lease (its machine's deadline column): sends the deadline's event if
   * the row still holds a passed deadline, under its lock, so a heartbeat that extended the
   * lease meanwhile wins and another poller that got there first leaves nothing to fire.
   */
  async expireLease(id: string): Promise<Applied | null> {
    const deadline = MACHINES.task.deadline;
    if (!deadline) return null;
    return this.fireDelayed(
      'task',
      id,
      { type: deadline.event },
      {
        claim: (tx) => lockExpiredLease(tx, id),
        // A deadline its state does not take is moot; cleared, or every poll finds it.
        refused: (tx) => clearLease(tx, id),
      },
    );
  }

  /**
   * A delayed event, in one transaction: `claim` takes what is due (false: nothing to fire
   * any more), then the event is sent. A refusal decided on a cached row may come from a stale
   * cache (another process moved the actor on): transact() decides it again from Postgres, or
   * the delay would be spent unfired (a task left in retry_wait or past its lease for good).
   * A refusal from Postgres is final: `refused` tidies up and nothing is sent.
   */
  private fireDelayed(
    entityType: EntityType,
    id: string,
    event: DecideEvent,
    o: { claim: (tx: Tx) => Promise<boolean>; refused: (tx: Tx) => Promise<void> },
  ): Promise<Applied | null> {
    const key = `${entityType}:${id}`;
    return this.inMailbox(key, async () => {
      const { value } = await this.transact(
        async (uow) => {
          if (!(await o.claim(uow.tx))) return null;
          try {
            return await uow.send(entityType, id, event);
          } catch (error) {
            if (error instanceof IllegalTransition && uow.usedCache) throw error;
            if (error instanceof IllegalTransition) {
              await o.refused(uow.tx);
              return null;
            }
            if (error instanceof NotFound) return null;
            throw error;
          }
        },
        { keys: [key] },
      );
      return value;
    });
  }

  /** After the commit of `uow`'s batch: cache, counters and listeners see what it applied. */
  private committed(uow: UnitOfWork): void {
    for (const { row, bytes } of uow.touched()) this.cache.set(row, bytes);
    const applied = uow.applied();
    for (const a of applied) {
      const key = `${a.entityType}:${a.event}:${a.from ?? 'new'}->${a.state}`;
      this.stats.transitions.set(key, (this.stats.transitions.get(key) ?? 0) + 1);
    }
    for (const listener of this.listeners) listener(applied);
  }

  /** Drops cached actors (tests, and callers that know the cache is stale). */
  forget(entityType?: EntityType, id?: string): void {
    if (entityType && id) this.cache.delete(`${entityType}:${id}`);
    else this.cache.clear();
  }

  /** @internal */
  cached(key: string): ActorRow | undefined {
    return this.cache.get(key);
  }

  private async inMailbox<T>(key: string, run: () => Promise<T>): Promise<T> {
    const previous = this.mailboxes.get(key) ?? Promise.resolve();
    const next = previous.then(run, run);
    const settled = next.then(
      () => {},
      () => {},
    );
    this.mailboxes.set(key, settled);
    void settled.then(() => {
      if (this.mailboxes.get(key) === settled) this.mailboxes.delete(key);
    });
    return next;
  }
}

/** The writes of one transaction: every actor it touches, in the order it touched them. */
export class UnitOfWork {
  tx!: Tx;
  private readonly rows = new Map<string, ActorRow>();
  private readonly dirty = new Set<string>();
  /** Byte length of each written row's snapshot JSON, for the cache's byte bound. */
  private readonly sizes = new Map<string, number>();
  private readonly results: Applied[] = [];
  /** Keys of rows read from Postgres in this transaction (current, and locked). */
  private readonly fresh = new Set<string>();
  /** Rows the earlier units of the same batch wrote or locked (none when alone). */
  private batch: BatchRows | undefined;
  /** @internal true once a row came from the process cache rather than this transaction */
  usedCache = false;

  constructor(
    /** The host this unit of work writes through (its cache, its task settings). */
    readonly host: ActorHost,
  ) {}

  /**
   * The time stamped on every event of this unit of work: when it started to run in its
   * transaction, not when it was submitted. A unit that waited for a lane would otherwise
   * stamp its events earlier than those of a transaction that committed before it ran (a
   * claim stamped before the completion that made its task claimable).
   */
  at = 0;

  /** Tells the transaction that this unit will send nothing more (see `GroupUnit.run`). */
  private final: () => void = () => {};

  /** @internal */
  async run<T>(
    tx: Tx,
    work: (uow: UnitOfWork) => Promise<T>,
    batch?: BatchRows,
    final?: () => void,
  ): Promise<T> {
    this.tx = tx;
    this.batch = batch;
    if (final) this.final = final;
    this.at = this.host.clock();
    return work(this);
  }

  /** @internal it ran in a shared batch: the rows it wrote or locked are the batch's current ones */
  share(batch: BatchRows): void {
    for (const key of new Set([...this.dirty, ...this.fresh])) {
      const row = this.rows.get(key);
      if (row) batch.set(key, row);
    }
  }

  /** The actor's current row within this transaction (NotFound if there is none). */
  async load(entityType: EntityType, id: string): Promise<ActorRow> {
    const key = `${entityType}:${id}`;
    let row = this.rows.get(key);
    if (!row) {
      // An earlier unit of this transaction wrote or locked it: that row is the truth here
      // (the process cache would still hold the version before it).
      row = this.batch?.get(key);
      if (row) this.fresh.add(key);
    }
    if (!row) {
      row = this.host.cached(key);
      if (row) this.usedCache = true;
    }
    if (!row) {
      // Locking on a cache miss costs nothing extra (the update would take the lock anyway)
      // and turns concurrent writers into a queue instead of a retry storm.
      row = (await loadActorRow(this.tx, entityType, id, { forUpdate: true })) ?? undefined;
      if (row) this.fresh.add(key);
    }
    if (!row) throw new NotFound(entityType, id);
    return this.keep(key, row);
  }

  /**
   * A row this transaction just read under its lock (a claim's candidate): the current one,
   * so the next `send` to it decides on it without reading it again.
   */
  adopt(row: ActorRow): void {
    const key = `${row.entityType}:${row.id}`;
    if (this.rows.has(key)) return;
    this.fresh.add(key);
    this.keep(key, row);
  }

  private keep(key: string, stored: ActorRow): ActorRow {
    let row = stored;
    // A snapshot an older machine version stored is upgraded here, once, and written back
    // with the current version by the next update.
    const current = MACHINES[row.entityType].version;
    if (row.machineVersion !== current) {
      const upgraded = upgradeSnapshot(row.entityType, row.machineVersion, row.snapshot);
      if (upgraded) row = { ...row, snapshot: upgraded, machineVersion: current };
    }
    this.rows.set(key, row);
    return row;
  }

  /** `last`: the work sends nothing after this (see `sendAccepted`). */
  async send(
    entityType: EntityType,
    id: string,
    event: DecideEvent,
    options: { last?: boolean } = {},
  ): Promise<Applied> {
    return this.sendEach(entityType, id, [() => event], options);
  }

  /**
   * Applies several events to one actor in turn, each built from the snapshot the one before
   * left (a claim's START takes the CLAIM's token), and writes the row ONCE: one
   * compare-and-set and one event insert for all of them. Each event is decided, answered
   * and counted as if sent alone; the same-transaction policies run after the row is written,
   * for each event in order. Any refusal refuses them all.
   */
  async sendEach(
    entityType: EntityType,
    id: string,
    events: ((snapshot: PersistedSnapshot) => DecideEvent)[],
    options: { last?: boolean } = {},
  ): Promise<Applied> {
    const row = await this.load(entityType, id);
    const entry = await this.host.machineOf(entityType, row.workflow);
    const { steps } = this.decideSteps(row, entry, events, false);
    const applied = await this.write(row, steps, entry, options.last === true);
    // What the caller sees is the actor after everything this event set off in the same
    // transaction (the TASK_ADDED of the templates of a phase it entered), not halfway.
    return this.latest(entityType, id) ?? (applied[applied.length - 1] as Applied);
  }

  /**
   * `sendEach` to several actors of one type at once: every event is decided first (any
   * refusal refuses them all, before anything is written), then each actor's row is written
   * once, all the writes handed to the connection in one turn, in order. `last`: the work
   * sends nothing after these, so the transaction may commit right behind them when none of
   * them can be followed by anything (no same-transaction rule, a row this transaction
   * locked: see `write`).
   */
  async sendMany(
    entityType: EntityType,
    items: readonly {
      id: string;
      events: readonly ((snapshot: PersistedSnapshot) => DecideEvent)[];
    }[],
    options: { last?: boolean } = {},
  ): Promise<Applied[]> {
    const rows = await Promise.all(items.map((item) => this.load(entityType, item.id)));
    const entries = await Promise.all(
      rows.map((row) => this.host.machineOf(entityType, row.workflow)),
    );
    const decided = rows.map(
      (row, i) =>
        this.decideSteps(row, entries[i] as MachineEntry, items[i]?.events ?? [], false).steps,
    );
    // The last write may end the unit only if no earlier one can be followed by anything:
    // their answers are still on the way when the COMMIT goes out.
    let ends = options.last === true;
    for (let i = 0; i < rows.length - 1 && ends; i++) {
      const row = rows[i] as ActorRow;
      const emitted = emittedTypes(decided[i] as Step[]);
      const follows = rulesFollow(entityType, emitted) && !this.checksDependents(row, emitted);
      ends = !follows && this.fresh.has(`${entityType}:${row.id}`);
    }
    const plans = rows.map((row, i) => this.plan(row, decided[i] as Step[]));
    const written =
      this.writeTasks(
        rows,
        decided as Step[][],
        plans,
        entries as MachineEntry[],
        options.last === true,
      ) ??
      rows.map((row, i) =>
        this.write(
          row,
          decided[i] as Step[],
          entries[i] as MachineEntry,
          ends && i === rows.length - 1,
          plans[i],
        ),
      );
    // Every write answered before this answers: none is left running on the transaction.
    const outcomes = await Promise.allSettled(written);
    const failed = outcomes.find((o) => o.status === 'rejected');
    if (failed) throw failed.reason;
    return items.map((item) => this.latest(entityType, item.id) as Applied);
  }

  /**
   * News for one actor, as a rule sends it (see policies/send.ts): each event its state
   * refuses is left out, the others are applied in turn and the row is written once for
   * them. It stops after the first event that changes the actor's state, so that what the
   * rules do on that change happens before the next event, as if each were sent alone.
   * Returns what was applied and how many of `events` it took (refused ones included).
   */
  async sendAccepted(
    entityType: EntityType,
    id: string,
    events: readonly DecideEvent[],
    /**
     * `last`: if this takes all of `events`, the work sends nothing after it and does nothing
     * with the answer that can fail, so the transaction may commit behind its write.
     */
    options: { last?: boolean } = {},
  ): Promise<{ applied: Applied[]; taken: number }> {
    const row = await this.load(entityType, id);
    const entry = await this.host.machineOf(entityType, row.workflow);
    const asNews = events.map((event) => () => event);
    const { steps, taken } = this.decideSteps(row, entry, asNews, true);
    if (steps.length === 0) return { applied: [], taken };
    const final = options.last === true && taken === events.length;
    const applied = await this.write(row, steps, entry, final);
    // As in sendEach: the last answer is the actor after what its event set off.
    const last = this.latest(entityType, id);
    if (last) applied[applied.length - 1] = last;
    return { applied, taken };
  }

  /**
   * Decides `events` in turn on `row`, each built from the snapshot the one before left. As
   * news (`sendAccepted`), a refused event is left out and the run ends after the first event
   * that changes the state; otherwise any refusal throws. `taken`: events looked at.
   */
  private decideSteps(
    row: ActorRow,
    entry: MachineEntry,
    events: readonly ((snapshot: PersistedSnapshot) => DecideEvent)[],
    asNews: boolean,
  ): { steps: Step[]; taken: number } {
    const steps: Step[] = [];
    let snapshot = row.snapshot;
    let taken = 0;
    for (const make of events) {
      taken++;
      const from = String(snapshot.value);
      const event = make(snapshot);
      let decision: Decision;
      try {
        decision = decide(
          row.entityType,
          row.id,
          snapshot,
          stamp(event, this.at),
          row.machineVersion,
          entry,
        );
      } catch (error) {
        if (asNews && error instanceof IllegalTransition) continue;
        throw error;
      }
      steps.push({ decision, from, event: event.type });
      snapshot = decision.snapshot;
      if (asNews && decision.state !== from) break;
    }
    return { steps, taken };
  }

  /**
   * Writes `row` after `steps` (one compare-and-set) and records them. `final`: the caller
   * sends nothing after this write (see `sendAccepted`).
   */
  private async write(
    row: ActorRow,
    steps: Step[],
    entry: MachineEntry,
    final = false,
    planned: Planned = this.plan(row, steps),
  ): Promise<Applied[]> {
    const { next, effects, timers, events } = planned;
    // Final when nothing can follow the answer: no same-transaction rule will send anything,
    // and the compare-and-set either cannot be lost (the row is locked by this transaction)
    // or fails its statement in Postgres if it is, so that the COMMIT behind it rolls back.
    // That check costs a bare update (no event, no timer: a HEARTBEAT) its plain form, more
    // than the round trip saves under load (HTTP bench: 2,249 / 2,267 against 2,548 / 2,644
    // requests/s), so such a write on a row this transaction did not lock is not final.
    const bare = events.length === 0 && timers.length === 0 && effects.cancel.length === 0;
    const locked = this.fresh.has(`${row.entityType}:${row.id}`);
    const emitted = emittedTypes(steps);
    // A settling task not known to have dependents checks for them in its own statement
    // instead of reading them after it: its rules then send nothing more.
    const checkDeps = this.checksDependents(row, emitted);
    const follows = rulesFollow(row.entityType, emitted) && !checkDeps;
    const ends = final && !follows && (locked || !bare);
    const written = updateActorRow(this.tx, next, row.version, {
      deadline: deadlineAt(effects, this.at),
      events,
      cancelTimers: effects.cancel,
      timers,
      ...(ends && !locked ? { failIfLost: true } : {}),
      ...(checkDeps ? { failIfDependents: true } : {}),
    }).then(
      (w) => {
        if (w === null) throw new VersionConflict(row.id, row.version);
        return w;
      },
      (error) => {
        if (casLost(error)) throw new VersionConflict(row.id, row.version);
        if (dependentsFound(error)) throw new DependentsToRelease([row.id]);
        throw translateUnique(error, row.id);
      },
    );
    if (checkDeps) dependentsChecked(this, row.id);
    if (ends) this.final();
    return this.record(row, next, written, steps, effects, timers, entry, {
      readAhead: !checkDeps,
    });
  }

  /** Whether a task's write that emits `emitted` checks for dependents itself (see `write`). */
  private checksDependents(row: ActorRow, emitted: readonly string[]): boolean {
    return (
      row.entityType === 'task' &&
      releasesDependents(emitted) &&
      !this.host.mayHaveDependents(row.id)
    );
  }

  /**
   * `sendMany`'s writes of several tasks as ONE statement (`updateTaskRows`), when each has
   * events and neither timers nor a worktree (a worktree's unique index names one task when
   * it refuses; timers are written per row): one statement to parse, plan and answer instead
   * of one per task. Null when they do not qualify (each is then written on its own).
   * `final` as for `write`, for all of them at once: no rule follows any of them, and each
   * compare-and-set either holds a row this transaction locked or fails the statement.
   */
  private writeTasks(
    rows: ActorRow[],
    decided: Step[][],
    plans: Planned[],
    entries: MachineEntry[],
    final: boolean,
  ): Promise<Applied[]>[] | null {
    if (rows.length < 2 || rows.some((r) => r.entityType !== 'task')) return null;
    if (new Set(rows.map((r) => r.id)).size !== rows.length) return null;
    const qualifies = plans.every(
      (p) =>
        p.events.length > 0 &&
        p.timers.length === 0 &&
        p.effects.cancel.length === 0 &&
        (p.next.snapshot.context as { worktree?: string | null }).worktree == null,
    );
    if (!qualifies) return null;
    const locked = rows.every((r) => this.fresh.has(`task:${r.id}`));
    const emitted = decided.map((steps) => emittedTypes(steps));
    const checkDeps = rows.map((r, i) => this.checksDependents(r, emitted[i] as string[]));
    const ends =
      final && rows.every((_, i) => checkDeps[i] || !rulesFollow('task', emitted[i] as string[]));
    const all = updateTaskRows(
      this.tx,
      plans.map((p, i) => ({
        row: p.next,
        expectedVersion: (rows[i] as ActorRow).version,
        deadline: deadlineAt(p.effects, this.at),
        events: p.events,
        ...(checkDeps[i] ? { failIfDependents: true } : {}),
      })),
      ends && !locked ? { failIfLost: true } : {},
    );
    all.catch(() => {});
    if (ends) this.final();
    // Every read the rules will make goes out behind the statement now; the rules themselves
    // run one task after another, each seeing what the one before did in this transaction:
    // all the reads ran after every write, so two prerequisites of one dependent both find
    // it ready, and only the first releases it (the second's DEPS_MET is then refused).
    for (const [i, p] of plans.entries()) {
      if (checkDeps[i]) dependentsChecked(this, p.next.id);
      else readAheadFor(this, 'task', p.next.id, emitted[i] as string[]);
    }
    const checked = rows.filter((_, i) => checkDeps[i]).map((r) => r.id);
    let before: Promise<unknown> = Promise.resolve();
    return plans.map((p, i) => {
      const row = rows[i] as ActorRow;
      const written = all.then(
        (w) => {
          const mine = w[i];
          if (!mine) throw new VersionConflict(row.id, row.version);
          return mine;
        },
        (error) => {
          if (casLost(error)) throw new VersionConflict(row.id, row.version);
          if (dependentsFound(error)) throw new DependentsToRelease(checked);
          throw translateUnique(error, row.id);
        },
      );
      const steps = decided[i] as Step[];
      const recorded = before.then(() =>
        this.record(row, p.next, written, steps, p.effects, p.timers, entries[i] as MachineEntry, {
          readAhead: false,
        }),
      );
      // The next one's rules wait for these, whether they ran or failed.
      before = recorded.then(
        () => {},
        () => {},
      );
      return recorded;
    });
  }

  /** What writing `row` after `steps` writes: the row, its timers and events. */
  private plan(row: ActorRow, steps: Step[]): Planned {
    const last = steps[steps.length - 1] as Step;
    const emitted = steps.reduce((n, step) => n + step.decision.emitted.length, 0);
    const next: ActorRow = {
      ...row,
      snapshot: last.decision.snapshot,
      version: row.version + steps.length,
      seq: row.seq + emitted,
    };
    const effects = combine(steps.map((step) => step.decision));
    return {
      next,
      effects,
      timers: this.timerRows(next, effects),
      events: this.newEvents(row, next, steps),
    };
  }

  /** The rows of the timers `effects` schedules for `row`'s entity, due from now. */
  private timerRows(row: ActorRow, effects: Effects): TimerRow[] {
    return effects.schedule.map((t) => ({
      entityType: row.entityType,
      entityId: row.id,
      key: t.key,
      event: t.event,
      dueAt: this.at + t.delayMs,
      token: randomUUID(),
    }));
  }

  /** The events `steps` emitted, as the event log stores them after `before`'s last seq. */
  private newEvents(before: ActorRow, after: ActorRow, steps: Step[]): NewEvent[] {
    const out: NewEvent[] = [];
    for (const step of steps) {
      for (const e of step.decision.emitted) {
        out.push({
          eventId: randomUUID(),
          seq: before.seq + out.length + 1,
          entityId: after.id,
          entityType: after.entityType,
          type: e.type,
          data: e.data,
          at: this.at,
        });
      }
    }
    return out;
  }

  async create<T extends EntityType>(
    entityType: T,
    input: EntityInput<T>,
    options: {
      /** Tickets: the workflow ref to run (default `default@1`). */
      workflow?: string;
      /** Tasks: why a re-entry into the phase created it. */
      feedback?: TaskFeedback | null;
    } = {},
  ): Promise<Applied> {
    const { workflow, feedback } = options;
    const stampedInput = { ...input, at: this.at } as EntityInput<T>;
    const entry = await this.host.machineOf(entityType, workflow);
    const decision = decideInitial(entityType, stampedInput, entry);
    const row: ActorRow = {
      ...(entityType === 'ticket' ? { workflow: workflow ?? DEFAULT_WORKFLOW_REF } : {}),
      ...(entityType === 'task' ? { feedback: feedback ?? null } : {}),
      entityType,
      id: input.id,
      machineVersion: MACHINES[entityType].version,
      snapshot: decision.snapshot,
      version: 1,
      seq: decision.emitted.length,
    };
    const written = insertActorRow(
      this.tx,
      row,
      this.at,
      deadlineAt(decision, this.at) ?? null,
    ).catch((error) => {
      if (error instanceof UniqueViolation && error.constraint.endsWith('_pkey')) {
        throw new Conflict(`${entityType} ${input.id} already exists`);
      }
      throw translateUnique(error, input.id);
    });
    const base: ActorRow = { ...row, version: 0, seq: 0 };
    const steps = [{ decision, from: null, event: 'create' }];
    // The row and its events go out together: postgres.js pipelines them on the
    // transaction's connection. If the insert lost, its own error is the answer.
    const effects = combine([decision]);
    const timers = this.timerRows(row, effects);
    const events = appendEvents(this.tx, this.newEvents(base, row, steps));
    const scheduled = upsertTimers(this.tx, timers);
    const both = firstFailure(written, events, scheduled).then(([bytes, entries]) => ({
      bytes,
      entries,
    }));
    const [applied] = await this.record(base, row, both, steps, effects, timers, entry);
    return applied as Applied;
  }

  /** The last change to one actor in this unit of work. */
  private latest(entityType: EntityType, id: string): Applied | undefined {
    for (let i = this.results.length - 1; i >= 0; i--) {
      const r = this.results[i];
      if (r && r.entityType === entityType && r.id === id) return r;
    }
    return undefined;
  }

  /** @internal rows written by this unit of work with their sizes, for the cache */
  touched(): { row: ActorRow; bytes: number }[] {
    const out: { row: ActorRow; bytes: number }[] = [];
    for (const key of this.dirty) {
      const row = this.rows.get(key);
      const bytes = this.sizes.get(key);
      if (row && bytes !== undefined) out.push({ row, bytes });
    }
    return out;
  }

  /** @internal */
  loadedKeys(): string[] {
    return [...this.rows.keys()];
  }

  /** @internal */
  applied(): Applied[] {
    return this.results;
  }

  private async record(
    before: ActorRow,
    after: ActorRow,
    /**
     * The row's write (compare-and-set or insert) with its events, already sent: the byte
     * length of `after`'s snapshot JSON and the stored events, or its failure
     * (VersionConflict, Conflict, ...).
     */
    written: Promise<{ bytes: number; entries: EventEntry[] }>,
    /** The events applied, in order; `after` is the row after the last. */
    steps: Step[],
    /** The timers and deadline of all of them together. */
    effects: Effects,
    /** The timer rows written with the row. */
    timers: TimerRow[],
    machine: MachineEntry,
    /** False when the caller sent the rules' reads ahead already. */
    options: { readAhead?: boolean } = {},
  ): Promise<Applied[]> {
    if (options.readAhead !== false)
      readAheadFor(this, after.entityType, after.id, emittedTypes(steps));
    const { bytes, entries } = await written;
    const key = `${after.entityType}:${after.id}`;
    this.rows.set(key, after);
    this.sizes.set(key, bytes);
    this.dirty.add(key);
    const deadline = deadlineAt(effects, this.at);
    const dues = timers.map((t) => t.dueAt);
    if (typeof deadline === 'number') dues.push(deadline);
    const results: Applied[] = [];
    let offset = 0;
    for (const [i, step] of steps.entries()) {
      const last = i === steps.length - 1;
      const n = step.decision.emitted.length;
      results.push({
        entityType: after.entityType,
        id: after.id,
        event: step.event,
        from: step.from,
        state: step.decision.state,
        snapshot: step.decision.snapshot,
        version: before.version + i + 1,
        events: entries.slice(offset, offset + n),
        machine,
        ...(after.workflow !== undefined ? { workflow: after.workflow } : {}),
        ...(after.entityType === 'task' ? { feedback: after.feedback ?? null } : {}),
        ...(last && dues.length > 0 ? { dueAt: Math.min(...dues) } : {}),
      });
      offset += n;
    }
    this.results.push(...results);
    // What follows on other actors in the same transaction: src/policies owns those rules.
    for (const applied of results) await afterTransition(this, applied);
    return results;
  }
}

function emittedTypes(steps: Step[]): string[] {
  const out: string[] = [];
  for (const step of steps) for (const e of step.decision.emitted) out.push(e.type);
  return out;
}

/** One event applied by `sendEach` (or a creation). */
interface Step {
  decision: Decision;
  /** State before it; null for a creation. */
  from: string | null;
  event: string;
}

/** A row's write before it is sent: the row after, its timers and deadline, its events. */
interface Planned {
  next: ActorRow;
  effects: Effects;
  timers: TimerRow[];
  events: NewEvent[];
}

/** The timers and deadline of several decisions applied in turn, as one write sets them. */
interface Effects {
  schedule: TimerSpec[];
  cancel: string[];
  deadline?: number | null;
}

function combine(decisions: Decision[]): Effects {
  const [only] = decisions;
  if (decisions.length === 1 && only) return only;
  const schedule = new Map<string, TimerSpec>();
  const cancel = new Set<string>();
  let deadline: number | null | undefined;
  for (const d of decisions) {
    for (const key of d.cancel) {
      schedule.delete(key);
      cancel.add(key);
    }
    for (const t of d.schedule) {
      schedule.set(t.key, t);
      cancel.delete(t.key);
    }
    if (d.deadline !== undefined) deadline = d.deadline;
  }
  return {
    schedule: [...schedule.values()],
    cancel: [...cancel],
    ...(deadline !== undefined ? { deadline } : {}),
  };
}

/** The host, not the caller, decides when an event happened; a CLAIM gets a fresh token. */
function stamp(event: DecideEvent, at: number): DecideEvent {
  const stamped: DecideEvent = { ...event, at };
  if (event.type === 'CLAIM' && typeof event.token !== 'string') stamped.token = randomUUID();
  return stamped;
}

/** The deadline as a time: set, cleared (null) or untouched (undefined). */
function deadlineAt(effects: Effects, at: number): Deadline {
  if (effects.deadline === undefined || effects.deadline === null) return effects.deadline;
  return at + effects.deadline;
}

function translateUnique(error: unknown, id: string): unknown {
  if (error instanceof UniqueViolation && error.constraint === 'tasks_worktree_active') {
    return new Conflict(`task ${id}: its worktree is held by another claimed or running task`);
  }
  return error;
}

/**
 * Awaits a row's write and the writes pipelined behind it. If the row's write failed, that is
 * the error (the others may fail only because of it: a lost compare-and-set's stale `seq`
 * collides in the event log); otherwise the first other failure.
 */
async function firstFailure<A, B>(
  first: Promise<A>,
  second: Promise<B>,
  ...rest: Promise<unknown>[]
): Promise<[A, B]> {
  const [a, b, ...others] = await Promise.allSettled([first, second, ...rest]);
  for (const r of [a, b, ...others]) {
    if (r?.status === 'rejected') throw r.reason;
  }
  return [(a as PromiseFulfilledResult<A>).value, (b as PromiseFulfilledResult<B>).value];
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}
