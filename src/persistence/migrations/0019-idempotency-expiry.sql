-- Idempotency keys expire (IDEMPOTENCY_KEY_TTL_MS): the expiry finds the oldest keys by this
-- index instead of reading the whole table on every run.
create index idempotency_keys_created on idempotency_keys (created_at);
