//! The store: the durable log of every stream, the source of truth for
//! replay. One writer task commits appends in groups and, right after each
//! COMMIT, publishes the committed batches to the hub; reads are pages from a
//! small read-only pool.
//!
//! [`Store`] dispatches over an enum of backends (a public `async fn` in a
//! trait trips `async_fn_in_trait`); the types here hold no backend-specific
//! types, so PostgreSQL fits behind the same surface.

pub mod ds;
mod group;
mod postgres;
mod sqlite;

pub use postgres::PgStore;
pub use sqlite::SqliteStore;

#[cfg(feature = "test-util")]
use std::sync::atomic::{AtomicBool, Ordering};
#[cfg(feature = "test-util")]
use std::sync::Arc;

use jobcast_protocol::{EventId, StreamState};
use serde::Serialize;

use crate::metrics::QueryKind;
use crate::{config::Config, hub::Hub, metrics::Metrics};

/// Most event data in one store page (one event when a single event is
/// larger): replay is written in pieces of about this size, so a watcher
/// whose socket stalls holds at most one piece.
pub const PAGE_BYTES: usize = 256 << 10;

/// A store failure. Nothing was written when an append answers with it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The database could not be reached or answered with an error.
    #[error("the store is unavailable")]
    Unavailable(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// Migrations could not be applied.
    #[error("the store's schema could not be migrated")]
    Migrate(#[source] sqlx::migrate::MigrateError),
    /// The writer task is gone (the server is shutting down).
    #[error("the store is shutting down")]
    Closed,
    /// The database URL is not one jobcast can open.
    #[error("unsupported database url {0:?} (expected sqlite://PATH or postgres://…)")]
    UnsupportedUrl(String),
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        StoreError::Unavailable(Box::new(e))
    }
}

/// A stream's metadata, read from one snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamMeta {
    /// The stream id.
    pub id: String,
    /// The internal key of this creation of the stream (never reused).
    pub key: i64,
    /// The epoch given at creation.
    pub epoch: String,
    /// open, completed or failed.
    pub state: StreamState,
    /// The seq of the last event (`jobcast.end` included); 0 when empty.
    pub head: u64,
    /// The lowest seq still kept (head + 1 when every event was trimmed).
    pub first_seq: u64,
    /// Creation time, unix milliseconds.
    pub created_at: i64,
    /// Time of the last change, unix milliseconds.
    pub updated_at: i64,
    /// Labels set with `PUT /v1/streams/{id}`.
    pub labels: Labels,
    /// Whether a cancel was requested (`POST /v1/streams/{id}/cancel`).
    pub cancel_requested: bool,
}

/// A stream's labels: a small string map.
pub type Labels = std::collections::BTreeMap<String, String>;

/// The columns [`meta_from_row`] reads, in the order the rusqlite writer
/// reads them by index.
pub(crate) const META_COLUMNS: &str =
    "key, id, epoch, state, head, first_seq, created_at, updated_at, labels, cancel_requested";

/// Labels as stored (JSON text).
pub(crate) fn labels_to_text(labels: &Labels) -> String {
    serde_json::to_string(labels).unwrap_or_else(|_| "{}".into())
}

/// Labels from their stored text.
pub(crate) fn labels_from_text(text: &str) -> Result<Labels, serde_json::Error> {
    serde_json::from_str(text)
}

/// A stream's metadata from a row of [`META_COLUMNS`] read with sqlx
/// (either backend).
pub(crate) fn meta_from_row<'r, R>(row: &'r R) -> Result<StreamMeta, sqlx::Error>
where
    R: sqlx::Row,
    &'r str: sqlx::ColumnIndex<R>,
    String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    bool: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    let state: String = row.try_get("state")?;
    let labels: String = row.try_get("labels")?;
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
        labels: labels_from_text(&labels).map_err(|e| sqlx::Error::ColumnDecode {
            index: "labels".into(),
            source: Box::new(e),
        })?,
        cancel_requested: row.try_get("cancel_requested")?,
    })
}

impl StreamMeta {
    /// Whether the stream has ended (its last event is `jobcast.end`).
    pub fn ended(&self) -> bool {
        self.state != StreamState::Open
    }

    /// The id of the last event, if any.
    pub fn last_id(&self) -> Option<EventId> {
        (self.head > 0).then(|| EventId::new(self.epoch.clone(), self.head))
    }

    /// The API's JSON body for this stream; `watchers` is counted on this node.
    pub fn to_json(&self, watchers: usize) -> MetaJson<'_> {
        MetaJson {
            id: &self.id,
            epoch: &self.epoch,
            state: self.state.as_str(),
            created_at: crate::time::rfc3339(self.created_at),
            updated_at: crate::time::rfc3339(self.updated_at),
            last_id: self.last_id().map(|i| i.to_string()),
            events: self.head,
            watchers,
            labels: &self.labels,
            cancel_requested: self.cancel_requested,
        }
    }
}

/// The JSON body of a stream's metadata.
#[derive(Debug, Serialize)]
pub struct MetaJson<'a> {
    id: &'a str,
    epoch: &'a str,
    state: &'static str,
    created_at: String,
    updated_at: String,
    last_id: Option<String>,
    events: u64,
    watchers: usize,
    labels: &'a Labels,
    cancel_requested: bool,
}

/// An event to append, validated by the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEvent {
    /// The event type.
    pub event_type: String,
    /// The data as it is stored and sent.
    pub data: String,
}

/// An event read from the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEvent {
    /// Its seq.
    pub seq: u64,
    /// Its type.
    pub event_type: String,
    /// Its data.
    pub data: String,
    /// Commit time, unix milliseconds.
    pub time: i64,
}

/// An Idempotency-Key with the hash of the request it came with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyKey {
    /// The key as the client sent it.
    pub key: String,
    /// SHA-256 of the operation and its body.
    pub hash: [u8; 32],
}

/// A write to a stream.
#[derive(Debug, Clone)]
pub enum WriteOp {
    /// Append events, creating the stream if needed.
    Append(Vec<NewEvent>),
    /// Create the stream if it does not exist.
    Create,
    /// End the stream: append `jobcast.end` with `data` and set the state.
    End {
        /// `completed` or `failed`.
        state: StreamState,
        /// The data of the `jobcast.end` event (JSON text).
        data: String,
    },
    /// Delete the stream and its log.
    Delete,
    /// Create the stream if needed and replace its labels.
    Label(Labels),
    /// Ask the producer to stop: append `jobcast.cancel_requested` with
    /// `data` (JSON text) and set `cancel_requested`, once.
    Cancel {
        /// The data of the event.
        data: String,
    },
}

/// A request for the writer task.
#[derive(Debug, Clone)]
pub struct WriteRequest {
    /// The stream written to.
    pub stream: String,
    /// What to do.
    pub op: WriteOp,
    /// The request's Idempotency-Key, for Append and End.
    pub idempotency: Option<IdempotencyKey>,
}

/// A write that was refused; nothing was changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The stream has ended.
    StreamEnded,
    /// The stream does not exist.
    NotFound,
    /// The Idempotency-Key was used with another request.
    IdempotencyKeyReused,
}

/// What a committed write produced.
#[derive(Debug, Clone)]
pub enum WriteOutcome {
    /// Events were appended.
    Appended {
        /// The stream's epoch.
        epoch: String,
        /// The first new seq.
        first_seq: u64,
        /// The last new seq.
        last_seq: u64,
        /// Whether a cancel of the stream was requested.
        cancel_requested: bool,
    },
    /// A cancel was requested now (`appended`) or before.
    CancelRequested {
        /// Its metadata after the write.
        meta: StreamMeta,
        /// Whether this request appended `jobcast.cancel_requested`.
        appended: bool,
    },
    /// The stream was created (`created`) or already existed.
    Created {
        /// Its metadata after the write.
        meta: StreamMeta,
        /// Whether this request created it.
        created: bool,
    },
    /// The stream was ended.
    Ended {
        /// Its metadata after the write.
        meta: StreamMeta,
    },
    /// The stream was deleted.
    Deleted,
    /// An earlier request with the same Idempotency-Key: its answer.
    Replayed {
        /// HTTP status of the first answer.
        status: u16,
        /// Body of the first answer.
        body: String,
    },
    /// Refused; nothing changed.
    Refused(Refusal),
}

/// The answer to an append, as JSON (`{"first_id","last_id","count"}`,
/// and `"cancel_requested": true` once a cancel was requested).
pub fn append_response_body(
    epoch: &str,
    first_seq: u64,
    last_seq: u64,
    cancel_requested: bool,
) -> String {
    let mut body = serde_json::json!({
        "first_id": EventId::new(epoch, first_seq).to_string(),
        "last_id": EventId::new(epoch, last_seq).to_string(),
        "count": last_seq + 1 - first_seq,
    });
    if cancel_requested {
        body["cancel_requested"] = serde_json::Value::Bool(true);
    }
    body.to_string()
}

/// One consistent read: the stream's metadata and events after a seq.
#[derive(Debug, Clone)]
pub struct Page {
    /// The metadata from the same snapshot as the events.
    pub meta: StreamMeta,
    /// Events with seq > the requested one, in order, at most the limit.
    pub events: Vec<StoredEvent>,
}

/// A filter and cursor for listing streams.
#[derive(Debug, Clone, Default)]
pub struct ListQuery {
    /// Only streams in this state.
    pub state: Option<StreamState>,
    /// At most this many.
    pub limit: u32,
    /// Only streams after this position in the order (newest created first).
    pub after: Option<ListPosition>,
    /// Only streams matching one of these patterns (exact ids, or prefixes
    /// ending in `*`); None: every stream.
    pub patterns: Option<Vec<String>>,
    /// Only streams whose id starts with this.
    pub prefix: Option<String>,
    /// Only streams with all of these labels (key, value).
    pub labels: Vec<(String, String)>,
}

/// Where the SQL of the two backends differs in a list query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dialect {
    Sqlite,
    Postgres,
}

/// A place in the stream list's order: `created_at` descending, then `id`
/// descending. Made only of what a listed stream shows, so a cursor built
/// from it tells nothing about streams the reader cannot see.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListPosition {
    /// The stream's creation time, unix milliseconds.
    pub created_at: i64,
    /// The stream's id.
    pub id: String,
}

/// Appends the `WHERE` terms and `ORDER BY … LIMIT` of a list query, the
/// same for every SQL backend.
fn push_list_query<'a, DB>(qb: &mut sqlx::QueryBuilder<'a, DB>, q: &'a ListQuery, dialect: Dialect)
where
    DB: sqlx::Database,
    i64: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    &'a str: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    String: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
{
    if let Some(state) = q.state {
        qb.push(" AND state = ").push_bind(state.as_str());
    }
    if let Some(prefix) = &q.prefix {
        qb.push(" AND substr(id, 1, CAST(")
            .push_bind(prefix.chars().count() as i64)
            .push(" AS INTEGER)) = ")
            .push_bind(prefix.as_str());
    }
    for (key, value) in &q.labels {
        // Keys are validated (letters, digits, `_-./`): safe inside a JSON path.
        match dialect {
            Dialect::Sqlite => qb
                .push(" AND json_extract(labels, ")
                .push_bind(format!("$.\"{key}\"")),
            Dialect::Postgres => qb.push(" AND (labels::jsonb ->> ").push_bind(key.as_str()),
        };
        qb.push(") = ").push_bind(value.as_str());
    }
    if let Some(p) = &q.after {
        qb.push(" AND (created_at < ")
            .push_bind(p.created_at)
            .push(" OR (created_at = ")
            .push_bind(p.created_at)
            .push(" AND id < ")
            .push_bind(p.id.as_str())
            .push("))");
    }
    match &q.patterns {
        Some(patterns) if !patterns.iter().any(|p| p == "*") => {
            // The same matching as auth::matches: exact, or a plain prefix.
            qb.push(" AND (1 = 0");
            for p in patterns {
                match p.strip_suffix('*') {
                    // CAST: PostgreSQL's substr takes an integer, not a bigint.
                    Some(prefix) => qb
                        .push(" OR substr(id, 1, CAST(")
                        .push_bind(prefix.chars().count() as i64)
                        .push(" AS INTEGER)) = ")
                        .push_bind(prefix),
                    None => qb.push(" OR id = ").push_bind(p.as_str()),
                };
            }
            qb.push(")");
        }
        _ => {}
    }
    qb.push(" ORDER BY created_at DESC, id DESC LIMIT ")
        .push_bind(i64::from(q.limit));
}

/// Makes a [`Store::Faulty`] fail every call while set: for outage tests
/// (a real outage is provoked too; see the robustness tests). Only with the
/// `test-util` feature.
#[cfg(feature = "test-util")]
#[derive(Debug, Clone, Default)]
pub struct FaultSwitch(Arc<AtomicBool>);

#[cfg(feature = "test-util")]
impl FaultSwitch {
    /// Starts (true) or ends (false) the outage.
    pub fn set_failing(&self, failing: bool) {
        self.0.store(failing, Ordering::SeqCst);
    }

    fn check(&self, metrics: &Metrics) -> Result<(), StoreError> {
        if self.0.load(Ordering::SeqCst) {
            metrics.store_error();
            return Err(StoreError::Unavailable("injected store fault".into()));
        }
        Ok(())
    }
}

/// The durable log, dispatched over its backends.
#[derive(Debug, Clone)]
pub enum Store {
    /// The embedded default.
    Sqlite(SqliteStore),
    /// PostgreSQL, for several nodes on one database.
    Postgres(PgStore),
    /// Another store whose calls fail while its switch is on (only with the
    /// `test-util` feature).
    #[cfg(feature = "test-util")]
    Faulty(Box<Store>, FaultSwitch, Metrics),
}

impl Store {
    /// Opens the store named by `config.db`, runs migrations and starts the
    /// writer task, which publishes committed batches to `hub`.
    pub async fn open(config: &Config, hub: Hub, metrics: Metrics) -> Result<Store, StoreError> {
        if config.db.starts_with("sqlite:") {
            Ok(Store::Sqlite(
                SqliteStore::open(config, hub, metrics).await?,
            ))
        } else if config.db.starts_with("postgres://") || config.db.starts_with("postgresql://") {
            Ok(Store::Postgres(PgStore::open(config, hub, metrics).await?))
        } else {
            Err(StoreError::UnsupportedUrl(crate::config::redact_db_url(
                &config.db,
            )))
        }
    }

    /// Wraps this store so that it fails on command (only with the
    /// `test-util` feature).
    #[cfg(feature = "test-util")]
    pub fn with_faults(self, metrics: Metrics) -> (Store, FaultSwitch) {
        let switch = FaultSwitch::default();
        (
            #[cfg(feature = "test-util")]
            Store::Faulty(Box::new(self), switch.clone(), metrics),
            switch,
        )
    }

    /// Hands a write to the writer task and waits until it is committed.
    pub async fn write(&self, req: WriteRequest) -> Result<WriteOutcome, StoreError> {
        match self {
            Store::Sqlite(s) => s.metrics().counted(s.write(req).await),
            Store::Postgres(s) => s.metrics().counted(s.write(req).await),
            #[cfg(feature = "test-util")]
            Store::Faulty(inner, switch, m) => {
                switch.check(m)?;
                Box::pin(inner.write(req)).await
            }
        }
    }

    /// A Durable Streams write, answered after its COMMIT.
    pub async fn ds_write(&self, w: ds::DsWrite) -> Result<ds::DsOutcome, StoreError> {
        match self {
            Store::Sqlite(s) => s.metrics().counted(s.ds_write(w).await),
            Store::Postgres(s) => s.metrics().counted(s.ds_write(w).await),
            #[cfg(feature = "test-util")]
            Store::Faulty(inner, switch, m) => {
                switch.check(m)?;
                Box::pin(inner.ds_write(w)).await
            }
        }
    }

    /// A DS stream's metadata and, when `after` is given, up to about
    /// `max_bytes` of its messages after that seq, from one snapshot.
    pub async fn ds_read(
        &self,
        stream: &str,
        after: Option<u64>,
        max_bytes: usize,
    ) -> Result<Option<ds::DsPage>, StoreError> {
        match self {
            Store::Sqlite(s) => s
                .metrics()
                .counted(s.ds_read(stream, after, max_bytes).await),
            Store::Postgres(s) => s
                .metrics()
                .counted(s.ds_read(stream, after, max_bytes).await),
            #[cfg(feature = "test-util")]
            Store::Faulty(inner, switch, m) => {
                switch.check(m)?;
                Box::pin(inner.ds_read(stream, after, max_bytes)).await
            }
        }
    }

    /// The metadata of a stream.
    pub async fn meta(&self, stream: &str) -> Result<Option<StreamMeta>, StoreError> {
        match self {
            Store::Sqlite(s) => {
                s.metrics().store_query(QueryKind::Meta);
                s.metrics().counted(s.meta(stream).await)
            }
            Store::Postgres(s) => {
                s.metrics().store_query(QueryKind::Meta);
                s.metrics().counted(s.meta(stream).await)
            }
            #[cfg(feature = "test-util")]
            Store::Faulty(inner, switch, m) => {
                switch.check(m)?;
                Box::pin(inner.meta(stream)).await
            }
        }
    }

    /// The metadata and up to `limit` events with seq > `after`, from one snapshot.
    pub async fn read(
        &self,
        stream: &str,
        after: u64,
        limit: u32,
    ) -> Result<Option<Page>, StoreError> {
        match self {
            Store::Sqlite(s) => {
                s.metrics().page_read();
                s.metrics().store_query(QueryKind::Page);
                s.metrics().counted(s.read(stream, after, limit).await)
            }
            Store::Postgres(s) => {
                s.metrics().page_read();
                s.metrics().store_query(QueryKind::Page);
                s.metrics().counted(s.read(stream, after, limit).await)
            }
            #[cfg(feature = "test-util")]
            Store::Faulty(inner, switch, m) => {
                switch.check(m)?;
                Box::pin(inner.read(stream, after, limit)).await
            }
        }
    }

    /// Streams, newest created first.
    pub async fn list(&self, q: &ListQuery) -> Result<Vec<StreamMeta>, StoreError> {
        match self {
            Store::Sqlite(s) => s.metrics().counted(s.list(q).await),
            Store::Postgres(s) => s.metrics().counted(s.list(q).await),
            #[cfg(feature = "test-util")]
            Store::Faulty(inner, switch, m) => {
                switch.check(m)?;
                Box::pin(inner.list(q)).await
            }
        }
    }

    /// Whether the store answers.
    pub async fn ping(&self) -> Result<(), StoreError> {
        match self {
            Store::Sqlite(s) => s.metrics().counted(s.ping().await),
            Store::Postgres(s) => s.metrics().counted(s.ping().await),
            #[cfg(feature = "test-util")]
            Store::Faulty(inner, switch, m) => {
                switch.check(m)?;
                Box::pin(inner.ping()).await
            }
        }
    }

    /// Stops the writer as if it had died — its thread (SQLite) or task
    /// (PostgreSQL) really exits — and leaves reads and everything else
    /// running: for tests of what a dead writer looks like (only with the
    /// `test-util` feature).
    #[cfg(feature = "test-util")]
    pub async fn stop_writer(&self) {
        match self {
            Store::Sqlite(s) => s.stop_writer().await,
            Store::Postgres(s) => s.stop_writer().await,
            Store::Faulty(inner, _, _) => Box::pin(inner.stop_writer()).await,
        }
    }

    /// Stops the writer after it committed what is queued, and closes connections.
    pub async fn close(&self) {
        match self {
            Store::Sqlite(s) => s.close().await,
            Store::Postgres(s) => s.close().await,
            #[cfg(feature = "test-util")]
            Store::Faulty(inner, _, _) => Box::pin(inner.close()).await,
        }
    }
}

/// The NOTIFY channel every node's listener listens on (for DS writes).
fn postgres_channel() -> &'static str {
    postgres::CHANNEL
}
