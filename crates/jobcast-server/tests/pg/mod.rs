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
