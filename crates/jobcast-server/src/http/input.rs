//! Parsing and validation of request bodies and headers, with no I/O, so
//! that every rule has a unit test (and a fuzz target).

use std::collections::HashMap;

use http::{header, HeaderMap, StatusCode};
use jobcast_protocol::{json::compact, validate_event_type, DEFAULT_EVENT_TYPE, RESERVED_PREFIX};
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};

use super::ApiError;
use crate::store::{IdempotencyKey, NewEvent};

/// Limits that apply to an append.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest event data as stored, in bytes.
    pub max_event_bytes: usize,
    /// Most events in one request.
    pub max_batch: usize,
}

/// `Content-Type` must be absent, `application/json` or `…+json`: else 415.
pub fn check_content_type(headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(ct) = headers.get(header::CONTENT_TYPE) else {
        return Ok(());
    };
    let essence = ct
        .to_str()
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let ok = essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"));
    if ok {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "the body must be JSON (Content-Type: application/json)",
        ))
    }
}

/// The `Idempotency-Key` header with the hash of `op` and `body`: 1 to 255
/// visible ASCII characters, else 400 `invalid_idempotency_key`.
pub fn idempotency_key(
    headers: &HeaderMap,
    op: &str,
    body: &[u8],
) -> Result<Option<IdempotencyKey>, ApiError> {
    let Some(v) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let key = v.to_str().unwrap_or("");
    if key.is_empty() || key.len() > 255 || !key.bytes().all(|b| b.is_ascii_graphic() || b == b' ')
    {
        return Err(ApiError::bad_request(
            "invalid_idempotency_key",
            "Idempotency-Key must be 1 to 255 visible ASCII characters",
        ));
    }
    let mut h = Sha256::new();
    h.update(op.as_bytes());
    h.update([0]);
    h.update(body);
    Ok(Some(IdempotencyKey {
        key: key.to_owned(),
        hash: h.finalize().into(),
    }))
}

fn invalid_json(e: serde_json::Error) -> ApiError {
    ApiError::bad_request("invalid_json", format!("the body is not valid JSON: {e}"))
}

/// An object's members, kept as raw JSON.
type Members<'a> = HashMap<String, &'a RawValue>;

fn reject_unknown(members: &Members<'_>, known: &[&str]) -> Result<(), ApiError> {
    match members.keys().find(|k| !known.contains(&k.as_str())) {
        Some(k) => Err(ApiError::bad_request(
            "unknown_field",
            format!("unknown field {k:?} (expected one of {known:?})"),
        )),
        None => Ok(()),
    }
}

/// Any other value than a string, as compact JSON (non-ASCII as UTF-8); a
/// lone surrogate escape has no UTF-8 form: 400 `invalid_json`, as serde_json
/// answers for one in a string.
fn compact_json(raw: &RawValue) -> Result<String, ApiError> {
    compact(raw.get()).map_err(|e| {
        ApiError::bad_request("invalid_json", format!("the body is not valid JSON: {e}"))
    })
}

/// The data of an event as stored: a JSON string as is, any other value as
/// compact JSON.
fn data_text(raw: &RawValue) -> Result<String, ApiError> {
    let text = raw.get();
    if text.starts_with('"') {
        serde_json::from_str::<String>(text).map_err(invalid_json)
    } else {
        compact_json(raw)
    }
}

fn parse_event(
    members: &Members<'_>,
    limits: Limits,
    index: Option<usize>,
) -> Result<NewEvent, ApiError> {
    let at = index.map_or(String::new(), |i| format!(" (event {i})"));
    reject_unknown(members, &["type", "data"])?;
    let event_type = match members.get("type") {
        None => DEFAULT_EVENT_TYPE.to_owned(),
        Some(raw) => {
            let t: String = serde_json::from_str(raw.get()).map_err(|_| {
                ApiError::bad_request("invalid_body", format!("\"type\" must be a string{at}"))
            })?;
            if t.starts_with(RESERVED_PREFIX) {
                return Err(ApiError::bad_request(
                    "reserved_event_type",
                    format!("event types starting with \"jobcast.\" are reserved{at}"),
                ));
            }
            validate_event_type(&t)
                .map_err(|e| ApiError::bad_request("invalid_event_type", format!("{e}{at}")))?;
            t
        }
    };
    let raw = members.get("data").ok_or_else(|| {
        ApiError::bad_request(
            "missing_data",
            format!("\"data\" is required (null is allowed){at}"),
        )
    })?;
    let data = data_text(raw)?;
    if data.is_empty() {
        return Err(ApiError::bad_request(
            "empty_data",
            format!("\"data\" must not be the empty string: browsers drop such events{at}"),
        ));
    }
    if data.len() > limits.max_event_bytes {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "event_too_large",
            format!(
                "event data is {} bytes; the limit is {}{at}",
                data.len(),
                limits.max_event_bytes
            ),
        ));
    }
    Ok(NewEvent { event_type, data })
}

/// Parses an append body: one event object or an array of 1..=max_batch.
pub fn parse_append(body: &[u8], limits: Limits) -> Result<Vec<NewEvent>, ApiError> {
    let text = std::str::from_utf8(body)
        .map_err(|_| ApiError::bad_request("invalid_json", "the body is not UTF-8"))?;
    match text.trim_start().as_bytes().first() {
        Some(b'[') => {
            let items: Vec<&RawValue> = serde_json::from_str(text).map_err(invalid_json)?;
            if items.is_empty() {
                return Err(ApiError::bad_request(
                    "empty_batch",
                    "a batch holds at least one event",
                ));
            }
            if items.len() > limits.max_batch {
                return Err(ApiError::bad_request(
                    "batch_too_large",
                    format!(
                        "a batch holds at most {} events; got {}",
                        limits.max_batch,
                        items.len()
                    ),
                ));
            }
            items
                .iter()
                .enumerate()
                .map(|(i, raw)| {
                    let members: Members<'_> = serde_json::from_str(raw.get()).map_err(|_| {
                        ApiError::bad_request(
                            "invalid_body",
                            format!("event {i} must be an object {{\"type\"?, \"data\"}}"),
                        )
                    })?;
                    parse_event(&members, limits, Some(i))
                })
                .collect()
        }
        Some(b'{') => {
            let members: Members<'_> = serde_json::from_str(text).map_err(invalid_json)?;
            Ok(vec![parse_event(&members, limits, None)?])
        }
        _ => {
            // Valid JSON of another shape, or not JSON at all.
            serde_json::from_str::<&RawValue>(text).map_err(invalid_json)?;
            Err(ApiError::bad_request(
                "invalid_body",
                "the body must be an event {\"type\"?, \"data\"} or an array of them",
            ))
        }
    }
}

fn parse_object(body: &[u8]) -> Result<Option<Members<'_>>, ApiError> {
    let text = std::str::from_utf8(body)
        .map_err(|_| ApiError::bad_request("invalid_json", "the body is not UTF-8"))?;
    if text.trim().is_empty() {
        return Ok(None);
    }
    if !text.trim_start().starts_with('{') {
        serde_json::from_str::<&RawValue>(text).map_err(invalid_json)?;
        return Err(ApiError::bad_request(
            "invalid_body",
            "the body must be a JSON object",
        ));
    }
    serde_json::from_str(text).map(Some).map_err(invalid_json)
}

/// The `jobcast.end` data for `complete`: body absent or `{"data"?}`.
pub fn parse_complete(body: &[u8], limits: Limits) -> Result<String, ApiError> {
    let data = match parse_object(body)? {
        None => None,
        Some(members) => {
            reject_unknown(&members, &["data"])?;
            members
                .get("data")
                .map(|raw| compact_json(raw))
                .transpose()?
        }
    };
    let text = match data {
        None => r#"{"state":"completed"}"#.to_owned(),
        Some(d) => format!(r#"{{"state":"completed","data":{d}}}"#),
    };
    check_end_size(&text, limits)?;
    Ok(text)
}

/// The `jobcast.end` data for `fail`: body absent or `{"error"?: string}`.
pub fn parse_fail(body: &[u8], limits: Limits) -> Result<String, ApiError> {
    let error = match parse_object(body)? {
        None => None,
        Some(members) => {
            reject_unknown(&members, &["error"])?;
            match members.get("error") {
                None => None,
                Some(raw) => Some(serde_json::from_str::<String>(raw.get()).map_err(|_| {
                    ApiError::bad_request("invalid_body", "\"error\" must be a string")
                })?),
            }
        }
    };
    let mut end = serde_json::Map::new();
    end.insert("state".into(), "failed".into());
    if let Some(e) = error {
        end.insert("error".into(), e.into());
    }
    let text = serde_json::Value::Object(end).to_string();
    check_end_size(&text, limits)?;
    Ok(text)
}

fn check_end_size(text: &str, limits: Limits) -> Result<(), ApiError> {
    if text.len() > limits.max_event_bytes {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "event_too_large",
            format!(
                "the end event's data is {} bytes; the limit is {}",
                text.len(),
                limits.max_event_bytes
            ),
        ));
    }
    Ok(())
}

/// Most labels on one stream.
pub const MAX_LABELS: usize = 16;
/// Longest label key, in bytes.
pub const MAX_LABEL_KEY: usize = 63;
/// Longest label value, in bytes.
pub const MAX_LABEL_VALUE: usize = 256;

/// Whether `key` may name a label: 1 to [`MAX_LABEL_KEY`] bytes of ASCII
/// letters, digits, `_`, `-`, `.` and `/` (Kubernetes-like keys such as
/// `app.example.com/team` fit).
pub fn valid_label_key(key: &str) -> bool {
    (1..=MAX_LABEL_KEY).contains(&key.len())
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b'/'))
}

/// `PUT /v1/streams/{id}`'s body: `{"labels": {key: string}}`, at most
/// [`MAX_LABELS`] keys; else 400 `invalid_labels`.
pub fn parse_labels(body: &[u8]) -> Result<crate::store::Labels, ApiError> {
    let invalid = |why: String| ApiError::bad_request("invalid_labels", why);
    let Some(members) = parse_object(body)? else {
        return Ok(Default::default());
    };
    reject_unknown(&members, &["labels"])?;
    let Some(raw) = members.get("labels") else {
        return Ok(Default::default());
    };
    let map: std::collections::BTreeMap<String, serde_json::Value> =
        serde_json::from_str(raw.get())
            .map_err(|_| invalid("labels must be an object of strings".into()))?;
    if map.len() > MAX_LABELS {
        return Err(invalid(format!("at most {MAX_LABELS} labels")));
    }
    let mut labels = crate::store::Labels::new();
    for (k, v) in map {
        if !valid_label_key(&k) {
            return Err(invalid(format!(
                "label key {k:?}: 1 to {MAX_LABEL_KEY} of A-Z a-z 0-9 _ - . /"
            )));
        }
        let serde_json::Value::String(v) = v else {
            return Err(invalid(format!("label {k:?} must be a string")));
        };
        if v.len() > MAX_LABEL_VALUE || v.chars().any(char::is_control) {
            return Err(invalid(format!(
                "label {k:?}: at most {MAX_LABEL_VALUE} bytes, no control characters"
            )));
        }
        labels.insert(k, v);
    }
    Ok(labels)
}

#[cfg(test)]
mod tests {
    use super::*;

    const L: Limits = Limits {
        max_event_bytes: 64,
        max_batch: 3,
    };

    fn code(r: Result<impl std::fmt::Debug, ApiError>) -> &'static str {
        r.expect_err("should be rejected").code
    }

    #[test]
    fn single_and_batch() {
        let one = parse_append(br#"{"data":"hi"}"#, L).unwrap();
        assert_eq!(
            one,
            vec![NewEvent {
                event_type: "message".into(),
                data: "hi".into()
            }]
        );
        let many = parse_append(
            br#"[{"type":"t","data":{ "b" : 1, "a" : [1, 2.50] }},{"data":null},{"data":"\u00e9\n"}]"#,
            L,
        )
        .unwrap();
        assert_eq!(many[0].data, r#"{"b":1,"a":[1,2.50]}"#);
        assert_eq!(many[1].data, "null");
        assert_eq!(many[2].data, "é\n");
        let escaped = parse_append(br#"{"data":{"name":"caf\u00e9"}}"#, L).unwrap();
        assert_eq!(escaped[0].data, r#"{"name":"café"}"#);
    }

    #[test]
    fn rejections() {
        assert_eq!(code(parse_append(b"", L)), "invalid_json");
        assert_eq!(code(parse_append(b"{", L)), "invalid_json");
        assert_eq!(code(parse_append(b"\xff", L)), "invalid_json");
        assert_eq!(code(parse_append(b"42", L)), "invalid_body");
        assert_eq!(code(parse_append(b"[1]", L)), "invalid_body");
        assert_eq!(code(parse_append(b"[]", L)), "empty_batch");
        assert_eq!(
            code(parse_append(
                br#"[{"data":1},{"data":1},{"data":1},{"data":1}]"#,
                L
            )),
            "batch_too_large"
        );
        assert_eq!(
            code(parse_append(br#"{"data":1,"x":2}"#, L)),
            "unknown_field"
        );
        assert_eq!(code(parse_append(br#"{"type":"t"}"#, L)), "missing_data");
        assert_eq!(code(parse_append(br#"{"data":""}"#, L)), "empty_data");
        assert_eq!(
            code(parse_append(br#"{"type":"jobcast.end","data":1}"#, L)),
            "reserved_event_type"
        );
        assert_eq!(
            code(parse_append(br#"{"type":"a b","data":1}"#, L)),
            "invalid_event_type"
        );
        assert_eq!(
            code(parse_append(br#"{"type":5,"data":1}"#, L)),
            "invalid_body"
        );
        let big = format!(r#"{{"data":"{}"}}"#, "x".repeat(65));
        assert_eq!(code(parse_append(big.as_bytes(), L)), "event_too_large");
        assert!(parse_append(br#"{"type":"Jobcast.x","data":1}"#, L).is_ok());
        // A lone surrogate has no UTF-8 form, in a string or inside a value.
        assert_eq!(
            code(parse_append(br#"{"data":"\ud800"}"#, L)),
            "invalid_json"
        );
        assert_eq!(
            code(parse_append(br#"{"data":["\ud800"]}"#, L)),
            "invalid_json"
        );
        assert_eq!(
            code(parse_complete(br#"{"data":{"\udc00":1}}"#, L)),
            "invalid_json"
        );
    }

    #[test]
    fn end_bodies() {
        assert_eq!(parse_complete(b"", L).unwrap(), r#"{"state":"completed"}"#);
        assert_eq!(
            parse_complete(br#"{"data": {"n": 1}}"#, L).unwrap(),
            r#"{"state":"completed","data":{"n":1}}"#
        );
        assert_eq!(
            parse_fail(br#"{"error":"boom"}"#, L).unwrap(),
            r#"{"state":"failed","error":"boom"}"#
        );
        assert_eq!(code(parse_fail(br#"{"error":1}"#, L)), "invalid_body");
        assert_eq!(code(parse_complete(br#"{"x":1}"#, L)), "unknown_field");
        assert_eq!(code(parse_complete(b"[]", L)), "invalid_body");
    }

    #[test]
    fn content_types() {
        let mut h = HeaderMap::new();
        assert!(check_content_type(&h).is_ok());
        h.insert(
            header::CONTENT_TYPE,
            "application/json; charset=utf-8".parse().unwrap(),
        );
        assert!(check_content_type(&h).is_ok());
        h.insert(
            header::CONTENT_TYPE,
            "application/vnd.x+json".parse().unwrap(),
        );
        assert!(check_content_type(&h).is_ok());
        h.insert(header::CONTENT_TYPE, "text/plain".parse().unwrap());
        assert_eq!(
            check_content_type(&h).unwrap_err().code,
            "unsupported_media_type"
        );
    }
}
