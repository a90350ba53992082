-- Tickets and tasks per state for /metrics, read in O(number of states) instead of a
-- group-by over both tables at every scrape.
--
-- Every insert, delete and change of `state` appends one delta row in the writing
-- transaction (a trigger, so no writer can forget it: the actor host, raw SQL, a process of
-- the previous release during a rolling upgrade). Appending takes no row lock, so writers
-- never queue on a counter row. A fold (src/persistence/state-counts.ts) moves the deltas
-- into `state_counts` in one statement; a reader sums both in one statement, so it sees a
-- fold either wholly or not at all, and the figures are exact, not estimates.

create table state_counts (
  entity_type text not null,
  state text not null,
  n bigint not null,
  primary key (entity_type, state)
);

-- Append-only between folds: no index, no key. A row is one change of one entity:
-- from_state null for an insert, to_state null for a delete.
create table state_count_deltas (
  entity_type text not null,
  from_state text,
  to_state text
) with (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 10000);

create function state_count_delta() returns trigger language plpgsql as $$
begin
  if tg_op = 'INSERT' then
    insert into state_count_deltas values (tg_argv[0], null, new.state);
  elsif tg_op = 'DELETE' then
    insert into state_count_deltas values (tg_argv[0], old.state, null);
  else
    insert into state_count_deltas values (tg_argv[0], old.state, new.state);
  end if;
  return null;
end $$;

-- TRUNCATE fires no row trigger: it empties the counts of its table instead. It holds an
-- exclusive lock on the table, so no delta of that entity type is in flight.
create function state_count_truncate() returns trigger language plpgsql as $$
begin
  delete from state_count_deltas where entity_type = tg_argv[0];
  delete from state_counts where entity_type = tg_argv[0];
  return null;
end $$;

-- Creating the triggers locks out writers of both tables until this migration commits, so
-- the counts below are exact: no change lands between them and the first delta.
create trigger tickets_state_count after insert or delete on tickets
  for each row execute function state_count_delta('ticket');
create trigger tickets_state_count_change after update of state on tickets
  for each row when (old.state is distinct from new.state)
  execute function state_count_delta('ticket');
create trigger tickets_state_count_truncate after truncate on tickets
  for each statement execute function state_count_truncate('ticket');

create trigger tasks_state_count after insert or delete on tasks
  for each row execute function state_count_delta('task');
create trigger tasks_state_count_change after update of state on tasks
  for each row when (old.state is distinct from new.state)
  execute function state_count_delta('task');
create trigger tasks_state_count_truncate after truncate on tasks
  for each statement execute function state_count_truncate('task');

insert into state_counts (entity_type, state, n)
  select 'ticket', state, count(*) from tickets group by state
  union all
  select 'task', state, count(*) from tasks group by state;
