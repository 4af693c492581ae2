//! The Durable Streams protocol (PROTOCOL.md of durable-streams/durable-streams)
//! under `--ds-prefix`, on the same listener, store, hub and auth guard as
//! jobcast's API. A DS stream is a jobcast stream (one event per message);
//! see docs/protocol.md for the mapping of names, offsets and states.
//!
//! `offset.rs` is pure (offsets, cursors, time stamps), `write.rs` has PUT,
//! POST and DELETE, `read.rs` HEAD and GET (catch-up, long-poll, SSE).

pub mod offset;
mod read;
mod write;

use axum::response::{IntoResponse, Response};
use http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};

use crate::http::ApiError;
use crate::store::ds::{DsMeta, DsRefusal};

/// The DS stream path template (under the prefix); `id` is what the auth
/// guard matches against publish/subscribe patterns.
pub const STREAM_PATH: &str = "/v1/stream/{*id}";

/// The headers every DS answer exposes to browsers.
const EXPOSE: &str = "Stream-Next-Offset, Stream-Cursor, Stream-Up-To-Date, Stream-Closed, \
     Stream-TTL, Stream-Expires-At, Stream-SSE-Data-Encoding, ETag, Location, Content-Type, \
     Producer-Epoch, Producer-Seq, Producer-Expected-Seq, Producer-Received-Seq";
/// The request headers a DS client sends.
const ALLOW_HEADERS: &str = "Content-Type, Authorization, If-None-Match, Stream-TTL, \
     Stream-Expires-At, Stream-Seq, Stream-Closed, Stream-Forked-From, Stream-Fork-Offset, \
     Stream-Fork-Sub-Offset, Producer-Id, Producer-Epoch, Producer-Seq, Last-Event-ID";

/// Adds the browser security and CORS headers the protocol lists (10.7) to
/// every DS answer, errors included.
pub(crate) async fn headers(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let preflight = req.method() == http::Method::OPTIONS;
    let mut res = if preflight {
        StatusCode::NO_CONTENT.into_response()
    } else {
        next.run(req).await
    };
    let h = res.headers_mut();
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        HeaderName::from_static("cross-origin-resource-policy"),
        HeaderValue::from_static("cross-origin"),
    );
    if !h.contains_key(header::ACCESS_CONTROL_ALLOW_ORIGIN) {
        h.insert(
            header::ACCESS_CONTROL_ALLOW_ORIGIN,
            HeaderValue::from_static("*"),
        );
    }
    h.insert(
        header::ACCESS_CONTROL_EXPOSE_HEADERS,
        HeaderValue::from_static(EXPOSE),
    );
    if preflight {
        h.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static("GET, HEAD, PUT, POST, DELETE, OPTIONS"),
        );
        h.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            HeaderValue::from_static(ALLOW_HEADERS),
        );
        h.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from_static("86400"),
        );
    }
    res
}

/// Sets a header from a string we built (offsets, numbers, content types
/// that were validated as header values when they came in).
fn set(h: &mut HeaderMap, name: &'static str, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        h.insert(HeaderName::from_static(name), v);
    }
}

/// The tail offset of a stream.
pub(crate) fn tail_offset(meta: &DsMeta) -> String {
    offset::encode(meta.owner(meta.tail), meta.tail)
}

/// Whether a request carried credentials (its answers must not be cached publicly).
fn has_credentials(h: &HeaderMap, query: Option<&str>) -> bool {
    h.contains_key(header::AUTHORIZATION)
        || h.contains_key(header::COOKIE)
        || query.is_some_and(|q| q.split('&').any(|p| p.starts_with("access_token=")))
}

/// The JSON error of a refusal, with the protocol's status and headers.
fn refusal(stream: &str, r: DsRefusal) -> Response {
    let (status, code, message): (StatusCode, &'static str, String) = match &r {
        DsRefusal::NotFound => return ApiError::stream_not_found(stream).into_response(),
        DsRefusal::Gone => (
            StatusCode::GONE,
            "stream_deleted",
            format!("stream {stream:?} was deleted"),
        ),
        DsRefusal::ConfigMismatch => (
            StatusCode::CONFLICT,
            "stream_exists",
            format!("stream {stream:?} exists with another configuration"),
        ),
        DsRefusal::ContentTypeMismatch => (
            StatusCode::CONFLICT,
            "content_type_mismatch",
            "the content type does not match the stream's".into(),
        ),
        DsRefusal::Closed(_) => (
            StatusCode::CONFLICT,
            "stream_closed",
            format!("stream {stream:?} is closed"),
        ),
        DsRefusal::SeqRegression => (
            StatusCode::CONFLICT,
            "sequence_conflict",
            "Stream-Seq must be greater than the last one".into(),
        ),
        DsRefusal::StaleEpoch(_) => (
            StatusCode::FORBIDDEN,
            "stale_producer_epoch",
            "a newer Producer-Epoch exists for this producer".into(),
        ),
        DsRefusal::EpochSeqNotZero => (
            StatusCode::BAD_REQUEST,
            "invalid_producer_seq",
            "a new Producer-Epoch must start at Producer-Seq 0".into(),
        ),
        DsRefusal::SeqGap(..) => (
            StatusCode::CONFLICT,
            "producer_seq_gap",
            "Producer-Seq skips ahead of the next expected one".into(),
        ),
        DsRefusal::BadForkOffset(m) => {
            (StatusCode::BAD_REQUEST, "invalid_fork_offset", (*m).into())
        }
        DsRefusal::ForkSourceGone => (
            StatusCode::CONFLICT,
            "fork_source_deleted",
            "the fork's source stream was deleted".into(),
        ),
        DsRefusal::Invalid(m) => (StatusCode::BAD_REQUEST, "invalid_body", (*m).into()),
    };
    let mut res = ApiError::new(status, code, message).into_response();
    let h = res.headers_mut();
    match r {
        DsRefusal::Closed(meta) => {
            set(h, "stream-closed", "true");
            set(h, "stream-next-offset", &tail_offset(&meta));
        }
        DsRefusal::StaleEpoch(e) => set(h, "producer-epoch", &e.to_string()),
        DsRefusal::SeqGap(expected, received) => {
            set(h, "producer-expected-seq", &expected.to_string());
            set(h, "producer-received-seq", &received.to_string());
        }
        _ => {}
    }
    res
}

/// The stream id of a DS path: a jobcast stream id (400 otherwise).
fn stream_id(path: &str) -> Result<&str, ApiError> {
    jobcast_protocol::validate_stream_id(path)
        .map(|()| path)
        .map_err(|e| ApiError::bad_request("invalid_stream_id", e.to_string()))
}

/// Whether SSE data of this content type is base64 (not text, not JSON).
fn sse_base64(content_type: &str) -> bool {
    let m = crate::store::ds::media_type(content_type);
    !(m.starts_with("text/") || m == "application/json")
}

/// The JSON text of one message of a stream: DS JSON streams store JSON
/// text; event data appended through jobcast's API is JSON when it parses
/// as JSON, else a JSON string.
fn json_message(data: &[u8]) -> String {
    let text = String::from_utf8_lossy(data);
    // Also for DS streams: jobcast's API may append plain text to them.
    if serde_json::from_str::<&serde_json::value::RawValue>(&text).is_ok() {
        text.into_owned()
    } else {
        serde_json::Value::String(text.into_owned()).to_string()
    }
}

/// The body of messages: a JSON array for JSON streams, the bytes otherwise.
fn body_of(meta: &DsMeta, messages: &[(u64, Vec<u8>)]) -> Vec<u8> {
    if meta.is_json() {
        let mut out = String::from("[");
        for (i, (_, m)) in messages.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(&json_message(m));
        }
        out.push(']');
        out.into_bytes()
    } else {
        messages
            .iter()
            .flat_map(|(_, m)| m.iter().copied())
            .collect()
    }
}

/// jobcast's `/v1` reads events as UTF-8 text and JSON: a DS stream of any
/// other content type than `application/json` is DS-only there (409
/// `ds_byte_stream`, before anything is read).
pub(crate) async fn refuse_byte_stream(
    state: &crate::http::AppState,
    id: &str,
) -> Result<(), ApiError> {
    match state.store.ds_read(id, None, 0).await? {
        Some(p) if !p.meta.native && !p.meta.is_json() => Err(ApiError::new(
            StatusCode::CONFLICT,
            "ds_byte_stream",
            format!(
                "stream {id:?} is a Durable Streams stream of {}: read it under the DS prefix",
                p.meta.content_type
            ),
        )),
        _ => Ok(()),
    }
}

/// The DS routes' handlers, for `http::routes`.
pub(crate) use read::get as read_handler;
pub(crate) use write::{delete as delete_handler, post as post_handler, put as put_handler};
