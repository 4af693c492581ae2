//! Test utilities: a real server on 127.0.0.1:0 with a real SQLite file, and
//! a real HTTP client with an SSE reader built on the protocol's decoder.
#![allow(dead_code, unreachable_pub, missing_docs)]

use std::time::Duration;

use futures::StreamExt;
use jobcast_protocol::decode::{Decoder, Frame, SseEvent};
use jobcast_server::{Config, Jobcast};
use serde_json::Value;

/// A running server; shut down when dropped.
pub struct TestServer {
    pub url: String,
    pub client: reqwest::Client,
    pub server: Jobcast,
    pub dir: tempfile::TempDir,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl TestServer {
    pub async fn start() -> TestServer {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(f: impl FnOnce(&mut Config)) -> TestServer {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = Config {
            db: format!("sqlite://{}", dir.path().join("jobcast.db").display()),
            ..Config::default()
        };
        f(&mut config);
        Self::start_in(dir, config).await
    }

    pub async fn start_in(dir: tempfile::TempDir, config: Config) -> TestServer {
        let server = Jobcast::open(config).await.expect("open store");
        Self::serve(dir, server).await
    }

    /// Serves an already opened server whose store lives in `dir`.
    pub async fn serve(dir: tempfile::TempDir, server: Jobcast) -> TestServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(server.clone().serve(listener, async {
            let _ = rx.await;
        }));
        TestServer {
            url,
            client: reqwest::Client::builder()
                .pool_max_idle_per_host(64)
                .build()
                .expect("client"),
            server,
            dir,
            stop: Some(tx),
            task: Some(task),
        }
    }

    /// Shuts down gracefully and waits for it.
    pub async fn stop(mut self) -> tempfile::TempDir {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            t.await.expect("join").expect("serve");
        }
        std::mem::replace(&mut self.dir, tempfile::tempdir().expect("tempdir"))
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.url, path)
    }

    /// POSTs JSON text; returns (status, body as JSON or Null).
    pub async fn post(&self, path: &str, body: &str) -> (u16, Value) {
        let res = self
            .client
            .post(self.url(path))
            .header("content-type", "application/json")
            .body(body.to_owned())
            .send()
            .await
            .expect("post");
        status_json(res).await
    }

    pub async fn get_json(&self, path: &str) -> (u16, Value) {
        let res = self.client.get(self.url(path)).send().await.expect("get");
        status_json(res).await
    }

    /// Appends one event with string data; returns the append's answer.
    pub async fn append(&self, stream: &str, data: &str) -> Value {
        let body = serde_json::json!({ "data": data }).to_string();
        let (status, v) = self
            .post(&format!("/v1/streams/{stream}/events"), &body)
            .await;
        assert_eq!(status, 201, "append: {v}");
        v
    }

    /// Appends a batch of string data.
    pub async fn append_batch(&self, stream: &str, data: &[String]) -> Value {
        let events: Vec<Value> = data
            .iter()
            .map(|d| serde_json::json!({ "data": d }))
            .collect();
        let (status, v) = self
            .post(
                &format!("/v1/streams/{stream}/events"),
                &Value::from(events).to_string(),
            )
            .await;
        assert_eq!(status, 201, "append: {v}");
        v
    }

    pub async fn complete(&self, stream: &str) -> Value {
        let (status, v) = self
            .post(&format!("/v1/streams/{stream}/complete"), "")
            .await;
        assert_eq!(status, 200, "complete: {v}");
        v
    }

    pub async fn meta(&self, stream: &str) -> Value {
        let (status, v) = self.get_json(&format!("/v1/streams/{stream}")).await;
        assert_eq!(status, 200, "meta: {v}");
        v
    }

    /// Opens an SSE watch of `stream` with extra query and an optional Last-Event-ID.
    pub async fn watch(&self, stream: &str, query: &str, last_event_id: Option<&str>) -> Sse {
        let mut req = self
            .client
            .get(self.url(&format!("/v1/streams/{stream}/events{query}")))
            .header("accept", "text/event-stream");
        if let Some(id) = last_event_id {
            req = req.header("last-event-id", id);
        }
        let res = req.send().await.expect("watch");
        Sse::new(res)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

pub async fn status_json(res: reqwest::Response) -> (u16, Value) {
    let status = res.status().as_u16();
    let text = res.text().await.expect("body");
    let v = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or(Value::String(text))
    };
    (status, v)
}

/// An SSE response read frame by frame with the protocol decoder.
pub struct Sse {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    body: Option<futures::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>>,
    decoder: Decoder,
    queue: std::collections::VecDeque<Frame>,
    /// Every byte received, for assertions on the raw wire format.
    pub raw: Vec<u8>,
    pub closed: bool,
}

impl Sse {
    pub fn new(res: reqwest::Response) -> Sse {
        Sse {
            status: res.status().as_u16(),
            headers: res.headers().clone(),
            body: Some(res.bytes_stream().boxed()),
            decoder: Decoder::new(),
            queue: Default::default(),
            raw: Vec::new(),
            closed: false,
        }
    }

    /// The next frame, or None when the server closed the response.
    pub async fn next_frame(&mut self, timeout: Duration) -> Option<Frame> {
        loop {
            if let Some(f) = self.queue.pop_front() {
                return Some(f);
            }
            if self.closed {
                return None;
            }
            let body = self.body.as_mut()?;
            match tokio::time::timeout(timeout, body.next()).await {
                Err(_) => panic!(
                    "no SSE frame within {timeout:?}; got so far: {}",
                    String::from_utf8_lossy(&self.raw)
                ),
                Ok(Some(Ok(chunk))) => {
                    self.raw.extend_from_slice(&chunk);
                    let mut out = Vec::new();
                    self.decoder.feed(&chunk, &mut out);
                    self.queue.extend(out);
                }
                Ok(Some(Err(_))) | Ok(None) => {
                    self.decoder.finish();
                    self.closed = true;
                }
            }
        }
    }

    /// The next event (skipping comments and retry) within `timeout` in
    /// all, or None at close.
    pub async fn next_event(&mut self, timeout: Duration) -> Option<SseEvent> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                panic!(
                    "no SSE event within {timeout:?}; got so far: {}",
                    String::from_utf8_lossy(&self.raw)
                );
            }
            match self.next_frame(left).await? {
                Frame::Event(e) => return Some(e),
                _ => continue,
            }
        }
    }

    /// Every event until the server closes.
    pub async fn collect(&mut self, timeout: Duration) -> Vec<SseEvent> {
        let mut out = Vec::new();
        while let Some(e) = self.next_event(timeout).await {
            out.push(e);
        }
        out
    }
}

/// The seq of an event's id (`{epoch}-{seq}`).
pub fn seq_of(e: &SseEvent) -> u64 {
    jobcast_protocol::EventId::parse(&e.last_event_id)
        .map(|id| id.seq)
        .unwrap_or_else(|_| panic!("bad id {:?}", e.last_event_id))
}

pub const T: Duration = Duration::from_secs(10);

/// Reads a whole SSE watch of `stream` on the server at `url` from its
/// start: the seq of every event id in order, and the data of every
/// `jobcast.error`. With `pause`, sleeps that long for every 16 KiB of the
/// body (a slower client); counts events in `progress`. Cheap per byte, for tests with many watchers.
pub async fn ids_of_watch(
    client: &reqwest::Client,
    url: &str,
    stream: &str,
    pause: Option<Duration>,
    progress: Option<&std::sync::atomic::AtomicU64>,
) -> (Vec<u64>, Vec<String>) {
    let res = client
        .get(format!("{url}/v1/streams/{stream}/events"))
        .header("accept", "text/event-stream")
        .send()
        .await
        .expect("watch");
    assert_eq!(res.status(), 200);
    let mut body = res.bytes_stream();
    let (mut seqs, mut errors) = (Vec::new(), Vec::new());
    // The unfinished last line of the previous piece.
    let mut line = Vec::new();
    let mut error = false;
    let read = async {
        while let Some(piece) = body.next().await {
            let piece = piece.expect("body");
            for &b in piece.iter() {
                if b != b'\n' {
                    line.push(b);
                    continue;
                }
                if let Some(id) = line.strip_prefix(b"id: ") {
                    let id = std::str::from_utf8(id).expect("id");
                    let seq = id.rsplit('-').next().and_then(|s| s.parse().ok());
                    seqs.push(seq.unwrap_or_else(|| panic!("bad id {id}")));
                    if let Some(p) = progress {
                        p.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                } else if line == b"event: jobcast.error" {
                    error = true;
                } else if let (true, Some(data)) = (error, line.strip_prefix(b"data: ")) {
                    errors.push(String::from_utf8_lossy(data).into_owned());
                    error = false;
                }
                line.clear();
            }
            if let Some(p) = pause {
                tokio::time::sleep(p * (piece.len() / (16 << 10) + 1) as u32).await;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(300), read)
        .await
        .expect("the watch did not end");
    (seqs, errors)
}
