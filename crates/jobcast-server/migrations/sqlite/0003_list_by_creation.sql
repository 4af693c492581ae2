-- The stream list pages by (created_at, id), newest first, with a cursor made
-- of the last returned stream's creation time and id (never the row key).
CREATE INDEX streams_created ON streams (created_at, id);
CREATE INDEX streams_state_created ON streams (state, created_at, id);
