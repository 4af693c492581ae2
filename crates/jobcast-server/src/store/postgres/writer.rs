//! The PostgreSQL writer task: commits what is queued as one transaction.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::postgres::{PgConnection, PgPool};
use sqlx::Row;
use tokio::sync::mpsc;

use super::{meta_from_row, seq, Cmd, CHANNEL, MAX_ATTEMPTS, META_COLUMNS, PURGE_EVERY, TICK};
use crate::hub::Hub;
use crate::store::group::{
    cut, decide, fail_group, publish_and_answer, Found, Group, PingReply, Plan, Publish,
    Remembered, Reply, Retention, Wanted, PURGE_CHUNK, SWEEP_EVERY, SWEEP_KEYS, SWEEP_STREAMS,
};
use crate::store::{labels_to_text, StoreError, WriteRequest};

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
fn retryable(e: &TxError) -> bool {
    match e {
        TxError::Raced(_) => true,
        // deadlock_detected, serialization_failure, unique_violation (a
        // creation raced with another node's).
        TxError::Db(sqlx::Error::Database(d)) => {
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
    /// Whether this writer runs the node's sweeps and purges.
    pub(super) housekeeper: bool,
    /// Whether deleted streams' events may remain (shared by the node's
    /// writers; the housekeeper purges).
    pub(super) purge_pending: Arc<AtomicBool>,
    pub(super) next_sweep: Instant,
    pub(super) next_purge: Instant,
}

impl Writer {
    pub(super) async fn run(mut self, mut rx: mpsc::Receiver<Cmd>) {
        let mut group = Group::default();
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
                        group.push(req, reply);
                        // Take whatever else is queued, never waiting for the group to fill.
                        while group.has_room() {
                            match rx.try_recv() {
                                Ok(Cmd::Write(req, reply)) => group.push(req, reply),
                                Ok(Cmd::Ping(reply)) => pings.push(reply),
                                Ok(Cmd::Stop) => {
                                    stopping = true;
                                    break;
                                }
                                Err(_) => break,
                            }
                        }
                        self.commit_group(&mut group.take()).await;
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
                reply.send(Err(StoreError::Closed));
            }
        }
    }

    /// Commits the group, one transaction per [`cut`] of it; a transaction
    /// PostgreSQL asks to retry (deadlock, serialization, a creation racing
    /// another node's) is tried again from its read phase.
    async fn commit_group(&mut self, group: &mut Vec<(WriteRequest, Reply)>) {
        while !group.is_empty() {
            let part: Vec<_> = group.drain(..cut(group)).collect();
            let mut attempt = 0;
            let result = loop {
                attempt += 1;
                match self.try_part(&part).await {
                    Ok(plan) => break Ok((plan.outcomes, plan.publish)),
                    Err(e) if attempt < MAX_ATTEMPTS && retryable(&e) => {
                        tracing::debug!(error = %e, attempt, "store write conflicted; trying again");
                        tokio::time::sleep(Duration::from_millis(5 * u64::from(attempt))).await;
                    }
                    Err(e) => break Err(e),
                }
            };
            match result {
                Ok((outcomes, publish)) => {
                    if publish_and_answer(&self.hub, part, outcomes, publish) {
                        self.purge_pending.store(true, Ordering::Relaxed);
                    }
                }
                Err(e) => fail_group(part, &e),
            }
        }
    }

    /// One transaction: BEGIN, the read phase (one statement, plus one when
    /// requests carry Idempotency-Keys), the plan, its one write statement
    /// (which also notifies every node), COMMIT — four or five round trips
    /// however many requests it holds.
    async fn try_part<'a>(&self, part: &'a [(WriteRequest, Reply)]) -> Result<Plan<'a>, TxError> {
        let mut tx = self.pool.begin().await?;
        let found = load(&mut tx, &Wanted::of(part)).await?;
        let plan = decide(part, found, &self.hub, self.retention.max_events);
        write(&mut tx, part, &plan).await?;
        tx.commit().await?;
        Ok(plan)
    }

    pub(super) async fn housekeeping(&mut self) {
        if !self.housekeeper {
            return;
        }
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
        if self.purge_pending.load(Ordering::Relaxed) && now >= self.next_purge {
            match self.purge_step().await {
                Ok(more) => self.purge_pending.store(more, Ordering::Relaxed),
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
            self.purge_pending.store(true, Ordering::Relaxed);
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

/// Why a transaction failed.
#[derive(Debug, thiserror::Error)]
enum TxError {
    /// PostgreSQL's error.
    #[error(transparent)]
    Db(#[from] sqlx::Error),
    /// A creation lost a race with another node's: the row appeared after
    /// the read phase's snapshot. The transaction is tried again.
    #[error("stream {0:?} was created by another transaction meanwhile")]
    Raced(String),
}

/// The read phase: locks every wanted stream's row in id order (the same
/// order on every node) and creates the missing ones to be created, in one
/// statement; then, in a second statement (so from a snapshot taken after
/// the locks were granted), the remembered answers of the keys.
async fn load(conn: &mut PgConnection, wanted: &Wanted<'_>) -> Result<Found, TxError> {
    let ids: Vec<&str> = wanted.streams.iter().map(|w| w.0).collect();
    let creates: Vec<&str> = wanted.streams.iter().filter(|w| w.1).map(|w| w.0).collect();
    let epochs: Vec<String> = creates.iter().map(|_| crate::time::new_epoch()).collect();
    let rows = sqlx::query(&format!(
        "WITH locked AS ( \
             SELECT {META_COLUMNS} FROM streams WHERE id = ANY($1) ORDER BY id FOR UPDATE), \
         created AS ( \
             INSERT INTO streams (id, epoch, state, head, first_seq, created_at, updated_at) \
             SELECT c.id, c.epoch, 'open', 0, 1, $4, $4 \
             FROM unnest($2::text[], $3::text[]) AS c(id, epoch) \
             WHERE NOT EXISTS (SELECT 1 FROM locked l WHERE l.id = c.id) \
             ORDER BY c.id ON CONFLICT (id) DO NOTHING RETURNING {META_COLUMNS}) \
         SELECT *, false AS created FROM locked \
         UNION ALL SELECT *, true AS created FROM created"
    ))
    .bind(&ids)
    .bind(&creates)
    .bind(&epochs)
    .bind(crate::time::now_ms())
    .fetch_all(&mut *conn)
    .await?;
    let mut found = Found::default();
    for row in &rows {
        let meta = meta_from_row(row)?;
        let created: bool = row.try_get("created")?;
        found.streams.insert(meta.id.clone(), (meta, created));
    }
    if let Some(missing) = creates.iter().find(|id| !found.streams.contains_key(**id)) {
        return Err(TxError::Raced((*missing).to_owned()));
    }
    let (stream_keys, keys): (Vec<i64>, Vec<&str>) = wanted
        .keys
        .iter()
        .filter_map(|&(stream, key)| match found.streams.get(stream) {
            Some((meta, false)) => Some((meta.key, key)),
            _ => None,
        })
        .unzip();
    if !keys.is_empty() {
        let rows = sqlx::query(
            "SELECT i.stream_key, i.key, i.hash, i.status, i.body FROM idempotency i \
             JOIN unnest($1::bigint[], $2::text[]) AS k(stream_key, key) \
               ON i.stream_key = k.stream_key AND i.key = k.key",
        )
        .bind(&stream_keys)
        .bind(&keys)
        .fetch_all(&mut *conn)
        .await?;
        for row in &rows {
            found.keys.insert(
                (row.try_get("stream_key")?, row.try_get("key")?),
                Remembered {
                    hash: row.try_get("hash")?,
                    status: row.try_get::<i32, _>("status")? as u16,
                    body: row.try_get("body")?,
                },
            );
        }
    }
    Ok(found)
}

/// The write phase, one statement: insert the events, move each stream's
/// row, trim, remember the answers, delete streams (queueing their events
/// for purging) and NOTIFY every node — delivered when, and only if, the
/// transaction commits.
async fn write(
    conn: &mut PgConnection,
    part: &[(WriteRequest, Reply)],
    plan: &Plan<'_>,
) -> Result<(), sqlx::Error> {
    let ev = &plan.events;
    let st = &plan.streams;
    let ks = &plan.keys;
    let payloads: Vec<String> = plan.publish.iter().map(|p| p.payload(part)).collect();
    sqlx::query(
        "WITH ev AS ( \
             INSERT INTO events (stream_key, seq, type, data, time) \
             SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::bytea[], $5::bigint[])), \
         st AS ( \
             UPDATE streams s SET head = u.head, state = u.state, first_seq = u.first_seq, \
                                  updated_at = u.updated_at, labels = u.labels, \
                                  cancel_requested = u.cancel \
             FROM unnest($6::bigint[], $7::bigint[], $8::text[], $9::bigint[], $10::bigint[], \
                         $22::text[], $23::bool[]) \
                  AS u(key, head, state, first_seq, updated_at, labels, cancel) \
             WHERE s.key = u.key), \
         tr AS ( \
             DELETE FROM events e USING unnest($11::bigint[], $12::bigint[]) AS t(key, first) \
             WHERE e.stream_key = t.key AND e.seq < t.first), \
         ks AS ( \
             INSERT INTO idempotency (stream_key, key, hash, status, body, created_at) \
             SELECT * FROM unnest($13::bigint[], $14::text[], $15::bytea[], $16::int[], \
                                  $17::text[], $18::bigint[]) \
             ON CONFLICT DO NOTHING), \
         del AS (DELETE FROM streams WHERE key = ANY($19) RETURNING key), \
         pu AS (INSERT INTO purge (stream_key) SELECT key FROM del ON CONFLICT DO NOTHING) \
         SELECT count(pg_notify($20, p)) FROM unnest($21::text[]) AS p",
    )
    .bind(ev.iter().map(|e| e.key).collect::<Vec<_>>())
    .bind(ev.iter().map(|e| seq(e.seq)).collect::<Vec<_>>())
    .bind(ev.iter().map(|e| e.event_type).collect::<Vec<_>>())
    .bind(ev.iter().map(|e| e.data.as_bytes()).collect::<Vec<_>>())
    .bind(ev.iter().map(|e| e.time).collect::<Vec<_>>())
    .bind(st.iter().map(|m| m.key).collect::<Vec<_>>())
    .bind(st.iter().map(|m| seq(m.head)).collect::<Vec<_>>())
    .bind(st.iter().map(|m| m.state.as_str()).collect::<Vec<_>>())
    .bind(st.iter().map(|m| seq(m.first_seq)).collect::<Vec<_>>())
    .bind(st.iter().map(|m| m.updated_at).collect::<Vec<_>>())
    .bind(plan.trims.iter().map(|t| t.0).collect::<Vec<_>>())
    .bind(plan.trims.iter().map(|t| seq(t.1)).collect::<Vec<_>>())
    .bind(ks.iter().map(|k| k.stream_key).collect::<Vec<_>>())
    .bind(ks.iter().map(|k| k.key).collect::<Vec<_>>())
    .bind(ks.iter().map(|k| &k.hash[..]).collect::<Vec<_>>())
    .bind(ks.iter().map(|k| i32::from(k.status)).collect::<Vec<_>>())
    .bind(ks.iter().map(|k| k.body.as_str()).collect::<Vec<_>>())
    .bind(ks.iter().map(|k| k.time).collect::<Vec<_>>())
    .bind(&plan.deletes)
    .bind(CHANNEL)
    .bind(&payloads)
    .bind(st.iter().map(|m| labels_to_text(&m.labels)).collect::<Vec<_>>())
    .bind(st.iter().map(|m| m.cancel_requested).collect::<Vec<_>>())
    .execute(&mut *conn)
    .await?;
    Ok(())
}
