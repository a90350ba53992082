-- Autovacuum for the tables that work flows through. By default a table is vacuumed once a
-- fifth of its rows are dead, so the longer a deployment runs, the longer it waits. Until
-- then every row a transition left behind stays in the indexes, and the hot scans start at
-- the dead end of their index: the relay's (`events_unpublished`, oldest first) walks every
-- event published since the last vacuum, the claim (`tasks_claimable`) every task claimed,
-- the timer poller (`timers_due`) every timer fired. (`state_count_deltas` has had
-- these settings since it was created.) A burst of 40,000 published events made each relay
-- claim read 946 buffers instead of 203 (2.0 ms instead of 0.2 ms) until a vacuum.
--
-- Here a fixed count of dead rows triggers autovacuum, whatever the table's size, and it
-- always cleans the indexes: with few dead pages Postgres would otherwise skip them (the
-- 2% bypass), and the dead entries these scans walk are exactly what it would leave. Where
-- autovacuum is off or slow to come round, the processes vacuum these tables themselves
-- (`src/persistence/queue-vacuum.ts`).
alter table events set (
  autovacuum_vacuum_scale_factor = 0,
  autovacuum_vacuum_threshold = 10000,
  vacuum_index_cleanup = on
);
alter table tasks set (
  autovacuum_vacuum_scale_factor = 0,
  autovacuum_vacuum_threshold = 10000,
  vacuum_index_cleanup = on
);
alter table timers set (
  autovacuum_vacuum_scale_factor = 0,
  autovacuum_vacuum_threshold = 10000,
  vacuum_index_cleanup = on
);
