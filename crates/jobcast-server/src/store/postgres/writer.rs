//! The PostgreSQL writer task: commits what is queued as one transaction.

use std::time::{Duration, Instant};

use jobcast_protocol::END_EVENT;
use sqlx::postgres::{PgConnection, PgPool};
use sqlx::Row;
use tokio::sync::mpsc;

use super::{meta_from_row, seq, Cmd, CHANNEL, MAX_ATTEMPTS, META_COLUMNS, PURGE_EVERY, TICK};
use crate::hub::Hub;
use crate::store::group::{
    fail_group, publish_and_answer, size_of, PingReply, Publish, Reply, Retention, GROUP_MAX_BYTES,
    GROUP_MAX_EVENTS, PURGE_CHUNK, SWEEP_EVERY, SWEEP_KEYS, SWEEP_STREAMS,
};
use crate::store::{
    append_response_body, Refusal, StoreError, StreamMeta, WriteOp, WriteOutcome, WriteRequest,
};

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
pub(super) struct Writer {
    pub(super) pool: PgPool,
    pub(super) hub: Hub,
    pub(super) retention: Retention,
    pub(super) purge_pending: bool,
    pub(super) next_sweep: Instant,
    pub(super) next_purge: Instant,
}

impl Writer {
    pub(super) async fn run(mut self, mut rx: mpsc::Receiver<Cmd>) {
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

    pub(super) async fn housekeeping(&mut self) {
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
