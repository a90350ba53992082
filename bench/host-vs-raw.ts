/**
 * Transitions through the actor host against the same SQL statements issued raw through
 * the same driver, at the same concurrency, in the same run: the ratio is what the host's
 * decide step, cache and bookkeeping cost.
 *
 * The workload: each of N concurrent entities (tickets in a phase) alternates BLOCK and
 * UNBLOCK. Each transition writes the snapshot (compare-and-set), one event-log row (the
 * event log is the outbox), and deletes or re-arms the stuck-check timer, exactly as below.
 */
import { randomUUID } from 'node:crypto';
import { decide, decideInitial } from '../src/actors/decide.js';
import { ActorHost, type HostOptions } from '../src/actors/host.js';
import type { Sql } from '../src/persistence/db.js';
import { type LatencyStats, loop } from './stats.js';

export interface RunResult extends LatencyStats {
  label: string;
  concurrency: number;
}

export async function benchHost(
  sql: Sql,
  concurrency: number,
  durationMs: number,
  options: Partial<HostOptions> = {},
): Promise<LatencyStats> {
  return (await prepareHost(sql, concurrency, options))(durationMs);
}

export async function benchRawMinimal(
  sql: Sql,
  concurrency: number,
  durationMs: number,
): Promise<LatencyStats> {
  return (await prepareRawMinimal(sql, concurrency))(durationMs);
}

export async function benchRaw(
  sql: Sql,
  concurrency: number,
  durationMs: number,
): Promise<LatencyStats> {
  return (await prepareRaw(sql, concurrency))(durationMs);
}

/** `n` tickets in their first phase, ready to alternate BLOCK and UNBLOCK. */
async function startedTickets(host: ActorHost, n: number, prefix: string): Promise<string[]> {
  const ids: string[] = [];
  for (let i = 0; i < n; i++) {
    const t = await host.create('ticket', {
      id: `${prefix}-${randomUUID()}`,
      title: 'bench',
      stuckAfterMs: 3_600_000,
      diagnosticCooldownMs: 0,
    });
    await host.send('ticket', t.id, { type: 'START' });
    ids.push(t.id);
  }
  return ids;
}

/** Creates the host and its entities; the returned function runs the timed loop. */
export async function prepareHost(
  sql: Sql,
  concurrency: number,
  /** Host settings (group commit's `commitLanes`, `commitBatchMax`); defaults otherwise. */
  options: Partial<HostOptions> = {},
): Promise<(durationMs: number) => Promise<LatencyStats & { samples: number[] }>> {
  const host = new ActorHost(sql, {
    taskDefaults: { maxAttempts: 3, leaseMs: 30_000, retryBaseMs: 1_000 },
    ...options,
  });
  const ids = await startedTickets(host, concurrency, 'bench-host');
  // By each entity's state, not the loop's index: a warm-up run may stop on either.
  const blocked = ids.map(() => false);
  return warmed((durationMs) =>
    loop(concurrency, durationMs, async (w) => {
      const id = ids[w] as string;
      await host.send(
        'ticket',
        id,
        blocked[w] ? { type: 'UNBLOCK' } : { type: 'BLOCK', reason: 'bench' },
      );
      blocked[w] = !blocked[w];
    }),
  );
}

/** How long each side runs untimed first, so that neither is measured while it warms up. */
export const WARM_UP_MS = 1_000;

/**
 * The timed loop after an untimed one of WARM_UP_MS: the host's decide path and the raw
 * statements alike are measured compiled, with their connections open and statements
 * prepared, instead of whichever runs first paying for it.
 */
function warmed<R>(run: (durationMs: number) => Promise<R>): (durationMs: number) => Promise<R> {
  let warm = false;
  return async (durationMs) => {
    if (!warm) {
      await run(WARM_UP_MS);
      warm = true;
    }
    return run(durationMs);
  };
}

/** The same statements, hand-written: what a careful raw-SQL implementation would issue. */
export function prepareRaw(
  sql: Sql,
  concurrency: number,
): Promise<(durationMs: number) => Promise<LatencyStats & { samples: number[] }>> {
  return prepareRawTransitions(sql, concurrency, { timers: true });
}

/**
 * The minimal transition: the snapshot compare-and-set and the event insert, one transaction
 * per transition, nothing else (no timer). The floor any host could reach without batching;
 * the host's target is measured against it.
 */
export function prepareRawMinimal(
  sql: Sql,
  concurrency: number,
): Promise<(durationMs: number) => Promise<LatencyStats & { samples: number[] }>> {
  return prepareRawTransitions(sql, concurrency, { timers: false });
}

async function prepareRawTransitions(
  sql: Sql,
  concurrency: number,
  o: { timers: boolean },
): Promise<(durationMs: number) => Promise<LatencyStats & { samples: number[] }>> {
  const rows: { id: string; version: number; seq: number; snapshot: object }[] = [];
  for (let w = 0; w < concurrency; w++) {
    const id = `bench-${o.timers ? 'raw' : 'min'}-${randomUUID()}`;
    // The same snapshot the host stores, so both sides write the same bytes.
    const initial = decideInitial('ticket', {
      id,
      title: 'bench',
      stuckAfterMs: 3_600_000,
      diagnosticCooldownMs: 0,
      at: Date.now(),
    });
    const snapshot = decide('ticket', id, initial.snapshot, {
      type: 'START',
      at: Date.now(),
    }).snapshot;
    await sql`insert into tickets (id, state, phase, title, machine_version, snapshot, version, seq, created_at, updated_at)
      values (${id}, 'requirements', 'requirements', 'bench', 1, ${sql.json(snapshot as never)}, 1, 0, now(), now())`;
    rows.push({ id, version: 1, seq: 0, snapshot });
  }
  return warmed((durationMs) =>
    loop(concurrency, durationMs, async (w) => {
      const row = rows[w] as (typeof rows)[number];
      const blocking = row.seq % 2 === 0;
      const state = blocking ? 'blocked' : 'requirements';
      const snapshot = { ...row.snapshot, value: state };
      await sql.begin(async (tx) => {
        const r = await tx`update tickets set state = ${state}, phase = 'requirements',
        snapshot = ${tx.json(snapshot as never)}, version = ${row.version + 1}, seq = ${row.seq + 1},
        updated_at = now() where id = ${row.id} and version = ${row.version}`;
        if (r.count !== 1) throw new Error('conflict');
        await tx`insert into events (event_id, entity_type, entity_id, seq, type, data, at)
        values (${randomUUID()}, 'ticket', ${row.id}, ${row.seq + 1},
          ${blocking ? 'ticket.blocked' : 'ticket.unblocked'}, ${tx.json({ phase: 'requirements' })}, now())
        returning pos, event_id, seq, entity_id, entity_type, type, data, at`;
        if (!o.timers) return;
        if (blocking) {
          await tx`delete from timers where entity_id = ${row.id} and key in ('xstate.after.stuckCheck.ticket.requirements')`;
        } else {
          await tx`insert into timers (entity_type, entity_id, key, event, due_at, token)
          values ('ticket', ${row.id}, 'xstate.after.stuckCheck.ticket.requirements',
            ${tx.json({ type: 'xstate.after.stuckCheck.ticket.requirements' })},
            now() + interval '1 hour', ${randomUUID()})
          on conflict (entity_id, key) do update set event = excluded.event, due_at = excluded.due_at,
            token = excluded.token, locked_until = null`;
          // No timer NOTIFY: the host sends one only after the commit, and only for a timer
          // due within the poll interval (this one is an hour out).
        }
      });
      row.version++;
      row.seq++;
    }),
  );
}

/**
 * The batching experiment of issue 3: the same 64-entity workload, but `perTx` different
 * entities' transitions share one host transaction (one commit, one fsync) through a unit of
 * work. Counts transitions per second, so it compares directly with the lines above.
 */
export async function prepareHostBatched(
  sql: Sql,
  entities: number,
  perTx: number,
): Promise<(durationMs: number) => Promise<LatencyStats & { samples: number[] }>> {
  const host = new ActorHost(sql, {
    taskDefaults: { maxAttempts: 3, leaseMs: 30_000, retryBaseMs: 1_000 },
  });
  const groups: string[][] = [];
  for (let g = 0; g < entities / perTx; g++) {
    groups.push(await startedTickets(host, perTx, 'bench-batch'));
  }
  const blocked = groups.map(() => false);
  return warmed(async (durationMs) => {
    const r = await loop(groups.length, durationMs, async (g) => {
      const ids = groups[g] as string[];
      await host.transact(async (uow) => {
        for (const id of ids) {
          await uow.send(
            'ticket',
            id,
            blocked[g] ? { type: 'UNBLOCK' } : { type: 'BLOCK', reason: 'bench' },
          );
        }
      });
      blocked[g] = !blocked[g];
    });
    // One loop step is `perTx` transitions.
    return { ...r, count: r.count * perTx, perSecond: r.perSecond * perTx };
  });
}
