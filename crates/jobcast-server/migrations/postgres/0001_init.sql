-- One row per live creation of a stream. `key` is never reused, so events of
-- a deleted stream can never be read as events of its successor.
CREATE TABLE streams (
    key         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id          TEXT   NOT NULL UNIQUE,
    epoch       TEXT   NOT NULL,
    state       TEXT   NOT NULL CHECK (state IN ('open', 'completed', 'failed')),
    head        BIGINT NOT NULL DEFAULT 0,
    first_seq   BIGINT NOT NULL DEFAULT 1,
    created_at  BIGINT NOT NULL,
    updated_at  BIGINT NOT NULL
);
CREATE INDEX streams_state ON streams (state, key);
CREATE INDEX streams_ended ON streams (updated_at) WHERE state <> 'open';

CREATE TABLE events (
    stream_key  BIGINT NOT NULL,
    seq         BIGINT NOT NULL,
    type        TEXT   NOT NULL,
    data        BYTEA  NOT NULL, -- UTF-8 text; PostgreSQL text cannot hold NUL
    time        BIGINT NOT NULL,
    PRIMARY KEY (stream_key, seq)
);

CREATE TABLE idempotency (
    stream_key  BIGINT  NOT NULL,
    key         TEXT    NOT NULL,
    hash        BYTEA   NOT NULL,
    status      INTEGER NOT NULL,
    body        TEXT    NOT NULL,
    created_at  BIGINT  NOT NULL,
    PRIMARY KEY (stream_key, key)
);
CREATE INDEX idempotency_created ON idempotency (created_at);

-- Keys of deleted streams whose events are still being removed in chunks.
CREATE TABLE purge (
    stream_key  BIGINT PRIMARY KEY
);
