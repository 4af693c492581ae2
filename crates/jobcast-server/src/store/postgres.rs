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

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use jobcast_protocol::{StreamState, END_EVENT};
use sqlx::postgres::{PgConnectOptions, PgConnection, PgListener, PgPool, PgPoolOptions, PgRow};
use sqlx::{Postgres, QueryBuilder, Row};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::writer::{
    fail_group, publish_and_answer, size_of, PingReply, Publish, Reply, Retention, GROUP_MAX_BYTES,
    GROUP_MAX_EVENTS, PURGE_CHUNK, SWEEP_EVERY, SWEEP_KEYS, SWEEP_STREAMS,
};
use super::{
    append_response_body, ListQuery, Page, Refusal, StoreError, StoredEvent, StreamMeta, WriteOp,
    WriteOutcome, WriteRequest,
};
use crate::config::Config;
use crate::hub::{Batch, Hub};
use crate::metrics::Metrics;

/// A store page stops after this many bytes of data (and at least one event).
const PAGE_BYTES: usize = super::PAGE_BYTES;
/// The NOTIFY channel every node listens on.
const CHANNEL: &str = "jobcast";
/// `application_name` of the listener connection (operators can find it in pg_stat_activity).
const LISTENER_NAME: &str = "jobcast-listener";
/// `application_name` of the pool's connections.
const POOL_NAME: &str = "jobcast";
/// A group is tried this many times when PostgreSQL reports a deadlock or a
/// serialization failure.
const MAX_ATTEMPTS: u32 = 5;
/// How often an idle writer looks at housekeeping.
const TICK: Duration = Duration::from_millis(50);
/// Pause between purge steps, so purging never hogs the writer.
const PURGE_EVERY: Duration = Duration::from_millis(50);
/// The listener checks its connection this often (a silently dead link
/// would otherwise lose wake-ups unnoticed).
const LISTENER_PING: Duration = Duration::from_secs(10);
/// Most pages read to catch up on one wake-up; watchers read the rest themselves.
const CATCH_UP_PAGES: usize = 8;

/// What the writer task is sent.
#[derive(Debug)]
enum Cmd {
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
    /// Bounded: producers wait for room rather than queueing without limit.
    tx: mpsc::Sender<Cmd>,
    pool: PgPool,
    /// Stops the listener task.
    stop: CancellationToken,
    tasks: TaskTracker,
    /// Completed by the writer task when it has stopped.
    done: tokio::sync::Mutex<Option<oneshot::Receiver<()>>>,
    metrics: Metrics,
    /// The NOTIFY queue's usage as the listener last saw it (f64 bits).
    queue_usage: Arc<AtomicU64>,
}

/// NOTIFY queue usage (0..1) from which /readyz answers 503: past it every
/// node's commits are close to failing.
const NOTIFY_QUEUE_NOT_READY: f64 = 0.5;

const META_COLUMNS: &str = "key, id, epoch, state, head, first_seq, created_at, updated_at";

fn meta_from_row(row: &PgRow) -> Result<StreamMeta, sqlx::Error> {
    let state: String = row.try_get("state")?;
    Ok(StreamMeta {
        key: row.try_get("key")?,
        id: row.try_get("id")?,
        epoch: row.try_get("epoch")?,
        state: StreamState::parse(&state).ok_or_else(|| sqlx::Error::ColumnDecode {
            index: "state".into(),
            source: format!("unknown state {state:?}").into(),
        })?,
        head: row.try_get::<i64, _>("head")? as u64,
        first_seq: row.try_get::<i64, _>("first_seq")? as u64,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}

/// Event data is stored as bytes: PostgreSQL text cannot hold NUL, which
/// valid JSON strings may contain (`"\u0000"`).
fn data_from_row(row: &PgRow) -> Result<String, sqlx::Error> {
    let bytes: Vec<u8> = row.try_get("data")?;
    String::from_utf8(bytes).map_err(|e| sqlx::Error::ColumnDecode {
        index: "data".into(),
        source: Box::new(e),
    })
}

fn seq(v: u64) -> i64 {
    v.min(i64::MAX as u64) as i64
}

impl PgStore {
    /// Connects, migrates (safe with several nodes starting at once: sqlx
    /// takes an advisory lock) and starts the writer and listener tasks.
    pub async fn open(config: &Config, hub: Hub, metrics: Metrics) -> Result<PgStore, StoreError> {
        let opts = PgConnectOptions::from_str(&config.db)?;
        let pool = PgPoolOptions::new()
            .max_connections(config.pg_pool_size.max(2))
            .min_connections(1)
            .acquire_timeout(config.busy_timeout)
            .connect_with(opts.clone().application_name(POOL_NAME))
            .await?;
        sqlx::migrate!("./migrations/postgres")
            .run(&pool)
            .await
            .map_err(StoreError::Migrate)?;
        let retention = Retention::from_config(config);
        let (tx, rx) = mpsc::channel(4096);
        let (done_tx, done_rx) = oneshot::channel();
        let stop = CancellationToken::new();
        let tasks = TaskTracker::new();
        let writer = Writer {
            pool: pool.clone(),
            hub: hub.clone(),
            retention,
            purge_pending: true,
            next_sweep: Instant::now(),
            next_purge: Instant::now(),
        };
        // The one writer of this node; stopped by Cmd::Stop after what is queued.
        tasks.spawn(async move {
            writer.run(rx).await;
            let _ = done_tx.send(());
        });
        let queue_usage = Arc::new(AtomicU64::new(0f64.to_bits()));
        let listener = Listener {
            opts: opts.application_name(LISTENER_NAME),
            pool: pool.clone(),
            hub,
            page_size: config.page_size,
            connect_timeout: config.busy_timeout,
            metrics: metrics.clone(),
            queue_usage: queue_usage.clone(),
        };
        // Feeds this node's hub with what other nodes (and this one) commit.
        let stopped = stop.clone();
        tasks.spawn(async move { listener.run(stopped).await });
        tasks.close();
        Ok(PgStore {
            inner: Arc::new(Inner {
                tx,
                pool,
                stop,
                tasks,
                done: tokio::sync::Mutex::new(Some(done_rx)),
                metrics,
                queue_usage,
            }),
        })
    }

    pub(super) fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    pub(super) async fn write(&self, req: WriteRequest) -> Result<WriteOutcome, StoreError> {
        super::writer::submit(&self.inner.tx, req, Cmd::Write).await
    }

    pub(super) async fn ds_write(
        &self,
        w: super::ds::DsWrite,
    ) -> Result<super::ds::DsOutcome, StoreError> {
        super::ds::postgres::write(&self.inner.pool, w).await
    }

    pub(super) async fn ds_read(
        &self,
        stream: &str,
        after: Option<u64>,
        max_bytes: usize,
    ) -> Result<Option<super::ds::DsPage>, StoreError> {
        Ok(super::ds::postgres::read(&self.inner.pool, stream, after, max_bytes).await?)
    }

    pub(super) async fn meta(&self, stream: &str) -> Result<Option<StreamMeta>, StoreError> {
        let row = sqlx::query(&format!("SELECT {META_COLUMNS} FROM streams WHERE id = $1"))
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
        Ok(read_page(&self.inner.pool, stream, after, limit).await?)
    }

    pub(super) async fn list(&self, q: &ListQuery) -> Result<Vec<StreamMeta>, StoreError> {
        let mut qb =
            QueryBuilder::<Postgres>::new(format!("SELECT {META_COLUMNS} FROM streams WHERE true"));
        super::push_list_query(&mut qb, q);
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
        super::writer::ping(&self.inner.tx, Cmd::Ping).await
    }

    #[cfg(feature = "test-util")]
    pub(super) async fn stop_writer(&self) {
        let _ = self.inner.tx.send(Cmd::Stop).await;
        if let Some(done) = self.inner.done.lock().await.take() {
            let _ = done.await;
        }
    }

    pub(super) async fn close(&self) {
        // Queued writes before the stop are committed and answered first.
        let _ = self.inner.tx.send(Cmd::Stop).await;
        if let Some(done) = self.inner.done.lock().await.take() {
            let _ = done.await;
        }
        self.inner.stop.cancel();
        self.inner.tasks.wait().await;
        self.inner.pool.close().await;
    }
}

/// The metadata and up to `limit` events after `after`, from one statement
/// (so from one snapshot), stopping after [`PAGE_BYTES`] of data.
async fn read_page(
    pool: &PgPool,
    stream: &str,
    after: u64,
    limit: u32,
) -> Result<Option<Page>, sqlx::Error> {
    let mut rows = sqlx::query(
        "SELECT s.key, s.id, s.epoch, s.state, s.head, s.first_seq, s.created_at, s.updated_at, \
                e.seq, e.type, e.data, e.time \
         FROM streams s LEFT JOIN LATERAL ( \
             SELECT seq, type, data, time FROM events \
             WHERE stream_key = s.key AND seq > $2 ORDER BY seq LIMIT $3 \
         ) e ON true \
         WHERE s.id = $1 ORDER BY e.seq",
    )
    .bind(stream)
    .bind(seq(after))
    .bind(limit as i64)
    .fetch(pool);
    let mut meta = None;
    let mut events = Vec::new();
    let mut bytes = 0usize;
    while let Some(r) = rows.try_next().await? {
        if meta.is_none() {
            meta = Some(meta_from_row(&r)?);
        }
        let Some(seq) = r.try_get::<Option<i64>, _>("seq")? else {
            break;
        };
        let data = data_from_row(&r)?;
        // Bounded pieces: a page holds at most PAGE_BYTES of data, or one
        // event when that one is larger.
        if !events.is_empty() && bytes + data.len() > PAGE_BYTES {
            break;
        }
        bytes += data.len();
        events.push(StoredEvent {
            seq: seq as u64,
            event_type: r.try_get("type")?,
            data,
            time: r.try_get("time")?,
        });
        if bytes >= PAGE_BYTES {
            break;
        }
    }
    Ok(meta.map(|meta| Page { meta, events }))
}

impl Publish {
    /// The NOTIFY payload: `"{stream} {epoch} {first} {last}"` or `"{stream}"`.
    fn payload(&self, group: &[(WriteRequest, Reply)]) -> String {
        match self {
            Publish::Events {
                index,
                epoch,
                first_seq,
                last_seq,
                ..
            } => format!("{} {epoch} {first_seq} {last_seq}", group[*index].0.stream),
            Publish::Changed { stream, .. } => stream.clone(),
        }
    }
}

/// Whether PostgreSQL asks for the transaction to be tried again.
fn retryable(e: &sqlx::Error) -> bool {
    match e {
        // deadlock_detected, serialization_failure, unique_violation (a
        // creation raced with another node's).
        sqlx::Error::Database(d) => {
            matches!(d.code().as_deref(), Some("40P01" | "40001" | "23505"))
        }
        _ => false,
    }
}

/// The writer task's state.
struct Writer {
    pool: PgPool,
    hub: Hub,
    retention: Retention,
    purge_pending: bool,
    next_sweep: Instant,
    next_purge: Instant,
}

impl Writer {
    async fn run(mut self, mut rx: mpsc::Receiver<Cmd>) {
        let mut group: Vec<(WriteRequest, Reply)> = Vec::new();
        let mut pings: Vec<PingReply> = Vec::new();
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut stopping = false;
        while !stopping {
            // One line per branch: a write to commit, or time for housekeeping.
            tokio::select! {
                cmd = rx.recv() => match cmd {
                    None | Some(Cmd::Stop) => stopping = true,
                    Some(Cmd::Ping(reply)) => pings.push(reply),
                    Some(Cmd::Write(req, reply)) => {
                        let (mut events, mut bytes) = size_of(&req);
                        group.push((req, reply));
                        // Take whatever else is queued, never waiting for the group to fill.
                        while events < GROUP_MAX_EVENTS && bytes < GROUP_MAX_BYTES {
                            match rx.try_recv() {
                                Ok(Cmd::Write(req, reply)) => {
                                    let (e, b) = size_of(&req);
                                    events += e;
                                    bytes += b;
                                    group.push((req, reply));
                                }
                                Ok(Cmd::Ping(reply)) => pings.push(reply),
                                Ok(Cmd::Stop) => {
                                    stopping = true;
                                    break;
                                }
                                Err(_) => break,
                            }
                        }
                        self.commit_group(&mut group).await;
                    }
                },
                _ = tick.tick() => {}
            }
            // After the group: the answer says this task still makes progress.
            for reply in pings.drain(..) {
                let alive = sqlx::query("SELECT 1").execute(&self.pool).await;
                let _ = reply.send(alive.map(drop).map_err(StoreError::from));
            }
            if !stopping {
                self.housekeeping().await;
            }
        }
        rx.close();
        while let Ok(cmd) = rx.try_recv() {
            if let Cmd::Write(_, reply) = cmd {
                let _ = reply.send(Err(StoreError::Closed));
            }
        }
    }

    async fn commit_group(&mut self, group: &mut Vec<(WriteRequest, Reply)>) {
        // Lock order = stream id order on every node (a stable sort keeps each
        // stream's requests in arrival order).
        group.sort_by(|a, b| a.0.stream.cmp(&b.0.stream));
        let mut attempt = 0;
        let result = loop {
            attempt += 1;
            let mut outcomes = Vec::with_capacity(group.len());
            let mut publish = Vec::new();
            match self.try_group(group, &mut outcomes, &mut publish).await {
                Ok(()) => break Ok((outcomes, publish)),
                Err(e) if attempt < MAX_ATTEMPTS && retryable(&e) => {
                    tracing::debug!(error = %e, attempt, "store write conflicted; trying again");
                    tokio::time::sleep(Duration::from_millis(5 * u64::from(attempt))).await;
                }
                Err(e) => break Err(e),
            }
        };
        match result {
            Ok((outcomes, publish)) => {
                self.purge_pending |= publish_and_answer(&self.hub, group, outcomes, publish);
            }
            Err(e) => fail_group(group, &e),
        }
    }

    async fn try_group(
        &self,
        group: &[(WriteRequest, Reply)],
        outcomes: &mut Vec<WriteOutcome>,
        publish: &mut Vec<Publish>,
    ) -> Result<(), sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        for (index, (req, _)) in group.iter().enumerate() {
            let outcome = apply(
                &mut tx,
                &self.hub,
                self.retention.max_events,
                index,
                req,
                publish,
            )
            .await?;
            outcomes.push(outcome);
        }
        let payloads: Vec<String> = publish.iter().map(|p| p.payload(group)).collect();
        if !payloads.is_empty() {
            // Delivered to every node's listener when (and only if) this commits.
            sqlx::query("SELECT pg_notify($1, p) FROM unnest($2::text[]) AS p")
                .bind(CHANNEL)
                .bind(&payloads)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await
    }

    async fn housekeeping(&mut self) {
        let now = Instant::now();
        if now >= self.next_sweep {
            let more = match self.expire().await {
                Ok(more) => more,
                Err(e) => {
                    tracing::warn!(error = %e, "retention sweep failed; will retry");
                    false
                }
            };
            // A step that hit its bound leaves more behind: the next one runs
            // soon, between groups, instead of a whole interval later.
            self.next_sweep = now
                + if more {
                    SWEEP_EVERY
                } else {
                    self.retention.interval
                };
        }
        if self.purge_pending && now >= self.next_purge {
            match self.purge_step().await {
                Ok(more) => self.purge_pending = more,
                Err(e) => {
                    tracing::warn!(error = %e, "purging a deleted stream failed; will retry")
                }
            }
            self.next_purge = now + PURGE_EVERY;
        }
    }

    /// One sweep step: deletes up to [`SWEEP_STREAMS`] ended streams past
    /// their TTL (watchers on every node are told, as for a delete) and up to
    /// [`SWEEP_KEYS`] idempotency keys past theirs, in one transaction.
    /// Nodes sweep concurrently; rows another node is sweeping are skipped.
    /// Whether more may remain.
    async fn expire(&mut self) -> Result<bool, sqlx::Error> {
        let now = crate::time::now_ms();
        let mut tx = self.pool.begin().await?;
        let ids: Vec<String> = sqlx::query_scalar(
            "WITH expired AS ( \
                 SELECT key FROM streams WHERE state <> 'open' AND updated_at < $1 \
                 ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED), \
             gone AS (DELETE FROM streams s USING expired e WHERE s.key = e.key \
                      RETURNING s.key, s.id), \
             queued AS (INSERT INTO purge (stream_key) SELECT key FROM gone \
                        ON CONFLICT DO NOTHING) \
             SELECT id FROM gone",
        )
        .bind(now.saturating_sub(self.retention.ttl_ms))
        .bind(SWEEP_STREAMS)
        .fetch_all(&mut *tx)
        .await?;
        if !ids.is_empty() {
            sqlx::query("SELECT pg_notify($1, p) FROM unnest($2::text[]) AS p")
                .bind(CHANNEL)
                .bind(&ids)
                .execute(&mut *tx)
                .await?;
        }
        let keys = sqlx::query(
            "DELETE FROM idempotency WHERE (stream_key, key) IN ( \
                 SELECT stream_key, key FROM idempotency WHERE created_at < $1 \
                 LIMIT $2 FOR UPDATE SKIP LOCKED)",
        )
        .bind(now.saturating_sub(self.retention.idempotency_ttl_ms))
        .bind(SWEEP_KEYS)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        tx.commit().await?;
        let more = ids.len() as i64 >= SWEEP_STREAMS || keys as i64 >= SWEEP_KEYS;
        if !ids.is_empty() {
            tracing::info!(
                streams = ids.len(),
                "deleted ended streams past their retention"
            );
            self.purge_pending = true;
        }
        for id in ids {
            self.hub.changed(&id);
        }
        Ok(more)
    }

    /// Removes one chunk of a deleted stream's events; whether more may remain.
    async fn purge_step(&mut self) -> Result<bool, sqlx::Error> {
        let Some(key): Option<i64> =
            sqlx::query_scalar("SELECT stream_key FROM purge ORDER BY stream_key LIMIT 1")
                .fetch_optional(&self.pool)
                .await?
        else {
            return Ok(false);
        };
        let removed = sqlx::query(
            "DELETE FROM events WHERE stream_key = $1 AND seq < \
             (SELECT MIN(seq) FROM events WHERE stream_key = $1) + $2",
        )
        .bind(key)
        .bind(PURGE_CHUNK)
        .execute(&self.pool)
        .await?
        .rows_affected();
        if removed == 0 {
            let mut tx = self.pool.begin().await?;
            sqlx::query("DELETE FROM idempotency WHERE stream_key = $1")
                .bind(key)
                .execute(&mut *tx)
                .await?;
            sqlx::query("DELETE FROM purge WHERE stream_key = $1")
                .bind(key)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
        }
        Ok(true)
    }
}

/// The stream's row, locked until the transaction ends.
async fn lookup(conn: &mut PgConnection, stream: &str) -> Result<Option<StreamMeta>, sqlx::Error> {
    let row = sqlx::query(&format!(
        "SELECT {META_COLUMNS} FROM streams WHERE id = $1 FOR UPDATE"
    ))
    .bind(stream)
    .fetch_optional(conn)
    .await?;
    row.as_ref().map(meta_from_row).transpose()
}

/// The stream's locked row, creating it if needed; whether this created it.
async fn ensure(conn: &mut PgConnection, stream: &str) -> Result<(StreamMeta, bool), sqlx::Error> {
    // Another node may create (or delete) the row between the two statements:
    // a few rounds settle it.
    for _ in 0..3 {
        if let Some(meta) = lookup(conn, stream).await? {
            return Ok((meta, false));
        }
        let now = crate::time::now_ms();
        let row = sqlx::query(&format!(
            "INSERT INTO streams (id, epoch, state, head, first_seq, created_at, updated_at) \
             VALUES ($1, $2, 'open', 0, 1, $3, $3) ON CONFLICT (id) DO NOTHING \
             RETURNING {META_COLUMNS}"
        ))
        .bind(stream)
        .bind(crate::time::new_epoch())
        .bind(now)
        .fetch_optional(&mut *conn)
        .await?;
        if let Some(row) = row {
            return Ok((meta_from_row(&row)?, true));
        }
    }
    Err(sqlx::Error::Protocol(format!(
        "stream {stream:?} kept being created and deleted concurrently"
    )))
}

async fn delete_stream(conn: &mut PgConnection, key: i64) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM streams WHERE key = $1")
        .bind(key)
        .execute(&mut *conn)
        .await?;
    sqlx::query("INSERT INTO purge (stream_key) VALUES ($1) ON CONFLICT DO NOTHING")
        .bind(key)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Trims the oldest events so that at most `max` are kept.
async fn trim(conn: &mut PgConnection, meta: &mut StreamMeta, max: u64) -> Result<(), sqlx::Error> {
    let kept = meta.head + 1 - meta.first_seq;
    if kept <= max {
        return Ok(());
    }
    let first = meta.head + 1 - max;
    sqlx::query("DELETE FROM events WHERE stream_key = $1 AND seq < $2")
        .bind(meta.key)
        .bind(seq(first))
        .execute(&mut *conn)
        .await?;
    sqlx::query("UPDATE streams SET first_seq = $1 WHERE key = $2")
        .bind(seq(first))
        .bind(meta.key)
        .execute(&mut *conn)
        .await?;
    meta.first_seq = first;
    Ok(())
}

async fn idempotent_replay(
    conn: &mut PgConnection,
    meta: &StreamMeta,
    req: &WriteRequest,
) -> Result<Option<WriteOutcome>, sqlx::Error> {
    let Some(idem) = &req.idempotency else {
        return Ok(None);
    };
    let row = sqlx::query(
        "SELECT hash, status, body FROM idempotency WHERE stream_key = $1 AND key = $2",
    )
    .bind(meta.key)
    .bind(&idem.key)
    .fetch_optional(conn)
    .await?;
    let Some(row) = row else {
        return Ok(None);
    };
    let hash: Vec<u8> = row.try_get("hash")?;
    if hash != idem.hash {
        return Ok(Some(WriteOutcome::Refused(Refusal::IdempotencyKeyReused)));
    }
    Ok(Some(WriteOutcome::Replayed {
        status: row.try_get::<i32, _>("status")? as u16,
        body: row.try_get("body")?,
    }))
}

async fn remember(
    conn: &mut PgConnection,
    meta: &StreamMeta,
    req: &WriteRequest,
    status: u16,
    body: &str,
) -> Result<(), sqlx::Error> {
    let Some(idem) = &req.idempotency else {
        return Ok(());
    };
    sqlx::query(
        "INSERT INTO idempotency (stream_key, key, hash, status, body, created_at) \
         VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
    )
    .bind(meta.key)
    .bind(&idem.key)
    .bind(&idem.hash[..])
    .bind(i32::from(status))
    .bind(body)
    .bind(crate::time::now_ms())
    .execute(conn)
    .await?;
    Ok(())
}

/// Inserts events numbered from `first_seq` with one statement.
async fn insert_events(
    conn: &mut PgConnection,
    key: i64,
    first_seq: u64,
    time: i64,
    types: &[&str],
    data: &[&[u8]],
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO events (stream_key, seq, type, data, time) \
         SELECT $1, $2 + e.n - 1, e.type, e.data, $5 \
         FROM unnest($3::text[], $4::bytea[]) WITH ORDINALITY AS e(type, data, n)",
    )
    .bind(key)
    .bind(seq(first_seq))
    .bind(types)
    .bind(data)
    .bind(time)
    .execute(conn)
    .await?;
    Ok(())
}

/// Applies one request inside the group's transaction. A refusal is decided
/// before anything is written for that request, so it changes nothing.
async fn apply(
    conn: &mut PgConnection,
    hub: &Hub,
    max_events: Option<u64>,
    index: usize,
    req: &WriteRequest,
    publish: &mut Vec<Publish>,
) -> Result<WriteOutcome, sqlx::Error> {
    let changed = |deleted: Option<i64>| Publish::Changed {
        stream: req.stream.clone(),
        deleted,
    };
    match &req.op {
        WriteOp::Create => {
            let (meta, created) = ensure(conn, &req.stream).await?;
            if created {
                publish.push(changed(None));
            }
            Ok(WriteOutcome::Created { meta, created })
        }
        WriteOp::Delete => {
            let Some(meta) = lookup(conn, &req.stream).await? else {
                return Ok(WriteOutcome::Refused(Refusal::NotFound));
            };
            delete_stream(conn, meta.key).await?;
            publish.push(changed(Some(meta.key)));
            Ok(WriteOutcome::Deleted)
        }
        WriteOp::Append(events) => {
            let (mut meta, created) = ensure(conn, &req.stream).await?;
            if created {
                publish.push(changed(None));
            } else if let Some(replay) = idempotent_replay(conn, &meta, req).await? {
                return Ok(replay);
            }
            if meta.ended() {
                return Ok(WriteOutcome::Refused(Refusal::StreamEnded));
            }
            let first_seq = meta.head + 1;
            let last_seq = meta.head + events.len() as u64;
            let now = crate::time::now_ms();
            let types: Vec<&str> = events.iter().map(|e| e.event_type.as_str()).collect();
            let data: Vec<&[u8]> = events.iter().map(|e| e.data.as_bytes()).collect();
            insert_events(conn, meta.key, first_seq, now, &types, &data).await?;
            sqlx::query("UPDATE streams SET head = $1, updated_at = $2 WHERE key = $3")
                .bind(seq(last_seq))
                .bind(now)
                .bind(meta.key)
                .execute(&mut *conn)
                .await?;
            meta.head = last_seq;
            if let Some(max) = max_events {
                trim(conn, &mut meta, max).await?;
            }
            let body = append_response_body(&meta.epoch, first_seq, last_seq);
            remember(conn, &meta, req, 201, &body).await?;
            publish.push(Publish::Events {
                index,
                key: meta.key,
                epoch: meta.epoch.clone(),
                first_seq,
                last_seq,
            });
            Ok(WriteOutcome::Appended {
                epoch: meta.epoch,
                first_seq,
                last_seq,
            })
        }
        WriteOp::End { state, data } => {
            let Some(mut meta) = lookup(conn, &req.stream).await? else {
                return Ok(WriteOutcome::Refused(Refusal::NotFound));
            };
            if let Some(replay) = idempotent_replay(conn, &meta, req).await? {
                return Ok(replay);
            }
            if meta.ended() {
                return Ok(WriteOutcome::Refused(Refusal::StreamEnded));
            }
            let seq_end = meta.head + 1;
            let now = crate::time::now_ms();
            insert_events(
                conn,
                meta.key,
                seq_end,
                now,
                &[END_EVENT],
                &[data.as_bytes()],
            )
            .await?;
            sqlx::query("UPDATE streams SET head = $1, state = $2, updated_at = $3 WHERE key = $4")
                .bind(seq(seq_end))
                .bind(state.as_str())
                .bind(now)
                .bind(meta.key)
                .execute(&mut *conn)
                .await?;
            meta.head = seq_end;
            meta.state = *state;
            meta.updated_at = now;
            let body = serde_json::to_string(&meta.to_json(hub.watchers_of(&req.stream)))
                .map_err(|e| sqlx::Error::Encode(Box::new(e)))?;
            remember(conn, &meta, req, 200, &body).await?;
            publish.push(Publish::Events {
                index,
                key: meta.key,
                epoch: meta.epoch.clone(),
                first_seq: seq_end,
                last_seq: seq_end,
            });
            Ok(WriteOutcome::Ended { meta })
        }
    }
}

/// The node's LISTEN connection, feeding its hub.
struct Listener {
    opts: PgConnectOptions,
    pool: PgPool,
    hub: Hub,
    page_size: u32,
    connect_timeout: Duration,
    metrics: Metrics,
    /// `pg_notification_queue_usage()` at the last check (f64 bits), for /readyz.
    queue_usage: Arc<AtomicU64>,
}

/// Groups wake-ups by stream (in order of first appearance), keeping only
/// watched streams; within a stream, a run of events of one epoch becomes one
/// range and a creation or deletion stays in its place.
fn coalesce<'a>(
    payloads: impl Iterator<Item = &'a str>,
    watched: impl Fn(&str) -> bool,
) -> Vec<(String, Vec<Wake>)> {
    let mut per: Vec<(String, Vec<Wake>)> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    for p in payloads {
        let Some((stream, wake)) = Wake::parse(p) else {
            continue;
        };
        if !watched(stream) {
            continue;
        }
        let i = *index.entry(stream.to_owned()).or_insert_with(|| {
            per.push((stream.to_owned(), Vec::new()));
            per.len() - 1
        });
        let list = &mut per[i].1;
        match (list.last_mut(), wake) {
            (
                Some(Wake::Events { epoch, first, last }),
                Wake::Events {
                    epoch: e,
                    first: f,
                    last: l,
                },
            ) if *epoch == e => {
                *first = (*first).min(f);
                *last = (*last).max(l);
            }
            (_, wake) => list.push(wake),
        }
    }
    per
}

/// Most wake-ups handled as one batch.
const WAKE_BATCH: usize = 1000;
/// Streams whose wake-ups are read in parallel.
const WAKE_STREAMS: usize = 8;

/// A wake-up from the NOTIFY channel.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Wake {
    /// Events `first..=last` of `epoch` were committed.
    Events {
        epoch: String,
        first: u64,
        last: u64,
    },
    /// The stream was created or deleted (or the payload was not understood).
    Changed,
}

impl Wake {
    /// `"{stream} {epoch} {first} {last}"` or `"{stream}"`.
    fn parse(payload: &str) -> Option<(&str, Wake)> {
        let mut parts = payload.split(' ');
        let stream = parts.next().filter(|s| !s.is_empty())?;
        let wake = match (parts.next(), parts.next(), parts.next()) {
            (Some(epoch), Some(first), Some(last)) => {
                match (first.parse::<u64>(), last.parse::<u64>()) {
                    (Ok(first), Ok(last)) if first >= 1 && last >= first => Wake::Events {
                        epoch: epoch.to_owned(),
                        first,
                        last,
                    },
                    _ => Wake::Changed,
                }
            }
            _ => Wake::Changed,
        };
        Some((stream, wake))
    }
}

impl Listener {
    async fn run(self, stop: CancellationToken) {
        let mut delay = Duration::from_millis(100);
        while !stop.is_cancelled() {
            let mut listener = match self.connect().await {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(error = %e, ?delay, "cannot listen for other nodes' appends; retrying");
                    // Sleep, or stop at shutdown.
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(delay) => {}
                    }
                    delay = (delay * 2).min(Duration::from_secs(5));
                    continue;
                }
            };
            delay = Duration::from_millis(100);
            // Wake-ups sent while no connection listened are lost: every
            // watcher here re-checks the store once.
            for stream in self.hub.watched() {
                self.hub.changed(&stream);
            }
            let mut ping = tokio::time::interval(LISTENER_PING);
            ping.tick().await;
            loop {
                // One line per branch: shutdown, a wake-up, or a periodic check of the link.
                tokio::select! {
                    _ = stop.cancelled() => return,
                    n = listener.try_recv() => match n {
                        Ok(Some(n)) => {
                            // Drain what is already buffered too, and handle it
                            // as one batch: coalesced per stream, streams in
                            // parallel, so a busy cluster never fills the
                            // NOTIFY queue behind a slow node.
                            let mut batch = vec![n.payload().to_owned()];
                            while batch.len() < WAKE_BATCH {
                                match listener.next_buffered() {
                                    Some(n) => batch.push(n.payload().to_owned()),
                                    None => break,
                                }
                            }
                            self.wake_all(batch).await;
                        }
                        Ok(None) => {
                            tracing::warn!("listener connection lost; reconnecting and re-syncing watched streams");
                            break;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "listener failed; reconnecting and re-syncing watched streams");
                            break;
                        }
                    },
                    _ = ping.tick() => {
                        // The link's check doubles as a look at the cluster's NOTIFY queue.
                        let alive = tokio::time::timeout(
                            self.connect_timeout,
                            sqlx::query_scalar::<_, f64>("SELECT pg_notification_queue_usage()")
                                .fetch_one(&mut listener),
                        ).await;
                        if let Ok(Ok(usage)) = alive {
                            self.queue_usage.store(usage.to_bits(), Ordering::Relaxed);
                            self.metrics.notify_queue_usage(usage);
                        }
                        if !matches!(alive, Ok(Ok(_))) {
                            tracing::warn!("listener connection does not answer; reconnecting and re-syncing watched streams");
                            break;
                        }
                    }
                }
            }
        }
    }

    async fn connect(&self) -> Result<PgListener, sqlx::Error> {
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(self.connect_timeout)
            .connect_lazy_with(self.opts.clone());
        let mut listener = PgListener::connect_with(&pool).await?;
        listener.listen(CHANNEL).await?;
        Ok(listener)
    }

    /// Handles a batch of wake-ups: those of one stream coalesced (runs of
    /// events of one epoch become one range; a creation or deletion stays
    /// in its place), streams handled in parallel, a few at a time.
    async fn wake_all(&self, payloads: Vec<String>) {
        let per = coalesce(payloads.iter().map(String::as_str), |s| {
            self.hub.is_watched(s)
        });
        futures::stream::iter(per)
            .for_each_concurrent(WAKE_STREAMS, |(stream, wakes)| async move {
                for wake in wakes {
                    self.wake(&stream, wake).await;
                }
            })
            .await;
    }

    /// Handles one (coalesced) wake-up of a watched stream.
    async fn wake(&self, stream: &str, wake: Wake) {
        let (epoch, first, last) = match &wake {
            Wake::Events { epoch, first, last } => (epoch.as_str(), *first, *last),
            Wake::Changed => return self.hub.changed(stream),
        };
        let mut after = match self.hub.ring_head(stream) {
            Some((e, head)) if &*e == epoch => {
                if head >= last {
                    return; // Published already (this node's own commit).
                }
                head
            }
            _ => first - 1,
        };
        for _ in 0..CATCH_UP_PAGES {
            let page = match read_page(&self.pool, stream, after, self.page_size).await {
                Ok(Some(page)) if page.meta.epoch == epoch => page,
                Ok(_) => return self.hub.changed(stream),
                Err(e) => {
                    // Watchers read the store themselves, with their backoff.
                    tracing::warn!(error = %e, stream, "cannot read a stream after a wake-up");
                    return self.hub.changed(stream);
                }
            };
            let (Some(first_event), Some(last_event)) = (page.events.first(), page.events.last())
            else {
                return;
            };
            let batch = Batch::encode(
                page.meta.key,
                epoch,
                first_event.seq,
                page.events
                    .iter()
                    .map(|e| (e.event_type.as_str(), e.data.as_str())),
                last_event.event_type == END_EVENT,
            );
            after = last_event.seq;
            self.hub.publish(stream, Arc::new(batch));
            if after >= last {
                return;
            }
        }
    }
}

#[cfg(test)]
mod wake_tests {
    use super::*;

    #[test]
    fn wakeups_are_coalesced_per_stream_in_order() {
        let payloads = [
            "a e1 1 2",
            "b e9 5 5",
            "a e1 3 3",
            "a e1 4 6",
            "x e2 1 1",
            "a",
            "a e2 1 1",
            "b e9 6 9",
            "a e2 garbage 1",
        ];
        let per = coalesce(payloads.into_iter(), |s| s != "x");
        let ev = |e: &str, first, last| Wake::Events {
            epoch: e.into(),
            first,
            last,
        };
        assert_eq!(
            per,
            vec![
                (
                    "a".to_owned(),
                    vec![ev("e1", 1, 6), Wake::Changed, ev("e2", 1, 1), Wake::Changed]
                ),
                ("b".to_owned(), vec![ev("e9", 5, 9)]),
            ]
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
            purge_pending: false,
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
