/**
 * The chaos run's workflow checks, on hand-made event logs of a `feature` ticket: a legal
 * log (gates rejected up to maxLoops, templates per entry, a dependency honoured) finds
 * nothing in any guarantee, and each broken variant is found by its own check. Then the
 * stream checks (guarantee 8) on the same log and a stream that lost, reordered or repeated
 * its events.
 */
import { readFileSync } from 'node:fs';
import { describe, expect, it } from 'vitest';
import {
  check,
  type EventRow,
  type Evidence,
  type StreamMessage,
} from '../../scripts/chaos/check.js';
import type { WorkflowDefinition } from '../../src/machines/workflow-definition.js';

const FEATURE = JSON.parse(
  readFileSync(new URL('../../examples/workflows/feature.json', import.meta.url), 'utf8'),
) as WorkflowDefinition;
const T = 'tkt_1';

class Log {
  readonly events: EventRow[] = [];
  readonly tasks = new Map<string, { phase: string; type: string; state: string }>();
  private pos = 0;
  private readonly seqs = new Map<string, number>();

  add(id: string, type: string, data: Record<string, unknown> = {}): number {
    const seq = (this.seqs.get(id) ?? 0) + 1;
    this.seqs.set(id, seq);
    this.pos++;
    this.events.push({
      pos: this.pos,
      event_id: `e${this.pos}`,
      entity_type: id === T ? 'ticket' : 'task',
      entity_id: id,
      seq,
      type,
      data,
      at_ms: 1_000 + this.pos,
      published: true,
      held_seq: null,
    });
    return seq;
  }

  /** Enters a phase with `event` and creates its template tasks, as the runtime does. */
  enter(type: string, data: Record<string, unknown>, waitOn: string[] = []): string[] {
    const seq = this.add(T, type, data);
    const phase = String(data.to);
    const templates = FEATURE.phases.find((p) => p.name === phase);
    const ids: string[] = [];
    for (const t of templates && 'tasks' in templates ? (templates.tasks ?? []) : []) {
      const id = `${T}-${phase}-${seq}-${t.key}`;
      this.create(id, phase, t.type, (t.dependsOn?.length ?? 0) > 0 && waitOn.length === 0);
      ids.push(id);
    }
    return ids;
  }

  create(id: string, phase: string, type: string, waiting = false): void {
    this.tasks.set(id, { phase, type, state: waiting ? 'waiting' : 'pending' });
    this.add(id, 'task.created', { ticketId: T, phase, type });
    if (waiting) this.add(id, 'task.waiting', { ticketId: T, dependsOn: [] });
  }

  run(id: string): void {
    this.add(id, 'task.claimed', { attempt: 1, workerId: 'w' });
    this.add(id, 'task.started', { attempt: 1, workerId: 'w' });
    this.add(id, 'task.completed', { attempt: 1, workerId: 'w' });
    this.set(id, 'completed');
  }

  set(id: string, state: string): void {
    const t = this.tasks.get(id);
    if (t) t.state = state;
  }

  evidence(ticketState: string, dependencies: Evidence['dependencies'] = []): Evidence {
    // The latest claim's number, as the task row stores it.
    const attemptOf = (id: string) =>
      Math.max(
        0,
        ...this.events
          .filter((e) => e.entity_id === id && e.type === 'task.claimed')
          .map((e) => Number(e.data.attempt)),
      );
    return {
      events: [...this.events].sort((a, b) =>
        a.entity_id === b.entity_id ? a.seq - b.seq : a.entity_id < b.entity_id ? -1 : 1,
      ),
      tickets: [{ id: T, state: ticketState, seq: this.seqs.get(T) ?? 0, workflow: 'feature@1' }],
      tasks: [...this.tasks].map(([id, t]) => ({
        id,
        ticket_id: T,
        type: t.type,
        phase: t.phase,
        state: t.state,
        attempt: attemptOf(id),
        seq: this.seqs.get(id) ?? 0,
        worktree: null,
        executor: 'external',
      })),
      outbox: 0,
      deadLetters: 0,
      stream: this.events.map((e) => ({
        seq: e.pos,
        msgId: e.event_id,
        eventId: e.event_id,
        entityId: e.entity_id,
        entitySeq: e.seq,
      })),
      streamLastSeq: this.pos,
      relayStreamSeq: this.pos,
      markers: [],
      workflows: new Map([['feature@1', FEATURE]]),
      dependencies,
    };
  }
}

const verdict = (ev: Evidence) => {
  const accepted = { tickets: new Set<string>(), tasks: new Map(), events: [], claims: [] };
  return check(ev, accepted, [], [], 2_000).findings;
};

/** A feature ticket rejected `rejects` times at plan_review, then cancelled there. */
function rejected(rejects: number): Log {
  const log = new Log();
  log.add(T, 'ticket.created', {});
  let [spec] = log.enter('ticket.phase_changed', { from: 'backlog', to: 'plan' });
  for (let i = 1; i <= rejects; i++) {
    log.run(spec as string);
    log.enter('ticket.phase_changed', { from: 'plan', to: 'plan_review' });
    log.add(T, 'ticket.rejected', { phase: 'plan_review', by: 'x', reason: 'no' });
    [spec] = log.enter('ticket.sent_back', {
      from: 'plan_review',
      to: 'plan',
      reason: 'no',
      loop: i,
      cause: 'reject',
    });
  }
  log.add(spec as string, 'task.cancelled', {});
  log.set(spec as string, 'cancelled');
  log.add(T, 'ticket.cancelled', { phase: 'plan' });
  return log;
}

/** A feature ticket planned and approved into build: its code task and its tests task. */
function intoBuild(): { log: Log; code: string; tests: string } {
  const log = new Log();
  log.add(T, 'ticket.created', {});
  const [spec] = log.enter('ticket.phase_changed', { from: 'backlog', to: 'plan' });
  log.run(spec as string);
  log.enter('ticket.phase_changed', { from: 'plan', to: 'plan_review' });
  log.add(T, 'ticket.approved', { phase: 'plan_review', by: 'x' });
  const [code, tests] = log.enter('ticket.phase_changed', { from: 'plan_review', to: 'build' });
  return { log, code: code as string, tests: tests as string };
}

/** A feature ticket approved into build, its tests waiting on its code, then cancelled. */
function built(testsFirst: boolean): { log: Log; deps: Evidence['dependencies'] } {
  const { log, code, tests } = intoBuild();
  const release = () => log.add(tests, 'task.ready', {});
  if (testsFirst) {
    release();
    log.run(tests);
    log.run(code);
  } else {
    log.run(code);
    release();
    log.run(tests);
  }
  log.add(T, 'ticket.cancelled', { phase: 'build' });
  return { log, deps: [{ task_id: tests, depends_on: code }] };
}

describe('chaos workflow checks', () => {
  it('find nothing in a legal feature ticket (rejects up to maxLoops, a dependency kept)', () => {
    expect(verdict(rejected(3).evidence('cancelled')).byGuarantee).toEqual(
      verdict(rejected(0).evidence('cancelled')).byGuarantee,
    );
    expect(verdict(rejected(3).evidence('cancelled')).total).toBe(0);
    const { log, deps } = built(false);
    expect(verdict(log.evidence('cancelled', deps)).total).toBe(0);
  });

  it('find a rework past maxLoops', () => {
    const f = verdict(rejected(4).evidence('cancelled'));
    expect(f.byGuarantee.get('loops')).toEqual([
      `${T}: plan_review's rule sent it back 4 times (maxLoops 3)`,
    ]);
  });

  it('find a dependent that ran before its dependency completed', () => {
    const { log, deps } = built(true);
    const f = verdict(log.evidence('cancelled', deps));
    expect(f.count('deps')).toBe(3); // released, claimed and started too early
    expect(f.total).toBe(3);
  });

  it('find a phase entry without its template task, and a template task of no entry', () => {
    const { log, deps } = built(false);
    const ev = log.evidence('cancelled', deps);
    const code = deps[0]?.depends_on as string;
    const without = {
      ...ev,
      tasks: ev.tasks.filter((t) => t.id !== code),
      events: ev.events.filter((e) => e.entity_id !== code),
      stream: ev.stream.filter((m) => m.entityId !== code),
      dependencies: [],
    };
    expect(verdict(without).byGuarantee.get('tpl')).toEqual([
      `${T}: no task ${code} (build/implement) for that phase entry`,
    ]);
    const extra = {
      ...ev,
      tasks: [
        ...ev.tasks,
        { ...(ev.tasks.find((t) => t.id === code) as Evidence['tasks'][0]), id: 'x1' },
      ],
    };
    expect(verdict(extra).byGuarantee.get('tpl')).toEqual([
      `${T}: task x1 (build/implement) belongs to no phase entry`,
    ]);
  });
});

describe('chaos task replay: attempts and failures', () => {
  /** Into build; its code task fails out of attempts and the rule sends the ticket back. */
  function failedInBuild(): { log: Log; code: string } {
    const { log, code, tests } = intoBuild();
    log.add(code, 'task.claimed', { attempt: 1, workerId: 'w' });
    log.add(code, 'task.started', { attempt: 1, workerId: 'w' });
    log.add(code, 'task.failed', { attempt: 1, workerId: 'w' });
    log.set(code, 'failed');
    log.add(tests, 'task.cancelled', {});
    log.set(tests, 'cancelled');
    const rework = log.enter('ticket.sent_back', {
      from: 'build',
      to: 'build',
      reason: 'failed',
      loop: 1,
      cause: 'task_failed',
      taskId: code,
    });
    for (const id of rework) {
      log.add(id, 'task.cancelled', {});
      log.set(id, 'cancelled');
    }
    log.add(T, 'ticket.cancelled', { phase: 'build' });
    return { log, code };
  }

  it('find nothing when a released claim is followed by the next attempt', () => {
    const { log, code } = failedInBuild();
    log.add(code, 'task.requeued', {});
    log.add(code, 'task.claimed', { attempt: 2, workerId: 'w' });
    log.add(code, 'task.released', { attempt: 2, workerId: 'w' });
    log.add(code, 'task.claimed', { attempt: 3, workerId: 'w2' });
    log.add(code, 'task.started', { attempt: 3, workerId: 'w2' });
    log.add(code, 'task.completed', { attempt: 3, workerId: 'w2' });
    log.set(code, 'completed');
    // The send-back's task failed when the ticket was told; an operator requeued it since.
    expect(verdict(log.evidence('cancelled', [])).total).toBe(0);
  });

  it('find a claim that takes an attempt number again', () => {
    const { log, code } = failedInBuild();
    log.add(code, 'task.requeued', {});
    log.add(code, 'task.claimed', { attempt: 1, workerId: 'w' });
    log.add(code, 'task.released', { attempt: 1, workerId: 'w' });
    log.set(code, 'pending');
    const f = verdict(log.evidence('cancelled', []));
    expect(f.byGuarantee.get('4')).toEqual([`${code} seq 6: claim of attempt 1 after attempt 1`]);
  });

  it('find a send-back for a task that had not failed', () => {
    const { log, code } = failedInBuild();
    const ev = log.evidence('cancelled', []);
    // The same log with the failure moved after the send-back.
    const failure = ev.events.find((e) => e.entity_id === code && e.type === 'task.failed');
    if (failure) failure.pos = 10_000;
    const f = verdict(ev);
    expect(f.byGuarantee.get('1')).toEqual([
      `${T} seq 6: sent back for task ${code}, which was running in build`,
    ]);
  });
});

describe('chaos stream checks (guarantee 8)', () => {
  const legal = () => built(false).log.evidence('cancelled', built(false).deps);
  /** The ticket's event of `seq`, and where the stream holds it. */
  const ticketEvent = (ev: Evidence, seq: number) => {
    const e = ev.events.find((x) => x.entity_id === T && x.seq === seq) as EventRow;
    const m = ev.stream.find((x) => x.eventId === e.event_id) as StreamMessage;
    return { e, m };
  };
  const stream8 = (ev: Evidence) => verdict(ev).byGuarantee.get('8');

  it('find nothing when every event is in the stream once, in order', () => {
    expect(stream8(legal())).toEqual([]);
  });

  it('find a published event missing from the stream', () => {
    const ev = legal();
    const { e } = ticketEvent(ev, 2);
    const { m: next } = ticketEvent(ev, 3);
    const lost = { ...ev, stream: ev.stream.filter((m) => m.eventId !== e.event_id) };
    expect(stream8(lost)).toEqual([
      `${T} seq 2 (${e.type}): published per the relay, not in the stream`,
      `${T}: seq 3 is in the stream (seq ${next.seq}), seq 2 is not`,
    ]);
  });

  it('find an event the relay has not published, and one out of turn behind it', () => {
    const ev = legal();
    const last = ev.events.filter((e) => e.entity_id === T).length;
    const { e: tail } = ticketEvent(ev, last);
    const { e: second } = ticketEvent(ev, 2);
    const { m: third } = ticketEvent(ev, 3);
    // The last one still after the cursor, and not in the stream: only the outbox.
    const pending = {
      ...ev,
      events: ev.events.map((e) => (e === tail ? { ...e, published: false } : e)),
      stream: ev.stream.filter((m) => m.eventId !== tail.event_id),
    };
    expect(stream8(pending)).toEqual([
      `${T} seq ${last} (${tail.type}) is not published (after the relay cursor, or held)`,
    ]);
    // Held and not in the stream, while its successor is.
    const held = {
      ...ev,
      events: ev.events.map((e) => (e === second ? { ...e, published: false } : e)),
      stream: ev.stream.filter((m) => m.eventId !== second.event_id),
    };
    expect(stream8(held)).toEqual([
      `${T} seq 2 (${second.type}) is not published (after the relay cursor, or held)`,
      `${T}: seq 3 is in the stream (seq ${third.seq}), seq 2 is not`,
    ]);
  });

  it("find an entity's events out of order in the stream", () => {
    const ev = legal();
    const { m: a } = ticketEvent(ev, 2);
    const { m: b } = ticketEvent(ev, 3);
    // The two swap places: seq 3 first, then seq 2.
    const swapped = {
      ...ev,
      stream: ev.stream
        .map((m) => (m === a ? { ...m, seq: b.seq } : m === b ? { ...m, seq: a.seq } : m))
        .sort((x, y) => x.seq - y.seq),
    };
    expect(stream8(swapped)).toEqual([
      `${T}: seq 3 is at stream seq ${a.seq}, before seq 2 (stream seq ${b.seq})`,
    ]);
    // Seq 2 published again after seq 3: in the stream twice and behind its successor.
    const again = {
      ...ev,
      stream: [...ev.stream, { ...a, seq: ev.streamLastSeq + 1 }],
      streamLastSeq: ev.streamLastSeq + 1,
    };
    expect(stream8(again)).toEqual([
      `event ${a.eventId} is in the stream twice (seq ${a.seq} and ${ev.streamLastSeq + 1})`,
    ]);
  });

  it('find a message of the wrong id or entity, and a sequence Postgres recorded wrongly', () => {
    const ev = legal();
    const { e, m } = ticketEvent(ev, 2);
    const { m: other } = ticketEvent(ev, 3);
    const wrongId = {
      ...ev,
      stream: ev.stream.map((x) => (x === m ? { ...x, msgId: 'zz' } : x)),
    };
    expect(stream8(wrongId)).toEqual([
      `stream seq ${m.seq}: Nats-Msg-Id zz, body event ${m.eventId}`,
    ]);
    const wrongEntity = {
      ...ev,
      stream: ev.stream.map((x) => (x === m ? { ...x, entitySeq: 7 } : x)),
    };
    expect(stream8(wrongEntity)).toEqual([
      `stream seq ${m.seq}: event ${m.eventId} as ${T}#7, Postgres has ${T}#2`,
    ]);
    const heldAt = (seq: number) => ({
      ...ev,
      events: ev.events.map((x) => (x === e ? { ...x, held_seq: seq } : x)),
    });
    expect(stream8(heldAt(m.seq))).toEqual([]);
    expect(stream8(heldAt(other.seq))).toEqual([
      `${T} seq 2: relay_held recorded stream seq ${other.seq}, which holds ${other.eventId}`,
    ]);
  });

  it('find an event unknown to Postgres, and a relay cursor beyond the stream', () => {
    const ev = legal();
    const stranger = {
      seq: ev.streamLastSeq + 1,
      msgId: 'x',
      eventId: 'x',
      entityId: 'y',
      entitySeq: 1,
    };
    expect(
      stream8({ ...ev, stream: [...ev.stream, stranger], streamLastSeq: stranger.seq }),
    ).toEqual([`stream seq ${stranger.seq} holds event x, unknown to Postgres`]);
    expect(stream8({ ...ev, relayStreamSeq: ev.streamLastSeq + 3 })).toEqual([
      `relay_cursor.stream_seq ${ev.streamLastSeq + 3} is beyond the stream's last sequence ${ev.streamLastSeq}`,
    ]);
  });
});
