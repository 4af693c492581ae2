//! SQLite backend: one writer connection owned by the writer task (group
//! commit), a small read-only pool for pages, WAL mode.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use futures::TryStreamExt;
use jobcast_protocol::{StreamState, END_EVENT};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteRow, SqliteSynchronous,
};
use sqlx::{Connection, QueryBuilder, Row, Sqlite};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{
    append_response_body, ListQuery, Page, Refusal, StoreError, StoredEvent, StreamMeta, WriteOp,
    WriteOutcome, WriteRequest,
};
use crate::config::{Config, SyncMode};
use crate::hub::{Batch, Hub};
use crate::metrics::Metrics;

/// Most events committed in one transaction (a group never waits to fill).
const GROUP_MAX_EVENTS: usize = 1000;
/// Most data bytes committed in one transaction.
const GROUP_MAX_BYTES: usize = 4 << 20;
/// A store page stops after this many bytes of data (and at least one event).
const PAGE_BYTES: usize = 1 << 20;
/// Events of deleted streams removed per purge step.
const PURGE_CHUNK: i64 = 5000;
/// Pause between purge steps, so purging never hogs the writer.
const PURGE_EVERY: Duration = Duration::from_millis(50);

type Reply = oneshot::Sender<Result<WriteOutcome, StoreError>>;

/// The SQLite store: a handle to the writer task and the read pool.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// Bounded: producers wait for room rather than queueing without limit.
    tx: mpsc::Sender<(WriteRequest, Reply)>,
    pool: SqlitePool,
    stop: CancellationToken,
    tasks: TaskTracker,
    metrics: Metrics,
}

const META_COLUMNS: &str = "key, id, epoch, state, head, first_seq, created_at, updated_at";

fn meta_from_row(row: &SqliteRow) -> Result<StreamMeta, sqlx::Error> {
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
            .connect_with(opts.read_only(true))
            .await?;
        let (tx, rx) = mpsc::channel(4096);
        let stop = CancellationToken::new();
        let tasks = TaskTracker::new();
        let purge_pending = sqlx::query("SELECT 1 FROM purge LIMIT 1")
            .fetch_optional(&mut conn)
            .await?
            .is_some();
        let writer = Writer {
            conn,
            hub,
            purge_pending,
            retention: Retention {
                ttl_ms: config.retention_ttl.as_millis().min(i64::MAX as u128) as i64,
                max_events: config.max_events_per_stream,
                idempotency_ttl_ms: config.idempotency_ttl.as_millis().min(i64::MAX as u128) as i64,
                interval: config.retention_interval,
            },
        };
        // The one writer task: every write goes through it, in order.
        tasks.spawn(writer.run(rx, stop.clone()));
        tasks.close();
        Ok(SqliteStore {
            inner: Arc::new(Inner {
                tx,
                pool,
                stop,
                tasks,
                metrics,
            }),
        })
    }

    pub(super) fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    pub(super) async fn write(&self, req: WriteRequest) -> Result<WriteOutcome, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.inner
            .tx
            .send((req, reply))
            .await
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
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
        if let Some(state) = q.state {
            qb.push(" AND state = ").push_bind(state.as_str());
        }
        if let Some(before) = q.before_key {
            qb.push(" AND key < ").push_bind(before);
        }
        qb.push(" ORDER BY key DESC LIMIT ")
            .push_bind(q.limit as i64);
        let rows = qb.build().fetch_all(&self.inner.pool).await?;
        Ok(rows.iter().map(meta_from_row).collect::<Result<_, _>>()?)
    }

    pub(super) async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.inner.pool).await?;
        Ok(())
    }

    pub(super) async fn close(&self) {
        self.inner.stop.cancel();
        self.inner.tasks.wait().await;
        self.inner.pool.close().await;
    }
}

/// The writer task's state.
struct Writer {
    conn: SqliteConnection,
    hub: Hub,
    purge_pending: bool,
    retention: Retention,
}

/// What retention keeps.
#[derive(Debug, Clone, Copy)]
struct Retention {
    ttl_ms: i64,
    max_events: Option<u64>,
    idempotency_ttl_ms: i64,
    interval: Duration,
}

/// What to tell the hub once the transaction committed.
enum Publish {
    /// The events of request `index` of the group were committed from `first_seq`.
    Events {
        index: usize,
        epoch: String,
        first_seq: u64,
    },
    /// The stream was created, deleted or replaced.
    Changed(String),
}

/// Encodes a committed request's events for the hub. Called after COMMIT:
/// a watcher subscribing after this check reads the store after the commit,
/// one subscribing before it gets the batch.
fn encode(req: &WriteRequest, epoch: &str, first_seq: u64) -> Option<Batch> {
    match &req.op {
        WriteOp::Append(events) => Some(Batch::encode(
            epoch,
            first_seq,
            events
                .iter()
                .map(|e| (e.event_type.as_str(), e.data.as_str())),
            false,
        )),
        WriteOp::End { data, .. } => Some(Batch::encode(
            epoch,
            first_seq,
            [(END_EVENT, data.as_str())],
            true,
        )),
        WriteOp::Create | WriteOp::Delete => None,
    }
}

fn size_of(req: &WriteRequest) -> (usize, usize) {
    match &req.op {
        WriteOp::Append(events) => (events.len(), events.iter().map(|e| e.data.len()).sum()),
        WriteOp::End { data, .. } => (1, data.len()),
        WriteOp::Create | WriteOp::Delete => (1, 0),
    }
}

impl Writer {
    async fn run(mut self, mut rx: mpsc::Receiver<(WriteRequest, Reply)>, stop: CancellationToken) {
        let mut group: Vec<(WriteRequest, Reply)> = Vec::new();
        let mut next_sweep = tokio::time::Instant::now();
        let mut next_purge = tokio::time::Instant::now();
        loop {
            // Housekeeping also runs between groups, so steady writes cannot starve it.
            let now = tokio::time::Instant::now();
            if now >= next_sweep {
                self.expire().await;
                next_sweep = now + self.retention.interval;
            }
            if self.purge_pending && now >= next_purge {
                self.purge_step().await;
                next_purge = now + PURGE_EVERY;
            }
            let wake = if self.purge_pending {
                next_sweep.min(next_purge)
            } else {
                next_sweep
            };
            let first = tokio::select! {
                // Queued writes first: at shutdown, what was accepted is committed.
                biased;
                msg = rx.recv() => match msg {
                    Some(m) => m,
                    None => break,
                },
                _ = stop.cancelled() => {
                    rx.close();
                    continue;
                }
                _ = tokio::time::sleep_until(wake) => continue,
            };
            let (mut events, mut bytes) = size_of(&first.0);
            group.push(first);
            // Take whatever else is queued, never waiting for the group to fill.
            while events < GROUP_MAX_EVENTS && bytes < GROUP_MAX_BYTES {
                match rx.try_recv() {
                    Ok(m) => {
                        let (e, b) = size_of(&m.0);
                        events += e;
                        bytes += b;
                        group.push(m);
                    }
                    Err(_) => break,
                }
            }
            self.commit_group(&mut group).await;
        }
        if let Err(e) = self.conn.close().await {
            tracing::warn!(error = %e, "closing the writer connection failed");
        }
    }

    async fn commit_group(&mut self, group: &mut Vec<(WriteRequest, Reply)>) {
        let mut outcomes = Vec::with_capacity(group.len());
        let mut publish = Vec::new();
        let result: Result<(), sqlx::Error> = async {
            let mut tx = self.conn.begin_with("BEGIN IMMEDIATE").await?;
            for (index, (req, _)) in group.iter().enumerate() {
                outcomes.push(
                    apply(
                        &mut tx,
                        &self.hub,
                        self.retention.max_events,
                        index,
                        req,
                        &mut publish,
                    )
                    .await?,
                );
            }
            tx.commit().await
        }
        .await;
        match result {
            Ok(()) => {
                // Publish before answering: a producer that went away after
                // the commit must not leave watchers without the batch.
                for p in publish {
                    match p {
                        Publish::Events {
                            index,
                            epoch,
                            first_seq,
                        } => {
                            let req = &group[index].0;
                            if self.hub.is_watched(&req.stream) {
                                if let Some(batch) = encode(req, &epoch, first_seq) {
                                    self.hub.publish(&req.stream, Arc::new(batch));
                                }
                            }
                        }
                        Publish::Changed(stream) => {
                            self.purge_pending = true;
                            self.hub.changed(&stream)
                        }
                    }
                }
                for ((_, reply), outcome) in group.drain(..).zip(outcomes) {
                    let _ = reply.send(Ok(outcome));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, writes = group.len(), "store write failed; nothing was committed");
                for (_, reply) in group.drain(..) {
                    let _ = reply.send(Err(StoreError::Unavailable(clone_error(&e))));
                }
            }
        }
    }

    /// Deletes ended streams past their TTL (watchers are told, as for a
    /// delete) and idempotency keys past theirs.
    async fn expire(&mut self) {
        let now = now_ms();
        let result: Result<Vec<String>, sqlx::Error> = async {
            let mut tx = self.conn.begin_with("BEGIN IMMEDIATE").await?;
            let expired: Vec<(i64, String)> = sqlx::query_as(
                "SELECT key, id FROM streams WHERE state != 'open' AND updated_at < ? LIMIT 1000",
            )
            .bind(now.saturating_sub(self.retention.ttl_ms))
            .fetch_all(&mut *tx)
            .await?;
            for (key, _) in &expired {
                delete_stream(&mut tx, *key).await?;
            }
            sqlx::query("DELETE FROM idempotency WHERE created_at < ?")
                .bind(now.saturating_sub(self.retention.idempotency_ttl_ms))
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok(expired.into_iter().map(|(_, id)| id).collect())
        }
        .await;
        match result {
            Ok(ids) => {
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
            }
            Err(e) => tracing::warn!(error = %e, "retention sweep failed; will retry"),
        }
    }

    async fn purge_step(&mut self) {
        let result: Result<bool, sqlx::Error> = async {
            let Some(key) = sqlx::query_scalar::<_, i64>("SELECT stream_key FROM purge LIMIT 1")
                .fetch_optional(&mut self.conn)
                .await?
            else {
                return Ok(false);
            };
            let done = sqlx::query(
                "DELETE FROM events WHERE stream_key = ?1 AND seq < \
                 (SELECT MIN(seq) FROM events WHERE stream_key = ?1) + ?2",
            )
            .bind(key)
            .bind(PURGE_CHUNK)
            .execute(&mut self.conn)
            .await?
            .rows_affected()
                == 0;
            if done {
                let mut tx = self.conn.begin_with("BEGIN IMMEDIATE").await?;
                sqlx::query("DELETE FROM idempotency WHERE stream_key = ?")
                    .bind(key)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query("DELETE FROM purge WHERE stream_key = ?")
                    .bind(key)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
            }
            Ok(true)
        }
        .await;
        match result {
            Ok(more) => self.purge_pending = more,
            Err(e) => tracing::warn!(error = %e, "purging a deleted stream failed; will retry"),
        }
    }
}

/// sqlx errors are not Clone; every caller of a failed group gets the same message.
fn clone_error(e: &sqlx::Error) -> sqlx::Error {
    sqlx::Error::Protocol(e.to_string())
}

fn now_ms() -> i64 {
    crate::time::now_ms()
}

async fn lookup(
    conn: &mut SqliteConnection,
    stream: &str,
) -> Result<Option<StreamMeta>, sqlx::Error> {
    let row = sqlx::query(&format!("SELECT {META_COLUMNS} FROM streams WHERE id = ?"))
        .bind(stream)
        .fetch_optional(&mut *conn)
        .await?;
    row.as_ref().map(meta_from_row).transpose()
}

/// Removes a stream's row (freeing its id) and queues its events for purging.
async fn delete_stream(conn: &mut SqliteConnection, key: i64) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM streams WHERE key = ?")
        .bind(key)
        .execute(&mut *conn)
        .await?;
    sqlx::query("INSERT INTO purge (stream_key) VALUES (?)")
        .bind(key)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Trims the oldest events so that at most `max` are kept.
async fn trim(
    conn: &mut SqliteConnection,
    meta: &mut StreamMeta,
    max: u64,
) -> Result<(), sqlx::Error> {
    let kept = meta.head + 1 - meta.first_seq;
    if kept <= max {
        return Ok(());
    }
    let first = meta.head + 1 - max;
    sqlx::query("DELETE FROM events WHERE stream_key = ? AND seq < ?")
        .bind(meta.key)
        .bind(first as i64)
        .execute(&mut *conn)
        .await?;
    sqlx::query("UPDATE streams SET first_seq = ? WHERE key = ?")
        .bind(first as i64)
        .bind(meta.key)
        .execute(&mut *conn)
        .await?;
    meta.first_seq = first;
    Ok(())
}

async fn create(conn: &mut SqliteConnection, stream: &str) -> Result<StreamMeta, sqlx::Error> {
    let now = now_ms();
    let epoch = crate::time::new_epoch();
    let key: i64 = sqlx::query_scalar(
        "INSERT INTO streams (id, epoch, state, head, first_seq, created_at, updated_at) \
         VALUES (?, ?, 'open', 0, 1, ?, ?) RETURNING key",
    )
    .bind(stream)
    .bind(&epoch)
    .bind(now)
    .bind(now)
    .fetch_one(&mut *conn)
    .await?;
    Ok(StreamMeta {
        id: stream.to_owned(),
        key,
        epoch,
        state: StreamState::Open,
        head: 0,
        first_seq: 1,
        created_at: now,
        updated_at: now,
    })
}

/// A previous answer to the same Idempotency-Key, or a refusal when the key
/// came with another request.
async fn idempotent_replay(
    conn: &mut SqliteConnection,
    meta: &StreamMeta,
    req: &WriteRequest,
) -> Result<Option<WriteOutcome>, sqlx::Error> {
    let Some(idem) = &req.idempotency else {
        return Ok(None);
    };
    let row =
        sqlx::query("SELECT hash, status, body FROM idempotency WHERE stream_key = ? AND key = ?")
            .bind(meta.key)
            .bind(&idem.key)
            .fetch_optional(&mut *conn)
            .await?;
    let Some(row) = row else { return Ok(None) };
    let hash: Vec<u8> = row.try_get("hash")?;
    if hash != idem.hash {
        return Ok(Some(WriteOutcome::Refused(Refusal::IdempotencyKeyReused)));
    }
    Ok(Some(WriteOutcome::Replayed {
        status: row.try_get::<i64, _>("status")? as u16,
        body: row.try_get("body")?,
    }))
}

async fn remember(
    conn: &mut SqliteConnection,
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
         VALUES (?, ?, ?, ?, ?, ?)",
    )
    .bind(meta.key)
    .bind(&idem.key)
    .bind(&idem.hash[..])
    .bind(status as i64)
    .bind(body)
    .bind(now_ms())
    .execute(&mut *conn)
    .await?;
    Ok(())
}

async fn insert_events<'a>(
    conn: &mut SqliteConnection,
    key: i64,
    first_seq: u64,
    time: i64,
    events: impl Iterator<Item = (&'a str, &'a str)>,
) -> Result<(), sqlx::Error> {
    let mut qb =
        QueryBuilder::<Sqlite>::new("INSERT INTO events (stream_key, seq, type, data, time) ");
    let mut seq = first_seq as i64;
    qb.push_values(events, |mut row, (ty, data)| {
        row.push_bind(key)
            .push_bind(seq)
            .push_bind(ty)
            .push_bind(data)
            .push_bind(time);
        seq += 1;
    });
    qb.build().execute(&mut *conn).await?;
    Ok(())
}

/// Applies one request inside the group's transaction. A refusal is decided
/// before anything is written for that request, so it changes nothing.
async fn apply(
    conn: &mut SqliteConnection,
    hub: &Hub,
    max_events: Option<u64>,
    index: usize,
    req: &WriteRequest,
    publish: &mut Vec<Publish>,
) -> Result<WriteOutcome, sqlx::Error> {
    let existing = lookup(conn, &req.stream).await?;
    match &req.op {
        WriteOp::Create => Ok(match existing {
            Some(meta) => WriteOutcome::Created {
                meta,
                created: false,
            },
            None => {
                let meta = create(conn, &req.stream).await?;
                publish.push(Publish::Changed(req.stream.clone()));
                WriteOutcome::Created {
                    meta,
                    created: true,
                }
            }
        }),
        WriteOp::Delete => {
            let Some(meta) = existing else {
                return Ok(WriteOutcome::Refused(Refusal::NotFound));
            };
            delete_stream(conn, meta.key).await?;
            publish.push(Publish::Changed(req.stream.clone()));
            Ok(WriteOutcome::Deleted)
        }
        WriteOp::Append(events) => {
            let mut meta = match existing {
                Some(meta) => {
                    if let Some(replay) = idempotent_replay(conn, &meta, req).await? {
                        return Ok(replay);
                    }
                    meta
                }
                None => {
                    let meta = create(conn, &req.stream).await?;
                    publish.push(Publish::Changed(req.stream.clone()));
                    meta
                }
            };
            if meta.ended() {
                return Ok(WriteOutcome::Refused(Refusal::StreamEnded));
            }
            let first_seq = meta.head + 1;
            let last_seq = meta.head + events.len() as u64;
            let now = now_ms();
            let pairs = || {
                events
                    .iter()
                    .map(|e| (e.event_type.as_str(), e.data.as_str()))
            };
            insert_events(conn, meta.key, first_seq, now, pairs()).await?;
            sqlx::query("UPDATE streams SET head = ?, updated_at = ? WHERE key = ?")
                .bind(last_seq as i64)
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
                epoch: meta.epoch.clone(),
                first_seq,
            });
            Ok(WriteOutcome::Appended {
                epoch: meta.epoch,
                first_seq,
                last_seq,
            })
        }
        WriteOp::End { state, data } => {
            let Some(mut meta) = existing else {
                return Ok(WriteOutcome::Refused(Refusal::NotFound));
            };
            if let Some(replay) = idempotent_replay(conn, &meta, req).await? {
                return Ok(replay);
            }
            if meta.ended() {
                return Ok(WriteOutcome::Refused(Refusal::StreamEnded));
            }
            let seq = meta.head + 1;
            let now = now_ms();
            insert_events(
                conn,
                meta.key,
                seq,
                now,
                std::iter::once((END_EVENT, data.as_str())),
            )
            .await?;
            sqlx::query("UPDATE streams SET head = ?, state = ?, updated_at = ? WHERE key = ?")
                .bind(seq as i64)
                .bind(state.as_str())
                .bind(now)
                .bind(meta.key)
                .execute(&mut *conn)
                .await?;
            meta.head = seq;
            meta.state = *state;
            meta.updated_at = now;
            let body = serde_json::to_string(&meta.to_json(hub.watchers_of(&req.stream)))
                .map_err(|e| sqlx::Error::Protocol(e.to_string()))?;
            remember(conn, &meta, req, 200, &body).await?;
            publish.push(Publish::Events {
                index,
                epoch: meta.epoch.clone(),
                first_seq: seq,
            });
            Ok(WriteOutcome::Ended { meta })
        }
    }
}
