-- A consumer checks a message against the event log at the place the message names (its
-- entity and seq, the log's own key) and compares the ids there, so `event_id` needs no index.
-- Its unique index cost an insert at a random leaf for every event (three of a task's
-- twenty-three index inserts in a drain), and a random leaf of an index larger than the
-- shared buffers is seldom in them: 200,000 inserts into a log of 4,000,000 events took
-- 2.5-2.8 s with the index and 1.1-1.2 s without. Event ids stay random UUIDs (122 random bits):
-- they are unique without a check, and JetStream deduplicates on them.
-- Upgrade: a process of the previous release still running looks events up by id; without
-- the index its lookups scan the log, so they are slower (never wrong) until it is replaced.
alter table events drop constraint if exists events_event_id_key;
