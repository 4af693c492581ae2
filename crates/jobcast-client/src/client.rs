//! The client handle, its options, and the producer API.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use jobcast_protocol::validate_stream_id;
use reqwest::header::{HeaderMap, HeaderValue, AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER};
use reqwest::Method;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::backoff::{backoff_with, parse_retry_after};
use crate::error::{retryable_status, Error};
use crate::types::{Appended, ListOptions, NewEvent, StreamInfo, StreamList};
use crate::watch::{Start, Watch};

/// The default server URL.
pub const DEFAULT_URL: &str = "http://127.0.0.1:7700";

/// How producer requests are retried: network errors, 5xx, 408 and 429, with
/// the same backoff as reconnects, until either bound is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (1 = no retry).
    pub max_attempts: u32,
    /// No new attempt starts after this long since the first.
    pub max_elapsed: Duration,
}

impl Default for RetryPolicy {
    /// 10 attempts within 2 minutes.
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 10,
            max_elapsed: Duration::from_secs(120),
        }
    }
}

/// A secret that `Debug` does not print.
#[derive(Clone)]
struct Secret(String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"***\"")
    }
}

/// Builds a [`Client`]. Defaults: no token, connect timeout 10 s, request
/// timeout 30 s, SSE read timeout 45 s, [`RetryPolicy::default`], give up a
/// watch after 5 min without a healthy connection, a connection is healthy
/// once it delivered an event or stayed open 5 s, backoff 1 s → 30 s.
#[derive(Debug, Clone)]
pub struct ClientBuilder {
    base_url: String,
    token: Option<Secret>,
    user_agent: String,
    connect_timeout: Duration,
    request_timeout: Duration,
    read_timeout: Duration,
    retry: RetryPolicy,
    give_up_after: Duration,
    healthy_after: Duration,
    backoff_base: Duration,
    backoff_max: Duration,
    http2_prior_knowledge: bool,
    root_certificates: Vec<Vec<u8>>,
}

impl ClientBuilder {
    /// Sends `Authorization: Bearer {token}` with every request.
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(Secret(token.into()));
        self
    }

    /// The `User-Agent` header (default `jobcast-client/{version}`).
    pub fn user_agent(mut self, user_agent: impl Into<String>) -> Self {
        self.user_agent = user_agent.into();
        self
    }

    /// How long to wait for a TCP (and TLS) connection.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How long one producer request may take, answer included.
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// How long a watch waits for the response headers, and then for any byte
    /// (the server sends a heartbeat every 15 s by default), before reconnecting.
    pub fn read_timeout(mut self, timeout: Duration) -> Self {
        self.read_timeout = timeout;
        self
    }

    /// How producer requests are retried.
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }

    /// A watch gives up (with [`Error::GaveUp`]) at the first failure after this long without a healthy connection.
    pub fn give_up_after(mut self, duration: Duration) -> Self {
        self.give_up_after = duration;
        self
    }

    /// A connection that stays open this long counts as healthy (resets the backoff), even without events.
    pub fn healthy_after(mut self, duration: Duration) -> Self {
        self.healthy_after = duration;
        self
    }

    /// The backoff's base and maximum (default 1 s and 30 s, as the contract says;
    /// smaller values suit tests and LANs).
    pub fn backoff(mut self, base: Duration, max: Duration) -> Self {
        self.backoff_base = base;
        self.backoff_max = max;
        self
    }

    /// Speaks HTTP/2 from the first byte on `http://` URLs (h2c with prior
    /// knowledge: one connection carries every watch and request). Over
    /// `https://` HTTP/2 is chosen by ALPN anyway.
    pub fn http2_prior_knowledge(mut self) -> Self {
        self.http2_prior_knowledge = true;
        self
    }

    /// Also trusts this PEM certificate (e.g. a private CA's, or a server's
    /// self-signed one) for `https://` URLs.
    pub fn add_root_certificate_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.root_certificates.push(pem.into());
        self
    }

    /// Builds the client.
    pub fn build(self) -> Result<Client, Error> {
        let base = self.base_url.trim().trim_end_matches('/').to_owned();
        let url = reqwest::Url::parse(&base).map_err(|e| Error::InvalidInput {
            what: "server URL",
            value: self.base_url.clone(),
            source: Box::new(e),
        })?;
        if !matches!(url.scheme(), "http" | "https") || url.query().is_some() {
            return Err(Error::InvalidInput {
                what: "server URL",
                value: self.base_url.clone(),
                source: "expected http://host[:port][/path] or https://…".into(),
            });
        }
        let auth = match &self.token {
            None => None,
            Some(Secret(t)) => {
                let mut v = HeaderValue::from_str(&format!("Bearer {t}")).map_err(|e| {
                    Error::InvalidInput {
                        what: "token",
                        value: "***".into(),
                        source: Box::new(e),
                    }
                })?;
                v.set_sensitive(true);
                Some(v)
            }
        };
        let mut http = reqwest::Client::builder()
            .user_agent(self.user_agent)
            .connect_timeout(self.connect_timeout)
            .tcp_nodelay(true);
        if self.http2_prior_knowledge {
            http = http.http2_prior_knowledge();
        }
        for pem in &self.root_certificates {
            let cert = reqwest::Certificate::from_pem(pem).map_err(Error::Build)?;
            http = http.add_root_certificate(cert);
        }
        let http = http.build().map_err(Error::Build)?;
        Ok(Client {
            inner: Arc::new(Inner {
                http,
                base,
                auth,
                cancels: Default::default(),
                opts: Options {
                    request_timeout: self.request_timeout,
                    read_timeout: self.read_timeout,
                    retry: self.retry,
                    give_up_after: self.give_up_after,
                    healthy_after: self.healthy_after,
                    backoff_base: self.backoff_base,
                    backoff_max: self.backoff_max,
                },
            }),
        })
    }
}

/// Options the client's requests and watches read.
#[derive(Debug, Clone)]
pub(crate) struct Options {
    pub(crate) request_timeout: Duration,
    pub(crate) read_timeout: Duration,
    pub(crate) retry: RetryPolicy,
    pub(crate) give_up_after: Duration,
    pub(crate) healthy_after: Duration,
    pub(crate) backoff_base: Duration,
    pub(crate) backoff_max: Duration,
}

#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) http: reqwest::Client,
    pub(crate) base: String,
    pub(crate) auth: Option<HeaderValue>,
    pub(crate) opts: Options,
    /// Per stream, whether a cancel was requested, as append answers told.
    pub(crate) cancels: std::sync::Mutex<std::collections::HashMap<String, watch::Sender<bool>>>,
}

/// Whether a cancel of a stream was requested, as this client learned it
/// from the answers to its appends (every answer after the request says
/// so: no polling). Cheap to clone.
#[derive(Debug, Clone)]
pub struct CancelSignal(watch::Receiver<bool>);

impl CancelSignal {
    /// Whether the cancel was requested (as far as this client knows).
    pub fn is_requested(&self) -> bool {
        *self.0.borrow()
    }

    /// Completes once a cancel was requested (at once if it already was).
    /// Never completes if the client is dropped before.
    pub async fn requested(&mut self) {
        if self.0.wait_for(|&c| c).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// A jobcast client: cheap to clone, one connection pool shared by clones.
#[derive(Debug, Clone)]
pub struct Client {
    pub(crate) inner: Arc<Inner>,
}

/// A successful answer.
struct Reply {
    status: u16,
    body: Bytes,
}

/// Options of one producer request.
struct Req<'a> {
    method: Method,
    path: String,
    query: Vec<(&'static str, String)>,
    /// `label.K=V` query pairs.
    labels: Vec<(String, String)>,
    body: Option<Bytes>,
    key: Option<&'a str>,
    /// DELETE: a 404 after an attempt that may have succeeded means it did.
    not_found_after_retry_ok: bool,
}

impl<'a> Req<'a> {
    fn new(method: Method, path: String) -> Self {
        Req {
            method,
            path,
            query: Vec::new(),
            labels: Vec::new(),
            body: None,
            key: None,
            not_found_after_retry_ok: false,
        }
    }
}

/// A random 128-bit Idempotency-Key, as 32 hex digits.
pub fn idempotency_key() -> String {
    format!("{:032x}", rand::random::<u128>())
}

impl Client {
    /// A client for the server at `base_url` (e.g. `http://127.0.0.1:7700`) with default options.
    pub fn new(base_url: &str) -> Result<Client, Error> {
        Self::builder(base_url).build()
    }

    /// A builder for a client with options (token, timeouts, retries, user agent).
    pub fn builder(base_url: &str) -> ClientBuilder {
        ClientBuilder {
            base_url: base_url.to_owned(),
            token: None,
            user_agent: concat!("jobcast-client/", env!("CARGO_PKG_VERSION")).to_owned(),
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            read_timeout: Duration::from_secs(45),
            retry: RetryPolicy::default(),
            give_up_after: Duration::from_secs(300),
            healthy_after: Duration::from_secs(5),
            backoff_base: crate::backoff::BASE,
            backoff_max: crate::backoff::MAX,
            http2_prior_knowledge: false,
            root_certificates: Vec::new(),
        }
    }

    /// The server's base URL, without a trailing slash.
    pub fn base_url(&self) -> &str {
        &self.inner.base
    }

    /// Watches `stream` from `start`: a [`Stream`](futures::Stream) of
    /// [`Item`](crate::Item)s that reconnects and resumes by itself. See [`Watch`].
    pub fn watch(&self, stream: &str, start: Start) -> Watch {
        Watch::new(self.clone(), stream, start)
    }

    /// Watches `stream`'s whole log, then its live events, until its end: `watch(stream, Start::Beginning)`.
    pub fn subscribe(&self, stream: &str) -> Watch {
        self.watch(stream, Start::Beginning)
    }

    /// Appends one event, creating the stream if needed. Retried safely: see [`Client::append_with_key`].
    pub async fn append(
        &self,
        stream: &str,
        event: impl Into<NewEvent>,
    ) -> Result<Appended, Error> {
        let body = serde_json::to_vec(&event.into()).map_err(Error::Encode)?;
        self.append_body(stream, body, &idempotency_key()).await
    }

    /// Appends a batch (1..1000 events), all or nothing. Retried safely: see [`Client::append_with_key`].
    pub async fn append_batch(&self, stream: &str, events: &[NewEvent]) -> Result<Appended, Error> {
        self.append_with_key(stream, events, &idempotency_key())
            .await
    }

    /// Appends a batch under a given Idempotency-Key. Network errors, 5xx,
    /// 408 and 429 are retried with the same key, so the server appends the
    /// batch at most once and answers a retry with the first answer. Reuse a
    /// key across process restarts to make a resumed producer safe too.
    pub async fn append_with_key(
        &self,
        stream: &str,
        events: &[NewEvent],
        key: &str,
    ) -> Result<Appended, Error> {
        let body = serde_json::to_vec(events).map_err(Error::Encode)?;
        self.append_body(stream, body, key).await
    }

    async fn append_body(&self, stream: &str, body: Vec<u8>, key: &str) -> Result<Appended, Error> {
        check_stream(stream)?;
        let mut req = Req::new(Method::POST, format!("/v1/streams/{stream}/events"));
        req.body = Some(body.into());
        req.key = Some(key);
        let appended: Appended = json(self.send(req).await?)?;
        if appended.cancel_requested {
            self.cancel_sender(stream).send_replace(true);
        }
        Ok(appended)
    }

    fn cancel_sender(&self, stream: &str) -> watch::Sender<bool> {
        let mut cancels = self
            .inner
            .cancels
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        cancels
            .entry(stream.to_owned())
            .or_insert_with(|| watch::channel(false).0)
            .clone()
    }

    /// Whether (and when) a cancel of `stream` is requested, as this
    /// client's appends to it learn: every append answer after
    /// [`Client::cancel`] carries the flag. A producer selects on
    /// [`CancelSignal::requested`] beside its work, then ends the stream.
    pub fn cancel_signal(&self, stream: &str) -> CancelSignal {
        CancelSignal(self.cancel_sender(stream).subscribe())
    }

    /// Asks the producer of `stream` to stop: appends
    /// `jobcast.cancel_requested` once (idempotent, so retried safely) and
    /// answers the metadata (`cancel_requested: true`). `Error::Api` 409
    /// `stream_ended` once the stream ended.
    pub async fn cancel(&self, stream: &str) -> Result<StreamInfo, Error> {
        check_stream(stream)?;
        json(
            self.send(Req::new(
                Method::POST,
                format!("/v1/streams/{stream}/cancel"),
            ))
            .await?,
        )
    }

    /// Creates `stream` if needed and replaces its labels (at most 16).
    pub async fn set_labels(
        &self,
        stream: &str,
        labels: &std::collections::BTreeMap<String, String>,
    ) -> Result<StreamInfo, Error> {
        check_stream(stream)?;
        let mut req = Req::new(Method::PUT, format!("/v1/streams/{stream}"));
        req.body = Some(
            serde_json::to_vec(&serde_json::json!({ "labels": labels }))
                .map_err(Error::Encode)?
                .into(),
        );
        json(self.send(req).await?)
    }

    /// Creates `stream` if it does not exist (idempotent) and returns its metadata.
    pub async fn create(&self, stream: &str) -> Result<StreamInfo, Error> {
        check_stream(stream)?;
        json(
            self.send(Req::new(Method::PUT, format!("/v1/streams/{stream}")))
                .await?,
        )
    }

    /// Ends `stream` as `completed`, with optional final data (any JSON value). Retried safely with an Idempotency-Key.
    pub async fn complete(
        &self,
        stream: &str,
        data: Option<&serde_json::Value>,
    ) -> Result<StreamInfo, Error> {
        let body = match data {
            None => None,
            Some(d) => {
                Some(serde_json::to_vec(&serde_json::json!({ "data": d })).map_err(Error::Encode)?)
            }
        };
        self.end(stream, "complete", body).await
    }

    /// Ends `stream` as `failed` with a message. Retried safely with an Idempotency-Key.
    pub async fn fail(&self, stream: &str, error: &str) -> Result<StreamInfo, Error> {
        let body =
            serde_json::to_vec(&serde_json::json!({ "error": error })).map_err(Error::Encode)?;
        self.end(stream, "fail", Some(body)).await
    }

    async fn end(
        &self,
        stream: &str,
        op: &str,
        body: Option<Vec<u8>>,
    ) -> Result<StreamInfo, Error> {
        check_stream(stream)?;
        let key = idempotency_key();
        let mut req = Req::new(Method::POST, format!("/v1/streams/{stream}/{op}"));
        req.body = body.map(Bytes::from);
        req.key = Some(&key);
        json(self.send(req).await?)
    }

    /// Deletes `stream` and its log. A 404 answering a retry (after an attempt
    /// whose outcome is unknown) counts as success.
    pub async fn delete(&self, stream: &str) -> Result<(), Error> {
        check_stream(stream)?;
        let mut req = Req::new(Method::DELETE, format!("/v1/streams/{stream}"));
        req.not_found_after_retry_ok = true;
        self.send(req).await.map(|_| ())
    }

    /// The metadata of `stream` (`Error::Api` with status 404 when it does not exist).
    pub async fn get(&self, stream: &str) -> Result<StreamInfo, Error> {
        check_stream(stream)?;
        json(
            self.send(Req::new(Method::GET, format!("/v1/streams/{stream}")))
                .await?,
        )
    }

    /// Whether the server is ready (`GET /readyz`: its store answers). With
    /// the [`RetryPolicy`]; one attempt for a health check.
    pub async fn ready(&self) -> Result<(), Error> {
        self.send(Req::new(Method::GET, "/readyz".to_owned()))
            .await
            .map(|_| ())
    }

    /// One page of the stream list, newest created first.
    pub async fn list(&self, options: &ListOptions) -> Result<StreamList, Error> {
        let mut req = Req::new(Method::GET, "/v1/streams".to_owned());
        if let Some(s) = options.state {
            req.query.push(("state", s.as_str().to_owned()));
        }
        if let Some(l) = options.limit {
            req.query.push(("limit", l.to_string()));
        }
        if let Some(a) = &options.after {
            req.query.push(("after", a.clone()));
        }
        if let Some(p) = &options.prefix {
            req.query.push(("prefix", p.clone()));
        }
        let mut labels = Vec::new();
        for (k, v) in &options.labels {
            labels.push((format!("label.{k}"), v.clone()));
        }
        req.labels = labels;
        json(self.send(req).await?)
    }

    /// Sends a producer request, retrying per the [`RetryPolicy`].
    async fn send(&self, req: Req<'_>) -> Result<Reply, Error> {
        let opts = &self.inner.opts;
        let url = format!("{}{}", self.inner.base, req.path);
        let started = Instant::now();
        let mut attempt: u32 = 0;
        let mut uncertain = false;
        loop {
            let (error, floor) = match self.attempt(&req, &url).await {
                Ok((status, headers, body)) => {
                    if (200..300).contains(&status) {
                        return Ok(Reply { status, body });
                    }
                    if status == 404 && uncertain && req.not_found_after_retry_ok {
                        return Ok(Reply {
                            status: 204,
                            body: Bytes::new(),
                        });
                    }
                    let error = api_error(status, &headers, &body);
                    if !retryable_status(status) {
                        return Err(error);
                    }
                    // A 5xx may have come after the work was done (e.g. a proxy timeout).
                    uncertain = true;
                    let floor = retry_after(&headers).unwrap_or(Duration::ZERO);
                    (error, floor)
                }
                Err(source) => {
                    uncertain = true;
                    (
                        Error::Network {
                            url: url.clone(),
                            source,
                        },
                        Duration::ZERO,
                    )
                }
            };
            attempt += 1;
            let delay = backoff_with(
                attempt - 1,
                floor,
                rand::random::<f64>(),
                opts.backoff_base,
                opts.backoff_max,
            );
            let elapsed = started.elapsed();
            if attempt >= opts.retry.max_attempts || elapsed + delay > opts.retry.max_elapsed {
                if attempt == 1 {
                    return Err(error);
                }
                return Err(Error::GaveUp {
                    attempts: attempt,
                    elapsed,
                    last: Box::new(error),
                });
            }
            tracing::debug!(%url, attempt, ?delay, error = %error, "retrying");
            tokio::time::sleep(delay).await;
        }
    }

    /// One attempt: the status, headers and whole body, or a network error.
    async fn attempt(
        &self,
        req: &Req<'_>,
        url: &str,
    ) -> Result<(u16, HeaderMap, Bytes), reqwest::Error> {
        let mut rb = self
            .inner
            .http
            .request(req.method.clone(), url)
            .timeout(self.inner.opts.request_timeout);
        if !req.labels.is_empty() {
            rb = rb.query(&req.labels);
        }
        if !req.query.is_empty() {
            rb = rb.query(&req.query);
        }
        if let Some(body) = &req.body {
            rb = rb
                .header(CONTENT_TYPE, "application/json")
                .body(body.clone());
        }
        if let Some(key) = req.key {
            rb = rb.header("idempotency-key", key);
        }
        rb = self.authorize(rb);
        let res = rb.send().await?;
        let status = res.status().as_u16();
        let headers = res.headers().clone();
        let body = res.bytes().await?;
        Ok((status, headers, body))
    }

    /// Adds the Authorization header, if a token is set.
    pub(crate) fn authorize(&self, rb: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.inner.auth {
            Some(v) => rb.header(AUTHORIZATION, v.clone()),
            None => rb,
        }
    }
}

/// Rejects an invalid stream id before any request.
pub(crate) fn check_stream(stream: &str) -> Result<(), Error> {
    validate_stream_id(stream).map_err(|e| Error::InvalidInput {
        what: "stream id",
        value: stream.to_owned(),
        source: Box::new(e),
    })
}

/// Parses a successful answer's JSON body.
fn json<T: DeserializeOwned>(reply: Reply) -> Result<T, Error> {
    serde_json::from_slice(&reply.body).map_err(|e| Error::Protocol {
        detail: format!(
            "a {} answer that is not the expected JSON: {}",
            reply.status,
            snippet(&reply.body)
        ),
        source: Some(e),
    })
}

/// The `Retry-After` header as a duration.
pub(crate) fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    headers
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| parse_retry_after(v, SystemTime::now()))
}

/// The API error of a non-2xx answer: `{"error":{"code","message"}}`, or
/// `http_{status}` and the start of the body when it is not that.
pub(crate) fn api_error(status: u16, headers: &HeaderMap, body: &[u8]) -> Error {
    #[derive(Deserialize)]
    struct Body {
        error: Inner,
    }
    #[derive(Deserialize)]
    struct Inner {
        code: String,
        message: String,
    }
    let (code, message) = match serde_json::from_slice::<Body>(body) {
        Ok(b) => (b.error.code, b.error.message),
        Err(_) => (format!("http_{status}"), snippet(body)),
    };
    Error::Api {
        status,
        code,
        message,
        retry_after: retry_after(headers),
    }
}

/// The start of a body, for messages.
fn snippet(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(&body[..body.len().min(200)]);
    text.trim().to_owned()
}
