//! Durable Streams on SQLite: writes on the writer thread (one transaction
//! each, rusqlite), reads from the read pool (one transaction each, sqlx).

use jobcast_protocol::END_EVENT;
use rusqlite::types::Value;
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use sqlx::{Row, SqlitePool};

use super::{DsMeta, DsOp, DsOutcome, DsPage, DsPublish, DsRefusal, DsWrite, ForkFrom, CLOSE_DATA};

/// The deepest fork chain followed (a longer one reads as its first links).
const MAX_CHAIN: usize = 64;

const META_SQL: &str = "SELECT s.key, s.id, s.epoch, s.state, s.head, d.content_type, d.ttl_s, \
     d.expires_at, d.touched_at, d.stream_seq, d.fork_of, d.base, d.deleted, d.fork_at, \
     d.fork_sub, s.created_at FROM streams s LEFT JOIN ds_streams d ON d.stream_key = s.key";

/// The columns of [`META_SQL`], decoded (backend-neutral).
struct Row16 {
    key: i64,
    id: String,
    epoch: String,
    state: String,
    head: i64,
    content_type: Option<String>,
    ttl_s: Option<i64>,
    expires_at: Option<i64>,
    touched_at: Option<i64>,
    stream_seq: Option<String>,
    fork_of: Option<i64>,
    base: Option<i64>,
    deleted: Option<bool>,
    fork_at: Option<i64>,
    created_at: i64,
}

impl Row16 {
    fn into_meta(self, chain: Vec<(i64, u64)>) -> DsMeta {
        let closed = self.state != "open";
        let head = self.head.max(0) as u64;
        DsMeta {
            native: self.content_type.is_none(),
            content_type: self
                .content_type
                .unwrap_or_else(|| "application/json".into()),
            id: self.id,
            key: self.key,
            epoch: self.epoch,
            closed,
            tail: if closed { head.saturating_sub(1) } else { head },
            chain,
            ttl_s: self.ttl_s.map(|v| v.max(0) as u64),
            expires_at: self.expires_at,
            touched_at: self.touched_at.unwrap_or(self.created_at),
            stream_seq: self.stream_seq,
            deleted: self.deleted.unwrap_or(false),
            fork: self.fork_of.zip(
                self.fork_at
                    .map(|v| v.max(0) as u64)
                    .or(self.base.map(|b| b as u64)),
            ),
        }
    }
}

fn row16(r: &rusqlite::Row<'_>) -> rusqlite::Result<Row16> {
    Ok(Row16 {
        key: r.get(0)?,
        id: r.get(1)?,
        epoch: r.get(2)?,
        state: r.get(3)?,
        head: r.get(4)?,
        content_type: r.get(5)?,
        ttl_s: r.get(6)?,
        expires_at: r.get(7)?,
        touched_at: r.get(8)?,
        stream_seq: r.get(9)?,
        fork_of: r.get(10)?,
        base: r.get(11)?,
        deleted: r.get::<_, Option<i64>>(12)?.map(|v| v != 0),
        fork_at: r.get(13)?,
        created_at: r.get(15)?,
    })
}

fn chain_of(
    conn: &Connection,
    key: i64,
    base: u64,
    fork_of: Option<i64>,
) -> rusqlite::Result<Vec<(i64, u64)>> {
    let mut chain = vec![(key, base)];
    let mut next = fork_of;
    while let Some(k) = next {
        if chain.len() >= MAX_CHAIN {
            break;
        }
        let row: Option<(i64, Option<i64>)> = conn
            .prepare_cached("SELECT base, fork_of FROM ds_streams WHERE stream_key = ?")?
            .query_row([k], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        match row {
            Some((b, f)) => {
                chain.push((k, b.max(0) as u64));
                next = f;
            }
            None => {
                chain.push((k, 0));
                next = None;
            }
        }
    }
    Ok(chain)
}

fn lookup(conn: &Connection, stream: &str) -> rusqlite::Result<Option<DsMeta>> {
    let row = conn
        .prepare_cached(&format!("{META_SQL} WHERE s.id = ?"))?
        .query_row([stream], row16)
        .optional()?;
    row.map(|r| {
        let chain = chain_of(conn, r.key, r.base.unwrap_or(0).max(0) as u64, r.fork_of)?;
        Ok(r.into_meta(chain))
    })
    .transpose()
}

/// Runs one DS write in its own transaction on the writer's connection.
pub(crate) fn write(
    conn: &mut Connection,
    w: &DsWrite,
) -> rusqlite::Result<(DsOutcome, Vec<DsPublish>)> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let mut publish = Vec::new();
    let outcome = apply(&tx, w, &mut publish)?;
    if matches!(outcome, DsOutcome::Refused(_)) {
        tx.rollback()?;
        return Ok((outcome, Vec::new()));
    }
    tx.commit()?;
    Ok((outcome, publish))
}

fn now() -> i64 {
    crate::time::now_ms()
}

fn data_value(json: bool, bytes: &[u8]) -> Value {
    match std::str::from_utf8(bytes) {
        Ok(s) => Value::Text(s.to_owned()),
        Err(_) if !json => Value::Blob(bytes.to_vec()),
        Err(_) => Value::Text(String::from_utf8_lossy(bytes).into_owned()),
    }
}

/// Appends messages (and the end when `close`) to `meta`'s creation.
fn append_messages(
    conn: &Connection,
    meta: &mut DsMeta,
    messages: &[Vec<u8>],
    close: bool,
    publish: &mut Vec<DsPublish>,
) -> rusqlite::Result<()> {
    let t = now();
    let mut seq = meta.tail;
    let mut events = Vec::new();
    {
        let mut stmt = conn.prepare_cached(
            "INSERT INTO events (stream_key, seq, type, data, time) VALUES (?, ?, 'message', ?, ?)",
        )?;
        for m in messages {
            seq += 1;
            let v = data_value(meta.is_json(), m);
            if let Value::Text(s) = &v {
                events.push((seq, "message".to_owned(), s.clone()));
            }
            stmt.execute(params![meta.key, seq as i64, v, t])?;
        }
    }
    let mut head = seq;
    if close {
        head += 1;
        conn.prepare_cached(
            "INSERT INTO events (stream_key, seq, type, data, time) VALUES (?, ?, ?, ?, ?)",
        )?
        .execute(params![meta.key, head as i64, END_EVENT, CLOSE_DATA, t])?;
        events.push((head, END_EVENT.to_owned(), CLOSE_DATA.to_owned()));
    }
    conn.prepare_cached(
        "UPDATE streams SET head = ?, state = CASE WHEN ? THEN 'completed' ELSE state END, \
         updated_at = ? WHERE key = ?",
    )?
    .execute(params![head as i64, close, t, meta.key])?;
    conn.prepare_cached("UPDATE ds_streams SET touched_at = ? WHERE stream_key = ?")?
        .execute(params![t, meta.key])?;
    let text_only = events.len() == messages.len() + usize::from(close);
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

/// Deletes a creation for good (row, DS rows, events queued for purging),
/// then releases its fork source, which goes too when it was soft-deleted
/// and this was its last fork.
fn delete_hard(
    conn: &Connection,
    meta_key: i64,
    id: &str,
    publish: &mut Vec<DsPublish>,
) -> rusqlite::Result<()> {
    let mut key = meta_key;
    let mut id = Some(id.to_owned());
    for _ in 0..MAX_CHAIN {
        let fork_of: Option<i64> = conn
            .prepare_cached("SELECT fork_of FROM ds_streams WHERE stream_key = ?")?
            .query_row([key], |r| r.get(0))
            .optional()?
            .flatten();
        let sid = match id.take() {
            Some(s) => Some(s),
            None => conn
                .prepare_cached("SELECT id FROM streams WHERE key = ?")?
                .query_row([key], |r| r.get::<_, String>(0))
                .optional()?,
        };
        conn.prepare_cached("DELETE FROM streams WHERE key = ?")?
            .execute([key])?;
        conn.prepare_cached("DELETE FROM ds_streams WHERE stream_key = ?")?
            .execute([key])?;
        conn.prepare_cached("DELETE FROM ds_producers WHERE stream_key = ?")?
            .execute([key])?;
        conn.prepare_cached("INSERT OR IGNORE INTO purge (stream_key) VALUES (?)")?
            .execute([key])?;
        if let Some(sid) = sid {
            publish.push(DsPublish::changed(&sid, Some(key)));
        }
        let Some(src) = fork_of else { break };
        conn.prepare_cached("UPDATE ds_streams SET forks = forks - 1 WHERE stream_key = ?")?
            .execute([src])?;
        let gone: Option<(i64, i64)> = conn
            .prepare_cached("SELECT forks, deleted FROM ds_streams WHERE stream_key = ?")?
            .query_row([src], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        match gone {
            Some((forks, deleted)) if forks <= 0 && deleted != 0 => key = src,
            _ => break,
        }
    }
    Ok(())
}

/// Deletes, softly when forks still read the log.
fn delete(conn: &Connection, meta: &DsMeta, publish: &mut Vec<DsPublish>) -> rusqlite::Result<()> {
    let forks: i64 = conn
        .prepare_cached("SELECT forks FROM ds_streams WHERE stream_key = ?")?
        .query_row([meta.key], |r| r.get(0))
        .optional()?
        .unwrap_or(0);
    if forks > 0 {
        conn.prepare_cached("UPDATE ds_streams SET deleted = 1 WHERE stream_key = ?")?
            .execute([meta.key])?;
        publish.push(DsPublish::changed(&meta.id, None));
        return Ok(());
    }
    delete_hard(conn, meta.key, &meta.id, publish)
}

fn same_config(
    meta: &DsMeta,
    content_type: &str,
    ttl_s: Option<u64>,
    expires_at: Option<i64>,
    closed: bool,
) -> bool {
    super::media_type(&meta.content_type) == super::media_type(content_type)
        && meta.ttl_s == ttl_s
        && meta.expires_at == expires_at
        && meta.closed == closed
}

#[allow(clippy::too_many_arguments)]
fn create(
    conn: &Connection,
    w: &DsWrite,
    content_type: &Option<String>,
    ttl_s: Option<u64>,
    expires_at: Option<i64>,
    closed: bool,
    messages: &[Vec<u8>],
    fork: &Option<ForkFrom>,
    publish: &mut Vec<DsPublish>,
) -> rusqlite::Result<DsOutcome> {
    let t = now();
    // The fork source, where it forks, and what the fork inherits.
    let mut base = 0u64;
    let mut fork_row = None;
    let mut content_type = content_type.clone();
    let (mut ttl_s, mut expires_at) = (ttl_s, expires_at);
    let mut prefix: Option<Vec<u8>> = None;
    if let Some(f) = fork {
        let Some(src) = lookup(conn, &f.source)? else {
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
                let owner = src.owner(at + 1);
                let msg: Vec<u8> = conn
                    .prepare_cached(
                        "SELECT CAST(data AS BLOB) FROM events WHERE stream_key = ? AND seq = ?",
                    )?
                    .query_row(params![owner, (at + 1) as i64], |r| r.get(0))
                    .optional()?
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
    let existing = lookup(conn, &w.stream)?;
    if let Some(meta) = existing {
        if meta.deleted {
            return Ok(DsOutcome::Refused(DsRefusal::ConfigMismatch));
        }
        if !meta.expired(t) {
            let fork_same = match (&fork_row, meta.fork) {
                (None, None) => true,
                (Some((k, at, sub)), Some(_)) => {
                    let stored: Option<(Option<i64>, Option<i64>, Option<i64>)> = conn
                        .prepare_cached(
                            "SELECT fork_of, fork_at, fork_sub FROM ds_streams WHERE stream_key = ?",
                        )?
                        .query_row([meta.key], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                        .optional()?;
                    stored == Some((Some(*k), Some(*at as i64), Some(*sub as i64)))
                }
                _ => false,
            };
            if fork_same && same_config(&meta, &content_type, ttl_s, expires_at, closed) {
                return Ok(DsOutcome::Created(meta, false));
            }
            return Ok(DsOutcome::Refused(DsRefusal::ConfigMismatch));
        }
        delete(conn, &meta, publish)?;
        if lookup(conn, &w.stream)?.is_some() {
            // Soft-deleted: the id stays taken while forks read it.
            return Ok(DsOutcome::Refused(DsRefusal::ConfigMismatch));
        }
    }
    let epoch = crate::time::new_epoch();
    let key: i64 = conn
        .prepare_cached(
            "INSERT INTO streams (id, epoch, state, head, first_seq, created_at, updated_at) \
             VALUES (?, ?, 'open', ?, ?, ?, ?) RETURNING key",
        )?
        .query_row(
            params![w.stream, epoch, base as i64, (base + 1) as i64, t, t],
            |r| r.get(0),
        )?;
    conn.prepare_cached(
        "INSERT INTO ds_streams (stream_key, content_type, ttl_s, expires_at, touched_at, \
         fork_of, base, fork_at, fork_sub) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
    )?
    .execute(params![
        key,
        content_type,
        ttl_s.map(|v| v as i64),
        expires_at,
        t,
        fork_row.map(|f| f.0),
        base as i64,
        fork_row.map(|f| f.1 as i64),
        fork_row.map(|f| f.2 as i64),
    ])?;
    if let Some((src, _, _)) = fork_row {
        conn.prepare_cached("UPDATE ds_streams SET forks = forks + 1 WHERE stream_key = ?")?
            .execute([src])?;
    }
    publish.push(DsPublish::changed(&w.stream, None));
    let mut meta = lookup(conn, &w.stream)?.ok_or(rusqlite::Error::QueryReturnedNoRows)?;
    let mut all = Vec::new();
    if let Some(p) = prefix {
        all.push(p);
    }
    all.extend(messages.iter().cloned());
    if !all.is_empty() || closed {
        append_messages(conn, &mut meta, &all, closed, publish)?;
    }
    Ok(DsOutcome::Created(meta, true))
}

fn apply(
    conn: &Connection,
    w: &DsWrite,
    publish: &mut Vec<DsPublish>,
) -> rusqlite::Result<DsOutcome> {
    match &w.op {
        DsOp::Create {
            content_type,
            ttl_s,
            expires_at,
            closed,
            messages,
            fork,
        } => create(
            conn,
            w,
            content_type,
            *ttl_s,
            *expires_at,
            *closed,
            messages,
            fork,
            publish,
        ),
        DsOp::Delete => {
            let Some(meta) = lookup(conn, &w.stream)? else {
                return Ok(DsOutcome::Refused(DsRefusal::NotFound));
            };
            if meta.deleted {
                return Ok(DsOutcome::Refused(DsRefusal::Gone));
            }
            if meta.expired(now()) {
                delete(conn, &meta, publish)?;
                return Ok(DsOutcome::Refused(DsRefusal::NotFound));
            }
            delete(conn, &meta, publish)?;
            Ok(DsOutcome::Deleted)
        }
        DsOp::Touch => {
            if let Some(meta) = lookup(conn, &w.stream)? {
                if meta.ttl_s.is_some() && !meta.native && !meta.expired(now()) {
                    conn.prepare_cached(
                        "UPDATE ds_streams SET touched_at = ? WHERE stream_key = ?",
                    )?
                    .execute(params![now(), meta.key])?;
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
            let Some(mut meta) = lookup(conn, &w.stream)? else {
                return Ok(DsOutcome::Refused(DsRefusal::NotFound));
            };
            if meta.deleted {
                return Ok(DsOutcome::Refused(DsRefusal::Gone));
            }
            if meta.expired(now()) {
                return Ok(DsOutcome::Refused(DsRefusal::NotFound));
            }
            // Producer first: a retry of an accepted request is a duplicate
            // even once the stream is closed; a stale epoch is fenced.
            let state = match producer {
                Some(p) => {
                    let state: Option<(i64, i64)> = conn
                        .prepare_cached(
                            "SELECT epoch, seq FROM ds_producers WHERE stream_key = ? AND producer = ?",
                        )?
                        .query_row(params![meta.key, p.id], |r| Ok((r.get(0)?, r.get(1)?)))
                        .optional()?;
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
                if !meta.native {
                    conn.prepare_cached(
                        "UPDATE ds_streams SET stream_seq = ? WHERE stream_key = ?",
                    )?
                    .execute(params![seq, meta.key])?;
                }
                meta.stream_seq = Some(seq.clone());
            }
            if let Some(p) = accept_producer {
                conn.prepare_cached(
                    "INSERT INTO ds_producers (stream_key, producer, epoch, seq) VALUES (?, ?, ?, ?) \
                     ON CONFLICT (stream_key, producer) DO UPDATE SET epoch = excluded.epoch, seq = excluded.seq",
                )?
                .execute(params![meta.key, p.id, p.epoch as i64, p.seq as i64])?;
            }
            append_messages(conn, &mut meta, messages, *close, publish)?;
            Ok(DsOutcome::Appended {
                meta,
                duplicate: false,
                producer: accept_producer.map(|p| (p.epoch, p.seq)),
            })
        }
    }
}

// ----- reads (the read pool) -----

fn row16_sqlx(r: &sqlx::sqlite::SqliteRow) -> Result<Row16, sqlx::Error> {
    Ok(Row16 {
        key: r.try_get(0)?,
        id: r.try_get(1)?,
        epoch: r.try_get(2)?,
        state: r.try_get(3)?,
        head: r.try_get(4)?,
        content_type: r.try_get(5)?,
        ttl_s: r.try_get(6)?,
        expires_at: r.try_get(7)?,
        touched_at: r.try_get(8)?,
        stream_seq: r.try_get(9)?,
        fork_of: r.try_get(10)?,
        base: r.try_get(11)?,
        deleted: r.try_get::<Option<i64>, _>(12)?.map(|v| v != 0),
        fork_at: r.try_get(13)?,
        created_at: r.try_get(15)?,
    })
}

/// The metadata and up to `max_bytes` of messages after `after` (at least
/// one message when there is one), from one snapshot.
pub(crate) async fn read(
    pool: &SqlitePool,
    stream: &str,
    after: Option<u64>,
    max_bytes: usize,
) -> Result<Option<DsPage>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let Some(r) = sqlx::query(&format!("{META_SQL} WHERE s.id = ?"))
        .bind(stream)
        .fetch_optional(&mut *tx)
        .await?
    else {
        return Ok(None);
    };
    let r = row16_sqlx(&r)?;
    let mut chain = vec![(r.key, r.base.unwrap_or(0).max(0) as u64)];
    let mut next = r.fork_of;
    while let Some(k) = next {
        if chain.len() >= MAX_CHAIN {
            break;
        }
        let row: Option<(i64, Option<i64>)> =
            sqlx::query_as("SELECT base, fork_of FROM ds_streams WHERE stream_key = ?")
                .bind(k)
                .fetch_optional(&mut *tx)
                .await?;
        match row {
            Some((b, f)) => {
                chain.push((k, b.max(0) as u64));
                next = f;
            }
            None => {
                chain.push((k, 0));
                next = None;
            }
        }
    }
    let meta = r.into_meta(chain);
    let mut messages = Vec::new();
    let Some(after) = after else {
        return Ok(Some(DsPage { meta, messages }));
    };
    // Walk the chain from the root: each link's own seqs are (base, upper].
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
        let from = after.max(base);
        let rows: Vec<(i64, Vec<u8>)> = sqlx::query_as(
            "SELECT seq, CAST(data AS BLOB) FROM events WHERE stream_key = ? AND seq > ? \
             AND seq <= ? AND type <> ? ORDER BY seq LIMIT 1000",
        )
        .bind(key)
        .bind(from as i64)
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
            // The LIMIT cut this link short: the caller asks again.
            break;
        }
    }
    tx.commit().await?;
    Ok(Some(DsPage { meta, messages }))
}
