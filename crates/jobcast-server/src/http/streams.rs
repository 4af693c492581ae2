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
use crate::store::{ListQuery, Refusal, StreamMeta, WriteOp, WriteOutcome, WriteRequest};

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

/// `PUT /v1/streams/{id}`: 201 when created, 200 when it existed.
pub(super) async fn create(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = stream_id(&id)?;
    let req = WriteRequest {
        stream: id.to_owned(),
        op: WriteOp::Create,
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

/// Rows looked at per store page when the list is filtered by a token.
const FILTER_PAGE: u32 = 500;
/// Store pages looked at for one filtered list answer: a token that sees few
/// of many streams gets shorter pages (with a `next`), never an unbounded scan.
const FILTER_PAGES: usize = 8;

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
    let before_key = match param(&q, "after") {
        None => None,
        Some(c) => Some(c.parse::<i64>().ok().filter(|k| *k > 0).ok_or_else(|| {
            ApiError::bad_request(
                "invalid_cursor",
                "after takes the `next` of a previous page",
            )
        })?),
    };
    let (rows, next) = if grant == Grant::all() {
        let query = ListQuery {
            state: filter,
            limit: limit + 1,
            before_key,
        };
        let mut rows = state.store.list(&query).await?;
        let more = rows.len() > limit as usize;
        rows.truncate(limit as usize);
        let next = if more {
            rows.last().map(|m| m.key.to_string())
        } else {
            None
        };
        (rows, next)
    } else {
        filtered(&state, &grant, filter, limit as usize, before_key).await?
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

/// The list filtered by `grant`, looking at a bounded number of store pages;
/// `next` continues after the last row looked at.
async fn filtered(
    state: &AppState,
    grant: &Grant,
    filter: Option<StreamState>,
    limit: usize,
    mut before_key: Option<i64>,
) -> Result<(Vec<StreamMeta>, Option<String>), ApiError> {
    let mut out = Vec::new();
    for _ in 0..FILTER_PAGES {
        let query = ListQuery {
            state: filter,
            limit: FILTER_PAGE,
            before_key,
        };
        let rows = state.store.list(&query).await?;
        let exhausted = rows.len() < FILTER_PAGE as usize;
        for m in rows {
            before_key = Some(m.key);
            if grant.may_subscribe(&m.id) {
                out.push(m);
                if out.len() == limit {
                    // Full: whether more follow is found out by the next page.
                    return Ok((out, before_key.map(|k| k.to_string())));
                }
            }
        }
        if exhausted {
            return Ok((out, None));
        }
    }
    Ok((out, before_key.map(|k| k.to_string())))
}

/// A write answered with an outcome that does not fit its request: a bug,
/// reported as 503 rather than a panic.
pub(super) fn unexpected(o: WriteOutcome) -> ApiError {
    tracing::error!(outcome = ?o, "unexpected store outcome");
    ApiError::store_unavailable()
}
