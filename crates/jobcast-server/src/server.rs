//! The accept loop and per-connection handling. jobcast owns its accept loop
//! (not `axum::serve`): each connection runs `select!{connection, shutdown}`,
//! and its socket is wrapped so that a write making no progress for the
//! write timeout fails — when a client stops reading, hyper stops polling
//! the body, so timers inside the body would never fire.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::time::{Instant, Sleep};
use tokio_util::task::TaskTracker;

use crate::http::AppState;
use crate::lean::{self, Head, Rewind};
use crate::limits::{Limiter, Refusal};

/// Serves the API on `listener` until `shutdown` completes, then: stops
/// accepting, tells every watcher `shutting_down`, lets requests in flight
/// finish (bounded by the shutdown grace), and closes the store.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let router = crate::http::app(state.clone());
    let conns = TaskTracker::new();
    let token = state.shutdown.clone();
    let write_timeout = state.config.write_timeout;
    let header_timeout = state.config.header_timeout;
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
                limiter.refuse(sock, why);
                continue;
            }
        };
        if let Err(e) = sock.set_nodelay(true) {
            tracing::debug!(error = %e, %peer, "set_nodelay failed");
        }
        // Every request of this connection carries its peer's address.
        let ip = crate::limits::Peer(peer.ip());
        let svc = TowerToHyperService::new(
            tower::ServiceBuilder::new()
                .map_request(move |mut req: http::Request<hyper::body::Incoming>| {
                    req.extensions_mut().insert(ip);
                    req
                })
                .service(router.clone()),
        );
        let token = token.clone();
        let metrics = state.metrics.clone();
        let lean_sse = state.config.lean_sse;
        let router = router.clone();
        // One task per connection; it ends with the connection or at shutdown.
        conns.spawn(async move {
            // Given back when this task ends, however it ends.
            let _slot = slot;
            let mut sock = WriteTimeout::new(sock, write_timeout, metrics);
            // The first head is read here, whole, on both paths: one deadline.
            let head = tokio::select! {
                h = lean::read_head(&mut sock, header_timeout, lean_sse) => h,
                _ = token.cancelled() => return,
            };
            let prefix = match head {
                Head::Gone | Head::TimedOut { partial: false } => return,
                Head::TimedOut { partial: true } => {
                    let msg = "the request head did not arrive within the header timeout";
                    lean::refuse(
                        sock,
                        http::StatusCode::REQUEST_TIMEOUT,
                        "header_timeout",
                        msg,
                    )
                    .await;
                    return;
                }
                Head::TooLarge => {
                    let msg = "the request head is larger than 64 KiB";
                    lean::refuse(
                        sock,
                        http::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                        "header_too_large",
                        msg,
                    )
                    .await;
                    return;
                }
                Head::Watch(mut req) => {
                    req.extensions_mut().insert(ip);
                    // The body ends itself at shutdown; writes are bounded by the write timeout.
                    if let Err(e) = lean::serve(sock, req, router).await {
                        tracing::debug!(error = %e, %peer, "watch connection ended with an error");
                    }
                    return;
                }
                Head::Other(prefix) => prefix,
            };
            let io = TokioIo::new(Rewind::new(prefix, sock));
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                // Later heads of a keep-alive connection; the first was read above.
                .header_read_timeout(header_timeout)
                .serve_connection(io, svc);
            let mut conn = std::pin::pin!(conn);
            let result = tokio::select! {
                r = conn.as_mut() => r,
                _ = token.cancelled() => {
                    // Finish the request in flight; SSE bodies end themselves.
                    conn.as_mut().graceful_shutdown();
                    match tokio::time::timeout(grace, conn.as_mut()).await {
                        Ok(r) => r,
                        Err(_) => Ok(()),
                    }
                }
            };
            if let Err(e) = result {
                tracing::debug!(error = %e, %peer, "connection ended with an error");
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
