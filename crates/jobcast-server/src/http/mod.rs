//! The HTTP API (v1): one module per resource, built into one [`Router`].

mod cors;
mod error;
mod events;
mod guard;
pub mod input;
mod origin;
mod sse;
mod streams;
mod ui;

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::handler::Handler;
use axum::response::{IntoResponse, Response};
use axum::routing::{on, MethodFilter};
use axum::Router;
use http::{header, HeaderMap, HeaderValue, StatusCode};
use tokio_util::sync::CancellationToken;

pub use error::ApiError;
pub use guard::Need;

use crate::config::Config;
use crate::hub::Hub;
use crate::store::Store;

/// What every handler shares; a cheap handle.
#[derive(Debug, Clone)]
pub struct AppState {
    /// The durable log.
    pub store: Store,
    /// Live batches for watchers on this node.
    pub hub: Hub,
    /// The server's memory budget (replay frames, bodies, rings).
    pub budget: crate::budget::Budget,
    /// Watchers per client address and per token subject.
    pub(crate) watcher_caps: Arc<crate::limits::WatcherCaps>,
    /// Prometheus metrics.
    pub metrics: crate::metrics::Metrics,
    /// The configuration.
    pub config: Arc<Config>,
    /// Cancelled when the server shuts down: watchers get `shutting_down`.
    pub shutdown: CancellationToken,
}

/// The router of the whole API.
pub fn app(state: AppState) -> Router {
    let mut router = routes(&state).router;
    let prefix = state.config.ds_prefix.trim_end_matches('/');
    // A prefix the router cannot take (the binary's flag parser refuses
    // these; a library caller may not) turns Durable Streams off, loudly.
    let usable = prefix.starts_with('/') && !prefix.contains(['{', '}', '*']);
    if !prefix.is_empty() && !usable {
        tracing::warn!(
            prefix,
            "--ds-prefix is not a usable path; Durable Streams is off"
        );
    }
    if !prefix.is_empty() && usable {
        let ds = ds_routes(&state)
            .router
            .layer(axum::middleware::from_fn(crate::ds::headers));
        router = router.nest(prefix, ds);
    }
    let router = router
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        // RawBody enforces the configured limit with a JSON error instead.
        .layer(axum::extract::DefaultBodyLimit::disable())
        // Before routing, for every route and the fallbacks: without auth,
        // foreign Host names and cross-site writes stop here.
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            origin::check,
        ));
    // Outermost, so that preflights and every answer (401s too) carry CORS headers.
    let router = match cors::layer(&state.config.cors_origins) {
        Some(cors) => router.layer(cors),
        None => router,
    };
    router.with_state(state)
}

/// Every route, each with the permission it needs, declared together.
fn routes(state: &AppState) -> Routes {
    use http::Method as M;
    use Need::*;
    Routes::new(state)
        .add(M::GET, "/v1/streams", Token, streams::list)
        .add(M::GET, "/v1/streams/{id}", Subscribe, streams::get)
        .add(M::PUT, "/v1/streams/{id}", Publish, streams::create)
        .add(M::DELETE, "/v1/streams/{id}", Publish, streams::delete)
        .add(M::GET, "/v1/streams/{id}/events", Subscribe, events::read)
        .add(M::POST, "/v1/streams/{id}/events", Publish, events::append)
        .add(
            M::POST,
            "/v1/streams/{id}/complete",
            Publish,
            streams::complete,
        )
        .add(M::POST, "/v1/streams/{id}/fail", Publish, streams::fail)
        .add(M::POST, "/v1/streams/{id}/cancel", Cancel, streams::cancel)
        .add(M::GET, "/healthz", Public, healthz)
        .add(M::GET, "/readyz", Public, readyz)
        .add(M::GET, "/metrics", Metrics, metrics)
        .add(M::GET, "/", Public, ui::index)
        .add(M::GET, "/ui/{*path}", Public, ui::asset)
}

/// The Durable Streams routes (mounted under `--ds-prefix`): reads need
/// Subscribe, writes Publish, matched against the DS path.
fn ds_routes(state: &AppState) -> Routes {
    use http::Method as M;
    use Need::*;
    let path = crate::ds::STREAM_PATH;
    Routes::new(state)
        .add(M::GET, path, Subscribe, crate::ds::read_handler)
        .add(M::PUT, path, Publish, crate::ds::put_handler)
        .add(M::POST, path, Publish, crate::ds::post_handler)
        .add(M::DELETE, path, Publish, crate::ds::delete_handler)
        // CORS preflights (answered by `ds::headers`).
        .add(M::OPTIONS, path, Public, || async {
            StatusCode::NO_CONTENT
        })
}

/// The Durable Streams routes as declared (their paths are under `--ds-prefix`).
#[doc(hidden)]
pub fn declared_ds_routes(state: &AppState) -> Vec<DeclaredRoute> {
    ds_routes(state).declared
}

/// A route as declared: method, path template, and what it needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeclaredRoute {
    /// The method (GET also answers HEAD).
    pub method: http::Method,
    /// The path template, e.g. `/v1/streams/{id}`.
    pub path: &'static str,
    /// The permission the route's guard checks.
    pub need: Need,
}

/// The router's routes as declared, for tests that walk them.
#[doc(hidden)]
pub fn declared_routes(state: &AppState) -> Vec<DeclaredRoute> {
    routes(state).declared
}

/// The only way a route is added: with the [`Need`] its guard checks, so a
/// route cannot exist without a declared permission (no second table of
/// templates to keep in step, no fall-through to "any valid token").
struct Routes {
    state: AppState,
    router: Router<AppState>,
    declared: Vec<DeclaredRoute>,
}

impl Routes {
    fn new(state: &AppState) -> Routes {
        Routes {
            state: state.clone(),
            router: Router::new(),
            declared: Vec::new(),
        }
    }

    fn add<H, T>(
        mut self,
        method: http::Method,
        path: &'static str,
        need: Need,
        handler: H,
    ) -> Routes
    where
        H: Handler<T, AppState>,
        T: 'static,
    {
        // The table above uses standard methods only, each of which axum
        // can filter on; every test builds this router, so a mistake here
        // cannot reach a release.
        let filter = MethodFilter::try_from(method.clone())
            .unwrap_or_else(|e| panic!("route {method} {path}: {e}"));
        // After routing, so the guard sees the decoded stream id; before any
        // body is read, so a stranger's body is never buffered.
        let guard = axum::middleware::from_fn_with_state(
            guard::Guarded {
                state: self.state.clone(),
                need,
            },
            guard::guard,
        );
        self.router = self
            .router
            .route(path, on(filter, handler).route_layer(guard));
        self.declared.push(DeclaredRoute { method, path, need });
        self
    }
}

/// A request body read whole, up to `--max-body-bytes` (else 413
/// `body_too_large`, at once when `Content-Length` says so), each piece
/// within `--body-timeout` of the last (else 408 `body_timeout`). Either
/// refusal closes the connection: the rest of the body is never read.
#[derive(Debug)]
pub struct RawBody(pub axum::body::Bytes);

impl axum::extract::FromRequest<AppState> for RawBody {
    type Rejection = Response;

    async fn from_request(req: axum::extract::Request, state: &AppState) -> Result<Self, Response> {
        use http_body_util::BodyExt;
        let limit = state.config.max_body_bytes;
        let idle = state.config.body_timeout;
        let closing = |e: ApiError| {
            let mut res = e.into_response();
            res.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            res
        };
        let too_large = || {
            closing(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!("the request body is larger than {limit} bytes"),
            ))
        };
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        if declared.is_some_and(|n| n > limit as u64) {
            return Err(too_large());
        }
        // The body counts against the memory budget while it is read and
        // until the handler is done with it.
        let over_budget = || {
            closing(ApiError {
                retry_after: Some(1),
                ..ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "memory_budget_exceeded",
                    "the server holds as much as its memory budget allows; retry shortly",
                )
            })
        };
        let mut permit = state
            .budget
            .try_take(declared.unwrap_or(0) as usize)
            .ok_or_else(over_budget)?;
        let mut body = req.into_body();
        let mut buf = bytes::BytesMut::new();
        loop {
            let frame = match tokio::time::timeout(idle, body.frame()).await {
                Err(_) => {
                    return Err(closing(ApiError::new(
                        StatusCode::REQUEST_TIMEOUT,
                        "body_timeout",
                        format!("the request body made no progress for {idle:?}"),
                    )))
                }
                Ok(None) => break,
                Ok(Some(Err(e))) => {
                    return Err(closing(ApiError::bad_request(
                        "invalid_body",
                        format!("the request body could not be read: {e}"),
                    )))
                }
                Ok(Some(Ok(frame))) => frame,
            };
            if let Ok(data) = frame.into_data() {
                if buf.len() + data.len() > limit {
                    return Err(too_large());
                }
                let need = (buf.len() + data.len()).saturating_sub(permit.bytes());
                if need > 0 && !permit.try_grow(need) {
                    return Err(over_budget());
                }
                buf.extend_from_slice(&data);
            }
        }
        Ok(RawBody(permit.attach(buf.freeze())))
    }
}

/// Query parameters; a malformed query string is a 400.
type Params = Result<Query<HashMap<String, String>>, axum::extract::rejection::QueryRejection>;

fn params(p: Params) -> Result<HashMap<String, String>, ApiError> {
    p.map(|Query(q)| q)
        .map_err(|e| ApiError::bad_request("invalid_query", e.body_text()))
}

/// A non-empty parameter (an empty one counts as absent).
fn param<'a>(q: &'a HashMap<String, String>, name: &str) -> Option<&'a str> {
    q.get(name).map(String::as_str).filter(|v| !v.is_empty())
}

/// The stream id from the path, validated.
fn stream_id(id: &str) -> Result<&str, ApiError> {
    jobcast_protocol::validate_stream_id(id)
        .map(|()| id)
        .map_err(|e| ApiError::bad_request("invalid_stream_id", e.to_string()))
}

/// The `Vary` every read sends: one URL serves SSE and JSON, per credentials.
const VARY: &str = "Accept, Authorization, Cookie";

/// A JSON answer with the headers of reads.
fn json_response(status: StatusCode, body: String) -> Response {
    let mut res = (status, body).into_response();
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("private, no-store"),
    );
    h.insert(header::VARY, HeaderValue::from_static(VARY));
    res
}

fn to_json<T: serde::Serialize>(v: &T) -> String {
    // Serializing our own plain structs and json! values cannot fail.
    serde_json::to_string(v).unwrap_or_else(|_| "null".into())
}

fn wants_sse(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("text/event-stream"))
}

async fn healthz() -> Response {
    json_response(StatusCode::OK, r#"{"status":"ok"}"#.into())
}

async fn readyz(State(state): State<AppState>) -> Result<Response, ApiError> {
    if state.shutdown.is_cancelled() {
        return Err(ApiError::from(crate::store::StoreError::Closed));
    }
    state.store.ping().await?;
    Ok(json_response(
        StatusCode::OK,
        r#"{"status":"ready"}"#.into(),
    ))
}

async fn metrics(State(state): State<AppState>) -> Response {
    let mut res = state.metrics.encode().into_response();
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    res
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this route does not accept that method",
    )
}
