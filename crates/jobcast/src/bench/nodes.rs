//! `--db`: the bench starts the jobcast nodes it measures. `--db sqlite`:
//! one node on a new SQLite file in a temporary directory;
//! `--db postgres://USER@HOST:PORT --nodes N`: a new database
//! `jobcast_bench_<random>` on that PostgreSQL server and N nodes on it.
//! Everything it started (child processes, the database, the directory) is
//! removed when the [`Nodes`] is dropped: at the end of the run, on an
//! error, and on Ctrl-C / SIGTERM (the scenario is abandoned, then this is
//! dropped). A `kill -9` of the bench leaves them behind: the children are
//! `jobcast serve` processes on a loopback port, the database is named
//! `jobcast_bench_*`.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use sqlx::{Connection, PgConnection};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::time::Instant;

use super::http::{Conn, Endpoint};

/// Lines of each node's log kept for error messages.
const LOG_LINES: usize = 40;

/// The PostgreSQL settings that decide what a commit costs, read with `SHOW`.
const PG_SETTINGS: &[&str] = &[
    "server_version",
    "synchronous_commit",
    "fsync",
    "wal_sync_method",
    "full_page_writes",
    "commit_delay",
    "wal_level",
    "shared_buffers",
    "max_connections",
];

/// Which store the nodes use.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Store {
    /// A new SQLite file.
    Sqlite,
    /// A new database on this PostgreSQL server (`postgres://USER@HOST:PORT`,
    /// without a database).
    Postgres(String),
}

/// Parses `--db`: `sqlite`, or a PostgreSQL server URL (a database in its
/// path is ignored: the bench makes its own).
fn parse_store(db: &str) -> Result<Store> {
    if db == "sqlite" || db == "sqlite://" {
        return Ok(Store::Sqlite);
    }
    let Some(rest) = db
        .strip_prefix("postgres://")
        .or_else(|| db.strip_prefix("postgresql://"))
    else {
        bail!("--db {db:?}: `sqlite` or postgres://USER@HOST:PORT");
    };
    if rest.contains('?') {
        bail!("--db: query parameters are not supported");
    }
    let server = rest.split('/').next().unwrap_or(rest);
    if server.is_empty() {
        bail!("--db {db:?}: no host");
    }
    Ok(Store::Postgres(format!("postgres://{server}")))
}

/// `postgres://USER:PASSWORD@HOST` without the password.
fn redact(url: &str) -> String {
    match url.split_once("://").and_then(|(s, r)| {
        let (user, host) = r.rsplit_once('@')?;
        let user = user.split(':').next().unwrap_or(user);
        Some(format!("{s}://{user}@{host}"))
    }) {
        Some(r) => r,
        None => url.to_owned(),
    }
}

/// One started `jobcast serve`.
struct Node {
    child: Child,
    url: String,
    log: Arc<Mutex<VecDeque<String>>>,
}

impl Node {
    fn log_tail(&self) -> String {
        let log = self
            .log
            .lock()
            .map(|l| l.iter().cloned().collect::<Vec<_>>());
        log.unwrap_or_default().join("\n")
    }
}

/// The nodes the bench started, and their store.
pub(super) struct Nodes {
    nodes: Vec<Node>,
    /// The PostgreSQL server (maintenance URL base) and the database made for this run.
    database: Option<(String, String)>,
    /// The SQLite directory made for this run.
    dir: Option<PathBuf>,
    /// What the JSON records about the store.
    info: Value,
}

impl Nodes {
    /// Starts `count` nodes on a new store `db`, one after the other (each
    /// runs the migrations), each with `serve --listen 127.0.0.1:PORT --db …`
    /// and `extra`, and waits until each answers `/readyz`.
    pub(super) async fn start(db: &str, count: usize, extra: &[String]) -> Result<Self> {
        let store = parse_store(db)?;
        if count == 0 || count > 16 {
            bail!("--nodes is in 1..=16");
        }
        let mut nodes = Self {
            nodes: Vec::new(),
            database: None,
            dir: None,
            info: Value::Null,
        };
        let url = match &store {
            Store::Sqlite => {
                if count != 1 {
                    bail!("several nodes need one PostgreSQL database (--db postgres://…)");
                }
                let dir = std::env::temp_dir().join(format!("jobcast-bench-{}", random()));
                std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
                nodes.dir = Some(dir.clone());
                nodes.info = json!({"kind": "sqlite", "path": dir.join("jobcast.db")});
                format!("sqlite://{}", dir.join("jobcast.db").display())
            }
            Store::Postgres(server) => {
                let name = format!("jobcast_bench_{}", random());
                let mut admin = PgConnection::connect(&format!("{server}/postgres"))
                    .await
                    .with_context(|| format!("connecting to {}/postgres", redact(server)))?;
                sqlx::query(&format!("CREATE DATABASE {name}"))
                    .execute(&mut admin)
                    .await
                    .with_context(|| format!("CREATE DATABASE {name}"))?;
                let _ = admin.close().await;
                nodes.database = Some((server.clone(), name.clone()));
                let url = format!("{server}/{name}");
                let settings = pg_settings(&url).await?;
                nodes.info = json!({
                    "kind": "postgres",
                    "server": redact(server),
                    "database": name,
                    "settings": settings,
                });
                url
            }
        };
        let exe = std::env::current_exe().context("finding the jobcast binary")?;
        for i in 0..count {
            let node = start_node(&exe, &url, extra)
                .await
                .with_context(|| format!("starting node {i}"))?;
            nodes.nodes.push(node);
            let node = &mut nodes.nodes[i];
            if let Err(e) = wait_ready(node).await {
                bail!("node {i} ({}): {e:#}\n{}", node.url, node.log_tail());
            }
        }
        Ok(nodes)
    }

    /// The nodes' base URLs.
    pub(super) fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.url.clone()).collect()
    }

    /// The nodes' process ids.
    pub(super) fn pids(&self) -> Vec<u32> {
        self.nodes.iter().filter_map(|n| n.child.id()).collect()
    }

    /// What the JSON records: the store's kind, its database, the
    /// PostgreSQL settings, the node count.
    pub(super) fn info(&self) -> Value {
        let mut info = self.info.clone();
        if let Value::Object(m) = &mut info {
            m.insert("nodes".into(), self.nodes.len().into());
            m.insert("started_by_bench".into(), true.into());
        }
        info
    }

    /// Stops the nodes (SIGTERM, then SIGKILL after 5 s), drops the
    /// database, removes the directory. Idempotent; blocks.
    fn cleanup(&mut self) {
        for n in &self.nodes {
            if let Some(pid) = n.child.id() {
                // SIGTERM without unsafe code: kill(1).
                let _ = std::process::Command::new("kill")
                    .args(["-TERM", &pid.to_string()])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
            }
        }
        let until = std::time::Instant::now() + Duration::from_secs(5);
        for n in &mut self.nodes {
            while std::time::Instant::now() < until {
                match n.child.try_wait() {
                    Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                    _ => break,
                }
            }
            let _ = n.child.start_kill();
            // Reaped by tokio's orphan reaper if not here.
            let _ = n.child.try_wait();
        }
        self.nodes.clear();
        if let Some((server, name)) = self.database.take() {
            // Drop runs inside the runtime: a thread of its own with its own runtime.
            let dropped = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                rt.block_on(async {
                    let mut admin = PgConnection::connect(&format!("{server}/postgres")).await?;
                    sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .execute(&mut admin)
                        .await?;
                    let _ = admin.close().await;
                    Ok::<_, anyhow::Error>(())
                })?;
                Ok::<_, anyhow::Error>(name)
            })
            .join();
            match dropped {
                Ok(Ok(name)) => eprintln!("dropped database {name}"),
                Ok(Err(e)) => eprintln!("warning: dropping the bench database: {e:#}"),
                Err(_) => eprintln!("warning: dropping the bench database: thread panicked"),
            }
        }
        if let Some(dir) = self.dir.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

impl Drop for Nodes {
    fn drop(&mut self) {
        self.cleanup();
    }
}

/// A random decimal token for names.
fn random() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(super::stats::unix_nanos().into());
    h.write_u32(std::process::id());
    h.finish() % 1_000_000_000_000
}

/// `SHOW` of each of [`PG_SETTINGS`].
async fn pg_settings(url: &str) -> Result<Value> {
    let mut conn = PgConnection::connect(url)
        .await
        .context("connecting to the bench database")?;
    let mut out = serde_json::Map::new();
    for s in PG_SETTINGS {
        let (v,): (String,) = sqlx::query_as(&format!("SHOW {s}"))
            .fetch_one(&mut conn)
            .await
            .with_context(|| format!("SHOW {s}"))?;
        out.insert((*s).to_owned(), v.into());
    }
    let _ = conn.close().await;
    Ok(Value::Object(out))
}

/// A free loopback port (bound, then released for the node to bind).
fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(l.local_addr()?.port())
}

/// Spawns one node; its log (warnings and errors) is kept, last lines only.
async fn start_node(exe: &std::path::Path, db: &str, extra: &[String]) -> Result<Node> {
    let port = free_port()?;
    let mut child = Command::new(exe)
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--db",
            db,
        ])
        .args(["--heartbeat", "15s", "--shutdown-grace", "2s"])
        .args(extra)
        .env("JOBCAST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("spawning {}", exe.display()))?;
    let log = Arc::new(Mutex::new(VecDeque::new()));
    if let Some(stderr) = child.stderr.take() {
        let keep = log.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if let Ok(mut keep) = keep.lock() {
                    if keep.len() == LOG_LINES {
                        keep.pop_front();
                    }
                    keep.push_back(line);
                }
            }
        });
    }
    Ok(Node {
        child,
        url: format!("http://127.0.0.1:{port}"),
        log,
    })
}

/// Waits (30 s at most) until the node answers `GET /readyz` with 200.
async fn wait_ready(node: &mut Node) -> Result<()> {
    let endpoint = Arc::new(Endpoint::resolve(&node.url).await?);
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = node.child.try_wait()? {
            bail!("exited with {status}");
        }
        let mut conn = Conn::new(endpoint.clone(), 0);
        if let Ok(res) = conn.request("GET", "/readyz", None, b"").await {
            if res.status == 200 {
                return Ok(());
            }
        }
        if Instant::now() >= until {
            bail!("not ready within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stores() {
        assert_eq!(parse_store("sqlite").unwrap(), Store::Sqlite);
        assert_eq!(
            parse_store("postgres://postgres@127.0.0.1:5432").unwrap(),
            Store::Postgres("postgres://postgres@127.0.0.1:5432".into())
        );
        assert_eq!(
            parse_store("postgresql://u:p@h:5/db").unwrap(),
            Store::Postgres("postgres://u:p@h:5".into())
        );
        assert!(parse_store("mysql://x").is_err());
        assert!(parse_store("postgres:///db").is_err());
        assert_eq!(redact("postgres://u:secret@h:5"), "postgres://u@h:5");
        assert_eq!(redact("postgres://u@h"), "postgres://u@h");
    }
}
