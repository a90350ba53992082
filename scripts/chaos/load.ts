/**
 * The load of a chaos run, over the HTTP API only, as users and agents would drive it:
 * tickets carried through every phase (their tasks added as they enter each phase), shell,
 * sleep and external tasks, agents that claim over HTTP and complete with their token, and
 * SSE readers that hang up and resume with Last-Event-ID. Requests go round-robin over the
 * `all` processes and are retried, with their Idempotency-Key, while processes die.
 * Everything the system accepted is recorded for the "nothing lost" check.
 */
import { randomUUID } from 'node:crypto';
import { readFile } from 'node:fs/promises';
import { fileURLToPath } from 'node:url';
import { PHASES, type Phase } from '../../src/machines/phases.js';
import { isGate, type WorkflowDefinition } from '../../src/machines/workflow-definition.js';
import { errorText, type Rng, sleep } from './util.js';

export interface ApiStats {
  /** Responses by outcome: 2xx, 4xx (expected refusals), and failed tries. */
  ok: number;
  refused: number;
  /** Tries that got no answer (connection refused, reset, timeout) or a 5xx. */
  failedTries: number;
  byStatus: Map<string, number>;
  /** Logical requests that never got an answer before their deadline. */
  gaveUp: number;
  /** Start times of successful requests (for recovery figures). */
  okTimes: number[];
  /** Why tries failed: the first words of the error or the 5xx body, counted. */
  failures: Map<string, number>;
}

export interface Response<T = unknown> {
  status: number;
  body: T;
}

export class Api {
  readonly stats: ApiStats = {
    ok: 0,
    refused: 0,
    failedTries: 0,
    byStatus: new Map(),
    gaveUp: 0,
    okTimes: [],
    failures: new Map(),
  };
  private rr = 0;

  constructor(
    private readonly urls: () => string[],
    private readonly token: string,
  ) {}

  /** The bearer header every request carries (API_TOKEN of the cluster). */
  auth(): Record<string, string> {
    return { authorization: `Bearer ${this.token}` };
  }

  private count(key: string): void {
    this.stats.byStatus.set(key, (this.stats.byStatus.get(key) ?? 0) + 1);
  }

  private fail(reason: string): void {
    const key = reason.replace(/request [0-9a-f-]{36}/, 'request …');
    this.stats.failures.set(key, (this.stats.failures.get(key) ?? 0) + 1);
  }

  nextUrl(): string {
    const urls = this.urls();
    const url = urls[this.rr++ % urls.length];
    if (!url) throw new Error('no API process');
    return url;
  }

  /**
   * One logical request, tried on the next process after a connection error, a timeout or
   * a 5xx, with the same Idempotency-Key for a POST, until `deadlineMs`. A 4xx is an answer.
   */
  async call<T = unknown>(
    method: 'GET' | 'POST',
    path: string,
    body?: unknown,
    o: { timeoutMs?: number; deadlineMs?: number; stop?: () => boolean } = {},
  ): Promise<Response<T>> {
    const key = method === 'POST' ? randomUUID() : undefined;
    const deadline = Date.now() + (o.deadlineMs ?? 45_000);
    let backoff = 100;
    let last = '';
    for (;;) {
      const url = this.nextUrl();
      const startedAt = Date.now();
      try {
        const res = await fetch(`${url}${path}`, {
          method,
          headers: {
            ...this.auth(),
            ...(body === undefined ? {} : { 'content-type': 'application/json' }),
            ...(key ? { 'idempotency-key': key } : {}),
          },
          ...(body === undefined ? {} : { body: JSON.stringify(body) }),
          signal: AbortSignal.timeout(o.timeoutMs ?? 6_000),
        });
        const text = await res.text();
        this.count(String(res.status));
        if (res.status < 500) {
          if (res.status < 300) {
            this.stats.ok++;
            this.stats.okTimes.push(startedAt);
          } else {
            this.stats.refused++;
          }
          return { status: res.status, body: (text ? JSON.parse(text) : null) as T };
        }
        last = `${res.status} ${text.slice(0, 200)}`;
        this.fail(`${res.status} ${/"message":"([^"]{0,60})/.exec(text)?.[1] ?? ''}`);
      } catch (error) {
        this.count('no answer');
        last = errorText(error);
        this.fail(last.slice(0, 80));
      }
      this.stats.failedTries++;
      if (Date.now() > deadline || o.stop?.()) {
        this.stats.gaveUp++;
        throw new Error(`${method} ${path}: no answer (${last})`);
      }
      await sleep(backoff + Math.random() * backoff);
      backoff = Math.min(backoff * 2, 1_000);
    }
  }
}

/** What the system accepted (a 2xx) and must therefore show after the run. */
export interface Accepted {
  tickets: Set<string>;
  tasks: Map<string, { ticketId: string; executor: string; phase: Phase }>;
  /** An accepted event and the domain event it must have left in the entity's log. */
  events: { entityId: string; expect: string; attempt?: number; what: string }[];
  /** Claims answered 200 to agents: (task, attempt, workerId). */
  claims: { taskId: string; attempt: number; workerId: string }[];
}

export interface LoadCounters {
  ticketsStarted: number;
  /** Tickets of the feature workflow, and what the load did to them. */
  workflowTickets: number;
  gatesApproved: number;
  gatesRejected: number;
  reviewsFailed: number;
  ticketsDone: number;
  ticketsCancelled: number;
  ticketsUnblocked: number;
  tasksAdded: number;
  tasksRequeued: number;
  agentClaims: number;
  agentCompletes: number;
  agentAbandoned: number;
  agentStale: number;
  sseSessions: number;
  sseFrames: number;
  driverErrors: number;
}

export interface SseRecord {
  reader: number;
  /** Frames in the order received: stream position, entity and seq. */
  frames: { id: number; entityId: string; seq: number; type: string }[];
  /** Out-of-order or repeated ids, as seen. */
  disorder: string[];
}

interface TicketJson {
  id: string;
  state: string;
  phase: Phase | null;
  tasks?: { id: string; state: string; phase?: string }[];
}

interface TaskJson {
  id: string;
  attempt: number;
  ticketId?: string;
  type?: string;
  state?: string;
}

export interface LoadOptions {
  markerFile: string;
  /** New tickets per second. */
  rate: number;
  agents: number;
  sseReaders: number;
  /** Share of tickets cancelled on the way. */
  cancelShare: number;
  /** Share of tickets that run the workflow `workflow` (registered before the load starts). */
  workflowShare: number;
  workflow: string;
  /** The workflow's phases, and which of them are gates. */
  workflowPhases: string[];
  workflowGates: string[];
  /** The task type agents fail (every attempt) for the tickets whose plan says so. */
  failType: string;
}

/** What the load does to one workflow ticket: gate rejects to make, review rounds to fail. */
interface WorkflowPlan {
  rejectsLeft: number;
  reviewFailsLeft: number;
}

const WORKTREES = ['wt-a', 'wt-b', 'wt-c', 'wt-d'];

export class Load {
  readonly accepted: Accepted = { tickets: new Set(), tasks: new Map(), events: [], claims: [] };
  readonly counters: LoadCounters = {
    ticketsStarted: 0,
    workflowTickets: 0,
    gatesApproved: 0,
    gatesRejected: 0,
    reviewsFailed: 0,
    ticketsDone: 0,
    ticketsCancelled: 0,
    ticketsUnblocked: 0,
    tasksAdded: 0,
    tasksRequeued: 0,
    agentClaims: 0,
    agentCompletes: 0,
    agentAbandoned: 0,
    agentStale: 0,
    sseSessions: 0,
    sseFrames: 0,
    driverErrors: 0,
  };
  readonly sse: SseRecord[] = [];
  readonly driverErrors: string[] = [];
  /** No new tickets once false. */
  private creating = true;
  /** Everything (drivers, agents, readers) ends once true. */
  private stopped = false;
  private readonly drivers = new Set<Promise<void>>();
  private readonly loops: Promise<void>[] = [];
  private openDrivers = 0;
  /** Workflow tickets by id: what is left to do to them (agents read it too). */
  private readonly plans = new Map<string, WorkflowPlan>();

  constructor(
    readonly api: Api,
    private readonly rng: Rng,
    private readonly o: LoadOptions,
  ) {}

  start(): void {
    this.loops.push(this.ticketLoop());
    for (let i = 0; i < this.o.agents; i++) this.loops.push(this.agentLoop(i));
    for (let i = 0; i < this.o.sseReaders; i++) {
      const rec: SseRecord = { reader: i, frames: [], disorder: [] };
      this.sse.push(rec);
      this.loops.push(this.sseLoop(rec));
    }
  }

  /** Stops creating tickets; the drivers carry the open ones to the end. */
  stopCreating(): void {
    this.creating = false;
  }

  get activeTickets(): number {
    return this.openDrivers;
  }

  /** Resolves when every ticket driver has finished (or `ms` ran out: false). */
  async driversDone(ms: number): Promise<boolean> {
    const all = Promise.all([...this.drivers]).then(() => true);
    return Promise.race([all, sleep(ms).then(() => false)]);
  }

  async stop(): Promise<void> {
    this.creating = false;
    this.stopped = true;
    await Promise.race([Promise.allSettled(this.loops), sleep(15_000)]);
    await Promise.race([Promise.allSettled([...this.drivers]), sleep(5_000)]);
  }

  get lastSseIds(): number[] {
    return this.sse.map((r) => r.frames[r.frames.length - 1]?.id ?? 0);
  }

  private readonly halt = () => this.stopped;

  // ---- tickets ------------------------------------------------------------------------

  private async ticketLoop(): Promise<void> {
    let n = 0;
    const gapMs = 1_000 / this.o.rate;
    while (this.creating && !this.stopped) {
      const drive = this.rng.chance(this.o.workflowShare)
        ? this.driveWorkflowTicket(n++)
        : this.driveTicket(n++);
      const p = drive.catch((error: unknown) => {
        this.counters.driverErrors++;
        if (this.driverErrors.length < 20) this.driverErrors.push(errorText(error));
      });
      this.openDrivers++;
      const tracked = p.finally(() => {
        this.openDrivers--;
        this.drivers.delete(tracked);
      });
      this.drivers.add(tracked);
      await sleep(gapMs * (0.5 + this.rng.next()));
    }
  }

  private phaseTasks(phase: Phase): Record<string, unknown>[] {
    const n = this.rng.between(1, 3);
    const out: Record<string, unknown>[] = [];
    for (let i = 0; i < n; i++) {
      const worktree = this.rng.chance(0.3) ? this.rng.pick(WORKTREES) : undefined;
      const kind = this.rng.next();
      const base = { phase, maxAttempts: 8, ...(worktree ? { worktree } : {}) };
      if (kind < 0.4) {
        const flaky = this.rng.chance(0.15);
        const secs = (this.rng.between(1, 4) / 10).toFixed(1);
        const m = JSON.stringify(this.o.markerFile);
        // One line when an execution starts and one when it ends, each appended in one
        // write (O_APPEND): which task, which attempt, which worker, which shell.
        const line = (what: string) =>
          `echo "${what} $TASK_ID $TASK_ATTEMPT $WORKER_ID $$ $(date +%s%3N)" >> ${m}`;
        const command = flaky
          ? `${line('start')}; sleep ${secs}; if [ "$TASK_ATTEMPT" -le 1 ]; then ${line('fail')}; exit 3; fi; ${line('end')}`
          : `${line('start')}; sleep ${secs}; ${line('end')}`;
        out.push({
          ...base,
          type: flaky ? 'flaky_build' : 'build',
          executor: 'shell',
          payload: { command },
        });
      } else if (kind < 0.75) {
        out.push({
          ...base,
          type: 'work',
          executor: 'sleep',
          payload: { ms: this.rng.between(100, 500) },
        });
      } else {
        out.push({ ...base, type: 'review', executor: 'external', payload: { phase } });
      }
    }
    return out;
  }

  private async addTasks(ticketId: string, phase: Phase): Promise<void> {
    for (const spec of this.phaseTasks(phase)) {
      const r = await this.api.call<TaskJson>('POST', `/tickets/${ticketId}/tasks`, spec, {
        stop: this.halt,
      });
      if (r.status === 201) {
        this.accepted.tasks.set(r.body.id, {
          ticketId,
          executor: String(spec.executor),
          phase,
        });
        this.accepted.events.push({
          entityId: r.body.id,
          expect: 'task.created',
          what: 'add task',
        });
        this.counters.tasksAdded++;
      } else if (r.status !== 409) {
        throw new Error(`add task → ${r.status} ${JSON.stringify(r.body)}`);
      }
    }
  }

  private async driveTicket(n: number): Promise<void> {
    const created = await this.api.call<TicketJson>(
      'POST',
      '/tickets',
      { title: `chaos ticket ${n}`, description: 'carried through every phase under faults' },
      { stop: this.halt },
    );
    if (created.status !== 201) throw new Error(`create ticket → ${created.status}`);
    const id = created.body.id;
    this.accepted.tickets.add(id);
    this.accepted.events.push({ entityId: id, expect: 'ticket.created', what: 'create ticket' });
    const cancelAt = this.rng.chance(this.o.cancelShare) ? this.rng.pick(PHASES) : null;
    // The first phase's tasks are added in backlog, so the phase cannot end before they exist.
    await this.addTasks(id, 'requirements');
    const started = await this.api.call(
      'POST',
      `/tickets/${id}/events`,
      { type: 'START' },
      {
        stop: this.halt,
      },
    );
    if (started.status !== 200) throw new Error(`START → ${started.status}`);
    this.accepted.events.push({ entityId: id, expect: 'ticket.phase_changed', what: 'START' });
    this.counters.ticketsStarted++;
    const seeded = new Set<Phase>(['requirements']);
    for (;;) {
      if (this.stopped) return;
      const r = await this.api.call<TicketJson>('GET', `/tickets/${id}`, undefined, {
        stop: this.halt,
      });
      if (r.status !== 200) throw new Error(`GET ticket → ${r.status}`);
      const t = r.body;
      if (t.state === 'done') {
        this.counters.ticketsDone++;
        return;
      }
      if (t.state === 'cancelled') return;
      if (t.state === 'blocked') {
        await this.unblock(t);
        continue;
      }
      const phase = t.phase;
      if (phase && t.state === phase) {
        if (!seeded.has(phase)) {
          seeded.add(phase);
          await this.addTasks(id, phase);
        }
        if (cancelAt === phase) {
          await sleep(this.rng.between(0, 800));
          const c = await this.api.call(
            'POST',
            `/tickets/${id}/events`,
            { type: 'CANCEL', reason: 'chaos: cancelled on the way' },
            { stop: this.halt },
          );
          if (c.status === 200) {
            this.accepted.events.push({ entityId: id, expect: 'ticket.cancelled', what: 'CANCEL' });
            this.counters.ticketsCancelled++;
            return;
          }
        }
      }
      await sleep(250 + this.rng.int(250));
    }
  }

  /**
   * A ticket of the workflow: its templates make its tasks (agents do them), the driver
   * approves or rejects its gates (now and then more often than `onReject.maxLoops` allows,
   * so it blocks), the agents fail some review rounds so work is sent back, and the build
   * phase's `dependsOn` holds its tests until the code is done.
   */
  private async driveWorkflowTicket(n: number): Promise<void> {
    const created = await this.api.call<TicketJson>(
      'POST',
      '/tickets',
      {
        title: `chaos workflow ticket ${n}`,
        description: 'carried through a user workflow under faults',
        workflow: this.o.workflow,
      },
      { stop: this.halt },
    );
    if (created.status !== 201) throw new Error(`create workflow ticket → ${created.status}`);
    const id = created.body.id;
    this.accepted.tickets.add(id);
    this.accepted.events.push({ entityId: id, expect: 'ticket.created', what: 'create ticket' });
    this.counters.workflowTickets++;
    const r = this.rng.next();
    const plan: WorkflowPlan = {
      // 4 rejects is one more than feature's plan_review allows: the 4th blocks the ticket.
      rejectsLeft: r < 0.5 ? 0 : r < 0.8 ? 1 : r < 0.9 ? 2 : 4,
      reviewFailsLeft: this.rng.chance(0.25) ? 1 : 0,
    };
    this.plans.set(id, plan);
    const phases = this.o.workflowPhases;
    const cancelAt = this.rng.chance(this.o.cancelShare) ? this.rng.pick(phases) : null;
    const started = await this.api.call(
      'POST',
      `/tickets/${id}/events`,
      { type: 'START' },
      { stop: this.halt },
    );
    if (started.status !== 200) throw new Error(`START → ${started.status}`);
    this.accepted.events.push({ entityId: id, expect: 'ticket.phase_changed', what: 'START' });
    this.counters.ticketsStarted++;
    try {
      for (;;) {
        if (this.stopped) return;
        const got = await this.api.call<TicketJson>('GET', `/tickets/${id}`, undefined, {
          stop: this.halt,
        });
        if (got.status !== 200) throw new Error(`GET ticket → ${got.status}`);
        const t = got.body;
        if (t.state === 'done') {
          this.counters.ticketsDone++;
          return;
        }
        if (t.state === 'cancelled') return;
        if (t.state === 'blocked') {
          // Blocked at a gate: the rejects ran out; approve once it is back.
          plan.rejectsLeft = 0;
          await this.unblock(t, t.phase);
          continue;
        }
        if (t.phase && t.state === t.phase && cancelAt === t.phase) {
          await sleep(this.rng.between(0, 800));
          const c = await this.api.call(
            'POST',
            `/tickets/${id}/events`,
            { type: 'CANCEL', reason: 'chaos: cancelled on the way' },
            { stop: this.halt },
          );
          if (c.status === 200) {
            this.accepted.events.push({ entityId: id, expect: 'ticket.cancelled', what: 'CANCEL' });
            this.counters.ticketsCancelled++;
            return;
          }
        }
        if (t.phase && t.state === t.phase && this.o.workflowGates.includes(t.phase)) {
          await sleep(this.rng.between(0, 300));
          const reject = plan.rejectsLeft > 0;
          const g = await this.api.call(
            'POST',
            `/tickets/${id}/events`,
            reject
              ? { type: 'REJECT', by: 'chaos', reason: `chaos: rejected at ${t.phase}` }
              : { type: 'APPROVE', by: 'chaos' },
            { stop: this.halt },
          );
          if (g.status === 200) {
            const expect = reject ? 'ticket.rejected' : 'ticket.approved';
            this.accepted.events.push({
              entityId: id,
              expect,
              what: reject ? 'REJECT' : 'APPROVE',
            });
            if (reject) {
              plan.rejectsLeft--;
              this.counters.gatesRejected++;
            } else this.counters.gatesApproved++;
          }
          continue;
        }
        await sleep(250 + this.rng.int(250));
      }
    } finally {
      this.plans.delete(id);
    }
  }

  /**
   * A ticket blocked by a task out of attempts: requeue its failed tasks (of `phase` only
   * when given: a workflow ticket's older rounds stay as they ended), then unblock.
   */
  private async unblock(t: TicketJson, phase?: string | null): Promise<void> {
    for (const task of t.tasks ?? []) {
      if (task.state !== 'failed') continue;
      if (phase !== undefined && task.phase !== phase) continue;
      const r = await this.api.call(
        'POST',
        `/tasks/${task.id}/events`,
        { type: 'REQUEUE' },
        {
          stop: this.halt,
        },
      );
      if (r.status === 200) {
        this.accepted.events.push({ entityId: task.id, expect: 'task.requeued', what: 'REQUEUE' });
        this.counters.tasksRequeued++;
      }
    }
    const u = await this.api.call(
      'POST',
      `/tickets/${t.id}/events`,
      { type: 'UNBLOCK' },
      {
        stop: this.halt,
      },
    );
    if (u.status === 200) {
      this.accepted.events.push({ entityId: t.id, expect: 'ticket.unblocked', what: 'UNBLOCK' });
      this.counters.ticketsUnblocked++;
    }
    await sleep(200);
  }

  // ---- agents -------------------------------------------------------------------------

  private async agentLoop(i: number): Promise<void> {
    const workerId = `agent-${i}`;
    while (!this.stopped) {
      try {
        const r = await this.api.call<{ task: TaskJson; token: string }>(
          'POST',
          '/tasks/claim',
          { workerId, waitMs: 1_000 },
          { timeoutMs: 8_000, stop: this.halt },
        );
        if (r.status !== 200) continue;
        const { task, token } = r.body;
        this.counters.agentClaims++;
        this.accepted.claims.push({ taskId: task.id, attempt: task.attempt, workerId });
        // Now and then an agent dies holding its claim: the lease must bring the task back.
        if (this.rng.chance(0.05)) {
          this.counters.agentAbandoned++;
          continue;
        }
        const s = await this.api.call(
          'POST',
          `/tasks/${task.id}/events`,
          { type: 'START', token },
          {
            stop: this.halt,
          },
        );
        if (s.status !== 200) {
          this.counters.agentStale++;
          continue;
        }
        this.accepted.events.push({
          entityId: task.id,
          expect: 'task.started',
          attempt: task.attempt,
          what: 'agent START',
        });
        await sleep(this.rng.between(50, 300));
        const plan = task.ticketId ? this.plans.get(task.ticketId) : undefined;
        if (task.type === this.o.failType && plan && plan.reviewFailsLeft > 0) {
          // A review that fails every attempt: the phase's onFail sends the work back.
          const x = await this.api.call<TaskJson>(
            'POST',
            `/tasks/${task.id}/events`,
            { type: 'FAIL', token, error: 'chaos: the review found problems' },
            { stop: this.halt },
          );
          if (x.status !== 200) {
            this.counters.agentStale++;
            continue;
          }
          const failed = x.body.state === 'failed';
          if (failed) {
            plan.reviewFailsLeft--;
            this.counters.reviewsFailed++;
          }
          this.accepted.events.push({
            entityId: task.id,
            expect: failed ? 'task.failed' : 'task.retry_scheduled',
            attempt: task.attempt,
            what: 'agent FAIL',
          });
          continue;
        }
        const c = await this.api.call(
          'POST',
          `/tasks/${task.id}/events`,
          { type: 'COMPLETE', token, result: { by: workerId, attempt: task.attempt } },
          { stop: this.halt },
        );
        if (c.status !== 200) {
          this.counters.agentStale++;
          continue;
        }
        this.counters.agentCompletes++;
        this.accepted.events.push({
          entityId: task.id,
          expect: 'task.completed',
          attempt: task.attempt,
          what: 'agent COMPLETE',
        });
      } catch {
        await sleep(200);
      }
    }
  }

  // ---- SSE readers --------------------------------------------------------------------

  private async sseLoop(rec: SseRecord): Promise<void> {
    let lastId = 0;
    while (!this.stopped) {
      const url = this.api.nextUrl();
      const ctrl = new AbortController();
      const timer = setTimeout(() => ctrl.abort(), this.rng.between(1_500, 6_000));
      const stopWatch = setInterval(() => {
        if (this.stopped) ctrl.abort();
      }, 200);
      try {
        const res = await fetch(`${url}/events/stream`, {
          headers: {
            ...this.api.auth(),
            ...(lastId > 0 ? { 'last-event-id': String(lastId) } : {}),
          },
          signal: ctrl.signal,
        });
        if (res.status !== 200 || !res.body) {
          await res.body?.cancel();
          throw new Error(`SSE ${res.status}`);
        }
        this.counters.sseSessions++;
        const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
        let buffer = '';
        for (;;) {
          const chunk = await reader.read();
          if (chunk.done) break;
          buffer += chunk.value;
          for (let end = buffer.indexOf('\n\n'); end >= 0; end = buffer.indexOf('\n\n')) {
            const block = buffer.slice(0, end);
            buffer = buffer.slice(end + 2);
            let id: number | null = null;
            let data = '';
            for (const line of block.split('\n')) {
              if (line.startsWith('id: ')) id = Number(line.slice(4));
              else if (line.startsWith('data: ')) data += line.slice(6);
            }
            if (id === null) continue;
            if (id <= lastId) rec.disorder.push(`id ${id} after ${lastId}`);
            const entry = JSON.parse(data) as { entityId: string; seq: number; type: string };
            rec.frames.push({ id, entityId: entry.entityId, seq: entry.seq, type: entry.type });
            this.counters.sseFrames++;
            lastId = Math.max(lastId, id);
          }
        }
      } catch {
        // hung up (on purpose, or the process died): resume from lastId
      } finally {
        clearTimeout(timer);
        clearInterval(stopWatch);
      }
      if (!this.stopped) await sleep(this.rng.between(50, 300));
    }
  }
}

const FEATURE_WORKFLOW = fileURLToPath(
  new URL('../../examples/workflows/feature.json', import.meta.url),
);

/**
 * The mixed load of the chaos and soak runs: the example feature workflow registered as a
 * user would (a share of the tickets run it, with gate rejects and failing reviews), 2 agents
 * and 2 SSE readers. Returns the load, not started, and the workflow's `NAME@VERSION`.
 */
export async function mixedLoad(
  api: Api,
  rng: Rng,
  o: { markerFile: string; rate: number },
): Promise<{ load: Load; workflow: string }> {
  const workflow = JSON.parse(await readFile(FEATURE_WORKFLOW, 'utf8')) as WorkflowDefinition;
  const registered = await api.call<{ name: string; version: number }>(
    'POST',
    '/workflows',
    workflow,
  );
  if (registered.status !== 201 && registered.status !== 200) {
    throw new Error(`POST /workflows → ${registered.status} ${JSON.stringify(registered.body)}`);
  }
  const load = new Load(api, rng, {
    markerFile: o.markerFile,
    rate: o.rate,
    agents: 2,
    sseReaders: 2,
    cancelShare: 0.06,
    workflowShare: 0.4,
    workflow: workflow.name,
    workflowPhases: workflow.phases.map((p) => p.name),
    workflowGates: workflow.phases.filter(isGate).map((p) => p.name),
    failType: 'code_review',
  });
  return { load, workflow: `${registered.body.name}@${registered.body.version}` };
}
