//! The producing and reading API against a real server: appends and their
//! ids, data encoding, Idempotency-Key, metadata, ending, deleting, the JSON
//! page and its long poll, listing, and the SSE response's headers.

mod common;

use common::{seq_of, TestServer, T};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// The epoch part of an id `{epoch}-{seq}`.
fn epoch_of(id: &Value) -> String {
    let id = id
        .as_str()
        .unwrap_or_else(|| panic!("id is not a string: {id}"));
    let (epoch, seq) = id.rsplit_once('-').unwrap_or_else(|| panic!("bad id {id}"));
    assert!(
        (1..=16).contains(&epoch.len())
            && epoch
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()),
        "bad epoch in {id}"
    );
    assert!(seq.parse::<u64>().is_ok(), "bad seq in {id}");
    epoch.to_owned()
}

/// RFC 3339 UTC with milliseconds and `Z`: `YYYY-MM-DDTHH:MM:SS.mmmZ`.
fn assert_time(v: &Value) {
    let t = v
        .as_str()
        .unwrap_or_else(|| panic!("time is not a string: {v}"));
    let shape = "dddd-dd-ddTdd:dd:dd.dddZ";
    assert_eq!(t.len(), 24, "time {t:?}");
    for (c, want) in t.chars().zip(shape.chars()) {
        let ok = if want == 'd' {
            c.is_ascii_digit()
        } else {
            c == want
        };
        assert!(ok, "time {t:?} is not shaped {shape}");
    }
}

fn keys(v: &Value) -> Vec<&str> {
    let mut k: Vec<&str> = v
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {v}"))
        .keys()
        .map(String::as_str)
        .collect();
    k.sort_unstable();
    k
}

/// Checks the shape of a stream's metadata.
fn assert_meta(m: &Value) {
    assert_eq!(
        keys(m),
        [
            "cancel_requested",
            "created_at",
            "epoch",
            "events",
            "id",
            "labels",
            "last_id",
            "state",
            "updated_at",
            "watchers"
        ],
        "{m}"
    );
    assert_time(&m["created_at"]);
    assert_time(&m["updated_at"]);
    assert!(m["events"].is_u64(), "{m}");
    assert!(m["watchers"].is_u64(), "{m}");
    let epoch = m["epoch"].as_str().unwrap();
    assert!(
        (1..=16).contains(&epoch.len())
            && epoch
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()),
        "{m}"
    );
    match m["events"].as_u64().unwrap() {
        0 => assert_eq!(m["last_id"], Value::Null, "{m}"),
        n => assert_eq!(m["last_id"], format!("{epoch}-{n}"), "{m}"),
    }
}

async fn request(
    s: &TestServer,
    method: reqwest::Method,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, reqwest::header::HeaderMap, String) {
    let mut req = s.client.request(method, s.url(path));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let res = req.body(body.to_owned()).send().await.expect("request");
    let status = res.status().as_u16();
    let h = res.headers().clone();
    (status, h, res.text().await.expect("body"))
}

/// A POST of JSON with an Idempotency-Key; (status, raw body text).
async fn post_key(s: &TestServer, path: &str, key: &str, body: &str) -> (u16, String) {
    let (status, _, text) = request(
        s,
        reqwest::Method::POST,
        path,
        &[
            ("content-type", "application/json"),
            ("idempotency-key", key),
        ],
        body,
    )
    .await;
    (status, text)
}

/// The whole JSON log of a stream.
async fn page(s: &TestServer, stream: &str) -> Value {
    let (status, v) = s
        .get_json(&format!("/v1/streams/{stream}/events?limit=1000"))
        .await;
    assert_eq!(status, 200, "{v}");
    v
}

fn datas(page: &Value) -> Vec<String> {
    page["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            e["data"]
                .as_str()
                .unwrap_or_else(|| panic!("data not a string: {e}"))
                .to_owned()
        })
        .collect()
}

fn seqs(page: &Value) -> Vec<u64> {
    page["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["seq"].as_u64().unwrap())
        .collect()
}

async fn delete(s: &TestServer, stream: &str) -> u16 {
    let res = s
        .client
        .delete(s.url(&format!("/v1/streams/{stream}")))
        .send()
        .await
        .unwrap();
    res.status().as_u16()
}

#[tokio::test]
async fn appends_answer_their_id_range_and_seqs_are_dense() {
    let s = TestServer::start().await;
    let (status, a) = s.post("/v1/streams/job/events", r#"{"data":"one"}"#).await;
    assert_eq!(status, 201, "{a}");
    assert_eq!(keys(&a), ["count", "first_id", "last_id"]);
    let epoch = epoch_of(&a["first_id"]);
    assert_eq!(
        a,
        json!({"first_id": format!("{epoch}-1"), "last_id": format!("{epoch}-1"), "count": 1})
    );
    let (status, b) = s
        .post(
            "/v1/streams/job/events",
            r#"[{"data":"two"},{"type":"t","data":"three"},{"data":"four"}]"#,
        )
        .await;
    assert_eq!(status, 201, "{b}");
    assert_eq!(
        b,
        json!({"first_id": format!("{epoch}-2"), "last_id": format!("{epoch}-4"), "count": 3})
    );
    let (status, c) = s
        .post("/v1/streams/job/events", r#"[{"data":"five"}]"#)
        .await;
    assert_eq!(status, 201, "{c}");
    assert_eq!(
        c,
        json!({"first_id": format!("{epoch}-5"), "last_id": format!("{epoch}-5"), "count": 1})
    );
    let meta = s.meta("job").await;
    assert_eq!(meta["epoch"], epoch);
    assert_eq!(meta["events"], 5);
    assert_eq!(meta["last_id"], format!("{epoch}-5"));
    let p = page(&s, "job").await;
    assert_eq!(seqs(&p), [1, 2, 3, 4, 5]);
    assert_eq!(datas(&p), ["one", "two", "three", "four", "five"]);
    for (i, e) in p["events"].as_array().unwrap().iter().enumerate() {
        assert_eq!(keys(e), ["data", "id", "seq", "time", "type"], "{e}");
        assert_eq!(e["id"], format!("{epoch}-{}", i + 1));
        assert_eq!(e["type"], if i == 2 { "t" } else { "message" });
        assert_time(&e["time"]);
    }
    // Another stream counts from 1 with its own epoch.
    let other = s.append("other", "x").await;
    assert!(
        other["first_id"].as_str().unwrap().ends_with("-1"),
        "{other}"
    );
}

/// Compact JSON has non-ASCII as UTF-8 (SPEC, Details), whatever the
/// producer's encoder escaped: `\u00e9` is stored as `é`, a surrogate pair
/// as one character. Escapes JSON needs stay (in their short form), numbers
/// and member order stay exactly as written. A lone surrogate stands for no
/// character: 400, as it already is in string data.
#[tokio::test]
async fn escaped_non_ascii_is_stored_as_utf8() {
    let s = TestServer::start().await;
    let (status, v) = s
        .post("/v1/streams/u/events", r#"{"data":{"name":"caf\u00e9"}}"#)
        .await;
    assert_eq!(status, 201, "{v}");
    let body = r#"[
        {"data": {"smile": "\ud83d\ude00", "A": "\u0041\u00C9", "z": 1.0, "big": 1e400}},
        {"data": ["\u0022 \" \\ \u005c \/ \u002f", "\n \u000a \u000A \t \u0009 \u0001 \u001F \b \f \u007f"]},
        {"data": {"\u00e9": -0, "\u00e9": 2E+3}}
    ]"#;
    let (status, v) = s.post("/v1/streams/u/events", body).await;
    assert_eq!(status, 201, "{v}");
    let p = page(&s, "u").await;
    assert_eq!(
        datas(&p),
        [
            r#"{"name":"café"}"#,
            r#"{"smile":"😀","A":"AÉ","z":1.0,"big":1e400}"#,
            "[\"\\\" \\\" \\\\ \\\\ / /\",\"\\n \\n \\n \\t \\t \\u0001 \\u001f \\b \\f \u{7f}\"]",
            r#"{"é":-0,"é":2E+3}"#,
        ]
    );
    // Over SSE too: the bytes on the wire are UTF-8.
    let mut w = s.watch("u", "", None).await;
    assert_eq!(w.next_event(T).await.unwrap().data, r#"{"name":"café"}"#);
    // A lone surrogate cannot be UTF-8: refused, nothing appended.
    for bad in [
        r#"{"data":{"x":"\ud800"}}"#,
        r#"{"data":["\udc00"]}"#,
        r#"{"data":{"x":"\ud83d\u0041"}}"#,
    ] {
        let (status, v) = s.post("/v1/streams/u/events", bad).await;
        assert_eq!(
            (status, &v["error"]["code"]),
            (400, &"invalid_json".into()),
            "{bad}: {v}"
        );
    }
    let (status, v) = s
        .post("/v1/streams/u/complete", r#"{"data":{"x":"\udfff"}}"#)
        .await;
    assert_eq!(
        (status, &v["error"]["code"]),
        (400, &"invalid_json".into()),
        "{v}"
    );
    assert_eq!(s.meta("u").await["events"], 4);
}

#[tokio::test]
async fn data_is_a_string_as_is_or_compact_json() {
    let s = TestServer::start().await;
    let body = r#"[
        {"data": { "b" : 1, "a" : [1, 2.50] }},
        {"data": "é"},
        {"data": "\u00e9 and \"quotes\" and \\"},
        {"data": null},
        {"data": "plain text"},
        {"data": 42},
        {"data": -1.50e3},
        {"data": true},
        {"data": [ ]},
        {"data": { }},
        {"data": {"k" : "é", "n" : { "z" : null , "y" : [ "x" , 2 ] }}},
        {"data": "{ \"not\" : \"parsed\" }"},
        {"data": "two\nlines"}
    ]"#;
    let (status, v) = s.post("/v1/streams/d/events", body).await;
    assert_eq!(status, 201, "{v}");
    assert_eq!(v["count"], 13);
    // One event alone is encoded the same way.
    let (status, v) = s
        .post(
            "/v1/streams/d/events",
            "{ \"data\" : { \"b\" : 1, \"a\" : [1, 2.50] } }",
        )
        .await;
    assert_eq!(status, 201, "{v}");
    let p = page(&s, "d").await;
    assert_eq!(
        datas(&p),
        [
            r#"{"b":1,"a":[1,2.50]}"#,
            "é",
            r#"é and "quotes" and \"#,
            "null",
            "plain text",
            "42",
            "-1.50e3",
            "true",
            "[]",
            "{}",
            r#"{"k":"é","n":{"z":null,"y":["x",2]}}"#,
            r#"{ "not" : "parsed" }"#,
            "two\nlines",
            r#"{"b":1,"a":[1,2.50]}"#,
        ]
    );
    // The same data over SSE.
    s.complete("d").await;
    let mut w = s.watch("d", "", None).await;
    let events = w.collect(T).await;
    assert_eq!(events[0].data, r#"{"b":1,"a":[1,2.50]}"#);
    assert_eq!(events[1].data, "é");
    assert_eq!(events[3].data, "null");
    assert_eq!(events[10].data, r#"{"k":"é","n":{"z":null,"y":["x",2]}}"#);
    // Non-ASCII goes out as UTF-8 bytes on the wire, not as \u escapes.
    let raw = String::from_utf8(w.raw.clone()).unwrap();
    assert!(raw.contains("data: é\n"), "{raw}");
}

#[tokio::test]
async fn idempotency_key_replays_the_first_answer() {
    let s = TestServer::start().await;
    let path = "/v1/streams/idem/events";
    s.append("idem", "before").await;
    let (st1, b1) = post_key(&s, path, "key-1", r#"{"data":"once"}"#).await;
    assert_eq!(st1, 201, "{b1}");
    let first: Value = serde_json::from_str(&b1).unwrap();
    let epoch = epoch_of(&first["first_id"]);
    assert_eq!(
        first,
        json!({"first_id": format!("{epoch}-2"), "last_id": format!("{epoch}-2"), "count": 1})
    );
    let (st2, b2) = post_key(&s, path, "key-1", r#"{"data":"once"}"#).await;
    assert_eq!(
        (st2, serde_json::from_str::<Value>(&b2).unwrap()),
        (201, first.clone())
    );
    assert_eq!(s.meta("idem").await["events"], 2);
    // A batch with a key: replayed as a whole.
    let batch = r#"[{"data":"b1"},{"data":"b2"}]"#;
    let (st, bb) = post_key(&s, path, "key-2", batch).await;
    assert_eq!(st, 201, "{bb}");
    let (st, bb2) = post_key(&s, path, "key-2", batch).await;
    assert_eq!(
        (st, serde_json::from_str::<Value>(&bb2).unwrap()),
        (201, serde_json::from_str::<Value>(&bb).unwrap())
    );
    assert_eq!(s.meta("idem").await["events"], 4);
    // The same key with another body.
    let (st, body) = post_key(&s, path, "key-1", r#"{"data":"twice"}"#).await;
    assert_eq!(st, 422, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"]["code"], "idempotency_key_reused");
    assert_eq!(s.meta("idem").await["events"], 4);
    // Keys are scoped to the stream.
    let (st, body) = post_key(
        &s,
        "/v1/streams/idem2/events",
        "key-1",
        r#"{"data":"once"}"#,
    )
    .await;
    assert_eq!(st, 201, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert!(v["first_id"].as_str().unwrap().ends_with("-1"), "{v}");
    assert_ne!(v, first);
    assert_eq!(s.meta("idem2").await["events"], 1);
    // After the stream ended, the replay still returns the first answer.
    s.complete("idem").await;
    let (st3, b3) = post_key(&s, path, "key-1", r#"{"data":"once"}"#).await;
    assert_eq!(
        (st3, serde_json::from_str::<Value>(&b3).unwrap()),
        (201, first)
    );
    assert_eq!(s.meta("idem").await["events"], 5);
    assert_eq!(
        datas(&page(&s, "idem").await)[..4],
        ["before", "once", "b1", "b2"]
    );
}

#[tokio::test]
async fn idempotency_key_on_complete_and_fail_replays_instead_of_409() {
    let s = TestServer::start().await;
    s.append("c", "x").await;
    let (st1, b1) = post_key(
        &s,
        "/v1/streams/c/complete",
        "end-1",
        r#"{"data":{"ok":true}}"#,
    )
    .await;
    assert_eq!(st1, 200, "{b1}");
    let first: Value = serde_json::from_str(&b1).unwrap();
    assert_eq!(first["state"], "completed");
    let (st2, b2) = post_key(
        &s,
        "/v1/streams/c/complete",
        "end-1",
        r#"{"data":{"ok":true}}"#,
    )
    .await;
    assert_eq!(
        (st2, serde_json::from_str::<Value>(&b2).unwrap()),
        (200, first)
    );
    assert_eq!(s.meta("c").await["events"], 2);
    // A different body under the same key is not a replay.
    let (st, body) = post_key(
        &s,
        "/v1/streams/c/complete",
        "end-1",
        r#"{"data":{"ok":false}}"#,
    )
    .await;
    assert_eq!(st, 422, "{body}");
    // Without a key, it is the usual conflict.
    let (st, v) = s
        .post("/v1/streams/c/complete", r#"{"data":{"ok":true}}"#)
        .await;
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (409, Some("stream_ended")),
        "{v}"
    );

    s.append("f", "x").await;
    let (st1, b1) = post_key(&s, "/v1/streams/f/fail", "end-1", r#"{"error":"boom"}"#).await;
    assert_eq!(st1, 200, "{b1}");
    let first: Value = serde_json::from_str(&b1).unwrap();
    assert_eq!(first["state"], "failed");
    let (st2, b2) = post_key(&s, "/v1/streams/f/fail", "end-1", r#"{"error":"boom"}"#).await;
    assert_eq!(
        (st2, serde_json::from_str::<Value>(&b2).unwrap()),
        (200, first)
    );
    assert_eq!(s.meta("f").await["events"], 2);
}

#[tokio::test]
async fn put_creates_then_answers_the_same_metadata() {
    let s = TestServer::start().await;
    let (st, h, text) = request(&s, reqwest::Method::PUT, "/v1/streams/p", &[], "").await;
    assert_eq!(st, 201, "{text}");
    assert!(h["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/json"));
    let created: Value = serde_json::from_str(&text).unwrap();
    assert_meta(&created);
    assert_eq!(created["id"], "p");
    assert_eq!(created["state"], "open");
    assert_eq!(created["last_id"], Value::Null);
    assert_eq!(created["events"], 0);
    assert_eq!(created["watchers"], 0);
    let (st, _, text) = request(&s, reqwest::Method::PUT, "/v1/streams/p", &[], "").await;
    assert_eq!(st, 200, "{text}");
    let again: Value = serde_json::from_str(&text).unwrap();
    assert_meta(&again);
    assert_eq!(again, created);
    assert_eq!(s.meta("p").await, created);
    // An empty stream's page.
    let p = page(&s, "p").await;
    assert_eq!(p["events"], json!([]));
    assert_eq!(p["state"], "open");

    s.append("p", "a").await;
    s.append("p", "b").await;
    let (st, m) = s.post("/v1/streams/p/complete", "").await;
    assert_eq!(st, 200, "{m}");
    assert_meta(&m);
    let epoch = created["epoch"].as_str().unwrap();
    assert_eq!(m["epoch"], epoch);
    assert_eq!(m["created_at"], created["created_at"]);
    assert_eq!(m["state"], "completed");
    // `events` counts the jobcast.end.
    assert_eq!(m["events"], 3);
    assert_eq!(m["last_id"], format!("{epoch}-3"));
    // PUT on an ended stream changes nothing and answers its metadata.
    let (st, _, text) = request(&s, reqwest::Method::PUT, "/v1/streams/p", &[], "").await;
    assert_eq!(st, 200, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_meta(&v);
    assert_eq!(
        (v["state"].as_str(), v["events"].as_u64()),
        (Some("completed"), Some(3))
    );
}

#[tokio::test]
async fn complete_and_fail_end_the_stream_with_jobcast_end() {
    let s = TestServer::start().await;
    s.append("ok", "work").await;
    let (st, m) = s
        .post("/v1/streams/ok/complete", r#"{"data":{"ok":true}}"#)
        .await;
    assert_eq!(st, 200, "{m}");
    assert_meta(&m);
    assert_eq!(
        (m["state"].as_str(), m["events"].as_u64()),
        (Some("completed"), Some(2))
    );
    let p = page(&s, "ok").await;
    let end = &p["events"][1];
    assert_eq!(end["type"], "jobcast.end");
    assert_eq!(end["seq"], 2);
    assert_eq!(end["data"], r#"{"state":"completed","data":{"ok":true}}"#);
    assert_eq!(p["state"], "completed");
    assert_eq!(p["next"], Value::Null);

    s.append("bad", "work").await;
    let (st, m) = s.post("/v1/streams/bad/fail", r#"{"error":"boom"}"#).await;
    assert_eq!(st, 200, "{m}");
    assert_meta(&m);
    assert_eq!(
        (m["state"].as_str(), m["events"].as_u64()),
        (Some("failed"), Some(2))
    );
    let p = page(&s, "bad").await;
    let end = &p["events"][1];
    assert_eq!(end["type"], "jobcast.end");
    assert_eq!(end["data"], r#"{"state":"failed","error":"boom"}"#);
    assert_eq!(p["state"], "failed");

    // Bodies are optional.
    s.append("plain", "work").await;
    let (st, _, text) = request(
        &s,
        reqwest::Method::POST,
        "/v1/streams/plain/complete",
        &[],
        "",
    )
    .await;
    assert_eq!(st, 200, "{text}");
    assert_eq!(
        datas(&page(&s, "plain").await)[1],
        r#"{"state":"completed"}"#
    );
    s.append("plainfail", "work").await;
    let (st, _, text) = request(
        &s,
        reqwest::Method::POST,
        "/v1/streams/plainfail/fail",
        &[],
        "",
    )
    .await;
    assert_eq!(st, 200, "{text}");
    assert_eq!(
        datas(&page(&s, "plainfail").await)[1],
        r#"{"state":"failed"}"#
    );
    // The listing reflects the states.
    assert_eq!(s.meta("plain").await["state"], "completed");
    assert_eq!(s.meta("plainfail").await["state"], "failed");
}

#[tokio::test]
async fn delete_then_recreate_gives_a_new_epoch_and_a_reset_for_old_ids() {
    let s = TestServer::start().await;
    s.append("d", "old1").await;
    s.append("d", "old2").await;
    let old = s.meta("d").await["epoch"].as_str().unwrap().to_owned();
    let (st, _, text) = request(&s, reqwest::Method::DELETE, "/v1/streams/d", &[], "").await;
    assert_eq!((st, text.as_str()), (204, ""));
    let (st, v) = s.get_json("/v1/streams/d").await;
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (404, Some("stream_not_found")),
        "{v}"
    );
    assert_eq!(delete(&s, "d").await, 404);
    let (st, v) = s.get_json("/v1/streams").await;
    assert_eq!(st, 200);
    assert_eq!(v["streams"], json!([]));

    let a = s.append("d", "new1").await;
    let new = epoch_of(&a["first_id"]);
    assert_ne!(new, old);
    assert_eq!(a["first_id"], format!("{new}-1"));
    s.append("d", "new2").await;
    let m = s.meta("d").await;
    assert_eq!(
        (m["events"].as_u64(), m["state"].as_str()),
        (Some(2), Some("open"))
    );

    let (st, p) = s
        .get_json(&format!("/v1/streams/d/events?after={old}-2"))
        .await;
    assert_eq!(st, 200, "{p}");
    assert_eq!(
        p["reset"],
        json!({"reason": "epoch_mismatch", "requested": format!("{old}-2"), "resumed_from": format!("{new}-0")})
    );
    assert_eq!(datas(&p), ["new1", "new2"]);
    assert_eq!(p["events"][0]["id"], format!("{new}-1"));
    assert_eq!(p["next"], format!("{new}-2"));
    // No reset when the id is honoured.
    let (_, p) = s
        .get_json(&format!("/v1/streams/d/events?after={new}-1"))
        .await;
    assert!(p.get("reset").is_none_or(Value::is_null), "{p}");
    assert_eq!(datas(&p), ["new2"]);
}

#[tokio::test]
async fn json_page_walks_the_log_with_after_and_limit() {
    let s = TestServer::start().await;
    let data: Vec<String> = (1..=7).map(|i| format!("e{i}")).collect();
    let a = s.append_batch("pg", &data).await;
    let epoch = epoch_of(&a["first_id"]);

    // Nothing new: next is the given after.
    let (st, p) = s
        .get_json(&format!("/v1/streams/pg/events?after={epoch}-7"))
        .await;
    assert_eq!(st, 200);
    assert_eq!(
        p,
        json!({"events": [], "next": format!("{epoch}-7"), "state": "open"})
    );
    // Empty after counts as absent.
    let (st, p) = s.get_json("/v1/streams/pg/events?after=").await;
    assert_eq!(st, 200, "{p}");
    assert_eq!(seqs(&p), (1..=7).collect::<Vec<_>>());
    assert_eq!(p["next"], format!("{epoch}-7"));
    // `{epoch}-0` is before the first event.
    let (_, p) = s
        .get_json(&format!("/v1/streams/pg/events?after={epoch}-0&limit=1"))
        .await;
    assert_eq!(
        (seqs(&p), p["next"].clone()),
        (vec![1], json!(format!("{epoch}-1")))
    );

    // Right epoch, seq beyond the log: a reset, and nothing skipped.
    let (st, p) = s
        .get_json(&format!("/v1/streams/pg/events?after={epoch}-99"))
        .await;
    assert_eq!(st, 200, "{p}");
    assert_eq!(
        p["reset"],
        json!({"reason": "unknown_position", "requested": format!("{epoch}-99"), "resumed_from": format!("{epoch}-7")})
    );
    assert_eq!(p["events"], json!([]));
    assert_eq!(p["next"], format!("{epoch}-7"));

    s.complete("pg").await;
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    let mut pages = 0;
    loop {
        let q = match &after {
            None => "?limit=3".to_owned(),
            Some(a) => format!("?limit=3&after={a}"),
        };
        let res = s
            .client
            .get(s.url(&format!("/v1/streams/pg/events{q}")))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        let h = res.headers().clone();
        assert_eq!(h["cache-control"], "private, no-store");
        let vary = h
            .get_all("vary")
            .iter()
            .map(|v| v.to_str().unwrap().to_owned())
            .collect::<Vec<_>>()
            .join(", ");
        assert!(
            vary.split(',')
                .any(|v| v.trim().eq_ignore_ascii_case("accept")),
            "Vary: {vary}"
        );
        assert!(h["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json"));
        let p: Value = res.json().await.unwrap();
        assert_eq!(keys(&p), ["events", "next", "state"], "{p}");
        assert_eq!(p["state"], "completed");
        pages += 1;
        let got = seqs(&p);
        assert!(got.len() <= 3, "{p}");
        seen.extend(got.iter().copied());
        if p["next"].is_null() {
            assert_eq!(
                p["events"].as_array().unwrap().last().unwrap()["type"],
                "jobcast.end"
            );
            break;
        }
        assert_eq!(p["next"], format!("{epoch}-{}", got.last().unwrap()), "{p}");
        after = Some(p["next"].as_str().unwrap().to_owned());
        assert!(pages < 10, "paging does not end");
    }
    assert_eq!(seen, (1..=8).collect::<Vec<_>>());
    assert_eq!(pages, 3);
}

#[tokio::test]
async fn long_poll_returns_when_an_event_is_appended() {
    let s = std::sync::Arc::new(TestServer::start().await);
    let a = s.append("lp", "first").await;
    let epoch = epoch_of(&a["first_id"]);
    let producer = {
        let s = s.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            s.append("lp", "second").await;
        })
    };
    let started = Instant::now();
    let (st, p) = s
        .get_json(&format!("/v1/streams/lp/events?after={epoch}-1&wait=5"))
        .await;
    let took = started.elapsed();
    producer.await.unwrap();
    assert_eq!(st, 200, "{p}");
    assert_eq!(seqs(&p), [2]);
    assert_eq!(datas(&p), ["second"]);
    assert_eq!(p["next"], format!("{epoch}-2"));
    assert_eq!(p["state"], "open");
    // It returned on the append, not at the end of the wait.
    assert!(took < Duration::from_secs(5), "took {took:?}");

    // The end wakes a long poll too.
    let ender = {
        let s = s.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            s.complete("lp").await;
        })
    };
    let (st, p) = s
        .get_json(&format!("/v1/streams/lp/events?after={epoch}-2&wait=5"))
        .await;
    ender.await.unwrap();
    assert_eq!(st, 200, "{p}");
    assert_eq!(seqs(&p), [3]);
    assert_eq!(p["events"][0]["type"], "jobcast.end");
    assert_eq!(p["next"], Value::Null);
    assert_eq!(p["state"], "completed");
}

#[tokio::test]
async fn long_poll_with_nothing_new_answers_empty_after_the_wait() {
    let s = TestServer::start().await;
    let a = s.append("idle", "only").await;
    let epoch = epoch_of(&a["first_id"]);
    let started = Instant::now();
    let (st, p) = s
        .get_json(&format!("/v1/streams/idle/events?after={epoch}-1&wait=1"))
        .await;
    let took = started.elapsed();
    assert_eq!(st, 200, "{p}");
    assert_eq!(
        p,
        json!({"events": [], "next": format!("{epoch}-1"), "state": "open"})
    );
    assert!(
        took >= Duration::from_millis(950),
        "answered before the wait: {took:?}"
    );
}

#[tokio::test]
async fn list_is_newest_first_filters_by_state_and_pages() {
    let s = TestServer::start().await;
    for id in ["l1", "l2", "l3", "l4", "l5"] {
        s.append(id, "x").await;
    }
    s.complete("l2").await;
    s.complete("l4").await;
    let (st, v) = s.post("/v1/streams/l5/fail", r#"{"error":"e"}"#).await;
    assert_eq!(st, 200, "{v}");

    let ids = |v: &Value| -> Vec<String> {
        v["streams"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap().to_owned())
            .collect()
    };
    let (st, v) = s.get_json("/v1/streams").await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(keys(&v), ["next", "streams"]);
    assert_eq!(ids(&v), ["l5", "l4", "l3", "l2", "l1"]);
    assert_eq!(v["next"], Value::Null);
    for m in v["streams"].as_array().unwrap() {
        assert_meta(m);
    }
    assert_eq!(v["streams"][0]["state"], "failed");
    assert_eq!(v["streams"][1]["events"], 2);

    let (_, v) = s.get_json("/v1/streams?state=completed").await;
    assert_eq!(ids(&v), ["l4", "l2"]);
    let (_, v) = s.get_json("/v1/streams?state=open").await;
    assert_eq!(ids(&v), ["l3", "l1"]);
    let (_, v) = s.get_json("/v1/streams?state=failed").await;
    assert_eq!(ids(&v), ["l5"]);

    for (filter, want) in [
        ("", vec!["l5", "l4", "l3", "l2", "l1"]),
        ("&state=open", vec!["l3", "l1"]),
    ] {
        let mut all = Vec::new();
        let mut next: Option<String> = None;
        let mut pages = 0;
        loop {
            let path = match &next {
                None => format!("/v1/streams?limit=2{filter}"),
                Some(c) => format!("/v1/streams?limit=2{filter}&after={c}"),
            };
            let (st, v) = s.get_json(&path).await;
            assert_eq!(st, 200, "{path}: {v}");
            let got = ids(&v);
            assert!(!got.is_empty() && got.len() <= 2, "{path}: {v}");
            all.extend(got);
            pages += 1;
            assert!(pages < 10, "paging does not end");
            match &v["next"] {
                Value::Null => break,
                n => {
                    next = Some(
                        n.as_str()
                            .map(str::to_owned)
                            .unwrap_or_else(|| n.to_string()),
                    )
                }
            }
        }
        assert_eq!(all, want, "filter {filter:?}");
        assert_eq!(pages, want.len().div_ceil(2), "filter {filter:?}");
    }
}

#[tokio::test]
async fn sse_response_headers_and_no_compression() {
    let s = TestServer::start().await;
    for i in 1..=3 {
        s.append("h", &format!("e{i}").repeat(200)).await;
    }
    s.complete("h").await;
    let res = s
        .client
        .get(s.url("/v1/streams/h/events"))
        .header("accept", "text/event-stream")
        .header("accept-encoding", "gzip, deflate, br")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let h = res.headers().clone();
    assert_eq!(
        h["content-type"]
            .to_str()
            .unwrap()
            .split(';')
            .next()
            .unwrap()
            .trim(),
        "text/event-stream"
    );
    assert_eq!(h["cache-control"], "no-store, no-transform");
    assert_eq!(h["x-accel-buffering"], "no");
    let vary = h
        .get_all("vary")
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .collect::<Vec<_>>()
        .join(", ");
    assert!(
        vary.split(',')
            .any(|v| v.trim().eq_ignore_ascii_case("accept")),
        "Vary: {vary}"
    );
    assert!(
        h.get("content-encoding").is_none(),
        "compressed: {:?}",
        h.get("content-encoding")
    );
    let body = res.text().await.unwrap();
    assert!(body.starts_with("retry: 3000\n"), "{body:.200}");
    assert!(
        body.contains(&format!("data: {}\n", "e1".repeat(200))),
        "not plain text: {body:.200}"
    );

    // Any Accept containing text/event-stream is SSE; anything else is JSON.
    let mut w = s.watch("h", "", None).await;
    assert_eq!(w.collect(T).await.len(), 4);
    let res = s
        .client
        .get(s.url("/v1/streams/h/events"))
        .header("accept", "application/json, text/event-stream;q=0.9")
        .send()
        .await
        .unwrap();
    assert!(res.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    drop(res);
    let res = s
        .client
        .get(s.url("/v1/streams/h/events"))
        .header("accept", "*/*")
        .send()
        .await
        .unwrap();
    assert!(res.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/json"));
}

#[tokio::test]
async fn empty_last_event_id_counts_as_absent() {
    let s = TestServer::start().await;
    s.append_batch("e", &["a".into(), "b".into(), "c".into()])
        .await;
    s.complete("e").await;
    let mut w = s.watch("e", "", Some("")).await;
    assert_eq!(w.status, 200);
    let events = w.collect(T).await;
    assert_eq!(events.iter().map(seq_of).collect::<Vec<_>>(), [1, 2, 3, 4]);
    assert_eq!(events[0].data, "a");
    // An empty query parameter too.
    let mut w = s.watch("e", "?last_event_id=", None).await;
    assert_eq!(w.status, 200);
    assert_eq!(
        w.collect(T).await.iter().map(seq_of).collect::<Vec<_>>(),
        [1, 2, 3, 4]
    );
    // An empty header does not hide a query parameter.
    let epoch = s.meta("e").await["epoch"].as_str().unwrap().to_owned();
    let mut w = s
        .watch("e", &format!("?last_event_id={epoch}-2"), Some(""))
        .await;
    assert_eq!(w.status, 200);
    assert_eq!(
        w.collect(T).await.iter().map(seq_of).collect::<Vec<_>>(),
        [3, 4]
    );
}

#[tokio::test]
async fn health_and_readiness() {
    let s = TestServer::start().await;
    for path in ["/healthz", "/readyz"] {
        let res = s.client.get(s.url(path)).send().await.unwrap();
        assert_eq!(res.status(), 200, "{path}");
    }
}
