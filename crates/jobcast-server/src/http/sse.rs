//! The SSE response: the I/O shell around [`crate::watch::Watch`]. It
//! subscribes to the hub first, then carries out the machine's steps: store
//! reads, writes, and waits on the stream's wake-ups and one timer.

use std::convert::Infallible;
use std::time::Duration;

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{header, HeaderValue, StatusCode};
use jobcast_protocol::encode;
use rand::Rng;
use tokio::time::Instant;

use super::{ApiError, AppState, VARY};
use crate::hub::{Batch, Subscription};
use crate::limits::{WatcherCap, WatcherSlot};
use crate::store::PAGE_BYTES;
use crate::watch::{Failure, Mode, Resume, Sent, Settings, Step, Watch};

/// The machine's clock: tokio's (paused in tests), as a std `Instant`.
pub(super) fn clock() -> std::time::Instant {
    Instant::now().into_std()
}

/// The HTTP error for a watch of `stream` that could not answer.
pub(super) fn failure(f: Failure, stream: &str) -> ApiError {
    match f {
        Failure::Store(e) => e.into(),
        Failure::ShuttingDown => crate::store::StoreError::Closed.into(),
        Failure::NotFound => ApiError::stream_not_found(stream),
    }
}

/// No room in the memory budget for another replay page.
#[derive(Debug)]
struct NoRoom;

/// Carries out one store read for `w`; the machine's next step. With
/// `account`, a page read from the store takes its bytes from the memory
/// budget first (they ride with the frame it becomes), or fails with
/// [`NoRoom`]; pages served from the stream's shared catch-up need none.
async fn read_once(
    state: &AppState,
    stream: &str,
    w: &mut Watch,
    sub: &Subscription,
    step: Step,
    account: bool,
) -> Result<Step, NoRoom> {
    let next = match step {
        Step::ReadMeta => {
            // Boxed: the store calls' futures are large and needed only
            // briefly; inlined, every idle watcher would carry their size.
            let r = Box::pin(state.store.meta(stream)).await;
            w.on_meta(clock(), sub, r)
        }
        step @ Step::ReadPage { .. } => {
            Box::pin(replay_page(state, stream, w, sub, step, account)).await?
        }
        other => other,
    };
    if let Some(outcome) = w.take_outcome() {
        state.metrics.resume(outcome);
    }
    Ok(next)
}

/// A store page for `w`, one read per stream at a time: after waiting for
/// the read in flight, the machine is asked again (another watcher may just
/// have brought its page in); a page read here is kept for the stream's
/// other watchers (`Subscription::cache_page`). An SSE watcher (`account`)
/// at the front of the stream's catch-up first waits, up to
/// `Config::catchup_pace` (off by default), while the cache is full of pages slower watchers still
/// need (see `Subscription::must_wait_for_room`), so the watchers of a
/// stream stay within what the cache holds and each page is read once.
async fn replay_page(
    state: &AppState,
    stream: &str,
    w: &mut Watch,
    sub: &Subscription,
    step: Step,
    account: bool,
) -> Result<Step, NoRoom> {
    if !sub.shared() {
        let Step::ReadPage { after, limit, gap } = step else {
            return Ok(step);
        };
        return read_page(state, stream, w, sub, (after, limit, gap), account).await;
    }
    if account {
        if let Step::ReadPage { after, .. } = step {
            sub.catching_up(Some(after));
        }
        wait_for_room(sub).await;
    }
    let entry = sub.entry();
    let _flight = entry.read_lock().await;
    match w.next(clock(), sub) {
        Step::ReadPage { after, limit, gap } => {
            read_page(state, stream, w, sub, (after, limit, gap), account).await
        }
        other => Ok(other),
    }
}

/// Waits while this watcher is at the front of a full catch-up cache (see
/// [`replay_page`]); past `Config::catchup_pace` without the slowest moving on,
/// those holding the cache full are left behind.
async fn wait_for_room(sub: &Subscription) {
    let pace = sub.catchup_pace();
    if pace.is_zero() {
        return;
    }
    let deadline = Instant::now() + pace;
    loop {
        let room = sub.room_notified();
        let mut room = std::pin::pin!(room);
        room.as_mut().enable();
        if !sub.must_wait_for_room() {
            return;
        }
        // The slowest watcher moved on (look again), or the pace ran out.
        if tokio::time::timeout_at(deadline, room).await.is_err() {
            sub.leave_behind();
            return;
        }
    }
}

/// Reads one page after `after` and hands it to `w` (see [`read_once`] for
/// `account`). Kept for the stream's other watchers when it has some.
async fn read_page(
    state: &AppState,
    stream: &str,
    w: &mut Watch,
    sub: &Subscription,
    (after, limit, gap): (u64, u32, bool),
    account: bool,
) -> Result<Step, NoRoom> {
    let permit = match account {
        true => Some(state.budget.try_take(page_reserve(state)).ok_or(NoRoom)?),
        false => None,
    };
    if gap {
        state.metrics.slow_fallback();
    }
    let r = Box::pin(state.store.read(stream, after, limit)).await;
    if let (Ok(Some(page)), true) = (&r, sub.shared()) {
        if let (Some(first), Some(last)) = (page.events.first(), page.events.last()) {
            let batch = Batch::encode(
                page.meta.key,
                &page.meta.epoch,
                first.seq,
                page.events
                    .iter()
                    .map(|e| (e.event_type.as_str(), e.data.as_str())),
                last.event_type == jobcast_protocol::END_EVENT,
            );
            sub.cache_page(std::sync::Arc::new(batch));
        }
    }
    Ok(match (w.on_page(clock(), sub, r), permit) {
        (
            Step::Send(
                bytes,
                sent @ Sent::Events {
                    from_store: true, ..
                },
            ),
            Some(p),
        ) => Step::Send(p.attach(bytes), sent),
        (other, _) => other,
    })
}

/// Carries out store reads for `w` until it asks for something else (a
/// long-poll: its page is small and answered at once, not accounted).
pub(super) async fn run_reads(
    state: &AppState,
    stream: &str,
    w: &mut Watch,
    sub: &Subscription,
    mut step: Step,
) -> Step {
    while let Step::ReadMeta | Step::ReadPage { .. } = step {
        // Unaccounted, so never refused for room.
        step = match read_once(state, stream, w, sub, step, false).await {
            Ok(next) => next,
            // Not taken when unaccounted; answered as a busy store if it were.
            Err(NoRoom) => return Step::Fail(Failure::Store(crate::store::StoreError::Closed)),
        };
    }
    step
}

/// What a replay page may take before it is read: a page of data or one
/// event of the largest size, whichever is larger (the permit shrinks to the
/// frame once it is encoded).
fn page_reserve(state: &AppState) -> usize {
    PAGE_BYTES.max(state.config.max_event_bytes) + 4096
}

/// 503 `memory_budget_exceeded`: the server holds as much replay as it may.
fn over_budget() -> ApiError {
    ApiError {
        retry_after: Some(1),
        ..ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "memory_budget_exceeded",
            "the server is replaying as much as its memory budget allows; retry shortly",
        )
    }
}

/// Who is watching, for the per-address and per-subject caps.
#[derive(Debug, Default)]
pub(super) struct Who {
    /// The client's address.
    pub(super) ip: Option<std::net::IpAddr>,
    /// The token's subject.
    pub(super) subject: Option<String>,
}

/// Starts a watch. Answers 204 when `resume` is the stream's end.
pub(super) async fn watch(
    state: AppState,
    stream: String,
    resume: Resume,
    wait: Duration,
    expires: Option<Instant>,
    who: Who,
) -> Result<Response, ApiError> {
    let slot = state
        .watcher_caps
        .admit(who.ip, who.subject.as_deref())
        .map_err(|cap| {
            let (what, max) = match cap {
                WatcherCap::PerIp(max) => ("from this address", max),
                WatcherCap::PerSubject(max) => ("for this token's subject", max),
            };
            ApiError {
                retry_after: Some(5),
                ..ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "too_many_watchers",
                    format!("{max} watchers {what} are open, the most allowed; retry later"),
                )
            }
        })?;
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
    let now = Instant::now();
    let max = state.config.max_duration;
    // Jitter the maximum duration down by up to 10% so reconnects spread out.
    let jitter = max.mul_f64(rand::rng().random_range(0.0..0.1));
    let settings = Settings {
        heartbeat: state.config.heartbeat,
        close_at: (now + (max - jitter)).into_std(),
        wait_until: (now + wait).into_std(),
        expires_at: expires.map(Instant::into_std),
        store_retry_limit: state.config.store_retry_limit,
        page_size: state.config.page_size,
    };
    let mut w = Watch::new(
        Mode::Sse,
        resume,
        settings,
        now.into_std(),
        rand::rng().random(),
    );
    let mut first = w.next(clock(), &sub);
    // The first store answers decide the status line. A new replay while the
    // memory budget is used up is refused; running ones wait for room.
    while let Step::ReadMeta | Step::ReadPage { .. } = first {
        first = read_once(&state, &stream, &mut w, &sub, first, true)
            .await
            .map_err(|NoRoom| over_budget())?;
    }
    let first = match first {
        Step::NoContent => {
            let mut res = StatusCode::NO_CONTENT.into_response();
            set_headers(&mut res, false);
            return Ok(res);
        }
        Step::Fail(f) => return Err(failure(f, &stream)),
        other => other,
    };
    let mut head = Vec::with_capacity(16);
    encode::retry(&mut head, state.config.retry.as_millis() as u64);
    state.metrics.watch_opened();
    let watcher = Watcher {
        _slot: slot,
        timer: Box::pin(tokio::time::sleep_until(now + state.config.heartbeat)),
        pending: Some(first),
        budget_waited: Duration::ZERO,
        done: false,
        stream,
        sub,
        w,
        state,
    };
    let body = futures::stream::unfold(
        (Some(Bytes::from(head)), watcher),
        |(first, mut watcher)| async move {
            let chunk = match first {
                Some(b) => Some(b),
                None => watcher.next().await,
            };
            chunk.map(|b| (Ok::<_, Infallible>(b), (None, watcher)))
        },
    );
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

/// One watcher: a subscription, the machine and one timer; no task of its own.
struct Watcher {
    state: AppState,
    stream: String,
    sub: Subscription,
    w: Watch,
    /// The step to carry out next, when the machine already gave it.
    pending: Option<Step>,
    /// One timer per watcher, armed at the earliest deadline and re-armed
    /// only when it fired or a deadline came closer: never reset per event.
    timer: std::pin::Pin<Box<tokio::time::Sleep>>,
    /// How long the watcher has waited for room in the memory budget.
    budget_waited: Duration,
    /// Its place under the per-address and per-subject caps.
    _slot: WatcherSlot,
    done: bool,
}

impl Drop for Watcher {
    fn drop(&mut self) {
        // ClientGone unless the machine closed the response itself.
        self.state.metrics.watch_closed(self.w.close_reason());
    }
}

impl Watcher {
    async fn next(&mut self) -> Option<Bytes> {
        while !self.done {
            let step = match self.pending.take() {
                Some(step) => step,
                None => self.w.next(clock(), &self.sub),
            };
            match step {
                Step::Send(bytes, sent) => {
                    if let Sent::Events {
                        count,
                        from_store,
                        published,
                    } = sent
                    {
                        self.state.metrics.delivered(count, from_store);
                        // Where it is among the stream's catching-up watchers.
                        self.sub.catching_up(match from_store {
                            true => self.w.position().map(|(_, sent)| sent),
                            false => None,
                        });
                        if let Some(t) = published {
                            self.state.metrics.publish_to_write(t.elapsed());
                        }
                    }
                    return Some(bytes);
                }
                Step::Close { last, .. } => {
                    self.done = true;
                    return last;
                }
                step @ (Step::ReadMeta | Step::ReadPage { .. }) => {
                    let retry = match &step {
                        Step::ReadPage { after, limit, gap } => Some(Step::ReadPage {
                            after: *after,
                            limit: *limit,
                            gap: *gap,
                        }),
                        _ => None,
                    };
                    let read = Box::pin(read_once(
                        &self.state,
                        &self.stream,
                        &mut self.w,
                        &self.sub,
                        step,
                        true,
                    ))
                    .await;
                    match read {
                        Ok(next) => self.pending = Some(next),
                        Err(NoRoom) => {
                            // No room for another page: wait for some (heartbeats go on).
                            self.pending = retry;
                            if let Some(beat) = self.wait_for_budget().await {
                                return Some(beat);
                            }
                        }
                    }
                }
                Step::Wait { .. } => self.wait().await,
                // Only before the response (handled in `watch`).
                Step::NoContent | Step::Respond(_) | Step::Fail(_) => self.done = true,
            }
        }
        None
    }

    /// Waits a moment for room in the memory budget; a heartbeat when one
    /// is due meanwhile. At shutdown the pending read is dropped, so the
    /// machine closes the watch.
    async fn wait_for_budget(&mut self) -> Option<Bytes> {
        const PAUSE: Duration = Duration::from_millis(50);
        // The shutdown token, or a short pause.
        tokio::select! {
            _ = self.state.shutdown.cancelled() => {
                self.pending = None;
                return None;
            }
            _ = tokio::time::sleep(PAUSE) => {}
        }
        self.budget_waited += PAUSE;
        if self.budget_waited >= self.state.config.heartbeat {
            self.budget_waited = Duration::ZERO;
            return Some(Bytes::from_static(b":\n"));
        }
        None
    }

    /// Registers for the stream's wake-ups, asks the machine once more (so a
    /// publish or the hub closing in between is not missed), then sleeps
    /// until a wake-up or the machine's deadline.
    async fn wait(&mut self) {
        let entry = self.sub.entry();
        let notified = entry.notified();
        let mut notified = std::pin::pin!(notified);
        notified.as_mut().enable();
        let until = match self.w.next(clock(), &self.sub) {
            Step::Wait { until } => Instant::from_std(until),
            other => {
                self.pending = Some(other);
                return;
            }
        };
        if self.timer.deadline() > until || self.timer.is_elapsed() {
            self.timer.as_mut().reset(until);
        }
        // A publish or change of this stream (or the hub closing), or the deadline.
        tokio::select! {
            _ = &mut notified => {}
            _ = &mut self.timer => {}
        }
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
        let settings = Settings {
            heartbeat: Duration::from_secs(15),
            close_at: now.into_std(),
            wait_until: now.into_std(),
            expires_at: None,
            store_retry_limit: Duration::from_secs(30),
            page_size: 100,
        };
        let mut w = Watcher {
            _slot: state.watcher_caps.admit(None, None).unwrap(),
            timer: Box::pin(tokio::time::sleep_until(now)),
            pending: None,
            budget_waited: Duration::ZERO,
            done: false,
            stream: "s".into(),
            sub: state.hub.subscribe("s"),
            w: Watch::new(Mode::Sse, Resume::Start, settings, now.into_std(), 1),
            state,
        };
        // What every idle watcher carries: keep it small (store calls are boxed).
        assert!(
            std::mem::size_of_val(&w) <= 640,
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
