//! SQLite backend: one writer connection owned by the writer thread (group
//! commit; see `writer.rs`), a small read-only pool for pages, WAL mode.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use futures::TryStreamExt;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteSynchronous,
};
use sqlx::{Connection, QueryBuilder, Row, Sqlite};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

mod writer;

use super::{
    meta_from_row, ListQuery, Page, StoreError, StoredEvent, StreamMeta, WriteOutcome,
    WriteRequest, META_COLUMNS,
};
use crate::config::{Config, SyncMode};
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::store::group::Retention;
use writer::{Cmd, Writer};

/// A store page stops after this many bytes of data (and at least one event).
const PAGE_BYTES: usize = super::PAGE_BYTES;
/// How often the writer thread is woken for housekeeping when idle.
const TICK: Duration = Duration::from_millis(50);

/// The SQLite store: a handle to the writer task and the read pool.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// Bounded: producers wait for room rather than queueing without limit.
    tx: mpsc::Sender<Cmd>,
    pool: SqlitePool,
    /// Stops the housekeeping ticker.
    stop: CancellationToken,
    tasks: TaskTracker,
    /// Completed by the writer thread when it has stopped.
    done: tokio::sync::Mutex<Option<oneshot::Receiver<()>>>,
    metrics: Metrics,
}

impl SqliteStore {
    /// Opens (creating if needed) the database, migrates it and starts the writer.
    pub async fn open(
        config: &Config,
        hub: Hub,
        metrics: Metrics,
    ) -> Result<SqliteStore, StoreError> {
        let sync = match config.sync {
            SyncMode::Normal => SqliteSynchronous::Normal,
            SyncMode::Full => SqliteSynchronous::Full,
        };
        let opts = SqliteConnectOptions::from_str(&config.db)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(sync)
            .busy_timeout(config.busy_timeout)
            .pragma("journal_size_limit", (64 * 1024 * 1024).to_string())
            .foreign_keys(false);
        let mut conn = SqliteConnection::connect_with(&opts).await?;
        sqlx::migrate!("./migrations/sqlite")
            .run(&mut conn)
            .await
            .map_err(StoreError::Migrate)?;
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .min_connections(1)
            .acquire_timeout(Duration::from_secs(5))
            .connect_with(opts.clone().read_only(true))
            .await?;
        // The migration connection is done; the writer opens its own.
        conn.close().await?;
        let retention = Retention::from_config(config);
        let writer = Writer::open(
            opts.get_filename(),
            config.sync == SyncMode::Full,
            config.busy_timeout,
            hub,
            retention,
        )?;
        let (tx, rx) = mpsc::channel(4096);
        let (done_tx, done_rx) = oneshot::channel();
        // The one writer: an OS thread, so a group runs without a hop per statement.
        std::thread::Builder::new()
            .name("jobcast-writer".into())
            .spawn(move || {
                writer.run(rx);
                let _ = done_tx.send(());
            })
            .map_err(|e| StoreError::Unavailable(Box::new(e)))?;
        let stop = CancellationToken::new();
        let tasks = TaskTracker::new();
        let ticker = tx.clone();
        let stopped = stop.clone();
        // Wakes the writer for housekeeping (retention, purge) when idle.
        tasks.spawn(async move {
            loop {
                tokio::select! {
                    _ = stopped.cancelled() => break,
                    _ = tokio::time::sleep(TICK) => {
                        if ticker.send(Cmd::Tick).await.is_err() {
                            break;
                        }
                    }
                }
            }
        });
        tasks.close();
        Ok(SqliteStore {
            inner: Arc::new(Inner {
                tx,
                pool,
                stop,
                tasks,
                done: tokio::sync::Mutex::new(Some(done_rx)),
                metrics,
            }),
        })
    }

    pub(super) fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    pub(super) async fn write(&self, req: WriteRequest) -> Result<WriteOutcome, StoreError> {
        crate::store::group::submit(&self.inner.tx, req, Cmd::Write, &self.inner.metrics).await
    }

    pub(super) async fn ds_write(
        &self,
        w: super::ds::DsWrite,
    ) -> Result<super::ds::DsOutcome, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.inner
            .tx
            .send(Cmd::Ds(w, reply))
            .await
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    pub(super) async fn ds_read(
        &self,
        stream: &str,
        after: Option<u64>,
        max_bytes: usize,
    ) -> Result<Option<super::ds::DsPage>, StoreError> {
        Ok(super::ds::sqlite::read(&self.inner.pool, stream, after, max_bytes).await?)
    }

    pub(super) async fn meta(&self, stream: &str) -> Result<Option<StreamMeta>, StoreError> {
        let row = sqlx::query(&format!("SELECT {META_COLUMNS} FROM streams WHERE id = ?"))
            .bind(stream)
            .fetch_optional(&self.inner.pool)
            .await?;
        Ok(row.as_ref().map(meta_from_row).transpose()?)
    }

    pub(super) async fn read(
        &self,
        stream: &str,
        after: u64,
        limit: u32,
    ) -> Result<Option<Page>, StoreError> {
        // One read transaction: the metadata and the events come from one snapshot.
        let mut tx = self.inner.pool.begin().await?;
        let row = sqlx::query(&format!("SELECT {META_COLUMNS} FROM streams WHERE id = ?"))
            .bind(stream)
            .fetch_optional(&mut *tx)
            .await?;
        let Some(meta) = row.as_ref().map(meta_from_row).transpose()? else {
            tx.commit().await?;
            return Ok(None);
        };
        // Streamed row by row so that a page stops at PAGE_BYTES of data
        // (at least one event) instead of loading `limit` huge events at once.
        let mut events = Vec::new();
        let mut bytes = 0usize;
        {
            let mut rows = sqlx::query(
                "SELECT seq, type, data, time FROM events \
                 WHERE stream_key = ? AND seq > ? ORDER BY seq LIMIT ?",
            )
            .bind(meta.key)
            .bind(after.min(i64::MAX as u64) as i64)
            .bind(limit as i64)
            .fetch(&mut *tx);
            while let Some(r) = rows.try_next().await? {
                let data: String = r.try_get("data")?;
                // Bounded pieces: a page holds at most PAGE_BYTES of data,
                // or one event when that one is larger.
                if !events.is_empty() && bytes + data.len() > PAGE_BYTES {
                    break;
                }
                bytes += data.len();
                events.push(StoredEvent {
                    seq: r.try_get::<i64, _>("seq")? as u64,
                    event_type: r.try_get("type")?,
                    data,
                    time: r.try_get("time")?,
                });
                if bytes >= PAGE_BYTES {
                    break;
                }
            }
        }
        tx.commit().await?;
        Ok(Some(Page { meta, events }))
    }

    pub(super) async fn list(&self, q: &ListQuery) -> Result<Vec<StreamMeta>, StoreError> {
        let mut qb =
            QueryBuilder::<Sqlite>::new(format!("SELECT {META_COLUMNS} FROM streams WHERE 1=1"));
        super::push_list_query(&mut qb, q, super::Dialect::Sqlite);
        let rows = qb.build().fetch_all(&self.inner.pool).await?;
        Ok(rows.iter().map(meta_from_row).collect::<Result<_, _>>()?)
    }

    /// The read pool and the writer thread both answer.
    pub(super) async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.inner.pool).await?;
        crate::store::group::ping(&self.inner.tx, Cmd::Ping).await
    }

    #[cfg(feature = "test-util")]
    pub(super) async fn stop_writer(&self) {
        let _ = self.inner.tx.send(Cmd::Stop).await;
        if let Some(done) = self.inner.done.lock().await.take() {
            let _ = done.await;
        }
    }

    pub(super) async fn close(&self) {
        self.inner.stop.cancel();
        self.inner.tasks.wait().await;
        // Queued writes before the stop are committed and answered first.
        let _ = self.inner.tx.send(Cmd::Stop).await;
        if let Some(done) = self.inner.done.lock().await.take() {
            let _ = done.await;
        }
        self.inner.pool.close().await;
    }
}
