-- The relay follows the event log with a cursor instead of marking each event published.
-- Marking was a non-HOT update of every event row (its partial indexes depend on
-- `stream_seq`): a new row version and five index entries per event, plus the scan of the
-- dead head of `events_unpublished`, about a quarter of Postgres's time in a drain.
--
-- `tx` is the id of the transaction that wrote the event. In a snapshot, every transaction
-- below the lowest one still running that may write here has ended, so events below that
-- watermark, read in (tx, pos) order, can no longer be joined by an earlier one: a cursor
-- over (tx, pos) passes each event once. Existing events get tx 1 (a constant default: no
-- table rewrite), new ones their writer's id.
alter table events add column tx xid8 not null default '1';
alter table events alter column tx set default pg_current_xact_id();
create index events_relay on events (tx, pos);

-- The relay's position: every event at or before (tx, pos) was published or is held below.
-- `stream_seq` is the highest stream sequence acknowledged so far (the stream check compares
-- it with the stream's last sequence, guarantee 8).
create table relay_cursor (
  id boolean primary key default true check (id),
  tx xid8 not null,
  pos bigint not null,
  stream_seq bigint not null,
  updated_at timestamptz not null default now()
);

-- Where the cursor stood when the stream held `stream_seq`: a stream that lost its tail
-- beyond sequence N is published again from the latest checkpoint at or below N. Written
-- about once a second by a busy relay, pruned after a day.
create table relay_checkpoints (
  stream_seq bigint primary key,
  tx xid8 not null,
  pos bigint not null,
  at timestamptz not null default now()
);

-- Events the cursor passed without publishing, one entity's in order: the server refused
-- the first (it backs off, `retry_at`), or an earlier event of the entity lay beyond the
-- cursor (a later event written by an older transaction). While an entity has a row here
-- its later events join it. A row stays after its publish (`published_seq`) for a day, so
-- a stream that loses that sequence gets it again.
create table relay_held (
  pos bigint primary key references events (pos),
  entity_id text not null,
  attempts int not null default 0,
  rejections int not null default 0,
  retry_at timestamptz not null default now(),
  last_error text,
  published_seq bigint,
  published_at timestamptz
);
create index relay_held_waiting on relay_held (entity_id, pos) where published_seq is null;
create index relay_held_published on relay_held (published_seq) where published_seq is not null;

-- Upgrade: the cursor starts past every existing event; those still unpublished are held,
-- their backoff carried over, and go out in order per entity.
insert into relay_cursor (tx, pos, stream_seq)
select '1', coalesce(max(pos), 0), coalesce(max(stream_seq), 0) from events;
insert into relay_held (pos, entity_id, attempts, rejections, retry_at, last_error)
select e.pos, e.entity_id, coalesce(r.attempts, 0), coalesce(r.rejections, 0),
  coalesce(r.retry_at, now()), r.last_error
from events e left join relay_retries r on r.pos = e.pos
where e.stream_seq is null;
insert into relay_checkpoints (stream_seq, tx, pos)
select stream_seq, tx, pos from relay_cursor where stream_seq > 0;

-- `stream_seq` is no longer written. The column and its unique index stay for a process of
-- the previous version still running during a rolling upgrade (its writes must not fail);
-- its relay's rounds fail without `relay_retries` and publish nothing, which the new relay
-- does. A later migration drops them.
drop index events_unpublished;
drop index events_unpublished_entity;
drop table relay_retries;
