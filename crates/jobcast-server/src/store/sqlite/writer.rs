//! The one writer of the SQLite store: an OS thread that owns the write
//! connection (rusqlite) and commits whatever is queued as one transaction.
//!
//! Why a thread and not async statements: every statement through an async
//! driver is a round trip between a runtime worker and the driver's thread.
//! A single-event append took ~10 context switches that way. Here a whole
//! group is executed in place, and the thread wakes once per group.
//!
//! Right after COMMIT, before answering, the committed batches are published
//! to the hub in seq order per stream: a producer that went away after the
//! commit cannot leave watchers without its batch.

use std::time::{Duration, Instant};

use jobcast_protocol::StreamState;
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use tokio::sync::mpsc;

use crate::hub::Hub;
use crate::store::group::{
    cut, decide, fail_group, publish_and_answer, Found, Group, PingReply, Plan, Remembered, Reply,
    Retention, Wanted, PURGE_CHUNK, SWEEP_EVERY, SWEEP_KEYS, SWEEP_STREAMS,
};
use crate::store::{labels_to_text, StoreError, StreamMeta, WriteRequest, META_COLUMNS};

/// Pause between purge steps, so purging never hogs the writer.
const PURGE_EVERY: Duration = Duration::from_millis(50);

/// Ended streams past their TTL (`?1`: the cut-off time, `?2`: how many);
/// found through the partial index `streams_ended`.
const EXPIRED_STREAMS: &str =
    "SELECT key, id FROM streams WHERE state <> 'open' AND updated_at < ?1 LIMIT ?2";
/// Deletes idempotency keys past their TTL (`?1`: the cut-off time, `?2`:
/// how many), found through `idempotency_created`. SQLite has no `DELETE …
/// LIMIT` by default, and the table has no rowid: the key columns select.
const EXPIRED_KEYS: &str = "DELETE FROM idempotency WHERE (stream_key, key) IN \
     (SELECT stream_key, key FROM idempotency WHERE created_at < ?1 LIMIT ?2)";

/// How often the checkpointer copies the WAL back into the database.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(250);
/// WAL frames (pages) past which a checkpoint may briefly block writers to
/// bound the file (reached only when readers keep old snapshots open).
const WAL_LIMIT_FRAMES: i64 = 64 * 1024;

/// What the writer thread is sent.
#[derive(Debug)]
pub(super) enum Cmd {
    /// A write and where to answer it.
    Write(WriteRequest, Reply),
    /// Readiness: answer after a `SELECT 1` on the write connection.
    Ping(PingReply),
    /// Time passed: run housekeeping that is due.
    Tick,
    /// Commit what is queued before this, then stop.
    Stop,
    /// A Durable Streams write, in its own transaction (after the group before it).
    Ds(crate::store::ds::DsWrite, DsReply),
}

/// The answer to a DS write.
pub(super) type DsReply =
    tokio::sync::oneshot::Sender<Result<crate::store::ds::DsOutcome, StoreError>>;

/// The writer thread's state.
pub(super) struct Writer {
    conn: Connection,
    hub: Hub,
    retention: Retention,
    purge_pending: bool,
    next_sweep: Instant,
    next_purge: Instant,
    /// Dropped when the writer stops, which stops the checkpointer.
    checkpointer: Option<(std::sync::mpsc::Sender<()>, std::thread::JoinHandle<()>)>,
}

fn unavailable(e: rusqlite::Error) -> StoreError {
    StoreError::Unavailable(Box::new(e))
}

fn meta_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<StreamMeta> {
    let state: String = row.get(3)?;
    Ok(StreamMeta {
        key: row.get(0)?,
        id: row.get(1)?,
        epoch: row.get(2)?,
        state: StreamState::parse(&state).ok_or_else(|| {
            rusqlite::Error::FromSqlConversionFailure(
                3,
                rusqlite::types::Type::Text,
                format!("unknown state {state:?}").into(),
            )
        })?,
        head: row.get::<_, i64>(4)? as u64,
        first_seq: row.get::<_, i64>(5)? as u64,
        created_at: row.get(6)?,
        updated_at: row.get(7)?,
        labels: crate::store::labels_from_text(&row.get::<_, String>(8)?).map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(8, rusqlite::types::Type::Text, Box::new(e))
        })?,
        cancel_requested: row.get(9)?,
    })
}

impl Writer {
    /// Opens the write connection on `path` (already migrated).
    pub(super) fn open(
        path: &std::path::Path,
        full_sync: bool,
        busy_timeout: Duration,
        hub: Hub,
        retention: Retention,
    ) -> Result<Writer, StoreError> {
        let conn = Connection::open(path).map_err(unavailable)?;
        conn.busy_timeout(busy_timeout).map_err(unavailable)?;
        conn.set_prepared_statement_cache_capacity(64);
        conn.execute_batch(&format!(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = {}; \
             PRAGMA journal_size_limit = {}; PRAGMA foreign_keys = OFF; \
             PRAGMA wal_autocheckpoint = 0;",
            if full_sync { "FULL" } else { "NORMAL" },
            64 * 1024 * 1024
        ))
        .map_err(unavailable)?;
        let purge_pending = conn
            .query_row("SELECT 1 FROM purge LIMIT 1", [], |_| Ok(()))
            .optional()
            .map_err(unavailable)?
            .is_some();
        let checkpointer = spawn_checkpointer(path, busy_timeout)?;
        let now = Instant::now();
        Ok(Writer {
            conn,
            hub,
            retention,
            purge_pending,
            next_sweep: now,
            next_purge: now,
            checkpointer: Some(checkpointer),
        })
    }

    /// The thread's loop: until `Stop` (or every sender is gone), commit
    /// groups and run housekeeping when it is due.
    pub(super) fn run(mut self, mut rx: mpsc::Receiver<Cmd>) {
        let mut group = Group::default();
        let mut pings: Vec<PingReply> = Vec::new();
        let mut stopping = false;
        let mut ds = None;
        while !stopping {
            let Some(first) = rx.blocking_recv() else {
                break;
            };
            match first {
                Cmd::Tick => {}
                Cmd::Stop => stopping = true,
                Cmd::Ping(reply) => pings.push(reply),
                Cmd::Ds(w, reply) => self.ds_write(&w, reply),
                Cmd::Write(req, reply) => {
                    group.push(req, reply);
                    // Take whatever else is queued, never waiting for the group to fill.
                    while group.has_room() {
                        match rx.try_recv() {
                            Ok(Cmd::Write(req, reply)) => group.push(req, reply),
                            Ok(Cmd::Tick) => {}
                            Ok(Cmd::Ping(reply)) => pings.push(reply),
                            Ok(Cmd::Stop) => {
                                stopping = true;
                                break;
                            }
                            Ok(Cmd::Ds(w, reply)) => {
                                ds = Some((w, reply));
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                    self.commit_group(&mut group.take());
                    if let Some((w, reply)) = ds.take() {
                        self.ds_write(&w, reply);
                    }
                }
            }
            // After the group: the answer says this thread still makes progress.
            for reply in pings.drain(..) {
                let alive = self.conn.query_row("SELECT 1", [], |_| Ok(()));
                let _ = reply.send(alive.map_err(unavailable));
            }
            // Also between groups, so steady writes cannot starve housekeeping.
            self.housekeeping();
        }
        // Answer anything that raced with the stop: nothing more is written.
        rx.close();
        while let Ok(cmd) = rx.try_recv() {
            match cmd {
                Cmd::Write(_, reply) => reply.send(Err(StoreError::Closed)),
                Cmd::Ds(_, reply) => {
                    let _ = reply.send(Err(StoreError::Closed));
                }
                _ => {}
            }
        }
        if let Some((stop, handle)) = self.checkpointer.take() {
            drop(stop);
            let _ = handle.join();
        }
    }

    /// One DS write in its own transaction; published after COMMIT, then answered.
    fn ds_write(&mut self, w: &crate::store::ds::DsWrite, reply: DsReply) {
        match crate::store::ds::sqlite::write(&mut self.conn, w) {
            Ok((outcome, publish)) => {
                for p in publish {
                    p.send(&self.hub);
                }
                let _ = reply.send(Ok(outcome));
            }
            Err(e) => {
                tracing::error!(error = %e, "DS write failed; nothing was committed");
                let _ = reply.send(Err(unavailable(e)));
            }
        }
    }

    fn housekeeping(&mut self) {
        let now = Instant::now();
        if now >= self.next_sweep {
            let more = self.expire();
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
            self.purge_step();
            self.next_purge = now + PURGE_EVERY;
        }
    }

    /// Commits the group, one transaction per [`cut`] of it.
    fn commit_group(&mut self, group: &mut Vec<(WriteRequest, Reply)>) {
        while !group.is_empty() {
            let part: Vec<_> = group.drain(..cut(group)).collect();
            let max_events = self.retention.max_events;
            let result = (|| -> rusqlite::Result<Plan<'_>> {
                let tx = self
                    .conn
                    .transaction_with_behavior(TransactionBehavior::Immediate)?;
                let found = load(&tx, &Wanted::of(&part))?;
                let plan = decide(&part, found, &self.hub, max_events);
                write(&tx, &plan)?;
                tx.commit()?;
                Ok(plan)
            })();
            match result {
                Ok(plan) => {
                    let (outcomes, publish) = (plan.outcomes, plan.publish);
                    if publish_and_answer(&self.hub, part, outcomes, publish) {
                        self.purge_pending = true;
                    }
                }
                Err(e) => fail_group(part, &e),
            }
        }
    }

    /// One sweep step: deletes up to [`SWEEP_STREAMS`] ended streams past
    /// their TTL (watchers are told, as for a delete) and up to
    /// [`SWEEP_KEYS`] idempotency keys past theirs, in one transaction.
    /// Whether more may remain.
    fn expire(&mut self) -> bool {
        let now = crate::time::now_ms();
        let (ttl, key_ttl) = (self.retention.ttl_ms, self.retention.idempotency_ttl_ms);
        let result = (|| -> rusqlite::Result<(Vec<(i64, String)>, usize)> {
            let tx = self
                .conn
                .transaction_with_behavior(TransactionBehavior::Immediate)?;
            let expired: Vec<(i64, String)> = {
                let mut stmt = tx.prepare_cached(EXPIRED_STREAMS)?;
                let rows = stmt
                    .query_map(params![now.saturating_sub(ttl), SWEEP_STREAMS], |r| {
                        Ok((r.get(0)?, r.get(1)?))
                    })?;
                rows.collect::<rusqlite::Result<_>>()?
            };
            for (key, _) in &expired {
                delete_stream(&tx, *key)?;
            }
            let keys = tx
                .prepare_cached(EXPIRED_KEYS)?
                .execute(params![now.saturating_sub(key_ttl), SWEEP_KEYS])?;
            tx.commit()?;
            Ok((expired, keys))
        })();
        match result {
            Ok((ids, keys)) => {
                let more = ids.len() as i64 >= SWEEP_STREAMS || keys as i64 >= SWEEP_KEYS;
                if !ids.is_empty() {
                    tracing::info!(
                        streams = ids.len(),
                        "deleted ended streams past their retention"
                    );
                    self.purge_pending = true;
                }
                for (key, id) in ids {
                    self.hub.deleted(&id, key);
                }
                more
            }
            Err(e) => {
                tracing::warn!(error = %e, "retention sweep failed; will retry");
                false
            }
        }
    }

    /// Removes one chunk of a deleted stream's events.
    fn purge_step(&mut self) {
        let result = (|| -> rusqlite::Result<bool> {
            let Some(key) = self
                .conn
                .query_row("SELECT stream_key FROM purge LIMIT 1", [], |r| {
                    r.get::<_, i64>(0)
                })
                .optional()?
            else {
                return Ok(false);
            };
            let removed = self.conn.execute(
                "DELETE FROM events WHERE stream_key = ?1 AND seq < \
                 (SELECT MIN(seq) FROM events WHERE stream_key = ?1) + ?2",
                params![key, PURGE_CHUNK],
            )?;
            if removed == 0 {
                let tx = self
                    .conn
                    .transaction_with_behavior(TransactionBehavior::Immediate)?;
                tx.execute("DELETE FROM idempotency WHERE stream_key = ?", [key])?;
                tx.execute("DELETE FROM purge WHERE stream_key = ?", [key])?;
                tx.commit()?;
            }
            Ok(true)
        })();
        match result {
            Ok(more) => self.purge_pending = more,
            Err(e) => tracing::warn!(error = %e, "purging a deleted stream failed; will retry"),
        }
    }
}

/// Starts the checkpointer: a thread with its own connection that copies the
/// WAL back into the database every [`CHECKPOINT_EVERY`]. The writer turns
/// SQLite's automatic checkpoints off, so no commit ever pays for one (they
/// took milliseconds every few hundred commits: the tail of append latency).
/// PASSIVE checkpoints never wait for the writer; the WAL is reused from its
/// start once a checkpoint caught up and no reader needs old frames.
fn spawn_checkpointer(
    path: &std::path::Path,
    busy_timeout: Duration,
) -> Result<(std::sync::mpsc::Sender<()>, std::thread::JoinHandle<()>), StoreError> {
    let conn = Connection::open(path).map_err(unavailable)?;
    conn.busy_timeout(busy_timeout).map_err(unavailable)?;
    let (stop, stopped) = std::sync::mpsc::channel::<()>();
    let handle = std::thread::Builder::new()
        .name("jobcast-checkpoint".into())
        .spawn(move || {
            // Runs until the writer drops `stop`.
            while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                stopped.recv_timeout(CHECKPOINT_EVERY)
            {
                if let Err(e) = checkpoint(&conn) {
                    tracing::warn!(error = %e, "WAL checkpoint failed; will retry");
                }
            }
        })
        .map_err(|e| StoreError::Unavailable(Box::new(e)))?;
    Ok((stop, handle))
}

fn checkpoint(conn: &Connection) -> rusqlite::Result<()> {
    let frames = |mode: &str| {
        conn.query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |r| {
            Ok((r.get::<_, i64>(1)?, r.get::<_, i64>(2)?))
        })
    };
    let (log, done) = frames("PASSIVE")?;
    if log > WAL_LIMIT_FRAMES && done < log {
        frames("RESTART")?;
    }
    Ok(())
}

fn lookup(conn: &Connection, stream: &str) -> rusqlite::Result<Option<StreamMeta>> {
    conn.prepare_cached(&format!("SELECT {META_COLUMNS} FROM streams WHERE id = ?"))?
        .query_row([stream], meta_from_row)
        .optional()
}

/// Removes a stream's row (freeing its id) and queues its events for purging.
fn delete_stream(conn: &Connection, key: i64) -> rusqlite::Result<()> {
    conn.prepare_cached("DELETE FROM streams WHERE key = ?")?
        .execute([key])?;
    conn.prepare_cached("INSERT INTO purge (stream_key) VALUES (?)")?
        .execute([key])?;
    Ok(())
}

fn create(conn: &Connection, stream: &str) -> rusqlite::Result<StreamMeta> {
    let now = crate::time::now_ms();
    let epoch = crate::time::new_epoch();
    let key: i64 = conn
        .prepare_cached(
            "INSERT INTO streams (id, epoch, state, head, first_seq, created_at, updated_at) \
             VALUES (?, ?, 'open', 0, 1, ?, ?) RETURNING key",
        )?
        .query_row(params![stream, epoch, now, now], |r| r.get(0))?;
    Ok(StreamMeta {
        id: stream.to_owned(),
        key,
        epoch,
        state: StreamState::Open,
        head: 0,
        first_seq: 1,
        created_at: now,
        updated_at: now,
        labels: Default::default(),
        cancel_requested: false,
    })
}

/// The read phase of a transaction: the wanted streams (creating those to
/// be created when missing) and the remembered answers of its keys.
fn load(conn: &Connection, wanted: &Wanted<'_>) -> rusqlite::Result<Found> {
    let mut found = Found::default();
    for &(stream, creates) in &wanted.streams {
        let row = match lookup(conn, stream)? {
            Some(meta) => Some((meta, false)),
            None if creates => Some((create(conn, stream)?, true)),
            None => None,
        };
        if let Some(row) = row {
            found.streams.insert(stream.to_owned(), row);
        }
    }
    let mut stmt = conn.prepare_cached(
        "SELECT hash, status, body FROM idempotency WHERE stream_key = ? AND key = ?",
    )?;
    for &(stream, key) in &wanted.keys {
        let Some((meta, false)) = found.streams.get(stream) else {
            continue;
        };
        let remembered = stmt
            .query_row(params![meta.key, key], |r| {
                Ok(Remembered {
                    hash: r.get(0)?,
                    status: r.get::<_, i64>(1)? as u16,
                    body: r.get(2)?,
                })
            })
            .optional()?;
        if let Some(r) = remembered {
            found.keys.insert((meta.key, key.to_owned()), r);
        }
    }
    Ok(found)
}

/// The write phase: executes the plan row by row (in process, so a
/// statement costs no round trip).
fn write(conn: &Connection, plan: &Plan<'_>) -> rusqlite::Result<()> {
    let mut insert = conn.prepare_cached(
        "INSERT INTO events (stream_key, seq, type, data, time) VALUES (?, ?, ?, ?, ?)",
    )?;
    for e in &plan.events {
        insert.execute(params![e.key, e.seq as i64, e.event_type, e.data, e.time])?;
    }
    let mut update = conn.prepare_cached(
        "UPDATE streams SET head = ?, state = ?, first_seq = ?, updated_at = ?, labels = ?, \
         cancel_requested = ? WHERE key = ?",
    )?;
    for m in &plan.streams {
        update.execute(params![
            m.head as i64,
            m.state.as_str(),
            m.first_seq as i64,
            m.updated_at,
            labels_to_text(&m.labels),
            m.cancel_requested,
            m.key
        ])?;
    }
    let mut trim = conn.prepare_cached("DELETE FROM events WHERE stream_key = ? AND seq < ?")?;
    for &(key, first) in &plan.trims {
        trim.execute(params![key, first as i64])?;
    }
    let mut remember = conn.prepare_cached(
        "INSERT INTO idempotency (stream_key, key, hash, status, body, created_at) \
         VALUES (?, ?, ?, ?, ?, ?)",
    )?;
    for k in &plan.keys {
        remember.execute(params![
            k.stream_key,
            k.key,
            &k.hash[..],
            k.status as i64,
            k.body,
            k.time
        ])?;
    }
    for &key in &plan.deletes {
        delete_stream(conn, key)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection};
    use sqlx::Connection as _;

    const CHUNK: i64 = SWEEP_KEYS;

    /// A database file with the migrations applied.
    async fn migrated() -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let opts = SqliteConnectOptions::new()
            .filename(&path)
            .create_if_missing(true);
        let mut conn = SqliteConnection::connect_with(&opts).await.unwrap();
        sqlx::migrate!("./migrations/sqlite")
            .run(&mut conn)
            .await
            .unwrap();
        conn.close().await.unwrap();
        (dir, path)
    }

    /// `EXPLAIN QUERY PLAN` of `sql`, its parameters bound to NULL, one line per step.
    fn plan(conn: &Connection, sql: &str) -> String {
        let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
        let nulls = vec![rusqlite::types::Null; stmt.parameter_count()];
        let rows = stmt
            .query_map(rusqlite::params_from_iter(nulls), |r| r.get::<_, String>(3))
            .unwrap();
        rows.collect::<rusqlite::Result<Vec<_>>>()
            .unwrap()
            .join("\n")
    }

    fn retention() -> Retention {
        Retention {
            ttl_ms: 3_600_000,
            max_events: None,
            idempotency_ttl_ms: 3_600_000,
            interval: Duration::from_secs(3600),
        }
    }

    /// The sweep runs inside the single writer's transaction: its statements
    /// must find expired rows through an index, never by reading the table.
    #[tokio::test]
    async fn sweep_statements_use_indexes() {
        let (_dir, path) = migrated().await;
        let conn = Connection::open(&path).unwrap();
        for (sql, index, point) in [
            (EXPIRED_STREAMS, "streams_ended", None),
            // Each selected key is then deleted by its whole primary key
            // (older SQLite used only `stream_key`: every key of the stream).
            (
                EXPIRED_KEYS,
                "idempotency_created",
                Some("SEARCH idempotency USING PRIMARY KEY (stream_key=? AND key=?)"),
            ),
        ] {
            let plan = plan(&conn, sql);
            assert!(
                !plan.contains("SCAN"),
                "{sql}\nreads a whole table:\n{plan}"
            );
            assert!(
                plan.contains(&format!("USING INDEX {index} "))
                    || plan.contains(&format!("USING COVERING INDEX {index} ")),
                "{sql}\ndoes not use {index}:\n{plan}"
            );
            if let Some(point) = point {
                assert!(plan.contains(point), "{sql}\nis not `{point}`:\n{plan}");
            }
        }
    }

    /// Expired keys go in bounded chunks, one per transaction, and the next
    /// chunk follows soon after (not a whole retention interval later).
    #[tokio::test]
    async fn expired_keys_are_deleted_in_chunks() {
        let (_dir, path) = migrated().await;
        let mut w = Writer::open(
            &path,
            false,
            Duration::from_secs(5),
            Hub::new(1 << 20),
            retention(),
        )
        .unwrap();
        let expired = 2 * CHUNK + 2000;
        let now = crate::time::now_ms();
        {
            let tx = w.conn.transaction().unwrap();
            let mut insert = tx
                .prepare(
                    "INSERT INTO idempotency (stream_key, key, hash, status, body, created_at) \
                     VALUES (1, ?, x'00', 201, '{}', ?)",
                )
                .unwrap();
            for i in 0..expired {
                insert.execute(params![format!("old-{i}"), 0]).unwrap();
            }
            for i in 0..10 {
                insert.execute(params![format!("new-{i}"), now]).unwrap();
            }
            drop(insert);
            tx.commit().unwrap();
        }
        let count = |w: &Writer| -> i64 {
            w.conn
                .query_row("SELECT COUNT(*) FROM idempotency", [], |r| r.get(0))
                .unwrap()
        };
        // The first sweep is due at once and takes one chunk.
        w.housekeeping();
        assert_eq!(count(&w), expired + 10 - CHUNK);
        // The rest follows chunk by chunk, within the hour-long interval.
        let mut chunks = 1;
        let mut last = count(&w);
        let deadline = Instant::now() + Duration::from_secs(30);
        while last > 10 {
            assert!(
                Instant::now() < deadline,
                "the sweep stopped with {last} keys left"
            );
            std::thread::sleep(Duration::from_millis(10));
            w.housekeeping();
            let n = count(&w);
            if n != last {
                chunks += 1;
                assert!(last - n <= CHUNK, "one step deleted {} keys", last - n);
                last = n;
            }
        }
        assert_eq!(chunks, 3);
        assert_eq!(count(&w), 10, "fresh keys are kept");
    }
}
