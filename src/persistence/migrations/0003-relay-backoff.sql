-- Outbox relay backoff, per row. A failed publish sets the row's `locked_until` in the future:
-- the claim already skips such a row and every later row of its entity, so that entity's
-- order holds while every other entity's events flow. `rejections` counts the publishes the
-- server refused (not timeouts or outages, which only wait); past the relay's bound the event
-- is published in reduced form instead of being retried forever.
alter table outbox add column rejections int not null default 0;
