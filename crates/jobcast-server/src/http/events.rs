//! `/v1/streams/{id}/events`: append (POST), and read (GET) as SSE or as a
//! JSON page with optional long-poll.

use std::collections::HashMap;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::response::Response;
use axum::Extension;
use http::{HeaderMap, StatusCode};
use jobcast_protocol::{EventId, ResetPayload};
use tokio::time::Instant;

use super::input::{self, Limits};
use super::streams::{refusal, replayed, unexpected};
use super::{
    json_response, param, params, sse, stream_id, to_json, wants_sse, ApiError, AppState, Params,
    RawBody,
};
use crate::auth::Grant;
use crate::store::{append_response_body, WriteOp, WriteOutcome, WriteRequest};
use crate::watch::{self, Resume};

/// `POST /v1/streams/{id}/events`: one event or a batch; 201 `{"first_id","last_id","count"}`.
pub(super) async fn append(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    RawBody(body): RawBody,
) -> Result<Response, ApiError> {
    let id = stream_id(&id)?;
    input::check_content_type(&headers)?;
    let limits = Limits {
        max_event_bytes: state.config.max_event_bytes,
        max_batch: state.config.max_batch,
    };
    let started = std::time::Instant::now();
    let events = input::parse_append(&body, limits)?;
    let count = events.len() as u64;
    let idempotency = input::idempotency_key(&headers, "append", &body)?;
    let req = WriteRequest {
        stream: id.to_owned(),
        op: WriteOp::Append(events),
        idempotency,
    };
    match state.store.write(req).await? {
        WriteOutcome::Appended {
            epoch,
            first_seq,
            last_seq,
        } => {
            state.metrics.appended(count, started.elapsed());
            Ok(json_response(
                StatusCode::CREATED,
                append_response_body(&epoch, first_seq, last_seq),
            ))
        }
        WriteOutcome::Replayed { status, body } => Ok(replayed(status, body)),
        WriteOutcome::Refused(r) => Err(refusal(id, r)),
        other => Err(unexpected(other)),
    }
}

/// `GET /v1/streams/{id}/events`: SSE when `Accept` names `text/event-stream`, else JSON.
pub(super) async fn read(
    State(state): State<AppState>,
    Path(id): Path<String>,
    grant: Option<Extension<Grant>>,
    headers: HeaderMap,
    q: Params,
) -> Result<Response, ApiError> {
    let id = stream_id(&id)?;
    let q = params(q)?;
    // No response outlives its authorization: SSE closes with `token_expired`
    // and a long-poll answers at the token's expiry.
    let expires = grant
        .map(|Extension(g)| g)
        .unwrap_or_else(Grant::none)
        .remaining()
        .map(|left| Instant::now() + left);
    if wants_sse(&headers) {
        let last_event_id = headers
            .get("last-event-id")
            .map(|v| v.to_str().unwrap_or("\u{0}"))
            .filter(|v| !v.is_empty());
        let resume = resume(last_event_id.or(param(&q, "last_event_id")), &q)?;
        let wait = wait(&q, state.config.default_wait, state.config.max_wait)?;
        return sse::watch(state, id.to_owned(), resume, wait, expires).await;
    }
    page(state, id, &q, expires).await
}

/// The resume point: an explicit id, else `from=start|live`, else the start.
fn resume(id: Option<&str>, q: &HashMap<String, String>) -> Result<Resume, ApiError> {
    if let Some(id) = id {
        return EventId::parse(id)
            .map(Resume::After)
            .map_err(|e| ApiError::bad_request("invalid_event_id", e.to_string()));
    }
    match param(q, "from") {
        None | Some("start") => Ok(Resume::Start),
        Some("live") => Ok(Resume::Live),
        Some(_) => Err(ApiError::bad_request(
            "invalid_from",
            "from is start or live",
        )),
    }
}

/// `?wait=`: whole seconds 0..cap (larger values capped), else 400.
fn wait(
    q: &HashMap<String, String>,
    default: Duration,
    cap: Duration,
) -> Result<Duration, ApiError> {
    let Some(w) = param(q, "wait") else {
        return Ok(default.min(cap));
    };
    if !w.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ApiError::bad_request(
            "invalid_wait",
            "wait is whole seconds, e.g. wait=30",
        ));
    }
    // All digits: only overflow can fail, and that is "larger than the cap".
    let secs = w.parse::<u64>().unwrap_or(u64::MAX);
    Ok(Duration::from_secs(secs).min(cap))
}

/// The JSON page of the log, long-polling with `wait`.
async fn page(
    state: AppState,
    id: &str,
    q: &HashMap<String, String>,
    expires: Option<Instant>,
) -> Result<Response, ApiError> {
    let resume = resume(param(q, "after"), q)?;
    let limit = match param(q, "limit") {
        None => 100,
        Some(l) => l
            .parse::<u32>()
            .ok()
            .filter(|l| (1..=1000).contains(l))
            .ok_or_else(|| ApiError::bad_request("invalid_limit", "limit is 1..1000"))?,
    };
    let wait = wait(q, Duration::ZERO, state.config.max_wait)?;
    let mut deadline = Instant::now() + wait;
    if let Some(expires) = expires {
        deadline = deadline.min(expires);
    }
    // Subscribe before reading, so an append between the read and the wait wakes us.
    let sub = (!wait.is_zero()).then(|| state.hub.subscribe(id));
    let mut start: Option<watch::Start> = None;
    loop {
        let notified = sub.as_ref().map(|s| s.notified());
        let mut notified = std::pin::pin!(notified);
        if let Some(n) = notified.as_mut().as_pin_mut() {
            n.enable();
        }
        let guess = match (&start, &resume) {
            (Some(s), _) => s.sent,
            (None, Resume::After(id)) => id.seq,
            (None, Resume::Start) => 0,
            (None, Resume::Live) => u64::MAX,
        };
        let mut found = state.store.read(id, guess, limit).await?;
        if let (None, Some(p)) = (&start, &found) {
            let s = watch::start(&p.meta, &resume);
            if s.sent != guess {
                found = state.store.read(id, s.sent, limit).await?;
            }
            start = Some(s);
        }
        let timed_out = Instant::now() >= deadline;
        match (found, &start) {
            (Some(p), Some(s)) if !p.events.is_empty() || timed_out || p.meta.ended() => {
                let ended = p.meta.ended()
                    && p.events
                        .last()
                        .map_or(s.sent >= p.meta.head, |e| e.seq == p.meta.head);
                let last = p.events.last().map_or(s.sent, |e| e.seq);
                let next = (!ended).then(|| EventId::new(p.meta.epoch.clone(), last).to_string());
                let events: Vec<_> = p
                    .events
                    .iter()
                    .map(|e| jobcast_protocol::Event {
                        id: EventId::new(p.meta.epoch.clone(), e.seq).to_string(),
                        seq: e.seq,
                        event_type: e.event_type.clone(),
                        data: e.data.clone(),
                        time: crate::time::rfc3339(e.time),
                    })
                    .collect();
                let mut body = serde_json::json!({
                    "events": events,
                    "next": next,
                    "state": p.meta.state.as_str(),
                });
                if let Some(reset) = &s.reset {
                    body["reset"] =
                        serde_json::to_value::<&ResetPayload>(reset).unwrap_or_default();
                }
                return Ok(json_response(StatusCode::OK, to_json(&body)));
            }
            (None, _) if timed_out => return Err(ApiError::stream_not_found(id)),
            _ => {}
        }
        // Nothing yet: wait for a publish, a creation, or the deadline.
        tokio::select! {
            _ = async { if let Some(n) = notified.as_mut().as_pin_mut() { n.await } } => {}
            _ = tokio::time::sleep_until(deadline) => {}
            _ = state.shutdown.cancelled() => return Err(crate::store::StoreError::Closed.into()),
        }
    }
}
