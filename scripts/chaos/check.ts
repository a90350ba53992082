/**
 * The verdict of a chaos run: every CONTRACT section 4 guarantee checked from the outside,
 * from what the run left behind — the event log and rows in Postgres, the JetStream stream,
 * the executors' marker file, what the load was told (2xx answers) and what the SSE readers
 * received. Each finding is a violation of one guarantee, worded so it can be looked up.
 */
import { readFile } from 'node:fs/promises';
import { DeliverPolicy, jetstream, jetstreamManager } from '@nats-io/jetstream';
import { connect } from '@nats-io/transport-node';
import { templatesOf } from '../../src/machines/workflow.js';
import {
  DEFAULT_WORKFLOW,
  isGate,
  type LoopRule,
  type WorkflowDefinition,
} from '../../src/machines/workflow-definition.js';
import { unpublishedCount } from '../../src/persistence/outbox-rows.js';
import type { Sql } from './cluster.js';
import type { Fault } from './faults.js';
import type { Accepted, SseRecord } from './load.js';

export const GUARANTEES = [
  ['1', 'legal only (replay of every log)'],
  ['2', 'one effect (one completion, one ADVANCE per phase)'],
  ['3', 'ordered log (seq 1..N, no gap)'],
  ['4', 'claims (one holder per attempt)'],
  ['5', 'worktrees (one active task each)'],
  ['6', 'nothing lost (accepted → present, all done)'],
  ['7', 'durable time (dead claims reclaimed)'],
  ['8', 'atomic + stream (every event in JetStream once)'],
  ['sse', 'SSE resume (log order, no dup, no gap)'],
  ['loops', 'workflows: a rework never exceeds maxLoops'],
  ['deps', 'workflows: a dependent ran after its dependencies completed'],
  ['tpl', 'workflows: one task per template per phase entry'],
  ['proc', 'processes (no crash; SIGTERM → exit 0)'],
] as const;
export type GuaranteeId = (typeof GUARANTEES)[number][0];

export class Findings {
  readonly byGuarantee = new Map<GuaranteeId, string[]>(GUARANTEES.map(([id]) => [id, []]));
  add(g: GuaranteeId, message: string): void {
    this.byGuarantee.get(g)?.push(message);
  }
  count(g: GuaranteeId): number {
    return this.byGuarantee.get(g)?.length ?? 0;
  }
  get total(): number {
    let n = 0;
    for (const list of this.byGuarantee.values()) n += list.length;
    return n;
  }
}

export interface EventRow {
  pos: number;
  event_id: string;
  entity_type: 'ticket' | 'task';
  entity_id: string;
  seq: number;
  type: string;
  data: Record<string, unknown>;
  at_ms: number;
  /**
   * The relay is done with it: not after the relay cursor, nor held in `relay_held` waiting to
   * go out. Such an event must be in the stream.
   */
  published: boolean;
  /** The stream sequence `relay_held` recorded for it, when it was held and then published. */
  held_seq: number | null;
}

export interface TaskRow {
  id: string;
  ticket_id: string;
  type: string;
  phase: string;
  state: string;
  attempt: number;
  seq: number;
  worktree: string | null;
  executor: string;
}

export interface TicketRow {
  id: string;
  state: string;
  seq: number;
  /** `NAME@VERSION` of the workflow the ticket runs. */
  workflow: string;
}

export interface StreamMessage {
  seq: number;
  /** The `Nats-Msg-Id` header (the relay sets the event id; null when absent). */
  msgId: string | null;
  /** The body's `eventId`. */
  eventId: string;
  entityId: string;
  entitySeq: number;
}

export interface MarkerLine {
  what: 'start' | 'end' | 'fail';
  taskId: string;
  attempt: number;
  workerId: string;
  pid: string;
  ms: number;
}

export interface Evidence {
  events: EventRow[];
  tickets: TicketRow[];
  tasks: TaskRow[];
  /** Events not published yet (after the relay cursor, or held). */
  outbox: number;
  deadLetters: number;
  stream: StreamMessage[];
  /** The stream's last sequence (0 when empty). */
  streamLastSeq: number;
  /** `relay_cursor.stream_seq`: the highest stream sequence the relay recorded as acknowledged. */
  relayStreamSeq: number;
  markers: MarkerLine[];
  /** Every registered workflow version by `NAME@VERSION` (the built-in one included). */
  workflows: Map<string, WorkflowDefinition>;
  /** Task dependencies: (task, the task it waits for). */
  dependencies: { task_id: string; depends_on: string }[];
}

export interface CheckFigures {
  tasksByState: Map<string, number>;
  ticketsByState: Map<string, number>;
  eventsByType: Map<string, number>;
  events: number;
  streamMessages: number;
  markerExecutions: number;
  /** Executions of one task by two claims at once (legal after a lease loss, fenced by tokens). */
  overlappingAfterLeaseLoss: number;
  staleWorkerCompletions: number;
  leaseExpiries: number;
  /** Per fault (same order as the faults): the longest a held task waited to be reclaimed. */
  reclaimMs: (number | null)[];
  deadLetters: number;
}

// ---- gathering ------------------------------------------------------------------------

export async function gather(
  sql: Sql,
  natsUrl: string,
  stream: string,
  markerFile: string,
): Promise<Evidence> {
  const [cursor] = await sql<{ stream_seq: number }[]>`select stream_seq from relay_cursor`;
  if (!cursor) throw new Error('relay_cursor has no row');
  // Unpublished: after the cursor in (tx, pos) order, or held and not yet published.
  const events = await sql<EventRow[]>`
    select e.pos, e.event_id, e.entity_type, e.entity_id, e.seq, e.type, e.data,
      (extract(epoch from e.at) * 1000)::float8 as at_ms,
      not ((e.tx, e.pos) > (c.tx, c.pos) or (h.pos is not null and h.published_seq is null))
        as published,
      h.published_seq as held_seq
    from events e cross join relay_cursor c left join relay_held h on h.pos = e.pos
    order by e.entity_id, e.seq`;
  const tickets = await sql<TicketRow[]>`select id, state, seq, workflow from tickets`;
  const tasks = await sql<TaskRow[]>`
    select id, ticket_id, type, phase, state, attempt, seq, worktree, executor from tasks`;
  const workflows = await sql<{ ref: string; definition: WorkflowDefinition }[]>`
    select name || '@' || version as ref, definition from workflows`;
  const dependencies = await sql<{ task_id: string; depends_on: string }[]>`
    select task_id, depends_on from task_dependencies`;
  const outbox = await unpublishedCount(sql);
  const [dead] = await sql<{ n: number }[]>`select count(*)::int as n from dead_letters`;
  const read = await readStream(natsUrl, stream);
  return {
    events: [...events],
    tickets: [...tickets],
    tasks: [...tasks],
    outbox,
    deadLetters: dead?.n ?? -1,
    stream: read.messages,
    streamLastSeq: read.lastSeq,
    relayStreamSeq: cursor.stream_seq,
    markers: await readMarkers(markerFile),
    workflows: new Map(workflows.map((w) => [w.ref, w.definition])),
    dependencies: [...dependencies],
  };
}

/** Every message of the event stream, in stream order, and the stream's last sequence. */
export async function readStream(
  natsUrl: string,
  stream: string,
): Promise<{ messages: StreamMessage[]; lastSeq: number }> {
  const nc = await connect({ servers: natsUrl, timeout: 5_000 });
  try {
    const jsm = await jetstreamManager(nc);
    const info = await jsm.streams.info(stream);
    const last = info.state.last_seq;
    const out: StreamMessage[] = [];
    if (info.state.messages === 0) return { messages: out, lastSeq: last };
    const js = jetstream(nc);
    const consumer = await js.consumers.get(stream, {
      deliver_policy: DeliverPolicy.StartSequence,
      opt_start_seq: 1,
    });
    const messages = await consumer.consume({ max_messages: 512 });
    const timer = setTimeout(() => void messages.close(), 60_000);
    for await (const m of messages) {
      const entry = m.json<{ eventId: string; entityId: string; seq: number }>();
      out.push({
        seq: m.seq,
        msgId: m.headers?.get('Nats-Msg-Id') || null,
        eventId: entry.eventId,
        entityId: entry.entityId,
        entitySeq: entry.seq,
      });
      if (m.seq >= last) break;
    }
    clearTimeout(timer);
    await messages.close().catch(() => {});
    return { messages: out, lastSeq: last };
  } finally {
    await nc.close();
  }
}

export async function readMarkers(file: string): Promise<MarkerLine[]> {
  let text = '';
  try {
    text = await readFile(file, 'utf8');
  } catch {
    return [];
  }
  const out: MarkerLine[] = [];
  for (const line of text.split('\n')) {
    const [what, taskId, attempt, workerId, pid, ms] = line.trim().split(' ');
    if (!what || !taskId || !attempt || !workerId || !pid || !ms) continue;
    if (what !== 'start' && what !== 'end' && what !== 'fail') continue;
    out.push({ what, taskId, attempt: Number(attempt), workerId, pid, ms: Number(ms) });
  }
  return out;
}

// ---- checking -------------------------------------------------------------------------

const bump = (m: Map<string, number>, k: string, by = 1) => m.set(k, (m.get(k) ?? 0) + by);

/** A task's state just before log position `pos`, from its replayed states. */
function stateAt(states: { pos: number; state: TaskReplayState }[], pos: number): TaskReplayState {
  let state: TaskReplayState = 'none';
  for (const s of states) {
    if (s.pos >= pos) break;
    state = s.state;
  }
  return state;
}

/** The claims of one task, in log order, with where each ended. */
interface Claim {
  taskId: string;
  attempt: number;
  workerId: string;
  pos: number;
  atMs: number;
  /** The event that ended the hold (completion, expiry, release, cancel, failure). */
  endPos: number | null;
  endAtMs: number | null;
  endType: string | null;
}

const LEAVES_ACTIVE = new Set([
  'task.completed',
  'task.lease_expired',
  'task.retry_scheduled',
  'task.failed',
  'task.released',
  'task.cancelled',
]);

type TaskReplayState =
  | 'none'
  | 'waiting'
  | 'pending'
  | 'claimed'
  | 'running'
  | 'expiring'
  | 'retry_wait'
  | 'completed'
  | 'failed'
  | 'cancelled';

const TASK_MOVES: Record<TaskReplayState, Partial<Record<string, TaskReplayState>>> = {
  none: { 'task.created': 'pending' },
  // A task created with an unfinished dependency goes on to `waiting` in the same transition.
  pending: { 'task.claimed': 'claimed', 'task.cancelled': 'cancelled', 'task.waiting': 'waiting' },
  waiting: { 'task.ready': 'pending', 'task.cancelled': 'cancelled' },
  claimed: {
    'task.started': 'running',
    'task.lease_expired': 'expiring',
    'task.released': 'pending',
    'task.cancelled': 'cancelled',
  },
  running: {
    'task.completed': 'completed',
    'task.lease_expired': 'expiring',
    'task.retry_scheduled': 'retry_wait',
    'task.failed': 'failed',
    'task.released': 'pending',
    'task.cancelled': 'cancelled',
  },
  // A lease expiry is followed, in the same transition, by a retry or the failure.
  expiring: { 'task.retry_scheduled': 'retry_wait', 'task.failed': 'failed' },
  retry_wait: { 'task.retried': 'pending', 'task.cancelled': 'cancelled' },
  failed: { 'task.requeued': 'pending' },
  completed: {},
  cancelled: {},
};

export function check(
  ev: Evidence,
  accepted: Accepted,
  sse: SseRecord[],
  faults: Fault[],
  leaseMs: number,
): { findings: Findings; figures: CheckFigures } {
  const f = new Findings();
  const figures: CheckFigures = {
    tasksByState: new Map(),
    ticketsByState: new Map(),
    eventsByType: new Map(),
    events: ev.events.length,
    streamMessages: ev.stream.length,
    markerExecutions: 0,
    overlappingAfterLeaseLoss: 0,
    staleWorkerCompletions: 0,
    leaseExpiries: 0,
    reclaimMs: [],
    deadLetters: ev.deadLetters,
  };
  const cap = (g: GuaranteeId, message: string) => {
    // A broken run can find thousands of the same thing: keep the first ones.
    if (f.count(g) < 200) f.add(g, message);
  };

  const byEntity = new Map<string, EventRow[]>();
  for (const e of ev.events) {
    bump(figures.eventsByType, e.type);
    const list = byEntity.get(e.entity_id);
    if (list) list.push(e);
    else byEntity.set(e.entity_id, [e]);
  }
  const ticketRows = new Map(ev.tickets.map((t) => [t.id, t]));
  const taskRows = new Map(ev.tasks.map((t) => [t.id, t]));
  for (const t of ev.tickets) bump(figures.ticketsByState, t.state);
  for (const t of ev.tasks) bump(figures.tasksByState, t.state);

  // (3) ordered log, and (8) the row and its events committed together.
  for (const [id, list] of byEntity) {
    list.forEach((e, i) => {
      if (e.seq !== i + 1) cap('3', `${id}: event #${i + 1} has seq ${e.seq}`);
    });
    const row = ticketRows.get(id) ?? taskRows.get(id);
    if (!row) cap('8', `${id}: ${list.length} events but no ${list[0]?.entity_type} row`);
    else if (row.seq !== list.length) {
      cap('8', `${id}: row says seq ${row.seq}, the log holds ${list.length} events`);
    }
  }
  for (const row of [...ev.tickets, ...ev.tasks]) {
    if (!byEntity.has(row.id)) cap('8', `${row.id}: a row with no events`);
  }

  // (1) legal only, (2) one effect, (4) claims: replay every task's log. Every claim takes
  // the next attempt number: a RELEASE or a REQUEUE gives none back (they refund or reset the
  // budget, `attemptsUsed`, which the log does not carry).
  const claimsByTask = new Map<string, Claim[]>();
  /** Each task's state after each of its events, by log position. */
  const statesByTask = new Map<string, { pos: number; state: TaskReplayState }[]>();
  for (const task of ev.tasks) {
    const list = byEntity.get(task.id) ?? [];
    let state: TaskReplayState = 'none';
    let attempt = 0;
    let open: Claim | null = null;
    let completions = 0;
    const claims: Claim[] = [];
    const states: { pos: number; state: TaskReplayState }[] = [];
    statesByTask.set(task.id, states);
    for (const e of list) {
      const to: TaskReplayState | undefined = TASK_MOVES[state][e.type];
      if (to === undefined) {
        cap('1', `${task.id} seq ${e.seq}: ${e.type} in state ${state}`);
        continue;
      }
      const dataAttempt = typeof e.data.attempt === 'number' ? e.data.attempt : null;
      if (e.type === 'task.claimed') {
        if (dataAttempt !== attempt + 1) {
          cap(
            '4',
            `${task.id} seq ${e.seq}: claim of attempt ${dataAttempt} after attempt ${attempt}`,
          );
        }
        attempt = dataAttempt ?? attempt + 1;
        open = {
          taskId: task.id,
          attempt,
          workerId: String(e.data.workerId),
          pos: e.pos,
          atMs: e.at_ms,
          endPos: null,
          endAtMs: null,
          endType: null,
        };
        claims.push(open);
      } else if (e.type === 'task.completed') {
        completions++;
        if (completions > 1) cap('2', `${task.id}: completed ${completions} times`);
        if (dataAttempt !== attempt || !open || open.attempt !== attempt) {
          cap(
            '4',
            `${task.id}: completed by attempt ${dataAttempt}, the live attempt is ${attempt}`,
          );
        } else if (e.data.workerId !== open.workerId) {
          cap(
            '4',
            `${task.id}: attempt ${attempt} held by ${open.workerId}, completed as ${String(e.data.workerId)}`,
          );
        }
      }
      if (e.type === 'task.lease_expired') figures.leaseExpiries++;
      if (open && LEAVES_ACTIVE.has(e.type) && open.endPos === null) {
        open.endPos = e.pos;
        open.endAtMs = e.at_ms;
        open.endType = e.type;
        open = null;
      }
      state = to;
      states.push({ pos: e.pos, state });
    }
    claimsByTask.set(task.id, claims);
    if (state !== task.state) {
      cap('1', `${task.id}: stored state ${task.state}, its log replays to ${state}`);
    }
    if (task.attempt !== attempt) {
      cap('1', `${task.id}: stored attempt ${task.attempt}, its log replays to ${attempt}`);
    }
  }

  // (1) and (2) for tickets, replayed against each ticket's own workflow: phases in order,
  // one ADVANCE per phase entry, gates decided once, send-backs only where the definition
  // allows, nothing after a final state. And the workflow guarantees: (loops) a rule sends
  // back at most maxLoops times, (tpl) each phase entry made one task per template.
  const defOf = (t: TicketRow): WorkflowDefinition | null =>
    ev.workflows.get(t.workflow) ?? (t.workflow === 'default@1' ? DEFAULT_WORKFLOW : null);
  const tasksByTicket = new Map<string, TaskRow[]>();
  for (const t of ev.tasks) {
    const list = tasksByTicket.get(t.ticket_id);
    if (list) list.push(t);
    else tasksByTicket.set(t.ticket_id, [t]);
  }
  /** Failed tasks a send-back left behind on purpose (onFail): they stay `failed`. */
  const sentBackOver = new Set<string>();
  for (const ticket of ev.tickets) {
    const list = byEntity.get(ticket.id) ?? [];
    const def = defOf(ticket);
    if (!def) {
      cap('1', `${ticket.id}: runs workflow ${ticket.workflow}, which is not registered`);
      continue;
    }
    const phases = def.phases.map((p) => p.name);
    const index = new Map(phases.map((p, i) => [p, i]));
    const isPhaseName = (x: unknown): x is string => typeof x === 'string' && index.has(x);
    const phaseDef = (x: string) => def.phases[index.get(x) ?? -1];
    const ruleOf = (x: string): LoopRule | undefined => {
      const p = phaseDef(x);
      return p ? (isGate(p) ? p.onReject : p.onFail) : undefined;
    };
    const nextOf = (x: string) => phases[(index.get(x) ?? -2) + 1] ?? 'done';
    let state = 'none';
    let remembered: string | null = null;
    /** A gate's decision that the next event must carry out. */
    let decided: 'approved' | 'rejected' | null = null;
    const entries = new Map<string, number>();
    const sentBackInto = new Map<string, number>();
    const loopsByRule = new Map<string, number>();
    const sentBacks: EventRow[] = [];
    /** Events that entered a phase (and so had to create its templates). */
    const phaseEntries: { phase: string; seq: number }[] = [];
    for (const e of list) {
      const from = e.data.from;
      const to = e.data.to;
      let next: string | null = null;
      if (decided !== null) {
        // approved → forward; rejected → sent back or blocked; nothing else in between.
        const ok =
          decided === 'approved'
            ? e.type === 'ticket.phase_changed' || e.type === 'ticket.done'
            : e.type === 'ticket.sent_back' || e.type === 'ticket.blocked';
        if (!ok) cap('1', `${ticket.id} seq ${e.seq}: ${e.type} right after ticket.${decided}`);
        decided = null;
      }
      if (e.type === 'ticket.created' && state === 'none') next = 'backlog';
      else if (
        e.type === 'ticket.cancelled' &&
        state !== 'none' &&
        state !== 'done' &&
        state !== 'cancelled'
      ) {
        next = 'cancelled';
      } else if (e.type === 'ticket.phase_changed' || e.type === 'ticket.done') {
        const expected =
          state === 'backlog' ? (phases[0] ?? 'done') : isPhaseName(state) ? nextOf(state) : null;
        const type = expected === 'done' ? 'ticket.done' : 'ticket.phase_changed';
        if (expected !== null && from === state && to === expected && e.type === type) {
          next = expected;
          // A phase is entered going forward once, and once more after each send-back to
          // an earlier phase: more is a second ADVANCE of the same entry.
          const n = (entries.get(expected) ?? 0) + 1;
          entries.set(expected, n);
          const allowed =
            1 +
            sentBacks.filter(
              (b) => (index.get(String(b.data.to)) ?? 99) < (index.get(expected) ?? -1),
            ).length;
          if (expected !== 'done' && n > allowed) {
            cap('2', `${ticket.id}: entered ${expected} ${n} times (${allowed} allowed)`);
          }
          if (expected !== 'done') phaseEntries.push({ phase: expected, seq: e.seq });
        }
      } else if (
        (e.type === 'ticket.approved' || e.type === 'ticket.rejected') &&
        isPhaseName(state) &&
        e.data.phase === state &&
        isGate(phaseDef(state) ?? { name: '' })
      ) {
        decided = e.type === 'ticket.approved' ? 'approved' : 'rejected';
        next = state;
      } else if (
        e.type === 'ticket.sent_back' &&
        isPhaseName(state) &&
        from === state &&
        isPhaseName(to) &&
        (index.get(to) ?? 99) <= (index.get(state) ?? -1)
      ) {
        next = to;
        sentBacks.push(e);
        phaseEntries.push({ phase: to, seq: e.seq });
        const into = (sentBackInto.get(to) ?? 0) + 1;
        sentBackInto.set(to, into);
        if (e.data.loop !== into) {
          cap(
            'loops',
            `${ticket.id} seq ${e.seq}: sent back into ${to} with loop ${String(e.data.loop)}, the ${into}th time`,
          );
        }
        if (e.data.cause !== 'operator') {
          const rule = ruleOf(state);
          const n = (loopsByRule.get(state) ?? 0) + 1;
          loopsByRule.set(state, n);
          if (!rule || rule.sendBackTo !== to) {
            cap(
              'loops',
              `${ticket.id} seq ${e.seq}: ${String(e.data.cause)} sent it from ${state} to ${to}, the definition says ${rule ? rule.sendBackTo : 'block'}`,
            );
          } else if (n > rule.maxLoops) {
            cap(
              'loops',
              `${ticket.id}: ${state}'s rule sent it back ${n} times (maxLoops ${rule.maxLoops})`,
            );
          }
          if (e.data.cause === 'task_failed') {
            // Failed when the ticket was told, in this phase: an operator's REQUEUE may have
            // run it again since.
            const failed = taskRows.get(String(e.data.taskId));
            const then = failed ? stateAt(statesByTask.get(failed.id) ?? [], e.pos) : 'none';
            if (!failed || failed.phase !== state || then !== 'failed') {
              cap(
                '1',
                `${ticket.id} seq ${e.seq}: sent back for task ${String(e.data.taskId)}, which was ${failed ? `${then} in ${failed.phase}` : 'unknown'}`,
              );
            } else sentBackOver.add(failed.id);
          } else if (e.data.cause === 'reject' && list[e.seq - 2]?.type !== 'ticket.rejected') {
            cap('1', `${ticket.id} seq ${e.seq}: a reject send-back without ticket.rejected`);
          }
        }
      } else if (e.type === 'ticket.blocked' && isPhaseName(state) && e.data.phase === state) {
        remembered = state;
        next = 'blocked';
      } else if (
        e.type === 'ticket.unblocked' &&
        state === 'blocked' &&
        e.data.phase === remembered
      ) {
        next = remembered;
      } else if (e.type === 'ticket.diagnostic_spawned' && isPhaseName(state)) {
        next = state;
      }
      if (next === null) {
        cap(
          '1',
          `${ticket.id} seq ${e.seq}: ${e.type} ${JSON.stringify(e.data).slice(0, 80)} in state ${state}`,
        );
        continue;
      }
      state = next;
    }
    if (state !== ticket.state) {
      cap('1', `${ticket.id}: stored state ${ticket.state}, its log replays to ${state}`);
    }

    // (tpl) every phase entry made exactly one task per template key, and no other does.
    const own = tasksByTicket.get(ticket.id) ?? [];
    const expected = new Map<string, string>();
    for (const { phase, seq } of phaseEntries) {
      for (const t of templatesOf(def, phase)) {
        // The runtime derives a template task's id from the entry (policies/phase-entered).
        expected.set(`${ticket.id}-${phase}-${seq}-${t.key}`, `${phase}/${t.type}`);
      }
    }
    for (const [id, what] of expected) {
      const row = taskRows.get(id);
      if (!row) cap('tpl', `${ticket.id}: no task ${id} (${what}) for that phase entry`);
      else if (`${row.phase}/${row.type}` !== what) {
        cap('tpl', `${ticket.id}: task ${id} is ${row.phase}/${row.type}, its template ${what}`);
      }
    }
    for (const t of own) {
      const templated = templatesOf(def, t.phase).some((x) => x.type === t.type);
      if (templated && !expected.has(t.id)) {
        cap('tpl', `${ticket.id}: task ${t.id} (${t.phase}/${t.type}) belongs to no phase entry`);
      }
    }
  }

  // (4) executions, from the shell executor's marker lines.
  const allClaims = [...claimsByTask.values()].flat();
  const executions = new Map<string, { line: MarkerLine; end: MarkerLine | null }>();
  for (const m of ev.markers) {
    const key = `${m.taskId} ${m.attempt} ${m.workerId} ${m.pid}`;
    if (m.what === 'start') executions.set(key, { line: m, end: null });
    else {
      const x = executions.get(key);
      if (x) x.end = m;
      else cap('4', `marker: ${m.what} of ${key} without a start`);
    }
  }
  figures.markerExecutions = executions.size;
  const runsPerClaim = new Map<string, number>();
  const runsByTask = new Map<string, { line: MarkerLine; end: MarkerLine | null }[]>();
  for (const x of executions.values()) {
    const { taskId, attempt, workerId } = x.line;
    const claims = (claimsByTask.get(taskId) ?? []).filter(
      (c) => c.attempt === attempt && c.workerId.split('#')[0] === workerId,
    );
    if (claims.length === 0) {
      cap('4', `${taskId}: ran as attempt ${attempt} on ${workerId}, which never claimed it`);
    }
    const k = `${taskId} ${attempt} ${workerId}`;
    bump(runsPerClaim, k);
    if ((runsPerClaim.get(k) ?? 0) > Math.max(1, claims.length)) {
      cap('4', `${taskId}: attempt ${attempt} on ${workerId} ran ${runsPerClaim.get(k)} times`);
    }
    const list = runsByTask.get(taskId);
    if (list) list.push(x);
    else runsByTask.set(taskId, [x]);
  }
  for (const [taskId, runs] of runsByTask) {
    const sorted = [...runs].sort((a, b) => a.line.ms - b.line.ms);
    for (let i = 1; i < sorted.length; i++) {
      const prev = sorted[i - 1];
      const cur = sorted[i];
      if (!prev || !cur) continue;
      const prevEnd = prev.end?.ms ?? Number.POSITIVE_INFINITY;
      if (cur.line.ms < prevEnd && cur.line.attempt !== prev.line.attempt) {
        // Two attempts at once: only legal when the earlier one lost its claim first.
        const earlier = (claimsByTask.get(taskId) ?? []).find(
          (c) => c.attempt === prev.line.attempt && c.workerId.split('#')[0] === prev.line.workerId,
        );
        if (earlier?.endType === 'task.completed') {
          cap(
            '4',
            `${taskId}: attempt ${cur.line.attempt} ran while attempt ${prev.line.attempt} still held it`,
          );
        } else figures.overlappingAfterLeaseLoss++;
      }
    }
  }
  for (const task of ev.tasks) {
    if (task.executor !== 'shell' || task.state !== 'completed') continue;
    const done = (claimsByTask.get(task.id) ?? []).find((c) => c.endType === 'task.completed');
    if (!done) continue;
    const ran = (runsByTask.get(task.id) ?? []).some(
      (x) =>
        x.line.attempt === done.attempt &&
        x.line.workerId === done.workerId.split('#')[0] &&
        x.end?.what === 'end',
    );
    if (!ran) {
      cap(
        '4',
        `${task.id}: completed by attempt ${done.attempt} on ${done.workerId}, which never finished a run`,
      );
    }
  }

  // (5) worktrees: hold intervals in commit-causal order (global pos) never overlap.
  const worktreeOf = new Map(ev.tasks.map((t) => [t.id, t.worktree]));
  const holds = new Map<string, Claim[]>();
  for (const c of allClaims) {
    const wt = worktreeOf.get(c.taskId);
    if (!wt) continue;
    const list = holds.get(wt);
    if (list) list.push(c);
    else holds.set(wt, [c]);
  }
  for (const [wt, list] of holds) {
    list.sort((a, b) => a.pos - b.pos);
    let holder: Claim | null = null;
    for (const c of list) {
      if (holder && (holder.endPos === null || holder.endPos > c.pos)) {
        cap(
          '5',
          `${wt}: ${c.taskId} claimed (pos ${c.pos}) while ${holder.taskId} held it (until pos ${holder.endPos ?? 'never'})`,
        );
      }
      if (
        !holder ||
        holder.endPos === null ||
        (c.endPos ?? Number.POSITIVE_INFINITY) > holder.endPos
      ) {
        holder = c;
      }
    }
  }
  const activeByWorktree = new Map<string, number>();
  for (const t of ev.tasks) {
    if (t.worktree && (t.state === 'claimed' || t.state === 'running'))
      bump(activeByWorktree, t.worktree);
  }
  for (const [wt, n] of activeByWorktree) if (n > 1) cap('5', `${wt}: ${n} tasks active now`);

  // (6) nothing lost: every 2xx left its mark, and all the work got done.
  for (const id of accepted.tickets)
    if (!ticketRows.has(id)) cap('6', `ticket ${id} was created (201) but is gone`);
  for (const [id, t] of accepted.tasks) {
    const row = taskRows.get(id);
    if (!row) cap('6', `task ${id} was added (201) but is gone`);
    else if (row.ticket_id !== t.ticketId) cap('6', `task ${id} moved to ticket ${row.ticket_id}`);
  }
  for (const a of accepted.events) {
    const list = byEntity.get(a.entityId) ?? [];
    const found = list.some(
      (e) => e.type === a.expect && (a.attempt === undefined || e.data.attempt === a.attempt),
    );
    if (!found)
      cap(
        '6',
        `${a.entityId}: ${a.what} was accepted, no ${a.expect}${a.attempt ? ` (attempt ${a.attempt})` : ''} in its log`,
      );
  }
  for (const c of accepted.claims) {
    const found = (claimsByTask.get(c.taskId) ?? []).some(
      (x) => x.attempt === c.attempt && x.workerId === c.workerId,
    );
    if (!found)
      cap(
        '6',
        `${c.taskId}: claim of attempt ${c.attempt} by ${c.workerId} was answered 200, not in its log`,
      );
  }
  for (const t of ev.tickets) {
    if (t.state !== 'done' && t.state !== 'cancelled')
      cap('6', `ticket ${t.id} ended in ${t.state}`);
  }
  for (const t of ev.tasks) {
    if (t.state === 'failed' && sentBackOver.has(t.id)) continue;
    if (t.state !== 'completed' && t.state !== 'cancelled')
      cap('6', `task ${t.id} ended in ${t.state}`);
  }

  // (deps) a dependent was never released, claimed or started before every dependency
  // completed (global log position: the release commits with, or after, the completion).
  const firstPos = (id: string, type: string) =>
    (byEntity.get(id) ?? []).find((e) => e.type === type) ?? null;
  for (const { task_id, depends_on } of ev.dependencies) {
    const done = firstPos(depends_on, 'task.completed');
    for (const e of byEntity.get(task_id) ?? []) {
      if (e.type !== 'task.claimed' && e.type !== 'task.started' && e.type !== 'task.ready')
        continue;
      if (!done || done.pos > e.pos) {
        cap(
          'deps',
          `${task_id}: ${e.type} (pos ${e.pos}) before ${depends_on} completed (${done ? `pos ${done.pos}` : 'never'})`,
        );
      } else if (done.at_ms > e.at_ms) {
        cap(
          'deps',
          `${task_id}: ${e.type} at ${e.at_ms} before ${depends_on} completed at ${done.at_ms}`,
        );
      }
    }
    const created = firstPos(task_id, 'task.created');
    const waited = firstPos(task_id, 'task.waiting');
    if (created && !waited && (!done || done.pos > created.pos)) {
      cap('deps', `${task_id}: created pending while ${depends_on} was not completed`);
    }
  }
  if (ev.outbox !== 0) cap('6', `${ev.outbox} events still unpublished (the outbox)`);

  // (7) durable time: claims of killed or frozen workers end, by lease expiry if need be.
  for (const fault of faults) {
    let worst: number | null = null;
    for (const wid of fault.workerIds) {
      for (const c of allClaims) {
        if (c.workerId.split('#')[0] !== wid) continue;
        if (c.endPos === null) {
          cap(
            '7',
            `${c.taskId}: attempt ${c.attempt} of ${wid} (${fault.kind}) was never reclaimed`,
          );
          continue;
        }
        // Held at the fault and ended by expiry: how long the task waited for its lease.
        if (
          c.atMs <= fault.at &&
          (c.endAtMs ?? 0) > fault.at &&
          c.endType === 'task.lease_expired'
        ) {
          const waited = (c.endAtMs ?? 0) - fault.at;
          worst = Math.max(worst ?? 0, waited);
          if (waited > leaseMs + 15_000) {
            cap(
              '7',
              `${c.taskId}: reclaimed ${waited} ms after ${fault.kind} of ${wid} (lease ${leaseMs} ms)`,
            );
          }
        }
      }
    }
    figures.reclaimMs.push(worst);
  }
  for (const c of allClaims) {
    if (c.endType === 'task.completed') continue;
    const lateDone = (byEntity.get(c.taskId) ?? []).some(
      (e) =>
        e.type === 'task.completed' &&
        e.data.attempt === c.attempt &&
        e.data.workerId === c.workerId,
    );
    if (lateDone) figures.staleWorkerCompletions++;
  }

  // (8) every published event reached the stream once, each entity's in seq order.
  const dbById = new Map(ev.events.map((e) => [e.event_id, e]));
  /** Where each event id stands in the stream: its first sequence. */
  const streamSeqOf = new Map<string, number>();
  const streamBySeq = new Map<number, StreamMessage>();
  for (const m of ev.stream) {
    streamBySeq.set(m.seq, m);
    if (m.msgId !== m.eventId) {
      cap('8', `stream seq ${m.seq}: Nats-Msg-Id ${m.msgId ?? '(none)'}, body event ${m.eventId}`);
    }
    const prior = streamSeqOf.get(m.eventId);
    if (prior !== undefined) {
      cap('8', `event ${m.eventId} is in the stream twice (seq ${prior} and ${m.seq})`);
    } else streamSeqOf.set(m.eventId, m.seq);
    const e = dbById.get(m.eventId);
    if (!e) cap('8', `stream seq ${m.seq} holds event ${m.eventId}, unknown to Postgres`);
    else if (e.entity_id !== m.entityId || e.seq !== m.entitySeq) {
      cap(
        '8',
        `stream seq ${m.seq}: event ${m.eventId} as ${m.entityId}#${m.entitySeq}, Postgres has ${e.entity_id}#${e.seq}`,
      );
    }
  }
  for (const e of ev.events) {
    const at = streamSeqOf.get(e.event_id);
    if (!e.published) {
      cap(
        '8',
        `${e.entity_id} seq ${e.seq} (${e.type}) is not published (after the relay cursor, or held)`,
      );
    } else if (at === undefined) {
      cap(
        '8',
        `${e.entity_id} seq ${e.seq} (${e.type}): published per the relay, not in the stream`,
      );
    }
    if (e.held_seq !== null && streamBySeq.get(e.held_seq)?.eventId !== e.event_id) {
      cap(
        '8',
        `${e.entity_id} seq ${e.seq}: relay_held recorded stream seq ${e.held_seq}, which holds ${streamBySeq.get(e.held_seq)?.eventId ?? 'nothing'}`,
      );
    }
  }
  // Per entity the stream holds a prefix of its log, in seq order: no event is in the stream
  // before an earlier one of its entity, nor while an earlier one is not.
  for (const [id, list] of byEntity) {
    let last: { seq: number; at: number } | null = null;
    let missing: number | null = null;
    for (const e of list) {
      const at = streamSeqOf.get(e.event_id);
      if (at === undefined) {
        missing ??= e.seq;
        continue;
      }
      if (missing !== null) {
        cap('8', `${id}: seq ${e.seq} is in the stream (seq ${at}), seq ${missing} is not`);
        missing = null;
      }
      if (last && at <= last.at) {
        cap(
          '8',
          `${id}: seq ${e.seq} is at stream seq ${at}, before seq ${last.seq} (stream seq ${last.at})`,
        );
      }
      last = { seq: e.seq, at };
    }
  }
  if (ev.relayStreamSeq > ev.streamLastSeq) {
    cap(
      '8',
      `relay_cursor.stream_seq ${ev.relayStreamSeq} is beyond the stream's last sequence ${ev.streamLastSeq}`,
    );
  }

  // SSE: each reader, across its reconnects, saw every event-log position once and in order
  // (an SSE id is the event's `pos`; the live feed serves the log, not stream positions).
  const eventByPos = new Map(ev.events.map((e) => [Number(e.pos), e]));
  const positions = ev.events.map((e) => Number(e.pos)).sort((a, b) => a - b);
  for (const r of sse) {
    for (const d of r.disorder.slice(0, 20)) cap('sse', `reader ${r.reader}: ${d}`);
    const seen = new Set<number>();
    let max = 0;
    for (const fr of r.frames) {
      if (seen.has(fr.id)) continue;
      seen.add(fr.id);
      max = Math.max(max, fr.id);
      const e = eventByPos.get(fr.id);
      if (!e) cap('sse', `reader ${r.reader}: id ${fr.id} is not a position of the event log`);
      else if (e.entity_id !== fr.entityId || e.seq !== fr.seq) {
        cap(
          'sse',
          `reader ${r.reader}: id ${fr.id} was ${fr.entityId}#${fr.seq}, the log holds ${e.entity_id}#${e.seq}`,
        );
      }
    }
    let missing = 0;
    let firstMissing = 0;
    for (const pos of positions) {
      if (pos > max) break;
      if (!seen.has(pos)) {
        missing++;
        firstMissing ||= pos;
      }
    }
    if (missing > 0) {
      cap(
        'sse',
        `reader ${r.reader}: ${missing} log positions ≤ ${max} never delivered (first ${firstMissing})`,
      );
    }
  }

  return { findings: f, figures };
}

/**
 * The ticket whose last event came last, told in a line: when it started and ended relative
 * to `settleStart`, and what made it long (failed attempts, retries, send-backs, phases).
 * A slow settle then says whether it was a long but legal chain or something that waited.
 */
export function lastToSettle(evidence: Evidence, settleStart: number): string | null {
  const ticketOf = new Map(evidence.tasks.map((t) => [t.id, t.ticket_id]));
  const span = new Map<string, { first: number; last: number; types: Map<string, number> }>();
  for (const e of evidence.events) {
    const ticket = e.entity_type === 'ticket' ? e.entity_id : ticketOf.get(e.entity_id);
    if (!ticket) continue;
    const s = span.get(ticket) ?? { first: e.at_ms, last: e.at_ms, types: new Map() };
    s.first = Math.min(s.first, e.at_ms);
    s.last = Math.max(s.last, e.at_ms);
    s.types.set(e.type, (s.types.get(e.type) ?? 0) + 1);
    span.set(ticket, s);
  }
  let id: string | null = null;
  for (const [t, s] of span) if (id === null || s.last > (span.get(id)?.last ?? 0)) id = t;
  if (id === null) return null;
  const s = span.get(id) as { first: number; last: number; types: Map<string, number> };
  const ticket = evidence.tickets.find((t) => t.id === id);
  const rel = (ms: number) => `${((ms - settleStart) / 1000).toFixed(1)} s`;
  const count = (type: string) => s.types.get(type) ?? 0;
  return (
    `last ticket to settle: ${id} (${ticket?.workflow ?? '?'}, ${ticket?.state ?? '?'}), ` +
    `first event at ${rel(s.first)} and last at ${rel(s.last)} from the settle's start; ` +
    `${count('task.created')} tasks, ${count('task.retry_scheduled')} retries, ` +
    `${count('task.failed')} failed, ${count('task.lease_expired')} lease expiries, ` +
    `${count('ticket.phase_changed')} phase changes`
  );
}
