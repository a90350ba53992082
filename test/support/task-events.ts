/**
 * The task events of some tasks with the transaction that wrote each (`xmin`) and the
 * worker a claim named: which claims, starts and settles shared a commit, read from Postgres
 * itself rather than from timing.
 */
import type { Sql } from '../../src/persistence/db.js';

export interface TaskEventRow {
  entity_id: string;
  type: string;
  xid: string;
  worker: string | null;
}

export function taskEvents(sql: Sql, ids: string[]): Promise<TaskEventRow[]> {
  return sql<TaskEventRow[]>`
    select entity_id, type, xmin::text as xid, data->>'workerId' as worker
    from events where entity_id in ${sql(ids)} and type like 'task.%' order by pos`;
}
