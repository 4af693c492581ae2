//! The `jobcast` command: the server and its tools.

mod bench;
mod cli;

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use jobcast_server::{Auth, Config, Jobcast, KeyAlg, SyncMode};

/// jobcast: the event log of long-running jobs, streamed to every watcher over SSE.
#[derive(Debug, Parser)]
#[command(name = "jobcast", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the server.
    Serve(Box<ServeArgs>),
    /// Client commands: tail, publish, complete, fail, delete, streams.
    #[command(flatten)]
    Client(cli::ClientCommand),
    /// Measure a running jobcast: fanout, ingest, replay, hold.
    Bench(Box<bench::BenchArgs>),
}

/// How hard SQLite syncs.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum Sync {
    /// Survives a killed process (WAL, synchronous=NORMAL).
    Normal,
    /// Survives a power loss too (synchronous=FULL).
    Full,
}

/// `--ds-prefix`: empty (off), or a path of `/`-separated segments of
/// `[A-Za-z0-9._~-]` (a trailing `/` is dropped; `/` alone is refused: the
/// protocol shares the listener with jobcast's own routes).
fn ds_prefix(s: &str) -> Result<String, String> {
    let p = s.trim_end_matches('/');
    if s.is_empty() {
        return Ok(String::new());
    }
    let ok = p.starts_with('/')
        && p[1..].split('/').all(|seg| {
            !seg.is_empty()
                && seg
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._~-".contains(&b))
        });
    if ok {
        Ok(p.to_owned())
    } else {
        Err(format!(
            "{s:?} is not a path prefix like /ds (segments of A-Z a-z 0-9 . _ ~ -; empty turns Durable Streams off)"
        ))
    }
}

fn duration(s: &str) -> Result<Duration, humantime::DurationError> {
    humantime::parse_duration(s)
}

/// A secret from the command line or the environment: never printed.
#[derive(Clone)]
struct Secret(String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

fn secret(s: &str) -> Result<Secret, String> {
    if s.is_empty() {
        return Err("the secret is empty".into());
    }
    Ok(Secret(s.to_owned()))
}

/// The algorithm of `--jwt-public-key`.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum JwtAlg {
    /// Ed25519 (EdDSA).
    Eddsa,
    /// RSA with SHA-256 (RS256).
    Rs256,
}

/// An origin as browsers send it: `scheme://host[:port]`, or `*`.
fn origin(s: &str) -> Result<String, String> {
    let s = s.trim().trim_end_matches('/');
    let ok = s == "*"
        || s.split_once("://").is_some_and(|(scheme, host)| {
            !scheme.is_empty() && !host.is_empty() && !host.contains('/') && http_header_safe(s)
        });
    if ok {
        Ok(s.to_owned())
    } else {
        Err(format!(
            "{s:?} is not an origin like https://app.example.com or *"
        ))
    }
}

fn http_header_safe(s: &str) -> bool {
    s.bytes().all(|b| b.is_ascii_graphic())
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "JOBCAST_LISTEN", default_value = "127.0.0.1:7700")]
    listen: SocketAddr,
    /// Database URL: sqlite://PATH (created if missing), or
    /// postgres://USER@HOST/DB for several nodes on one database. A password
    /// in it is never shown (logs, errors, --help).
    #[arg(
        long,
        env = "JOBCAST_DB",
        default_value = "sqlite://jobcast.db",
        hide_env_values = true
    )]
    db: String,
    /// SQLite durability: normal survives kill -9, full also survives power loss.
    #[arg(long, env = "JOBCAST_SYNC", value_enum, default_value = "normal")]
    sync: Sync,
    /// A comment line is sent on idle SSE connections this often.
    #[arg(long, env = "JOBCAST_HEARTBEAT", default_value = "15s", value_parser = duration)]
    heartbeat: Duration,
    /// The reconnect delay sent to SSE clients as `retry:`.
    #[arg(long, env = "JOBCAST_RETRY", default_value = "3s", value_parser = duration)]
    retry: Duration,
    /// Cap on `?wait=` for streams that do not exist yet (default wait 90s).
    #[arg(long, env = "JOBCAST_MAX_WAIT", default_value = "10m", value_parser = duration)]
    max_wait: Duration,
    /// An SSE connection ends after this long (jittered); clients resume.
    #[arg(long, env = "JOBCAST_MAX_DURATION", default_value = "1h", value_parser = duration)]
    max_duration: Duration,
    /// A connection whose socket accepts no bytes for this long is dropped.
    #[arg(long, env = "JOBCAST_WRITE_TIMEOUT", default_value = "30s", value_parser = duration)]
    write_timeout: Duration,
    /// A request head must arrive whole within this long (else 408, closed).
    #[arg(long, env = "JOBCAST_HEADER_TIMEOUT", default_value = "30s", value_parser = duration)]
    header_timeout: Duration,
    /// A request body must make progress at least this often (else 408 `body_timeout`, closed).
    #[arg(long, env = "JOBCAST_BODY_TIMEOUT", default_value = "30s", value_parser = duration)]
    body_timeout: Duration,
    /// Largest event data, in bytes.
    #[arg(long, env = "JOBCAST_MAX_EVENT_BYTES", default_value_t = 1 << 20)]
    max_event_bytes: usize,
    /// Ended streams are deleted this long after they ended.
    #[arg(long, env = "JOBCAST_RETENTION", default_value = "7d", value_parser = duration)]
    retention: Duration,
    /// Keep at most this many events per stream (the oldest are trimmed; default: all).
    #[arg(long, env = "JOBCAST_MAX_EVENTS_PER_STREAM", value_parser = clap::value_parser!(u64).range(1..))]
    max_events_per_stream: Option<u64>,
    /// Watchers give up with a retryable `store_unavailable` after the store failed this long.
    #[arg(long, env = "JOBCAST_STORE_RETRY_LIMIT", default_value = "30s", value_parser = duration)]
    store_retry_limit: Duration,
    /// At shutdown, requests in flight get this long to finish.
    #[arg(long, env = "JOBCAST_SHUTDOWN_GRACE", default_value = "10s", value_parser = duration)]
    shutdown_grace: Duration,
    /// PostgreSQL connections per node for reads and writes (plus one listener).
    #[arg(long, env = "JOBCAST_PG_POOL_SIZE", default_value_t = 16, value_parser = clap::value_parser!(u32).range(2..))]
    pg_pool_size: u32,
    /// PostgreSQL writer connections per node (streams spread over them by
    /// a hash of their id; each uses one pool connection while committing).
    #[arg(long, env = "JOBCAST_PG_WRITERS", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    pg_writers: u16,
    /// How often the PostgreSQL listener checks its connection (one that does
    /// not answer within 5 s is replaced, and the watched streams re-synced).
    #[arg(long, env = "JOBCAST_LISTENER_PING", default_value = "10s", value_parser = duration)]
    listener_ping: Duration,
    /// The longest a PostgreSQL read may take; past it the read fails (the
    /// watcher retries) and its connection is discarded.
    #[arg(long, env = "JOBCAST_PG_QUERY_TIMEOUT", default_value = "30s", value_parser = duration)]
    pg_query_timeout: Duration,
    /// Largest request body, in bytes.
    #[arg(long, env = "JOBCAST_MAX_BODY_BYTES", default_value_t = 16 << 20, value_parser = clap::value_parser!(usize))]
    max_body_bytes: usize,
    /// Most events in one append.
    #[arg(long, env = "JOBCAST_MAX_BATCH", default_value_t = 1000)]
    max_batch: usize,
    /// Most connections open at once (more get 503); lowered to fit the open-files limit.
    #[arg(long, env = "JOBCAST_MAX_CONNECTIONS", default_value_t = 16_384)]
    max_connections: usize,
    /// Most connections open at once from one IP address (more get 429; default: no limit).
    #[arg(long, env = "JOBCAST_MAX_CONNECTIONS_PER_IP")]
    max_connections_per_ip: Option<usize>,
    /// One memory budget, in bytes, for replay frames waiting for their
    /// sockets, request bodies and the live rings; past it new replays get
    /// 503 and running ones wait.
    #[arg(long, env = "JOBCAST_MEMORY_BUDGET", default_value_t = 512 << 20, value_parser = clap::value_parser!(usize))]
    memory_budget: usize,
    /// Most SSE watchers of one stream (more get 503).
    #[arg(
        long,
        env = "JOBCAST_MAX_WATCHERS_PER_STREAM",
        default_value_t = 10_000
    )]
    max_watchers_per_stream: usize,
    /// Most SSE watchers from one client address (more get 429; default: no cap, as behind a proxy every watcher has its address).
    #[arg(long, env = "JOBCAST_MAX_WATCHERS_PER_IP")]
    max_watchers_per_ip: Option<usize>,
    /// Most SSE watchers of one token subject, the `sub` claim (more get 429; default: no cap).
    #[arg(long, env = "JOBCAST_MAX_WATCHERS_PER_SUBJECT")]
    max_watchers_per_subject: Option<usize>,
    /// Serve the Durable Streams protocol under this path (streams at PREFIX/v1/stream/{path}); empty turns it off.
    #[arg(
        long,
        env = "JOBCAST_DS_PREFIX",
        default_value = "/ds",
        value_name = "PATH",
        value_parser = ds_prefix
    )]
    ds_prefix: String,
    /// How long a Durable Streams long-poll waits for data before answering 204.
    #[arg(long, env = "JOBCAST_DS_LONG_POLL", value_parser = duration, default_value = "20s")]
    ds_long_poll: std::time::Duration,
    /// Verify HS256 tokens with this secret (prefer the environment variable).
    #[arg(long, env = "JOBCAST_JWT_SECRET", hide_env_values = true, value_parser = secret, conflicts_with = "jwt_public_key")]
    jwt_secret: Option<Secret>,
    /// Verify tokens with this PEM public key (Ed25519: EdDSA, RSA: RS256).
    #[arg(long, env = "JOBCAST_JWT_PUBLIC_KEY", value_name = "FILE")]
    jwt_public_key: Option<std::path::PathBuf>,
    /// The algorithm of --jwt-public-key (default: from the key's type; never from a token).
    #[arg(long, env = "JOBCAST_JWT_ALG", value_enum, requires = "jwt_public_key")]
    jwt_alg: Option<JwtAlg>,
    /// Tokens must carry this `aud` claim (a string, or an array containing it).
    #[arg(long, env = "JOBCAST_JWT_AUDIENCE", value_name = "A")]
    jwt_audience: Option<String>,
    /// Tokens must carry this `iss` claim.
    #[arg(long, env = "JOBCAST_JWT_ISSUER", value_name = "I")]
    jwt_issuer: Option<String>,
    /// Accept a --jwt-secret shorter than 32 bytes (guessable offline from a
    /// single token: for tests only).
    #[arg(long, env = "JOBCAST_INSECURE_SHORT_SECRET", requires = "jwt_secret")]
    insecure_short_secret: bool,
    /// Clock skew tolerated on a token's exp and nbf.
    #[arg(long, env = "JOBCAST_JWT_LEEWAY", default_value = "5s", value_parser = duration)]
    jwt_leeway: Duration,
    /// The cookie a browser may carry its token in (grants reading only).
    #[arg(long, env = "JOBCAST_AUTH_COOKIE", default_value = "jobcast_token")]
    auth_cookie: String,
    /// An origin whose pages may call the API (CORS); repeat it, or `*` for any (no cookies).
    #[arg(long, env = "JOBCAST_CORS_ORIGIN", value_delimiter = ',', value_parser = origin)]
    cors_origin: Vec<String>,
    /// Without authentication, also answer requests whose Host is this name
    /// (loopback names always are; `*`: any, which re-opens DNS rebinding).
    #[arg(
        long,
        env = "JOBCAST_ALLOWED_HOST",
        value_delimiter = ',',
        value_name = "H"
    )]
    allowed_host: Vec<String>,
    /// Serve TLS with this PEM certificate chain (leaf first); HTTP/2 and
    /// HTTP/1.1 by ALPN. Reloaded with the key on SIGHUP.
    #[arg(
        long,
        env = "JOBCAST_TLS_CERT",
        value_name = "FILE",
        requires = "tls_key"
    )]
    tls_cert: Option<std::path::PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(
        long,
        env = "JOBCAST_TLS_KEY",
        value_name = "FILE",
        requires = "tls_cert"
    )]
    tls_key: Option<std::path::PathBuf>,
    /// Serve without authentication on a non-loopback address (anyone who
    /// can reach it may publish, delete and watch every stream).
    #[arg(long, env = "JOBCAST_INSECURE_NO_AUTH")]
    insecure_no_auth: bool,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => serve(*args).await.map(|()| std::process::ExitCode::SUCCESS),
        Command::Client(cmd) => cli::run(cmd).await,
        Command::Bench(args) => bench::run(*args)
            .await
            .map(|()| std::process::ExitCode::SUCCESS),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("jobcast: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}

async fn serve(args: ServeArgs) -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("JOBCAST_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    if args.header_timeout.is_zero() || args.body_timeout.is_zero() {
        bail!("--header-timeout and --body-timeout must be above 0");
    }
    if args.max_event_bytes == 0 {
        bail!("--max-event-bytes must be at least 1");
    }
    if args.max_batch == 0 || args.max_body_bytes == 0 {
        bail!("--max-batch and --max-body-bytes must be at least 1");
    }
    let auth = match (&args.jwt_secret, &args.jwt_public_key) {
        (Some(s), _) if args.insecure_short_secret => {
            Some(Auth::hs256_allow_short(&s.0).context("--jwt-secret")?)
        }
        (Some(s), _) => Some(
            Auth::hs256(&s.0).context("--jwt-secret (or --insecure-short-secret, for tests)")?,
        ),
        (None, Some(path)) => {
            let pem = std::fs::read(path)
                .with_context(|| format!("reading --jwt-public-key {}", path.display()))?;
            let alg = args.jwt_alg.map(|a| match a {
                JwtAlg::Eddsa => KeyAlg::EdDsa,
                JwtAlg::Rs256 => KeyAlg::Rs256,
            });
            Some(
                Auth::public_key_pem(&pem, alg)
                    .with_context(|| format!("--jwt-public-key {}", path.display()))?,
            )
        }
        (None, None) => None,
    }
    .map(|a| {
        let a = a.with_leeway(args.jwt_leeway);
        let a = match &args.jwt_audience {
            Some(aud) => a.with_audience(aud),
            None => a,
        };
        match &args.jwt_issuer {
            Some(iss) => a.with_issuer(iss),
            None => a,
        }
    });
    // Safe default: without authentication, only this machine may connect.
    if auth.is_none() && !args.listen.ip().is_loopback() && !args.insecure_no_auth {
        bail!(
            "refusing to listen on {} without authentication: bind a loopback address, \
             or pass --insecure-no-auth to let anyone who can reach it publish and watch",
            args.listen
        );
    }
    if auth.is_none() && args.insecure_no_auth && !args.listen.ip().is_loopback() {
        tracing::warn!(addr = %args.listen, "serving without authentication on a non-loopback address");
    }
    let config = Config {
        db: args.db.clone(),
        sync: match args.sync {
            Sync::Normal => SyncMode::Normal,
            Sync::Full => SyncMode::Full,
        },
        heartbeat: args.heartbeat,
        retry: args.retry,
        max_wait: args.max_wait,
        max_duration: args.max_duration,
        write_timeout: args.write_timeout,
        header_timeout: args.header_timeout,
        body_timeout: args.body_timeout,
        max_event_bytes: args.max_event_bytes,
        retention_ttl: args.retention,
        max_events_per_stream: args.max_events_per_stream,
        store_retry_limit: args.store_retry_limit,
        shutdown_grace: args.shutdown_grace,
        pg_pool_size: args.pg_pool_size,
        pg_writers: usize::from(args.pg_writers),
        listener_ping: args.listener_ping,
        pg_query_timeout: args.pg_query_timeout,
        max_body_bytes: args.max_body_bytes,
        max_batch: args.max_batch,
        max_connections: fit_open_files(args.max_connections),
        max_connections_per_ip: args.max_connections_per_ip,
        max_watchers_per_stream: args.max_watchers_per_stream,
        memory_budget: args.memory_budget,
        max_watchers_per_ip: args.max_watchers_per_ip,
        max_watchers_per_subject: args.max_watchers_per_subject,
        auth,
        auth_cookie: args.auth_cookie.clone(),
        cors_origins: args.cors_origin.clone(),
        allowed_hosts: args.allowed_host.clone(),
        ds_prefix: args.ds_prefix.clone(),
        ds_long_poll: args.ds_long_poll,
        ..Config::default()
    };
    match &config.auth {
        Some(a) => tracing::info!(alg = ?a.algorithm(), "authentication on"),
        None => tracing::info!("authentication off"),
    }
    // The URL may carry a password: it is shown redacted, everywhere.
    let db_shown = jobcast_server::config::redact_db_url(&args.db);
    let server = Jobcast::open(config)
        .await
        .with_context(|| format!("opening the store {db_shown}"))?;
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => {
            let files = jobcast_server::tls::TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
            };
            Some(jobcast_server::tls::Tls::load(files).context("--tls-cert / --tls-key")?)
        }
        _ => None,
    };
    let server = match &tls {
        Some(tls) => {
            reload_on_sighup(tls.clone());
            server.with_tls(tls.clone())
        }
        None => server,
    };
    let listener = listen(args.listen).with_context(|| format!("listening on {}", args.listen))?;
    let addr = listener.local_addr()?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    tracing::info!(%addr, scheme, db = %db_shown, "jobcast listening");
    server.serve(listener, shutdown_signal()).await?;
    tracing::info!("stopped");
    Ok(())
}

/// Raises the soft open-files limit to the hard one and keeps the connection
/// limit below it, so that a flood of connections is answered 503 instead of
/// exhausting file descriptors (the store and the listener need some too).
fn fit_open_files(max_connections: usize) -> usize {
    /// Descriptors kept for the store, the listener and the 503 answers.
    const RESERVE: u64 = 128;
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(soft) => {
            let fits = soft.saturating_sub(RESERVE).max(1);
            let max = (max_connections as u64).min(fits) as usize;
            if max < max_connections {
                tracing::info!(
                    open_files = soft,
                    max_connections = max,
                    "--max-connections lowered to fit the open-files limit"
                );
            }
            max
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the open-files limit");
            max_connections
        }
    }
}

/// Binds with a listen backlog large enough for a reconnect storm of
/// watchers (the default of 128 overflows and costs clients a 1 s SYN retry).
fn listen(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(4096)
}

/// Reads the certificate and key again on every SIGHUP; a file that does
/// not load leaves the certificate in use as it is (and says why).
fn reload_on_sighup(tls: jobcast_server::tls::Tls) {
    #[cfg(unix)]
    {
        let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGHUP: no certificate reloads");
                return;
            }
        };
        // Lives as long as the process: one wait per SIGHUP.
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                match tls.reload() {
                    Ok(()) => {
                        tracing::info!(cert = %tls.files().cert.display(), "TLS certificate reloaded")
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "TLS certificate reload failed; the previous one stays in use")
                    }
                }
            }
        });
    }
    #[cfg(not(unix))]
    let _ = tls;
}

/// Completes at Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}
