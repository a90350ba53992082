-- Actors: one row per ticket and per task. `snapshot` is the persisted XState snapshot, the
-- only thing that decides what may happen next; the other columns are projections of it,
-- written in the same statement, so the API can index and filter without parsing jsonb.
-- `version` is the compare-and-set guard; `seq` is the last event-log seq of the entity.

create table tickets (
  id text primary key,
  state text not null,
  phase text,
  title text not null,
  machine_version int not null,
  snapshot jsonb not null,
  version int not null,
  seq int not null,
  created_at timestamptz not null,
  updated_at timestamptz not null
);
-- Listing by state, newest first, with a keyset cursor on (created_at, id).
create index tickets_state_created on tickets (state, created_at desc, id desc);
create index tickets_created on tickets (created_at desc, id desc);

create table tasks (
  id text primary key,
  ticket_id text not null references tickets (id),
  type text not null,
  phase text not null,
  state text not null,
  executor text not null,
  worktree text,
  priority int not null,
  attempt int not null,
  worker_id text,
  lease_expires_at timestamptz,
  machine_version int not null,
  snapshot jsonb not null,
  version int not null,
  seq int not null,
  created_at timestamptz not null,
  updated_at timestamptz not null
);
create index tasks_ticket on tasks (ticket_id, created_at);
create index tasks_state_created on tasks (state, created_at desc, id desc);
-- Claimable tasks by priority then age (the claim query walks this index).
create index tasks_claimable on tasks (executor, priority desc, created_at, id) where state = 'pending';
-- Guarantee 5: at most one claimed or running task per worktree, enforced by Postgres itself.
create unique index tasks_worktree_active on tasks (worktree)
  where worktree is not null and state in ('claimed', 'running');
-- Running tasks by type, for the cluster-wide concurrency caps checked at claim time.
create index tasks_active_type on tasks (type) where state in ('claimed', 'running');

-- The per-entity event log. `pos` is a global, monotonically assigned position; `seq` runs
-- 1, 2, 3 ... per entity with no gap and no repeat (guaranteed by the snapshot's CAS).
create table events (
  pos bigserial primary key,
  event_id uuid not null unique,
  entity_type text not null,
  entity_id text not null,
  seq int not null,
  type text not null,
  data jsonb not null,
  at timestamptz not null,
  -- The JetStream stream sequence this event got when the relay published it.
  stream_seq bigint,
  unique (entity_id, seq)
);

-- The outbox: events committed but not yet acknowledged by JetStream. A row is deleted
-- once the publish is acknowledged, so its size is the relay's lag.
create table outbox (
  pos bigint primary key references events (pos),
  entity_id text not null,
  created_at timestamptz not null default now(),
  locked_until timestamptz,
  attempts int not null default 0,
  last_error text
);
create index outbox_entity on outbox (entity_id, pos);

-- Durable timers: the machines' `after` delays. One row per (entity, XState send id); a
-- transition that re-enters a state replaces the row (new token), one that leaves deletes it.
create table timers (
  entity_type text not null,
  entity_id text not null,
  key text not null,
  event jsonb not null,
  due_at timestamptz not null,
  token uuid not null,
  locked_until timestamptz,
  primary key (entity_id, key)
);
create index timers_due on timers (due_at);

-- HTTP idempotency keys: the stored response commits in the same transaction as the effect.
create table idempotency_keys (
  key text primary key,
  request_hash text not null,
  status int not null,
  body jsonb not null,
  created_at timestamptz not null default now()
);

-- Consumer inbox: a reaction records (consumer, event id) with its effect, so a redelivered
-- message changes nothing.
create table inbox (
  consumer text not null,
  event_id uuid not null,
  processed_at timestamptz not null default now(),
  primary key (consumer, event_id)
);

-- Messages a reaction gave up on after max_deliver attempts, with their last error.
create table dead_letters (
  id bigserial primary key,
  consumer text not null,
  event_id uuid,
  subject text not null,
  data jsonb not null,
  error text not null,
  deliveries int not null,
  at timestamptz not null default now()
);
