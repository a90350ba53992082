-- Task output: what agents and shell tasks print, kept per task apart from the event log and
-- the actor snapshot (it is large, frequent and not state). `seq` runs 1, 2, 3 ... per task
-- with no gap; the oldest rows are deleted once a task holds more than OUTPUT_MAX_BYTES.
create table task_output (
  task_id text not null,
  seq bigint not null,
  attempt int not null,
  stream text not null check (stream in ('stdout', 'stderr', 'log')),
  text text not null,
  -- UTF-8 bytes of `text`, what the cap counts.
  bytes int not null,
  at timestamptz not null,
  primary key (task_id, seq)
);

-- One row per task with output: the last seq handed out, the oldest kept, and the bytes kept,
-- so a write assigns seqs and trims to the cap without reading the task's output. Writers
-- for one task take turns on this row, so seqs commit in the order they were assigned.
create table task_output_totals (
  task_id text primary key,
  last_seq bigint not null,
  first_seq bigint not null default 1,
  bytes bigint not null,
  truncated boolean not null default false
);
