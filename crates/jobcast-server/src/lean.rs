//! The lean path for SSE watch requests.
//!
//! A watcher holds its connection for minutes or hours, so what a connection
//! costs while idle is what a node's capacity is made of. hyper keeps an
//! 8 KiB read buffer and a write buffer per connection for its whole life and
//! has no option to shrink them. So the accept loop reads the first request
//! head itself into a small buffer; a `GET …/events` asking for
//! `text/event-stream` is answered here — through the same axum router, so
//! every rule lives in one place — and its response is written by a minimal
//! HTTP/1.1 writer (status line, headers, chunked frames) that holds no
//! buffers of its own. Anything else goes to hyper, which first re-reads the
//! bytes already taken (see [`Rewind`]).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use axum::body::Body;
use bytes::{Buf, Bytes, BytesMut};
use http_body::Body as _;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tower::ServiceExt;

use crate::server::WriteTimeout;

/// Largest first request head read by the accept loop (lean path or not); a
/// larger one is answered 431 and closed.
const MAX_HEAD: usize = 64 * 1024;
/// Most headers parsed from a head.
const MAX_HEADERS: usize = 48;
/// What an HTTP/2 client with prior knowledge sends first (RFC 9113 §3.4).
pub(crate) const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What the first read of a connection found.
pub(crate) enum Head {
    /// A watch request, to be served by [`serve`].
    Watch(Box<http::Request<Body>>),
    /// A whole head of anything else: hand these bytes and the socket to hyper.
    Other(Bytes),
    /// The HTTP/2 connection preface (h2c with prior knowledge): hand these
    /// bytes and the socket to hyper's HTTP/2 server.
    H2(Bytes),
    /// The peer closed before sending anything.
    Gone,
    /// The head did not arrive whole within the header timeout; `partial`
    /// when some of it did (then it is answered 408).
    TimedOut {
        /// Whether any byte arrived.
        partial: bool,
    },
    /// The head is larger than [`MAX_HEAD`].
    TooLarge,
}

/// Reads the first request head, whole, within `timeout` — the one deadline
/// for that head, whichever path then serves it (hyper is handed a complete
/// head, so its own header timeout only applies to later requests of a
/// keep-alive connection). With `lean` off, every head goes to hyper.
pub(crate) async fn read_head<S: AsyncRead + Unpin>(
    sock: &mut S,
    timeout: Duration,
    lean: bool,
) -> Head {
    let mut buf = BytesMut::with_capacity(1024);
    let read = async {
        loop {
            match sock.read_buf(&mut buf).await {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
            let n = buf.len().min(H2_PREFACE.len());
            if buf[..n] == H2_PREFACE[..n] {
                if n == H2_PREFACE.len() {
                    return Some(Ok(Err(())));
                }
                // A part of the preface: read on.
                continue;
            }
            match parse(&buf) {
                Parsed::Partial if buf.len() < MAX_HEAD => continue,
                Parsed::Partial => return Some(Err(())),
                Parsed::Other => return Some(Ok(Ok(None))),
                Parsed::Watch(req) => return Some(Ok(Ok(Some(req)))),
            }
        }
    };
    match tokio::time::timeout(timeout, read).await {
        Ok(Some(Ok(Ok(Some(req))))) if lean => Head::Watch(req),
        Ok(Some(Ok(Ok(_)))) => Head::Other(buf.freeze()),
        Ok(Some(Ok(Err(())))) => Head::H2(buf.freeze()),
        Ok(Some(Err(()))) => Head::TooLarge,
        // Closed mid-head: hyper answers what it can of it (a 400).
        Ok(None) if !buf.is_empty() => Head::Other(buf.freeze()),
        Ok(None) => Head::Gone,
        Err(_) => Head::TimedOut {
            partial: !buf.is_empty(),
        },
    }
}

/// Writes a JSON error answer straight to the socket and closes it: for a
/// head that could not be read (408, 431), before any HTTP machinery.
pub(crate) async fn refuse<S: AsyncWrite + Unpin>(
    mut sock: S,
    status: http::StatusCode,
    code: &str,
    message: &str,
) {
    let body = serde_json::json!({ "error": { "code": code, "message": message } }).to_string();
    let head = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        status.as_str(),
        status.canonical_reason().unwrap_or(""),
        body.len()
    );
    let mut out = Bytes::from(head).chain(Bytes::from(body));
    // Best effort: the peer may be gone; the write timeout bounds a stalled one.
    if sock.write_all_buf(&mut out).await.is_ok() {
        let _ = sock.shutdown().await;
    }
}

/// Whether `buf` is a complete watch request head (for the fuzz target).
pub(crate) fn is_watch(buf: &[u8]) -> bool {
    matches!(parse(buf), Parsed::Watch(_))
}

enum Parsed {
    Partial,
    Other,
    Watch(Box<http::Request<Body>>),
}

/// Parses a head; only a complete, body-less `GET /v1/streams/…/events`
/// asking for SSE becomes a watch request.
fn parse(buf: &[u8]) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(_) => return Parsed::Other,
    };
    // Pipelined bytes after the head: leave the whole connection to hyper.
    if len != buf.len() || req.method != Some("GET") || req.version != Some(1) {
        return Parsed::Other;
    }
    let Some(target) = req.path else {
        return Parsed::Other;
    };
    let path = target.split('?').next().unwrap_or("");
    if !path.starts_with("/v1/streams/") || !path.ends_with("/events") {
        return Parsed::Other;
    }
    let mut builder = http::Request::get(target).version(http::Version::HTTP_11);
    let mut sse = false;
    for h in req.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("content-length") && h.value != b"0"
            || name.eq_ignore_ascii_case("transfer-encoding")
            || name.eq_ignore_ascii_case("upgrade")
        {
            return Parsed::Other;
        }
        if name.eq_ignore_ascii_case("accept")
            && h.value.windows(17).any(|w| w == b"text/event-stream")
        {
            sse = true;
        }
        let (Ok(n), Ok(v)) = (
            http::HeaderName::from_bytes(name.as_bytes()),
            http::HeaderValue::from_bytes(h.value),
        ) else {
            return Parsed::Other;
        };
        builder = builder.header(n, v);
    }
    if !sse {
        return Parsed::Other;
    }
    match builder.body(Body::empty()) {
        Ok(req) => Parsed::Watch(Box::new(req)),
        Err(_) => Parsed::Other,
    }
}

/// Answers one watch request through `router` and writes the response with
/// the minimal writer; the connection is closed afterwards.
pub(crate) async fn serve(
    mut sock: WriteTimeout<TcpStream>,
    req: Box<http::Request<Body>>,
    router: axum::Router,
) -> io::Result<()> {
    let res = match router.oneshot(*req).await {
        Ok(res) => res,
        Err(never) => match never {},
    };
    let (parts, body) = res.into_parts();
    let bodyless = parts.status == http::StatusCode::NO_CONTENT
        || parts.status == http::StatusCode::NOT_MODIFIED
        || parts.status.is_informational();
    let mut head = Vec::with_capacity(512);
    head.extend_from_slice(b"HTTP/1.1 ");
    head.extend_from_slice(parts.status.as_str().as_bytes());
    head.push(b' ');
    head.extend_from_slice(parts.status.canonical_reason().unwrap_or("").as_bytes());
    head.extend_from_slice(b"\r\n");
    for (name, value) in &parts.headers {
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"date: ");
    head.extend_from_slice(httpdate::fmt_http_date(SystemTime::now()).as_bytes());
    head.extend_from_slice(b"\r\nconnection: close\r\n");
    let chunked = !bodyless && parts.headers.get(http::header::CONTENT_LENGTH).is_none();
    if chunked {
        head.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    head.extend_from_slice(b"\r\n");
    drop(parts);
    let mut pending = Some(Bytes::from(head));
    if !bodyless {
        let mut body = body;
        let mut probe = [0u8; 64];
        loop {
            // Waiting for the next frame, also watch the socket: a peer that
            // closes is noticed at once, not at the next heartbeat. poll_fn
            // with poll_read_ready keeps one waker slot on the socket instead
            // of registering and removing a waiter for every frame.
            let frame = match std::future::poll_fn(|cx| {
                if let Poll::Ready(f) = Pin::new(&mut body).poll_frame(cx) {
                    return Poll::Ready(Ok(f));
                }
                match sock.get_ref().poll_read_ready(cx) {
                    Poll::Ready(r) => Poll::Ready(Err(r)),
                    Poll::Pending => Poll::Pending,
                }
            })
            .await
            {
                Ok(frame) => frame,
                Err(ready) => {
                    ready?;
                    match sock.get_ref().try_read(&mut probe) {
                        Ok(0) => return Ok(()),
                        // Bytes after the request: ignored; the connection closes after this response.
                        Ok(_) => continue,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                        Err(e) => return Err(e),
                    }
                }
            };
            let data = match frame {
                None => break,
                Some(Err(e)) => return Err(io::Error::other(e)),
                Some(Ok(f)) => match f.into_data() {
                    Ok(d) if d.is_empty() => continue,
                    Ok(d) => d,
                    Err(_) => continue, // trailers: none are sent
                },
            };
            if chunked {
                let mut size = [0u8; 18];
                let mut buf = pending
                    .take()
                    .unwrap_or_default()
                    .chain(chunk_size(data.len(), &mut size))
                    .chain(data)
                    .chain(&b"\r\n"[..]);
                // One vectored write per frame: header, events, trailer.
                sock.write_all_buf(&mut buf).await?;
            } else {
                let mut buf = pending.take().unwrap_or_default().chain(data);
                sock.write_all_buf(&mut buf).await?;
            }
        }
    }
    let mut tail = pending
        .take()
        .unwrap_or_default()
        .chain(if chunked && !bodyless {
            Bytes::from_static(b"0\r\n\r\n")
        } else {
            Bytes::new()
        });
    sock.write_all_buf(&mut tail).await?;
    sock.flush().await?;
    sock.shutdown().await
}

/// Writes `{len:x}\r\n` into `buf` without allocating.
fn chunk_size(len: usize, buf: &mut [u8; 18]) -> &[u8] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut i = 16;
    let mut n = len;
    loop {
        i -= 1;
        buf[i] = HEX[n & 0xf];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    buf[16] = b'\r';
    buf[17] = b'\n';
    &buf[i..]
}

/// A socket that first yields bytes already read from it, so that hyper can
/// parse a request head the accept loop looked at.
#[derive(Debug)]
pub(crate) struct Rewind<T> {
    prefix: Bytes,
    inner: T,
}

impl<T> Rewind<T> {
    /// Wraps `inner`, replaying `prefix` first.
    pub(crate) fn new(prefix: Bytes, inner: T) -> Self {
        Rewind { prefix, inner }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Rewind<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Rewind<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn watch(head: &str) -> bool {
        matches!(parse(head.as_bytes()), Parsed::Watch(_))
    }

    /// The HTTP/2 preface is recognised even when it arrives in pieces, and
    /// the bytes read are handed on whole; a look-alike is HTTP/1.1.
    #[tokio::test]
    async fn the_h2_preface_is_recognised_in_pieces() {
        use tokio::io::AsyncWriteExt;
        let (mut client, mut server) = tokio::io::duplex(1024);
        let reader =
            tokio::spawn(
                async move { read_head(&mut server, Duration::from_secs(10), true).await },
            );
        client.write_all(b"PRI * HTTP/2").await.unwrap();
        tokio::task::yield_now().await;
        client
            .write_all(b".0\r\n\r\nSM\r\n\r\n\x00\x00")
            .await
            .unwrap();
        match reader.await.unwrap() {
            Head::H2(bytes) => {
                assert!(bytes.starts_with(H2_PREFACE));
                assert!(bytes.len() >= H2_PREFACE.len());
            }
            _ => panic!("not taken for HTTP/2"),
        }
        let (mut client, mut server) = tokio::io::duplex(1024);
        client
            .write_all(b"PRI /x HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .unwrap();
        assert!(matches!(
            read_head(&mut server, Duration::from_secs(10), true).await,
            Head::Other(_)
        ));
    }

    #[test]
    fn chunk_sizes_are_hex() {
        let mut b = [0u8; 18];
        assert_eq!(chunk_size(0, &mut b), b"0\r\n");
        assert_eq!(chunk_size(255, &mut b), b"ff\r\n");
        assert_eq!(chunk_size(0x1234abcd, &mut b), b"1234abcd\r\n");
        assert_eq!(chunk_size(usize::MAX, &mut b), b"ffffffffffffffff\r\n");
    }

    #[test]
    fn only_complete_bodyless_sse_gets_become_lean() {
        let ok = "GET /v1/streams/a/events?from=live HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\nLast-Event-ID: e-1\r\n\r\n";
        assert!(watch(ok));
        match parse(ok.as_bytes()) {
            Parsed::Watch(r) => {
                assert_eq!(r.uri(), "/v1/streams/a/events?from=live");
                assert_eq!(r.headers()["last-event-id"], "e-1");
            }
            _ => unreachable!(),
        }
        assert!(matches!(parse(&ok.as_bytes()[..30]), Parsed::Partial));
        assert!(!watch(
            "GET /v1/streams/a/events HTTP/1.1\r\nAccept: application/json\r\n\r\n"
        ));
        assert!(!watch(
            "POST /v1/streams/a/events HTTP/1.1\r\nAccept: text/event-stream\r\n\r\n"
        ));
        assert!(!watch(
            "GET /v1/streams/a HTTP/1.1\r\nAccept: text/event-stream\r\n\r\n"
        ));
        assert!(!watch(
            "GET /v1/streams/a/events HTTP/1.0\r\nAccept: text/event-stream\r\n\r\n"
        ));
        assert!(!watch(
            "GET /v1/streams/a/events HTTP/1.1\r\nAccept: text/event-stream\r\nContent-Length: 3\r\n\r\n"
        ));
        // Pipelined bytes after the head go to hyper with the rest.
        assert!(!watch(&format!("{ok}GET / HTTP/1.1\r\n\r\n")));
        assert!(matches!(parse(b"\x00\x01garbage\r\n\r\n"), Parsed::Other));
    }
}
