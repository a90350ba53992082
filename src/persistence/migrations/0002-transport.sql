-- Transport: indexes for the outbox relay's stream check, the reconciler's sweeps and the
-- dead-letter list.

-- A JetStream stream sequence belongs to one event. Two events claiming the same sequence
-- means the stream lost the older one (crash, deleted and recreated stream): the relay
-- catches the unique violation and publishes the lost events again. The index also serves
-- max(stream_seq) and "events after stream sequence N".
create unique index events_stream_seq on events (stream_seq) where stream_seq is not null;

-- Reconciler: open tickets by id (keyset sweep), open tasks by ticket (cancelled tickets
-- whose tasks are still open).
create index tickets_open on tickets (id) where state not in ('done', 'cancelled');
create index tasks_open_ticket on tasks (ticket_id, id)
  where state in ('pending', 'claimed', 'running', 'retry_wait');

-- One dead letter per (consumer, event); a later failure of the same event updates it.
create unique index dead_letters_consumer_event on dead_letters (consumer, event_id);
create index dead_letters_at on dead_letters (at desc, id desc);
