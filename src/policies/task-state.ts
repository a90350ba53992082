/**
 * Rule: a task settled or reopened → its ticket learns the task's state and seq
 * (`TASK_STATE`), read from Postgres at that moment (never a state a message claims). News is
 * sent only when it is newer than what the ticket was told (its `ticket_tasks` row, updated in
 * the same transaction) and changes the task's settlement (`settlementOf`: open, completed,
 * failed, cancelled; the ticket's guards read nothing finer), so redeliveries, reordering and
 * the reconciler never double-count, and a task's claim and start cost its ticket nothing; the
 * ticket's own guards advance or block it, exactly once. Across transactions only: the
 * ticket's row is not locked by the task's transition, which keeps claims and completions
 * from queueing on their ticket.
 */
import type { DecideEvent } from '../actors/decide.js';
import type { Applied, UnitOfWork } from '../actors/host.js';
import { NotFound, VersionConflict } from '../errors.js';
import { settlementOf } from '../machines/task.js';
import { loadActorRow } from '../persistence/actor-rows.js';
import type { Db } from '../persistence/db.js';
import {
  type TaskProgress,
  tasksProgressTold,
  ticketIdsOfTasks,
} from '../persistence/reaction-rows.js';
import {
  type NewsItem,
  newsRowsChanged,
  type TaskNews,
  writeTasksNews,
} from '../persistence/ticket-task-rows.js';

export async function forwardTaskState(uow: UnitOfWork, taskId: string): Promise<Applied | null> {
  const [applied] = await forwardTaskStates(uow, [taskId]);
  return applied ?? null;
}

/**
 * The news of several tasks (of any tickets) in one unit of work: each ticket is told in the
 * order its tasks are first listed, as `forwardTicketNews` tells one ticket (each task's
 * state read once under the ticket's lock, however many of its events are listed). Same
 * outcome as each task's news told alone.
 */
export async function forwardTaskStates(
  uow: UnitOfWork,
  taskIds: readonly string[],
): Promise<Applied[]> {
  const ids = [...new Set(taskIds)];
  const tickets = await ticketIdsOfTasks(uow.tx, ids);
  // By ticket, in the order its tasks are first listed.
  const byTicket = new Map<string, string[]>();
  for (const id of ids) {
    const ticketId = tickets.get(id);
    if (ticketId === undefined) continue;
    const list = byTicket.get(ticketId) ?? [];
    list.push(id);
    byTicket.set(ticketId, list);
  }
  const out: Applied[] = [];
  for (const [ticketId, list] of byTicket)
    out.push(...(await forwardTicketNews(uow, ticketId, list)));
  return out;
}

/**
 * The news of tasks of one ticket (the task_state reaction's key: every task event states
 * its ticket), as `forwardTaskStates` tells it, in two round trips: the ticket's lock with
 * the tasks' states and what the ticket was told of them, then the news recorded together
 * with the ticket's transition. Tasks of another ticket are left out.
 */
export async function forwardTicketNews(
  uow: UnitOfWork,
  ticketId: string,
  taskIds: readonly string[],
  options: {
    /**
     * The tasks that may be told, when that is still being found out in this transaction (a
     * check sent ahead on its connection): the reads go out without waiting for it.
     */
    only?: Promise<readonly string[]>;
    /**
     * The caller's unit of work sends nothing after this: its transaction may commit right
     * behind the ticket's write (`UnitOfWork.sendAccepted`).
     */
    last?: boolean;
  } = {},
): Promise<Applied[]> {
  const ids = [...new Set(taskIds)];
  if (ids.length === 0) return [];
  // Both statements go out together on the transaction's connection and run in that order:
  // the ticket's row is locked first, so the `ticket_tasks` rows read after it are final
  // until commit (every writer of them holds the ticket's lock: this, and the task's
  // creation, which writes its ticket).
  uow.host.forget('ticket', ticketId);
  const [row, progress, allowed] = await Promise.all([
    loadActorRow(uow.tx, 'ticket', ticketId, { forUpdate: true }),
    tasksProgressTold(uow.tx, ids),
    options.only ?? ids,
  ]);
  if (!row) return [];
  uow.adopt(row);
  const may = new Set(allowed);
  const news: NewsItem[] = [];
  const events: DecideEvent[] = [];
  for (const id of ids) {
    if (!may.has(id)) continue;
    const task = progress.get(id);
    if (task?.ticketId !== ticketId || !task.told || task.told.seq >= task.seq) continue;
    const { phase, round, type, state } = task.told;
    // Open to open (claimed, started, retried...) is nothing the ticket decides on: it is
    // told when the task settles, from the state it was last told.
    if (settlementOf(state) === settlementOf(task.state)) continue;
    news.push({ taskId: id, state: task.state, seq: task.seq });
    events.push(taskStateEvent(id, task, { phase, round, type, from: state }));
  }
  if (events.length === 0) return [];
  // Queued before the ticket's transition on the same connection: one round trip for both.
  // Rows changed after they were read (a writer without the ticket's lock) fail the statement:
  // a lost race like any other, so the unit of work rolls back and runs again.
  const written = writeTasksNews(uow.tx, news).catch((error: unknown) => {
    throw newsRowsChanged(error) ? new VersionConflict(ticketId, row.version) : error;
  });
  written.catch(() => {});
  const out = await sendNews(uow, ticketId, events, options.last === true);
  await written;
  return out;
}

/** The ticket's TASK_STATE events, as runs of events written once each (`sendAccepted`). */
async function sendNews(
  uow: UnitOfWork,
  ticketId: string,
  events: DecideEvent[],
  last: boolean,
): Promise<Applied[]> {
  const out: Applied[] = [];
  while (events.length > 0) {
    let sent: { applied: Applied[]; taken: number };
    try {
      // With `last`, the unit's last write once it takes every event left: the transaction
      // may commit behind it (the news statement checks itself in SQL).
      sent = await uow.sendAccepted('ticket', ticketId, events, { last });
    } catch (error) {
      if (error instanceof NotFound) return out;
      throw error;
    }
    out.push(...sent.applied);
    events.splice(0, sent.taken);
  }
  return out;
}

/**
 * The ticket each task reports to, by task id: the key the task_state reaction groups news
 * by. A task never changes ticket, so the answer may be kept.
 */
export function ticketsOfTasks(db: Db, taskIds: string[]): Promise<Map<string, string>> {
  return ticketIdsOfTasks(db, taskIds);
}

function taskStateEvent(taskId: string, task: TaskProgress, news: TaskNews): DecideEvent {
  return {
    type: 'TASK_STATE',
    taskId,
    phase: news.phase,
    round: news.round,
    taskType: news.type,
    from: news.from,
    state: task.state,
    seq: task.seq,
    // A failure's reason is what an onFail send-back hands the phase's next tasks.
    ...(task.state === 'failed' && task.error !== null ? { error: task.error } : {}),
  };
}
