-- Whether any task depends on this one. A task that settles with none skips the read of its
-- dependents and its write may end its transaction (the COMMIT pipelined behind it): the
-- write checks the flag in the same statement, on the row version it updates, so a dependency
-- committed meanwhile fails the write and the transaction runs again the long way. Set, never
-- cleared, by the transaction that inserts a dependency on the task, under the task's row
-- lock (the same lock a settling write takes). Not indexed, so setting it is a HOT update.
-- While processes of an earlier version still run beside this one, a dependency they insert
-- leaves the mark unset: its dependent is then released by the reconciler's sweep of waiting
-- tasks whose dependencies settled, not in the transaction of the completion.
alter table tasks add column has_dependents boolean not null default false;
update tasks t set has_dependents = true
where exists (select 1 from task_dependencies d where d.depends_on = t.id);
