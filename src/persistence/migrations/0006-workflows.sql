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
