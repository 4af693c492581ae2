//! What both backends' writers share: how a write reaches a writer and is
//! answered, what retention keeps, and what is published to the hub after
//! COMMIT.

use std::sync::Arc;
use std::time::Duration;

use jobcast_protocol::END_EVENT;
use tokio::sync::{mpsc, oneshot};

use super::{StoreError, WriteOp, WriteOutcome, WriteRequest};
use crate::hub::{Batch, Hub};

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

/// The answer to one write.
pub(super) type Reply = oneshot::Sender<Result<WriteOutcome, StoreError>>;

/// Hands a write to a backend's writer (`wrap` builds its command) and waits
/// for the answer, which comes after the commit.
pub(super) async fn submit<C>(
    tx: &mpsc::Sender<C>,
    req: WriteRequest,
    wrap: fn(WriteRequest, Reply) -> C,
) -> Result<WriteOutcome, StoreError> {
    let (reply, rx) = oneshot::channel();
    tx.send(wrap(req, reply))
        .await
        .map_err(|_| StoreError::Closed)?;
    rx.await.map_err(|_| StoreError::Closed)?
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
/// its batch), then answers every request. Whether a stream was deleted.
pub(super) fn publish_and_answer(
    hub: &Hub,
    group: &mut Vec<(WriteRequest, Reply)>,
    outcomes: Vec<WriteOutcome>,
    publish: Vec<Publish>,
) -> bool {
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
    for ((_, reply), outcome) in group.drain(..).zip(outcomes) {
        let _ = reply.send(Ok(outcome));
    }
    deleted_any
}

/// A group that could not be committed: every request gets the error.
pub(super) fn fail_group(group: &mut Vec<(WriteRequest, Reply)>, e: &dyn std::fmt::Display) {
    tracing::error!(error = %e, writes = group.len(), "store write failed; nothing was committed");
    let message = e.to_string();
    for (_, reply) in group.drain(..) {
        let _ = reply.send(Err(StoreError::Unavailable(message.clone().into())));
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
        WriteOp::Create | WriteOp::Delete => None,
    }
}

pub(super) fn size_of(req: &WriteRequest) -> (usize, usize) {
    match &req.op {
        WriteOp::Append(events) => (events.len(), events.iter().map(|e| e.data.len()).sum()),
        WriteOp::End { data, .. } => (1, data.len()),
        WriteOp::Create | WriteOp::Delete => (1, 0),
    }
}
