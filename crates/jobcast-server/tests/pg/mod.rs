//! A PostgreSQL database of its own for each test, so tests run in parallel.
#![allow(dead_code, unreachable_pub, missing_docs)]

use sqlx::{Connection, Executor, PgConnection};

/// The server tests use: `JOBCAST_TEST_PG`, default the local one (trust auth).
pub fn server_url() -> String {
    std::env::var("JOBCAST_TEST_PG").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

/// A fresh database, dropped (with its connections) when this is dropped.
pub struct Database {
    name: String,
}

impl Database {
    /// Creates `jobcast_t_<random>`.
    pub async fn create() -> Database {
        let name = format!("jobcast_t_{:016x}", rand::random::<u64>());
        let mut conn = PgConnection::connect(&format!("{}/postgres", server_url()))
            .await
            .expect("PostgreSQL must run for these tests (scripts/test starts it)");
        conn.execute(format!("CREATE DATABASE {name}").as_str())
            .await
            .unwrap();
        conn.close().await.unwrap();
        Database { name }
    }

    /// Its URL.
    pub fn url(&self) -> String {
        format!("{}/{}", server_url(), self.name)
    }

    /// Runs `sql` (with this database's name as `$1`) on the admin database.
    async fn admin_count(&self, sql: &str) -> i64 {
        let mut conn = PgConnection::connect(&format!("{}/postgres", server_url()))
            .await
            .expect("admin connection");
        let n: i64 = sqlx::query_scalar(sql)
            .bind(&self.name)
            .fetch_one(&mut conn)
            .await
            .expect("admin query");
        let _ = conn.close().await;
        n
    }

    /// Terminates every `jobcast-listener` connection of this database; how many.
    pub async fn terminate_listeners(&self) -> i64 {
        self.admin_count(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE application_name = 'jobcast-listener' AND datname = $1",
        )
        .await
    }

    /// Lets new connections to this database in, or refuses them (existing
    /// connections stay).
    pub async fn allow_connections(&self, allow: bool) {
        let mut conn = PgConnection::connect(&format!("{}/postgres", server_url()))
            .await
            .expect("admin connection");
        conn.execute(
            format!(
                "ALTER DATABASE {} WITH ALLOW_CONNECTIONS {allow}",
                self.name
            )
            .as_str(),
        )
        .await
        .expect("ALTER DATABASE");
        let _ = conn.close().await;
    }

    /// Waits (bounded) until this database has exactly `n` listener connections.
    pub async fn wait_for_listeners(&self, n: i64) {
        for _ in 0..600 {
            let now = self
                .admin_count(
                    "SELECT count(*) FROM pg_stat_activity \
                     WHERE application_name = 'jobcast-listener' AND datname = $1",
                )
                .await;
            if now == n {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        panic!("{} never had {n} listener connections", self.name);
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Drop runs inside the test's runtime: use a thread with its own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                if let Ok(mut conn) =
                    PgConnection::connect(&format!("{}/postgres", server_url())).await
                {
                    let _ = conn
                        .execute(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)").as_str())
                        .await;
                }
            })
        })
        .join();
    }
}
