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

/// Everything the server can be told. Its `Debug` shows the database URL
/// with the password replaced (see [`redact_db_url`]) and no key.
#[derive(Clone)]
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
    /// A request head (request line and headers) must arrive whole within
    /// this long, however it is read; else 408 (when bytes came) and close.
    pub header_timeout: Duration,
    /// A request body must make progress (a byte, a chunk) at least this
    /// often; else 408 `body_timeout` and close.
    pub body_timeout: Duration,
    /// Largest event data, in bytes.
    pub max_event_bytes: usize,
    /// Largest request body, in bytes.
    pub max_body_bytes: usize,
    /// Most events in one append.
    pub max_batch: usize,
    /// Bytes of encoded events kept per watched stream for live watchers.
    pub ring_bytes: usize,
    /// Most bytes of store pages kept per watched stream for watchers
    /// catching up together (the shared catch-up cache, in the memory budget).
    pub catchup_bytes: usize,
    /// How long the front of a stream's catch-up waits for room in a cache
    /// full of pages slower watchers still need (zero: it never waits, and
    /// the page furthest from its next reader goes instead).
    pub catchup_pace: Duration,
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
    /// PostgreSQL writer connections per node: streams are spread over them
    /// by a hash of their id, so groups of different streams commit in
    /// parallel (each holds one pool connection while it commits).
    pub pg_writers: usize,
    /// How often the PostgreSQL listener checks its connection (a link that
    /// silently stopped answering is replaced once a check goes unanswered
    /// for `busy_timeout`).
    pub listener_ping: Duration,
    /// The longest a PostgreSQL read may take on its connection; past it the
    /// read fails and its connection is discarded (a link that silently
    /// stopped answering would otherwise hold the read forever).
    pub pg_query_timeout: Duration,
    /// How tokens are verified; None: no authentication (only sensible on
    /// a loopback address — the binary refuses anything else without
    /// `--insecure-no-auth`).
    pub auth: Option<crate::auth::Auth>,
    /// The cookie a browser may carry its token in (reading only).
    pub auth_cookie: String,
    /// Origins whose pages may call the API (CORS); `*` means any origin,
    /// without credentials. Empty: no CORS headers.
    pub cors_origins: Vec<String>,
    /// Without authentication, the `Host` names served besides loopback ones
    /// (`localhost`, `*.localhost`, `127.x.y.z`, `[::1]`); `*`: any. Ignored
    /// when authentication is on.
    pub allowed_hosts: Vec<String>,
    /// Most connections open at once; more are answered 503 and closed.
    pub max_connections: usize,
    /// Most connections open at once from one IP address (None: no limit);
    /// more are answered 429 and closed.
    pub max_connections_per_ip: Option<usize>,
    /// Most SSE watchers of one stream on this node; more are answered 503.
    pub max_watchers_per_stream: usize,
    /// Most SSE watchers from one client address (None: no cap).
    pub max_watchers_per_ip: Option<usize>,
    /// Most SSE watchers of one token subject (`sub`; None: no cap).
    pub max_watchers_per_subject: Option<usize>,
    /// Where the Durable Streams protocol is served (`/ds`: streams at
    /// `/ds/v1/stream/{path}`); empty turns it off.
    pub ds_prefix: String,
    /// How long a Durable Streams long-poll waits before answering 204.
    pub ds_long_poll: Duration,
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
            header_timeout: Duration::from_secs(30),
            body_timeout: Duration::from_secs(30),
            max_event_bytes: 1 << 20,
            max_body_bytes: 16 << 20,
            max_batch: 1000,
            ring_bytes: 1 << 20,
            catchup_bytes: 16 << 20,
            catchup_pace: Duration::ZERO,
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
            pg_writers: 1,
            listener_ping: Duration::from_secs(10),
            pg_query_timeout: Duration::from_secs(30),
            auth: None,
            auth_cookie: "jobcast_token".into(),
            cors_origins: Vec::new(),
            allowed_hosts: Vec::new(),
            max_connections: 16_384,
            max_connections_per_ip: None,
            max_watchers_per_stream: 10_000,
            max_watchers_per_ip: None,
            max_watchers_per_subject: None,
            ds_prefix: "/ds".into(),
            ds_long_poll: Duration::from_secs(20),
        }
    }
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Written out (not derived) so that the database password stays out.
        let Config {
            db,
            sync,
            heartbeat,
            retry,
            default_wait,
            max_wait,
            max_duration,
            write_timeout,
            header_timeout,
            body_timeout,
            max_event_bytes,
            max_body_bytes,
            max_batch,
            ring_bytes,
            catchup_bytes,
            catchup_pace,
            memory_budget,
            page_size,
            store_retry_limit,
            shutdown_grace,
            retention_ttl,
            max_events_per_stream,
            idempotency_ttl,
            retention_interval,
            busy_timeout,
            lean_sse,
            pg_pool_size,
            pg_writers,
            listener_ping,
            pg_query_timeout,
            auth,
            auth_cookie,
            cors_origins,
            allowed_hosts,
            max_connections,
            max_connections_per_ip,
            max_watchers_per_stream,
            max_watchers_per_ip,
            max_watchers_per_subject,
            ds_prefix,
            ds_long_poll,
        } = self;
        f.debug_struct("Config")
            .field("db", &redact_db_url(db))
            .field("sync", sync)
            .field("heartbeat", heartbeat)
            .field("retry", retry)
            .field("default_wait", default_wait)
            .field("max_wait", max_wait)
            .field("max_duration", max_duration)
            .field("write_timeout", write_timeout)
            .field("header_timeout", header_timeout)
            .field("body_timeout", body_timeout)
            .field("max_event_bytes", max_event_bytes)
            .field("max_body_bytes", max_body_bytes)
            .field("max_batch", max_batch)
            .field("ring_bytes", ring_bytes)
            .field("catchup_bytes", catchup_bytes)
            .field("catchup_pace", catchup_pace)
            .field("memory_budget", memory_budget)
            .field("page_size", page_size)
            .field("store_retry_limit", store_retry_limit)
            .field("shutdown_grace", shutdown_grace)
            .field("retention_ttl", retention_ttl)
            .field("max_events_per_stream", max_events_per_stream)
            .field("idempotency_ttl", idempotency_ttl)
            .field("retention_interval", retention_interval)
            .field("busy_timeout", busy_timeout)
            .field("lean_sse", lean_sse)
            .field("pg_pool_size", pg_pool_size)
            .field("pg_writers", pg_writers)
            .field("listener_ping", listener_ping)
            .field("pg_query_timeout", pg_query_timeout)
            .field("auth", auth)
            .field("auth_cookie", auth_cookie)
            .field("cors_origins", cors_origins)
            .field("allowed_hosts", allowed_hosts)
            .field("max_connections", max_connections)
            .field("max_connections_per_ip", max_connections_per_ip)
            .field("max_watchers_per_stream", max_watchers_per_stream)
            .field("max_watchers_per_ip", max_watchers_per_ip)
            .field("max_watchers_per_subject", max_watchers_per_subject)
            .field("ds_prefix", ds_prefix)
            .field("ds_long_poll", ds_long_poll)
            .finish()
    }
}

/// A database URL fit to be shown: the password of its userinfo
/// (`scheme://user:PASSWORD@host`) and of a `password=` query parameter
/// replaced by `***`. Everything else (scheme, user, host, database) stays,
/// so a log line still says where the store is.
pub fn redact_db_url(url: &str) -> String {
    const MASK: &str = "***";
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let mut out = String::with_capacity(url.len());
    match base.split_once("://") {
        Some((scheme, rest)) => {
            out.push_str(scheme);
            out.push_str("://");
            // The userinfo ends at the last '@' before the path.
            let authority_end = rest.find('/').unwrap_or(rest.len());
            match rest[..authority_end].rfind('@') {
                Some(at) => {
                    let userinfo = &rest[..at];
                    match userinfo.split_once(':') {
                        Some((user, _password)) => {
                            out.push_str(user);
                            out.push(':');
                            out.push_str(MASK);
                        }
                        None => out.push_str(userinfo),
                    }
                    out.push_str(&rest[at..]);
                }
                None => out.push_str(rest),
            }
        }
        None => out.push_str(base),
    }
    if let Some(query) = query {
        out.push('?');
        for (i, pair) in query.split('&').enumerate() {
            if i > 0 {
                out.push('&');
            }
            match pair.split_once('=') {
                Some((k, _)) if k.eq_ignore_ascii_case("password") => {
                    out.push_str(k);
                    out.push('=');
                    out.push_str(MASK);
                }
                _ => out.push_str(pair),
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted_and_the_rest_kept() {
        for (url, shown) in [
            ("sqlite://jobcast.db", "sqlite://jobcast.db"),
            (
                "sqlite:///var/lib/j/a.db?mode=rwc",
                "sqlite:///var/lib/j/a.db?mode=rwc",
            ),
            ("postgres://u:pw@h:5432/db", "postgres://u:***@h:5432/db"),
            ("postgres://u:p@ss:w@rd@h/db", "postgres://u:***@h/db"),
            (
                "postgres://u@h/db?password=pw&x=1",
                "postgres://u@h/db?password=***&x=1",
            ),
            (
                "postgresql://u:pw@h/db?PASSWORD=pw",
                "postgresql://u:***@h/db?PASSWORD=***",
            ),
            ("postgres://h/db", "postgres://h/db"),
            ("postgres://u:@h/a@b", "postgres://u:***@h/a@b"),
        ] {
            assert_eq!(redact_db_url(url), shown, "{url}");
        }
    }

    #[test]
    fn debug_hides_the_database_password() {
        let c = Config {
            db: "postgres://app:s3cret-pw@db.internal/jobcast".into(),
            ..Config::default()
        };
        let text = format!("{c:?}");
        assert!(!text.contains("s3cret-pw"), "{text}");
        assert!(
            text.contains("postgres://app:***@db.internal/jobcast"),
            "{text}"
        );
    }
}
