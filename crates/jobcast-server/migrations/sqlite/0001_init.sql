-- One row per live creation of a stream. `key` is never reused, so events of
-- a deleted stream can never be read as events of its successor.
CREATE TABLE streams (
    key         INTEGER PRIMARY KEY AUTOINCREMENT,
    id          TEXT    NOT NULL UNIQUE,
    epoch       TEXT    NOT NULL,
    state       TEXT    NOT NULL CHECK (state IN ('open', 'completed', 'failed')),
    head        INTEGER NOT NULL DEFAULT 0,
    first_seq   INTEGER NOT NULL DEFAULT 1,
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL
);
CREATE INDEX streams_state ON streams (state, key);

CREATE TABLE events (
    stream_key  INTEGER NOT NULL,
    seq         INTEGER NOT NULL,
    type        TEXT    NOT NULL,
    data        TEXT    NOT NULL,
    time        INTEGER NOT NULL,
    PRIMARY KEY (stream_key, seq)
) WITHOUT ROWID;

CREATE TABLE idempotency (
    stream_key  INTEGER NOT NULL,
    key         TEXT    NOT NULL,
    hash        BLOB    NOT NULL,
    status      INTEGER NOT NULL,
    body        TEXT    NOT NULL,
    created_at  INTEGER NOT NULL,
    PRIMARY KEY (stream_key, key)
) WITHOUT ROWID;

-- Keys of deleted streams whose events are still being removed in chunks.
CREATE TABLE purge (
    stream_key  INTEGER PRIMARY KEY
);
