-- What a ticket knows of each of its tasks, one row per task beside the ticket instead of a
-- list inside its snapshot: the snapshot keeps only counts per phase and state, so adding a
-- task or a task's news costs the same on a ticket of 10 tasks or 5,000. `state` and `seq`
-- are the task's news the ticket has been told (news with a seq not above `seq` is stale and
-- never sent); `round` is the round of the phase the task belongs to (a send-back starts a
-- new round of each phase it crosses, and news of an older round changes no count).
create table ticket_tasks (
  task_id text primary key,
  ticket_id text not null,
  phase text not null,
  round int not null,
  type text not null,
  state text not null,
  seq int not null
);
create index ticket_tasks_ticket on ticket_tasks (ticket_id);

-- Existing tickets: their snapshot's list, as the rows. A task set aside by a send-back
-- (`superseded`) is of an older round: -1, below the round 0 every phase starts at, which
-- is what the machine's upgrade of a version-1 snapshot counts as current.
insert into ticket_tasks (task_id, ticket_id, phase, round, type, state, seq)
select t.key, k.id, t.value ->> 'phase',
  case when coalesce((t.value ->> 'superseded')::boolean, false) then -1 else 0 end,
  t.value ->> 'type', t.value ->> 'state', (t.value ->> 'seq')::int
from tickets k
  cross join lateral jsonb_each(coalesce(k.snapshot -> 'context' -> 'tasks', '{}'::jsonb)) t
where k.machine_version = 1;
