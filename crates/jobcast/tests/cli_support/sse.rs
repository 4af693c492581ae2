//! A raw SSE watcher the test controls: it reads one response with the
//! protocol's decoder until the end, an error or a cut, and resumes on any
//! node with `Last-Event-ID` when the test says so. It records every event it
//! was given (seq, data) so that the test can check exactly-once delivery.

use std::collections::VecDeque;
use std::time::Duration;

use jobcast_protocol::decode::{Decoder, Frame, SseEvent};
use jobcast_protocol::EventId;
use serde_json::Value;

/// How one response ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Close {
    /// `jobcast.end` arrived.
    End,
    /// `jobcast.error` arrived (its data), or the watch was answered with a
    /// JSON error (`{"status", "error"}`).
    Error(Value),
    /// The connection ended without either (cut, node killed), or could not
    /// be opened.
    Cut(String),
}

/// One SSE response, read frame by frame.
pub struct Sse {
    /// The response's headers.
    pub headers: reqwest::header::HeaderMap,
    res: reqwest::Response,
    decoder: Decoder,
    frames: VecDeque<Frame>,
    closed: bool,
}

impl Sse {
    /// The next frame; None when the response ended or broke. Panics when
    /// nothing arrives within `timeout`.
    pub async fn next_frame(&mut self, timeout: Duration) -> Option<Frame> {
        self.next_frame_within(timeout)
            .await
            .unwrap_or_else(|_| panic!("no SSE bytes within {timeout:?}"))
    }

    /// Like [`Sse::next_frame`], but Err (instead of a panic) when nothing
    /// arrives within `timeout`.
    pub async fn next_frame_within(
        &mut self,
        timeout: Duration,
    ) -> Result<Option<Frame>, tokio::time::error::Elapsed> {
        loop {
            if let Some(f) = self.frames.pop_front() {
                return Ok(Some(f));
            }
            if self.closed {
                return Ok(None);
            }
            let chunk = tokio::time::timeout(timeout, self.res.chunk()).await?;
            match chunk {
                Ok(Some(bytes)) => {
                    let mut out = Vec::new();
                    self.decoder.feed(&bytes, &mut out);
                    self.frames.extend(out);
                }
                Ok(None) | Err(_) => {
                    self.decoder.finish();
                    self.closed = true;
                }
            }
        }
    }
}

/// A watcher of one stream across connections and nodes.
#[derive(Debug, Default)]
pub struct Watcher {
    pub stream: String,
    /// (seq, data) of every log event received, in arrival order.
    pub events: Vec<(u64, String)>,
    /// The id of the last log event (what `Last-Event-ID` resumes from).
    pub last_id: Option<String>,
    /// The seq of `jobcast.end`, once it arrived.
    pub end: Option<u64>,
    /// Every `jobcast.error` payload (or JSON error answer) received.
    pub errors: Vec<Value>,
    /// Connections that ended without an end or error: (node, why).
    pub cuts: Vec<(String, String)>,
    /// Responses opened (with a 200).
    pub connections: usize,
    /// Extra request headers (e.g. the Accept-Encoding a browser sends).
    pub headers: Vec<(String, String)>,
}

/// The longest the tests wait for one SSE frame (heartbeats arrive well within).
pub const FRAME: Duration = Duration::from_secs(60);
/// The longest one [`Watcher::read`] may take in all (heartbeats alone do
/// not keep it going).
pub const READ: Duration = Duration::from_secs(120);

impl Watcher {
    pub fn new(stream: &str) -> Watcher {
        Watcher {
            stream: stream.to_owned(),
            ..Watcher::default()
        }
    }

    /// Opens a watch on the node at `url`, resuming after [`Self::last_id`].
    /// Err: the close (a JSON error answer, or a connection that failed).
    pub async fn open(&mut self, client: &reqwest::Client, url: &str) -> Result<Sse, Close> {
        let req = client.get(format!("{url}/v1/streams/{}/events", self.stream));
        let sse = open(req, self.last_id.as_deref(), &self.headers, FRAME)
            .await
            .map_err(|close| match close {
                Close::Cut(why) if why.starts_with("no answer") => panic!("{url}: {why}"),
                close => close,
            })?;
        self.connections += 1;
        Ok(sse)
    }

    /// Reads `sse` until the end, an error, a cut, or (when `until` is given)
    /// until that many log events were received in all (then None).
    /// Panics after [`READ`] in all.
    pub async fn read(&mut self, sse: &mut Sse, until: Option<usize>) -> Option<Close> {
        let deadline = tokio::time::Instant::now() + READ;
        loop {
            if until.is_some_and(|n| self.events.len() >= n) {
                return None;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{}: waited {READ:?} for {until:?} events; have {} (last {:?}), errors {:?}",
                self.stream,
                self.events.len(),
                self.last_id,
                self.errors
            );
            let frame = match sse.next_frame(FRAME).await {
                Some(f) => f,
                None => return Some(Close::Cut("the response ended".into())),
            };
            let Frame::Event(e) = frame else { continue };
            if let Some(close) = self.take(e) {
                return Some(close);
            }
        }
    }

    /// Records one event; Some when it ends the response.
    fn take(&mut self, e: SseEvent) -> Option<Close> {
        match e.event.as_str() {
            "jobcast.end" => {
                self.end = Some(seq(&e.last_event_id));
                Some(Close::End)
            }
            "jobcast.error" => {
                let v: Value = serde_json::from_str(&e.data).expect("error JSON");
                self.errors.push(v.clone());
                Some(Close::Error(v))
            }
            "jobcast.reset" => panic!(
                "{}: unexpected jobcast.reset {} after {:?}",
                self.stream, e.data, self.last_id
            ),
            _ => {
                assert!(e.id_set, "a log event without an id: {e:?}");
                if let Some(prev) = &self.last_id {
                    let (a, b) = (
                        EventId::parse(prev).unwrap(),
                        EventId::parse(&e.last_event_id).unwrap(),
                    );
                    assert_eq!(a.epoch, b.epoch, "the epoch changed");
                }
                self.events.push((seq(&e.last_event_id), e.data));
                self.last_id = Some(e.last_event_id);
                None
            }
        }
    }

    /// Opens and reads, over and over, until `jobcast.end`: after a cut or a
    /// retryable error it waits `pause` and resumes on the next node of
    /// `urls` (round robin from the first). A non-retryable error panics.
    /// Bounded by `attempts` connections.
    pub async fn follow(
        &mut self,
        client: &reqwest::Client,
        urls: &[String],
        pause: Duration,
        attempts: usize,
    ) {
        for attempt in 0..attempts {
            let url = &urls[attempt % urls.len()];
            let close = match self.open(client, url).await {
                Ok(mut sse) => self.read(&mut sse, None).await.expect("read to a close"),
                Err(close) => close,
            };
            match close {
                Close::End => return,
                Close::Error(v) => {
                    let retryable = v["retryable"] == true || v["status"] == 503;
                    assert!(retryable, "{}: a non-retryable error: {v}", self.stream);
                    if v["status"] == 503 {
                        self.errors.push(v);
                    }
                }
                Close::Cut(why) => self.cuts.push((url.clone(), why)),
            }
            tokio::time::sleep(pause).await;
        }
        panic!(
            "{}: no jobcast.end after {attempts} connections; {} events, errors {:?}, cuts {:?}",
            self.stream,
            self.events.len(),
            self.errors,
            self.cuts
        );
    }

    /// Asserts that the watcher received `expected` (data of seqs 1..) each
    /// exactly once, in order, and then the end with the next seq.
    pub fn assert_exactly_once(&self, expected: &[String]) {
        let seqs: Vec<u64> = self.events.iter().map(|(s, _)| *s).collect();
        for (i, s) in seqs.iter().enumerate() {
            assert_eq!(
                *s,
                i as u64 + 1,
                "{}: event #{i} has seq {s}: not exactly once in order (seqs around it: {:?})",
                self.stream,
                &seqs[i.saturating_sub(3)..(i + 3).min(seqs.len())]
            );
        }
        assert_eq!(
            self.events.len(),
            expected.len(),
            "{}: received {} events, {} were appended",
            self.stream,
            self.events.len(),
            expected.len()
        );
        for (i, ((_, data), want)) in self.events.iter().zip(expected).enumerate() {
            assert_eq!(data, want, "{}: seq {}", self.stream, i + 1);
        }
        assert_eq!(
            self.end,
            Some(expected.len() as u64 + 1),
            "{}: the end",
            self.stream
        );
    }
}

/// Sends the watch request `req` (`Accept: text/event-stream`, with
/// `Last-Event-ID: last_id` when given, and `headers`). Err: the close (a
/// JSON error answer as `{"status", "error"}`, a connection that failed, or
/// no answer within `timeout`).
pub async fn open(
    req: reqwest::RequestBuilder,
    last_id: Option<&str>,
    headers: &[(String, String)],
    timeout: Duration,
) -> Result<Sse, Close> {
    let mut req = req.header("accept", "text/event-stream");
    if let Some(id) = last_id {
        req = req.header("last-event-id", id);
    }
    for (k, v) in headers {
        req = req.header(k, v);
    }
    let res = match tokio::time::timeout(timeout, req.send()).await {
        Err(_) => {
            return Err(Close::Cut(format!(
                "no answer to a watch within {timeout:?}"
            )))
        }
        Ok(Err(e)) => return Err(Close::Cut(format!("connect: {e}"))),
        Ok(Ok(res)) => res,
    };
    let status = res.status().as_u16();
    if status != 200 {
        let body: Value = res.json().await.unwrap_or_default();
        return Err(Close::Error(
            serde_json::json!({ "status": status, "error": body["error"] }),
        ));
    }
    Ok(Sse {
        headers: res.headers().clone(),
        res,
        decoder: Decoder::new(),
        frames: VecDeque::new(),
        closed: false,
    })
}

/// The seq of an id `{epoch}-{seq}`.
pub fn seq(id: &str) -> u64 {
    EventId::parse(id)
        .unwrap_or_else(|_| panic!("bad id {id:?}"))
        .seq
}

/// Appends one event (string `data`) to `stream` with the Idempotency-Key
/// `key`, trying the nodes of `urls` in turn until one answers 201. Every
/// refusal is returned with the event's id: (status, error code) for an HTTP answer,
/// (0, error) for a connection that failed. Bounded by `tries`.
pub async fn append_with_key(
    client: &reqwest::Client,
    urls: &[String],
    stream: &str,
    key: &str,
    data: &str,
    tries: usize,
    pause: Duration,
) -> (String, Vec<(u16, String)>) {
    let mut refusals = Vec::new();
    for attempt in 0..tries {
        let url = &urls[attempt % urls.len()];
        let res = client
            .post(format!("{url}/v1/streams/{stream}/events"))
            .header("content-type", "application/json")
            .header("idempotency-key", key)
            .timeout(FRAME)
            .body(serde_json::json!({ "data": data }).to_string())
            .send()
            .await;
        match res {
            Ok(res) if res.status() == 201 => {
                let v: Value = res.json().await.expect("append JSON");
                let id = v["first_id"].as_str().expect("first_id").to_owned();
                return (id, refusals);
            }
            Ok(res) => {
                let status = res.status().as_u16();
                let v: Value = res.json().await.unwrap_or_default();
                let code = v["error"]["code"].as_str().unwrap_or("").to_owned();
                refusals.push((status, code));
            }
            Err(e) => refusals.push((0, e.to_string())),
        }
        tokio::time::sleep(pause).await;
    }
    panic!("{stream}: append {key} not accepted after {tries} tries: {refusals:?}");
}

/// Appends one event and asserts 201; returns its seq.
pub async fn append(client: &reqwest::Client, url: &str, stream: &str, data: &str) -> u64 {
    let res = client
        .post(format!("{url}/v1/streams/{stream}/events"))
        .header("content-type", "application/json")
        .timeout(FRAME)
        .body(serde_json::json!({ "data": data }).to_string())
        .send()
        .await
        .unwrap_or_else(|e| panic!("append to {url}: {e}"));
    let status = res.status();
    let v: Value = res.json().await.unwrap_or_default();
    assert_eq!(status, 201, "append to {url}: {v}");
    seq(v["first_id"].as_str().expect("first_id"))
}

/// Completes `stream` on `url`, retrying (with an Idempotency-Key) a 5xx or a
/// failed connection on the next node; bounded by `tries`.
pub async fn complete(client: &reqwest::Client, urls: &[String], stream: &str, tries: usize) {
    for attempt in 0..tries {
        let url = &urls[attempt % urls.len()];
        let res = client
            .post(format!("{url}/v1/streams/{stream}/complete"))
            .header("idempotency-key", "complete")
            .timeout(FRAME)
            .send()
            .await;
        if let Ok(res) = res {
            let status = res.status().as_u16();
            if status == 200 {
                return;
            }
            assert!(status >= 500, "complete on {url}: {status}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("{stream}: complete not accepted after {tries} tries");
}
