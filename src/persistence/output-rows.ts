/**
 * Task output rows (`task_output`, `task_output_totals`). A write locks the tasks it writes
 * for (FOR SHARE: a state change of the task waits for it, so output accepted before a task
 * went final is committed before anyone can see it final), takes a range of seqs from the
 * totals row, inserts every chunk in one statement, trims to the cap from the oldest kept
 * seq, and notifies listeners with `taskId:lastSeq` after commit.
 */
import type { Db, Sql, Tx } from './db.js';

export const OUTPUT_CHANNEL = 'task_output';
export const OUTPUT_STREAMS = ['stdout', 'stderr', 'log'] as const;
export type OutputStream = (typeof OUTPUT_STREAMS)[number];

export interface OutputChunk {
  seq: number;
  attempt: number;
  stream: OutputStream;
  text: string;
  at: string;
}

/** What a write needs to know of a task: its state, live token and attempt. */
export interface OutputFence {
  id: string;
  state: string;
  token: string | null;
  attempt: number;
  /** The snapshot, only for tasks outside claimed/running (to name the allowed events). */
  snapshot: Record<string, unknown> | null;
}

/** Locks the tasks' rows for the rest of the transaction (in id order) and reads them. */
export async function lockTasksForOutput(tx: Tx, ids: string[]): Promise<OutputFence[]> {
  return tx<OutputFence[]>`
    select id, state, snapshot->'context'->>'token' as token,
      coalesce((snapshot->'context'->>'attempt')::int, 0) as attempt,
      case when state in ('claimed', 'running') then null else snapshot end as snapshot
    from tasks where id = any(${ids}::text[]) order by id for share`;
}

export interface OutputInsert {
  taskId: string;
  attempt: number;
  stream: OutputStream;
  text: string;
  bytes: number;
}

export interface TaskAppend {
  taskId: string;
  /** The seq the task's first chunk of this batch got. */
  firstSeq: number;
  lastSeq: number;
  /** Bytes kept after the write, before trimming. */
  bytes: number;
  keptFrom: number;
}

/**
 * Appends `rows` (each task's in the order given) in one insert; returns each task's range
 * and each row's seq. Totals rows are taken in task id order, so concurrent batches that
 * share tasks cannot deadlock.
 */
export async function appendOutput(
  tx: Tx,
  rows: OutputInsert[],
  at: Date,
): Promise<{ appends: TaskAppend[]; seqs: number[] }> {
  const perTask = new Map<string, { n: number; bytes: number }>();
  for (const r of rows) {
    const t = perTask.get(r.taskId) ?? { n: 0, bytes: 0 };
    t.n++;
    t.bytes += r.bytes;
    perTask.set(r.taskId, t);
  }
  const ids = [...perTask.keys()].sort();
  const totals = await tx<
    { task_id: string; last_seq: number; bytes: number; first_seq: number }[]
  >`
    insert into task_output_totals as t (task_id, last_seq, bytes)
    select * from unnest(${ids}::text[], ${ids.map((id) => perTask.get(id)!.n)}::bigint[],
      ${ids.map((id) => perTask.get(id)!.bytes)}::bigint[])
    on conflict (task_id) do update
      set last_seq = t.last_seq + excluded.last_seq, bytes = t.bytes + excluded.bytes
    returning task_id, last_seq, bytes, first_seq`;
  const ranges = new Map<string, TaskAppend>();
  for (const t of totals) {
    const n = perTask.get(t.task_id)!.n;
    ranges.set(t.task_id, {
      taskId: t.task_id,
      firstSeq: t.last_seq - n + 1,
      lastSeq: t.last_seq,
      bytes: t.bytes,
      keptFrom: t.first_seq,
    });
  }
  const next = new Map<string, number>();
  const seqs = rows.map((r) => {
    const s = next.get(r.taskId) ?? ranges.get(r.taskId)!.firstSeq;
    next.set(r.taskId, s + 1);
    return s;
  });
  await tx`
    insert into task_output (task_id, seq, attempt, stream, text, bytes, at)
    select u.task_id, u.seq, u.attempt, u.stream, u.text, u.bytes, ${at}
    from unnest(${rows.map((r) => r.taskId)}::text[], ${seqs}::bigint[],
      ${rows.map((r) => r.attempt)}::int[], ${rows.map((r) => r.stream)}::text[],
      ${rows.map((r) => r.text)}::text[], ${rows.map((r) => r.bytes)}::int[])
      as u (task_id, seq, attempt, stream, text, bytes)`;
  return { appends: ids.map((id) => ranges.get(id)!), seqs };
}

const TRIM_PAGE = 500;

/**
 * Deletes a task's oldest chunks until it holds at most `maxBytes`. It walks forward from
 * the oldest kept seq, so the rows it reads are about the rows it deletes: over a task's
 * life, trimming reads each chunk once, never the whole output per write.
 */
export async function trimOutput(
  tx: Tx,
  append: TaskAppend,
  maxBytes: number,
): Promise<{ removed: number; cut: number } | null> {
  const excess = append.bytes - maxBytes;
  if (excess <= 0) return null;
  let removed = 0;
  let cut = append.keptFrom - 1;
  while (removed < excess) {
    const page = await tx<{ seq: number; bytes: number }[]>`
      select seq, bytes from task_output
      where task_id = ${append.taskId} and seq > ${cut}
      order by seq limit ${TRIM_PAGE}`;
    if (page.length === 0) break;
    for (const row of page) {
      if (removed >= excess) break;
      removed += row.bytes;
      cut = row.seq;
    }
  }
  await tx`delete from task_output
    where task_id = ${append.taskId} and seq >= ${append.keptFrom} and seq <= ${cut}`;
  await tx`update task_output_totals
    set bytes = bytes - ${removed}, first_seq = ${cut + 1}, truncated = true
    where task_id = ${append.taskId}`;
  return { removed, cut };
}

/** Tells every process's listeners which tasks have output up to which seq (at commit). */
export async function notifyOutput(tx: Tx, appends: TaskAppend[]): Promise<void> {
  const payloads = appends.map((a) => `${a.taskId}:${a.lastSeq}`);
  await tx`select pg_notify(${OUTPUT_CHANNEL}, p) from unnest(${payloads}::text[]) as p`;
}

/** A page of a task's output after `after`, oldest first. */
export async function readOutput(
  db: Db,
  taskId: string,
  after: number,
  limit: number,
): Promise<OutputChunk[]> {
  const rows = await db<(Omit<OutputChunk, 'at'> & { at: Date })[]>`
    select seq, attempt, stream, text, at
    from task_output where task_id = ${taskId} and seq > ${after}
    order by seq limit ${limit}`;
  return rows.map((r) => ({ ...r, at: r.at.toISOString() }));
}

export interface OutputHead {
  /** The task's state; null when there is no such task. */
  state: string | null;
  lastSeq: number;
  truncated: boolean;
}

/** A task's state and output totals, in one lookup. */
export async function outputHead(db: Db, taskId: string): Promise<OutputHead> {
  const [row] = await db<{ state: string; last_seq: number | null; truncated: boolean | null }[]>`
    select t.state, o.last_seq, o.truncated from tasks t
    left join task_output_totals o on o.task_id = t.id where t.id = ${taskId}`;
  return {
    state: row?.state ?? null,
    lastSeq: row?.last_seq ?? 0,
    truncated: row?.truncated ?? false,
  };
}

/** The same for many tasks at once (the live streams' periodic check). */
export async function outputHeads(sql: Sql, ids: string[]): Promise<Map<string, OutputHead>> {
  const rows = await sql<
    { id: string; state: string; last_seq: number | null; truncated: boolean | null }[]
  >`
    select t.id, t.state, o.last_seq, o.truncated from tasks t
    left join task_output_totals o on o.task_id = t.id where t.id = any(${ids}::text[])`;
  return new Map(
    rows.map((r) => [
      r.id,
      { state: r.state, lastSeq: r.last_seq ?? 0, truncated: r.truncated ?? false },
    ]),
  );
}
