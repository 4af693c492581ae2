-- The retention sweep finds expired rows through these two indexes (the
-- PostgreSQL schema has had them from the start). Without them every sweep
-- read both tables whole inside the single writer's transaction, and appends
-- waited for it.
CREATE INDEX IF NOT EXISTS idempotency_created ON idempotency (created_at);
CREATE INDEX IF NOT EXISTS streams_ended ON streams (updated_at) WHERE state <> 'open';
