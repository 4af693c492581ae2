//! Reads of the PostgreSQL store: pages of a stream's log.

use std::time::Duration;

use futures::TryStreamExt;
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnection, PgPool};
use sqlx::{Postgres, Row};

use super::{data_from_row, meta_from_row, seq, PAGE_BYTES};
use crate::store::{Page, StoredEvent};

/// Runs `f` on a connection of `pool` for at most `limit`. sqlx has no
/// client-side statement timeout, and a connection whose peer silently
/// stopped answering (no FIN, no RST: a dead link, a blackholing firewall)
/// would hold the read forever; past `limit` the read fails and the
/// connection is closed instead of going back to the pool.
pub(super) async fn bounded<T>(
    pool: &PgPool,
    limit: Duration,
    f: impl for<'c> FnOnce(
        &'c mut PgConnection,
    ) -> futures::future::BoxFuture<'c, Result<T, sqlx::Error>>,
) -> Result<T, sqlx::Error> {
    let mut conn: PoolConnection<Postgres> = pool.acquire().await?;
    match tokio::time::timeout(limit, f(&mut conn)).await {
        Ok(r) => r,
        Err(_) => {
            // Out of the pool and closed: its state mid-query is unknown.
            drop(conn.detach());
            Err(sqlx::Error::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("PostgreSQL did not answer within {limit:?}"),
            )))
        }
    }
}

/// [`read_page_on`] on a connection of `pool`, for at most `limit`.
pub(super) async fn read_page(
    pool: &PgPool,
    limit: Duration,
    stream: &str,
    after: u64,
    events: u32,
) -> Result<Option<Page>, sqlx::Error> {
    let stream = stream.to_owned();
    bounded(pool, limit, move |c| {
        Box::pin(async move { read_page_on(c, &stream, after, events).await })
    })
    .await
}

/// The metadata and up to `limit` events after `after`, from one statement
/// (so from one snapshot), stopping after [`PAGE_BYTES`] of data.
async fn read_page_on(
    conn: &mut PgConnection,
    stream: &str,
    after: u64,
    limit: u32,
) -> Result<Option<Page>, sqlx::Error> {
    let mut rows = sqlx::query(
        "SELECT s.key, s.id, s.epoch, s.state, s.head, s.first_seq, s.created_at, s.updated_at, \
                s.labels, s.cancel_requested, \
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
    .fetch(conn);
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
