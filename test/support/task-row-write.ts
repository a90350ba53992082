/**
 * A write of a task's row as it stands, one version and one event on: what `updateTaskRows`
 * takes, built without the machine, for tests of the statement itself.
 */
import { randomUUID } from 'node:crypto';
import { loadActorRow, type TaskRowWrite } from '../../src/persistence/actor-rows.js';
import type { Sql } from '../../src/persistence/db.js';
import type { NewEvent } from '../../src/persistence/event-log.js';

export async function bumpedTaskWrite(sql: Sql, id: string, at: number): Promise<TaskRowWrite> {
  const row = await loadActorRow(sql, 'task', id);
  if (!row) throw new Error(`no row ${id}`);
  const event: NewEvent = {
    eventId: randomUUID(),
    seq: row.seq + 1,
    entityId: id,
    entityType: 'task',
    type: 'task.test',
    data: { n: 1 },
    at,
  };
  return {
    row: { ...row, version: row.version + 1, seq: row.seq + 1 },
    expectedVersion: row.version,
    deadline: undefined,
    events: [event],
  };
}
