-- The listing of every task, newest first, reads the newest of each state from
-- `tasks_state_created` and merges them (src/persistence/queries.ts), so `tasks_created` is
-- dropped. Every change of a task's state is a new row version with an entry in each of its
-- indexes: this one took two of a drained task's twenty index inserts, for one listing.
drop index if exists tasks_created;
