-- A replayed answer is the first one byte for byte: `json` keeps the text it is given, where
-- `jsonb` reordered an object's members (by length, then bytes), so a replay differed from
-- the answer the client first got in all but meaning. Rows stored before keep jsonb's order
-- until they expire (IDEMPOTENCY_KEY_TTL_MS). The table holds a day of keys by default, so
-- the rewrite this takes is short.
alter table idempotency_keys alter column body type json using body::json;
