//! jobcast-server: the jobcast server as a library.
//!
//! It keeps the event log of long-running jobs in a durable store and streams
//! it to any number of watchers over Server-Sent Events, so that a watcher
//! who connects early, late or after a network cut sees every event exactly
//! once, in order, and then the end.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let config = jobcast_server::Config::default();
//! let server = jobcast_server::Jobcast::open(config).await?;
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:7700").await?;
//! server.serve(listener, async { let _ = tokio::signal::ctrl_c().await; }).await?;
//! # Ok(()) }
//! ```

pub mod auth;
pub mod budget;
pub mod config;
pub mod ds;
pub mod http;
pub mod hub;
mod lean;
mod limits;
pub mod metrics;
pub mod server;
pub mod store;
pub mod time;
pub mod tls;
pub mod watch;

use std::future::Future;
use std::sync::Arc;

pub use auth::{Auth, KeyAlg};
pub use config::{Config, SyncMode};
pub use store::{Store, StoreError};
use tokio_util::sync::CancellationToken;

/// Whether the lean path would serve `head` (a request head as read from a
/// socket) as an SSE watch. For the fuzz targets: the lean parser stays private.
#[doc(hidden)]
pub fn lean_head_is_watch(head: &[u8]) -> bool {
    lean::is_watch(head)
}

/// A jobcast server: its store, hub and configuration, ready to serve.
#[derive(Debug, Clone)]
pub struct Jobcast {
    state: http::AppState,
    tls: Option<tls::Tls>,
}

impl Jobcast {
    /// Opens the store named in `config` (migrating it) and starts its writer.
    pub async fn open(config: Config) -> Result<Jobcast, StoreError> {
        let metrics = metrics::Metrics::new();
        let budget = metrics.memory_budget(config.memory_budget);
        let hub = hub::Hub::with_budget(config.ring_bytes, budget.clone())
            .with_catchup_bytes(config.catchup_bytes)
            .with_catchup_pace(config.catchup_pace);
        let store = Store::open(&config, hub.clone(), metrics.clone()).await?;
        Ok(Jobcast {
            state: http::AppState {
                store,
                hub,
                budget,
                watcher_caps: Arc::new(limits::WatcherCaps::new(
                    config.max_watchers_per_ip,
                    config.max_watchers_per_subject,
                )),
                metrics,
                config: Arc::new(config),
                shutdown: CancellationToken::new(),
            },
            tls: None,
        })
    }

    /// Like [`Jobcast::open`], with a store that fails on command: for
    /// tests of store outages (only with the `test-util` feature).
    #[cfg(feature = "test-util")]
    pub async fn open_with_faults(
        config: Config,
    ) -> Result<(Jobcast, store::FaultSwitch), StoreError> {
        let mut server = Self::open(config).await?;
        let (store, switch) = server
            .state
            .store
            .clone()
            .with_faults(server.state.metrics.clone());
        server.state.store = store;
        Ok((server, switch))
    }

    /// The shared state (store, hub, configuration).
    pub fn state(&self) -> &http::AppState {
        &self.state
    }

    /// The router, for serving without the accept loop (e.g. `oneshot` in tests).
    pub fn router(&self) -> axum::Router {
        http::app(self.state.clone())
    }

    /// Serves TLS (ALPN `h2` and `http/1.1`) instead of plain HTTP. Keep a
    /// clone of `tls` to [`tls::Tls::reload`] the certificate while serving.
    pub fn with_tls(mut self, tls: tls::Tls) -> Jobcast {
        self.tls = Some(tls);
        self
    }

    /// Serves on `listener` until `shutdown` completes, then shuts down gracefully.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> std::io::Result<()> {
        server::serve_with(listener, self.state, self.tls, shutdown).await
    }
}
