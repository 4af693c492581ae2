//! Durable Streams on PostgreSQL: each write is one transaction on the pool
//! (not the group writer: DS rules need reads between statements). The
//! stream's row is locked (`FOR UPDATE`) first, so per stream the writes of
//! every node are serialized, as the group writer's are; the same
//! transaction sends the `pg_notify` that wakes other nodes' listeners, so
//! a DS reader on another node sees the append once it is committed.

use jobcast_protocol::END_EVENT;
use sqlx::postgres::PgRow;
use sqlx::{PgConnection, PgPool, Row};

use super::{DsMeta, DsOp, DsOutcome, DsPage, DsPublish, DsRefusal, DsWrite, ForkFrom, CLOSE_DATA};
use crate::hub::Hub;
use crate::store::StoreError;

/// The deepest fork chain followed.
const MAX_CHAIN: usize = 64;
/// Attempts of a write that PostgreSQL asks to retry (deadlock, serialization, a racing creation).
const ATTEMPTS: usize = 5;

const META_SQL: &str = "SELECT s.key, s.id, s.epoch, s.state, s.head, d.content_type, d.ttl_s, \
     d.expires_at, d.touched_at, d.stream_seq, d.fork_of, d.base, d.deleted, d.fork_at, \
     d.fork_sub, s.created_at FROM streams s LEFT JOIN ds_streams d ON d.stream_key = s.key \
     WHERE s.id = $1";

fn meta_row(r: &PgRow) -> Result<(DsMeta, Option<i64>), sqlx::Error> {
    let state: String = r.try_get(3)?;
    let closed = state != "open";
    let head = r.try_get::<i64, _>(4)?.max(0) as u64;
    let content_type: Option<String> = r.try_get(5)?;
    let created_at: i64 = r.try_get(15)?;
    let key: i64 = r.try_get(0)?;
    let fork_of: Option<i64> = r.try_get(10)?;
    let base = r.try_get::<Option<i64>, _>(11)?.unwrap_or(0).max(0) as u64;
    let fork_at: Option<i64> = r.try_get(13)?;
    Ok((
        DsMeta {
            id: r.try_get(1)?,
            key,
            epoch: r.try_get(2)?,
            native: content_type.is_none(),
            content_type: content_type.unwrap_or_else(|| "application/json".into()),
            closed,
            tail: if closed { head.saturating_sub(1) } else { head },
            chain: vec![(key, base)],
            ttl_s: r.try_get::<Option<i64>, _>(6)?.map(|v| v.max(0) as u64),
            expires_at: r.try_get(7)?,
            touched_at: r.try_get::<Option<i64>, _>(8)?.unwrap_or(created_at),
            stream_seq: r.try_get(9)?,
            deleted: r.try_get::<Option<bool>, _>(12)?.unwrap_or(false),
            fork: fork_of.zip(fork_at.map(|v| v.max(0) as u64).or(Some(base))),
        },
        fork_of,
    ))
}

async fn lookup(
    conn: &mut PgConnection,
    stream: &str,
    lock: bool,
) -> Result<Option<DsMeta>, sqlx::Error> {
    let sql = if lock {
        format!("{META_SQL} FOR UPDATE OF s")
    } else {
        META_SQL.to_owned()
    };
    let Some(row) = sqlx::query(&sql)
        .bind(stream)
        .fetch_optional(&mut *conn)
        .await?
    else {
        return Ok(None);
    };
    let (mut meta, mut next) = meta_row(&row)?;
    while let Some(k) = next {
        if meta.chain.len() >= MAX_CHAIN {
            break;
        }
        let row: Option<(i64, Option<i64>)> =
            sqlx::query_as("SELECT base, fork_of FROM ds_streams WHERE stream_key = $1")
                .bind(k)
                .fetch_optional(&mut *conn)
                .await?;
        match row {
            Some((b, f)) => {
                meta.chain.push((k, b.max(0) as u64));
                next = f;
            }
            None => {
                meta.chain.push((k, 0));
                next = None;
            }
        }
    }
    Ok(Some(meta))
}

fn now() -> i64 {
    crate::time::now_ms()
}

async fn append_messages(
    conn: &mut PgConnection,
    meta: &mut DsMeta,
    messages: &[Vec<u8>],
    close: bool,
    publish: &mut Vec<DsPublish>,
) -> Result<(), sqlx::Error> {
    let t = now();
    let mut seq = meta.tail;
    let mut events = Vec::new();
    let mut text_only = true;
    let mut seqs = Vec::with_capacity(messages.len());
    for m in messages {
        seq += 1;
        seqs.push(seq as i64);
        match std::str::from_utf8(m) {
            Ok(s) => events.push((seq, "message".to_owned(), s.to_owned())),
            Err(_) => text_only = false,
        }
    }
    if !messages.is_empty() {
        sqlx::query(
            "INSERT INTO events (stream_key, seq, type, data, time) \
             SELECT $1, s, 'message', d, $4 FROM unnest($2::bigint[], $3::bytea[]) AS u(s, d)",
        )
        .bind(meta.key)
        .bind(&seqs)
        .bind(messages)
        .bind(t)
        .execute(&mut *conn)
        .await?;
    }
    let mut head = seq;
    if close {
        head += 1;
        sqlx::query(
            "INSERT INTO events (stream_key, seq, type, data, time) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(meta.key)
        .bind(head as i64)
        .bind(END_EVENT)
        .bind(CLOSE_DATA.as_bytes())
        .bind(t)
        .execute(&mut *conn)
        .await?;
        events.push((head, END_EVENT.to_owned(), CLOSE_DATA.to_owned()));
    }
    sqlx::query(
        "UPDATE streams SET head = $1, state = CASE WHEN $2 THEN 'completed' ELSE state END, \
         updated_at = $3 WHERE key = $4",
    )
    .bind(head as i64)
    .bind(close)
    .bind(t)
    .bind(meta.key)
    .execute(&mut *conn)
    .await?;
    sqlx::query("UPDATE ds_streams SET touched_at = $1 WHERE stream_key = $2")
        .bind(t)
        .bind(meta.key)
        .execute(&mut *conn)
        .await?;
    meta.tail = seq;
    meta.closed |= close;
    meta.touched_at = t;
    publish.push(DsPublish {
        stream: meta.id.clone(),
        key: meta.key,
        epoch: meta.epoch.clone(),
        events: if text_only { events } else { Vec::new() },
        ends: close,
        changed: (!text_only).then_some(None),
    });
    Ok(())
}

async fn delete_hard(
    conn: &mut PgConnection,
    first: i64,
    id: &str,
    publish: &mut Vec<DsPublish>,
) -> Result<(), sqlx::Error> {
    let mut key = first;
    let mut id = Some(id.to_owned());
    for _ in 0..MAX_CHAIN {
        let fork_of: Option<i64> =
            sqlx::query_scalar("SELECT fork_of FROM ds_streams WHERE stream_key = $1")
                .bind(key)
                .fetch_optional(&mut *conn)
                .await?
                .flatten();
        let sid = match id.take() {
            Some(s) => Some(s),
            None => {
                sqlx::query_scalar("SELECT id FROM streams WHERE key = $1")
                    .bind(key)
                    .fetch_optional(&mut *conn)
                    .await?
            }
        };
        for sql in [
            "DELETE FROM streams WHERE key = $1",
            "DELETE FROM ds_streams WHERE stream_key = $1",
            "DELETE FROM ds_producers WHERE stream_key = $1",
            "INSERT INTO purge (stream_key) VALUES ($1) ON CONFLICT DO NOTHING",
        ] {
            sqlx::query(sql).bind(key).execute(&mut *conn).await?;
        }
        if let Some(sid) = sid {
            publish.push(DsPublish::changed(&sid, Some(key)));
        }
        let Some(src) = fork_of else { break };
        let gone: Option<(i64, bool)> = sqlx::query_as(
            "UPDATE ds_streams SET forks = forks - 1 WHERE stream_key = $1 RETURNING forks, deleted",
        )
        .bind(src)
        .fetch_optional(&mut *conn)
        .await?;
        match gone {
            Some((forks, true)) if forks <= 0 => key = src,
            _ => break,
        }
    }
    Ok(())
}

async fn delete(
    conn: &mut PgConnection,
    meta: &DsMeta,
    publish: &mut Vec<DsPublish>,
) -> Result<(), sqlx::Error> {
    let forks: i64 = sqlx::query_scalar("SELECT forks FROM ds_streams WHERE stream_key = $1")
        .bind(meta.key)
        .fetch_optional(&mut *conn)
        .await?
        .unwrap_or(0);
    if forks > 0 {
        sqlx::query("UPDATE ds_streams SET deleted = TRUE WHERE stream_key = $1")
            .bind(meta.key)
            .execute(&mut *conn)
            .await?;
        publish.push(DsPublish::changed(&meta.id, None));
        return Ok(());
    }
    delete_hard(conn, meta.key, &meta.id, publish).await
}

struct Create<'a> {
    content_type: Option<String>,
    ttl_s: Option<u64>,
    expires_at: Option<i64>,
    closed: bool,
    messages: &'a [Vec<u8>],
    fork: &'a Option<ForkFrom>,
}

async fn create(
    conn: &mut PgConnection,
    stream: &str,
    c: Create<'_>,
    publish: &mut Vec<DsPublish>,
) -> Result<DsOutcome, sqlx::Error> {
    let t = now();
    let mut base = 0u64;
    let mut fork_row = None;
    let mut content_type = c.content_type;
    let (mut ttl_s, mut expires_at) = (c.ttl_s, c.expires_at);
    let mut prefix: Option<Vec<u8>> = None;
    if let Some(f) = c.fork {
        let Some(src) = lookup(conn, &f.source, true).await? else {
            return Ok(DsOutcome::Refused(DsRefusal::NotFound));
        };
        if src.expired(t) {
            return Ok(DsOutcome::Refused(DsRefusal::NotFound));
        }
        if src.deleted {
            return Ok(DsOutcome::Refused(DsRefusal::ForkSourceGone));
        }
        match &content_type {
            Some(ct) if super::media_type(ct) != super::media_type(&src.content_type) => {
                return Ok(DsOutcome::Refused(DsRefusal::ContentTypeMismatch))
            }
            Some(_) => {}
            None => content_type = Some(src.content_type.clone()),
        }
        let at = match f.at {
            None => src.tail,
            Some((key, seq)) => {
                if seq != 0 && (seq > src.tail || src.owner(seq) != key) {
                    return Ok(DsOutcome::Refused(DsRefusal::BadForkOffset(
                        "Stream-Fork-Offset is not a position of the source stream",
                    )));
                }
                seq
            }
        };
        base = at;
        if f.sub > 0 {
            if at >= src.tail {
                return Ok(DsOutcome::Refused(DsRefusal::BadForkOffset(
                    "Stream-Fork-Sub-Offset points past the source's last message",
                )));
            }
            if src.is_json() {
                if at + f.sub > src.tail {
                    return Ok(DsOutcome::Refused(DsRefusal::BadForkOffset(
                        "Stream-Fork-Sub-Offset is beyond the source's messages",
                    )));
                }
                base = at + f.sub;
            } else {
                let msg: Vec<u8> = sqlx::query_scalar(
                    "SELECT data FROM events WHERE stream_key = $1 AND seq = $2",
                )
                .bind(src.owner(at + 1))
                .bind((at + 1) as i64)
                .fetch_optional(&mut *conn)
                .await?
                .unwrap_or_default();
                if f.sub as usize > msg.len() {
                    return Ok(DsOutcome::Refused(DsRefusal::BadForkOffset(
                        "Stream-Fork-Sub-Offset is beyond the message's length",
                    )));
                }
                prefix = Some(msg[..f.sub as usize].to_vec());
            }
        }
        if ttl_s.is_none() && expires_at.is_none() {
            ttl_s = src.ttl_s;
            expires_at = src.expires_at;
        }
        fork_row = Some((src.key, at, f.sub));
    }
    let content_type = content_type.unwrap_or_else(|| "application/octet-stream".into());
    if let Some(meta) = lookup(conn, stream, true).await? {
        if meta.deleted {
            return Ok(DsOutcome::Refused(DsRefusal::ConfigMismatch));
        }
        if !meta.expired(t) {
            let fork_same = match (&fork_row, meta.fork) {
                (None, None) => true,
                (Some((k, at, sub)), Some(_)) => {
                    let stored: Option<(Option<i64>, Option<i64>, Option<i64>)> = sqlx::query_as(
                        "SELECT fork_of, fork_at, fork_sub FROM ds_streams WHERE stream_key = $1",
                    )
                    .bind(meta.key)
                    .fetch_optional(&mut *conn)
                    .await?;
                    stored == Some((Some(*k), Some(*at as i64), Some(*sub as i64)))
                }
                _ => false,
            };
            let same = super::media_type(&meta.content_type) == super::media_type(&content_type)
                && meta.ttl_s == ttl_s
                && meta.expires_at == expires_at
                && meta.closed == c.closed;
            if fork_same && same {
                return Ok(DsOutcome::Created(meta, false));
            }
            return Ok(DsOutcome::Refused(DsRefusal::ConfigMismatch));
        }
        delete(conn, &meta, publish).await?;
        if lookup(conn, stream, false).await?.is_some() {
            return Ok(DsOutcome::Refused(DsRefusal::ConfigMismatch));
        }
    }
    let epoch = crate::time::new_epoch();
    // A creation racing with another node's fails on the unique id and is retried.
    let key: i64 = sqlx::query_scalar(
        "INSERT INTO streams (id, epoch, state, head, first_seq, created_at, updated_at) \
         VALUES ($1, $2, 'open', $3, $4, $5, $5) RETURNING key",
    )
    .bind(stream)
    .bind(&epoch)
    .bind(base as i64)
    .bind((base + 1) as i64)
    .bind(t)
    .fetch_one(&mut *conn)
    .await?;
    sqlx::query(
        "INSERT INTO ds_streams (stream_key, content_type, ttl_s, expires_at, touched_at, \
         fork_of, base, fork_at, fork_sub) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
    )
    .bind(key)
    .bind(&content_type)
    .bind(ttl_s.map(|v| v as i64))
    .bind(expires_at)
    .bind(t)
    .bind(fork_row.map(|f| f.0))
    .bind(base as i64)
    .bind(fork_row.map(|f| f.1 as i64))
    .bind(fork_row.map(|f| f.2 as i64))
    .execute(&mut *conn)
    .await?;
    if let Some((src, _, _)) = fork_row {
        sqlx::query("UPDATE ds_streams SET forks = forks + 1 WHERE stream_key = $1")
            .bind(src)
            .execute(&mut *conn)
            .await?;
    }
    publish.push(DsPublish::changed(stream, None));
    let mut meta = lookup(conn, stream, false)
        .await?
        .ok_or(sqlx::Error::RowNotFound)?;
    let mut all = Vec::new();
    if let Some(p) = prefix {
        all.push(p);
    }
    all.extend(c.messages.iter().cloned());
    if !all.is_empty() || c.closed {
        append_messages(conn, &mut meta, &all, c.closed, publish).await?;
    }
    Ok(DsOutcome::Created(meta, true))
}

async fn apply(
    conn: &mut PgConnection,
    w: &DsWrite,
    publish: &mut Vec<DsPublish>,
) -> Result<DsOutcome, sqlx::Error> {
    match &w.op {
        DsOp::Create {
            content_type,
            ttl_s,
            expires_at,
            closed,
            messages,
            fork,
        } => {
            let c = Create {
                content_type: content_type.clone(),
                ttl_s: *ttl_s,
                expires_at: *expires_at,
                closed: *closed,
                messages,
                fork,
            };
            create(conn, &w.stream, c, publish).await
        }
        DsOp::Delete => {
            let Some(meta) = lookup(conn, &w.stream, true).await? else {
                return Ok(DsOutcome::Refused(DsRefusal::NotFound));
            };
            if meta.deleted {
                return Ok(DsOutcome::Refused(DsRefusal::Gone));
            }
            let expired = meta.expired(now());
            delete(conn, &meta, publish).await?;
            Ok(if expired {
                DsOutcome::Refused(DsRefusal::NotFound)
            } else {
                DsOutcome::Deleted
            })
        }
        DsOp::Touch => {
            if let Some(meta) = lookup(conn, &w.stream, false).await? {
                if meta.ttl_s.is_some() && !meta.native && !meta.expired(now()) {
                    sqlx::query(
                        "UPDATE ds_streams SET touched_at = GREATEST(touched_at, $1) WHERE stream_key = $2",
                    )
                    .bind(now())
                    .bind(meta.key)
                    .execute(&mut *conn)
                    .await?;
                }
            }
            Ok(DsOutcome::Touched)
        }
        DsOp::Append {
            content_type,
            messages,
            stream_seq,
            producer,
            close,
        } => {
            let Some(mut meta) = lookup(conn, &w.stream, true).await? else {
                return Ok(DsOutcome::Refused(DsRefusal::NotFound));
            };
            if meta.deleted {
                return Ok(DsOutcome::Refused(DsRefusal::Gone));
            }
            if meta.expired(now()) {
                return Ok(DsOutcome::Refused(DsRefusal::NotFound));
            }
            let state = match producer {
                Some(p) => {
                    let state: Option<(i64, i64)> = sqlx::query_as(
                        "SELECT epoch, seq FROM ds_producers WHERE stream_key = $1 AND producer = $2",
                    )
                    .bind(meta.key)
                    .bind(&p.id)
                    .fetch_optional(&mut *conn)
                    .await?;
                    state.map(|(e, s)| (e.max(0) as u64, s.max(0) as u64))
                }
                None => None,
            };
            let accept = match super::check_append(
                &meta,
                state,
                producer.as_ref(),
                !messages.is_empty(),
                *close,
                content_type.as_deref(),
                stream_seq.as_deref(),
            ) {
                Ok(accept) => accept,
                Err(answer) => return Ok(*answer),
            };
            let accept_producer = producer.as_ref().filter(|_| accept);
            if let Some(seq) = stream_seq {
                sqlx::query("UPDATE ds_streams SET stream_seq = $1 WHERE stream_key = $2")
                    .bind(seq)
                    .bind(meta.key)
                    .execute(&mut *conn)
                    .await?;
                meta.stream_seq = Some(seq.clone());
            }
            if let Some(p) = accept_producer {
                sqlx::query(
                    "INSERT INTO ds_producers (stream_key, producer, epoch, seq) VALUES ($1, $2, $3, $4) \
                     ON CONFLICT (stream_key, producer) DO UPDATE SET epoch = EXCLUDED.epoch, seq = EXCLUDED.seq",
                )
                .bind(meta.key)
                .bind(&p.id)
                .bind(p.epoch as i64)
                .bind(p.seq as i64)
                .execute(&mut *conn)
                .await?;
            }
            append_messages(conn, &mut meta, messages, *close, publish).await?;
            Ok(DsOutcome::Appended {
                meta,
                duplicate: false,
                producer: accept_producer.map(|p| (p.epoch, p.seq)),
            })
        }
    }
}

fn retryable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(d) => {
            matches!(d.code().as_deref(), Some("40P01" | "40001" | "23505"))
        }
        _ => false,
    }
}

/// A DS write: one transaction (retried when PostgreSQL asks), published
/// to this node's hub after COMMIT, then answered.
pub(crate) async fn write(pool: &PgPool, hub: &Hub, w: DsWrite) -> Result<DsOutcome, StoreError> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let result = async {
            let mut tx = pool.begin().await?;
            let mut publish = Vec::new();
            let outcome = apply(&mut tx, &w, &mut publish).await?;
            if matches!(outcome, DsOutcome::Refused(_)) {
                tx.rollback().await?;
                return Ok::<_, sqlx::Error>((outcome, Vec::new()));
            }
            let payloads: Vec<String> = publish.iter().map(DsPublish::payload).collect();
            if !payloads.is_empty() {
                sqlx::query("SELECT pg_notify($1, p) FROM unnest($2::text[]) AS p")
                    .bind(crate::store::postgres_channel())
                    .bind(&payloads)
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
            Ok((outcome, publish))
        }
        .await;
        match result {
            Ok((outcome, publish)) => {
                for p in publish {
                    p.send(hub);
                }
                return Ok(outcome);
            }
            Err(e) if attempt < ATTEMPTS && retryable(&e) => continue,
            Err(e) => {
                tracing::error!(error = %e, "DS write failed; nothing was committed");
                return Err(e.into());
            }
        }
    }
}

/// A DS read: metadata and up to `max_bytes` of messages after `after`, one snapshot.
pub(crate) async fn read(
    pool: &PgPool,
    stream: &str,
    after: Option<u64>,
    max_bytes: usize,
) -> Result<Option<DsPage>, StoreError> {
    let mut tx = pool.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *tx)
        .await?;
    let Some(meta) = lookup(&mut tx, stream, false).await? else {
        return Ok(None);
    };
    let mut messages = Vec::new();
    let Some(after) = after else {
        return Ok(Some(DsPage { meta, messages }));
    };
    let mut bytes = 0usize;
    let mut upper = meta.tail;
    let mut ranges = Vec::new();
    for &(key, base) in &meta.chain {
        if upper > base {
            ranges.push((key, base, upper));
        }
        upper = upper.min(base);
    }
    ranges.reverse();
    'links: for (key, base, upper) in ranges {
        if upper <= after {
            continue;
        }
        let rows: Vec<(i64, Vec<u8>)> = sqlx::query_as(
            "SELECT seq, data FROM events WHERE stream_key = $1 AND seq > $2 AND seq <= $3 \
             AND type <> $4 ORDER BY seq LIMIT 1000",
        )
        .bind(key)
        .bind(after.max(base) as i64)
        .bind(upper as i64)
        .bind(END_EVENT)
        .fetch_all(&mut *tx)
        .await?;
        for (seq, data) in rows {
            if !messages.is_empty() && bytes + data.len() > max_bytes {
                break 'links;
            }
            bytes += data.len();
            messages.push((seq.max(0) as u64, data));
        }
        if messages.last().is_some_and(|m| m.0 < upper) {
            break;
        }
    }
    tx.commit().await?;
    Ok(Some(DsPage { meta, messages }))
}
