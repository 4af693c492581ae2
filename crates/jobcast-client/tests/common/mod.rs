//! Test utilities: a real server on 127.0.0.1 (restartable on the same
//! address and store), a fault-injecting TCP proxy, and a scripted HTTP
//! server for protocol cases a real server never produces. Loopback only;
//! every loop is bounded.
#![allow(dead_code, unreachable_pub, missing_docs)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use jobcast_client::{Client, Error, Item, Watch};
use jobcast_server::{Config, Jobcast};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

/// The longest any single test step may take before the test fails.
pub const T: Duration = Duration::from_secs(30);

/// A client with fast retries, for tests.
pub fn fast_client(url: &str) -> Client {
    Client::builder(url)
        .backoff(Duration::from_millis(5), Duration::from_millis(100))
        .give_up_after(Duration::from_secs(20))
        .read_timeout(Duration::from_secs(10))
        .build()
        .expect("client")
}

/// Collects a watch's items until it ends, failing the test after `timeout`.
pub async fn collect(watch: &mut Watch, timeout: Duration) -> Vec<Result<Item, Error>> {
    let mut items = Vec::new();
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match tokio::time::timeout_at(deadline, watch.next()).await {
            Ok(Some(item)) => items.push(item),
            Ok(None) => return items,
            Err(_) => panic!(
                "the watch did not end within {timeout:?}; {} items so far, last: {:?}",
                items.len(),
                items.last()
            ),
        }
    }
}

// ---------------------------------------------------------------- server

/// A real jobcast server in this process, on 127.0.0.1, with a SQLite file
/// in a temporary directory. It can be stopped and started again on the same
/// address and store.
pub struct TestServer {
    pub addr: SocketAddr,
    pub url: String,
    pub config: Config,
    dir: tempfile::TempDir,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<JoinHandle<std::io::Result<()>>>,
}

impl TestServer {
    pub async fn start() -> TestServer {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(f: impl FnOnce(&mut Config)) -> TestServer {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = Config {
            db: format!("sqlite://{}", dir.path().join("jobcast.db").display()),
            retry: Duration::from_millis(20),
            shutdown_grace: Duration::from_secs(2),
            ..Config::default()
        };
        f(&mut config);
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mut s = TestServer {
            addr,
            url: format!("http://{addr}"),
            config,
            dir,
            stop: None,
            task: None,
        };
        s.serve(listener).await;
        s
    }

    async fn serve(&mut self, listener: TcpListener) {
        let server = Jobcast::open(self.config.clone())
            .await
            .expect("open store");
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        self.stop = Some(tx);
        self.task = Some(tokio::spawn(server.serve(listener, async {
            let _ = rx.await;
        })));
    }

    /// Shuts down gracefully (watchers get `shutting_down`) and waits for it.
    pub async fn stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            tokio::time::timeout(T, t)
                .await
                .expect("server stops in time")
                .expect("join")
                .expect("serve");
        }
    }

    /// Starts again on the same address and store.
    pub async fn start_again(&mut self) {
        assert!(self.task.is_none(), "stop first");
        // The port was just released; binding may briefly fail.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(e) if tokio::time::Instant::now() < deadline => {
                    eprintln!("rebinding {}: {e}", self.addr);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("cannot bind {} again: {e}", self.addr),
            }
        };
        self.serve(listener).await;
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

// ---------------------------------------------------------------- proxy

struct ProxyShared {
    target: SocketAddr,
    rng: Mutex<StdRng>,
    /// Each new connection is cut after a random number of server→client
    /// bytes drawn from this range (inclusive).
    cut_after: Mutex<Option<(u64, u64)>>,
    /// The next N answers are lost: the request reaches the server, and the
    /// connection is closed as soon as bytes of the answer arrive.
    drop_responses: AtomicUsize,
    connections: AtomicUsize,
    cuts: AtomicUsize,
    dropped_responses: AtomicUsize,
    cut_all: tokio::sync::watch::Sender<u64>,
}

/// A TCP proxy on 127.0.0.1 in front of a server, that cuts connections at
/// random byte counts (fixed-seed PRNG), all at once on command, or right
/// after the server started answering.
pub struct Proxy {
    pub addr: SocketAddr,
    pub url: String,
    shared: Arc<ProxyShared>,
    task: JoinHandle<()>,
}

impl Proxy {
    pub async fn start(target: SocketAddr, seed: u64) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("addr");
        let shared = Arc::new(ProxyShared {
            target,
            rng: Mutex::new(StdRng::seed_from_u64(seed)),
            cut_after: Mutex::new(None),
            drop_responses: AtomicUsize::new(0),
            connections: AtomicUsize::new(0),
            cuts: AtomicUsize::new(0),
            dropped_responses: AtomicUsize::new(0),
            cut_all: tokio::sync::watch::channel(0).0,
        });
        let s = shared.clone();
        let task = tokio::spawn(async move {
            // Dropped (and so aborted) with the accept task when the proxy goes.
            let mut conns = JoinSet::new();
            loop {
                tokio::select! {
                    r = listener.accept() => {
                        let Ok((sock, _)) = r else { continue };
                        conns.spawn(pipe(sock, s.clone()));
                    }
                    // Reap finished connections so the set stays small.
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                }
            }
        });
        Proxy {
            addr,
            url: format!("http://{addr}"),
            shared,
            task,
        }
    }

    /// Cuts every new connection after a random number of bytes in `min..=max` (server→client).
    pub fn cut_randomly(&self, min: u64, max: u64) {
        *self.shared.cut_after.lock().unwrap() = Some((min, max));
    }

    /// Stops cutting at random.
    pub fn stop_cutting(&self) {
        *self.shared.cut_after.lock().unwrap() = None;
    }

    /// Closes every open connection now.
    pub fn cut_all(&self) {
        self.shared.cut_all.send_modify(|g| *g += 1);
    }

    /// The next `n` answers from the server (on any connection) are lost, and their connections closed.
    pub fn drop_next_responses(&self, n: usize) {
        self.shared.drop_responses.store(n, Ordering::SeqCst);
    }

    pub fn connections(&self) -> usize {
        self.shared.connections.load(Ordering::SeqCst)
    }

    pub fn cuts(&self) -> usize {
        self.shared.cuts.load(Ordering::SeqCst)
    }

    pub fn dropped_responses(&self) -> usize {
        self.shared.dropped_responses.load(Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Forwards one connection until either side closes or the proxy cuts it.
async fn pipe(client: TcpStream, shared: Arc<ProxyShared>) {
    let mut cut = shared.cut_all.subscribe();
    let Ok(server) = TcpStream::connect(shared.target).await else {
        return; // dropping `client` refuses the connection
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    shared.connections.fetch_add(1, Ordering::SeqCst);
    let budget = shared
        .cut_after
        .lock()
        .unwrap()
        .map(|(lo, hi)| shared.rng.lock().unwrap().random_range(lo..=hi));
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let up = tokio::io::copy(&mut cr, &mut sw);
    let down = async {
        let mut sent = 0u64;
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match sr.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let drop_response = shared
                .drop_responses
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok();
            if drop_response {
                shared.dropped_responses.fetch_add(1, Ordering::SeqCst);
                return;
            }
            if let Some(budget) = budget {
                if sent + n as u64 >= budget {
                    let keep = (budget - sent) as usize;
                    let _ = cw.write_all(&buf[..keep]).await;
                    shared.cuts.fetch_add(1, Ordering::SeqCst);
                    return;
                }
            }
            if cw.write_all(&buf[..n]).await.is_err() {
                return;
            }
            sent += n as u64;
        }
    };
    // Whichever ends first ends the connection: both sockets are dropped.
    tokio::select! {
        _ = up => {}
        _ = down => {}
        _ = cut.changed() => { shared.cuts.fetch_add(1, Ordering::SeqCst); }
    }
}

// ---------------------------------------------------------------- scripted server

/// A request as the scripted server saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub target: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// One scripted answer.
#[derive(Debug, Clone)]
pub struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// Close the connection without answering.
    hang_up: bool,
    /// Keep the connection open this long after the body (a stalled stream).
    hold: Duration,
    /// Write the body in chunks of this size.
    chunk: usize,
}

impl Reply {
    pub fn status(status: u16) -> Reply {
        Reply {
            status,
            headers: Vec::new(),
            body: Vec::new(),
            hang_up: false,
            hold: Duration::ZERO,
            chunk: usize::MAX,
        }
    }

    /// 200 `text/event-stream` with this body, then close.
    pub fn sse(body: impl Into<Vec<u8>>) -> Reply {
        let mut r = Reply::status(200).header("content-type", "text/event-stream");
        r.body = body.into();
        r
    }

    pub fn json(status: u16, body: &str) -> Reply {
        let mut r = Reply::status(status).header("content-type", "application/json");
        r.body = body.as_bytes().to_vec();
        r
    }

    /// An API error body.
    pub fn error(status: u16, code: &str) -> Reply {
        Reply::json(
            status,
            &format!(r#"{{"error":{{"code":"{code}","message":"scripted {code}"}}}}"#),
        )
    }

    /// Close the connection after reading the request, without answering.
    pub fn hang_up() -> Reply {
        let mut r = Reply::status(0);
        r.hang_up = true;
        r
    }

    pub fn header(mut self, k: &str, v: &str) -> Reply {
        self.headers.push((k.to_owned(), v.to_owned()));
        self
    }

    pub fn hold(mut self, d: Duration) -> Reply {
        self.hold = d;
        self
    }

    pub fn chunked(mut self, size: usize) -> Reply {
        self.chunk = size.max(1);
        self
    }
}

/// An HTTP/1.1 server on 127.0.0.1 that answers the n-th request with the
/// n-th scripted reply (one request per connection), then with `fallback`.
pub struct Scripted {
    pub url: String,
    seen: Arc<Mutex<Vec<Seen>>>,
    task: JoinHandle<()>,
}

impl Scripted {
    pub async fn start(script: Vec<Reply>, fallback: Reply) -> Scripted {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let s = seen.clone();
        let task = tokio::spawn(async move {
            let mut conns = JoinSet::new();
            loop {
                tokio::select! {
                    r = listener.accept() => {
                        let Ok((sock, _)) = r else { continue };
                        let (seen, script, fallback) = (s.clone(), script.clone(), fallback.clone());
                        conns.spawn(async move {
                            let _ = serve_one(sock, seen, &script, &fallback).await;
                        });
                    }
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                }
            }
        });
        Scripted { url, seen, task }
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for Scripted {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve_one(
    mut sock: TcpStream,
    seen: Arc<Mutex<Vec<Seen>>>,
    script: &[Reply],
    fallback: &Reply,
) -> std::io::Result<()> {
    let _ = sock.set_nodelay(true);
    let mut buf = Vec::new();
    let mut tmp = [0u8; 4096];
    let head_end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
        if buf.len() > 64 * 1024 {
            return Ok(());
        }
        let n = sock.read(&mut tmp).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&tmp[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let mut request_line = lines.next().unwrap_or("").split(' ');
    let method = request_line.next().unwrap_or("").to_owned();
    let target = request_line.next().unwrap_or("").to_owned();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let len: usize = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = buf[head_end..].to_vec();
    while body.len() < len {
        let n = sock.read(&mut tmp).await?;
        if n == 0 {
            break;
        }
        body.extend_from_slice(&tmp[..n]);
    }
    let index = {
        let mut seen = seen.lock().unwrap();
        seen.push(Seen {
            method,
            target,
            headers,
            body,
        });
        seen.len() - 1
    };
    let reply = script.get(index).unwrap_or(fallback);
    if reply.hang_up {
        return Ok(());
    }
    let mut head = format!(
        "HTTP/1.1 {} Scripted\r\nconnection: close\r\n",
        reply.status
    );
    for (k, v) in &reply.headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    let is_sse = reply
        .headers
        .iter()
        .any(|(k, v)| k == "content-type" && v.starts_with("text/event-stream"));
    if !is_sse && reply.status != 204 && reply.status != 304 {
        head.push_str(&format!("content-length: {}\r\n", reply.body.len()));
    }
    head.push_str("\r\n");
    sock.write_all(head.as_bytes()).await?;
    for chunk in reply.body.chunks(reply.chunk.min(reply.body.len().max(1))) {
        sock.write_all(chunk).await?;
        sock.flush().await?;
        if reply.chunk != usize::MAX {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    if !reply.hold.is_zero() {
        tokio::time::sleep(reply.hold).await;
    }
    sock.shutdown().await
}
