//! Bad input, as a table: every rejected request answers the documented
//! status and JSON error code, never a 5xx, and changes nothing.

mod common;

use common::TestServer;
use reqwest::Method;
use serde_json::{json, Value};
use std::time::Duration;

/// One bad request and the answer it must get.
struct Case {
    name: String,
    method: Method,
    path: String,
    headers: Vec<(&'static str, String)>,
    body: Option<Vec<u8>>,
    status: u16,
    code: &'static str,
}

impl Case {
    fn new(name: impl Into<String>, method: Method, path: impl Into<String>) -> Case {
        Case {
            name: name.into(),
            method,
            path: path.into(),
            headers: Vec::new(),
            body: None,
            status: 0,
            code: "",
        }
    }

    fn get(name: impl Into<String>, path: impl Into<String>) -> Case {
        Case::new(name, Method::GET, path)
    }

    /// A GET asking for the SSE stream.
    fn sse(name: impl Into<String>, path: impl Into<String>) -> Case {
        Case::get(name, path).header("accept", "text/event-stream")
    }

    /// A POST of a JSON body (`Content-Type: application/json`).
    fn post(name: impl Into<String>, path: impl Into<String>, body: impl Into<Vec<u8>>) -> Case {
        Case::new(name, Method::POST, path)
            .header("content-type", "application/json")
            .body(body)
    }

    fn header(mut self, name: &'static str, value: impl Into<String>) -> Case {
        self.headers.retain(|(n, _)| *n != name);
        self.headers.push((name, value.into()));
        self
    }

    fn body(mut self, body: impl Into<Vec<u8>>) -> Case {
        self.body = Some(body.into());
        self
    }

    fn expect(mut self, status: u16, code: &'static str) -> Case {
        self.status = status;
        self.code = code;
        self
    }
}

/// Sets up `s` (open, 3 events) and `done` (completed); returns the epoch of `s`.
async fn setup(s: &TestServer) -> String {
    let a = s.append("s", "one").await;
    s.append_batch("s", &["two".into(), "three".into()]).await;
    s.append("done", "x").await;
    s.complete("done").await;
    let epoch = a["first_id"]
        .as_str()
        .unwrap()
        .split('-')
        .next()
        .unwrap()
        .to_owned();
    assert_eq!(s.meta("s").await["last_id"], format!("{epoch}-3"));
    epoch
}

/// Everything a rejected request must leave as it was.
async fn snapshot(s: &TestServer) -> Value {
    let mut out = serde_json::Map::new();
    for id in ["s", "done"] {
        let mut meta = s.meta(id).await;
        // Watchers come and go with connections; everything else must stay.
        meta.as_object_mut().unwrap().remove("watchers");
        out.insert(format!("meta {id}"), meta);
        let (status, page) = s
            .get_json(&format!("/v1/streams/{id}/events?limit=1000"))
            .await;
        assert_eq!(status, 200, "page of {id}: {page}");
        out.insert(format!("page {id}"), page);
    }
    let (status, list) = s.get_json("/v1/streams").await;
    assert_eq!(status, 200, "list: {list}");
    let ids: Vec<Value> = list["streams"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].clone())
        .collect();
    out.insert("list".into(), Value::from(ids));
    Value::Object(out)
}

fn cases(epoch: &str) -> Vec<Case> {
    let long_id = "a".repeat(201);
    let ev = |id: &str| format!("/v1/streams/{id}/events");
    let mut c = vec![
        // Invalid stream ids in the path, on every route that takes one.
        Case::post("id -bad", ev("-bad"), r#"{"data":1}"#).expect(400, "invalid_stream_id"),
        Case::post("id a%20b", ev("a%20b"), r#"{"data":1}"#).expect(400, "invalid_stream_id"),
        Case::post("id 201 chars", ev(&long_id), r#"{"data":1}"#).expect(400, "invalid_stream_id"),
        Case::post("id .x", ev(".x"), r#"{"data":1}"#).expect(400, "invalid_stream_id"),
        Case::post("id a*b", ev("a*b"), r#"{"data":1}"#).expect(400, "invalid_stream_id"),
        Case::post("id é", ev("%C3%A9"), r#"{"data":1}"#).expect(400, "invalid_stream_id"),
        Case::new("put -bad", Method::PUT, "/v1/streams/-bad").expect(400, "invalid_stream_id"),
        Case::new(
            "put 201 chars",
            Method::PUT,
            format!("/v1/streams/{long_id}"),
        )
        .expect(400, "invalid_stream_id"),
        Case::get("get -bad", "/v1/streams/-bad").expect(400, "invalid_stream_id"),
        Case::get("page -bad", ev("-bad")).expect(400, "invalid_stream_id"),
        Case::sse("sse -bad", ev("-bad")).expect(400, "invalid_stream_id"),
        Case::new("delete a%20b", Method::DELETE, "/v1/streams/a%20b")
            .expect(400, "invalid_stream_id"),
        Case::post("complete -bad", "/v1/streams/-bad/complete", "")
            .expect(400, "invalid_stream_id"),
        Case::post("fail -bad", "/v1/streams/-bad/fail", "").expect(400, "invalid_stream_id"),
        // Event types.
        Case::post("type with space", ev("s"), r#"{"type":"a b","data":1}"#)
            .expect(400, "invalid_event_type"),
        Case::post("type -x", ev("s"), r#"{"type":"-x","data":1}"#)
            .expect(400, "invalid_event_type"),
        Case::post("type empty", ev("s"), r#"{"type":"","data":1}"#)
            .expect(400, "invalid_event_type"),
        Case::post(
            "type 65 chars",
            ev("s"),
            json!({"type": "t".repeat(65), "data": 1}).to_string(),
        )
        .expect(400, "invalid_event_type"),
        Case::post(
            "type jobcast.end",
            ev("s"),
            r#"{"type":"jobcast.end","data":1}"#,
        )
        .expect(400, "reserved_event_type"),
        Case::post(
            "type jobcast.x",
            ev("s"),
            r#"{"type":"jobcast.x","data":1}"#,
        )
        .expect(400, "reserved_event_type"),
        Case::post(
            "type jobcast.end on a new stream",
            ev("new"),
            r#"{"type":"jobcast.end","data":{"state":"completed"}}"#,
        )
        .expect(400, "reserved_event_type"),
        // Bodies.
        Case::post("not json", ev("s"), "not json").expect(400, "invalid_json"),
        Case::post("truncated json", ev("s"), r#"{"data":1"#).expect(400, "invalid_json"),
        Case::post("not utf-8", ev("s"), b"{\"data\":\"\xff\"}".to_vec())
            .expect(400, "invalid_json"),
        Case::post("empty body", ev("s"), "").expect(400, "invalid_json"),
        Case::post("empty body on a new stream", ev("new"), "").expect(400, "invalid_json"),
        Case::post("number", ev("s"), "42").expect(400, "invalid_body"),
        Case::post("string", ev("s"), r#""hello""#).expect(400, "invalid_body"),
        Case::post("null", ev("s"), "null").expect(400, "invalid_body"),
        Case::post("array of numbers", ev("s"), "[1,2,3]").expect(400, "invalid_body"),
        Case::post("type is a number", ev("s"), r#"{"type":5,"data":1}"#)
            .expect(400, "invalid_body"),
        Case::post("missing data", ev("s"), r#"{"type":"t"}"#).expect(400, "missing_data"),
        Case::post("empty object", ev("s"), "{}").expect(400, "missing_data"),
        Case::post("missing data on a new stream", ev("new"), "{}").expect(400, "missing_data"),
        Case::post("unknown field", ev("s"), r#"{"data":1,"x":2}"#).expect(400, "unknown_field"),
        Case::post("empty data", ev("s"), r#"{"data":""}"#).expect(400, "empty_data"),
        Case::post("empty batch", ev("s"), "[]").expect(400, "empty_batch"),
        Case::post("empty batch on a new stream", ev("new"), "[]").expect(400, "empty_batch"),
        Case::post(
            "1001 events",
            ev("s"),
            Value::from(vec![json!({"data": 1}); 1001]).to_string(),
        )
        .expect(400, "batch_too_large"),
        Case::post(
            "event data 1 MiB + 1",
            ev("s"),
            json!({"data": "x".repeat(1_048_577)}).to_string(),
        )
        .expect(413, "event_too_large"),
        Case::post(
            "event data 1 MiB + 1 as JSON",
            ev("s"),
            json!({"data": ["x".repeat(1_048_573)]}).to_string(),
        )
        .expect(413, "event_too_large"),
        Case::post(
            "body 16 MiB + 1",
            ev("s"),
            format!(r#"{{"data":"{}"}}"#, "x".repeat((16 << 20) + 1 - 11)),
        )
        .expect(413, "body_too_large"),
        Case::post(
            "complete data 1 MiB",
            "/v1/streams/s/complete",
            json!({"data": "x".repeat(1 << 20)}).to_string(),
        )
        .expect(413, "event_too_large"),
        Case::post(
            "complete body 16 MiB + 1",
            "/v1/streams/s/complete",
            format!(r#"{{"data":"{}"}}"#, "x".repeat((16 << 20) + 1 - 11)),
        )
        .expect(413, "body_too_large"),
        // Content types.
        Case::post("text/json", ev("s"), r#"{"data":1}"#)
            .header("content-type", "text/json")
            .expect(415, "unsupported_media_type"),
        Case::post("text/plain", ev("s"), r#"{"data":1}"#)
            .header("content-type", "text/plain")
            .expect(415, "unsupported_media_type"),
        Case::post("form", ev("s"), r#"{"data":1}"#)
            .header("content-type", "application/x-www-form-urlencoded")
            .expect(415, "unsupported_media_type"),
        Case::post("text/plain on a new stream", ev("new"), r#"{"data":1}"#)
            .header("content-type", "text/plain")
            .expect(415, "unsupported_media_type"),
        Case::post("text/plain complete", "/v1/streams/s/complete", "{}")
            .header("content-type", "text/plain")
            .expect(415, "unsupported_media_type"),
        Case::post("text/plain complete, no body", "/v1/streams/s/complete", "")
            .header("content-type", "text/plain")
            .expect(415, "unsupported_media_type"),
        Case::post("text/plain fail", "/v1/streams/s/fail", r#"{"error":"x"}"#)
            .header("content-type", "text/plain")
            .expect(415, "unsupported_media_type"),
        // Resume points on the SSE route.
        Case::sse("sse ?from=middle", format!("{}?from=middle", ev("s")))
            .expect(400, "invalid_from"),
        Case::sse("sse ?wait=abc", format!("{}?wait=abc", ev("s"))).expect(400, "invalid_wait"),
        Case::sse("sse ?wait=-1", format!("{}?wait=-1", ev("s"))).expect(400, "invalid_wait"),
        Case::sse("sse ?wait=1.5", format!("{}?wait=1.5", ev("s"))).expect(400, "invalid_wait"),
        // The JSON route.
        Case::get("page ?from=middle", format!("{}?from=middle", ev("s")))
            .expect(400, "invalid_from"),
        Case::get("page ?wait=abc", format!("{}?wait=abc", ev("s"))).expect(400, "invalid_wait"),
        Case::get("page ?wait=-1", format!("{}?wait=-1", ev("s"))).expect(400, "invalid_wait"),
        Case::get("page ?wait=1.5", format!("{}?wait=1.5", ev("s"))).expect(400, "invalid_wait"),
        Case::get("page ?limit=0", format!("{}?limit=0", ev("s"))).expect(400, "invalid_limit"),
        Case::get("page ?limit=1001", format!("{}?limit=1001", ev("s")))
            .expect(400, "invalid_limit"),
        Case::get("page ?limit=abc", format!("{}?limit=abc", ev("s"))).expect(400, "invalid_limit"),
        Case::get("page ?limit=-1", format!("{}?limit=-1", ev("s"))).expect(400, "invalid_limit"),
        // Listing.
        Case::get("list ?state=bogus", "/v1/streams?state=bogus").expect(400, "invalid_state"),
        Case::get("list ?limit=0", "/v1/streams?limit=0").expect(400, "invalid_limit"),
        Case::get("list ?limit=1001", "/v1/streams?limit=1001").expect(400, "invalid_limit"),
        // Ended streams.
        Case::post("append to ended", ev("done"), r#"{"data":1}"#).expect(409, "stream_ended"),
        Case::post("batch to ended", ev("done"), r#"[{"data":1},{"data":2}]"#)
            .expect(409, "stream_ended"),
        Case::post("complete ended", "/v1/streams/done/complete", "").expect(409, "stream_ended"),
        Case::post(
            "complete ended with data",
            "/v1/streams/done/complete",
            r#"{"data":1}"#,
        )
        .expect(409, "stream_ended"),
        Case::post("fail ended", "/v1/streams/done/fail", r#"{"error":"boom"}"#)
            .expect(409, "stream_ended"),
        // Missing streams.
        Case::post("complete missing", "/v1/streams/missing/complete", "")
            .expect(404, "stream_not_found"),
        Case::post(
            "fail missing",
            "/v1/streams/missing/fail",
            r#"{"error":"x"}"#,
        )
        .expect(404, "stream_not_found"),
        Case::new("delete missing", Method::DELETE, "/v1/streams/missing")
            .expect(404, "stream_not_found"),
        Case::get("get missing", "/v1/streams/missing").expect(404, "stream_not_found"),
        Case::get("page of missing", ev("missing")).expect(404, "stream_not_found"),
        // Routes and methods.
        Case::get("unknown route", "/v1/nope").expect(404, "not_found"),
        Case::get("unknown sub-route", "/v1/streams/s/events/extra").expect(404, "not_found"),
        Case::post(
            "unknown route post",
            "/v2/streams/s/events",
            r#"{"data":1}"#,
        )
        .expect(404, "not_found"),
        Case::new("PATCH stream", Method::PATCH, "/v1/streams/s")
            .header("content-type", "application/json")
            .body("{}")
            .expect(405, "method_not_allowed"),
        Case::new("DELETE events", Method::DELETE, "/v1/streams/s/events")
            .expect(405, "method_not_allowed"),
        Case::new("PUT events", Method::PUT, "/v1/streams/s/events")
            .expect(405, "method_not_allowed"),
        Case::post("POST stream list", "/v1/streams", "{}").expect(405, "method_not_allowed"),
        Case::get("GET complete", "/v1/streams/s/complete").expect(405, "method_not_allowed"),
        // End bodies.
        Case::post(
            "complete unknown field",
            "/v1/streams/s/complete",
            r#"{"x":1}"#,
        )
        .expect(400, "unknown_field"),
        Case::post("complete array", "/v1/streams/s/complete", "[]").expect(400, "invalid_body"),
        Case::post("complete not json", "/v1/streams/s/complete", "{").expect(400, "invalid_json"),
        Case::post(
            "fail error is a number",
            "/v1/streams/s/fail",
            r#"{"error":5}"#,
        )
        .expect(400, "invalid_body"),
        Case::post(
            "fail unknown field",
            "/v1/streams/s/fail",
            r#"{"error":"x","data":1}"#,
        )
        .expect(400, "unknown_field"),
        // Idempotency keys.
        Case::post("idempotency key 300 chars", ev("s"), r#"{"data":1}"#)
            .header("idempotency-key", "k".repeat(300))
            .expect(400, "invalid_idempotency_key"),
        Case::post(
            "idempotency key 300 chars, new stream",
            ev("new"),
            r#"{"data":1}"#,
        )
        .header("idempotency-key", "k".repeat(300))
        .expect(400, "invalid_idempotency_key"),
        Case::post(
            "idempotency key 300 chars on complete",
            "/v1/streams/s/complete",
            "",
        )
        .header("idempotency-key", "k".repeat(300))
        .expect(400, "invalid_idempotency_key"),
        Case::post(
            "idempotency key 300 chars on fail",
            "/v1/streams/s/fail",
            "",
        )
        .header("idempotency-key", "k".repeat(300))
        .expect(400, "invalid_idempotency_key"),
    ];
    // Malformed ids as Last-Event-ID, ?last_event_id= (SSE) and ?after= (JSON).
    let too_big = format!("{epoch}-18446744073709551616");
    let long_epoch = format!("{}-1", "a".repeat(17));
    let bad_ids = [
        "abc",
        "a-01",
        "A-1",
        "a-18446744073709551616",
        too_big.as_str(),
        "-1",
        "a-",
        "a--1",
        "a-+1",
        "a_b-1",
        long_epoch.as_str(),
    ];
    for id in bad_ids {
        c.push(
            Case::sse(format!("Last-Event-ID {id:?}"), ev("s"))
                .header("last-event-id", id)
                .expect(400, "invalid_event_id"),
        );
        let q = id.replace('+', "%2B");
        c.push(
            Case::sse(
                format!("?last_event_id={id:?}"),
                format!("{}?last_event_id={q}", ev("s")),
            )
            .expect(400, "invalid_event_id"),
        );
        c.push(
            Case::get(format!("?after={id:?}"), format!("{}?after={q}", ev("s")))
                .expect(400, "invalid_event_id"),
        );
    }
    // A batch with one bad event in the middle: nothing of it is appended.
    let bad_third: [(&str, Value, u16, &str); 6] = [
        (
            "reserved",
            json!({"type":"jobcast.end","data":1}),
            400,
            "reserved_event_type",
        ),
        ("empty data", json!({"data":""}), 400, "empty_data"),
        ("missing data", json!({"type":"t"}), 400, "missing_data"),
        (
            "unknown field",
            json!({"data":1,"y":2}),
            400,
            "unknown_field",
        ),
        ("not an object", json!(7), 400, "invalid_body"),
        (
            "too large",
            json!({"data":"x".repeat(1_048_577)}),
            413,
            "event_too_large",
        ),
    ];
    for (what, third, status, code) in bad_third {
        for stream in ["s", "new"] {
            let batch = json!([{"data":"b1"}, {"data":"b2"}, third, {"data":"b4"}, {"data":"b5"}]);
            c.push(
                Case::post(
                    format!("batch, event 3 of 5 {what}, {stream}"),
                    ev(stream),
                    batch.to_string(),
                )
                .expect(status, code),
            );
        }
    }
    c
}

async fn send(s: &TestServer, case: &Case) -> reqwest::Response {
    let mut req = s.client.request(case.method.clone(), s.url(&case.path));
    for (name, value) in &case.headers {
        req = req.header(*name, value.as_str());
    }
    if let Some(body) = &case.body {
        req = req.body(body.clone());
    }
    tokio::time::timeout(Duration::from_secs(20), req.send())
        .await
        .unwrap_or_else(|_| panic!("{}: no answer within 20 s", case.name))
        .unwrap_or_else(|e| panic!("{}: request failed: {e}", case.name))
}

#[tokio::test]
async fn bad_inputs_are_rejected_with_their_code_and_change_nothing() {
    let s = TestServer::start().await;
    let epoch = setup(&s).await;
    let mut before = snapshot(&s).await;
    assert_eq!(before["list"], json!(["done", "s"]));
    assert_eq!(before["meta s"]["events"], 3);
    assert_eq!(before["meta done"]["state"], "completed");
    let mut failures = Vec::new();
    for case in cases(&epoch) {
        let res = send(&s, &case).await;
        let status = res.status().as_u16();
        let ct = res
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let body: Value = if ct.starts_with("text/event-stream") {
            // Accepted as a watch: do not wait for it to end.
            Value::Null
        } else {
            let text = tokio::time::timeout(Duration::from_secs(20), res.text())
                .await
                .unwrap_or_else(|_| panic!("{}: body not read within 20 s", case.name))
                .unwrap_or_else(|e| panic!("{}: body: {e}", case.name));
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        let mut problems = Vec::new();
        if status >= 500 {
            problems.push(format!("5xx ({status})"));
        }
        if status != case.status {
            problems.push(format!("status {status}, expected {}", case.status));
        }
        if !ct.starts_with("application/json") {
            problems.push(format!("content-type {ct:?}, expected application/json"));
        }
        if body["error"]["code"] != case.code {
            problems.push(format!(
                "code {}, expected {:?}",
                body["error"]["code"], case.code
            ));
        }
        if !body["error"]["message"].is_string() || body["error"]["message"] == "" {
            problems.push("no message".to_owned());
        }
        if body.as_object().map(|o| o.len()) != Some(1) {
            problems.push("body is not exactly {\"error\":…}".to_owned());
        }
        let after = snapshot(&s).await;
        if after != before {
            problems.push(format!(
                "the log changed:\n  before {before}\n  after  {after}"
            ));
            // Report the next cases against the new state, not this change again.
            before = after;
        }
        if !problems.is_empty() {
            let shown: String = body.to_string().chars().take(300).collect();
            failures.push(format!(
                "{} ({} {}): {}; body {shown}",
                case.name,
                case.method,
                case.path.chars().take(80).collect::<String>(),
                problems.join(", ")
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} case(s) failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// The reserved prefix is case-sensitive: `Jobcast.x` is an ordinary type.
#[tokio::test]
async fn types_that_only_look_reserved_are_accepted() {
    let s = TestServer::start().await;
    for (i, t) in [
        "Jobcast.x",
        "JOBCAST.end",
        "jobcast",
        "jobcastx",
        "jobcast_end",
        "x.jobcast.end",
    ]
    .into_iter()
    .enumerate()
    {
        let (status, v) = s
            .post(
                "/v1/streams/t/events",
                &json!({"type": t, "data": i}).to_string(),
            )
            .await;
        assert_eq!(status, 201, "{t}: {v}");
        assert_eq!(v["count"], 1, "{t}: {v}");
    }
    let (status, page) = s.get_json("/v1/streams/t/events").await;
    assert_eq!(status, 200, "{page}");
    let types: Vec<&str> = page["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    assert_eq!(
        types,
        [
            "Jobcast.x",
            "JOBCAST.end",
            "jobcast",
            "jobcastx",
            "jobcast_end",
            "x.jobcast.end"
        ]
    );
    let data: Vec<&str> = page["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["data"].as_str().unwrap())
        .collect();
    assert_eq!(data, ["0", "1", "2", "3", "4", "5"]);
    assert_eq!(page["state"], "open");
}

/// The limits themselves are allowed: data of exactly 1 MiB, 1000 events, a
/// 64-character type, a 200-character id, a 255-character Idempotency-Key.
#[tokio::test]
async fn values_at_the_limits_are_accepted() {
    let s = TestServer::start().await;
    let (status, v) = s
        .post(
            "/v1/streams/big/events",
            &json!({"data": "x".repeat(1 << 20)}).to_string(),
        )
        .await;
    assert_eq!(status, 201, "{v}");
    let (status, v) = s
        .post(
            "/v1/streams/big/events",
            &Value::from(vec![json!({"data": 1}); 1000]).to_string(),
        )
        .await;
    assert_eq!(status, 201, "{v}");
    assert_eq!(v["count"], 1000);
    let (status, v) = s
        .post(
            "/v1/streams/big/events",
            &json!({"type": "t".repeat(64), "data": 1}).to_string(),
        )
        .await;
    assert_eq!(status, 201, "{v}");
    let id = format!(
        "A{}",
        "b.c:d_e-".repeat(25).chars().take(199).collect::<String>()
    );
    assert_eq!(id.len(), 200);
    let (status, v) = s
        .post(&format!("/v1/streams/{id}/events"), r#"{"data":1}"#)
        .await;
    assert_eq!(status, 201, "{v}");
    let res = s
        .client
        .post(s.url("/v1/streams/big/events"))
        .header("idempotency-key", "k".repeat(255))
        .body(r#"{"data":1}"#)
        .send()
        .await
        .unwrap();
    // Also: no Content-Type at all is fine.
    assert_eq!(res.status(), 201);
    // The limit applies to the data as stored, not as escaped in the body.
    let escaped = format!(r#"{{"data":"{}"}}"#, "\\u00e9".repeat(1 << 19));
    assert!(escaped.len() > 3 << 20);
    let (status, v) = s.post("/v1/streams/big/events", &escaped).await;
    assert_eq!(status, 201, "{v}");
    for ct in [
        "application/json; charset=utf-8",
        "application/problem+json",
        "Application/JSON",
    ] {
        let res = s
            .client
            .post(s.url("/v1/streams/big/events"))
            .header("content-type", ct)
            .body(r#"{"data":1}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 201, "{ct}");
    }
    assert_eq!(s.meta("big").await["events"], 1007);
    let epoch = s.meta("big").await["epoch"].as_str().unwrap().to_owned();
    let (_, p) = s
        .get_json(&format!(
            "/v1/streams/big/events?after={epoch}-1003&limit=1"
        ))
        .await;
    assert_eq!(p["events"][0]["data"], "é".repeat(1 << 19));
    assert_eq!(s.meta(&id).await["events"], 1);
}
