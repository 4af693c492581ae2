//! A deliberately small HTTP/1.1 client for the benchmarks: raw tokio
//! sockets, httparse for the response head, and a hand-written chunked
//! decoder. It costs a few hundred bytes per connection plus its read buffer,
//! so the figures measure the server, not the client.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// The largest response head we accept.
const MAX_HEAD: usize = 64 * 1024;

/// Where to connect, and from which source addresses.
#[derive(Debug)]
pub(super) struct Endpoint {
    /// The server's address.
    pub(super) addr: SocketAddr,
    /// The `Host` header value.
    pub(super) host: String,
    /// Source addresses to rotate over (empty: let the kernel choose).
    sources: Vec<IpAddr>,
}

impl Endpoint {
    /// Resolves `http://HOST:PORT` (a path, if any, is ignored).
    pub(super) async fn resolve(url: &str) -> Result<Self> {
        let rest = url
            .strip_prefix("http://")
            .with_context(|| format!("{url}: only http:// URLs are supported"))?;
        let host = rest.split('/').next().unwrap_or(rest).to_owned();
        if host.is_empty() {
            bail!("{url}: no host");
        }
        let with_port = if host
            .rsplit_once(':')
            .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
        {
            host.clone()
        } else {
            format!("{host}:80")
        };
        let addr = tokio::net::lookup_host(&with_port)
            .await
            .with_context(|| format!("resolving {with_port}"))?
            .next()
            .with_context(|| format!("{with_port} resolves to nothing"))?;
        Ok(Self {
            addr,
            host,
            sources: Vec::new(),
        })
    }

    /// Rotates client sockets over `count` loopback source addresses
    /// (127.0.0.1, 127.0.0.2, …), each with its own ephemeral port range.
    /// Only for a loopback server; `count <= 1` lets the kernel choose.
    pub(super) fn with_sources(mut self, count: u32) -> Result<Self> {
        if count > 1 {
            if !self.addr.ip().is_loopback() || !self.addr.is_ipv4() {
                bail!(
                    "--source-ips needs an IPv4 loopback server, not {}",
                    self.addr
                );
            }
            if count > 254 {
                bail!("--source-ips is at most 254");
            }
            self.sources = (1..=count)
                .map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, 0, i as u8)))
                .collect();
        }
        Ok(self)
    }

    /// How many source addresses are used (1 when the kernel chooses).
    pub(super) fn source_count(&self) -> usize {
        self.sources.len().max(1)
    }

    /// Opens connection number `i` (which picks its source address).
    pub(super) async fn connect(&self, i: usize) -> io::Result<TcpStream> {
        let stream = if self.sources.is_empty() {
            TcpStream::connect(self.addr).await?
        } else {
            let socket = TcpSocket::new_v4()?;
            // A port of ours still in TIME_WAIT from an earlier run may be bound again.
            socket.set_reuseaddr(true)?;
            socket.bind(SocketAddr::new(self.sources[i % self.sources.len()], 0))?;
            socket.connect(self.addr).await?
        };
        stream.set_nodelay(true)?;
        Ok(stream)
    }
}

/// How a response body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Framing {
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// `Content-Length: n`.
    Length(u64),
    /// Neither: the body runs until the server closes (nchan's EventSource).
    Close,
    /// No body at all (204, 304, 1xx).
    Empty,
}

/// A parsed response head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Head {
    /// The status code.
    pub(super) status: u16,
    /// How the body is delimited.
    pub(super) framing: Framing,
    /// The server will close after this response.
    pub(super) close: bool,
}

/// Parses a response head at the start of `buf`: `Ok(None)` when more bytes
/// are needed, else the head and its length in bytes.
pub(super) fn parse_head(buf: &[u8]) -> Result<Option<(Head, usize)>> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut res = httparse::Response::new(&mut headers);
    let len = match res.parse(buf).context("malformed response head")? {
        httparse::Status::Partial => return Ok(None),
        httparse::Status::Complete(n) => n,
    };
    let status = res.code.context("response head without status")?;
    let http10 = res.version == Some(0);
    let mut framing = Framing::Close;
    let mut close = http10;
    for h in res.headers.iter() {
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            if std::str::from_utf8(h.value)
                .unwrap_or("")
                .to_ascii_lowercase()
                .contains("chunked")
            {
                framing = Framing::Chunked;
            }
        } else if h.name.eq_ignore_ascii_case("content-length") && framing != Framing::Chunked {
            let n = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .context("malformed Content-Length")?;
            framing = Framing::Length(n);
        } else if h.name.eq_ignore_ascii_case("connection") {
            let v = std::str::from_utf8(h.value)
                .unwrap_or("")
                .to_ascii_lowercase();
            if v.contains("close") {
                close = true;
            } else if v.contains("keep-alive") {
                close = false;
            }
        }
    }
    if status == 204 || status == 304 || (100..200).contains(&status) {
        framing = Framing::Empty;
    }
    if framing == Framing::Close {
        close = true;
    }
    Ok(Some((
        Head {
            status,
            framing,
            close,
        },
        len,
    )))
}

/// Reads from `stream` into `buf` until a whole response head is there.
/// Returns the head; `buf` keeps only the body bytes read past it.
pub(super) async fn read_head(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Result<Head> {
    loop {
        if let Some((head, len)) = parse_head(buf)? {
            buf.drain(..len);
            return Ok(head);
        }
        if buf.len() >= MAX_HEAD {
            bail!("response head larger than {MAX_HEAD} bytes");
        }
        buf.reserve(4096);
        let n = stream
            .read_buf(buf)
            .await
            .context("reading the response head")?;
        if n == 0 {
            bail!("connection closed before a response head");
        }
    }
}

/// An error in chunked framing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ChunkError {
    /// A chunk size that is not hexadecimal.
    BadSize,
    /// A chunk size above 2^60.
    SizeOverflow,
    /// Chunk data not followed by CRLF.
    MissingCrlf,
}

impl std::fmt::Display for ChunkError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::BadSize => "malformed chunk size",
            Self::SizeOverflow => "chunk size too large",
            Self::MissingCrlf => "chunk data not followed by CRLF",
        })
    }
}

impl std::error::Error for ChunkError {}

/// Where the chunked decoder is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    /// Reading hex digits of a chunk size (`any`: at least one seen).
    Size { value: u64, any: bool },
    /// Skipping a chunk extension (`;name=value`) or whitespace up to the line end.
    Ext { value: u64 },
    /// Saw CR after the size line; LF must follow.
    SizeLf { value: u64 },
    /// Inside chunk data, this many bytes to go.
    Data(u64),
    /// After chunk data: CR (or a bare LF) must follow.
    DataCr,
    /// After chunk data and CR: LF must follow.
    DataLf,
    /// After the last chunk, at the start of a trailer line.
    TrailerStart,
    /// Inside a trailer field line.
    TrailerLine,
    /// Saw CR on an empty trailer line: LF ends the body.
    TrailerEndLf,
    /// The body is complete.
    Done,
}

/// A sans-IO decoder of `Transfer-Encoding: chunked`: feed bytes of any
/// split, get the payload slices. Bare LF is accepted where CRLF belongs.
#[derive(Debug, Clone)]
pub(super) struct ChunkedDecoder {
    state: ChunkState,
}

impl Default for ChunkedDecoder {
    fn default() -> Self {
        Self {
            state: ChunkState::Size {
                value: 0,
                any: false,
            },
        }
    }
}

impl ChunkedDecoder {
    /// Whether the terminating chunk and trailer were read.
    pub(super) fn is_done(&self) -> bool {
        self.state == ChunkState::Done
    }

    /// Decodes `input`, handing every payload slice to `sink`. Returns how
    /// many bytes were consumed: all of them, unless the body ended inside
    /// `input` (the rest is the next response).
    pub(super) fn feed<'a>(
        &mut self,
        input: &'a [u8],
        mut sink: impl FnMut(&'a [u8]),
    ) -> Result<usize, ChunkError> {
        let mut i = 0;
        while i < input.len() {
            let b = input[i];
            self.state = match self.state {
                ChunkState::Size { value, any } => match hex(b) {
                    Some(d) => {
                        if value >> 60 != 0 {
                            return Err(ChunkError::SizeOverflow);
                        }
                        ChunkState::Size {
                            value: value << 4 | u64::from(d),
                            any: true,
                        }
                    }
                    None if !any => return Err(ChunkError::BadSize),
                    None => match b {
                        b'\r' => ChunkState::SizeLf { value },
                        b'\n' => after_size(value),
                        b';' | b' ' | b'\t' => ChunkState::Ext { value },
                        _ => return Err(ChunkError::BadSize),
                    },
                },
                ChunkState::Ext { value } => match b {
                    b'\r' => ChunkState::SizeLf { value },
                    b'\n' => after_size(value),
                    _ => ChunkState::Ext { value },
                },
                ChunkState::SizeLf { value } => match b {
                    b'\n' => after_size(value),
                    _ => return Err(ChunkError::BadSize),
                },
                ChunkState::Data(left) => {
                    let take = (input.len() - i).min(usize::try_from(left).unwrap_or(usize::MAX));
                    sink(&input[i..i + take]);
                    i += take;
                    let left = left - take as u64;
                    self.state = if left == 0 {
                        ChunkState::DataCr
                    } else {
                        ChunkState::Data(left)
                    };
                    continue;
                }
                ChunkState::DataCr => match b {
                    b'\r' => ChunkState::DataLf,
                    b'\n' => ChunkState::Size {
                        value: 0,
                        any: false,
                    },
                    _ => return Err(ChunkError::MissingCrlf),
                },
                ChunkState::DataLf => match b {
                    b'\n' => ChunkState::Size {
                        value: 0,
                        any: false,
                    },
                    _ => return Err(ChunkError::MissingCrlf),
                },
                ChunkState::TrailerStart => match b {
                    b'\r' => ChunkState::TrailerEndLf,
                    b'\n' => ChunkState::Done,
                    _ => ChunkState::TrailerLine,
                },
                ChunkState::TrailerLine => match b {
                    b'\n' => ChunkState::TrailerStart,
                    _ => ChunkState::TrailerLine,
                },
                ChunkState::TrailerEndLf => match b {
                    b'\n' => ChunkState::Done,
                    _ => return Err(ChunkError::MissingCrlf),
                },
                ChunkState::Done => return Ok(i),
            };
            i += 1;
        }
        Ok(i)
    }
}

/// The state after a complete size line.
fn after_size(value: u64) -> ChunkState {
    if value == 0 {
        ChunkState::TrailerStart
    } else {
        ChunkState::Data(value)
    }
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Turns the bytes of a response body, as read from the socket, into payload
/// bytes, whatever the framing.
#[derive(Debug, Clone)]
pub(super) enum BodyDecoder {
    /// Chunked transfer coding.
    Chunked(ChunkedDecoder),
    /// A known length, this many bytes to go.
    Length(u64),
    /// Until the connection closes.
    Close,
}

impl BodyDecoder {
    /// The decoder for a response's framing.
    pub(super) fn new(framing: Framing) -> Self {
        match framing {
            Framing::Chunked => Self::Chunked(ChunkedDecoder::default()),
            Framing::Length(n) => Self::Length(n),
            Framing::Empty => Self::Length(0),
            Framing::Close => Self::Close,
        }
    }

    /// Whether the body is complete (never for [`BodyDecoder::Close`]).
    pub(super) fn is_done(&self) -> bool {
        match self {
            Self::Chunked(c) => c.is_done(),
            Self::Length(n) => *n == 0,
            Self::Close => false,
        }
    }

    /// Decodes `input`, handing payload slices to `sink`; returns the bytes consumed.
    pub(super) fn feed<'a>(
        &mut self,
        input: &'a [u8],
        mut sink: impl FnMut(&'a [u8]),
    ) -> Result<usize, ChunkError> {
        match self {
            Self::Chunked(c) => c.feed(input, sink),
            Self::Length(left) => {
                let take = input
                    .len()
                    .min(usize::try_from(*left).unwrap_or(usize::MAX));
                if take > 0 {
                    sink(&input[..take]);
                }
                *left -= take as u64;
                Ok(take)
            }
            Self::Close => {
                if !input.is_empty() {
                    sink(input);
                }
                Ok(input.len())
            }
        }
    }
}

/// A response read whole.
#[derive(Debug)]
pub(super) struct Response {
    /// The status code.
    pub(super) status: u16,
    /// The body.
    pub(super) body: Vec<u8>,
}

/// One keep-alive connection for requests with small answers (publishing,
/// creating streams). Reconnects when the server closed it.
#[derive(Debug)]
pub(super) struct Conn {
    endpoint: Arc<Endpoint>,
    index: usize,
    stream: Option<TcpStream>,
    buf: Vec<u8>,
    req: Vec<u8>,
}

impl Conn {
    /// A connection (opened at the first request) using source address `index`.
    pub(super) fn new(endpoint: Arc<Endpoint>, index: usize) -> Self {
        Self {
            endpoint,
            index,
            stream: None,
            buf: Vec::with_capacity(4096),
            req: Vec::with_capacity(1024),
        }
    }

    /// Sends one request and reads the whole answer.
    pub(super) async fn request(
        &mut self,
        method: &str,
        path: &str,
        content_type: Option<&str>,
        body: &[u8],
    ) -> Result<Response> {
        let result = self.exchange(method, path, content_type, body).await;
        if result.is_err() {
            // The connection is in an unknown state: never reuse it.
            self.stream = None;
        }
        result.with_context(|| format!("{method} {path}"))
    }

    async fn exchange(
        &mut self,
        method: &str,
        path: &str,
        content_type: Option<&str>,
        body: &[u8],
    ) -> Result<Response> {
        let stream = match &mut self.stream {
            Some(s) => s,
            None => {
                let s = self
                    .endpoint
                    .connect(self.index)
                    .await
                    .with_context(|| format!("connecting to {}", self.endpoint.addr))?;
                self.buf.clear();
                self.stream.insert(s)
            }
        };
        self.req.clear();
        self.req.extend_from_slice(method.as_bytes());
        self.req.push(b' ');
        self.req.extend_from_slice(path.as_bytes());
        self.req.extend_from_slice(b" HTTP/1.1\r\nHost: ");
        self.req.extend_from_slice(self.endpoint.host.as_bytes());
        if let Some(ct) = content_type {
            self.req.extend_from_slice(b"\r\nContent-Type: ");
            self.req.extend_from_slice(ct.as_bytes());
        }
        self.req.extend_from_slice(b"\r\nContent-Length: ");
        self.req
            .extend_from_slice(body.len().to_string().as_bytes());
        self.req.extend_from_slice(b"\r\n\r\n");
        self.req.extend_from_slice(body);
        stream.write_all(&self.req).await.context("sending")?;

        let head = read_head(stream, &mut self.buf).await?;
        let mut decoder = BodyDecoder::new(head.framing);
        let mut out = Vec::new();
        loop {
            let used = decoder
                .feed(&self.buf, |b| out.extend_from_slice(b))
                .context("decoding the body")?;
            self.buf.drain(..used);
            if decoder.is_done() {
                break;
            }
            self.buf.reserve(4096);
            let n = stream
                .read_buf(&mut self.buf)
                .await
                .context("reading the body")?;
            if n == 0 {
                if matches!(decoder, BodyDecoder::Close) {
                    break;
                }
                bail!("connection closed inside the body");
            }
        }
        if head.close || !self.buf.is_empty() {
            // Closing, or bytes we did not ask for: start afresh next time.
            self.stream = None;
        }
        Ok(Response {
            status: head.status,
            body: out,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_split(input: &[u8], split: usize) -> (Result<usize, ChunkError>, Vec<u8>, bool) {
        let mut d = ChunkedDecoder::default();
        let mut out = Vec::new();
        let (a, b) = input.split_at(split);
        let r1 = d.feed(a, |s| out.extend_from_slice(s));
        let r = match r1 {
            Ok(n) if n == a.len() => d.feed(b, |s| out.extend_from_slice(s)).map(|m| n + m),
            other => other,
        };
        (r, out, d.is_done())
    }

    #[test]
    fn chunked_any_split() {
        let input = b"5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\nX-Trailer: 1\r\n\r\n";
        for split in 0..=input.len() {
            let (r, out, done) = decode_split(input, split);
            assert_eq!(r, Ok(input.len()), "split at {split}");
            assert_eq!(out, b"hello, world", "split at {split}");
            assert!(done, "split at {split}");
        }
    }

    #[test]
    fn chunked_hex_sizes_and_bare_lf() {
        let mut body = b"1A\n".to_vec();
        body.extend_from_slice(&[b'x'; 26]);
        body.extend_from_slice(b"\n0\n\n");
        let (r, out, done) = decode_split(&body, 3);
        assert_eq!(r, Ok(body.len()));
        assert_eq!(out.len(), 26);
        assert!(done);
    }

    #[test]
    fn chunked_stops_at_end_of_body() {
        let input = b"3\r\nabc\r\n0\r\n\r\nHTTP/1.1 200 OK";
        let mut d = ChunkedDecoder::default();
        let mut out = Vec::new();
        let n = d.feed(input, |s| out.extend_from_slice(s)).unwrap();
        assert_eq!(&input[n..], b"HTTP/1.1 200 OK");
        assert_eq!(out, b"abc");
        assert!(d.is_done());
    }

    #[test]
    fn chunked_not_done_midway() {
        let mut d = ChunkedDecoder::default();
        let mut out = Vec::new();
        d.feed(b"4\r\nab", |s| out.extend_from_slice(s)).unwrap();
        assert!(!d.is_done());
        assert_eq!(out, b"ab");
    }

    #[test]
    fn chunked_errors() {
        let mut d = ChunkedDecoder::default();
        assert_eq!(d.feed(b"zz\r\n", |_| {}), Err(ChunkError::BadSize));
        let mut d = ChunkedDecoder::default();
        assert_eq!(d.feed(b"\r\n", |_| {}), Err(ChunkError::BadSize));
        let mut d = ChunkedDecoder::default();
        assert_eq!(d.feed(b"2\r\nabX", |_| {}), Err(ChunkError::MissingCrlf));
        let mut d = ChunkedDecoder::default();
        assert_eq!(
            d.feed(b"11111111111111111\r\n", |_| {}),
            Err(ChunkError::SizeOverflow)
        );
    }

    #[test]
    fn head_framings() {
        let input: &[u8] =
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: text/event-stream\r\n\r\nrest";
        let (h, n) = parse_head(input).unwrap().unwrap();
        assert_eq!(h.status, 200);
        assert_eq!(h.framing, Framing::Chunked);
        assert!(!h.close);
        assert_eq!(&input[n..], b"rest");

        let (h, _) = parse_head(b"HTTP/1.1 201 Created\r\nContent-Length: 10\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(h.framing, Framing::Length(10));
        assert!(!h.close);

        // nchan's EventSource answer: neither length nor chunked.
        let (h, _) = parse_head(b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(h.framing, Framing::Close);
        assert!(h.close);

        let (h, _) = parse_head(b"HTTP/1.1 204 No Content\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(h.framing, Framing::Empty);

        assert!(parse_head(b"HTTP/1.1 200 OK\r\nContent-")
            .unwrap()
            .is_none());
        assert!(parse_head(b"NOT HTTP\r\n\r\n").is_err());
    }

    #[test]
    fn body_decoder_length_and_close() {
        let mut d = BodyDecoder::new(Framing::Length(3));
        let mut out = Vec::new();
        assert_eq!(d.feed(b"abcdef", |s| out.extend_from_slice(s)), Ok(3));
        assert!(d.is_done());
        assert_eq!(out, b"abc");

        let mut d = BodyDecoder::new(Framing::Close);
        let mut out = Vec::new();
        assert_eq!(d.feed(b"abc", |s| out.extend_from_slice(s)), Ok(3));
        assert!(!d.is_done());
    }
}
