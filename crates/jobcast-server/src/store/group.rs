//! What both backends' writers share: how a write reaches a writer and is
//! answered, what retention keeps, and what is published to the hub after
//! COMMIT.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use jobcast_protocol::{CANCEL_EVENT, END_EVENT};
use tokio::sync::{mpsc, oneshot};

use super::{
    append_response_body, Refusal, StoreError, StreamMeta, WriteOp, WriteOutcome, WriteRequest,
};
use crate::hub::{Batch, Hub};
use crate::metrics::{Metrics, Stage};

/// Most events committed in one transaction (a group never waits to fill).
pub(super) const GROUP_MAX_EVENTS: usize = 1000;
/// Most data bytes committed in one transaction.
pub(super) const GROUP_MAX_BYTES: usize = 4 << 20;
/// Events of deleted streams removed per purge step.
pub(super) const PURGE_CHUNK: i64 = 5000;
/// Most expired streams deleted by one sweep step.
pub(super) const SWEEP_STREAMS: i64 = 1000;
/// Most expired idempotency keys deleted by one sweep step (one
/// transaction), so a day of keys never holds the single writer for long.
pub(super) const SWEEP_KEYS: i64 = 5000;
/// Pause between sweep steps while expired rows remain.
pub(super) const SWEEP_EVERY: Duration = Duration::from_millis(50);

/// What a writer answers: the result, and for a committed write when it
/// passed each stage (for `jobcast_append_stage_seconds`).
type Answer = (Result<WriteOutcome, StoreError>, Option<Stamps>);

/// When a committed write passed each stage on the writer's side.
#[derive(Debug, Clone, Copy)]
struct Stamps {
    queued: Instant,
    taken: Option<Instant>,
    committed: Instant,
    published: Instant,
}

/// Where to answer one write, and when it was handed to the writer.
#[derive(Debug)]
pub(super) struct Reply {
    tx: oneshot::Sender<Answer>,
    queued: Instant,
    taken: Option<Instant>,
}

impl Reply {
    /// A reply and the receiver its answer arrives on.
    fn new() -> (Reply, oneshot::Receiver<Answer>) {
        let (tx, rx) = oneshot::channel();
        let reply = Reply {
            tx,
            queued: Instant::now(),
            taken: None,
        };
        (reply, rx)
    }

    /// The writer took the write from its queue (one `Instant`, for the stage histogram).
    pub(super) fn taken(&mut self) {
        self.taken = Some(Instant::now());
    }

    /// Answers without stage times (a failure, or a write never attempted).
    pub(super) fn send(self, result: Result<WriteOutcome, StoreError>) {
        let _ = self.tx.send((result, None));
    }

    /// Answers a committed write.
    fn committed(self, outcome: WriteOutcome, committed: Instant, published: Instant) {
        let stamps = Stamps {
            queued: self.queued,
            taken: self.taken,
            committed,
            published,
        };
        let _ = self.tx.send((Ok(outcome), Some(stamps)));
    }
}

/// Hands a write to a backend's writer (`wrap` builds its command) and waits
/// for the answer, which comes after the commit; records its stages.
pub(super) async fn submit<C>(
    tx: &mpsc::Sender<C>,
    req: WriteRequest,
    wrap: fn(WriteRequest, Reply) -> C,
    metrics: &Metrics,
) -> Result<WriteOutcome, StoreError> {
    let (reply, rx) = Reply::new();
    tx.send(wrap(req, reply))
        .await
        .map_err(|_| StoreError::Closed)?;
    let (result, stamps) = rx.await.map_err(|_| StoreError::Closed)?;
    if let Some(s) = stamps {
        record(metrics, &s);
    }
    result
}

/// Records a committed write's stages (the last one ends now).
fn record(metrics: &Metrics, s: &Stamps) {
    if let Some(taken) = s.taken {
        metrics.stage(Stage::Queue, taken - s.queued);
        metrics.stage(Stage::Commit, s.committed - taken);
    }
    metrics.stage(Stage::Publish, s.published - s.committed);
    metrics.stage(Stage::Reply, s.published.elapsed());
}

/// How long readiness waits for a writer to answer a ping.
pub(super) const PING_TIMEOUT: Duration = Duration::from_secs(3);

/// The answer to a ping: the writer ran `SELECT 1` on its connection.
pub(super) type PingReply = oneshot::Sender<Result<(), StoreError>>;

/// Asks a backend's writer (`wrap` builds its command) to answer from its
/// own thread or task, through the same queue as writes: a writer that is
/// gone, or that does not answer within [`PING_TIMEOUT`], is unavailable.
pub(super) async fn ping<C>(
    tx: &mpsc::Sender<C>,
    wrap: fn(PingReply) -> C,
) -> Result<(), StoreError> {
    let gone = || StoreError::Unavailable("the store's writer is not running".into());
    let asked = async {
        let (reply, rx) = oneshot::channel();
        tx.send(wrap(reply)).await.map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    };
    match tokio::time::timeout(PING_TIMEOUT, asked).await {
        Ok(answer) => answer,
        Err(_) => Err(StoreError::Unavailable(
            format!("the store's writer did not answer within {PING_TIMEOUT:?}").into(),
        )),
    }
}

/// What retention keeps.
#[derive(Debug, Clone, Copy)]
pub(super) struct Retention {
    pub(super) ttl_ms: i64,
    pub(super) max_events: Option<u64>,
    pub(super) idempotency_ttl_ms: i64,
    pub(super) interval: Duration,
}

impl Retention {
    /// The retention settings of a configuration.
    pub(super) fn from_config(config: &crate::config::Config) -> Retention {
        Retention {
            ttl_ms: config.retention_ttl.as_millis().min(i64::MAX as u128) as i64,
            max_events: config.max_events_per_stream,
            idempotency_ttl_ms: config.idempotency_ttl.as_millis().min(i64::MAX as u128) as i64,
            interval: config.retention_interval,
        }
    }
}

/// What to tell the hub once the transaction committed (shared by the backends).
#[derive(Debug)]
pub(super) enum Publish {
    /// The events of request `index` of the group were committed.
    Events {
        index: usize,
        key: i64,
        epoch: String,
        first_seq: u64,
        last_seq: u64,
    },
    /// The stream was created, or its creation `deleted` was deleted.
    Changed {
        stream: String,
        deleted: Option<i64>,
    },
}

/// After COMMIT: publishes the committed batches to the hub (before
/// answering, so a producer that went away cannot leave watchers without
/// its batch), then answers every request of the transaction. Whether a
/// stream was deleted.
pub(super) fn publish_and_answer(
    hub: &Hub,
    group: Vec<(WriteRequest, Reply)>,
    outcomes: Vec<WriteOutcome>,
    publish: Vec<Publish>,
) -> bool {
    let committed = Instant::now();
    let mut deleted_any = false;
    for p in publish {
        match p {
            Publish::Events {
                index,
                key,
                epoch,
                first_seq,
                ..
            } => {
                let req = &group[index].0;
                // Encoded after COMMIT, only for watched streams: a watcher
                // subscribing after this check reads the store after the
                // commit; one before gets the batch.
                if hub.is_watched(&req.stream) {
                    if let Some(batch) = encode(req, key, &epoch, first_seq) {
                        hub.publish(&req.stream, Arc::new(batch));
                    }
                }
            }
            Publish::Changed { stream, deleted } => match deleted {
                Some(key) => {
                    deleted_any = true;
                    hub.deleted(&stream, key);
                }
                None => hub.changed(&stream),
            },
        }
    }
    let published = Instant::now();
    for ((_, reply), outcome) in group.into_iter().zip(outcomes) {
        reply.committed(outcome, committed, published);
    }
    deleted_any
}

/// A transaction that could not be committed: each of its requests gets the error.
pub(super) fn fail_group(group: Vec<(WriteRequest, Reply)>, e: &dyn std::fmt::Display) {
    tracing::error!(error = %e, writes = group.len(), "store write failed; nothing was committed");
    let message = e.to_string();
    for (_, reply) in group {
        reply.send(Err(StoreError::Unavailable(message.clone().into())));
    }
}

/// Encodes a committed request's events for the hub.
pub(super) fn encode(req: &WriteRequest, key: i64, epoch: &str, first_seq: u64) -> Option<Batch> {
    match &req.op {
        WriteOp::Append(events) => Some(Batch::encode(
            key,
            epoch,
            first_seq,
            events
                .iter()
                .map(|e| (e.event_type.as_str(), e.data.as_str())),
            false,
        )),
        WriteOp::End { data, .. } => Some(Batch::encode(
            key,
            epoch,
            first_seq,
            [(END_EVENT, data.as_str())],
            true,
        )),
        WriteOp::Cancel { data } => Some(Batch::encode(
            key,
            epoch,
            first_seq,
            [(CANCEL_EVENT, data.as_str())],
            false,
        )),
        WriteOp::Create | WriteOp::Delete | WriteOp::Label(_) => None,
    }
}

/// The writes a writer takes from its queue for one commit: whatever is
/// queued, up to [`GROUP_MAX_EVENTS`] / [`GROUP_MAX_BYTES`] (a group never
/// waits to fill). Both writers gather with it.
#[derive(Debug, Default)]
pub(super) struct Group {
    writes: Vec<(WriteRequest, Reply)>,
    events: usize,
    bytes: usize,
}

impl Group {
    /// Adds a write taken from the queue.
    pub(super) fn push(&mut self, req: WriteRequest, mut reply: Reply) {
        reply.taken();
        let (events, bytes) = size_of(&req);
        self.events += events;
        self.bytes += bytes;
        self.writes.push((req, reply));
    }

    /// Whether another queued write may join.
    pub(super) fn has_room(&self) -> bool {
        self.events < GROUP_MAX_EVENTS && self.bytes < GROUP_MAX_BYTES
    }

    /// The writes gathered, leaving the group empty for the next one.
    pub(super) fn take(&mut self) -> Vec<(WriteRequest, Reply)> {
        self.events = 0;
        self.bytes = 0;
        std::mem::take(&mut self.writes)
    }
}

fn size_of(req: &WriteRequest) -> (usize, usize) {
    match &req.op {
        WriteOp::Append(events) => (events.len(), events.iter().map(|e| e.data.len()).sum()),
        WriteOp::End { data, .. } | WriteOp::Cancel { data } => (1, data.len()),
        WriteOp::Create | WriteOp::Delete | WriteOp::Label(_) => (1, 0),
    }
}

/// Whether an operation creates its stream when it is missing.
fn creates(op: &WriteOp) -> bool {
    matches!(op, WriteOp::Create | WriteOp::Append(_) | WriteOp::Label(_))
}

/// How many requests at the front of `group` can share one transaction:
/// all of them, unless a request would create a stream that an earlier one
/// of the group deleted or found missing (ended or deleted it, or was
/// refused because it did not exist). The transaction's read phase creates
/// missing streams up front, so such a request starts the next transaction.
pub(super) fn cut(group: &[(WriteRequest, Reply)]) -> usize {
    // Per stream: whether the group's first request on it creates it when
    // missing, and whether an earlier request deleted it.
    let mut seen: HashMap<&str, (bool, bool)> = HashMap::new();
    for (i, (req, _)) in group.iter().enumerate() {
        let creates = creates(&req.op);
        match seen.get_mut(req.stream.as_str()) {
            None => {
                seen.insert(&req.stream, (creates, matches!(req.op, WriteOp::Delete)));
            }
            Some((first_creates, deleted)) => {
                if creates && (*deleted || !*first_creates) {
                    return i;
                }
                *deleted |= matches!(req.op, WriteOp::Delete);
            }
        }
    }
    group.len()
}

/// What a transaction reads before deciding: every stream its requests name
/// (in id order, the lock order on every node), whether a missing one is to
/// be created, and the Idempotency-Keys the requests carry.
#[derive(Debug, Default)]
pub(super) struct Wanted<'a> {
    /// Stream ids, sorted, each once, with "create it when missing".
    pub(super) streams: Vec<(&'a str, bool)>,
    /// `(stream id, key)` of every request with an Idempotency-Key.
    pub(super) keys: Vec<(&'a str, &'a str)>,
}

impl<'a> Wanted<'a> {
    /// What the requests of one transaction (a [`cut`] of a group) need.
    pub(super) fn of(group: &'a [(WriteRequest, Reply)]) -> Wanted<'a> {
        let mut streams: Vec<(&str, bool)> = Vec::with_capacity(group.len());
        let mut seen: std::collections::HashSet<&str> =
            std::collections::HashSet::with_capacity(group.len());
        let mut keys = Vec::new();
        for (req, _) in group {
            if seen.insert(&req.stream) {
                streams.push((&req.stream, creates(&req.op)));
            }
            if let Some(idem) = &req.idempotency {
                keys.push((req.stream.as_str(), idem.key.as_str()));
            }
        }
        streams.sort_unstable_by(|a, b| a.0.cmp(b.0));
        Wanted { streams, keys }
    }
}

/// An answer remembered under an Idempotency-Key.
#[derive(Debug, Clone)]
pub(super) struct Remembered {
    /// SHA-256 of the request it answered.
    pub(super) hash: Vec<u8>,
    /// Its HTTP status.
    pub(super) status: u16,
    /// Its body.
    pub(super) body: String,
}

/// What a transaction's read phase found, its rows locked until it ends.
#[derive(Debug, Default)]
pub(super) struct Found {
    /// Each wanted stream that exists (or was just created: `true`).
    pub(super) streams: HashMap<String, (StreamMeta, bool)>,
    /// Remembered answers by `(stream key, Idempotency-Key)`.
    pub(super) keys: HashMap<(i64, String), Remembered>,
}

/// One event row to insert.
#[derive(Debug)]
pub(super) struct EventRow<'a> {
    pub(super) key: i64,
    pub(super) seq: u64,
    pub(super) event_type: &'a str,
    pub(super) data: &'a str,
    pub(super) time: i64,
}

/// One remembered answer to insert.
#[derive(Debug)]
pub(super) struct KeyRow<'a> {
    pub(super) stream_key: i64,
    pub(super) key: &'a str,
    pub(super) hash: &'a [u8; 32],
    pub(super) status: u16,
    pub(super) body: String,
    pub(super) time: i64,
}

/// Everything one transaction writes, decided by [`decide`] from what its
/// read phase found. Each backend executes it its own way (SQLite row by
/// row in process, PostgreSQL in one set-based statement).
#[derive(Debug, Default)]
pub(super) struct Plan<'a> {
    /// New events (those a trim of the same transaction would remove are left out).
    pub(super) events: Vec<EventRow<'a>>,
    /// The final row of every stream whose head, state or first seq moved
    /// (never a deleted one).
    pub(super) streams: Vec<StreamMeta>,
    /// `(stream key, first kept seq)`: older stored events are deleted.
    pub(super) trims: Vec<(i64, u64)>,
    /// Answers to remember.
    pub(super) keys: Vec<KeyRow<'a>>,
    /// Keys of streams to delete (their events are purged later).
    pub(super) deletes: Vec<i64>,
    /// One outcome per request, in order.
    pub(super) outcomes: Vec<WriteOutcome>,
    /// What to tell the hub after COMMIT, in order.
    pub(super) publish: Vec<Publish>,
}

/// A stream as the transaction goes.
struct Current {
    meta: StreamMeta,
    /// Its first seq when read (trims compare against it).
    read_first: u64,
    /// Created by this transaction's read phase, and no request used it yet
    /// (the first request on a created stream is the one that created it).
    fresh: bool,
    /// Its row must be written back.
    dirty: bool,
}

/// Decides every request of one transaction (a [`cut`] of a group) in
/// order, from what the read phase found. A refusal is decided before
/// anything is written for that request, so it changes nothing. Written
/// once for both backends.
pub(super) fn decide<'a>(
    group: &'a [(WriteRequest, Reply)],
    found: Found,
    hub: &Hub,
    max_events: Option<u64>,
) -> Plan<'a> {
    let mut plan = Plan::default();
    let mut current: HashMap<&str, Option<Current>> = HashMap::with_capacity(group.len());
    let mut streams = found.streams;
    let mut remembered = found.keys;
    for (index, (req, _)) in group.iter().enumerate() {
        let entry = current.entry(req.stream.as_str()).or_insert_with(|| {
            streams.remove(&req.stream).map(|(meta, created)| Current {
                read_first: meta.first_seq,
                meta,
                fresh: created,
                dirty: false,
            })
        });
        let fresh = entry.as_mut().is_some_and(|c| std::mem::take(&mut c.fresh));
        if fresh {
            plan.publish.push(Publish::Changed {
                stream: req.stream.clone(),
                deleted: None,
            });
        }
        let outcome = match (&req.op, entry.as_mut()) {
            // The read phase created every stream a Create or Append needs.
            (_, None) => WriteOutcome::Refused(Refusal::NotFound),
            (WriteOp::Create, Some(c)) => WriteOutcome::Created {
                created: fresh,
                meta: c.meta.clone(),
            },
            (WriteOp::Label(labels), Some(c)) => {
                if c.meta.labels != *labels {
                    c.meta.labels = labels.clone();
                    c.meta.updated_at = crate::time::now_ms();
                    c.dirty = true;
                    plan.publish.push(Publish::Changed {
                        stream: req.stream.clone(),
                        deleted: None,
                    });
                }
                WriteOutcome::Created {
                    created: fresh,
                    meta: c.meta.clone(),
                }
            }
            (WriteOp::Cancel { data }, Some(c)) => {
                if c.meta.ended() {
                    WriteOutcome::Refused(Refusal::StreamEnded)
                } else if c.meta.cancel_requested {
                    WriteOutcome::CancelRequested {
                        meta: c.meta.clone(),
                        appended: false,
                    }
                } else {
                    let rows = [(CANCEL_EVENT, data.as_str())];
                    append_rows(&mut plan, c, index, rows, max_events);
                    c.meta.cancel_requested = true;
                    WriteOutcome::CancelRequested {
                        meta: c.meta.clone(),
                        appended: true,
                    }
                }
            }
            (WriteOp::Delete, Some(c)) => {
                plan.deletes.push(c.meta.key);
                plan.publish.push(Publish::Changed {
                    stream: req.stream.clone(),
                    deleted: Some(c.meta.key),
                });
                *entry = None;
                WriteOutcome::Deleted
            }
            (WriteOp::Append(events), Some(c)) => {
                if let Some(replay) = replay(&remembered, c, req) {
                    replay
                } else if c.meta.ended() {
                    WriteOutcome::Refused(Refusal::StreamEnded)
                } else {
                    let rows = events
                        .iter()
                        .map(|e| (e.event_type.as_str(), e.data.as_str()));
                    let (first_seq, last_seq, time) =
                        append_rows(&mut plan, c, index, rows, max_events);
                    let cancel = c.meta.cancel_requested;
                    let body = append_response_body(&c.meta.epoch, first_seq, last_seq, cancel);
                    remember(&mut plan, &mut remembered, c, req, 201, body, time);
                    WriteOutcome::Appended {
                        epoch: c.meta.epoch.clone(),
                        first_seq,
                        last_seq,
                        cancel_requested: cancel,
                    }
                }
            }
            (WriteOp::End { state, data }, Some(c)) => {
                if let Some(replay) = replay(&remembered, c, req) {
                    replay
                } else if c.meta.ended() {
                    WriteOutcome::Refused(Refusal::StreamEnded)
                } else {
                    // The end never trims (as before the planner): the
                    // next append, if any, is refused anyway.
                    let rows = [(END_EVENT, data.as_str())];
                    let (_, _, time) = append_rows(&mut plan, c, index, rows, None);
                    c.meta.state = *state;
                    let body = serde_json::to_string(&c.meta.to_json(hub.watchers_of(&req.stream)))
                        .unwrap_or_default();
                    remember(&mut plan, &mut remembered, c, req, 200, body, time);
                    WriteOutcome::Ended {
                        meta: c.meta.clone(),
                    }
                }
            }
        };
        plan.outcomes.push(outcome);
    }
    // Final rows; events a trim removes again are not inserted at all.
    let mut kept_from: HashMap<i64, u64> = HashMap::new();
    for c in current.into_values().flatten() {
        if c.meta.first_seq > c.read_first {
            plan.trims.push((c.meta.key, c.meta.first_seq));
            kept_from.insert(c.meta.key, c.meta.first_seq);
        }
        if c.dirty {
            plan.streams.push(c.meta);
        }
    }
    let deleted: std::collections::HashSet<i64> = plan.deletes.iter().copied().collect();
    plan.events.retain(|e| {
        !deleted.contains(&e.key) && kept_from.get(&e.key).is_none_or(|&first| e.seq >= first)
    });
    plan
}

/// Appends `rows` after the stream's head: the event rows, the new head
/// (and first kept seq, with `max_events`), and the batch to publish after
/// COMMIT. Its first and last seq and the commit time.
fn append_rows<'a>(
    plan: &mut Plan<'a>,
    c: &mut Current,
    index: usize,
    rows: impl IntoIterator<Item = (&'a str, &'a str)>,
    max_events: Option<u64>,
) -> (u64, u64, i64) {
    let first_seq = c.meta.head + 1;
    let time = crate::time::now_ms();
    let before = plan.events.len();
    plan.events.extend(
        rows.into_iter()
            .enumerate()
            .map(|(i, (ty, data))| EventRow {
                key: c.meta.key,
                seq: first_seq + i as u64,
                event_type: ty,
                data,
                time,
            }),
    );
    let last_seq = c.meta.head + (plan.events.len() - before) as u64;
    c.meta.head = last_seq;
    c.meta.updated_at = time;
    if let Some(max) = max_events {
        c.meta.first_seq = c.meta.first_seq.max((last_seq + 1).saturating_sub(max));
    }
    c.dirty = true;
    plan.publish.push(Publish::Events {
        index,
        key: c.meta.key,
        epoch: c.meta.epoch.clone(),
        first_seq,
        last_seq,
    });
    (first_seq, last_seq, time)
}

/// A previous answer to the same Idempotency-Key (read, or remembered by
/// an earlier request of this transaction), or a refusal when the key came
/// with another request.
fn replay(
    remembered: &HashMap<(i64, String), Remembered>,
    c: &Current,
    req: &WriteRequest,
) -> Option<WriteOutcome> {
    let idem = req.idempotency.as_ref()?;
    let r = remembered.get(&(c.meta.key, idem.key.clone()))?;
    Some(if r.hash[..] != idem.hash[..] {
        WriteOutcome::Refused(Refusal::IdempotencyKeyReused)
    } else {
        WriteOutcome::Replayed {
            status: r.status,
            body: r.body.clone(),
        }
    })
}

/// Remembers a request's answer under its Idempotency-Key, if it has one.
fn remember<'a>(
    plan: &mut Plan<'a>,
    remembered: &mut HashMap<(i64, String), Remembered>,
    c: &Current,
    req: &'a WriteRequest,
    status: u16,
    body: String,
    time: i64,
) {
    let Some(idem) = &req.idempotency else {
        return;
    };
    remembered.insert(
        (c.meta.key, idem.key.clone()),
        Remembered {
            hash: idem.hash.to_vec(),
            status,
            body: body.clone(),
        },
    );
    plan.keys.push(KeyRow {
        stream_key: c.meta.key,
        key: &idem.key,
        hash: &idem.hash,
        status,
        body,
        time,
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{IdempotencyKey, NewEvent};
    use jobcast_protocol::StreamState;

    fn req(stream: &str, op: WriteOp, key: Option<(&str, u8)>) -> (WriteRequest, Reply) {
        let (reply, _) = Reply::new();
        let idempotency = key.map(|(k, h)| IdempotencyKey {
            key: k.into(),
            hash: [h; 32],
        });
        (
            WriteRequest {
                stream: stream.into(),
                op,
                idempotency,
            },
            reply,
        )
    }

    fn append(n: usize) -> WriteOp {
        WriteOp::Append(
            (0..n)
                .map(|i| NewEvent {
                    event_type: "message".into(),
                    data: format!("{i}"),
                })
                .collect(),
        )
    }

    fn end() -> WriteOp {
        WriteOp::End {
            state: StreamState::Completed,
            data: "{}".into(),
        }
    }

    fn meta(id: &str, key: i64, head: u64) -> StreamMeta {
        StreamMeta {
            key,
            id: id.into(),
            epoch: format!("e{key}"),
            state: StreamState::Open,
            head,
            first_seq: 1,
            created_at: 0,
            updated_at: 0,
            labels: Default::default(),
            cancel_requested: false,
        }
    }

    fn found(rows: &[(StreamMeta, bool)]) -> Found {
        Found {
            streams: rows.iter().map(|r| (r.0.id.clone(), r.clone())).collect(),
            keys: HashMap::new(),
        }
    }

    #[test]
    fn a_recreation_starts_the_next_transaction() {
        let g = [
            req("a", append(1), None),
            req("b", end(), None),
            req("a", WriteOp::Delete, None),
            req("c", append(1), None),
            req("a", append(1), None),
        ];
        assert_eq!(cut(&g), 4, "the append after the delete of a waits");
        // End on a (maybe missing) stream, then an append that may create it.
        let g = [req("b", end(), None), req("b", append(1), None)];
        assert_eq!(cut(&g), 1);
        let g = [req("b", append(1), None), req("b", end(), None)];
        assert_eq!(cut(&g), 2);
        let w = Wanted::of(&g[..]);
        assert_eq!(w.streams, vec![("b", true)]);
    }

    #[test]
    fn wanted_streams_are_sorted_once_with_their_keys() {
        let g = [
            req("z", append(1), Some(("k1", 1))),
            req("a", end(), Some(("k2", 2))),
            req("z", append(1), None),
        ];
        let w = Wanted::of(&g[..]);
        assert_eq!(w.streams, vec![("a", false), ("z", true)]);
        assert_eq!(w.keys, vec![("z", "k1"), ("a", "k2")]);
    }

    #[test]
    fn requests_of_one_stream_build_on_each_other() {
        let g = [
            req("s", append(2), Some(("k", 7))),
            req("s", append(1), Some(("k", 7))),
            req("s", append(1), Some(("k", 8))),
            req("s", append(3), None),
            req("s", WriteOp::Create, None),
            req("s", end(), None),
            req("s", append(1), None),
        ];
        let plan = decide(
            &g,
            found(&[(meta("s", 5, 10), false)]),
            &Hub::new(1 << 20),
            None,
        );
        let seqs: Vec<u64> = plan.events.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, vec![11, 12, 13, 14, 15, 16]);
        assert!(matches!(
            plan.outcomes[0],
            WriteOutcome::Appended {
                first_seq: 11,
                last_seq: 12,
                ..
            }
        ));
        // The same key and request within the transaction: the first answer.
        assert!(matches!(
            &plan.outcomes[1],
            WriteOutcome::Replayed { status: 201, .. }
        ));
        assert!(matches!(
            plan.outcomes[2],
            WriteOutcome::Refused(Refusal::IdempotencyKeyReused)
        ));
        assert!(matches!(
            plan.outcomes[4],
            WriteOutcome::Created { created: false, .. }
        ));
        assert!(matches!(&plan.outcomes[5], WriteOutcome::Ended { meta } if meta.head == 16));
        assert!(matches!(
            plan.outcomes[6],
            WriteOutcome::Refused(Refusal::StreamEnded)
        ));
        assert_eq!(plan.keys.len(), 1);
        assert_eq!(plan.streams.len(), 1);
        assert_eq!(
            (plan.streams[0].head, plan.streams[0].state),
            (16, StreamState::Completed)
        );
    }

    #[test]
    fn a_created_stream_is_announced_before_its_events() {
        let g = [
            req("n", WriteOp::Create, None),
            req("n", WriteOp::Create, None),
            req("n", append(1), None),
        ];
        let plan = decide(
            &g,
            found(&[(meta("n", 9, 0), true)]),
            &Hub::new(1 << 20),
            None,
        );
        assert!(matches!(
            plan.outcomes[0],
            WriteOutcome::Created { created: true, .. }
        ));
        assert!(matches!(
            plan.outcomes[1],
            WriteOutcome::Created { created: false, .. }
        ));
        assert!(matches!(
            &plan.publish[..],
            [
                Publish::Changed { deleted: None, .. },
                Publish::Events { index: 2, .. }
            ]
        ));
    }

    #[test]
    fn missing_streams_are_not_found_and_deleted_ones_write_nothing() {
        let g = [
            req("gone", end(), None),
            req("gone", WriteOp::Delete, None),
            req("d", append(2), None),
            req("d", WriteOp::Delete, None),
            req("d", end(), None),
        ];
        let plan = decide(
            &g,
            found(&[(meta("d", 3, 0), false)]),
            &Hub::new(1 << 20),
            None,
        );
        assert!(matches!(
            plan.outcomes[0],
            WriteOutcome::Refused(Refusal::NotFound)
        ));
        assert!(matches!(
            plan.outcomes[1],
            WriteOutcome::Refused(Refusal::NotFound)
        ));
        assert!(matches!(plan.outcomes[3], WriteOutcome::Deleted));
        assert!(matches!(
            plan.outcomes[4],
            WriteOutcome::Refused(Refusal::NotFound)
        ));
        assert_eq!(plan.deletes, vec![3]);
        assert!(
            plan.events.is_empty(),
            "events of a deleted stream are not inserted"
        );
        assert!(plan.streams.is_empty(), "a deleted row is not updated");
    }

    #[test]
    fn trimmed_events_are_never_inserted() {
        let g = [req("t", append(5), None), req("t", append(4), None)];
        let plan = decide(
            &g,
            found(&[(meta("t", 1, 3), false)]),
            &Hub::new(1 << 20),
            Some(3),
        );
        // Head 3 + 9 = 12; keep 10..=12.
        let seqs: Vec<u64> = plan.events.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, vec![10, 11, 12]);
        assert_eq!(plan.trims, vec![(1, 10)]);
        assert_eq!(plan.streams[0].first_seq, 10);
        // Watchers still get both batches whole.
        assert!(matches!(
            &plan.publish[..],
            [
                Publish::Events {
                    first_seq: 4,
                    last_seq: 8,
                    ..
                },
                Publish::Events {
                    first_seq: 9,
                    last_seq: 12,
                    ..
                }
            ]
        ));
    }
}
