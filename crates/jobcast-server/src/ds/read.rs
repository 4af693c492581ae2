//! HEAD and GET of DS streams: catch-up, long-poll and SSE. Waiting is the
//! hub's: subscribe first, register on the entry's notification, read the
//! store (the source of truth), then sleep on the notification or a timer,
//! so an append committed between the read and the sleep is never missed.
//! The hub is fed by this node's writer and, on PostgreSQL, by the listener
//! for other nodes' commits.

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use rand::Rng;

use super::offset::{self, Start};
use super::{body_of, has_credentials, set, sse_base64, stream_id, tail_offset};
use crate::http::{ApiError, AppState};
use crate::store::ds::{DsMeta, DsOp, DsPage, DsWrite};

/// Most message bytes in one catch-up answer or SSE data event.
const CHUNK_BYTES: usize = 1 << 20;
/// An SSE connection ends after this long (the protocol asks for ~60 s, so
/// CDNs can collapse clients); the client reconnects from its offset.
const SSE_MAX: Duration = Duration::from_secs(60);

/// The read's query: `offset`, `live`, `cursor` (others are ignored).
struct ReadQuery {
    offset: Option<String>,
    live: Option<String>,
    cursor: Option<String>,
}

fn parse_query(q: Option<&str>) -> Result<ReadQuery, ApiError> {
    let mut out = ReadQuery {
        offset: None,
        live: None,
        cursor: None,
    };
    for pair in q.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let decode = |s: &str| -> Result<String, ApiError> {
            let s = s.replace('+', " ");
            percent_decode(&s)
                .ok_or_else(|| ApiError::bad_request("invalid_query", "bad percent-encoding"))
        };
        let slot = match k {
            "offset" => &mut out.offset,
            "live" => &mut out.live,
            "cursor" => &mut out.cursor,
            _ => continue,
        };
        if slot.is_some() {
            return Err(ApiError::bad_request(
                "invalid_query",
                format!("{k} is given more than once"),
            ));
        }
        *slot = Some(decode(v)?);
    }
    Ok(out)
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let h = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(h, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Where the read starts, as a seq, checked against the stream.
fn start_seq(meta: &DsMeta, start: Start) -> Result<u64, ApiError> {
    match start {
        Start::Beginning => Ok(0),
        Start::Now => Ok(meta.tail),
        Start::At(k, s) => {
            if s <= meta.tail && meta.owner(s) == k {
                Ok(s)
            } else if meta.chain.iter().any(|&(c, _)| c == k) {
                Err(ApiError::bad_request(
                    "invalid_offset",
                    "the offset is not a position of this stream",
                ))
            } else {
                Err(ApiError::new(
                    StatusCode::GONE,
                    "offset_gone",
                    "the offset belongs to another creation of this stream",
                ))
            }
        }
    }
}

fn cache_public(headers: &HeaderMap, query: Option<&str>) -> &'static str {
    if has_credentials(headers, query) {
        "private, no-store"
    } else {
        "public, max-age=60, stale-while-revalidate=300"
    }
}

/// `HEAD`/`GET {stream}`.
pub(crate) async fn get(
    State(state): State<AppState>,
    Path(id): Path<String>,
    method: Method,
    uri: http::Uri,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let id = stream_id(&id)?.to_owned();
    let q = parse_query(uri.query())?;
    let start = match q.offset.as_deref() {
        None => None,
        Some(o) => Some(offset::parse(o).ok_or_else(|| {
            ApiError::bad_request("invalid_offset", "the offset is not one this server gave")
        })?),
    };
    let live = match q.live.as_deref() {
        None | Some("") => None,
        Some("long-poll") => Some(false),
        Some("sse") => Some(true),
        Some(_) => {
            return Err(ApiError::bad_request(
                "invalid_live",
                "live must be long-poll or sse",
            ))
        }
    };
    let meta = current(&state, &id).await?;
    if method == Method::HEAD {
        let mut res = StatusCode::OK.into_response();
        let h = res.headers_mut();
        set(h, "content-type", &meta.content_type);
        set(h, "stream-next-offset", &tail_offset(&meta));
        set(h, "cache-control", "no-store");
        if meta.closed {
            set(h, "stream-closed", "true");
        }
        if let Some(ttl) = meta.ttl_s {
            // The TTL as configured: it slides with every write and read.
            set(h, "stream-ttl", &ttl.to_string());
        }
        if let Some(at) = meta.expires_at {
            set(h, "stream-expires-at", &crate::time::rfc3339(at));
        }
        return Ok(res);
    }
    if meta.ttl_s.is_some() {
        // A read slides the TTL (HEAD does not).
        state
            .store
            .ds_write(DsWrite {
                stream: id.clone(),
                op: DsOp::Touch,
            })
            .await?;
    }
    match live {
        None => {
            let start = start.unwrap_or(Start::Beginning);
            let from = start_seq(&meta, start)?;
            catch_up(
                &state,
                &id,
                &headers,
                uri.query(),
                from,
                start == Start::Now,
            )
            .await
        }
        Some(sse) => {
            let Some(start) = start else {
                return Err(ApiError::bad_request(
                    "offset_required",
                    "live reads need an offset",
                ));
            };
            let from = start_seq(&meta, start)?;
            if sse {
                Ok(self::sse(state, id, meta, from, q.cursor))
            } else {
                long_poll(&state, &id, from, q.cursor.as_deref()).await
            }
        }
    }
}

/// The stream as it is now: 404 when absent or expired, 410 when soft-deleted.
async fn current(state: &AppState, id: &str) -> Result<DsMeta, ApiError> {
    let page = state.store.ds_read(id, None, 0).await?;
    check(id, page.map(|p| p.meta))
}

fn check(id: &str, meta: Option<DsMeta>) -> Result<DsMeta, ApiError> {
    match meta {
        None => Err(ApiError::stream_not_found(id)),
        Some(m) if m.expired(crate::time::now_ms()) => Err(ApiError::stream_not_found(id)),
        Some(m) if m.deleted => Err(ApiError::new(
            StatusCode::GONE,
            "stream_deleted",
            format!("stream {id:?} was deleted"),
        )),
        Some(m) => Ok(m),
    }
}

async fn page(state: &AppState, id: &str, from: u64) -> Result<DsPage, ApiError> {
    let page = state.store.ds_read(id, Some(from), CHUNK_BYTES).await?;
    let meta = check(id, page.as_ref().map(|p| p.meta.clone()))?;
    Ok(DsPage {
        meta,
        messages: page.map(|p| p.messages).unwrap_or_default(),
    })
}

/// The answer carrying a page (catch-up, or a long-poll that got data).
fn data_response(page: &DsPage, from: u64) -> (Response, String, bool) {
    let meta = &page.meta;
    let next = page.messages.last().map_or(from, |m| m.0);
    let next_offset = offset::encode(meta.owner(next), next);
    let up_to_date = next >= meta.tail;
    let mut res = (StatusCode::OK, body_of(meta, &page.messages)).into_response();
    let h = res.headers_mut();
    set(h, "content-type", &meta.content_type);
    set(h, "stream-next-offset", &next_offset);
    if up_to_date {
        set(h, "stream-up-to-date", "true");
        if meta.closed {
            set(h, "stream-closed", "true");
        }
    }
    (res, next_offset, up_to_date)
}

async fn catch_up(
    state: &AppState,
    id: &str,
    headers: &HeaderMap,
    query: Option<&str>,
    from: u64,
    now: bool,
) -> Result<Response, ApiError> {
    let mut page = page(state, id, from).await?;
    if now {
        page.messages.clear();
    }
    let (mut res, next_offset, up_to_date) = data_response(&page, from);
    let h = res.headers_mut();
    if now {
        set(h, "cache-control", "no-store");
        return Ok(res);
    }
    let closed = if up_to_date && page.meta.closed {
        ":c"
    } else {
        ""
    };
    let etag = format!(
        "\"{}:{next_offset}{closed}\"",
        offset::encode(page.meta.owner(from), from)
    );
    let matches = headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim() == etag || t.trim() == "*");
    set(h, "etag", &etag);
    set(h, "cache-control", cache_public(headers, query));
    if matches {
        let mut not_modified = StatusCode::NOT_MODIFIED.into_response();
        let nh = not_modified.headers_mut();
        for name in [
            "etag",
            "stream-next-offset",
            "stream-up-to-date",
            "stream-closed",
            "cache-control",
        ] {
            if let Some(v) = res.headers().get(name) {
                nh.insert(header::HeaderName::from_static(name), v.clone());
            }
        }
        return Ok(not_modified);
    }
    Ok(res)
}

fn jitter() -> u64 {
    rand::rng().random_range(1..=180)
}

async fn long_poll(
    state: &AppState,
    id: &str,
    from: u64,
    cursor: Option<&str>,
) -> Result<Response, ApiError> {
    let sub = state.hub.subscribe(id);
    let entry = sub.entry();
    let deadline = tokio::time::Instant::now() + state.config.ds_long_poll;
    let cursor = offset::cursor(crate::time::now_ms(), cursor, jitter());
    loop {
        let notified = entry.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let page = page(state, id, from).await?;
        if !page.messages.is_empty() {
            let (mut res, _, _) = data_response(&page, from);
            let h = res.headers_mut();
            set(h, "stream-cursor", &cursor);
            set(
                h,
                "cache-control",
                "private, max-age=60, stale-while-revalidate=300",
            );
            return Ok(res);
        }
        let closed_at_tail = page.meta.closed && from >= page.meta.tail;
        let timed_out = tokio::time::Instant::now() >= deadline;
        if closed_at_tail || timed_out || state.shutdown.is_cancelled() {
            let mut res = StatusCode::NO_CONTENT.into_response();
            let h = res.headers_mut();
            set(
                h,
                "stream-next-offset",
                &offset::encode(page.meta.owner(from), from),
            );
            set(h, "stream-up-to-date", "true");
            set(h, "cache-control", "no-store");
            if closed_at_tail {
                set(h, "stream-closed", "true");
            } else {
                set(h, "stream-cursor", &cursor);
            }
            return Ok(res);
        }
        tokio::select! {
            _ = notified => {}
            _ = tokio::time::sleep_until(deadline) => {}
            _ = state.shutdown.cancelled() => {}
        }
    }
}

/// One SSE data event: JSON arrays and text as `data:` lines (CR, LF and
/// CRLF are line breaks, so data can never start a field or an event),
/// other content types as one line of base64.
fn data_event(meta: &DsMeta, messages: &[(u64, Vec<u8>)], out: &mut Vec<u8>) {
    out.extend_from_slice(b"event: data\n");
    let payload = body_of(meta, messages);
    if sse_base64(&meta.content_type) {
        out.extend_from_slice(b"data:");
        out.extend_from_slice(
            base64::engine::general_purpose::STANDARD
                .encode(&payload)
                .as_bytes(),
        );
        out.push(b'\n');
    } else {
        let text = String::from_utf8_lossy(&payload);
        let mut rest: &str = &text;
        loop {
            let cut = rest.find(['\r', '\n']);
            let line = &rest[..cut.unwrap_or(rest.len())];
            // `data:` then the line; a space after the colon is dropped by
            // every parser, so a line that starts with one gets another.
            out.extend_from_slice(if line.starts_with(' ') {
                b"data: "
            } else {
                b"data:"
            });
            out.extend_from_slice(line.as_bytes());
            out.push(b'\n');
            match cut {
                None => break,
                Some(i) => {
                    let skip = if rest[i..].starts_with("\r\n") { 2 } else { 1 };
                    rest = &rest[i + skip..];
                }
            }
        }
    }
    out.push(b'\n');
}

fn control_event(
    next_offset: &str,
    cursor: &str,
    up_to_date: bool,
    closed: bool,
    out: &mut Vec<u8>,
) {
    let mut v = serde_json::json!({ "streamNextOffset": next_offset });
    if closed {
        v["streamClosed"] = true.into();
    } else {
        v["streamCursor"] = cursor.into();
    }
    if up_to_date {
        v["upToDate"] = true.into();
    }
    out.extend_from_slice(b"event: control\ndata:");
    out.extend_from_slice(v.to_string().as_bytes());
    out.extend_from_slice(b"\n\n");
}

fn sse(state: AppState, id: String, meta: DsMeta, from: u64, cursor: Option<String>) -> Response {
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(4);
    let base64 = sse_base64(&meta.content_type);
    tokio::spawn(async move {
        let sub = state.hub.subscribe(&id);
        let entry = sub.entry();
        let deadline = tokio::time::Instant::now() + SSE_MAX;
        let mut pos = from;
        let mut told_up_to_date = false;
        loop {
            let notified = entry.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let Ok(page) = page(&state, &id, pos).await else {
                break;
            };
            let cursor = offset::cursor(crate::time::now_ms(), cursor.as_deref(), jitter());
            let mut out = Vec::new();
            if let Some(&(last, _)) = page.messages.last() {
                data_event(&page.meta, &page.messages, &mut out);
                pos = last;
                told_up_to_date = false;
            }
            let at_tail = pos >= page.meta.tail;
            let closed = at_tail && page.meta.closed;
            if !out.is_empty() || (at_tail && !told_up_to_date) || closed {
                let next = offset::encode(page.meta.owner(pos), pos);
                control_event(&next, &cursor, at_tail, closed, &mut out);
                told_up_to_date = at_tail;
            }
            if !out.is_empty() && tx.send(Bytes::from(out)).await.is_err() {
                break;
            }
            if closed {
                break;
            }
            if !at_tail {
                continue;
            }
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep_until(deadline) => break,
                _ = tokio::time::sleep(state.config.heartbeat) => {
                    if tx.send(Bytes::from_static(b":\n\n")).await.is_err() {
                        break;
                    }
                }
                _ = state.shutdown.cancelled() => break,
            }
        }
        drop(sub);
    });
    let body = Body::from_stream(futures::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, std::convert::Infallible>(b), rx))
    }));
    let mut res = (StatusCode::OK, body).into_response();
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        header::HeaderName::from_static("x-accel-buffering"),
        HeaderValue::from_static("no"),
    );
    if base64 {
        set(h, "stream-sse-data-encoding", "base64");
    }
    res
}
