//! PUT (create, fork), POST (append, close) and DELETE of DS streams.

use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, StatusCode};
use serde_json::value::RawValue;

use super::offset::{self, Start};
use super::{refusal, set, stream_id, tail_offset};
use crate::http::{ApiError, AppState, RawBody};
use crate::store::ds::{is_json_type, DsMeta, DsOp, DsOutcome, DsWrite, ForkFrom, Producer};

/// A header as text; a value that is not visible ASCII is a 400.
fn text<'a>(h: &'a HeaderMap, name: &str) -> Result<Option<&'a str>, ApiError> {
    match h.get(name) {
        None => Ok(None),
        Some(v) => v.to_str().map(|s| Some(s.trim())).map_err(|_| {
            ApiError::bad_request("invalid_header", format!("the {name} header is not text"))
        }),
    }
}

/// A decimal integer without sign, leading zeros, or fraction, ≤ `max`.
fn strict_uint(s: &str, max: u64) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) || (s.len() > 1 && s.starts_with('0'))
    {
        return None;
    }
    s.parse::<u64>().ok().filter(|v| *v <= max)
}

/// `Stream-Closed: true`.
fn closed_header(h: &HeaderMap) -> Result<bool, ApiError> {
    Ok(text(h, "stream-closed")?.is_some_and(|v| v.eq_ignore_ascii_case("true")))
}

/// The messages of a body: JSON streams flatten one level of array.
fn messages(json: bool, body: &[u8], allow_empty_array: bool) -> Result<Vec<Vec<u8>>, ApiError> {
    if body.is_empty() {
        return Ok(Vec::new());
    }
    if !json {
        return Ok(vec![body.to_vec()]);
    }
    let text = std::str::from_utf8(body)
        .map_err(|_| ApiError::bad_request("invalid_json", "the body is not UTF-8 JSON"))?;
    let value: &RawValue = serde_json::from_str(text)
        .map_err(|e| ApiError::bad_request("invalid_json", format!("the body is not JSON: {e}")))?;
    let raw = value.get().trim();
    if raw.starts_with('[') {
        let items: Vec<&RawValue> = serde_json::from_str(raw)
            .map_err(|e| ApiError::bad_request("invalid_json", e.to_string()))?;
        if items.is_empty() && !allow_empty_array {
            return Err(ApiError::bad_request(
                "empty_batch",
                "an empty JSON array appends nothing",
            ));
        }
        Ok(items
            .iter()
            .map(|m| m.get().trim().as_bytes().to_vec())
            .collect())
    } else {
        Ok(vec![raw.as_bytes().to_vec()])
    }
}

/// The common headers of a write's answer.
fn meta_headers(res: &mut Response, meta: &DsMeta) {
    let h = res.headers_mut();
    set(h, "stream-next-offset", &tail_offset(meta));
    set(h, "content-type", &meta.content_type);
    if meta.closed {
        set(h, "stream-closed", "true");
    }
}

/// `PUT {stream}`: create (201), confirm (200) or refuse (409).
pub(crate) async fn put(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    RawBody(body): RawBody,
) -> Result<Response, ApiError> {
    let id = stream_id(&id)?.to_owned();
    let content_type = text(&headers, "content-type")?
        .filter(|v| !v.is_empty())
        .map(str::to_owned);
    let ttl = text(&headers, "stream-ttl")?;
    let expires = text(&headers, "stream-expires-at")?;
    if ttl.is_some() && expires.is_some() {
        return Err(ApiError::bad_request(
            "ttl_and_expiry",
            "send Stream-TTL or Stream-Expires-At, not both",
        ));
    }
    let ttl_s = ttl
        .map(|v| {
            strict_uint(v, i64::MAX as u64 / 1000).ok_or_else(|| {
                ApiError::bad_request(
                    "invalid_ttl",
                    "Stream-TTL must be whole seconds (e.g. 3600)",
                )
            })
        })
        .transpose()?;
    let expires_at = expires
        .map(|v| {
            offset::parse_rfc3339(v).ok_or_else(|| {
                ApiError::bad_request("invalid_expires_at", "Stream-Expires-At must be RFC 3339")
            })
        })
        .transpose()?;
    let closed = closed_header(&headers)?;
    let source = text(&headers, "stream-forked-from")?.map(str::to_owned);
    let fork_offset = text(&headers, "stream-fork-offset")?;
    let sub = text(&headers, "stream-fork-sub-offset")?;
    let fork = match source {
        None => {
            if fork_offset.is_some() || sub.is_some() {
                return Err(ApiError::bad_request(
                    "invalid_fork",
                    "Stream-Fork-Offset and Stream-Fork-Sub-Offset need Stream-Forked-From",
                ));
            }
            None
        }
        Some(src) => {
            // The source as a DS path: the part after the stream prefix, if given as a URL path.
            let prefix = format!("{}{}", state.config.ds_prefix, "/v1/stream/");
            let src = src
                .strip_prefix(&prefix)
                .or_else(|| src.strip_prefix("/v1/stream/"))
                .unwrap_or(&src)
                .to_owned();
            let src = stream_id(&src)?.to_owned();
            let at = match fork_offset {
                None => None,
                Some(o) => match offset::parse(o) {
                    Some(Start::At(k, s)) => Some((k, s)),
                    Some(Start::Beginning) => Some((0, 0)),
                    _ => {
                        return Err(ApiError::bad_request(
                            "invalid_fork_offset",
                            "Stream-Fork-Offset is not an offset",
                        ))
                    }
                },
            };
            let sub = match sub {
                None => 0,
                Some(v) => strict_uint(v, u32::MAX as u64).ok_or_else(|| {
                    ApiError::bad_request(
                        "invalid_fork_sub_offset",
                        "Stream-Fork-Sub-Offset must be a whole number",
                    )
                })?,
            };
            if sub > 0 && at.is_none() {
                return Err(ApiError::bad_request(
                    "invalid_fork",
                    "Stream-Fork-Sub-Offset needs Stream-Fork-Offset",
                ));
            }
            Some(ForkFrom {
                source: src,
                at,
                sub,
            })
        }
    };
    // A fork's content type may come from its source: JSON parsing is
    // decided by the type the stream will have, so ask for it first.
    let effective_json = match (&content_type, &fork) {
        (Some(ct), _) => is_json_type(ct),
        (None, Some(f)) => state
            .store
            .ds_read(&f.source, None, 0)
            .await?
            .is_some_and(|p| p.meta.is_json()),
        (None, None) => false,
    };
    let messages = messages(effective_json, &body, true)?;
    let w = DsWrite {
        stream: id.clone(),
        op: DsOp::Create {
            content_type,
            ttl_s,
            expires_at,
            closed,
            messages,
            fork,
        },
    };
    match state.store.ds_write(w).await? {
        DsOutcome::Created(meta, created) => {
            let status = if created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            let mut res = status.into_response();
            meta_headers(&mut res, &meta);
            if created {
                let host = text(&headers, "host")?.unwrap_or("localhost");
                let location = format!("http://{host}{}/v1/stream/{id}", state.config.ds_prefix);
                set(res.headers_mut(), "location", &location);
            }
            Ok(res)
        }
        DsOutcome::Refused(r) => Ok(refusal(&id, r)),
        _ => Err(ApiError::store_unavailable()),
    }
}

/// The producer headers: all three or none (400 otherwise).
fn producer(h: &HeaderMap) -> Result<Option<Producer>, ApiError> {
    let id = text(h, "producer-id")?;
    let epoch = text(h, "producer-epoch")?;
    let seq = text(h, "producer-seq")?;
    let bad = |m: &str| ApiError::bad_request("invalid_producer", m.to_owned());
    match (id, epoch, seq) {
        (None, None, None) => Ok(None),
        (Some(id), Some(epoch), Some(seq)) => {
            if id.is_empty() {
                return Err(bad("Producer-Id must not be empty"));
            }
            const MAX: u64 = (1 << 53) - 1;
            let epoch = strict_uint(epoch, MAX)
                .ok_or_else(|| bad("Producer-Epoch must be an integer 0..2^53-1"))?;
            let seq = strict_uint(seq, MAX)
                .ok_or_else(|| bad("Producer-Seq must be an integer 0..2^53-1"))?;
            Ok(Some(Producer {
                id: id.to_owned(),
                epoch,
                seq,
            }))
        }
        _ => Err(bad(
            "Producer-Id, Producer-Epoch and Producer-Seq go together",
        )),
    }
}

/// `POST {stream}`: append (204; 200 for a producer's new data), close.
pub(crate) async fn post(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    RawBody(body): RawBody,
) -> Result<Response, ApiError> {
    let id = stream_id(&id)?.to_owned();
    let close = closed_header(&headers)?;
    let producer = producer(&headers)?;
    let stream_seq = text(&headers, "stream-seq")?.map(str::to_owned);
    let content_type = text(&headers, "content-type")?
        .filter(|v| !v.is_empty())
        .map(str::to_owned);
    if body.is_empty() && !close {
        return Err(ApiError::bad_request(
            "empty_body",
            "an append needs a body (or Stream-Closed: true)",
        ));
    }
    let messages = if body.is_empty() {
        Vec::new()
    } else {
        let Some(ct) = &content_type else {
            return Err(ApiError::bad_request(
                "missing_content_type",
                "an append needs a Content-Type",
            ));
        };
        messages(is_json_type(ct), &body, false)?
    };
    let appended_nothing = messages.is_empty();
    let w = DsWrite {
        stream: id.clone(),
        op: DsOp::Append {
            content_type,
            messages,
            stream_seq,
            producer,
            close,
        },
    };
    match state.store.ds_write(w).await? {
        DsOutcome::Appended {
            meta,
            duplicate,
            producer,
        } => {
            let status = if producer.is_some() && !duplicate && !appended_nothing {
                StatusCode::OK
            } else {
                StatusCode::NO_CONTENT
            };
            let mut res = status.into_response();
            let h = res.headers_mut();
            set(h, "stream-next-offset", &tail_offset(&meta));
            if meta.closed {
                set(h, "stream-closed", "true");
            }
            if let Some((epoch, seq)) = producer {
                set(h, "producer-epoch", &epoch.to_string());
                set(h, "producer-seq", &seq.to_string());
            }
            Ok(res)
        }
        DsOutcome::Refused(r) => Ok(refusal(&id, r)),
        _ => Err(ApiError::store_unavailable()),
    }
}

/// `DELETE {stream}`: 204; soft while forks read it; 404; 410 when soft-deleted.
pub(crate) async fn delete(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = stream_id(&id)?.to_owned();
    match state
        .store
        .ds_write(DsWrite {
            stream: id.clone(),
            op: DsOp::Delete,
        })
        .await?
    {
        DsOutcome::Deleted => Ok(StatusCode::NO_CONTENT.into_response()),
        DsOutcome::Refused(r) => Ok(refusal(&id, r)),
        _ => Err(ApiError::store_unavailable()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_bodies_flatten_one_level() {
        let m = |b: &str| {
            messages(true, b.as_bytes(), false).map(|v| {
                v.into_iter()
                    .map(|m| String::from_utf8(m).unwrap())
                    .collect::<Vec<_>>()
            })
        };
        assert_eq!(m(r#"{"a":1}"#).unwrap(), vec![r#"{"a":1}"#]);
        assert_eq!(
            m(r#"[{"a":1}, {"b":2}]"#).unwrap(),
            vec![r#"{"a":1}"#, r#"{"b":2}"#]
        );
        assert_eq!(m("[[1,2],[3,4]]").unwrap(), vec!["[1,2]", "[3,4]"]);
        assert_eq!(m("[[[1,2,3]]]").unwrap(), vec!["[[1,2,3]]"]);
        assert_eq!(m("[]").unwrap_err().code, "empty_batch");
        assert_eq!(m("{nope").unwrap_err().code, "invalid_json");
        assert!(messages(true, b"[]", true).unwrap().is_empty());
    }

    #[test]
    fn strict_integers() {
        assert_eq!(strict_uint("3600", u64::MAX), Some(3600));
        assert_eq!(strict_uint("0", u64::MAX), Some(0));
        for bad in ["", "+1", "01", "1.0", "3.6e3", "-1", " 1"] {
            assert_eq!(strict_uint(bad, u64::MAX), None, "{bad}");
        }
    }
}
