//! Server configuration: a plain struct with defaults (clap lives in the binary).

use std::time::Duration;

/// How hard SQLite syncs to disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SyncMode {
    /// `synchronous=NORMAL` in WAL mode: survives a killed process, not a power loss.
    #[default]
    Normal,
    /// `synchronous=FULL`: survives a power loss, slower commits.
    Full,
}

/// Everything the server can be told.
#[derive(Debug, Clone)]
pub struct Config {
    /// Database URL, e.g. `sqlite://jobcast.db`.
    pub db: String,
    /// SQLite durability.
    pub sync: SyncMode,
    /// A comment line is written when nothing else was for this long.
    pub heartbeat: Duration,
    /// The `retry:` value sent first on every SSE response.
    pub retry: Duration,
    /// Default wait for a stream that does not exist yet.
    pub default_wait: Duration,
    /// Cap on `?wait=`.
    pub max_wait: Duration,
    /// A watch connection ends after this long (the client resumes).
    pub max_duration: Duration,
    /// A write that makes no progress for this long drops the connection.
    pub write_timeout: Duration,
    /// Largest event data, in bytes.
    pub max_event_bytes: usize,
    /// Largest request body, in bytes.
    pub max_body_bytes: usize,
    /// Most events in one append.
    pub max_batch: usize,
    /// Bytes of encoded events kept per watched stream for live watchers.
    pub ring_bytes: usize,
    /// One budget for replay frames waiting for their sockets, request
    /// bodies being read and the hub's rings (`--memory-budget`).
    pub memory_budget: usize,
    /// Events per store page when replaying.
    pub page_size: u32,
    /// How long watchers retry a failing store before giving up with `store_unavailable`.
    pub store_retry_limit: Duration,
    /// How long shutdown waits for requests in flight.
    pub shutdown_grace: Duration,
    /// Ended streams are deleted this long after they ended.
    pub retention_ttl: Duration,
    /// Keep at most this many events per stream (older ones are trimmed).
    pub max_events_per_stream: Option<u64>,
    /// Idempotency keys are kept at least this long (and at most as long as their stream).
    pub idempotency_ttl: Duration,
    /// How often the writer looks for expired streams and keys.
    pub retention_interval: Duration,
    /// How long a store call waits for a lock held by another process before failing.
    pub busy_timeout: Duration,
    /// Serve SSE watch requests that open a connection with the lean writer
    /// (less memory per watcher) instead of hyper.
    pub lean_sse: bool,
    /// PostgreSQL connections per node for reads and writes (plus one listener).
    pub pg_pool_size: u32,
    /// How tokens are verified; None: no authentication (only sensible on
    /// a loopback address — the binary refuses anything else without
    /// `--insecure-no-auth`).
    pub auth: Option<crate::auth::Auth>,
    /// The cookie a browser may carry its token in (reading only).
    pub auth_cookie: String,
    /// Origins whose pages may call the API (CORS); `*` means any origin,
    /// without credentials. Empty: no CORS headers.
    pub cors_origins: Vec<String>,
    /// Most connections open at once; more are answered 503 and closed.
    pub max_connections: usize,
    /// Most connections open at once from one IP address (None: no limit);
    /// more are answered 429 and closed.
    pub max_connections_per_ip: Option<usize>,
    /// Most SSE watchers of one stream on this node; more are answered 503.
    pub max_watchers_per_stream: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            db: "sqlite://jobcast.db".into(),
            sync: SyncMode::Normal,
            heartbeat: Duration::from_secs(15),
            retry: Duration::from_secs(3),
            default_wait: Duration::from_secs(90),
            max_wait: Duration::from_secs(600),
            max_duration: Duration::from_secs(3600),
            write_timeout: Duration::from_secs(30),
            max_event_bytes: 1 << 20,
            max_body_bytes: 16 << 20,
            max_batch: 1000,
            ring_bytes: 1 << 20,
            memory_budget: 512 << 20,
            page_size: 1000,
            store_retry_limit: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(10),
            retention_ttl: Duration::from_secs(7 * 24 * 3600),
            max_events_per_stream: None,
            idempotency_ttl: Duration::from_secs(24 * 3600),
            retention_interval: Duration::from_secs(60),
            busy_timeout: Duration::from_secs(5),
            lean_sse: true,
            pg_pool_size: 16,
            auth: None,
            auth_cookie: "jobcast_token".into(),
            cors_origins: Vec::new(),
            max_connections: 16_384,
            max_connections_per_ip: None,
            max_watchers_per_stream: 10_000,
        }
    }
}
