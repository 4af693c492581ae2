//! The accept loop and per-connection handling. jobcast owns its accept loop
//! (not `axum::serve`): each connection runs `select!{connection, shutdown}`,
//! and its socket is wrapped so that a write making no progress for the
//! write timeout fails — when a client stops reading, hyper stops polling
//! the body, so timers inside the body would never fire. On HTTP/2 one
//! stream can stall while its connection is fine (its flow-control window
//! stays shut): each stream's task gives up on its own (`StreamExec`).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::http::AppState;
use crate::lean::{self, Head, Rewind};
use crate::limits::{Limiter, Refusal};
use crate::tls::Tls;

/// Serves the API on `listener` until `shutdown` completes, then: stops
/// accepting, tells every watcher `shutting_down`, lets requests in flight
/// finish (bounded by the shutdown grace), and closes the store.
///
/// Plain connections speak HTTP/1.1 (the lean SSE path, then hyper) and
/// HTTP/2 with prior knowledge (h2c: the connection preface is recognised
/// on the first bytes).
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    serve_with(listener, state, None, shutdown).await
}

/// Like [`serve`]; with `tls`, every connection is TLS, and ALPN chooses
/// HTTP/2 (`h2`) or HTTP/1.1.
pub async fn serve_with(
    listener: TcpListener,
    state: AppState,
    tls: Option<Tls>,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let router = crate::http::app(state.clone());
    let conns = TaskTracker::new();
    let token = state.shutdown.clone();
    let grace = state.config.shutdown_grace;
    let limiter = Limiter::new(
        state.config.max_connections,
        state.config.max_connections_per_ip,
    );
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (sock, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // EMFILE and friends: wait a little instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
            _ = token.cancelled() => break,
        };
        // Limits first, before a byte is read: a refused connection costs a
        // fixed answer and nothing else.
        let slot = match limiter.admit(peer.ip()) {
            Ok(slot) => slot,
            Err(why) => {
                tracing::debug!(%peer, ?why, open = limiter.open(), "connection refused at a limit");
                state.metrics.connection_refused(match why {
                    Refusal::Server => "server",
                    Refusal::PerIp => "per_ip",
                });
                match tls {
                    // The fixed answers are plain HTTP/1.1: a TLS client could
                    // not read them, so it sees the connection close.
                    Some(_) => drop(sock),
                    None => limiter.refuse(sock, why),
                }
                continue;
            }
        };
        if let Err(e) = sock.set_nodelay(true) {
            tracing::debug!(error = %e, %peer, "set_nodelay failed");
        }
        let conn = Conn {
            state: state.clone(),
            router: router.clone(),
            token: token.clone(),
            tracker: conns.clone(),
            peer,
        };
        let tls = tls.clone();
        // One task per connection; it ends with the connection or at shutdown.
        conns.spawn(async move {
            // Given back when this task ends, however it ends.
            let _slot = slot;
            let sock = WriteTimeout::new(
                sock,
                conn.state.config.write_timeout,
                conn.state.metrics.clone(),
            );
            match tls {
                None => conn.plain(sock).await,
                Some(tls) => conn.secure(sock, tls).await,
            }
        });
    }
    drop(listener);
    tracing::info!(connections = conns.len(), "shutting down");
    token.cancel();
    state.hub.close();
    conns.close();
    if tokio::time::timeout(grace + Duration::from_secs(1), conns.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            connections = conns.len(),
            "connections still open after the grace period"
        );
    }
    state.store.close().await;
    Ok(())
}

/// Most HTTP/2 streams open at once on one connection (each SSE watch is
/// one): bounds what one connection can hold (h2 buffers at most
/// `max_send_buf_size` per stream).
const MAX_H2_STREAMS: u32 = 256;

/// What one connection's task needs.
struct Conn {
    state: AppState,
    router: axum::Router,
    token: CancellationToken,
    /// HTTP/2 streams run as tasks of their own, tracked with the connections.
    tracker: TaskTracker,
    peer: SocketAddr,
}

/// The protocol a connection turned out to speak (the `proto` label of
/// `jobcast_connections_accepted_total`).
#[derive(Debug, Clone, Copy)]
enum Proto {
    /// Plain HTTP/1.1.
    Http1,
    /// HTTP/2 with prior knowledge, no TLS.
    H2c,
    /// HTTP/1.1 over TLS.
    Http1Tls,
    /// HTTP/2 over TLS (ALPN `h2`).
    H2,
    /// Closed, timed out or failed its handshake before speaking.
    None,
}

impl Proto {
    fn label(self) -> &'static str {
        match self {
            Proto::Http1 => "http1",
            Proto::H2c => "h2c",
            Proto::Http1Tls => "http1_tls",
            Proto::H2 => "h2",
            Proto::None => "none",
        }
    }
}

impl Conn {
    fn accepted(&self, proto: Proto) {
        self.state.metrics.connection_accepted(proto.label());
    }

    /// A plain connection: the first head decides (lean SSE, hyper
    /// HTTP/1.1, or the HTTP/2 preface).
    async fn plain(self, mut sock: WriteTimeout<TcpStream>) {
        let config = &self.state.config;
        let (header_timeout, lean_sse) = (config.header_timeout, config.lean_sse);
        // The first head is read here, whole, on every path: one deadline.
        let head = tokio::select! {
            h = lean::read_head(&mut sock, header_timeout, lean_sse) => h,
            _ = self.token.cancelled() => return self.accepted(Proto::None),
        };
        let prefix = match head {
            Head::Watch(mut req) => {
                self.accepted(Proto::Http1);
                req.extensions_mut()
                    .insert(crate::limits::Peer(self.peer.ip()));
                // The body ends itself at shutdown; writes are bounded by the write timeout.
                if let Err(e) = lean::serve(sock, req, self.router).await {
                    tracing::debug!(error = %e, peer = %self.peer, "watch connection ended with an error");
                }
                return;
            }
            Head::H2(prefix) => {
                self.accepted(Proto::H2c);
                return self.http2(Rewind::new(prefix, sock)).await;
            }
            Head::Other(prefix) => prefix,
            other => return self.unreadable(sock, other).await,
        };
        self.accepted(Proto::Http1);
        self.http1(Rewind::new(prefix, sock)).await
    }

    /// A TLS connection: the handshake within the header timeout, then
    /// ALPN decides (`h2`, else HTTP/1.1 through hyper; the lean path is
    /// for plain connections only).
    async fn secure(self, sock: WriteTimeout<TcpStream>, tls: Tls) {
        let header_timeout = self.state.config.header_timeout;
        let handshake = tokio::time::timeout(header_timeout, tls.acceptor().accept(sock));
        let mut stream = tokio::select! {
            r = handshake => match r {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, peer = %self.peer, "TLS handshake failed");
                    return self.accepted(Proto::None);
                }
                Err(_) => {
                    tracing::debug!(peer = %self.peer, "TLS handshake timed out");
                    return self.accepted(Proto::None);
                }
            },
            _ = self.token.cancelled() => return self.accepted(Proto::None),
        };
        if stream.get_ref().1.alpn_protocol() == Some(b"h2") {
            self.accepted(Proto::H2);
            return self.http2(stream).await;
        }
        let head = tokio::select! {
            h = lean::read_head(&mut stream, header_timeout, false) => h,
            _ = self.token.cancelled() => return self.accepted(Proto::None),
        };
        match head {
            Head::Other(prefix) => {
                self.accepted(Proto::Http1Tls);
                self.http1(Rewind::new(prefix, stream)).await
            }
            // Prior knowledge inside TLS without ALPN: rare, but HTTP/2 all the same.
            Head::H2(prefix) => {
                self.accepted(Proto::H2);
                self.http2(Rewind::new(prefix, stream)).await
            }
            other => self.unreadable(stream, other).await,
        }
    }

    /// A first head that never arrived whole: 408 or 431 when something
    /// came, else just the close.
    async fn unreadable<S: AsyncWrite + Unpin>(&self, sock: S, head: Head) {
        self.accepted(Proto::None);
        let (status, code, msg) = match head {
            Head::TimedOut { partial: true } => (
                http::StatusCode::REQUEST_TIMEOUT,
                "header_timeout",
                "the request head did not arrive within the header timeout",
            ),
            Head::TooLarge => (
                http::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "header_too_large",
                "the request head is larger than 64 KiB",
            ),
            _ => return,
        };
        lean::refuse(sock, status, code, msg).await;
    }

    /// The router as a hyper service; every request carries its peer's address.
    fn service(&self, h2: bool) -> ConnService {
        ConnService {
            router: self.router.clone(),
            ip: crate::limits::Peer(self.peer.ip()),
            h2,
        }
    }

    async fn http1<I>(self, io: I)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let header_timeout = self.state.config.header_timeout;
        let conn = http1::Builder::new()
            .timer(TokioTimer::new())
            // Later heads of a keep-alive connection; the first was read above.
            .header_read_timeout(header_timeout)
            .serve_connection(TokioIo::new(io), self.service(false));
        let mut conn = std::pin::pin!(conn);
        let grace = self.state.config.shutdown_grace;
        let result = tokio::select! {
            r = conn.as_mut() => r,
            _ = self.token.cancelled() => {
                // Finish the request in flight; SSE bodies end themselves.
                conn.as_mut().graceful_shutdown();
                tokio::time::timeout(grace, conn.as_mut()).await.unwrap_or(Ok(()))
            }
        };
        if let Err(e) = result {
            tracing::debug!(error = %e, peer = %self.peer, "connection ended with an error");
        }
    }

    /// HTTP/2: every stream runs in a task of its own (see [`StreamExec`]),
    /// which gives up on a stream whose response stalls (its flow-control
    /// window stays shut) for the write timeout.
    async fn http2<I>(self, io: I)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let settings = StallSettings {
            timeout: self.state.config.write_timeout,
        };
        let exec = StreamExec {
            settings,
            metrics: self.state.metrics.clone(),
            tracker: self.tracker.clone(),
        };
        let mut builder = http2::Builder::new(exec);
        builder
            .timer(TokioTimer::new())
            .max_concurrent_streams(MAX_H2_STREAMS);
        let conn = builder.serve_connection(TokioIo::new(io), self.service(true));
        let mut conn = std::pin::pin!(conn);
        let grace = self.state.config.shutdown_grace;
        let result = tokio::select! {
            r = conn.as_mut() => r,
            _ = self.token.cancelled() => {
                // GOAWAY: no new streams; SSE bodies end themselves with `shutting_down`.
                conn.as_mut().graceful_shutdown();
                tokio::time::timeout(grace, conn.as_mut()).await.unwrap_or(Ok(()))
            }
        };
        if let Err(e) = result {
            tracing::debug!(error = %e, peer = %self.peer, "HTTP/2 connection ended with an error");
        }
    }
}

/// The router for one connection's requests.
#[derive(Clone)]
struct ConnService {
    router: axum::Router,
    ip: crate::limits::Peer,
    /// HTTP/2: response bodies report their progress ([`StallBody`]).
    h2: bool,
}

type Answer = Result<http::Response<axum::body::Body>, std::convert::Infallible>;

impl hyper::service::Service<http::Request<hyper::body::Incoming>> for ConnService {
    type Response = http::Response<axum::body::Body>;
    type Error = std::convert::Infallible;
    type Future =
        futures::future::Map<axum::routing::future::RouteFuture<Self::Error>, fn(Answer) -> Answer>;

    fn call(&self, mut req: http::Request<hyper::body::Incoming>) -> Self::Future {
        use futures::FutureExt;
        use tower::Service;
        req.extensions_mut().insert(self.ip);
        let wrap: fn(Answer) -> Answer = match self.h2 {
            true => |r| r.map(|res| res.map(|b| axum::body::Body::new(StallBody::new(b)))),
            false => |r| r,
        };
        self.router.clone().call(req).map(wrap)
    }
}

/// How long an HTTP/2 response may wait for its stream's window.
#[derive(Debug, Clone, Copy)]
struct StallSettings {
    timeout: Duration,
}

tokio::task_local! {
    /// The progress record of the HTTP/2 stream whose task is being polled.
    static STALL: Arc<StallClock>;
}

/// One HTTP/2 stream's progress: when its body handed over a data frame
/// that has not been taken yet (0: none outstanding).
///
/// hyper polls a response body for its next frame only after the last one
/// went into the stream's flow-control window; a client that stops reading
/// keeps the window shut, hyper stops polling the body, and the body's own
/// timers never fire. So the stream's task (which hyper polls through the
/// executor) watches this record instead.
#[derive(Debug)]
struct StallClock {
    base: Instant,
    /// Milliseconds after `base`, plus one, of the frame handed over; 0: none.
    outstanding: AtomicU64,
}

impl StallClock {
    fn handed_over(&self) {
        let ms = Instant::now().duration_since(self.base).as_millis() as u64;
        self.outstanding.store(ms + 1, Ordering::Relaxed);
    }

    fn taken(&self) {
        self.outstanding.store(0, Ordering::Relaxed);
    }

    fn since(&self) -> Option<Instant> {
        match self.outstanding.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(self.base + Duration::from_millis(ms - 1)),
        }
    }
}

/// A response body that tells its stream's [`StallClock`] when it handed
/// over a frame and when it was asked for the next one.
struct StallBody {
    inner: axum::body::Body,
    clock: Option<Arc<StallClock>>,
}

impl StallBody {
    fn new(inner: axum::body::Body) -> StallBody {
        StallBody { inner, clock: None }
    }
}

impl http_body::Body for StallBody {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        if self.clock.is_none() {
            // Polled inside its stream's task: the record is in scope there.
            self.clock = STALL.try_with(Arc::clone).ok();
        }
        if let Some(c) = &self.clock {
            c.taken();
        }
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        if let (Poll::Ready(Some(Ok(f))), Some(c)) = (&r, &self.clock) {
            if f.data_ref().is_some_and(|d| !d.is_empty()) {
                c.handed_over();
            }
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Runs each HTTP/2 stream as a tracked task that is dropped (the stream
/// reset with `CANCEL`, its watcher freed) when a frame its body handed
/// over is not taken within the write timeout.
#[derive(Clone)]
struct StreamExec {
    settings: StallSettings,
    metrics: crate::metrics::Metrics,
    tracker: TaskTracker,
}

impl<F> hyper::rt::Executor<F> for StreamExec
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, fut: F) {
        let clock = Arc::new(StallClock {
            base: Instant::now(),
            outstanding: AtomicU64::new(0),
        });
        self.tracker.spawn(Guarded {
            fut: Box::pin(fut),
            clock,
            timeout: self.settings.timeout,
            sleep: None,
            metrics: self.metrics.clone(),
        });
    }
}

/// One HTTP/2 stream's task (see [`StreamExec`]).
struct Guarded<F> {
    fut: Pin<Box<F>>,
    clock: Arc<StallClock>,
    timeout: Duration,
    /// Allocated the first time a frame waits, then re-armed.
    sleep: Option<Pin<Box<Sleep>>>,
    metrics: crate::metrics::Metrics,
}

impl<F: Future<Output = ()>> Future for Guarded<F> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        let clock = this.clock.clone();
        if STALL
            .sync_scope(clock, || this.fut.as_mut().poll(cx))
            .is_ready()
        {
            return Poll::Ready(());
        }
        let Some(since) = this.clock.since() else {
            return Poll::Pending;
        };
        let deadline = since + this.timeout;
        let sleep = this
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if sleep.deadline() != deadline {
            sleep.as_mut().reset(deadline);
        }
        match sleep.as_mut().poll(cx) {
            Poll::Ready(()) => {
                // Dropping the stream's future resets the stream; the
                // connection and its other streams go on.
                tracing::debug!("HTTP/2 stream stalled for the write timeout: reset");
                this.metrics.write_timeout();
                Poll::Ready(())
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

/// A socket whose writes fail with `TimedOut` when no byte is accepted for
/// the timeout: a stalled or vanished watcher is dropped, freeing its state.
#[derive(Debug)]
pub struct WriteTimeout<T> {
    inner: T,
    timeout: Duration,
    /// Allocated once per connection and re-armed, never per write.
    sleep: Pin<Box<Sleep>>,
    armed: bool,
    metrics: crate::metrics::Metrics,
}

impl<T> WriteTimeout<T> {
    /// Wraps `inner`.
    pub fn new(inner: T, timeout: Duration, metrics: crate::metrics::Metrics) -> Self {
        WriteTimeout {
            inner,
            timeout,
            sleep: Box::pin(tokio::time::sleep(timeout)),
            armed: false,
            metrics,
        }
    }

    /// The wrapped socket.
    pub fn get_ref(&self) -> &T {
        &self.inner
    }

    fn stalled<R>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<R>> {
        if !self.armed {
            self.armed = true;
            self.sleep.as_mut().reset(Instant::now() + self.timeout);
        }
        match self.sleep.as_mut().poll(cx) {
            Poll::Ready(()) => {
                self.metrics.write_timeout();
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "write timed out: the peer accepted no bytes",
                )))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn progressed<R>(
        &mut self,
        r: Poll<io::Result<R>>,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<R>> {
        match r {
            Poll::Pending => self.stalled(cx),
            ready => {
                self.armed = false;
                ready
            }
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for WriteTimeout<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for WriteTimeout<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.progressed(r, cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.progressed(r, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_flush(cx);
        self.progressed(r, cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.progressed(r, cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A peer that never reads: the write fails after exactly the timeout,
    /// measured on the paused clock.
    #[tokio::test(start_paused = true)]
    async fn write_times_out_when_the_peer_accepts_nothing() {
        let (a, _peer) = tokio::io::duplex(64);
        let metrics = crate::metrics::Metrics::new();
        let mut w = WriteTimeout::new(a, Duration::from_secs(30), metrics.clone());
        let started = Instant::now();
        let chunk = [b'x'; 1024];
        let err = loop {
            match w.write(&chunk).await {
                Ok(_) => continue,
                Err(e) => break e,
            }
        };
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), Duration::from_secs(30));
        assert!(metrics.encode().contains("jobcast_write_timeouts_total 1"));
    }

    /// A slow peer that keeps accepting bytes is never timed out, however
    /// long the whole transfer takes.
    #[tokio::test(start_paused = true)]
    async fn progress_resets_the_timeout() {
        let (a, mut peer) = tokio::io::duplex(64);
        let mut w = WriteTimeout::new(a, Duration::from_secs(30), crate::metrics::Metrics::new());
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 64];
            let mut total = 0;
            while total < 64 * 100 {
                tokio::time::sleep(Duration::from_secs(20)).await;
                total += peer.read(&mut buf).await.unwrap();
            }
            total
        });
        let started = Instant::now();
        w.write_all(&[b'y'; 64 * 100])
            .await
            .expect("a slow reader is not a dead one");
        assert!(started.elapsed() > Duration::from_secs(30 * 10));
        assert_eq!(reader.await.unwrap(), 6400);
    }
}
