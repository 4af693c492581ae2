//! A test PostgreSQL database: one new database per test (so tests run in
//! parallel), dropped at the end, and the maintenance queries the multi-node
//! tests need (terminate a node's listener, refuse new connections).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};

use sqlx::{Connection, PgConnection};

/// The server the tests use: `JOBCAST_TEST_PG` (set by scripts/test), else
/// the one these machines run on 127.0.0.1:5432.
pub fn base() -> String {
    match std::env::var("JOBCAST_TEST_PG") {
        Ok(b) if !b.is_empty() => b.trim_end_matches('/').to_owned(),
        _ => "postgres://postgres@127.0.0.1:5432".to_owned(),
    }
}

/// `host:port` of [`base`], as a socket address (the tests use loopback only).
pub fn addr() -> SocketAddr {
    let b = base();
    let rest = b.split("://").nth(1).unwrap_or(&b);
    let hostport = rest.rsplit('@').next().unwrap_or(rest);
    let hostport = hostport.split('/').next().unwrap_or(hostport);
    let hostport = hostport.replace("localhost", "127.0.0.1");
    hostport
        .parse()
        .unwrap_or_else(|e| panic!("JOBCAST_TEST_PG {b:?}: host:port {hostport:?}: {e}"))
}

/// A connection to the maintenance database `postgres`.
pub async fn admin() -> PgConnection {
    let url = format!("{}/postgres", base());
    PgConnection::connect(&url).await.unwrap_or_else(|e| {
        panic!(
            "test PostgreSQL at {url} is unreachable ({e}); scripts/test starts it \
             (pg_ctlcluster) and JOBCAST_TEST_PG names another one"
        )
    })
}

/// A database of its own, dropped (WITH (FORCE)) when this is dropped.
pub struct TestDb {
    /// `jobcast_t_{pid}_{n}_{random}`.
    pub name: String,
    /// `postgres://…/{name}` on the test server.
    pub url: String,
}

impl TestDb {
    /// Creates a new, empty database.
    pub async fn create() -> TestDb {
        static N: AtomicU64 = AtomicU64::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        // RandomState is seeded randomly per process: enough to keep leftovers
        // of an earlier run with the same pid from colliding.
        let random = {
            use std::hash::{BuildHasher, Hasher};
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u64(n);
            h.finish() % 1_000_000_000
        };
        let name = format!("jobcast_t_{}_{n}_{random}", std::process::id());
        let mut admin = admin().await;
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut admin)
            .await
            .unwrap_or_else(|e| panic!("CREATE DATABASE {name}: {e}"));
        let _ = admin.close().await;
        TestDb {
            url: format!("{}/{name}", base()),
            name,
        }
    }

    /// The same database reached through `via` (a proxy) instead.
    pub fn url_via(&self, via: SocketAddr) -> String {
        let b = base();
        let (scheme, rest) = b.split_once("://").unwrap_or(("postgres", &b));
        let user = rest.rsplit_once('@').map(|(u, _)| format!("{u}@"));
        format!("{scheme}://{}{via}/{}", user.unwrap_or_default(), self.name)
    }

    /// Terminates every `jobcast-listener` connection to this database;
    /// returns how many there were.
    pub async fn terminate_listeners(&self) -> usize {
        let mut admin = admin().await;
        let rows: Vec<(bool,)> = sqlx::query_as(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE application_name = 'jobcast-listener' AND datname = $1",
        )
        .bind(&self.name)
        .fetch_all(&mut admin)
        .await
        .expect("pg_terminate_backend");
        let _ = admin.close().await;
        rows.iter().filter(|(ok,)| *ok).count()
    }

    /// How many `jobcast-listener` connections this database has.
    pub async fn listeners(&self) -> i64 {
        let mut admin = admin().await;
        let (n,): (i64,) = sqlx::query_as(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE application_name = 'jobcast-listener' AND datname = $1",
        )
        .bind(&self.name)
        .fetch_one(&mut admin)
        .await
        .expect("count listeners");
        let _ = admin.close().await;
        n
    }

    /// Waits (bounded) until this database has exactly `n` listener connections.
    pub async fn wait_for_listeners(&self, n: i64, timeout: std::time::Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let now = self.listeners().await;
            if now == n {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} has {now} jobcast-listener connections, not {n}, after {timeout:?}",
                self.name
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    /// Lets new connections to this database in, or refuses them (existing
    /// connections stay; superusers are refused too).
    pub async fn allow_connections(&self, allow: bool) {
        let mut admin = admin().await;
        sqlx::query(&format!(
            "ALTER DATABASE {} WITH ALLOW_CONNECTIONS {allow}",
            self.name
        ))
        .execute(&mut admin)
        .await
        .expect("ALTER DATABASE ALLOW_CONNECTIONS");
        let _ = admin.close().await;
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Drop may run inside or outside a runtime: a thread with its own.
        let dropped = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                let mut admin = admin().await;
                sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .execute(&mut admin)
                    .await
                    .map(|_| ())
            })
        })
        .join();
        if let Ok(Err(e)) = dropped {
            eprintln!("DROP DATABASE {}: {e}", self.name);
        }
    }
}
