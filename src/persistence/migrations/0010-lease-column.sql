-- Task leases move from timer rows to `tasks.lease_expires_at`: the column is written by the
-- same update as the snapshot (a claim or heartbeat no longer upserts a timer row) and the
-- poller finds passed leases by this partial index.
--
-- The column was a projection of the snapshot's `leaseExpiresAt`; from now on it is the
-- deadline itself. A task outside claimed and running has none; a held task's deadline is
-- its lease timer's due time (the same instant), which the timer row gives up here.
update tasks set lease_expires_at = null
  where state not in ('claimed', 'running') and lease_expires_at is not null;
update tasks t set lease_expires_at = tm.due_at
  from timers tm
  where tm.entity_type = 'task' and tm.entity_id = t.id and tm.key like 'xstate.after.lease.%'
    and t.state in ('claimed', 'running');
delete from timers where entity_type = 'task' and key like 'xstate.after.lease.%';
create index tasks_lease_due on tasks (lease_expires_at) where lease_expires_at is not null;
