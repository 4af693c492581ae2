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
use super::sse::{clock, failure, run_reads};
use super::streams::{refusal, replayed, unexpected};
use super::{
    json_response, param, params, sse, stream_id, to_json, wants_sse, ApiError, AppState, Params,
    RawBody,
};
use crate::auth::Grant;
use crate::metrics::Stage;
use crate::store::{append_response_body, WriteOp, WriteOutcome, WriteRequest};
use crate::watch::{Mode, PageAnswer, Resume, Settings, Step, Watch};

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
    state.metrics.stage(Stage::Parse, started.elapsed());
    match state.store.write(req).await? {
        WriteOutcome::Appended {
            epoch,
            first_seq,
            last_seq,
            cancel_requested,
        } => {
            state.metrics.appended(count, started.elapsed());
            Ok(json_response(
                StatusCode::CREATED,
                append_response_body(&epoch, first_seq, last_seq, cancel_requested),
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
    peer: Option<Extension<crate::limits::Peer>>,
    headers: HeaderMap,
    q: Params,
) -> Result<Response, ApiError> {
    let id = stream_id(&id)?;
    let q = params(q)?;
    crate::ds::refuse_byte_stream(&state, id).await?;
    let grant = grant.map(|Extension(g)| g).unwrap_or_else(Grant::none);
    // No response outlives its authorization: SSE closes with `token_expired`
    // and a long-poll answers at the token's expiry.
    let expires = grant.remaining().map(|left| Instant::now() + left);
    if wants_sse(&headers) {
        let last_event_id = headers
            .get("last-event-id")
            .map(|v| v.to_str().unwrap_or("\u{0}"))
            .filter(|v| !v.is_empty());
        let resume = resume(last_event_id.or(param(&q, "last_event_id")), &q)?;
        let wait = wait(&q, state.config.default_wait, state.config.max_wait)?;
        let who = sse::Who {
            ip: peer.map(|Extension(p)| p.0),
            subject: grant.subject,
        };
        return sse::watch(state, id.to_owned(), resume, wait, expires, who).await;
    }
    page(state, id, &q, expires).await
}

/// The largest N of `from=tail:N` (for more, `from=start`).
const MAX_TAIL: u64 = 1_000_000;

/// The resume point: an explicit id, else `from=start|live|tail:N`, else the start.
fn resume(id: Option<&str>, q: &HashMap<String, String>) -> Result<Resume, ApiError> {
    if let Some(id) = id {
        return EventId::parse(id)
            .map(Resume::After)
            .map_err(|e| ApiError::bad_request("invalid_event_id", e.to_string()));
    }
    match param(q, "from") {
        None => Ok(Resume::Start),
        Some(from) => {
            parse_from(from).map_err(|message| ApiError::bad_request("invalid_from", message))
        }
    }
}

/// `start`, `live` or `tail:N` (N whole, 0..=[`MAX_TAIL`]); else the reason.
fn parse_from(from: &str) -> Result<Resume, String> {
    match from {
        "start" => return Ok(Resume::Start),
        "live" => return Ok(Resume::Live),
        _ => {}
    }
    let Some(n) = from.strip_prefix("tail:") else {
        return Err("from is start, live or tail:N".into());
    };
    // Digits only: no sign, no spaces, no exponent; at most 7 of them.
    if n.is_empty() || n.len() > 7 || !n.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "tail:N takes a whole number of events, 0..{MAX_TAIL} (e.g. tail:100)"
        ));
    }
    match n.parse::<u64>() {
        Ok(n) if n <= MAX_TAIL => Ok(Resume::Tail(n)),
        _ => Err(format!(
            "tail:N takes a whole number of events, 0..{MAX_TAIL} (e.g. tail:100)"
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

/// The JSON page of the log, long-polling with `wait`: the I/O shell
/// around [`Watch`] in page mode.
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
    let now = Instant::now();
    let mut deadline = now + wait;
    if let Some(expires) = expires {
        deadline = deadline.min(expires);
    }
    // Subscribe before reading, so an append between the read and the wait wakes us.
    let sub = state.hub.subscribe(id);
    let settings = Settings {
        heartbeat: state.config.heartbeat,
        close_at: deadline.into_std(),
        wait_until: deadline.into_std(),
        expires_at: None,
        store_retry_limit: Duration::ZERO,
        page_size: limit,
    };
    let mut w = Watch::new(Mode::Page { limit }, resume, settings, now.into_std(), 1);
    let mut step = w.next(clock(), &sub);
    loop {
        step = match run_reads(&state, id, &mut w, &sub, step).await {
            Step::Respond(answer) => return Ok(page_response(&answer)),
            Step::Fail(f) => return Err(failure(f, id)),
            Step::Wait { .. } => {
                // Register, ask once more, then sleep until a wake-up or the deadline.
                let notified = sub.notified();
                let mut notified = std::pin::pin!(notified);
                notified.as_mut().enable();
                match w.next(clock(), &sub) {
                    Step::Wait { until } => {
                        // A publish or change of this stream (or the hub closing), or the deadline.
                        tokio::select! {
                            _ = &mut notified => {}
                            _ = tokio::time::sleep_until(Instant::from_std(until)) => {}
                        }
                        w.next(clock(), &sub)
                    }
                    other => other,
                }
            }
            // SSE steps do not occur in page mode.
            other => return Err(unexpected_step(other)),
        };
    }
}

fn unexpected_step(step: Step) -> ApiError {
    tracing::error!(?step, "a page watch asked for an SSE step");
    ApiError::store_unavailable()
}

/// The JSON body of a page.
fn page_response(p: &PageAnswer) -> Response {
    let epoch = &p.meta.epoch;
    let events: Vec<_> = p
        .events
        .iter()
        .map(|e| jobcast_protocol::Event {
            id: EventId::new(epoch.clone(), e.seq).to_string(),
            seq: e.seq,
            event_type: e.event_type.clone(),
            data: e.data.clone(),
            time: crate::time::rfc3339(e.time),
        })
        .collect();
    let mut body = serde_json::json!({
        "events": events,
        "next": p.next.as_ref().map(|n| n.to_string()),
        "state": p.meta.state.as_str(),
    });
    if let Some(reset) = &p.reset {
        body["reset"] = serde_json::to_value::<&ResetPayload>(reset).unwrap_or_default();
    }
    json_response(StatusCode::OK, to_json(&body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_values() {
        assert_eq!(parse_from("start"), Ok(Resume::Start));
        assert_eq!(parse_from("live"), Ok(Resume::Live));
        assert_eq!(parse_from("tail:0"), Ok(Resume::Tail(0)));
        assert_eq!(parse_from("tail:007"), Ok(Resume::Tail(7)));
        assert_eq!(parse_from("tail:1000000"), Ok(Resume::Tail(MAX_TAIL)));
        for bad in [
            "tail:",
            "tail:-1",
            "tail:+1",
            "tail: 1",
            "tail:1.5",
            "tail:1e3",
            "tail:abc",
            "tail:1000001",
            "tail:99999999999999999999999",
            "tail",
            "TAIL:1",
            "tail:1 ",
            "Start",
            "",
        ] {
            assert!(parse_from(bad).is_err(), "{bad:?}");
        }
    }
}
