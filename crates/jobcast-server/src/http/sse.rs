//! The SSE response: subscribe first, then read the store, then follow the
//! hub's ring, with heartbeats, a maximum duration, store-error backoff and
//! the shutdown signal. The decisions are in [`crate::watch`]; this is the
//! I/O shell around them.

use std::convert::Infallible;
use std::time::Duration;

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{header, HeaderValue, StatusCode};
use jobcast_protocol::{encode, ErrorPayload, ERROR_EVENT, RESET_EVENT};
use rand::Rng;
use tokio::time::Instant;

use super::{ApiError, AppState, VARY};
use crate::hub::{RingRead, Subscription};
use crate::metrics::{CloseReason, ResumeOutcome};
use crate::store::StoreError;
use crate::watch::{self, Cursor, PageStep, Resume};

/// Starts a watch. Answers 204 when `resume` is the stream's end.
pub(super) async fn watch(
    state: AppState,
    stream: String,
    resume: Resume,
    wait: Duration,
    expires: Option<Instant>,
) -> Result<Response, ApiError> {
    // The cursor on the hub exists before the store is read: nothing
    // committed in between can be missed.
    let sub = state.hub.subscribe(&stream);
    // Counted with this one, after subscribing: concurrent watchers cannot
    // all slip under the limit.
    let max = state.config.max_watchers_per_stream;
    if state.hub.watchers_of(&stream) > max {
        return Err(ApiError {
            retry_after: Some(5),
            ..ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "too_many_watchers",
                format!(
                    "this stream has {max} watchers on this node, the most allowed; retry later"
                ),
            )
        });
    }
    let meta = state.store.meta(&stream).await?;
    if meta.as_ref().is_some_and(|m| watch::at_end(m, &resume)) {
        state.metrics.resume(ResumeOutcome::NoContent);
        let mut res = StatusCode::NO_CONTENT.into_response();
        set_headers(&mut res, false);
        return Ok(res);
    }
    let now = Instant::now();
    let max = state.config.max_duration;
    // Jitter the maximum duration down by up to 10% so reconnects spread out.
    let jitter = max.mul_f64(rand::rng().random_range(0.0..0.1));
    let mut head = Vec::with_capacity(64);
    encode::retry(&mut head, state.config.retry.as_millis() as u64);
    state.metrics.watch_opened();
    let mut w = Watcher {
        heartbeat_at: now + state.config.heartbeat,
        close_at: now + (max - jitter),
        // Far enough to never come when auth is off (and within Instant's range).
        expires_at: expires.unwrap_or(now + Duration::from_secs(100 * 365 * 86_400)),
        wait_until: now + wait,
        timer: Box::pin(tokio::time::sleep_until(now + state.config.heartbeat)),
        stream,
        resume,
        sub,
        cursor: None,
        failing_since: None,
        attempt: 0,
        done: false,
        close_reason: CloseReason::ClientGone,
        state,
    };
    if let Some(m) = meta {
        if let Some(reset) = w.begin(&m) {
            head.extend_from_slice(&reset);
        }
    }
    let first = Bytes::from(head);
    let body = futures::stream::unfold((Some(first), w), |(first, mut w)| async move {
        let chunk = match first {
            Some(b) => Some(b),
            None => w.next().await,
        };
        chunk.map(|b| (Ok::<_, Infallible>(b), (None, w)))
    });
    let mut res = Response::new(Body::from_stream(body));
    set_headers(&mut res, true);
    Ok(res)
}

fn set_headers(res: &mut Response, sse: bool) {
    let h = res.headers_mut();
    if sse {
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    }
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("no-store, no-transform"),
    );
    h.insert(header::VARY, HeaderValue::from_static(VARY));
}

/// One watcher's state: a subscription and a cursor, no task of its own.
struct Watcher {
    state: AppState,
    stream: String,
    resume: Resume,
    sub: Subscription,
    /// None until the stream exists.
    cursor: Option<Cursor>,
    heartbeat_at: Instant,
    close_at: Instant,
    /// When the token ends: the watcher closes with `token_expired`.
    expires_at: Instant,
    wait_until: Instant,
    /// One timer per watcher, armed at the earliest deadline and re-armed
    /// only when it fires early: never reset per event.
    timer: std::pin::Pin<Box<tokio::time::Sleep>>,
    failing_since: Option<Instant>,
    attempt: u32,
    done: bool,
    /// Reported when the watcher is dropped (ClientGone unless it closed itself).
    close_reason: CloseReason,
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.state.metrics.watch_closed(self.close_reason);
    }
}

/// What the ring offers.
enum Look {
    /// Take this step.
    Step(Step),
    /// Ask the store.
    Store(Need),
    /// Nothing now: wait.
    Wait,
}

/// What to ask the store.
#[derive(Debug, Clone, Copy)]
enum Need {
    /// Whether the stream exists yet (no cursor).
    Meta,
    /// Whether the stream is still the same creation.
    Epoch,
    /// The next page after the cursor.
    Page,
}

/// What one step produced.
enum Step {
    /// Write and go on.
    Write(Bytes),
    /// Write (if anything) and end the response.
    Close(Option<Bytes>, CloseReason),
    /// Look again (something changed).
    Again,
}

fn control(event: &str, payload: &impl serde::Serialize) -> Bytes {
    let mut buf = Vec::new();
    let data = serde_json::to_string(payload).unwrap_or_else(|_| "{}".into());
    encode::event(&mut buf, None, event, &data);
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

impl Watcher {
    /// Places the cursor in the stream `meta` describes; returns the reset to send, if any.
    fn begin(&mut self, meta: &crate::store::StreamMeta) -> Option<Bytes> {
        let start = watch::start(meta, &self.resume);
        self.state
            .metrics
            .resume(match (&start.reset, &self.resume) {
                (Some(_), _) => ResumeOutcome::Reset,
                (None, Resume::After(_)) => ResumeOutcome::Resumed,
                (None, _) => ResumeOutcome::FromStart,
            });
        self.cursor = Some(Cursor::new(meta, &start));
        // The store was read after subscribing; changes before that are seen.
        self.sub.take_change();
        start.reset.map(|r| control(RESET_EVENT, &r))
    }

    async fn next(&mut self) -> Option<Bytes> {
        loop {
            if self.done {
                return None;
            }
            match self.step().await {
                Step::Write(b) => {
                    self.heartbeat_at = Instant::now() + self.state.config.heartbeat;
                    if self.cursor.as_ref().is_some_and(|c| c.ended) {
                        self.done = true;
                        self.close_reason = CloseReason::End;
                    }
                    return Some(b);
                }
                Step::Close(b, reason) => {
                    self.done = true;
                    self.close_reason = reason;
                    if b.is_some() {
                        return b;
                    }
                }
                Step::Again => {}
            }
        }
    }

    fn shutting_down(&self) -> Step {
        let retry = self.state.config.retry.as_millis() as u64;
        Step::Close(
            Some(error_event(
                "shutting_down",
                "the server is shutting down; reconnect to resume",
                Some(retry),
            )),
            CloseReason::Shutdown,
        )
    }

    fn deleted() -> Step {
        Step::Close(
            Some(error_event(
                "stream_deleted",
                "the stream was deleted",
                None,
            )),
            CloseReason::Deleted,
        )
    }

    /// A store call failed: back off (heartbeats continue), or give up with
    /// a retryable `store_unavailable` after the configured time.
    async fn store_failed(&mut self, e: StoreError) -> Step {
        let now = Instant::now();
        let since = *self.failing_since.get_or_insert(now);
        if !watch::retryable(&e) {
            return self.shutting_down();
        }
        tracing::debug!(stream = %self.stream, error = %e, attempt = self.attempt, "watcher store read failed");
        if now.duration_since(since) >= self.state.config.store_retry_limit {
            return Step::Close(
                Some(error_event(
                    "store_unavailable",
                    "the store is unavailable; reconnect to resume",
                    Some(watch::store_backoff(self.attempt, 1.0).as_millis() as u64),
                )),
                CloseReason::StoreUnavailable,
            );
        }
        let delay = watch::store_backoff(self.attempt, rand::rng().random_range(0.0..1.0));
        self.attempt = self.attempt.saturating_add(1);
        let until = now + delay;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(until.min(self.heartbeat_at)) => {
                    if Instant::now() >= self.heartbeat_at && Instant::now() < until {
                        return Step::Write(Bytes::from_static(b":\n"));
                    }
                    if Instant::now() >= until {
                        return Step::Again;
                    }
                }
                _ = self.state.shutdown.cancelled() => return self.shutting_down(),
            }
        }
    }

    fn store_ok(&mut self) {
        self.failing_since = None;
        self.attempt = 0;
    }

    async fn step(&mut self) -> Step {
        if self.state.hub.is_closed() {
            return self.shutting_down();
        }
        if Instant::now() >= self.expires_at {
            return Step::Close(
                Some(control(
                    ERROR_EVENT,
                    &ErrorPayload {
                        code: "token_expired".into(),
                        message: "the token expired; reconnect with a fresh token to resume".into(),
                        retryable: false,
                        retry_after_ms: None,
                        refresh: Some(true),
                    },
                )),
                CloseReason::TokenExpired,
            );
        }
        if Instant::now() >= self.close_at {
            // Maximum duration: end cleanly; the client resumes with Last-Event-ID.
            return Step::Close(None, CloseReason::MaxDuration);
        }
        // The hot path: the ring has the next events. No registration with
        // the Notify, no allocation.
        if self.cursor.is_some() {
            let look = self.look_ring();
            if let Some(step) = self.act(look).await {
                return step;
            }
        }
        // Nothing yet: register for wake-ups, then look again, so that a
        // publish between the look and the registration is not lost.
        let entry = self.sub.entry();
        let notified = entry.notified();
        let mut notified = std::pin::pin!(notified);
        notified.as_mut().enable();
        let look = if self.cursor.is_some() {
            self.look_ring()
        } else {
            Look::Store(Need::Meta)
        };
        if let Some(step) = self.act(look).await {
            return step;
        }
        // Wait for a publish (or the hub closing at shutdown), a heartbeat,
        // the end of the wait for creation, or the maximum duration.
        let mut wake = self.heartbeat_at.min(self.close_at).min(self.expires_at);
        if self.cursor.is_none() {
            wake = wake.min(self.wait_until);
        }
        // The timer only moves when it fired early or a deadline came closer.
        if self.timer.deadline() > wake || self.timer.is_elapsed() {
            self.timer.as_mut().reset(wake);
        }
        tokio::select! {
            _ = &mut notified => Step::Again,
            _ = &mut self.timer => {
                if Instant::now() >= self.heartbeat_at {
                    Step::Write(Bytes::from_static(b":\n"))
                } else {
                    Step::Again
                }
            }
        }
    }

    /// Carries out a look: a step to take, or None to wait.
    async fn act(&mut self, look: Look) -> Option<Step> {
        match look {
            Look::Step(step) => Some(step),
            Look::Wait => None,
            // Boxed: the store calls' futures are large and needed only
            // briefly; inlined, every idle watcher would carry their size.
            Look::Store(need) => match Box::pin(self.ask_store(need)).await {
                Ok(step) => step,
                Err(e) => Some(Box::pin(self.store_failed(e)).await),
            },
        }
    }

    /// What the hub's ring offers after the cursor, without the store.
    fn look_ring(&mut self) -> Look {
        let Some(cursor) = self.cursor.as_mut() else {
            return Look::Store(Need::Meta);
        };
        if self.sub.take_change() {
            return Look::Store(Need::Epoch);
        }
        let epoch = cursor.epoch.clone();
        match self
            .sub
            .read(&epoch, cursor.sent, |batches| cursor.take_batches(batches))
        {
            Ok(Some(frame)) => {
                let m = &self.state.metrics;
                m.delivered(frame.last_seq + 1 - frame.first_seq, false);
                if let Some(t) = frame.published {
                    m.publish_to_write(t.elapsed());
                }
                Look::Step(Step::Write(frame.bytes))
            }
            // Not contiguous after all: the gap is read from the store.
            Ok(None) => Look::Store(Need::Page),
            Err(RingRead::OtherEpoch) => Look::Store(Need::Epoch),
            Err(RingRead::Gap) => {
                self.state.metrics.slow_fallback();
                Look::Store(Need::Page)
            }
            Err(RingRead::Nothing) if cursor.behind() => Look::Store(Need::Page),
            Err(RingRead::Nothing) => Look::Wait,
        }
    }

    /// Asks the store what the ring could not answer (None: wait).
    async fn ask_store(&mut self, need: Need) -> Result<Option<Step>, StoreError> {
        match need {
            Need::Meta => match self.state.store.meta(&self.stream).await? {
                Some(meta) => {
                    self.store_ok();
                    Ok(Some(match self.begin(&meta) {
                        Some(reset) => Step::Write(reset),
                        None => Step::Again,
                    }))
                }
                None if Instant::now() >= self.wait_until => Ok(Some(Step::Close(
                    Some(error_event(
                        "stream_not_found",
                        "the stream does not exist (waited for it to be created)",
                        None,
                    )),
                    CloseReason::NotFound,
                ))),
                None => {
                    self.store_ok();
                    Ok(None)
                }
            },
            Need::Epoch => {
                let epoch = self.cursor.as_ref().map(|c| c.epoch.clone());
                match epoch {
                    Some(e) if self.same_epoch(&e).await? => Ok(Some(Step::Again)),
                    _ => Ok(Some(Self::deleted())),
                }
            }
            Need::Page => self.read_store().await,
        }
    }

    /// Whether the stream still has this epoch. A change may also mean
    /// events the ring never got (another node's, seen after a lost
    /// wake-up): the head read here makes the cursor fetch them.
    async fn same_epoch(&mut self, epoch: &str) -> Result<bool, StoreError> {
        let meta = self.state.store.meta(&self.stream).await?;
        self.store_ok();
        match meta {
            Some(m) if m.epoch == epoch => {
                if let Some(c) = self.cursor.as_mut() {
                    c.known_head = c.known_head.max(m.head);
                }
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// Reads the next page after the cursor from the store (None: nothing newer; wait).
    async fn read_store(&mut self) -> Result<Option<Step>, StoreError> {
        let Some(cursor) = self.cursor.as_mut() else {
            return Ok(None);
        };
        let page = self
            .state
            .store
            .read(&self.stream, cursor.sent, self.state.config.page_size)
            .await?;
        self.failing_since = None;
        self.attempt = 0;
        let Some(page) = page else {
            return Ok(Some(Self::deleted()));
        };
        if *page.meta.epoch != *cursor.epoch {
            return Ok(Some(Self::deleted()));
        }
        Ok(match cursor.take_page(&page.meta, &page.events) {
            PageStep::Write(frame) => {
                self.state
                    .metrics
                    .delivered(frame.last_seq + 1 - frame.first_seq, true);
                Some(Step::Write(frame.bytes))
            }
            PageStep::Nothing => {
                // The store has nothing newer: believe it, and wait for the ring.
                cursor.known_head = cursor.sent;
                None
            }
            PageStep::Trimmed => Some(Step::Close(
                Some(error_event(
                    "lagged_beyond_retention",
                    "events after your position were removed by retention; reconnect to continue",
                    Some(0),
                )),
                CloseReason::Lagged,
            )),
        })
    }
}

#[cfg(test)]
mod size_tests {
    use super::*;

    #[tokio::test]
    async fn idle_watcher_future_is_small() {
        let dir = tempfile::tempdir().unwrap();
        let config = crate::Config {
            db: format!("sqlite://{}", dir.path().join("j.db").display()),
            ..crate::Config::default()
        };
        let server = crate::Jobcast::open(config).await.unwrap();
        let state = server.state().clone();
        let now = Instant::now();
        let mut w = Watcher {
            heartbeat_at: now,
            close_at: now,
            expires_at: now,
            wait_until: now,
            timer: Box::pin(tokio::time::sleep_until(now)),
            stream: "s".into(),
            resume: Resume::Start,
            sub: state.hub.subscribe("s"),
            cursor: None,
            failing_since: None,
            attempt: 0,
            done: false,
            close_reason: CloseReason::ClientGone,
            state,
        };
        // What every idle watcher carries: keep it small (store calls are boxed).
        assert!(
            std::mem::size_of_val(&w) <= 512,
            "{}",
            std::mem::size_of_val(&w)
        );
        let fut = w.next();
        assert!(
            std::mem::size_of_val(&fut) <= 1024,
            "{}",
            std::mem::size_of_val(&fut)
        );
    }
}
