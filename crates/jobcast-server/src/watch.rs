//! The watch logic as pure functions and a cursor, with no I/O: where a
//! watcher starts (and whether that needs a `jobcast.reset`), and which bytes
//! of hub batches or store pages it writes next so that every seq goes out
//! exactly once, in order.
//!
//! The I/O shell (`http::sse`) takes a hub subscription first, then reads the
//! store, then follows the ring, feeding what it finds to a [`Cursor`].

use std::sync::Arc;

use bytes::Bytes;
use jobcast_protocol::{EventId, ResetPayload, ResetReason};

use crate::hub::Batch;
use crate::store::{StoreError, StoredEvent, StreamMeta};

/// Where a watcher asked to start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resume {
    /// The whole log.
    Start,
    /// Only events appended after subscribing.
    Live,
    /// After this id (Last-Event-ID, `?last_event_id=`, `?after=`).
    After(EventId),
}

/// Where a watcher starts: the seq it has (events after it are sent), and a
/// reset to send first when the resume point could not be honoured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Start {
    /// The last seq the watcher has; it gets `sent + 1` onwards.
    pub sent: u64,
    /// Sent before anything else, when set.
    pub reset: Option<ResetPayload>,
}

/// Whether `resume` names the current epoch's `jobcast.end`: the client has
/// everything (answered 204 on the SSE route).
pub fn at_end(meta: &StreamMeta, resume: &Resume) -> bool {
    matches!(resume, Resume::After(id)
        if id.epoch == meta.epoch && meta.ended() && id.seq == meta.head)
}

/// Decides where a watcher starts in the stream described by `meta`.
pub fn start(meta: &StreamMeta, resume: &Resume) -> Start {
    let oldest = meta.first_seq.saturating_sub(1);
    let position = |seq: u64| Some(EventId::new(meta.epoch.clone(), seq).to_string());
    let reset = |reason, requested: String, sent: u64| Start {
        sent,
        reset: Some(ResetPayload {
            reason,
            requested,
            resumed_from: position(sent),
        }),
    };
    let mut start = match resume {
        Resume::Live => Start {
            sent: meta.head,
            reset: None,
        },
        Resume::Start if oldest > 0 => reset(
            ResetReason::HistoryTrimmed,
            EventId::new(meta.epoch.clone(), 0).to_string(),
            oldest,
        ),
        Resume::Start => Start {
            sent: 0,
            reset: None,
        },
        Resume::After(id) if id.epoch != meta.epoch => {
            reset(ResetReason::EpochMismatch, id.to_string(), oldest)
        }
        Resume::After(id) if id.seq > meta.head => {
            reset(ResetReason::UnknownPosition, id.to_string(), meta.head)
        }
        Resume::After(id) if id.seq < oldest => {
            reset(ResetReason::HistoryTrimmed, id.to_string(), oldest)
        }
        Resume::After(id) => Start {
            sent: id.seq,
            reset: None,
        },
    };
    // On an ended stream the watcher always gets at least `jobcast.end`
    // (a resume at the end itself is answered 204 before this).
    if meta.ended() && start.sent >= meta.head {
        start.sent = meta.head - 1;
        if let Some(r) = &mut start.reset {
            r.resumed_from = position(start.sent);
        }
    }
    start
}

/// Bytes to write and the seqs they carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Seq of the first event in `bytes`.
    pub first_seq: u64,
    /// Seq of the last event in `bytes`.
    pub last_seq: u64,
    /// Encoded SSE events.
    pub bytes: Bytes,
    /// When the first batch in it was published (live frames only).
    pub published: Option<std::time::Instant>,
}

/// The result of offering a store page to a cursor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PageStep {
    /// Write this.
    Write(Frame),
    /// The page holds nothing after the cursor.
    Nothing,
    /// The events after the cursor were trimmed away by retention.
    Trimmed,
}

/// One watcher's position in one epoch of a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    /// The epoch being followed (shared, so that reads need no copy).
    pub epoch: Arc<str>,
    /// The last seq written.
    pub sent: u64,
    /// The highest seq known to exist (from the store or the ring).
    pub known_head: u64,
    /// Whether `jobcast.end` was written.
    pub ended: bool,
}

impl Cursor {
    /// A cursor at `start` in the stream `meta` describes.
    pub fn new(meta: &StreamMeta, start: &Start) -> Cursor {
        Cursor {
            epoch: Arc::from(meta.epoch.as_str()),
            sent: start.sent,
            known_head: meta.head,
            ended: false,
        }
    }

    /// Whether the store holds events this cursor has not written.
    pub fn behind(&self) -> bool {
        !self.ended && self.sent < self.known_head
    }

    /// Takes the part of `batches` after the cursor. The batches come from
    /// one ring read: contiguous, ordered, the first containing `sent + 1`
    /// or starting right after it.
    pub fn take_batches<'a>(
        &mut self,
        batches: impl IntoIterator<Item = &'a Arc<Batch>>,
    ) -> Option<Frame> {
        // One batch (the usual case) is handed over without copying.
        let mut one: Option<Bytes> = None;
        let mut more: Vec<u8> = Vec::new();
        let mut published = None;
        let first = self.sent + 1;
        for b in batches {
            // The hub hands over batches of the cursor's epoch only.
            if self.ended || b.last_seq <= self.sent {
                continue;
            }
            if b.first_seq > self.sent + 1 {
                // Not contiguous: stop here; the caller reads the gap from the store.
                break;
            }
            let part = b.after(self.sent);
            published.get_or_insert(b.published_at);
            match one.take() {
                None if more.is_empty() => one = Some(part),
                prev => {
                    if let Some(p) = prev {
                        more.extend_from_slice(&p);
                    }
                    more.extend_from_slice(&part);
                }
            }
            self.sent = b.last_seq;
            self.known_head = self.known_head.max(b.last_seq);
            self.ended = b.ends;
        }
        let bytes = match one {
            Some(b) => b,
            None if more.is_empty() => return None,
            None => Bytes::from(more),
        };
        Some(Frame {
            first_seq: first,
            last_seq: self.sent,
            bytes,
            published,
        })
    }

    /// Takes the events of a store page after the cursor (`page_meta` from the
    /// same snapshot).
    pub fn take_page(&mut self, page_meta: &StreamMeta, events: &[StoredEvent]) -> PageStep {
        self.known_head = self.known_head.max(page_meta.head);
        let from = self.sent;
        let fresh = events.iter().skip_while(|e| e.seq <= from);
        let mut buf = Vec::new();
        let first = self.sent + 1;
        for e in fresh {
            if e.seq != self.sent + 1 {
                return if buf.is_empty() {
                    PageStep::Trimmed
                } else {
                    break;
                };
            }
            jobcast_protocol::encode::event(
                &mut buf,
                Some((&self.epoch, e.seq)),
                &e.event_type,
                &e.data,
            );
            self.sent = e.seq;
            if e.event_type == jobcast_protocol::END_EVENT {
                self.ended = true;
                break;
            }
        }
        if buf.is_empty() {
            if self.sent < page_meta.first_seq.saturating_sub(1) {
                return PageStep::Trimmed;
            }
            return PageStep::Nothing;
        }
        PageStep::Write(Frame {
            first_seq: first,
            last_seq: self.sent,
            bytes: Bytes::from(buf),
            published: None,
        })
    }
}

/// The delay before retry `attempt` (0-based) of a failing store read:
/// exponential from 100 ms to 5 s, with "equal jitter" from `random` in [0, 1).
pub fn store_backoff(attempt: u32, random: f64) -> std::time::Duration {
    let base = 100u64.saturating_mul(1u64 << attempt.min(16)).min(5000);
    let half = base / 2;
    std::time::Duration::from_millis(half + (half as f64 * random.clamp(0.0, 1.0)) as u64)
}

/// Whether a store error is worth retrying (everything but a closed store).
pub fn retryable(e: &StoreError) -> bool {
    !matches!(e, StoreError::Closed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use jobcast_protocol::decode::{Decoder, Frame as SseFrame};
    use jobcast_protocol::StreamState;
    use proptest::prelude::*;

    fn meta(head: u64, state: StreamState) -> StreamMeta {
        StreamMeta {
            id: "s".into(),
            key: 1,
            epoch: "ep".into(),
            state,
            head,
            first_seq: 1,
            created_at: 0,
            updated_at: 0,
        }
    }

    fn after(epoch: &str, seq: u64) -> Resume {
        Resume::After(EventId::new(epoch, seq))
    }

    #[test]
    fn start_points() {
        let open = meta(10, StreamState::Open);
        assert_eq!(
            start(&open, &Resume::Start),
            Start {
                sent: 0,
                reset: None
            }
        );
        assert_eq!(start(&open, &Resume::Live).sent, 10);
        assert_eq!(
            start(&open, &after("ep", 4)),
            Start {
                sent: 4,
                reset: None
            }
        );
        let s = start(&open, &after("old", 4));
        assert_eq!(s.sent, 0);
        let r = s.reset.unwrap();
        assert_eq!(r.reason, ResetReason::EpochMismatch);
        assert_eq!(
            (r.requested.as_str(), r.resumed_from.as_deref()),
            ("old-4", Some("ep-0"))
        );
        let s = start(&open, &after("ep", 11));
        assert_eq!(s.sent, 10);
        assert_eq!(s.reset.unwrap().reason, ResetReason::UnknownPosition);
    }

    #[test]
    fn ended_streams() {
        let done = meta(5, StreamState::Completed);
        assert!(at_end(&done, &after("ep", 5)));
        assert!(!at_end(&done, &after("ep", 4)));
        assert!(!at_end(&done, &after("x", 5)));
        assert!(!at_end(&meta(5, StreamState::Open), &after("ep", 5)));
        // live on an ended stream: only the end
        assert_eq!(start(&done, &Resume::Live).sent, 4);
        let s = start(&done, &after("ep", 9));
        assert_eq!(s.sent, 4);
        assert_eq!(s.reset.unwrap().resumed_from.as_deref(), Some("ep-4"));
    }

    #[test]
    fn trimmed_history() {
        let mut m = meta(10, StreamState::Open);
        m.first_seq = 6;
        let s = start(&m, &after("ep", 2));
        assert_eq!(s.sent, 5);
        assert_eq!(s.reset.unwrap().reason, ResetReason::HistoryTrimmed);
        assert_eq!(start(&m, &after("ep", 5)).reset, None);
        assert_eq!(start(&m, &Resume::Start).reset.unwrap().requested, "ep-0");
        let mut c = Cursor::new(
            &m,
            &Start {
                sent: 2,
                reset: None,
            },
        );
        assert_eq!(c.take_page(&m, &[]), PageStep::Trimmed);
    }

    #[test]
    fn backoff_schedule() {
        let ms = |a, r| store_backoff(a, r).as_millis();
        assert_eq!((ms(0, 0.0), ms(0, 0.999)), (50, 99));
        assert_eq!(ms(1, 0.0), 100);
        assert_eq!(ms(5, 0.0), 1600);
        assert_eq!((ms(6, 0.0), ms(30, 0.999)), (2500, 4997));
    }

    fn ev(seq: u64, last: u64) -> StoredEvent {
        StoredEvent {
            seq,
            event_type: if seq == last {
                "jobcast.end".into()
            } else {
                "message".into()
            },
            data: format!("d{seq}"),
            time: 0,
        }
    }

    /// What the watcher receives over time, simulated: the log of `n` events
    /// (the last is the end) is committed in chunks; each chunk may or may not
    /// reach the ring (the watcher may have subscribed late, the ring may
    /// have dropped it); the watcher interleaves ring reads and store pages.
    fn simulate(
        n: u64,
        chunks: Vec<u64>,
        in_ring: Vec<bool>,
        ops: Vec<u8>,
        start_at: u64,
    ) -> Vec<u64> {
        let mut committed = 0u64;
        let mut ring: Vec<Arc<Batch>> = Vec::new();
        let m = |head| StreamMeta {
            state: if head == n {
                StreamState::Completed
            } else {
                StreamState::Open
            },
            ..meta(head, StreamState::Open)
        };
        let start_at = start_at.min(n - 1);
        let mut c = Cursor::new(
            &m(start_at),
            &Start {
                sent: start_at,
                reset: None,
            },
        );
        let mut out = Vec::new();
        let mut dec = Decoder::new();
        let mut frames = Vec::new();
        let mut ci = 0;
        for (i, op) in ops.iter().cycle().take(10 * n as usize + 100).enumerate() {
            if c.ended {
                break;
            }
            match op % 3 {
                0 if committed < n => {
                    let len = chunks.get(ci).copied().unwrap_or(1).clamp(1, n - committed);
                    ci += 1;
                    let first = committed + 1;
                    committed += len;
                    let evs: Vec<StoredEvent> = (first..=committed).map(|s| ev(s, n)).collect();
                    if *in_ring.get(i % in_ring.len().max(1)).unwrap_or(&true) {
                        let b = Batch::encode(
                            "ep",
                            first,
                            evs.iter().map(|e| (e.event_type.as_str(), e.data.as_str())),
                            committed == n,
                        );
                        ring.push(Arc::new(b));
                    } // else: a batch the ring never got (a hole the cursor must notice)
                }
                1 => {
                    // ring read, as Subscription::read would answer
                    let start = ring.partition_point(|b| b.last_seq <= c.sent);
                    if start < ring.len() && ring[start].first_seq <= c.sent + 1 {
                        if let Some(f) = c.take_batches(ring[start..].iter()) {
                            dec.feed(&f.bytes, &mut frames);
                        }
                    } else if start < ring.len() || c.behind() {
                        // gap: read from the store
                        let evs: Vec<StoredEvent> =
                            (c.sent + 1..=committed).take(3).map(|s| ev(s, n)).collect();
                        if let PageStep::Write(f) = c.take_page(&m(committed), &evs) {
                            dec.feed(&f.bytes, &mut frames);
                        }
                    }
                }
                _ => {
                    let evs: Vec<StoredEvent> =
                        (c.sent + 1..=committed).take(4).map(|s| ev(s, n)).collect();
                    if let PageStep::Write(f) = c.take_page(&m(committed), &evs) {
                        dec.feed(&f.bytes, &mut frames);
                    }
                }
            }
        }
        // Eventually the watcher drains the store.
        while !c.ended {
            let evs: Vec<StoredEvent> = (c.sent + 1..=n).take(5).map(|s| ev(s, n)).collect();
            match c.take_page(&m(n), &evs) {
                PageStep::Write(f) => dec.feed(&f.bytes, &mut frames),
                other => panic!("stuck at {} with {other:?}", c.sent),
            }
        }
        for f in frames {
            if let SseFrame::Event(e) = f {
                out.push(EventId::parse(&e.last_event_id).unwrap().seq);
            }
        }
        out
    }

    proptest! {
        #[test]
        fn every_seq_once_in_order(
            n in 1u64..60,
            chunks in proptest::collection::vec(1u64..7, 1..40),
            in_ring in proptest::collection::vec(any::<bool>(), 1..20),
            ops in proptest::collection::vec(0u8..3, 3..30),
            start_at in 0u64..10,
        ) {
            let got = simulate(n, chunks, in_ring, ops, start_at);
            let start_at = start_at.min(n - 1);
            let want: Vec<u64> = (start_at + 1..=n).collect();
            prop_assert_eq!(got, want);
        }
    }
}
