/**
 * Rule: a task changed state → its ticket learns the task's state and seq (`TASK_STATE`),
 * read from Postgres at that moment (never a state a message claims). News is sent only when
 * it is newer than what the ticket was told (its `ticket_tasks` row, updated in the same
 * transaction), so redeliveries, reordering and the reconciler never double-count; the
 * ticket's own guards advance or block it, exactly once. Across transactions only: the
 * ticket's row is not locked by the task's transition, which keeps claims and completions
 * from queueing on their ticket.
 */
import type { DecideEvent } from '../actors/decide.js';
import type { Applied, UnitOfWork } from '../actors/host.js';
import { NotFound } from '../errors.js';
import { loadActorRow } from '../persistence/actor-rows.js';
import type { Db } from '../persistence/db.js';
import { ticketIdsOfTasks } from '../persistence/reaction-rows.js';
import { type RecordedNews, recordCurrentNews } from '../persistence/ticket-task-rows.js';

export async function forwardTaskState(uow: UnitOfWork, taskId: string): Promise<Applied | null> {
  const [applied] = await forwardTaskStates(uow, [taskId]);
  return applied ?? null;
}

/**
 * The news of several tasks (of any tickets) in one unit of work: their tickets are read
 * first, then each ticket is told as `forwardTicketNews` tells it, in the order its tasks are
 * first listed. Same outcome as each task's news told alone.
 */
export async function forwardTaskStates(
  uow: UnitOfWork,
  taskIds: readonly string[],
): Promise<Applied[]> {
  const ids = [...new Set(taskIds)];
  const tickets = await ticketIdsOfTasks(uow.tx, ids);
  const byTicket = new Map<string, string[]>();
  for (const id of ids) {
    const ticketId = tickets.get(id);
    if (ticketId === undefined) continue;
    const list = byTicket.get(ticketId);
    if (list) list.push(id);
    else byTicket.set(ticketId, [id]);
  }
  const out: Applied[] = [];
  for (const [ticketId, list] of byTicket) {
    out.push(...(await forwardTicketNews(uow, ticketId, list)));
  }
  return out;
}

/**
 * The news of tasks of one ticket (the task_state reaction's key: every task event states
 * its ticket), each task's state read once however many of its events are listed (the state
 * read now is the latest, so older news of the same task adds nothing). Tasks of another
 * ticket are left out. The ticket's row is locked and the news read and recorded in one
 * round trip; the news that is new reaches the ticket as runs of events written once each
 * (`sendAccepted`).
 */
export async function forwardTicketNews(
  uow: UnitOfWork,
  ticketId: string,
  taskIds: readonly string[],
): Promise<Applied[]> {
  const ids = [...new Set(taskIds)];
  if (ids.length === 0) return [];
  // Never from the cache: the row is read under its lock. Both statements go out together on
  // the transaction's connection and run in that order, the ticket's row first, then its
  // tasks' rows: every writer takes them in that order, so two never wait on each other.
  uow.host.forget('ticket', ticketId);
  const [row, recorded] = await Promise.all([
    loadActorRow(uow.tx, 'ticket', ticketId, { forUpdate: true }),
    recordCurrentNews(uow.tx, ticketId, ids),
  ]);
  if (!row) return [];
  uow.adopt(row);
  const events: DecideEvent[] = [];
  for (const id of ids) {
    const news = recorded.get(id);
    if (news) events.push(taskStateEvent(id, news));
  }
  const out: Applied[] = [];
  while (events.length > 0) {
    let sent: { applied: Applied[]; taken: number };
    try {
      sent = await uow.sendAccepted('ticket', ticketId, events);
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

function taskStateEvent(taskId: string, news: RecordedNews): DecideEvent {
  return {
    type: 'TASK_STATE',
    taskId,
    phase: news.phase,
    round: news.round,
    taskType: news.type,
    from: news.from,
    state: news.state,
    seq: news.seq,
    // A failure's reason is what an onFail send-back hands the phase's next tasks.
    ...(news.state === 'failed' && news.error !== null ? { error: news.error } : {}),
  };
}
