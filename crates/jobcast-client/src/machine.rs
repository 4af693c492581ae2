//! The watch's reconnect logic as a pure state machine: inputs are what
//! happened (a response status, body bytes, the end of a connection, a timer)
//! with the time and a random sample; outputs are items for the application,
//! the next state and when to reconnect. The I/O shell (`watch.rs`) only
//! performs what the machine decides, so every rule is tested here without
//! sockets or a clock.

use std::collections::VecDeque;
use std::time::Duration;

use jobcast_protocol::{
    EndPayload, ErrorPayload, EventId, ResetPayload, END_EVENT, ERROR_EVENT, RESERVED_PREFIX,
    RESET_EVENT,
};
use tokio::time::Instant;

use crate::backoff::{backoff_with, MAX_FLOOR};
use crate::error::{retryable_status, Error};
use crate::sse::{Frame, FrameReader, SseEvent};
use crate::watch::{End, Event, Item, Start, State};

/// What the machine needs to know about timing.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Settings {
    /// Give up after this long without a healthy connection.
    pub(crate) give_up_after: Duration,
    /// A connection open at least this long counts as healthy.
    pub(crate) healthy_after: Duration,
    /// Backoff base (1 s by default).
    pub(crate) base: Duration,
    /// Backoff maximum (30 s by default).
    pub(crate) max: Duration,
}

/// Where the next connection asks to start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Position {
    /// The whole log (no Last-Event-ID).
    Start,
    /// `?from=live`.
    Live,
    /// `?from=tail:N`.
    Tail(u64),
    /// `Last-Event-ID: {id}`.
    After(EventId),
}

/// What a response status means for a watch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// 200 with `text/event-stream`: read the stream.
    Open,
    /// 204: the client already has the end; finish without another item.
    Finish,
    /// Network-ish trouble (5xx, 408, 429): reconnect after a backoff.
    Retry,
    /// Anything else (other 4xx, other 2xx, 3xx, 200 that is not an event stream): stop with the error.
    Stop,
}

/// The verdict on a response status.
pub(crate) fn verdict(status: u16, event_stream: bool) -> Verdict {
    match status {
        200 if event_stream => Verdict::Open,
        204 => Verdict::Finish,
        s if retryable_status(s) => Verdict::Retry,
        _ => Verdict::Stop,
    }
}

/// Items produced for the application, in order.
pub(crate) type Out = VecDeque<Result<Item, Error>>;

/// The reconnect state machine of one watch.
#[derive(Debug)]
pub(crate) struct Machine {
    state: State,
    settings: Settings,
    /// Started with [`Start::Live`] and not yet resolved to a position.
    live: bool,
    /// Started with [`Start::Tail`]: asked for until an event is delivered.
    tail: Option<u64>,
    /// The last event delivered to the application (or the position a reset
    /// resumed from): sent as Last-Event-ID, and events at or before it are dropped.
    last: Option<EventId>,
    /// Failed attempts since the last healthy connection (the backoff exponent).
    attempt: u32,
    /// When the current run of unhealthy connections began.
    unhealthy_since: Instant,
    /// The floor set by the stream's `retry:` field; kept across connections.
    retry_floor: Duration,
    /// When the current connection opened.
    connected_at: Instant,
    /// Whether the current connection delivered an item.
    delivered: bool,
    /// The current connection's frame reader.
    reader: FrameReader,
    /// When to reconnect, in `WaitingToReconnect`.
    retry_at: Instant,
    /// Scratch space for frames.
    frames: Vec<Frame>,
}

impl Machine {
    /// A machine about to make its first connection.
    pub(crate) fn new(start: Start, settings: Settings, now: Instant) -> Self {
        let (live, last, tail) = match start {
            Start::Beginning => (false, None, None),
            Start::Live => (true, None, None),
            Start::After(id) => (false, Some(id), None),
            Start::Tail(n) => (false, None, Some(n)),
        };
        Machine {
            state: State::Connecting,
            settings,
            live,
            tail,
            last,
            attempt: 0,
            unhealthy_since: now,
            retry_floor: Duration::ZERO,
            connected_at: now,
            delivered: false,
            reader: FrameReader::new(),
            retry_at: now,
            frames: Vec::new(),
        }
    }

    /// The current state.
    pub(crate) fn state(&self) -> State {
        self.state
    }

    /// When to reconnect (meaningful in `WaitingToReconnect`).
    pub(crate) fn retry_at(&self) -> Instant {
        self.retry_at
    }

    /// The floor set by `retry:`.
    #[cfg(test)]
    pub(crate) fn retry_floor(&self) -> Duration {
        self.retry_floor
    }

    /// The last delivered position.
    #[cfg(test)]
    pub(crate) fn last(&self) -> Option<&EventId> {
        self.last.as_ref()
    }

    /// Whether the shell should look up the stream's head before connecting
    /// (a `Live` start that has no position yet).
    pub(crate) fn needs_live_position(&self) -> bool {
        self.live && self.last.is_none()
    }

    /// The live start resolved: `Some(head)` of an open stream (everything
    /// after it is live), or `None` for a stream that does not exist yet
    /// (everything it will have is live). Reconnects then resume from there,
    /// so no event appended during an outage is missed.
    pub(crate) fn resolve_live(&mut self, head: Option<EventId>) {
        self.live = false;
        self.last = head;
    }

    /// Where the next connection starts.
    pub(crate) fn position(&self) -> Position {
        match &self.last {
            Some(id) => Position::After(id.clone()),
            None if self.live => Position::Live,
            None => match self.tail {
                Some(n) => Position::Tail(n),
                None => Position::Start,
            },
        }
    }

    /// The response was `200 text/event-stream`.
    pub(crate) fn on_open(&mut self, now: Instant) {
        debug_assert_eq!(self.state, State::Connecting);
        self.state = State::Connected;
        self.connected_at = now;
        self.delivered = false;
        self.reader = FrameReader::new();
    }

    /// The response was anything else: `error` describes it (its
    /// `Retry-After`, for an [`Error::Api`], is a floor for the next attempt).
    pub(crate) fn on_refused(
        &mut self,
        now: Instant,
        status: u16,
        event_stream: bool,
        error: Error,
        random: f64,
        out: &mut Out,
    ) {
        match verdict(status, event_stream) {
            // The shell calls on_open for these; treat a stray call the same way.
            Verdict::Open => self.on_open(now),
            Verdict::Finish => self.state = State::Closed,
            Verdict::Retry => {
                let floor = match &error {
                    Error::Api { retry_after, .. } => retry_after.unwrap_or(Duration::ZERO),
                    _ => Duration::ZERO,
                };
                self.fail(now, error, floor, false, random, out);
            }
            Verdict::Stop => self.stop(error, out),
        }
    }

    /// The request got no response (connection refused, reset, timeout).
    pub(crate) fn on_network_error(
        &mut self,
        now: Instant,
        error: Error,
        random: f64,
        out: &mut Out,
    ) {
        self.fail(now, error, Duration::ZERO, false, random, out);
    }

    /// Stops with `error` as the last item.
    pub(crate) fn stop(&mut self, error: Error, out: &mut Out) {
        out.push_back(Err(error));
        self.state = State::Closed;
    }

    /// Bytes of the open stream arrived.
    pub(crate) fn on_bytes(&mut self, now: Instant, bytes: &[u8], random: f64, out: &mut Out) {
        if self.state != State::Connected {
            return;
        }
        let mut frames = std::mem::take(&mut self.frames);
        let broken = self.reader.feed(bytes, &mut frames).err();
        for frame in frames.drain(..) {
            if self.state != State::Connected {
                // After the end or an error, the rest of the connection is ignored.
                break;
            }
            match frame {
                Frame::Retry(ms) => self.retry_floor = Duration::from_millis(ms).min(MAX_FLOOR),
                Frame::Comment(_) => {}
                Frame::Event(ev) => self.on_event(now, ev, random, out),
            }
        }
        self.frames = frames;
        // The frames before the bound were delivered; the rest of this
        // connection cannot be: reconnect from the last event delivered.
        if let Some(e) = broken {
            if self.state == State::Connected {
                self.reader.finish();
                self.fail(now, Error::Decode(e), Duration::ZERO, false, random, out);
            }
        }
    }

    /// The open stream ended (closed by the server, cut, or timed out): reconnect.
    pub(crate) fn on_closed(
        &mut self,
        now: Instant,
        error: Option<Error>,
        random: f64,
        out: &mut Out,
    ) {
        if self.state != State::Connected {
            return;
        }
        self.reader.finish();
        let healthy = self.delivered
            || now.saturating_duration_since(self.connected_at) >= self.settings.healthy_after;
        self.fail(
            now,
            error.unwrap_or(Error::Disconnected),
            Duration::ZERO,
            healthy,
            random,
            out,
        );
    }

    /// The reconnect delay is over.
    pub(crate) fn on_timer(&mut self) {
        if self.state == State::WaitingToReconnect {
            self.state = State::Connecting;
        }
    }

    fn on_event(&mut self, now: Instant, ev: SseEvent, random: f64, out: &mut Out) {
        match ev.event.as_str() {
            END_EVENT => match serde_json::from_str::<EndPayload>(&ev.data) {
                Ok(payload) => {
                    let id = EventId::parse(&ev.last_event_id).ok();
                    if let Some(id) = &id {
                        self.last = Some(id.clone());
                    }
                    out.push_back(Ok(Item::End(End { id, payload })));
                    self.state = State::Closed;
                }
                Err(e) => self.protocol(format!("bad {END_EVENT} data {:?}", ev.data), e, out),
            },
            ERROR_EVENT => match serde_json::from_str::<ErrorPayload>(&ev.data) {
                Ok(payload) if payload.retryable => {
                    let floor = Duration::from_millis(payload.retry_after_ms.unwrap_or(0));
                    // The server itself reported a problem: only delivered
                    // events make this connection count as healthy.
                    let healthy = self.delivered;
                    self.reader.finish();
                    self.fail(now, Error::Stream(payload), floor, healthy, random, out);
                }
                Ok(payload) => self.stop(Error::Stream(payload), out),
                Err(e) => self.protocol(format!("bad {ERROR_EVENT} data {:?}", ev.data), e, out),
            },
            RESET_EVENT => match serde_json::from_str::<ResetPayload>(&ev.data) {
                Ok(payload) => {
                    // From now on the server's position is the reference (its
                    // epoch may differ from the one asked for).
                    self.last = payload
                        .resumed_from
                        .as_deref()
                        .and_then(|id| EventId::parse(id).ok());
                    self.live = false;
                    self.delivered = true;
                    out.push_back(Ok(Item::Reset(payload)));
                }
                Err(e) => self.protocol(format!("bad {RESET_EVENT} data {:?}", ev.data), e, out),
            },
            other if other.starts_with(RESERVED_PREFIX) => {
                tracing::debug!(event = other, "ignoring an unknown control event");
            }
            _ => {
                // The event's id is the last-event-id buffer at dispatch (WHATWG).
                let Ok(id) = EventId::parse(&ev.last_event_id) else {
                    let detail = format!(
                        "an event without a valid id (got {:?}); cannot deliver it exactly once",
                        ev.last_event_id
                    );
                    self.stop(
                        Error::Protocol {
                            detail,
                            source: None,
                        },
                        out,
                    );
                    return;
                };
                if let Some(last) = &self.last {
                    if last.epoch == id.epoch && id.seq <= last.seq {
                        tracing::trace!(%id, %last, "dropping an event already delivered");
                        return;
                    }
                    if last.epoch != id.epoch {
                        tracing::warn!(%id, %last, "epoch changed without a jobcast.reset");
                    }
                }
                self.last = Some(id.clone());
                self.live = false;
                self.delivered = true;
                out.push_back(Ok(Item::Event(Event {
                    id,
                    event_type: ev.event,
                    data: ev.data,
                })));
            }
        }
    }

    fn protocol(&mut self, detail: String, source: serde_json::Error, out: &mut Out) {
        self.stop(
            Error::Protocol {
                detail,
                source: Some(source),
            },
            out,
        );
    }

    /// A connection attempt failed or a connection ended: wait and reconnect,
    /// or give up after `give_up_after` without a healthy connection.
    fn fail(
        &mut self,
        now: Instant,
        error: Error,
        once_floor: Duration,
        healthy: bool,
        random: f64,
        out: &mut Out,
    ) {
        if healthy {
            self.attempt = 0;
            self.unhealthy_since = now;
        }
        let elapsed = now.saturating_duration_since(self.unhealthy_since);
        if elapsed >= self.settings.give_up_after {
            out.push_back(Err(Error::GaveUp {
                attempts: self.attempt.saturating_add(1),
                elapsed,
                last: Box::new(error),
            }));
            self.state = State::Closed;
            return;
        }
        let floor = self.retry_floor.max(once_floor);
        let delay = backoff_with(
            self.attempt,
            floor,
            random,
            self.settings.base,
            self.settings.max,
        );
        tracing::debug!(attempt = self.attempt, ?delay, error = %error, "watch: reconnecting");
        self.attempt = self.attempt.saturating_add(1);
        self.retry_at = now.checked_add(delay).unwrap_or(now + MAX_FLOOR);
        self.state = State::WaitingToReconnect;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jobcast_protocol::{ResetReason, StreamState};

    const MS: fn(u64) -> Duration = Duration::from_millis;
    const S: fn(u64) -> Duration = Duration::from_secs;

    fn settings() -> Settings {
        Settings {
            give_up_after: S(300),
            healthy_after: S(5),
            base: S(1),
            max: S(30),
        }
    }

    struct Run {
        m: Machine,
        t0: Instant,
        out: Out,
    }

    impl Run {
        fn new(start: Start) -> Run {
            let t0 = Instant::now();
            Run {
                m: Machine::new(start, settings(), t0),
                t0,
                out: Out::new(),
            }
        }
        fn at(&self, ms: u64) -> Instant {
            self.t0 + MS(ms)
        }
        fn open(&mut self, ms: u64) {
            assert_eq!(self.m.state(), State::Connecting);
            self.m.on_open(self.at(ms));
        }
        fn bytes(&mut self, ms: u64, b: &str) {
            let now = self.at(ms);
            self.m.on_bytes(now, b.as_bytes(), 0.5, &mut self.out);
        }
        fn close(&mut self, ms: u64) {
            let now = self.at(ms);
            self.m.on_closed(now, None, 0.5, &mut self.out);
        }
        fn refuse(&mut self, ms: u64, status: u16, retry_after: Option<Duration>) {
            let now = self.at(ms);
            let err = match api(status) {
                Error::Api {
                    status,
                    code,
                    message,
                    ..
                } => Error::Api {
                    status,
                    code,
                    message,
                    retry_after,
                },
                other => other,
            };
            self.m
                .on_refused(now, status, false, err, 0.5, &mut self.out);
        }
        fn net(&mut self, ms: u64) {
            let now = self.at(ms);
            self.m
                .on_network_error(now, Error::Disconnected, 0.5, &mut self.out);
        }
        /// Delay until the reconnect, in ms since `ms`.
        fn wait(&mut self, ms: u64) -> u64 {
            assert_eq!(self.m.state(), State::WaitingToReconnect);
            let d = self.m.retry_at().saturating_duration_since(self.at(ms));
            self.m.on_timer();
            d.as_millis() as u64
        }
        fn items(&mut self) -> Vec<String> {
            self.out.drain(..).map(describe).collect()
        }
    }

    fn api(status: u16) -> Error {
        Error::Api {
            status,
            code: format!("http_{status}"),
            message: String::new(),
            retry_after: None,
        }
    }

    fn describe(item: Result<Item, Error>) -> String {
        match item {
            Ok(Item::Event(e)) => format!("{} {} {}", e.id, e.event_type, e.data),
            Ok(Item::Reset(r)) => format!("reset {:?} {:?}", r.reason, r.resumed_from),
            Ok(Item::End(e)) => format!(
                "end {} {}",
                e.id.map(|i| i.to_string()).unwrap_or_default(),
                e.payload.state.as_str()
            ),
            Err(Error::GaveUp { last, .. }) => format!("gave up: {last}"),
            Err(e) => format!("error: {}", e.code().unwrap_or("-")),
        }
    }

    /// An item as the fixtures' JSON expectations spell it.
    fn item_json(item: Result<Item, Error>) -> serde_json::Value {
        use serde_json::json;
        match item {
            Ok(Item::Event(e)) => {
                json!({"event": {"id": e.id.to_string(), "type": e.event_type, "data": e.data}})
            }
            Ok(Item::Reset(r)) => json!({ "reset": r }),
            Ok(Item::End(e)) => {
                let mut v = serde_json::to_value(&e.payload).expect("end payload");
                v["id"] = json!(e.id.map(|i| i.to_string()));
                json!({ "end": v })
            }
            Err(Error::Stream(p)) => json!({ "error": p.code }),
            Err(Error::Protocol { .. }) => json!({ "error": "protocol" }),
            Err(e) => json!({ "error": e.to_string() }),
        }
    }

    fn ev(id: &str, data: &str) -> String {
        format!("id: {id}\ndata: {data}\n\n")
    }

    #[test]
    fn status_table() {
        // (status, event stream?, verdict)
        let table: &[(u16, bool, Verdict)] = &[
            (200, true, Verdict::Open),
            (200, false, Verdict::Stop),
            (201, true, Verdict::Stop),
            (202, false, Verdict::Stop),
            (204, false, Verdict::Finish),
            (204, true, Verdict::Finish),
            (301, false, Verdict::Stop),
            (304, false, Verdict::Stop),
            (400, false, Verdict::Stop),
            (401, false, Verdict::Stop),
            (403, false, Verdict::Stop),
            (404, false, Verdict::Stop),
            (405, false, Verdict::Stop),
            (406, false, Verdict::Stop),
            (408, false, Verdict::Retry),
            (409, false, Verdict::Stop),
            (410, false, Verdict::Stop),
            (413, false, Verdict::Stop),
            (415, false, Verdict::Stop),
            (422, false, Verdict::Stop),
            (425, false, Verdict::Stop),
            (429, false, Verdict::Retry),
            (499, false, Verdict::Stop),
            (500, false, Verdict::Retry),
            (501, false, Verdict::Retry),
            (502, false, Verdict::Retry),
            (503, false, Verdict::Retry),
            (504, false, Verdict::Retry),
            (599, false, Verdict::Retry),
        ];
        for &(status, es, want) in table {
            assert_eq!(
                verdict(status, es),
                want,
                "status {status} event-stream {es}"
            );
            // And the machine acts on it.
            let mut r = Run::new(Start::Beginning);
            if want == Verdict::Open {
                r.open(0);
                assert_eq!(r.m.state(), State::Connected);
                continue;
            }
            let now = r.at(0);
            r.m.on_refused(now, status, es, api(status), 0.5, &mut r.out);
            let (state, items) = (r.m.state(), r.items());
            match want {
                Verdict::Finish => {
                    assert_eq!(state, State::Closed, "{status}");
                    assert!(items.is_empty(), "{status}: 204 yields nothing more");
                }
                Verdict::Retry => {
                    assert_eq!(state, State::WaitingToReconnect, "{status}");
                    assert!(items.is_empty(), "{status}");
                }
                Verdict::Stop => {
                    assert_eq!(state, State::Closed, "{status}");
                    assert_eq!(items, vec![format!("error: http_{status}")], "{status}");
                }
                Verdict::Open => unreachable!(),
            }
        }
    }

    #[test]
    fn control_event_table() {
        // (event block, items, state after, Some(floor ms) if it reconnects)
        let table: &[(&str, &[&str], State, Option<u64>)] = &[
            (
                "event: jobcast.end\nid: ab-3\ndata: {\"state\":\"completed\"}\n\n",
                &["end ab-3 completed"],
                State::Closed,
                None,
            ),
            (
                "event: jobcast.end\nid: ab-3\ndata: {\"state\":\"failed\",\"error\":\"x\"}\n\n",
                &["end ab-3 failed"],
                State::Closed,
                None,
            ),
            (
                "event: jobcast.error\ndata: {\"code\":\"stream_deleted\",\"message\":\"m\",\"retryable\":false}\n\n",
                &["error: stream_deleted"],
                State::Closed,
                None,
            ),
            (
                "event: jobcast.error\ndata: {\"code\":\"stream_not_found\",\"message\":\"m\",\"retryable\":false}\n\n",
                &["error: stream_not_found"],
                State::Closed,
                None,
            ),
            (
                "event: jobcast.error\ndata: {\"code\":\"token_expired\",\"message\":\"m\",\"retryable\":false,\"refresh\":true}\n\n",
                &["error: token_expired"],
                State::Closed,
                None,
            ),
            (
                "event: jobcast.error\ndata: {\"code\":\"shutting_down\",\"message\":\"m\",\"retryable\":true,\"retry_after_ms\":7000}\n\n",
                &[],
                State::WaitingToReconnect,
                Some(7000),
            ),
            (
                "event: jobcast.error\ndata: {\"code\":\"store_unavailable\",\"message\":\"m\",\"retryable\":true,\"retry_after_ms\":2500}\n\n",
                &[],
                State::WaitingToReconnect,
                Some(2500),
            ),
            (
                "event: jobcast.error\ndata: {\"code\":\"lagged_beyond_retention\",\"message\":\"m\",\"retryable\":true}\n\n",
                &[],
                State::WaitingToReconnect,
                Some(500),
            ),
            (
                "event: jobcast.reset\ndata: {\"reason\":\"history_trimmed\",\"requested\":\"ab-0\",\"resumed_from\":\"ab-9\"}\n\n",
                &["reset HistoryTrimmed Some(\"ab-9\")"],
                State::Connected,
                None,
            ),
            ("event: jobcast.future\ndata: {}\n\n", &[], State::Connected, None),
            ("id: ab-1\ndata: x\n\n", &["ab-1 message x"], State::Connected, None),
            (
                "event: jobcast.end\ndata: not json\n\n",
                &["error: -"],
                State::Closed,
                None,
            ),
            (
                "event: jobcast.error\ndata: {\"code\":1}\n\n",
                &["error: -"],
                State::Closed,
                None,
            ),
        ];
        for &(block, items, state, floor) in table {
            let mut r = Run::new(Start::Beginning);
            r.open(0);
            r.bytes(100, block);
            assert_eq!(r.items(), items, "{block:?}");
            assert_eq!(r.m.state(), state, "{block:?}");
            if let Some(floor) = floor {
                // random 0.5, attempt 0: jitter 500 ms; the floor may raise it.
                assert_eq!(r.wait(100), floor, "{block:?}");
            }
        }
    }

    #[test]
    fn dedupe_by_seq_across_reconnects_and_resume_position() {
        let mut r = Run::new(Start::Beginning);
        assert_eq!(r.m.position(), Position::Start);
        r.open(0);
        r.bytes(1, &(ev("ab-1", "a") + &ev("ab-2", "b")));
        r.close(2);
        assert_eq!(r.m.position(), Position::After(EventId::new("ab", 2)));
        r.wait(2);
        r.open(3000);
        // A server that resends: 1 and 2 are dropped, 3 delivered once.
        r.bytes(
            3001,
            &(ev("ab-1", "a") + &ev("ab-2", "b") + &ev("ab-3", "c")),
        );
        r.bytes(3002, &ev("ab-3", "c"));
        assert_eq!(
            r.items(),
            vec!["ab-1 message a", "ab-2 message b", "ab-3 message c"]
        );
    }

    #[test]
    fn reset_moves_the_position_to_the_servers() {
        let mut r = Run::new(Start::After(EventId::new("old", 7)));
        assert_eq!(r.m.position(), Position::After(EventId::new("old", 7)));
        r.open(0);
        r.bytes(
            1,
            "event: jobcast.reset\ndata: {\"reason\":\"epoch_mismatch\",\"requested\":\"old-7\",\"resumed_from\":\"new-0\"}\n\n",
        );
        r.bytes(2, &(ev("new-1", "a") + &ev("new-2", "b")));
        r.close(3);
        assert_eq!(r.m.position(), Position::After(EventId::new("new", 2)));
        let items = r.items();
        assert_eq!(
            items,
            vec![
                "reset EpochMismatch Some(\"new-0\")",
                "new-1 message a",
                "new-2 message b"
            ]
        );
        // A reset with a null resumed_from accepts whatever comes next.
        let mut r = Run::new(Start::After(EventId::new("ab", 9)));
        r.open(0);
        r.bytes(
            1,
            "event: jobcast.reset\ndata: {\"reason\":\"unknown_position\",\"requested\":\"ab-9\",\"resumed_from\":null}\n\n",
        );
        r.bytes(2, &ev("ab-3", "x"));
        assert_eq!(r.items()[1], "ab-3 message x");
        let _ = ResetReason::HistoryTrimmed;
    }

    #[test]
    fn control_events_do_not_move_the_position() {
        let mut r = Run::new(Start::Beginning);
        r.open(0);
        r.bytes(1, &ev("ab-4", "x"));
        // An id on an unknown control event block sets the decoder's buffer but
        // not the client's position.
        r.bytes(2, "event: jobcast.future\nid: ab-99\ndata: {}\n\n");
        r.close(3);
        assert_eq!(r.m.position(), Position::After(EventId::new("ab", 4)));
    }

    #[test]
    fn event_without_id_stops_with_a_protocol_error() {
        let mut r = Run::new(Start::Beginning);
        r.open(0);
        r.bytes(1, "data: no id\n\n");
        assert_eq!(r.items(), vec!["error: -"]);
        assert_eq!(r.m.state(), State::Closed);
    }

    #[test]
    fn retry_field_sets_a_floor_kept_across_connections() {
        let mut r = Run::new(Start::Beginning);
        r.open(0);
        // Digits only: the invalid ones are ignored.
        r.bytes(1, "retry: 1.5\nretry: 10a\nretry: 4000\nretry: -1\n");
        assert_eq!(r.m.retry_floor(), MS(4000));
        r.close(2);
        assert_eq!(r.wait(2), 4000);
        // A failing reconnect still waits at least the floor.
        r.net(4002);
        assert_eq!(r.wait(4002), 4000);
        // Absurd values are capped.
        r.open(8002);
        r.bytes(8003, "retry: 99999999999999\n");
        assert_eq!(r.m.retry_floor(), MAX_FLOOR);
    }

    #[test]
    fn retry_after_header_is_a_one_time_floor() {
        let mut r = Run::new(Start::Beginning);
        r.refuse(0, 503, Some(S(9)));
        assert_eq!(r.wait(0), 9000);
        // Attempt 1 without header: jitter 0.5 × 2 s.
        r.refuse(9000, 429, None);
        assert_eq!(r.wait(9000), 1000);
    }

    #[test]
    fn backoff_grows_while_unhealthy_and_resets_after_a_healthy_connection() {
        let mut r = Run::new(Start::Beginning);
        let mut t = 0;
        let mut delays = Vec::new();
        for _ in 0..7 {
            r.net(t);
            let d = r.wait(t);
            delays.push(d);
            t += d;
        }
        // random 0.5 × min(30 s, 1 s × 2^attempt)
        assert_eq!(delays, vec![500, 1000, 2000, 4000, 8000, 15000, 15000]);
        // A connection that delivers an event is healthy: back to attempt 0.
        r.open(t);
        r.bytes(t + 1, &ev("ab-1", "x"));
        r.close(t + 2);
        assert_eq!(r.wait(t + 2), 500);
    }

    #[test]
    fn short_connections_without_events_are_not_healthy() {
        let mut r = Run::new(Start::Beginning);
        r.net(0);
        assert_eq!(r.wait(0), 500);
        r.open(500);
        r.close(600); // 100 ms, nothing delivered
        assert_eq!(r.wait(600), 1000);
        r.open(1600);
        r.close(1600 + 5000); // stayed up 5 s: healthy
        assert_eq!(r.wait(6600), 500);
        // A retryable jobcast.error after a long idle connection is not healthy.
        r.open(7100);
        r.bytes(
            7100 + 60_000,
            "event: jobcast.error\ndata: {\"code\":\"store_unavailable\",\"message\":\"m\",\"retryable\":true}\n\n",
        );
        assert_eq!(r.wait(67_100), 1000);
    }

    #[test]
    fn gives_up_after_the_configured_time_without_a_healthy_connection() {
        let mut r = Run::new(Start::Beginning);
        let mut t = 0;
        let mut attempts = 0;
        while r.m.state() != State::Closed {
            r.net(t);
            attempts += 1;
            if r.m.state() == State::WaitingToReconnect {
                t += r.wait(t);
            }
            assert!(attempts < 100, "never gave up");
        }
        assert!(t >= 300_000, "gave up early at {t}");
        let items = r.items();
        assert_eq!(
            items,
            vec!["gave up: the connection closed before the end of the stream"]
        );
        // A healthy connection restarts the clock.
        let mut r = Run::new(Start::Beginning);
        r.net(0);
        r.wait(0);
        r.open(290_000);
        r.bytes(290_001, &ev("ab-1", "x"));
        r.close(299_000);
        r.wait(299_000);
        r.net(400_000);
        assert_eq!(r.m.state(), State::WaitingToReconnect);
        r.wait(400_000);
        r.net(299_000 + 300_000);
        assert_eq!(r.m.state(), State::Closed);
    }

    #[test]
    fn live_start_resolves_to_a_position() {
        let mut r = Run::new(Start::Live);
        assert!(r.m.needs_live_position());
        assert_eq!(r.m.position(), Position::Live);
        r.m.resolve_live(Some(EventId::new("ab", 5)));
        assert!(!r.m.needs_live_position());
        assert_eq!(r.m.position(), Position::After(EventId::new("ab", 5)));
        // Unknown stream: everything it will have is live.
        let mut r = Run::new(Start::Live);
        r.m.resolve_live(None);
        assert_eq!(r.m.position(), Position::Start);
    }

    #[test]
    fn end_is_delivered_and_nothing_after_it() {
        let mut r = Run::new(Start::Beginning);
        r.open(0);
        r.bytes(
            1,
            &(ev("ab-1", "x")
                + "event: jobcast.end\nid: ab-2\ndata: {\"state\":\"completed\",\"data\":{\"k\":1}}\n\n"
                + &ev("ab-3", "after")),
        );
        let mut items = r.out.drain(..);
        assert!(matches!(items.next(), Some(Ok(Item::Event(_)))));
        match items.next() {
            Some(Ok(Item::End(end))) => {
                assert_eq!(end.payload.state, StreamState::Completed);
                assert_eq!(
                    end.payload.data.as_ref().map(|d| d.get()),
                    Some("{\"k\":1}")
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(items.next().is_none());
        drop(items);
        r.close(2);
        assert_eq!(r.m.state(), State::Closed);
    }

    #[test]
    fn an_incomplete_event_at_the_end_of_a_connection_is_not_delivered() {
        let mut r = Run::new(Start::Beginning);
        r.open(0);
        r.bytes(1, "id: ab-1\ndata: whole\n\nid: ab-2\ndata: half");
        r.close(2);
        r.wait(2);
        r.open(3000);
        // The next connection starts clean: "half" does not leak into it.
        r.bytes(3001, "\n\nid: ab-2\ndata: again\n\n");
        assert_eq!(r.items(), vec!["ab-1 message whole", "ab-2 message again"]);
    }

    /// Runs the client fixtures (tests/fixtures) through the machine: the
    /// integration test `fixtures.rs` runs the same files over HTTP.
    #[test]
    fn client_fixtures_through_the_machine() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).expect("fixtures dir") {
            let path = entry.expect("entry").path();
            if path.extension().is_none_or(|e| e != "sse") {
                continue;
            }
            n += 1;
            let body = std::fs::read(&path).expect("read");
            let expect: serde_json::Value = serde_json::from_str(
                &std::fs::read_to_string(path.with_extension("json")).expect("json"),
            )
            .expect("parse json");
            let name = path.display().to_string();
            for split in [usize::MAX, 1, 7] {
                let mut r = Run::new(Start::Beginning);
                r.open(0);
                for chunk in body.chunks(split.min(body.len().max(1))) {
                    let now = r.at(1);
                    r.m.on_bytes(now, chunk, 0.0, &mut r.out);
                }
                let now = r.at(1);
                r.m.on_closed(now, None, 0.0, &mut r.out);
                let got: Vec<serde_json::Value> = r.out.drain(..).map(item_json).collect();
                assert_eq!(
                    serde_json::Value::from(got),
                    expect["items"],
                    "{name} split {split}"
                );
                match &expect["reconnect"] {
                    serde_json::Value::Null => assert_eq!(r.m.state(), State::Closed, "{name}"),
                    rc => {
                        assert_eq!(r.m.state(), State::WaitingToReconnect, "{name}");
                        let want = rc["last_event_id"].as_str().map(|s| s.to_owned());
                        assert_eq!(r.m.last().map(|i| i.to_string()), want, "{name}");
                        let floor = rc["floor_ms"].as_u64().unwrap_or(0);
                        // random 0: the delay is exactly the floor.
                        assert_eq!(r.wait(1), floor, "{name}");
                    }
                }
            }
        }
        assert!(n >= 10, "only {n} client fixtures");
    }
}
