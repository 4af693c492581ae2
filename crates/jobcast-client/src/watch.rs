//! Watching a stream: [`Watch`], a `Stream` of [`Item`]s that reconnects and
//! resumes by itself. The rules live in the pure state machine (`machine.rs`);
//! this file only performs its decisions: requests, reads, sleeps.

use std::fmt;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::stream::BoxStream;
use futures::{Stream, StreamExt};
use jobcast_protocol::{EndPayload, EventId, IdError, ResetPayload, StreamState};
use reqwest::header::{ACCEPT, CONTENT_TYPE};
use tokio::time::{timeout, Instant};

use crate::client::{api_error, check_stream, Client};
use crate::error::Error;
use crate::machine::{Machine, Out, Position, Settings};

/// Where a watch starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Start {
    /// The whole log, then live events.
    Beginning,
    /// Only events appended after the watch started (`?from=live`). The
    /// stream's head is looked up on the first connection, so a reconnect
    /// before the first event still misses nothing appended meanwhile.
    Live,
    /// The events after this id (what a previous watch delivered last).
    After(EventId),
    /// The last N events of the log, then live (`?from=tail:N`; the server
    /// takes N up to 1 000 000). A reconnect before the first event asks
    /// for the tail again; after it, the watch resumes after the last event
    /// delivered, as always.
    Tail(u64),
}

/// Why a start point does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// Not `start`, `live` or `tail:N`, and not an event id.
    #[error(transparent)]
    Id(#[from] IdError),
    /// `tail:` followed by something else than a whole number.
    #[error("tail:N takes a whole number of events, e.g. tail:100")]
    Tail,
}

impl FromStr for Start {
    type Err = StartError;

    /// `start`, `live`, `tail:N`, or an event id `{epoch}-{seq}`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "start" => Ok(Start::Beginning),
            "live" => Ok(Start::Live),
            _ => match s.strip_prefix("tail:") {
                Some(n) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => {
                    n.parse().map(Start::Tail).map_err(|_| StartError::Tail)
                }
                Some(_) => Err(StartError::Tail),
                None => Ok(Start::After(EventId::parse(s)?)),
            },
        }
    }
}

/// The connection state of a watch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Sending a request (first connection or a reconnect).
    Connecting,
    /// Reading an open event stream.
    Connected,
    /// Waiting for the backoff delay before reconnecting.
    WaitingToReconnect,
    /// Finished: the end, a 204, a stopping error, or given up.
    Closed,
}

impl State {
    fn to_u8(self) -> u8 {
        match self {
            State::Connecting => 0,
            State::Connected => 1,
            State::WaitingToReconnect => 2,
            State::Closed => 3,
        }
    }

    fn from_u8(v: u8) -> State {
        match v {
            0 => State::Connecting,
            1 => State::Connected,
            2 => State::WaitingToReconnect,
            _ => State::Closed,
        }
    }
}

/// What a watch yields.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Item {
    /// An event of the log, delivered once, in seq order.
    Event(Event),
    /// The server could not resume where asked (history trimmed, stream
    /// replaced, unknown position): events may have been lost or the stream
    /// is a new one; the watch goes on from the server's position.
    Reset(ResetPayload),
    /// The stream ended (`jobcast.end`); always the last item.
    End(End),
}

/// An event of a stream's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Its id, `{epoch}-{seq}`.
    pub id: EventId,
    /// Its type (`message` by default).
    pub event_type: String,
    /// Its data (lines joined by `\n`).
    pub data: String,
}

impl Event {
    /// Its position in the stream (1, 2, 3 …).
    pub fn seq(&self) -> u64 {
        self.id.seq
    }
}

/// The end of a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct End {
    /// The id of the `jobcast.end` event.
    pub id: Option<EventId>,
    /// Its data: the state, and the error or final data.
    pub payload: EndPayload,
}

impl End {
    /// `Completed` or `Failed`.
    pub fn state(&self) -> StreamState {
        self.payload.state
    }
}

/// A watch of one stream: a [`Stream`] of `Result<Item, Error>`.
///
/// It follows the jobcast client rules:
/// - Network errors, 5xx, 408 and 429 reconnect after a backoff with full
///   jitter (1 s × 2^attempt, at most 30 s); the stream's `retry:`, a
///   retryable `jobcast.error`'s `retry_after_ms` and a `Retry-After` header
///   are floors. Reconnects send the last delivered id as `Last-Event-ID`.
/// - A connection is **healthy** when it delivered at least one item, or
///   stayed open for `healthy_after` (5 s by default; not counted when it
///   ended with a retryable `jobcast.error`, since the server then reported a
///   problem). A healthy connection resets the backoff and the give-up clock.
/// - After `give_up_after` (5 min by default) without a healthy connection, the
///   next failure yields [`Error::GaveUp`] and the watch ends.
/// - Any other 4xx, a non-retryable `jobcast.error`, or a protocol violation
///   yields that error and ends the watch. An `Err` is always the last item.
/// - `204 No Content` (the position asked for is the stream's end, so the
///   application already had [`Item::End`]) ends the watch without another item.
/// - `jobcast.end` yields [`Item::End`] and ends the watch.
/// - Events are delivered exactly once, in order: events at or before the last
///   delivered seq (same epoch) are dropped; after an [`Item::Reset`] the
///   position is the server's.
pub struct Watch {
    inner: BoxStream<'static, Result<Item, Error>>,
    state: Arc<AtomicU8>,
}

impl fmt::Debug for Watch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Watch")
            .field("state", &self.state())
            .finish_non_exhaustive()
    }
}

impl Watch {
    pub(crate) fn new(client: Client, stream: &str, start: Start) -> Watch {
        let state = Arc::new(AtomicU8::new(State::Connecting.to_u8()));
        if let Err(e) = check_stream(stream) {
            state.store(State::Closed.to_u8(), Ordering::Relaxed);
            return Watch {
                inner: futures::stream::once(async move { Err(e) }).boxed(),
                state,
            };
        }
        let opts = &client.inner.opts;
        let settings = Settings {
            give_up_after: opts.give_up_after,
            healthy_after: opts.healthy_after,
            base: opts.backoff_base,
            max: opts.backoff_max,
        };
        let driver = Driver {
            events_url: format!("{}/v1/streams/{stream}/events", client.inner.base),
            meta_url: format!("{}/v1/streams/{stream}", client.inner.base),
            client,
            machine: Machine::new(start, settings, Instant::now()),
            body: None,
            out: Out::new(),
            state: state.clone(),
        };
        let inner = futures::stream::unfold(driver, |mut d| async move {
            let item = d.next().await;
            item.map(|i| (i, d))
        })
        .boxed();
        Watch { inner, state }
    }

    /// The connection state right now.
    pub fn state(&self) -> State {
        State::from_u8(self.state.load(Ordering::Relaxed))
    }
}

impl Stream for Watch {
    type Item = Result<Item, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.inner.poll_next_unpin(cx)
    }
}

/// The I/O shell around the machine.
struct Driver {
    client: Client,
    events_url: String,
    meta_url: String,
    machine: Machine,
    body: Option<BoxStream<'static, reqwest::Result<Bytes>>>,
    out: Out,
    state: Arc<AtomicU8>,
}

impl Driver {
    async fn next(&mut self) -> Option<Result<Item, Error>> {
        loop {
            if let Some(item) = self.out.pop_front() {
                return Some(item);
            }
            self.state
                .store(self.machine.state().to_u8(), Ordering::Relaxed);
            match self.machine.state() {
                State::Closed => {
                    self.body = None;
                    return None;
                }
                State::WaitingToReconnect => {
                    tokio::time::sleep_until(self.machine.retry_at()).await;
                    self.machine.on_timer();
                }
                State::Connecting => self.connect().await,
                State::Connected => self.read().await,
            }
        }
    }

    fn read_timeout(&self) -> std::time::Duration {
        self.client.inner.opts.read_timeout
    }

    /// Sends the watch request and hands the outcome to the machine.
    async fn connect(&mut self) {
        if self.machine.needs_live_position() && !self.resolve_live().await {
            return;
        }
        let mut url = self.events_url.clone();
        let mut rb_headers: Vec<(&str, String)> = vec![];
        match self.machine.position() {
            Position::Start => {}
            Position::Live => url.push_str("?from=live"),
            Position::Tail(n) => url.push_str(&format!("?from=tail:{n}")),
            Position::After(id) => rb_headers.push(("last-event-id", id.to_string())),
        }
        let mut rb = self
            .client
            .inner
            .http
            .get(&url)
            .header(ACCEPT, "text/event-stream");
        for (k, v) in rb_headers {
            rb = rb.header(k, v);
        }
        rb = self.client.authorize(rb);
        let read_timeout = self.read_timeout();
        let res = match timeout(read_timeout, rb.send()).await {
            Err(_) => {
                let e = Error::ReadTimeout {
                    url,
                    timeout: read_timeout,
                };
                self.machine
                    .on_network_error(Instant::now(), e, rand::random(), &mut self.out);
                return;
            }
            Ok(Err(source)) => {
                let e = Error::Network { url, source };
                self.machine
                    .on_network_error(Instant::now(), e, rand::random(), &mut self.out);
                return;
            }
            Ok(Ok(res)) => res,
        };
        let status = res.status().as_u16();
        let event_stream = res
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| {
                v.trim_start()
                    .to_ascii_lowercase()
                    .starts_with("text/event-stream")
            });
        if status == 200 && event_stream {
            self.machine.on_open(Instant::now());
            self.body = Some(res.bytes_stream().boxed());
            return;
        }
        let error = if status == 200 {
            Error::Protocol {
                detail: format!("{url} answered 200 but not with text/event-stream"),
                source: None,
            }
        } else {
            error_of(res, read_timeout).await
        };
        self.machine.on_refused(
            Instant::now(),
            status,
            event_stream,
            error,
            rand::random(),
            &mut self.out,
        );
    }

    /// Resolves a live start to the stream's head; false when the machine
    /// took the failure (it then waits or stops).
    async fn resolve_live(&mut self) -> bool {
        let rb = self
            .client
            .authorize(self.client.inner.http.get(&self.meta_url));
        let read_timeout = self.read_timeout();
        let res = match timeout(read_timeout, rb.send()).await {
            Err(_) => Err(Error::ReadTimeout {
                url: self.meta_url.clone(),
                timeout: read_timeout,
            }),
            Ok(Err(source)) => Err(Error::Network {
                url: self.meta_url.clone(),
                source,
            }),
            Ok(Ok(res)) => Ok(res),
        };
        let res = match res {
            Ok(res) => res,
            Err(e) => {
                self.machine
                    .on_network_error(Instant::now(), e, rand::random(), &mut self.out);
                return false;
            }
        };
        match res.status().as_u16() {
            200 => {
                let body = match timeout(read_timeout, res.bytes()).await {
                    Ok(Ok(b)) => b,
                    _ => {
                        self.machine.on_network_error(
                            Instant::now(),
                            Error::Disconnected,
                            rand::random(),
                            &mut self.out,
                        );
                        return false;
                    }
                };
                match serde_json::from_slice::<crate::StreamInfo>(&body) {
                    Ok(info) if info.state == StreamState::Open => {
                        let head = info.last_id.unwrap_or(EventId::new(info.epoch, 0));
                        self.machine.resolve_live(Some(head));
                    }
                    // Ended: `?from=live` answers with the end; nothing to resolve.
                    Ok(_) => {}
                    Err(e) => {
                        self.machine.stop(
                            Error::Protocol {
                                detail: "stream metadata that does not parse".into(),
                                source: Some(e),
                            },
                            &mut self.out,
                        );
                        return false;
                    }
                }
                true
            }
            404 => {
                // Not created yet: everything it will hold is live.
                self.machine.resolve_live(None);
                true
            }
            status => {
                let error = error_of(res, read_timeout).await;
                self.machine.on_refused(
                    Instant::now(),
                    status,
                    false,
                    error,
                    rand::random(),
                    &mut self.out,
                );
                false
            }
        }
    }
}

/// The error of a non-2xx response, its body read within the read timeout (at most 64 KiB).
async fn error_of(res: reqwest::Response, read_timeout: std::time::Duration) -> Error {
    let status = res.status().as_u16();
    let headers = res.headers().clone();
    let mut body = Vec::new();
    let mut chunks = res.bytes_stream();
    let read = async {
        while let Some(Ok(chunk)) = chunks.next().await {
            body.extend_from_slice(&chunk);
            if body.len() >= 64 * 1024 {
                break;
            }
        }
    };
    let _ = timeout(read_timeout, read).await;
    api_error(status, &headers, &body)
}

impl Driver {
    /// Reads the next chunk of the open stream.
    async fn read(&mut self) {
        let read_timeout = self.read_timeout();
        let next = match self.body.as_mut() {
            Some(body) => timeout(read_timeout, body.next()).await,
            None => Ok(None),
        };
        let now = Instant::now();
        match next {
            Ok(Some(Ok(chunk))) => {
                self.machine
                    .on_bytes(now, &chunk, rand::random(), &mut self.out)
            }
            Ok(Some(Err(source))) => {
                let e = Error::Network {
                    url: self.events_url.clone(),
                    source,
                };
                self.machine
                    .on_closed(now, Some(e), rand::random(), &mut self.out);
            }
            Ok(None) => self
                .machine
                .on_closed(now, None, rand::random(), &mut self.out),
            Err(_) => {
                let e = Error::ReadTimeout {
                    url: self.events_url.clone(),
                    timeout: read_timeout,
                };
                self.machine
                    .on_closed(now, Some(e), rand::random(), &mut self.out);
            }
        }
        if self.machine.state() != State::Connected {
            // Closing the response closes (or releases) the connection.
            self.body = None;
        }
    }
}
