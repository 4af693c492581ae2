//! The watch logic, with no I/O: one state machine ([`Watch`]) decides
//! everything an SSE watcher and a JSON long-poll do — where to start (and
//! whether that needs a `jobcast.reset`), ring or store, epoch changes,
//! store errors and backoff, heartbeats, deadlines, shutdown, the end — so
//! that every seq goes out exactly once, in order.
//!
//! The I/O shells (`http::sse`, `http::events`) take a hub subscription
//! first, then create a [`Watch`] and carry out its [`Step`]s: store reads,
//! writes, waits. The machine reads the real hub's ring through the
//! subscription (a lock and a few `Bytes` clones, no I/O), so the model test
//! drives the real hub.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use jobcast_protocol::{
    ErrorPayload, EventId, ResetPayload, ResetReason, ERROR_EVENT, RESET_EVENT,
};

use crate::hub::{Batch, RingRead, Subscription};
use crate::metrics::{CloseReason, ResumeOutcome};
use crate::store::{Page, StoreError, StoredEvent, StreamMeta};

/// Where a watcher asked to start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resume {
    /// The whole log.
    Start,
    /// Only events appended after subscribing.
    Live,
    /// After this id (Last-Event-ID, `?last_event_id=`, `?after=`).
    After(EventId),
    /// The last N events of the log (`?from=tail:N`), then live: never a
    /// reset (the first event's id says where it begins). N = 0 is
    /// [`Resume::Live`] (see [`Watch::new`]); N beyond the log, or beyond
    /// what retention kept, is the first kept event; on an ended stream the
    /// N include `jobcast.end`.
    Tail(u64),
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
        Resume::Tail(n) => Start {
            sent: meta.head.saturating_sub(*n).max(oldest),
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

/// What a watch produces: an SSE response, or one JSON page (long-poll).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `text/event-stream`: the log, then live events, then the end.
    Sse,
    /// One JSON page of at most `limit` events, waiting for the first one.
    Page {
        /// Most events in the page.
        limit: u32,
    },
}

/// The deadlines and sizes of one watch.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// Time without a write after which a heartbeat comment is sent (SSE).
    pub heartbeat: Duration,
    /// When the response ends by itself (SSE; the client resumes).
    pub close_at: Instant,
    /// SSE: how long to wait for a stream that does not exist yet.
    /// Page: the long-poll's deadline (the token's expiry included).
    pub wait_until: Instant,
    /// When the token ends (SSE closes with `token_expired`).
    pub expires_at: Option<Instant>,
    /// How long store errors are retried before `store_unavailable` (SSE).
    pub store_retry_limit: Duration,
    /// Most events per store read (SSE).
    pub page_size: u32,
}

/// What a write carries (for metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    /// Log events (`jobcast.end` included).
    Events {
        /// How many.
        count: u64,
        /// Whether they were read from the store (not the ring).
        from_store: bool,
        /// When their first batch was published (ring only).
        published: Option<std::time::Instant>,
    },
    /// A control event (`jobcast.reset`).
    Control,
    /// A heartbeat comment.
    Heartbeat,
}

/// Why a watch could not produce a response.
#[derive(Debug)]
pub enum Failure {
    /// The stream does not exist (a page waited `wait` for it).
    NotFound,
    /// The store failed before anything was sent.
    Store(StoreError),
    /// The server is shutting down.
    ShuttingDown,
}

/// The JSON page a long-poll answers with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageAnswer {
    /// The stream's metadata, from the snapshot of the events.
    pub meta: StreamMeta,
    /// The events after the resume point.
    pub events: Vec<StoredEvent>,
    /// The id to continue after; None once `jobcast.end` was returned.
    pub next: Option<EventId>,
    /// Set when the resume point could not be honoured.
    pub reset: Option<ResetPayload>,
}

/// What the shell does next.
#[derive(Debug)]
pub enum Step {
    /// Write these bytes, then call [`Watch::next`].
    Send(Bytes, Sent),
    /// Read the stream's metadata; hand the answer to [`Watch::on_meta`].
    ReadMeta,
    /// Read the page after `after`; hand it to [`Watch::on_page`].
    ReadPage {
        /// The seq to read after.
        after: u64,
        /// Most events.
        limit: u32,
        /// Whether the watcher fell behind the ring (a slow-watcher fallback).
        gap: bool,
    },
    /// Wait for a hub wake-up or `until`, then call [`Watch::next`]. Register
    /// for wake-ups first and call [`Watch::next`] once more, so that nothing
    /// published (or the hub closing) in between is missed.
    Wait {
        /// The earliest deadline.
        until: Instant,
    },
    /// SSE, before the response: answer `204 No Content` (the client has the end).
    NoContent,
    /// Page mode: answer with this page.
    Respond(Box<PageAnswer>),
    /// SSE: write `last` (if any), then end the response.
    Close {
        /// The last bytes (`jobcast.error`), if any.
        last: Option<Bytes>,
        /// Why (for metrics).
        reason: CloseReason,
    },
    /// No response can be made: answer with an HTTP error.
    Fail(Failure),
}

#[derive(Debug)]
enum Phase {
    /// Nothing read from the store yet.
    Init,
    /// The stream does not exist: waiting for its creation.
    Absent,
    /// Following one epoch.
    Follow(Cursor),
    /// Closed or answered.
    Done,
}

/// One watcher's (or one long-poll's) decisions, with no I/O: the shell
/// feeds it store answers and wake-ups and carries out the [`Step`]s.
///
/// Every decision is here: where to start (and the reset), ring or store,
/// epoch changes (a delete, a re-creation, a re-sync after missed
/// wake-ups), store errors and their backoff, heartbeats, the maximum
/// duration, the token's expiry, shutdown, the end.
#[derive(Debug)]
pub struct Watch {
    mode: Mode,
    resume: Resume,
    settings: Settings,
    phase: Phase,
    /// The change counter up to which every change was checked in the store.
    acked: u64,
    /// The change counter and the ring version when the store read in
    /// flight was issued: its answer covers changes up to them.
    asked: (u64, u64),
    /// The seq the last page read started after.
    read_after: u64,
    /// The ring version when the store last had nothing newer, while the
    /// ring held another epoch: read again only after something happened.
    idle_at: Option<u64>,
    /// Sent before anything else.
    reset: Option<Box<ResetPayload>>,
    heartbeat_at: Instant,
    /// While the stream does not exist: when to look for it again even
    /// without a wake-up (once per heartbeat; a belt to the hub's braces).
    poll_at: Instant,
    retry_at: Option<Instant>,
    failing_since: Option<Instant>,
    attempt: u32,
    rng: u64,
    outcome: Option<ResumeOutcome>,
    close_reason: CloseReason,
}

impl Watch {
    /// A watch of a stream from `resume`; `seed` drives the backoff jitter.
    pub fn new(mode: Mode, resume: Resume, settings: Settings, now: Instant, seed: u64) -> Watch {
        // `tail:0` is `live`, with everything `live` means (the head at subscribing).
        let resume = match resume {
            Resume::Tail(0) => Resume::Live,
            other => other,
        };
        Watch {
            mode,
            resume,
            settings,
            phase: Phase::Init,
            acked: 0,
            asked: (0, 0),
            read_after: 0,
            idle_at: None,
            reset: None,
            heartbeat_at: now + settings.heartbeat,
            poll_at: now + settings.heartbeat,
            retry_at: None,
            failing_since: None,
            attempt: 0,
            rng: seed | 1,
            outcome: None,
            close_reason: CloseReason::ClientGone,
        }
    }

    /// How the watch started, once (for metrics).
    pub fn take_outcome(&mut self) -> Option<ResumeOutcome> {
        self.outcome.take()
    }

    /// Why the watch closed (`ClientGone` while it runs).
    pub fn close_reason(&self) -> CloseReason {
        self.close_reason
    }

    /// Whether a store error is being backed off from.
    pub fn backing_off(&self) -> bool {
        self.retry_at.is_some()
    }

    /// The epoch and last seq written, once following.
    pub fn position(&self) -> Option<(&str, u64)> {
        match &self.phase {
            Phase::Follow(c) => Some((&c.epoch, c.sent)),
            _ => None,
        }
    }

    /// What to do now.
    pub fn next(&mut self, now: Instant, sub: &Subscription) -> Step {
        match self.mode {
            Mode::Sse => self.next_sse(now, sub),
            Mode::Page { limit } => self.next_page(now, sub, limit),
        }
    }

    /// The answer to [`Step::ReadMeta`].
    pub fn on_meta(
        &mut self,
        now: Instant,
        sub: &Subscription,
        meta: Result<Option<StreamMeta>, StoreError>,
    ) -> Step {
        let meta = match meta {
            Ok(m) => m,
            Err(e) => return self.store_failed(now, sub, e),
        };
        self.store_ok();
        self.acked = self.asked.0;
        match (&self.phase, meta) {
            (Phase::Init | Phase::Absent, None) => {
                self.absent();
                self.poll_at = now + self.settings.heartbeat;
                if now >= self.settings.wait_until {
                    return self.finish_sse(
                        Some(error_event(
                            "stream_not_found",
                            "the stream does not exist (waited for it to be created)",
                            None,
                        )),
                        CloseReason::NotFound,
                    );
                }
            }
            (Phase::Init, Some(m)) if at_end(&m, &self.resume) => {
                self.phase = Phase::Done;
                self.outcome = Some(ResumeOutcome::NoContent);
                return Step::NoContent;
            }
            (Phase::Absent, Some(m)) if at_end(&m, &self.resume) => {
                return self.finish_sse(None, CloseReason::End);
            }
            (Phase::Init | Phase::Absent, Some(m)) => self.begin(&m, sub),
            // Only the phases above read metadata.
            (Phase::Follow(_) | Phase::Done, _) => {}
        }
        self.next(now, sub)
    }

    /// The answer to [`Step::ReadPage`].
    pub fn on_page(
        &mut self,
        now: Instant,
        sub: &Subscription,
        page: Result<Option<Page>, StoreError>,
    ) -> Step {
        let page = match page {
            Ok(p) => p,
            Err(e) => return self.store_failed(now, sub, e),
        };
        self.store_ok();
        self.acked = self.asked.0;
        match self.mode {
            Mode::Sse => self.sse_page(now, sub, page),
            Mode::Page { .. } => self.page_page(now, sub, page),
        }
    }

    /// The stream is not there: wait for it. Its creation will be new, so
    /// `from=live` and `from=tail:N` (head 0 at subscribing) get everything.
    fn absent(&mut self) {
        self.phase = Phase::Absent;
        if matches!(self.resume, Resume::Live | Resume::Tail(_)) {
            self.resume = Resume::Start;
        }
    }

    /// Places the cursor in the stream `meta` describes.
    fn begin(&mut self, meta: &StreamMeta, sub: &Subscription) {
        let mut resume = self.resume.clone();
        // `from=live`: the head when subscribing, if the ring knew it.
        if resume == Resume::Live {
            if let Some((epoch, seq)) = sub.head_at_subscribe() {
                if epoch == meta.epoch && seq < meta.head && seq + 1 >= meta.first_seq {
                    resume = Resume::After(EventId::new(epoch, seq));
                }
            }
        }
        let reset = self.begin_at(meta, resume);
        self.outcome = Some(match (&self.resume, reset) {
            (_, true) => ResumeOutcome::Reset,
            (Resume::After(_), false) => ResumeOutcome::Resumed,
            (_, false) => ResumeOutcome::FromStart,
        });
    }

    /// Places the cursor at `resume` in `meta`; whether that needs a reset.
    fn begin_at(&mut self, meta: &StreamMeta, resume: Resume) -> bool {
        let start = start(meta, &resume);
        let reset = start.reset.is_some();
        self.phase = Phase::Follow(Cursor::new(meta, &start));
        self.reset = start.reset.map(Box::new);
        self.idle_at = None;
        reset
    }

    fn store_ok(&mut self) {
        self.failing_since = None;
        self.attempt = 0;
        self.retry_at = None;
    }

    fn ask(&mut self, sub: &Subscription, step: Step) -> Step {
        self.asked = (sub.changes(), sub.version());
        if let Step::ReadPage { after, .. } = step {
            self.read_after = after;
        }
        step
    }

    fn random(&mut self) -> f64 {
        // xorshift64: enough for jitter, and deterministic under a seed.
        let mut x = self.rng;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng = x;
        (x >> 11) as f64 / (1u64 << 53) as f64
    }

    /// A store call failed: back off (heartbeats continue), or give up.
    fn store_failed(&mut self, now: Instant, sub: &Subscription, e: StoreError) -> Step {
        if matches!(self.phase, Phase::Init) || matches!(self.mode, Mode::Page { .. }) {
            // Nothing was sent yet: the client gets an HTTP error and retries.
            self.phase = Phase::Done;
            return Step::Fail(Failure::Store(e));
        }
        if !retryable(&e) {
            return self.shutting_down();
        }
        let since = *self.failing_since.get_or_insert(now);
        if now.duration_since(since) >= self.settings.store_retry_limit {
            let after = store_backoff(self.attempt, 1.0).as_millis() as u64;
            return self.finish_sse(
                Some(error_event(
                    "store_unavailable",
                    "the store is unavailable; reconnect to resume",
                    Some(after),
                )),
                CloseReason::StoreUnavailable,
            );
        }
        let random = self.random();
        self.retry_at = Some(now + store_backoff(self.attempt, random));
        // Read again as soon as the backoff is over.
        self.poll_at = now;
        self.attempt = self.attempt.saturating_add(1);
        self.next(now, sub)
    }

    fn finish_sse(&mut self, last: Option<Bytes>, reason: CloseReason) -> Step {
        self.phase = Phase::Done;
        self.close_reason = reason;
        Step::Close { last, reason }
    }

    fn shutting_down(&mut self) -> Step {
        if let Mode::Page { .. } = self.mode {
            self.phase = Phase::Done;
            return Step::Fail(Failure::ShuttingDown);
        }
        self.finish_sse(
            Some(error_event(
                "shutting_down",
                "the server is shutting down; reconnect to resume",
                Some(3000),
            )),
            CloseReason::Shutdown,
        )
    }

    fn deleted(&mut self) -> Step {
        self.finish_sse(
            Some(error_event(
                "stream_deleted",
                "the stream was deleted",
                None,
            )),
            CloseReason::Deleted,
        )
    }

    /// A heartbeat when one is due, else wait until `until` (or an earlier deadline).
    fn idle(&mut self, now: Instant, until: Instant) -> Step {
        if now >= self.heartbeat_at {
            self.heartbeat_at = now + self.settings.heartbeat;
            return Step::Send(Bytes::from_static(b":\n"), Sent::Heartbeat);
        }
        let mut wake = until.min(self.heartbeat_at).min(self.settings.close_at);
        if let Some(t) = self.settings.expires_at {
            wake = wake.min(t);
        }
        Step::Wait { until: wake }
    }

    /// Writes log events; after `jobcast.end` (`ended`) the watch is done.
    fn deliver(&mut self, now: Instant, frame: Frame, from_store: bool, ended: bool) -> Step {
        let sent = Sent::Events {
            count: frame.last_seq + 1 - frame.first_seq,
            from_store,
            // Publish-to-write is timed for live (ring) frames only.
            published: if from_store { None } else { frame.published },
        };
        if ended {
            self.phase = Phase::Done;
            self.close_reason = CloseReason::End;
        }
        self.send(now, frame.bytes, sent)
    }

    fn send(&mut self, now: Instant, bytes: Bytes, sent: Sent) -> Step {
        self.heartbeat_at = now + self.settings.heartbeat;
        Step::Send(bytes, sent)
    }

    fn next_sse(&mut self, now: Instant, sub: &Subscription) -> Step {
        if let Phase::Done = self.phase {
            return Step::Close {
                last: None,
                reason: self.close_reason,
            };
        }
        if let Phase::Init = self.phase {
            return self.ask(sub, Step::ReadMeta);
        }
        if sub.is_closed() {
            return self.shutting_down();
        }
        if self.settings.expires_at.is_some_and(|t| now >= t) {
            let payload = ErrorPayload {
                code: "token_expired".into(),
                message: "the token expired; reconnect with a fresh token to resume".into(),
                retryable: false,
                retry_after_ms: None,
                refresh: Some(true),
            };
            return self.finish_sse(
                Some(control(ERROR_EVENT, &payload)),
                CloseReason::TokenExpired,
            );
        }
        if now >= self.settings.close_at {
            // Maximum duration: end cleanly; the client resumes with Last-Event-ID.
            return self.finish_sse(None, CloseReason::MaxDuration);
        }
        if let Some(reset) = self.reset.take() {
            return self.send(now, control(RESET_EVENT, &*reset), Sent::Control);
        }
        if let Some(at) = self.retry_at {
            if now < at {
                return self.idle(now, at);
            }
            self.retry_at = None;
        }
        let changed = sub.changes() != self.acked;
        let page_size = self.settings.page_size;
        let cursor = match &mut self.phase {
            Phase::Follow(c) => c,
            _ if changed || now >= self.settings.wait_until || now >= self.poll_at => {
                return self.ask(sub, Step::ReadMeta);
            }
            _ => {
                let until = self.settings.wait_until.min(self.poll_at);
                return self.idle(now, until);
            }
        };
        let (after, behind, epoch) = (cursor.sent, cursor.behind(), cursor.epoch.clone());
        let read = |gap| Step::ReadPage {
            after,
            limit: page_size,
            gap,
        };
        // The ring first, even after a change: it holds only committed events
        // of this creation, which come before a delete's `stream_deleted`.
        let ring = sub.read(&epoch, after, |batches| cursor.take_batches(batches));
        // Behind the ring: a page another watcher of this stream brought in
        // serves this one too (no store read).
        let cached = match &ring {
            Ok(None) | Err(RingRead::Gap) if !changed => {
                sub.read_cached(&epoch, after, |b| cursor.take_batches(b))
            }
            Err(RingRead::Nothing) if behind && !changed => {
                sub.read_cached(&epoch, after, |b| cursor.take_batches(b))
            }
            _ => None,
        }
        .flatten();
        let ended = cursor.ended;
        if let Some(frame) = cached {
            return self.deliver(now, frame, true, ended);
        }
        match ring {
            Ok(Some(frame)) => self.deliver(now, frame, false, ended),
            // Created, deleted, replaced or re-synced: the store says which.
            _ if changed => self.ask(sub, read(false)),
            // A hole in the ring (the watcher fell behind it, or a batch
            // never reached it): the store fills it.
            Ok(None) | Err(RingRead::Gap) => self.ask(sub, read(true)),
            // A batch of another creation: the store says whether ours is
            // still current. Once it had nothing newer, read again only
            // after something happened.
            Err(RingRead::OtherEpoch) if self.idle_at == Some(sub.version()) => {
                self.idle(now, self.settings.close_at)
            }
            Err(RingRead::OtherEpoch) => self.ask(sub, read(false)),
            Err(RingRead::Nothing) if behind => self.ask(sub, read(false)),
            Err(RingRead::Nothing) => self.idle(now, self.settings.close_at),
        }
    }

    fn sse_page(&mut self, now: Instant, sub: &Subscription, page: Option<Page>) -> Step {
        let Phase::Follow(cursor) = &mut self.phase else {
            return self.next(now, sub);
        };
        let Some(page) = page.filter(|p| *p.meta.epoch == *cursor.epoch) else {
            // Gone, or replaced by a new creation: never its events.
            return self.deleted();
        };
        match cursor.take_page(&page.meta, &page.events) {
            PageStep::Write(frame) => {
                let ended = cursor.ended;
                self.deliver(now, frame, true, ended)
            }
            PageStep::Nothing => {
                // The store has nothing newer: believe it, and wait for the ring.
                cursor.known_head = cursor.sent;
                self.idle_at = Some(self.asked.1);
                self.next(now, sub)
            }
            PageStep::Trimmed => self.finish_sse(
                Some(error_event(
                    "lagged_beyond_retention",
                    "events after your position were removed by retention; reconnect to continue",
                    Some(0),
                )),
                CloseReason::Lagged,
            ),
        }
    }

    /// The seq a page read starts after, before the stream was seen.
    fn guess(&self) -> u64 {
        match &self.resume {
            Resume::After(id) => id.seq,
            Resume::Start => 0,
            // Where the tail starts is known only from the stream's head.
            Resume::Live | Resume::Tail(_) => u64::MAX,
        }
    }

    fn next_page(&mut self, now: Instant, sub: &Subscription, limit: u32) -> Step {
        match &self.phase {
            Phase::Done => return Step::Fail(Failure::ShuttingDown),
            Phase::Init => {
                let after = self.guess();
                return self.ask(
                    sub,
                    Step::ReadPage {
                        after,
                        limit,
                        gap: false,
                    },
                );
            }
            _ => {}
        }
        if sub.is_closed() {
            return self.shutting_down();
        }
        let moved = sub.changes() != self.acked || sub.version() != self.asked.1;
        match &self.phase {
            Phase::Absent if moved => {
                let after = self.guess();
                self.ask(
                    sub,
                    Step::ReadPage {
                        after,
                        limit,
                        gap: false,
                    },
                )
            }
            Phase::Absent if now >= self.settings.wait_until => {
                self.phase = Phase::Done;
                Step::Fail(Failure::NotFound)
            }
            Phase::Follow(c)
                if moved || c.sent != self.read_after || now >= self.settings.wait_until =>
            {
                let after = c.sent;
                self.ask(
                    sub,
                    Step::ReadPage {
                        after,
                        limit,
                        gap: false,
                    },
                )
            }
            _ => Step::Wait {
                until: self.settings.wait_until,
            },
        }
    }

    fn page_page(&mut self, now: Instant, sub: &Subscription, page: Option<Page>) -> Step {
        let Some(page) = page else {
            // Not there (yet, or any more): wait for its creation.
            self.absent();
            return self.next(now, sub);
        };
        let cursor = match &mut self.phase {
            Phase::Follow(c) if *c.epoch == *page.meta.epoch => c,
            _ => {
                // First sight of this creation (a re-created stream is
                // compared with the client's position again).
                if matches!(self.phase, Phase::Init | Phase::Absent)
                    && at_end(&page.meta, &self.resume)
                {
                    return self.respond(page.meta, Vec::new());
                }
                if matches!(self.phase, Phase::Follow(_))
                    && matches!(self.resume, Resume::Live | Resume::Tail(_))
                {
                    self.resume = Resume::Start;
                }
                self.begin(&page.meta, sub);
                let Phase::Follow(c) = &mut self.phase else {
                    return self.next(now, sub);
                };
                if c.sent != self.read_after {
                    // Read again at the start point.
                    return self.next(now, sub);
                }
                c
            }
        };
        let fresh: Vec<StoredEvent> = page
            .events
            .into_iter()
            .skip_while(|e| e.seq <= cursor.sent)
            .collect();
        let trimmed = match fresh.first() {
            Some(e) => e.seq != cursor.sent + 1,
            None => cursor.sent + 1 < page.meta.first_seq,
        };
        if trimmed {
            // Retention removed events after the position while waiting:
            // start again from the client's position, with the reset.
            let before = EventId::new(cursor.epoch.to_string(), cursor.sent);
            let meta = page.meta;
            // A reset already due keeps what the client asked for; in its
            // epoch, the events it skips now were trimmed.
            let earlier = self.reset.take();
            self.begin_at(&meta, Resume::After(before.clone()));
            if let Some(mut earlier) = earlier {
                earlier.resumed_from = self.reset.take().and_then(|r| r.resumed_from);
                if earlier.reason != ResetReason::EpochMismatch {
                    earlier.reason = ResetReason::HistoryTrimmed;
                }
                self.reset = Some(earlier);
            }
            if self.position().is_some_and(|(_, sent)| sent == before.seq) {
                // Not a place the store can continue from either: say so.
                return self.respond(meta, Vec::new());
            }
            return self.next(now, sub);
        }
        if !fresh.is_empty() || page.meta.ended() || now >= self.settings.wait_until {
            return self.respond(page.meta, fresh);
        }
        self.next(now, sub)
    }

    fn respond(&mut self, meta: StreamMeta, events: Vec<StoredEvent>) -> Step {
        let sent = match &self.phase {
            Phase::Follow(c) => c.sent,
            _ => meta.head,
        };
        let last = events.last().map_or(sent, |e| e.seq);
        let ended = meta.ended() && last >= meta.head;
        let next = (!ended).then(|| EventId::new(meta.epoch.clone(), last));
        let reset = self.reset.take().map(|r| *r);
        self.phase = Phase::Done;
        Step::Respond(Box::new(PageAnswer {
            meta,
            events,
            next,
            reset,
        }))
    }
}

fn control(event: &str, payload: &impl serde::Serialize) -> Bytes {
    let mut buf = Vec::new();
    let data = serde_json::to_string(payload).unwrap_or_else(|_| "{}".into());
    jobcast_protocol::encode::event(&mut buf, None, event, &data);
    Bytes::from(buf)
}

fn error_event(code: &str, message: &str, retry_after_ms: Option<u64>) -> Bytes {
    control(
        ERROR_EVENT,
        &ErrorPayload {
            code: code.into(),
            message: message.into(),
            retryable: retry_after_ms.is_some(),
            retry_after_ms,
            refresh: None,
        },
    )
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
    use crate::hub::Hub;
    use jobcast_protocol::StreamState;

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
            labels: Default::default(),
            cancel_requested: false,
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

    /// `tail:N` at its edges: inside the log, longer than it, after
    /// trimming, across the end; never a reset.
    #[test]
    fn tail_start_points() {
        let open = meta(10, StreamState::Open);
        let at = |m: &StreamMeta, n| {
            let s = start(m, &Resume::Tail(n));
            assert_eq!(s.reset, None, "tail:{n} never resets");
            s.sent
        };
        assert_eq!(at(&open, 3), 7);
        assert_eq!(at(&open, 10), 0);
        assert_eq!(at(&open, 11), 0);
        assert_eq!(at(&open, u64::MAX), 0);
        let mut trimmed = open.clone();
        trimmed.first_seq = 6;
        assert_eq!(at(&trimmed, 3), 7);
        assert_eq!(at(&trimmed, 5), 5);
        assert_eq!(at(&trimmed, 8), 5, "the first kept event, no reset");
        // Completed at seq 5 (the end): the last N include it.
        let done = meta(5, StreamState::Completed);
        assert_eq!(at(&done, 1), 4);
        assert_eq!(at(&done, 2), 3);
        assert_eq!(at(&done, 9), 0);
        assert!(!at_end(&done, &Resume::Tail(1)), "never a 204");
    }

    /// `tail:0` is `live`: the head at subscribing, nothing of the log.
    #[test]
    fn tail_zero_is_live() {
        let hub = Hub::new(1 << 20);
        let sub = hub.subscribe("s");
        let now = Instant::now();
        let mut w = Watch::new(Mode::Sse, Resume::Tail(0), settings(now), now, 1);
        assert!(matches!(w.next(now, &sub), Step::ReadMeta));
        let step = w.on_meta(now, &sub, Ok(Some(meta(4, StreamState::Open))));
        assert!(matches!(step, Step::Wait { .. }), "{step:?}");
        assert_eq!(w.position(), Some(("ep", 4)));
        // And before creation, everything the stream will hold is new.
        let mut w = Watch::new(Mode::Sse, Resume::Tail(3), settings(now), now, 1);
        assert!(matches!(w.next(now, &sub), Step::ReadMeta));
        let _ = w.on_meta(now, &sub, Ok(None));
        hub.changed("s");
        assert!(matches!(w.next(now, &sub), Step::ReadMeta));
        let step = w.on_meta(now, &sub, Ok(Some(meta(2, StreamState::Open))));
        assert!(matches!(step, Step::ReadPage { after: 0, .. }), "{step:?}");
    }

    #[test]
    fn backoff_schedule() {
        let ms = |a, r| store_backoff(a, r).as_millis();
        assert_eq!((ms(0, 0.0), ms(0, 0.999)), (50, 99));
        assert_eq!(ms(1, 0.0), 100);
        assert_eq!(ms(5, 0.0), 1600);
        assert_eq!((ms(6, 0.0), ms(30, 0.999)), (2500, 4997));
    }

    fn settings(now: Instant) -> Settings {
        Settings {
            heartbeat: Duration::from_secs(15),
            close_at: now + Duration::from_secs(3600),
            wait_until: now + Duration::from_secs(90),
            expires_at: None,
            store_retry_limit: Duration::from_secs(30),
            page_size: 100,
        }
    }

    fn page(m: &StreamMeta, events: &[(u64, &str)]) -> Result<Option<Page>, StoreError> {
        Ok(Some(Page {
            meta: m.clone(),
            events: events
                .iter()
                .map(|(seq, ty)| StoredEvent {
                    seq: *seq,
                    event_type: (*ty).into(),
                    data: format!("d{seq}"),
                    time: 0,
                })
                .collect(),
        }))
    }

    /// Issue 12 item 4: a delete that commits after the store snapshot but
    /// before its answer is handled must still be noticed (the change is
    /// acknowledged up to the counter captured when the read was issued).
    #[test]
    fn a_change_during_a_read_is_not_lost() {
        let hub = Hub::new(1 << 20);
        let sub = hub.subscribe("s");
        let now = Instant::now();
        let mut w = Watch::new(Mode::Sse, Resume::Live, settings(now), now, 1);
        assert!(matches!(w.next(now, &sub), Step::ReadMeta));
        let snapshot = meta(3, StreamState::Open);
        hub.deleted("s", 1);
        // The answer from before the delete: the machine must look again.
        let step = w.on_meta(now, &sub, Ok(Some(snapshot)));
        assert!(matches!(step, Step::ReadPage { .. }), "{step:?}");
        let step = w.on_page(now, &sub, Ok(None));
        assert!(
            matches!(
                step,
                Step::Close {
                    reason: CloseReason::Deleted,
                    ..
                }
            ),
            "{step:?}"
        );

        // The same while waiting for a creation.
        let sub = hub.subscribe("t");
        let mut w = Watch::new(Mode::Sse, Resume::Start, settings(now), now, 1);
        assert!(matches!(w.next(now, &sub), Step::ReadMeta));
        hub.changed("t");
        let step = w.on_meta(now, &sub, Ok(None));
        assert!(matches!(step, Step::ReadMeta), "{step:?}");
    }

    /// Issue 12 item 6: a close after the machine was asked (and before the
    /// shell registered) is seen when the shell asks again after registering.
    #[test]
    fn a_close_while_idle_ends_the_watch() {
        let hub = Hub::new(1 << 20);
        let sub = hub.subscribe("s");
        let now = Instant::now();
        let mut w = Watch::new(Mode::Sse, Resume::Start, settings(now), now, 1);
        assert!(matches!(w.next(now, &sub), Step::ReadMeta));
        let m = meta(0, StreamState::Open);
        assert!(matches!(
            w.on_meta(now, &sub, Ok(Some(m))),
            Step::Wait { .. }
        ));
        hub.close();
        let step = w.next(now, &sub);
        assert!(
            matches!(
                step,
                Step::Close {
                    reason: CloseReason::Shutdown,
                    ..
                }
            ),
            "{step:?}"
        );
    }

    /// Issue 12 item 5: a ring holding another creation's batch while the
    /// store confirms the watcher's own is one store read, then a wait, until
    /// the ring changes (it used to loop on metadata reads).
    #[test]
    fn a_ring_of_another_epoch_costs_one_read_per_change() {
        let hub = Hub::new(1 << 20);
        let sub = hub.subscribe("s");
        let now = Instant::now();
        let mut w = Watch::new(Mode::Sse, Resume::Start, settings(now), now, 1);
        assert!(matches!(w.next(now, &sub), Step::ReadMeta));
        let m = meta(1, StreamState::Open);
        assert!(matches!(
            w.on_meta(now, &sub, Ok(Some(m.clone()))),
            Step::ReadPage { .. }
        ));
        assert!(matches!(
            w.on_page(now, &sub, page(&m, &[(1, "message")])),
            Step::Send(..)
        ));
        // A batch of another creation reaches the ring (a lagging node).
        let other = Batch::encode(9, "other", 1, [("message", "x")], false);
        hub.publish("s", Arc::new(other));
        let step = w.next(now, &sub);
        assert!(matches!(step, Step::ReadPage { after: 1, .. }), "{step:?}");
        // The store says: still ours, nothing newer.
        let step = w.on_page(now, &sub, page(&m, &[]));
        assert!(matches!(step, Step::Wait { .. }), "{step:?}");
        for _ in 0..3 {
            let step = w.next(now, &sub);
            assert!(matches!(step, Step::Wait { .. }), "{step:?}");
        }
    }

    /// Found by the history checker: events committed just before a delete
    /// reach a watcher whose ring has them, then `stream_deleted`.
    #[test]
    fn events_committed_before_a_delete_come_before_stream_deleted() {
        let hub = Hub::new(1 << 20);
        let sub = hub.subscribe("s");
        let now = Instant::now();
        let mut w = Watch::new(Mode::Sse, Resume::Start, settings(now), now, 1);
        assert!(matches!(w.next(now, &sub), Step::ReadMeta));
        let m = meta(0, StreamState::Open);
        assert!(matches!(
            w.on_meta(now, &sub, Ok(Some(m))),
            Step::Wait { .. }
        ));
        // One group: an append, then the delete, both after the watcher's look.
        hub.publish(
            "s",
            Arc::new(Batch::encode(
                1,
                "ep",
                1,
                [("message", "a"), ("message", "b")],
                false,
            )),
        );
        hub.deleted("s", 1);
        let step = w.next(now, &sub);
        let Step::Send(bytes, Sent::Events { count: 2, .. }) = step else {
            panic!("{step:?}");
        };
        assert!(bytes.starts_with(b"id: ep-1\n"));
        let step = w.next(now, &sub);
        assert!(matches!(step, Step::ReadPage { after: 2, .. }), "{step:?}");
        let step = w.on_page(now, &sub, Ok(None));
        assert!(
            matches!(
                step,
                Step::Close {
                    reason: CloseReason::Deleted,
                    ..
                }
            ),
            "{step:?}"
        );
    }

    /// Issue 12 item 1, in the machine: a page after the end is empty with no next.
    #[test]
    fn a_page_after_the_end_is_empty() {
        let hub = Hub::new(1 << 20);
        let sub = hub.subscribe("s");
        let now = Instant::now();
        let mut w = Watch::new(
            Mode::Page { limit: 10 },
            after("ep", 3),
            settings(now),
            now,
            1,
        );
        assert!(matches!(w.next(now, &sub), Step::ReadPage { after: 3, .. }));
        let m = meta(3, StreamState::Completed);
        match w.on_page(now, &sub, page(&m, &[])) {
            Step::Respond(p) => {
                assert!(p.events.is_empty());
                assert_eq!(p.next, None);
            }
            other => panic!("{other:?}"),
        }
    }
}
