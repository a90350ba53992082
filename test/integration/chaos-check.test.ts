/**
 * The chaos run's workflow checks, on hand-made event logs of a `feature` ticket: a legal
 * log (gates rejected up to maxLoops, templates per entry, a dependency honoured) finds
 * nothing in any guarantee, and each broken variant is found by its own check.
 */
import { readFileSync } from 'node:fs';
import { describe, expect, it } from 'vitest';
import { check, type EventRow, type Evidence } from '../../scripts/chaos/check.js';
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
      stream_seq: this.pos,
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
    const attemptOf = (id: string) =>
      this.events.some((e) => e.entity_id === id && e.type === 'task.claimed') ? 1 : 0;
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
        eventId: e.event_id,
        entityId: e.entity_id,
        entitySeq: e.seq,
      })),
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

/** A feature ticket approved into build, its tests waiting on its code, then cancelled. */
function built(testsFirst: boolean): { log: Log; deps: Evidence['dependencies'] } {
  const log = new Log();
  log.add(T, 'ticket.created', {});
  const [spec] = log.enter('ticket.phase_changed', { from: 'backlog', to: 'plan' });
  log.run(spec as string);
  log.enter('ticket.phase_changed', { from: 'plan', to: 'plan_review' });
  log.add(T, 'ticket.approved', { phase: 'plan_review', by: 'x' });
  const [code, tests] = log.enter('ticket.phase_changed', { from: 'plan_review', to: 'build' });
  const release = () => log.add(tests as string, 'task.ready', {});
  if (testsFirst) {
    release();
    log.run(tests as string);
    log.run(code as string);
  } else {
    log.run(code as string);
    release();
    log.run(tests as string);
  }
  log.add(T, 'ticket.cancelled', { phase: 'build' });
  return { log, deps: [{ task_id: tests as string, depends_on: code as string }] };
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
