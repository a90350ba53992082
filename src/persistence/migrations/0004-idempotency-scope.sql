-- Idempotency keys belong to whoever presented them: a key is looked up within its `scope`,
-- so one credential can never replay another's stored response (a claim's fencing token).
-- `scope` is built by the HTTP edge as `kind:value` parts (`anonymous`, `bearer:<sha256>`);
-- a later namespace or tenant becomes one more part of the same string, with no new column
-- and the same primary key. Keys stored before this migration were global: they stay
-- reachable only to unauthenticated requests.
alter table idempotency_keys add column scope text not null default 'anonymous';
alter table idempotency_keys alter column scope drop default;
alter table idempotency_keys drop constraint idempotency_keys_pkey;
alter table idempotency_keys add primary key (scope, key);

-- Read views: a ticket's tasks page oldest first on the keyset (created_at, id). Tasks made
-- in one transaction share created_at, so id joins the index for the page to stay an index
-- range; it serves everything the old (ticket_id, created_at) index did, under its name.
drop index tasks_ticket;
create index tasks_ticket on tasks (ticket_id, created_at, id);
-- GET /tasks without a filter, newest first (tickets already have theirs).
create index tasks_created on tasks (created_at desc, id desc);
