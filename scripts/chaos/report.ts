/** The table a chaos run prints: load held, faults and recovery, work, and violations. */
import type { CheckFigures, EventRow, Findings } from './check.js';
import { GUARANTEES } from './check.js';
import type { Fault } from './faults.js';
import type { ApiStats, LoadCounters, SseRecord } from './load.js';

export interface ReportInput {
  seed: number;
  durationS: number;
  settleMs: number | null;
  api: ApiStats;
  load: LoadCounters;
  sse: SseRecord[];
  faults: Fault[];
  faultErrors: string[];
  figures: CheckFigures;
  findings: Findings;
  events: EventRow[];
  /** Outbox samples: [time, rows, age of the oldest row in ms]. */
  outbox: [number, number, number][];
  /** Things worth knowing that are not violations (e.g. starts that failed and were retried). */
  notes: string[];
}

function table(headers: string[], rows: (string | number)[][]): string {
  const cells = [headers, ...rows.map((r) => r.map(String))];
  const widths = headers.map((_, i) => Math.max(...cells.map((r) => (r[i] ?? '').length)));
  const line = (r: string[]) =>
    `  ${r.map((c, i) => (i === 0 ? c.padEnd(widths[i] ?? 0) : c.padStart(widths[i] ?? 0))).join('  ')}`;
  const rule = `  ${widths.map((w) => '-'.repeat(w)).join('  ')}`;
  return [line(headers), rule, ...cells.slice(1).map(line)].join('\n');
}

const ms = (v: number | null | undefined) =>
  v === null || v === undefined ? '-' : `${Math.round(v)} ms`;
const sum = (m: Map<string, number>) => [...m.values()].reduce((a, b) => a + b, 0);
const fmt = (m: Map<string, number>) =>
  [...m.entries()]
    .sort()
    .map(([k, v]) => `${k} ${v}`)
    .join(', ');

function firstAfter(sorted: number[], t: number): number | null {
  let lo = 0;
  let hi = sorted.length;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if ((sorted[mid] ?? 0) <= t) lo = mid + 1;
    else hi = mid;
  }
  return sorted[lo] ?? null;
}

export function render(r: ReportInput): string {
  const out: string[] = [];
  const okTimes = [...r.api.okTimes].sort((a, b) => a - b);
  const completions = r.events
    .filter((e) => e.type === 'task.completed')
    .map((e) => e.at_ms)
    .sort((a, b) => a - b);
  const advances = r.events
    .filter((e) => e.type === 'ticket.phase_changed' || e.type === 'ticket.done')
    .map((e) => e.at_ms)
    .sort((a, b) => a - b);

  out.push('');
  out.push(
    `CHAOS REPORT  (seed ${r.seed}, load ${r.durationS} s, settled ${r.settleMs === null ? 'NOT within the timeout' : `in ${(r.settleMs / 1000).toFixed(1)} s`})`,
  );
  out.push('');
  out.push('Load held');
  const tries = r.api.ok + r.api.refused + r.api.failedTries;
  out.push(
    table(
      ['requests', 'count'],
      [
        ['answered 2xx', r.api.ok],
        ['answered 4xx (stale token, illegal: expected under faults)', r.api.refused],
        ['tries without an answer or 5xx (retried)', r.api.failedTries],
        ['requests given up after retries', r.api.gaveUp],
        [
          'share of tries answered',
          `${((100 * (r.api.ok + r.api.refused)) / Math.max(1, tries)).toFixed(1)} %`,
        ],
        ['by status', fmt(r.api.byStatus)],
      ],
    ),
  );
  const reasons = [...r.api.failures.entries()].sort((a, b) => b[1] - a[1]).slice(0, 6);
  if (reasons.length > 0) {
    out.push(`  failed tries: ${reasons.map(([k, v]) => `${v}× ${k}`).join('; ')}`);
  }
  out.push('');
  const l = r.load;
  out.push(
    table(
      ['work', 'count'],
      [
        ['tickets started', l.ticketsStarted],
        ['tickets done (seen by their drivers)', l.ticketsDone],
        ['tickets cancelled on the way', l.ticketsCancelled],
        [
          'tickets unblocked (after requeue)',
          `${l.ticketsUnblocked} (${l.tasksRequeued} tasks requeued)`,
        ],
        [
          'workflow tickets (gates approved / rejected, reviews failed)',
          `${l.workflowTickets} (${l.gatesApproved} / ${l.gatesRejected}, ${l.reviewsFailed})`,
        ],
        ['tasks added', l.tasksAdded],
        [
          'agent claims / completes / stale / abandoned',
          `${l.agentClaims} / ${l.agentCompletes} / ${l.agentStale} / ${l.agentAbandoned}`,
        ],
        ['SSE sessions / frames', `${l.sseSessions} / ${l.sseFrames}`],
        ['driver errors', l.driverErrors],
        ['tickets by state', fmt(r.figures.ticketsByState)],
        ['tasks by state', `${fmt(r.figures.tasksByState)} (total ${sum(r.figures.tasksByState)})`],
        ['events in Postgres / in the stream', `${r.figures.events} / ${r.figures.streamMessages}`],
        ['shell executions (marker file)', r.figures.markerExecutions],
        ['lease expiries', r.figures.leaseExpiries],
        [
          'runs of one task overlapping after a lease loss (fenced)',
          r.figures.overlappingAfterLeaseLoss,
        ],
        ['dead letters', r.figures.deadLetters],
      ],
    ),
  );
  out.push('');
  out.push('Faults injected and recovery (times from the fault)');
  const byKind = new Map<string, number>();
  for (const f of r.faults) byKind.set(f.kind, (byKind.get(f.kind) ?? 0) + 1);
  out.push(
    `  by kind: ${fmt(byKind) || 'none'}${r.faultErrors.length ? `; failed to inject: ${r.faultErrors.join('; ')}` : ''}`,
  );
  const t0 = r.faults[0]?.at ?? 0;
  out.push(
    table(
      [
        'fault',
        'at',
        'target',
        'healed',
        'next 2xx',
        'next completion',
        'next advance',
        'held tasks reclaimed',
        'longest outbox wait',
      ],
      r.faults.map((f, i) => {
        const nextOk = firstAfter(okTimes, f.at);
        const nextDone = firstAfter(completions, f.at);
        const nextAdv = firstAfter(advances, f.at);
        // The longest any event waited in the outbox until the next fault (or 40 s).
        const until = Math.min(r.faults[i + 1]?.at ?? Number.POSITIVE_INFINITY, f.at + 40_000);
        let oldest: number | null = null;
        for (const [t, , age] of r.outbox) {
          if (t >= f.at && t < until) oldest = Math.max(oldest ?? 0, age);
        }
        return [
          `${i + 1}. ${f.kind}`,
          `+${((f.at - t0) / 1000).toFixed(1)} s`,
          `${f.target} (${f.detail})`,
          ms(f.healedAt - f.at),
          ms(nextOk === null ? null : nextOk - f.at),
          ms(nextDone === null ? null : nextDone - f.at),
          ms(nextAdv === null ? null : nextAdv - f.at),
          ms(r.figures.reclaimMs[i]),
          ms(oldest),
        ];
      }),
    ),
  );
  out.push('');
  out.push('Guarantees (CONTRACT section 4): violations found');
  out.push(
    table(
      ['guarantee', 'violations'],
      GUARANTEES.map(([id, label]) => [`(${id}) ${label}`, r.findings.count(id)]),
    ),
  );
  for (const [id, label] of GUARANTEES) {
    const list = r.findings.byGuarantee.get(id) ?? [];
    if (list.length === 0) continue;
    out.push('');
    out.push(`  (${id}) ${label}:`);
    for (const m of list.slice(0, 15)) out.push(`    - ${m}`);
    if (list.length > 15) out.push(`    … and ${list.length - 15} more`);
  }
  if (r.notes.length > 0) {
    out.push('');
    out.push('Notes');
    for (const n of r.notes) out.push(`  - ${n}`);
  }
  out.push('');
  out.push(
    r.findings.total === 0 ? 'RESULT: no violations' : `RESULT: ${r.findings.total} violation(s)`,
  );
  return out.join('\n');
}
