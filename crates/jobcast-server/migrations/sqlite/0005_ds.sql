-- Durable Streams: a DS stream is a jobcast stream (its `streams` row and
-- `events`, one event per message) with a row here. Streams created through
-- jobcast's own API have none and read as application/json.
CREATE TABLE ds_streams (
    stream_key   INTEGER PRIMARY KEY, -- streams.key
    content_type TEXT    NOT NULL,
    ttl_s        INTEGER,             -- Stream-TTL, seconds (slides on writes and reads)
    expires_at   INTEGER,             -- Stream-Expires-At, unix ms
    touched_at   INTEGER NOT NULL,    -- last write or read, unix ms
    stream_seq   TEXT,                -- the last Stream-Seq accepted
    fork_of      INTEGER,             -- the source creation's key
    base         INTEGER NOT NULL DEFAULT 0, -- seqs <= base are the source's
    fork_at      INTEGER,             -- Stream-Fork-Offset as a seq
    fork_sub     INTEGER,             -- Stream-Fork-Sub-Offset
    forks        INTEGER NOT NULL DEFAULT 0, -- live forks reading this log
    deleted      INTEGER NOT NULL DEFAULT 0  -- soft-deleted while forks exist
);

-- Idempotent producers: (stream, Producer-Id) -> epoch and last seq,
-- updated in the transaction of the append they accept.
CREATE TABLE ds_producers (
    stream_key INTEGER NOT NULL,
    producer   TEXT    NOT NULL,
    epoch      INTEGER NOT NULL,
    seq        INTEGER NOT NULL,
    PRIMARY KEY (stream_key, producer)
) WITHOUT ROWID;
