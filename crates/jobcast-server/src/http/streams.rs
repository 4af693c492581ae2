//! `/v1/streams` and `/v1/streams/{id}`: create, read, list, end, delete.

use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use http::{HeaderMap, HeaderValue, StatusCode};
use jobcast_protocol::StreamState;

use super::input::{self, Limits};
use super::{
    json_response, param, params, stream_id, to_json, ApiError, AppState, Params, RawBody,
};
use crate::auth::Grant;
use crate::store::{
    ListPosition, ListQuery, Refusal, StreamMeta, WriteOp, WriteOutcome, WriteRequest,
};

fn meta_response(state: &AppState, status: StatusCode, meta: &StreamMeta) -> Response {
    let watchers = state.hub.watchers_of(&meta.id);
    json_response(status, to_json(&meta.to_json(watchers)))
}

/// Maps a refusal to its API error.
pub(super) fn refusal(stream: &str, r: Refusal) -> ApiError {
    match r {
        Refusal::StreamEnded => ApiError::stream_ended(stream),
        Refusal::NotFound => ApiError::stream_not_found(stream),
        Refusal::IdempotencyKeyReused => ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "idempotency_key_reused",
            "this Idempotency-Key was used with a different request",
        ),
    }
}

/// The stored first answer to an Idempotency-Key, replayed.
pub(super) fn replayed(status: u16, body: String) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
    let mut res = json_response(status, body);
    res.headers_mut()
        .insert("idempotent-replayed", HeaderValue::from_static("true"));
    res
}

/// `PUT /v1/streams/{id}`, body absent or `{"labels": {…}}` (which
/// replaces the labels): 201 when created, 200 when it existed.
pub(super) async fn create(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    RawBody(body): RawBody,
) -> Result<Response, ApiError> {
    let id = stream_id(&id)?;
    let op = if body.iter().all(u8::is_ascii_whitespace) {
        WriteOp::Create
    } else {
        input::check_content_type(&headers)?;
        WriteOp::Label(input::parse_labels(&body)?)
    };
    let req = WriteRequest {
        stream: id.to_owned(),
        op,
        idempotency: None,
    };
    match state.store.write(req).await? {
        WriteOutcome::Created { meta, created } => {
            let status = if created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            Ok(meta_response(&state, status, &meta))
        }
        WriteOutcome::Refused(r) => Err(refusal(id, r)),
        other => Err(unexpected(other)),
    }
}

/// `GET /v1/streams/{id}`.
pub(super) async fn get(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = stream_id(&id)?;
    match state.store.meta(id).await? {
        Some(meta) => Ok(meta_response(&state, StatusCode::OK, &meta)),
        None => Err(ApiError::stream_not_found(id)),
    }
}

/// `DELETE /v1/streams/{id}`: 204, or 404.
pub(super) async fn delete(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = stream_id(&id)?;
    let req = WriteRequest {
        stream: id.to_owned(),
        op: WriteOp::Delete,
        idempotency: None,
    };
    match state.store.write(req).await? {
        WriteOutcome::Deleted => Ok(StatusCode::NO_CONTENT.into_response()),
        WriteOutcome::Refused(r) => Err(refusal(id, r)),
        other => Err(unexpected(other)),
    }
}

/// `POST /v1/streams/{id}/complete`, body absent or `{"data"}`.
pub(super) async fn complete(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    RawBody(body): RawBody,
) -> Result<Response, ApiError> {
    end(state, id, headers, body, StreamState::Completed).await
}

/// `POST /v1/streams/{id}/fail`, body absent or `{"error": string}`.
pub(super) async fn fail(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    RawBody(body): RawBody,
) -> Result<Response, ApiError> {
    end(state, id, headers, body, StreamState::Failed).await
}

async fn end(
    state: AppState,
    id: String,
    headers: HeaderMap,
    body: axum::body::Bytes,
    end_state: StreamState,
) -> Result<Response, ApiError> {
    let id = stream_id(&id)?;
    input::check_content_type(&headers)?;
    let limits = Limits {
        max_event_bytes: state.config.max_event_bytes,
        max_batch: state.config.max_batch,
    };
    let data = match end_state {
        StreamState::Failed => input::parse_fail(&body, limits)?,
        _ => input::parse_complete(&body, limits)?,
    };
    let idempotency = input::idempotency_key(&headers, end_state.as_str(), &body)?;
    let req = WriteRequest {
        stream: id.to_owned(),
        op: WriteOp::End {
            state: end_state,
            data,
        },
        idempotency,
    };
    match state.store.write(req).await? {
        WriteOutcome::Ended { meta } => Ok(meta_response(&state, StatusCode::OK, &meta)),
        WriteOutcome::Replayed { status, body } => Ok(replayed(status, body)),
        WriteOutcome::Refused(r) => Err(refusal(id, r)),
        other => Err(unexpected(other)),
    }
}

/// `POST /v1/streams/{id}/cancel`: appends `jobcast.cancel_requested`
/// (data `{"by": subject}` when the token names one) and sets
/// `cancel_requested`, once; 200 with the metadata either way (idempotent),
/// 409 `stream_ended` once ended, 404 when missing.
pub(super) async fn cancel(
    State(state): State<AppState>,
    Path(id): Path<String>,
    grant: Option<Extension<Grant>>,
) -> Result<Response, ApiError> {
    let id = stream_id(&id)?;
    let by = grant.and_then(|Extension(g)| g.subject);
    let data = match by {
        Some(by) => serde_json::json!({ "by": by }).to_string(),
        None => "{}".to_owned(),
    };
    let req = WriteRequest {
        stream: id.to_owned(),
        op: WriteOp::Cancel { data },
        idempotency: None,
    };
    match state.store.write(req).await? {
        WriteOutcome::CancelRequested { meta, .. } => {
            Ok(meta_response(&state, StatusCode::OK, &meta))
        }
        WriteOutcome::Refused(r) => Err(refusal(id, r)),
        other => Err(unexpected(other)),
    }
}

/// `GET /v1/streams?state=&limit=&after=`: newest created first, only the
/// streams the token may subscribe to.
pub(super) async fn list(
    State(state): State<AppState>,
    grant: Option<Extension<Grant>>,
    q: Params,
) -> Result<Response, ApiError> {
    let grant = grant.map(|Extension(g)| g).unwrap_or_else(Grant::none);
    let q = params(q)?;
    let filter = match param(&q, "state") {
        None => None,
        Some(s) => Some(StreamState::parse(s).ok_or_else(|| {
            ApiError::bad_request("invalid_state", "state is open, completed or failed")
        })?),
    };
    let limit = match param(&q, "limit") {
        None => 100,
        Some(l) => l
            .parse::<u32>()
            .ok()
            .filter(|l| (1..=1000).contains(l))
            .ok_or_else(|| ApiError::bad_request("invalid_limit", "limit is 1..1000"))?,
    };
    let after = match param(&q, "after") {
        None => None,
        Some(c) => Some(decode_cursor(c).ok_or_else(|| {
            ApiError::bad_request(
                "invalid_cursor",
                "after takes the `next` of a previous page",
            )
        })?),
    };
    // A token sees only the streams it may subscribe to: the store filters
    // by its patterns, so every row looked at is a row returned, and the
    // cursor never stands on a stream the reader cannot see.
    let patterns = (grant != Grant::all()).then(|| grant.subscribe_patterns().to_vec());
    let Filters { prefix, labels } = list_filters(&q)?;
    let query = ListQuery {
        state: filter,
        limit: limit + 1,
        after,
        patterns,
        prefix,
        labels,
    };
    let mut rows = state.store.list(&query).await?;
    let more = rows.len() > limit as usize;
    rows.truncate(limit as usize);
    let next = if more {
        rows.last().map(encode_cursor)
    } else {
        None
    };
    let streams: Vec<_> = rows
        .iter()
        .map(|m| m.to_json(state.hub.watchers_of(&m.id)))
        .collect();
    Ok(json_response(
        StatusCode::OK,
        to_json(&serde_json::json!({ "streams": streams, "next": next })),
    ))
}

/// The list's filters besides the state: `prefix=` (of the id) and
/// `label.K=V` (each one must match).
pub(super) fn list_filters(
    q: &std::collections::HashMap<String, String>,
) -> Result<Filters, ApiError> {
    let prefix = param(q, "prefix").map(str::to_owned);
    let mut labels = Vec::new();
    let mut q: Vec<_> = q.iter().collect();
    q.sort();
    for (k, v) in q {
        if let Some(key) = k.strip_prefix("label.") {
            if !input::valid_label_key(key) {
                return Err(ApiError::bad_request(
                    "invalid_labels",
                    format!("label key {key:?}: 1 to 63 of A-Z a-z 0-9 _ - . /"),
                ));
            }
            labels.push((key.to_owned(), v.clone()));
        }
    }
    Ok(Filters { prefix, labels })
}

/// The list's `prefix=` and `label.K=V` filters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Filters {
    /// Only ids starting with this.
    pub(super) prefix: Option<String>,
    /// Only streams with every one of these labels.
    pub(super) labels: Vec<(String, String)>,
}

/// The list cursor: base64url of `{created_at ms}:{id}` of the last stream
/// of a page — only what that page shows. Opaque to clients (they pass it
/// back as `after`), so its form may change.
fn encode_cursor(m: &StreamMeta) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("{}:{}", m.created_at, m.id))
}

/// The position a cursor stands for; None when it is not one of ours.
fn decode_cursor(c: &str) -> Option<ListPosition> {
    use base64::Engine;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(c)
        .ok()?;
    let text = String::from_utf8(bytes).ok()?;
    let (time, id) = text.split_once(':')?;
    if time.is_empty() || !time.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    jobcast_protocol::validate_stream_id(id).ok()?;
    Some(ListPosition {
        created_at: time.parse().ok()?,
        id: id.to_owned(),
    })
}

/// A write answered with an outcome that does not fit its request: a bug,
/// reported as 503 rather than a panic.
pub(super) fn unexpected(o: WriteOutcome) -> ApiError {
    tracing::error!(outcome = ?o, "unexpected store outcome");
    ApiError::store_unavailable()
}
