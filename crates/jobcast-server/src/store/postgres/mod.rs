//! PostgreSQL backend: several nodes on one database.
//!
//! Writes go through one writer task per node that commits whatever is
//! queued as one transaction (group commit, as in SQLite). Seqs are dense per
//! stream across nodes because each append locks its stream's row
//! (`SELECT … FOR UPDATE`) and advances `head` inside the transaction, so
//! per stream commit order is seq order. A group locks its streams in id
//! order — the same order on every node — so two nodes' groups cannot
//! deadlock; a deadlock or serialization failure is retried anyway.
//!
//! Every committed change NOTIFYs a small wake-up (`"{stream} {epoch}
//! {first} {last}"`, or `"{stream}"` for a creation or deletion) in the same
//! transaction. Each node holds one listener connection; on a wake-up for a
//! stream watched here it reads the new events from the table (one read per
//! stream, not one per watcher) and publishes them to its hub, which drops
//! what it already has. When the listener connection is lost, every watched
//! stream is re-synced from the store once it is back.

mod listener;
mod reads;
mod writer;

use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow};
use sqlx::{Postgres, QueryBuilder, Row};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{ListQuery, Page, StoreError, StreamMeta, WriteOutcome, WriteRequest};
use crate::config::Config;
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::store::group::{PingReply, Reply, Retention};
use listener::Listener;
use reads::{bounded, read_page};
use writer::Writer;

/// A store page stops after this many bytes of data (and at least one event).
pub(super) const PAGE_BYTES: usize = super::PAGE_BYTES;
/// The NOTIFY channel every node listens on.
pub(super) const CHANNEL: &str = "jobcast";
/// `application_name` of the listener connection (operators can find it in pg_stat_activity).
const LISTENER_NAME: &str = "jobcast-listener";
/// `application_name` of the pool's connections.
const POOL_NAME: &str = "jobcast";
/// A group is tried this many times when PostgreSQL reports a deadlock or a
/// serialization failure.
pub(super) const MAX_ATTEMPTS: u32 = 5;
/// How often an idle writer looks at housekeeping.
pub(super) const TICK: Duration = Duration::from_millis(50);
/// Pause between purge steps, so purging never hogs the writer.
pub(super) const PURGE_EVERY: Duration = Duration::from_millis(50);
/// Most pages read to catch up on one wake-up; watchers read the rest themselves.
pub(super) const CATCH_UP_PAGES: usize = 8;

/// What the writer task is sent.
#[derive(Debug)]
pub(super) enum Cmd {
    Write(WriteRequest, Reply),
    /// Readiness: answer from the writer task after a `SELECT 1`.
    Ping(PingReply),
    /// Commit what is queued before this, then stop.
    Stop,
}

/// The PostgreSQL store: a handle to the writer task and the pool.
#[derive(Debug, Clone)]
pub struct PgStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// Each writer's queue; a stream always goes to the same writer.
    /// Bounded: producers wait for room rather than queueing without limit.
    writers: Vec<mpsc::Sender<Cmd>>,
    pool: PgPool,
    /// Stops the listener task.
    stop: CancellationToken,
    tasks: TaskTracker,
    /// Completed by each writer task when it has stopped.
    done: tokio::sync::Mutex<Vec<oneshot::Receiver<()>>>,
    metrics: Metrics,
    /// The NOTIFY queue's usage as the listener last saw it (f64 bits).
    queue_usage: Arc<AtomicU64>,
    /// The longest a read may take on its connection (`Config::pg_query_timeout`).
    query_timeout: Duration,
    /// The hub, for Durable Streams writes (which commit outside the writer task).
    hub: Hub,
}

/// The writer a stream's writes go to: a hash of its id (FNV-1a, stable
/// across runs and nodes), so one stream's writes stay in order.
fn writer_of(stream: &str, writers: usize) -> usize {
    let hash = stream.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    (hash % writers.max(1) as u64) as usize
}

/// NOTIFY queue usage (0..1) from which /readyz answers 503: past it every
/// node's commits are close to failing.
const NOTIFY_QUEUE_NOT_READY: f64 = 0.5;

pub(super) use crate::store::{meta_from_row, META_COLUMNS};

/// Event data is stored as bytes: PostgreSQL text cannot hold NUL, which
/// valid JSON strings may contain (`"\u0000"`).
pub(super) fn data_from_row(row: &PgRow) -> Result<String, sqlx::Error> {
    let bytes: Vec<u8> = row.try_get("data")?;
    String::from_utf8(bytes).map_err(|e| sqlx::Error::ColumnDecode {
        index: "data".into(),
        source: Box::new(e),
    })
}

pub(super) fn seq(v: u64) -> i64 {
    v.min(i64::MAX as u64) as i64
}

impl PgStore {
    /// Connects, migrates (safe with several nodes starting at once: sqlx
    /// takes an advisory lock) and starts the writer and listener tasks.
    pub async fn open(config: &Config, hub: Hub, metrics: Metrics) -> Result<PgStore, StoreError> {
        let opts = PgConnectOptions::from_str(&config.db)?;
        let pool = PgPoolOptions::new()
            // Room for every writer's transaction and for reads beside them.
            .max_connections(config.pg_pool_size.max(config.pg_writers as u32 + 2))
            .min_connections(1)
            .acquire_timeout(config.busy_timeout)
            .connect_with(opts.clone().application_name(POOL_NAME))
            .await?;
        sqlx::migrate!("./migrations/postgres")
            .run(&pool)
            .await
            .map_err(StoreError::Migrate)?;
        let retention = Retention::from_config(config);
        let stop = CancellationToken::new();
        let tasks = TaskTracker::new();
        let purge_pending = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let mut writers = Vec::new();
        let mut done = Vec::new();
        for n in 0..config.pg_writers.max(1) {
            let (tx, rx) = mpsc::channel(4096);
            let (done_tx, done_rx) = oneshot::channel();
            let writer = Writer {
                pool: pool.clone(),
                hub: hub.clone(),
                retention,
                // One writer per node sweeps and purges.
                housekeeper: n == 0,
                purge_pending: purge_pending.clone(),
                next_sweep: Instant::now(),
                next_purge: Instant::now(),
            };
            // Stopped by Cmd::Stop after what is queued.
            tasks.spawn(async move {
                writer.run(rx).await;
                let _ = done_tx.send(());
            });
            writers.push(tx);
            done.push(done_rx);
        }
        let queue_usage = Arc::new(AtomicU64::new(0f64.to_bits()));
        let listener = Listener {
            opts: opts.application_name(LISTENER_NAME),
            pool: pool.clone(),
            hub: hub.clone(),
            page_size: config.page_size,
            connect_timeout: config.busy_timeout,
            ping: config.listener_ping,
            query_timeout: config.pg_query_timeout,
            metrics: metrics.clone(),
            queue_usage: queue_usage.clone(),
        };
        // Feeds this node's hub with what other nodes (and this one) commit.
        let stopped = stop.clone();
        tasks.spawn(async move { listener.run(stopped).await });
        tasks.close();
        Ok(PgStore {
            inner: Arc::new(Inner {
                writers,
                pool,
                stop,
                tasks,
                done: tokio::sync::Mutex::new(done),
                metrics,
                queue_usage,
                query_timeout: config.pg_query_timeout,
                hub,
            }),
        })
    }

    /// Every writer commits what was queued before, then stops.
    async fn stop_writers(&self) {
        for writer in &self.inner.writers {
            let _ = writer.send(Cmd::Stop).await;
        }
        for done in self.inner.done.lock().await.drain(..) {
            let _ = done.await;
        }
    }

    pub(super) fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    pub(super) async fn write(&self, req: WriteRequest) -> Result<WriteOutcome, StoreError> {
        let writer = &self.inner.writers[writer_of(&req.stream, self.inner.writers.len())];
        crate::store::group::submit(writer, req, Cmd::Write, &self.inner.metrics).await
    }

    pub(super) async fn ds_write(
        &self,
        w: super::ds::DsWrite,
    ) -> Result<super::ds::DsOutcome, StoreError> {
        super::ds::postgres::write(&self.inner.pool, &self.inner.hub, w).await
    }

    pub(super) async fn ds_read(
        &self,
        stream: &str,
        after: Option<u64>,
        max_bytes: usize,
    ) -> Result<Option<super::ds::DsPage>, StoreError> {
        super::ds::postgres::read(&self.inner.pool, stream, after, max_bytes).await
    }

    pub(super) async fn meta(&self, stream: &str) -> Result<Option<StreamMeta>, StoreError> {
        let stream = stream.to_owned();
        let row = bounded(&self.inner.pool, self.inner.query_timeout, move |c| {
            Box::pin(async move {
                sqlx::query(&format!("SELECT {META_COLUMNS} FROM streams WHERE id = $1"))
                    .bind(stream)
                    .fetch_optional(c)
                    .await
            })
        })
        .await?;
        Ok(row.as_ref().map(meta_from_row).transpose()?)
    }

    pub(super) async fn read(
        &self,
        stream: &str,
        after: u64,
        limit: u32,
    ) -> Result<Option<Page>, StoreError> {
        let timeout = self.inner.query_timeout;
        Ok(read_page(&self.inner.pool, timeout, stream, after, limit).await?)
    }

    pub(super) async fn list(&self, q: &ListQuery) -> Result<Vec<StreamMeta>, StoreError> {
        let mut qb =
            QueryBuilder::<Postgres>::new(format!("SELECT {META_COLUMNS} FROM streams WHERE true"));
        super::push_list_query(&mut qb, q, super::Dialect::Postgres);
        let rows = qb.build().fetch_all(&self.inner.pool).await?;
        Ok(rows.iter().map(meta_from_row).collect::<Result<_, _>>()?)
    }

    /// The pool and the writer task both answer.
    pub(super) async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.inner.pool).await?;
        // A NOTIFY queue near full makes every node's commits fail: not ready.
        let usage = f64::from_bits(self.inner.queue_usage.load(Ordering::Relaxed));
        if usage >= NOTIFY_QUEUE_NOT_READY {
            return Err(StoreError::Unavailable(
                format!("the PostgreSQL NOTIFY queue is {:.0}% full", usage * 100.0).into(),
            ));
        }
        for writer in &self.inner.writers {
            crate::store::group::ping(writer, Cmd::Ping).await?;
        }
        Ok(())
    }

    #[cfg(feature = "test-util")]
    pub(super) async fn stop_writer(&self) {
        self.stop_writers().await;
    }

    pub(super) async fn close(&self) {
        // Queued writes before the stop are committed and answered first.
        self.stop_writers().await;
        self.inner.stop.cancel();
        self.inner.tasks.wait().await;
        self.inner.pool.close().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::group::SWEEP_KEYS;
    use sqlx::postgres::PgConnection;
    use sqlx::{Connection as _, Executor as _};

    const CHUNK: i64 = SWEEP_KEYS;

    fn server() -> String {
        std::env::var("JOBCAST_TEST_PG")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
    }

    /// A fresh database on `JOBCAST_TEST_PG` (default: the local server),
    /// dropped with its connections when this is dropped.
    struct Database(String);

    impl Database {
        /// Creates and migrates it; a pool on it.
        async fn create() -> (Database, PgPool) {
            let name = format!("jobcast_u_{:016x}", rand::random::<u64>());
            let mut admin = PgConnection::connect(&format!("{}/postgres", server()))
                .await
                .expect("PostgreSQL must run for these tests (scripts/test starts it)");
            admin
                .execute(format!("CREATE DATABASE {name}").as_str())
                .await
                .unwrap();
            admin.close().await.unwrap();
            let db = Database(name);
            let pool = PgPool::connect(&format!("{}/{}", server(), db.0))
                .await
                .unwrap();
            sqlx::migrate!("./migrations/postgres")
                .run(&pool)
                .await
                .unwrap();
            (db, pool)
        }
    }

    impl Drop for Database {
        fn drop(&mut self) {
            let name = self.0.clone();
            // Drop runs inside the test's runtime: a thread with its own.
            let _ = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async {
                    if let Ok(mut admin) =
                        PgConnection::connect(&format!("{}/postgres", server())).await
                    {
                        let _ = admin
                            .execute(
                                format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)").as_str(),
                            )
                            .await;
                    }
                })
            })
            .join();
        }
    }

    /// Expired keys go in bounded chunks, one per transaction, and the next
    /// chunk follows soon after (not a whole retention interval later).
    #[tokio::test]
    async fn expired_keys_are_deleted_in_chunks() {
        let (_db, pool) = Database::create().await;
        let expired = 2 * CHUNK + 2000;
        sqlx::query(
            "INSERT INTO idempotency (stream_key, key, hash, status, body, created_at) \
             SELECT 1, 'old-' || i, '\\x00'::bytea, 201, '{}', 0 FROM generate_series(1, $1) AS i \
             UNION ALL \
             SELECT 1, 'new-' || i, '\\x00'::bytea, 201, '{}', $2 FROM generate_series(1, 10) AS i",
        )
        .bind(expired)
        .bind(crate::time::now_ms())
        .execute(&pool)
        .await
        .unwrap();
        let mut w = Writer {
            pool: pool.clone(),
            hub: Hub::new(1 << 20),
            retention: Retention {
                ttl_ms: 3_600_000,
                max_events: None,
                idempotency_ttl_ms: 3_600_000,
                interval: Duration::from_secs(3600),
            },
            housekeeper: true,
            purge_pending: Arc::default(),
            next_sweep: Instant::now(),
            next_purge: Instant::now(),
        };
        let count = || async {
            sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM idempotency")
                .fetch_one(&pool)
                .await
                .unwrap()
        };
        // The first sweep is due at once and takes one chunk.
        w.housekeeping().await;
        assert_eq!(count().await, expired + 10 - CHUNK);
        // The rest follows chunk by chunk, within the hour-long interval.
        let mut chunks = 1;
        let mut last = count().await;
        let deadline = Instant::now() + Duration::from_secs(30);
        while last > 10 {
            assert!(
                Instant::now() < deadline,
                "the sweep stopped with {last} keys left"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
            w.housekeeping().await;
            let n = count().await;
            if n != last {
                chunks += 1;
                assert!(last - n <= CHUNK, "one step deleted {} keys", last - n);
                last = n;
            }
        }
        assert_eq!(chunks, 3);
        assert_eq!(count().await, 10, "fresh keys are kept");
    }
}
