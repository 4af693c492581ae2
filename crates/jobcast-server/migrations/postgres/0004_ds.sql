-- Durable Streams: see migrations/sqlite/0005_ds.sql.
CREATE TABLE ds_streams (
    stream_key   BIGINT PRIMARY KEY,
    content_type TEXT    NOT NULL,
    ttl_s        BIGINT,
    expires_at   BIGINT,
    touched_at   BIGINT  NOT NULL,
    stream_seq   TEXT,
    fork_of      BIGINT,
    base         BIGINT  NOT NULL DEFAULT 0,
    fork_at      BIGINT,
    fork_sub     BIGINT,
    forks        BIGINT  NOT NULL DEFAULT 0,
    deleted      BOOLEAN NOT NULL DEFAULT FALSE
);

CREATE TABLE ds_producers (
    stream_key BIGINT NOT NULL,
    producer   TEXT   NOT NULL,
    epoch      BIGINT NOT NULL,
    seq        BIGINT NOT NULL,
    PRIMARY KEY (stream_key, producer)
);
