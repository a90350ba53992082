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

