-- The event log is the outbox. An event is unpublished while its `stream_seq` is null (the
-- relay records the sequence JetStream acknowledged; the stream check sets it back to null
-- when the stream lost the event), so a transition writes its event row and nothing else for
-- the relay: no outbox row inserted, leased and deleted per event.
--
-- The relay finds unpublished events oldest first through the first partial index, and the
-- earliest unpublished event of an entity (per-entity order) through the second. Both hold
-- only unpublished events, so they stay small however long the log grows.
create index events_unpublished on events (pos) where stream_seq is null;
create index events_unpublished_entity on events (entity_id, pos) where stream_seq is null;

-- Backoff state of events whose publish failed, and only of those: one row per failing
-- event, deleted when it is published. The relay skips an event until `retry_at`, and every
-- later event of its entity waits behind it. `rejections` counts refusals by the server (not
-- timeouts or outages); past the relay's bound the event goes out in reduced form.
create table relay_retries (
  pos bigint primary key references events (pos),
  attempts int not null default 0,
  rejections int not null default 0,
  retry_at timestamptz not null default now(),
  last_error text
);

-- Upgrade: an event still in the old outbox has a null `stream_seq` (the old relay set it
-- and deleted the row in one transaction), so the index above already finds it. Its backoff
-- state, if it had failed, carries over; then the outbox is emptied.
insert into relay_retries (pos, attempts, rejections, retry_at, last_error)
select pos, attempts, rejections, coalesce(locked_until, now()), last_error
from outbox
where rejections > 0 or last_error is not null;
update events e set stream_seq = null
from outbox o
where o.pos = e.pos and e.stream_seq is not null;
delete from outbox;
-- The outbox table itself stays, unused by this version: a process of the previous version
-- still running during a rolling upgrade inserts into it, and must not fail its writes. Its
-- own relay publishes those rows (the same event ids, deduplicated by JetStream). A later
-- migration drops it.
