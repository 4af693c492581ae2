//! Durable Streams operations on the store: the same `streams` and `events`
//! tables as jobcast's own API (a DS stream is a jobcast stream with a row in
//! `ds_streams`), plus `ds_producers` for idempotent producers. Writes run on
//! the backend's writer (one transaction each, answered after COMMIT, then
//! published to the hub); reads are one snapshot each.
//!
//! The rules that decide a write (content type, `Stream-Seq`, producer
//! fencing, closed streams) are pure functions here, shared by the backends.

use std::sync::Arc;

use crate::hub::{Batch, Hub};

pub(super) mod postgres;
pub(super) mod sqlite;

/// A DS stream's metadata as the DS layer needs it, from one snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DsMeta {
    /// The stream id (the DS path).
    pub id: String,
    /// The key of this creation (never reused).
    pub key: i64,
    /// The jobcast epoch of this creation.
    pub epoch: String,
    /// The stream's content type (`application/json` for jobcast streams).
    pub content_type: String,
    /// Whether the stream was created through jobcast's API (no DS row).
    pub native: bool,
    /// Closed (a jobcast end, completed or failed).
    pub closed: bool,
    /// The seq of the last message (the `jobcast.end` event is not one).
    pub tail: u64,
    /// The creation chain, this stream first: `(key, base)` where seqs
    /// above `base` (up to the next link's base) are that creation's own.
    pub chain: Vec<(i64, u64)>,
    /// `Stream-TTL` in seconds, if set.
    pub ttl_s: Option<u64>,
    /// `Stream-Expires-At`, unix milliseconds, if set.
    pub expires_at: Option<i64>,
    /// Last write or read, unix milliseconds (a TTL slides from here).
    pub touched_at: i64,
    /// The last `Stream-Seq` accepted.
    pub stream_seq: Option<String>,
    /// Soft-deleted: gone for clients, kept while forks read its log.
    pub deleted: bool,
    /// The fork this was created as: source key and fork seq (for idempotent re-creation).
    pub fork: Option<(i64, u64)>,
}

impl DsMeta {
    /// Whether the stream is past its TTL or expiry time at `now`.
    pub fn expired(&self, now: i64) -> bool {
        self.expires_at.is_some_and(|t| t <= now)
            || self
                .ttl_s
                .is_some_and(|ttl| self.touched_at.saturating_add(ttl as i64 * 1000) <= now)
    }

    /// Whether the stream is a JSON stream (messages are JSON values).
    pub fn is_json(&self) -> bool {
        is_json_type(&self.content_type)
    }

    /// The creation key owning the message at `seq` (the root's key for 0).
    pub fn owner(&self, seq: u64) -> i64 {
        for &(key, base) in &self.chain {
            if seq > base {
                return key;
            }
        }
        self.chain.last().map_or(self.key, |l| l.0)
    }
}

/// Whether a content type is JSON (`application/json`, parameters ignored).
pub fn is_json_type(ct: &str) -> bool {
    media_type(ct) == "application/json"
}

/// The media type without parameters, lowercased.
pub fn media_type(ct: &str) -> String {
    ct.split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

/// An idempotent producer's headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Producer {
    /// `Producer-Id`.
    pub id: String,
    /// `Producer-Epoch`.
    pub epoch: u64,
    /// `Producer-Seq`.
    pub seq: u64,
}

/// Where a fork starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForkFrom {
    /// The source stream's id.
    pub source: String,
    /// The source position (creation key and seq); None: its tail.
    pub at: Option<(i64, u64)>,
    /// `Stream-Fork-Sub-Offset`: bytes (or JSON messages) of the next message.
    pub sub: u64,
}

/// A DS write.
#[derive(Debug, Clone)]
pub enum DsOp {
    /// PUT: create, or confirm a matching existing stream.
    Create {
        /// The content type (None: the default, or the fork source's).
        content_type: Option<String>,
        /// `Stream-TTL`.
        ttl_s: Option<u64>,
        /// `Stream-Expires-At`, unix milliseconds.
        expires_at: Option<i64>,
        /// `Stream-Closed: true`.
        closed: bool,
        /// Initial messages.
        messages: Vec<Vec<u8>>,
        /// `Stream-Forked-From`.
        fork: Option<ForkFrom>,
    },
    /// POST: append (and/or close).
    Append {
        /// The request's content type (None when absent).
        content_type: Option<String>,
        /// The messages (empty for a close only).
        messages: Vec<Vec<u8>>,
        /// `Stream-Seq`.
        stream_seq: Option<String>,
        /// The producer headers.
        producer: Option<Producer>,
        /// `Stream-Closed: true`.
        close: bool,
    },
    /// DELETE.
    Delete,
    /// A read of a stream with a TTL: the TTL slides.
    Touch,
}

/// A DS write request.
#[derive(Debug, Clone)]
pub struct DsWrite {
    /// The stream id.
    pub stream: String,
    /// What to do.
    pub op: DsOp,
}

/// Why a DS write was refused; nothing changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DsRefusal {
    /// No such stream (or expired).
    NotFound,
    /// Soft-deleted (forks still read it).
    Gone,
    /// PUT on an existing stream with another configuration.
    ConfigMismatch,
    /// The content type differs from the stream's.
    ContentTypeMismatch,
    /// The stream is closed (its tail is in the meta).
    Closed(Box<DsMeta>),
    /// `Stream-Seq` not above the last one.
    SeqRegression,
    /// A producer epoch below the known one.
    StaleEpoch(u64),
    /// A new producer epoch that does not start at seq 0.
    EpochSeqNotZero,
    /// A producer seq gap: expected, received.
    SeqGap(u64, u64),
    /// A fork position beyond the source's tail, or a bad sub-offset.
    BadForkOffset(&'static str),
    /// The fork source is soft-deleted.
    ForkSourceGone,
    /// A JSON message was not valid JSON (checked by the HTTP layer; kept for stores).
    Invalid(&'static str),
}

/// What a committed DS write produced.
#[derive(Debug, Clone)]
pub enum DsOutcome {
    /// Created (`true`) or confirmed.
    Created(DsMeta, bool),
    /// Appended or closed; `duplicate` for a producer retry (nothing written).
    Appended {
        /// The metadata after the write.
        meta: DsMeta,
        /// A producer's duplicate: nothing was written.
        duplicate: bool,
        /// The producer's epoch and highest accepted seq.
        producer: Option<(u64, u64)>,
    },
    /// Deleted (or soft-deleted).
    Deleted,
    /// Touched (or nothing to do).
    Touched,
    /// Refused; nothing changed.
    Refused(DsRefusal),
}

/// The checks of a DS append before it writes anything, written once for
/// both backends: the producer rule (given the producer's stored `(epoch,
/// seq)`), a closed stream, the content type, `Stream-Seq` order.
/// `Ok(accept)`: go on (`accept`: store the producer's new seq); `Err`:
/// the answer, with nothing written.
pub(super) fn check_append(
    meta: &DsMeta,
    state: Option<(u64, u64)>,
    producer: Option<&Producer>,
    has_messages: bool,
    close: bool,
    content_type: Option<&str>,
    stream_seq: Option<&str>,
) -> Result<bool, Box<DsOutcome>> {
    let closed = || {
        Box::new(DsOutcome::Refused(DsRefusal::Closed(Box::new(
            meta.clone(),
        ))))
    };
    let mut accept = false;
    if let Some(p) = producer {
        match check_producer(state, p) {
            Err(DsRefusal::SeqGap(..)) if meta.closed => return Err(closed()),
            Err(r) => return Err(Box::new(DsOutcome::Refused(r))),
            Ok(false) => {
                let last = state.map_or(p.seq, |s| s.1);
                return Err(Box::new(DsOutcome::Appended {
                    meta: meta.clone(),
                    duplicate: true,
                    producer: Some((p.epoch, last)),
                }));
            }
            Ok(true) => accept = true,
        }
    }
    if meta.closed {
        if !has_messages && close && producer.is_none() {
            return Err(Box::new(DsOutcome::Appended {
                meta: meta.clone(),
                duplicate: true,
                producer: None,
            }));
        }
        return Err(closed());
    }
    if has_messages {
        match content_type {
            Some(ct) if media_type(ct) == media_type(&meta.content_type) => {}
            _ => return Err(Box::new(DsOutcome::Refused(DsRefusal::ContentTypeMismatch))),
        }
    }
    if let Some(seq) = stream_seq {
        if meta
            .stream_seq
            .as_ref()
            .is_some_and(|last| seq.as_bytes() <= last.as_bytes())
        {
            return Err(Box::new(DsOutcome::Refused(DsRefusal::SeqRegression)));
        }
    }
    Ok(accept)
}

/// The producer rule of the protocol (section 5.2.1), given the stored
/// `(epoch, last_seq)` of the producer (None: a new producer). `Ok(true)`:
/// accept and store `(epoch, seq)`; `Ok(false)`: a duplicate.
pub fn check_producer(state: Option<(u64, u64)>, p: &Producer) -> Result<bool, DsRefusal> {
    let Some((epoch, last)) = state else {
        return if p.seq == 0 {
            Ok(true)
        } else {
            Err(DsRefusal::SeqGap(0, p.seq))
        };
    };
    if p.epoch < epoch {
        return Err(DsRefusal::StaleEpoch(epoch));
    }
    if p.epoch > epoch {
        return if p.seq == 0 {
            Ok(true)
        } else {
            Err(DsRefusal::EpochSeqNotZero)
        };
    }
    if p.seq <= last {
        Ok(false)
    } else if p.seq == last + 1 {
        Ok(true)
    } else {
        Err(DsRefusal::SeqGap(last + 1, p.seq))
    }
}

/// One read: the metadata and messages `(seq, bytes)` after a seq, one snapshot.
#[derive(Debug, Clone)]
pub struct DsPage {
    /// The metadata.
    pub meta: DsMeta,
    /// Messages with seq > the requested one, in order.
    pub messages: Vec<(u64, Vec<u8>)>,
}

/// What to publish after COMMIT.
pub(crate) struct DsPublish {
    pub(super) stream: String,
    pub(super) key: i64,
    pub(super) epoch: String,
    /// Events `(seq, type, data)` for jobcast watchers (UTF-8 messages only).
    pub(super) events: Vec<(u64, String, String)>,
    pub(super) ends: bool,
    /// Something other than text events changed (create, delete, bytes).
    pub(super) changed: Option<Option<i64>>,
}

impl DsPublish {
    pub(super) fn changed(stream: &str, deleted: Option<i64>) -> DsPublish {
        DsPublish {
            stream: stream.to_owned(),
            key: 0,
            epoch: String::new(),
            events: Vec::new(),
            ends: false,
            changed: Some(deleted),
        }
    }

    /// Tells the hub, after COMMIT.
    pub(crate) fn send(self, hub: &Hub) {
        if let Some(deleted) = self.changed {
            match deleted {
                Some(key) => hub.deleted(&self.stream, key),
                None => hub.changed(&self.stream),
            }
        }
        if let Some(&(first, _, _)) = self.events.first() {
            if hub.is_watched(&self.stream) {
                let batch = Batch::encode(
                    self.key,
                    &self.epoch,
                    first,
                    self.events.iter().map(|(_, t, d)| (t.as_str(), d.as_str())),
                    self.ends,
                );
                hub.publish(&self.stream, Arc::new(batch));
            }
        }
    }

    /// The NOTIFY payload that wakes other nodes' listeners.
    pub(super) fn payload(&self) -> String {
        match (self.changed, self.events.first(), self.events.last()) {
            (None, Some(first), Some(last)) => {
                format!("{} {} {} {}", self.stream, self.epoch, first.0, last.0)
            }
            _ => self.stream.clone(),
        }
    }
}

/// The `jobcast.end` data a DS close writes.
pub const CLOSE_DATA: &str = r#"{"state":"completed"}"#;

#[cfg(test)]
mod tests {
    use super::*;

    fn p(epoch: u64, seq: u64) -> Producer {
        Producer {
            id: "a".into(),
            epoch,
            seq,
        }
    }

    #[test]
    fn producer_rules() {
        assert_eq!(check_producer(None, &p(0, 0)), Ok(true));
        assert_eq!(check_producer(None, &p(3, 0)), Ok(true));
        assert_eq!(check_producer(None, &p(0, 1)), Err(DsRefusal::SeqGap(0, 1)));
        assert_eq!(
            check_producer(Some((2, 5)), &p(1, 9)),
            Err(DsRefusal::StaleEpoch(2))
        );
        assert_eq!(check_producer(Some((2, 5)), &p(3, 0)), Ok(true));
        assert_eq!(
            check_producer(Some((2, 5)), &p(3, 1)),
            Err(DsRefusal::EpochSeqNotZero)
        );
        assert_eq!(check_producer(Some((2, 5)), &p(2, 5)), Ok(false));
        assert_eq!(check_producer(Some((2, 5)), &p(2, 0)), Ok(false));
        assert_eq!(check_producer(Some((2, 5)), &p(2, 6)), Ok(true));
        assert_eq!(
            check_producer(Some((2, 5)), &p(2, 8)),
            Err(DsRefusal::SeqGap(6, 8))
        );
    }

    #[test]
    fn owners_along_a_chain() {
        let m = DsMeta {
            id: "f".into(),
            key: 9,
            epoch: "e".into(),
            content_type: "text/plain".into(),
            native: false,
            closed: false,
            tail: 12,
            chain: vec![(9, 5), (4, 2), (1, 0)],
            ttl_s: None,
            expires_at: None,
            touched_at: 0,
            stream_seq: None,
            deleted: false,
            fork: Some((4, 5)),
        };
        assert_eq!(m.owner(0), 1);
        assert_eq!(m.owner(2), 1);
        assert_eq!(m.owner(3), 4);
        assert_eq!(m.owner(5), 4);
        assert_eq!(m.owner(6), 9);
    }
}
