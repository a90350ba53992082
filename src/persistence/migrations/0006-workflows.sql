-- User-defined workflows (CONTRACT section 5). A version never changes once written: a
-- ticket runs the version it was created with to the end. `hash` is the sha-256 of the
-- definition's canonical JSON, so registering the same definition again finds its version.
create table workflows (
  name text not null,
  version int not null check (version >= 1),
  definition jsonb not null,
  hash text not null,
  created_at timestamptz not null default now(),
  primary key (name, version),
  unique (name, hash)
);

-- The workflow (`NAME@VERSION`) whose compiled machine a ticket's snapshot belongs to.
-- Tickets stored before workflows existed ran the built-in machine, `default@1`.
alter table tickets add column workflow text not null default 'default@1';

-- Task dependencies (tasks of one ticket): the policies find a task's dependents here when
-- it completes or is cancelled, without scanning snapshots.
create table task_dependencies (
  task_id text not null references tasks (id),
  depends_on text not null references tasks (id),
  primary key (task_id, depends_on)
);
create index task_dependencies_depends_on on task_dependencies (depends_on);

-- Why a task exists when a ticket re-entered its phase (`{fromPhase, reason, loop}`), set
-- once at creation and never changed: the next agent reads it with the task.
alter table tasks add column feedback jsonb;

-- A waiting task is open too (a cancelled ticket cancels it): the reconciler's partial index
-- covers it, and the dependency sweep finds waiting tasks without scanning the table.
drop index tasks_open_ticket;
create index tasks_open_ticket on tasks (ticket_id, id)
  where state in ('waiting', 'pending', 'claimed', 'running', 'retry_wait');
create index tasks_waiting on tasks (id) where state = 'waiting';
