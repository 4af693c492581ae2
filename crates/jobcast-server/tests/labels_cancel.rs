//! Labels (`PUT /v1/streams/{id}` with `{"labels":{…}}`, shown in metadata,
//! filtering the list) and cancel requests (`POST /v1/streams/{id}/cancel`:
//! one `jobcast.cancel_requested` event in the log, `cancel_requested` in
//! metadata and in every later append's answer; idempotent; 409 once
//! ended), on SQLite and PostgreSQL.

mod common;
mod pg;

use std::time::Duration;

use common::TestServer;
use serde_json::{json, Value};

async fn put(s: &TestServer, stream: &str, body: &str) -> (u16, Value) {
    let res = reqwest::Client::new()
        .put(s.url(&format!("/v1/streams/{stream}")))
        .header("content-type", "application/json")
        .body(body.to_owned())
        .send()
        .await
        .unwrap();
    common::status_json(res).await
}

fn ids(v: &Value) -> Vec<&str> {
    v["streams"]
        .as_array()
        .unwrap_or_else(|| panic!("not a list: {v}"))
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect()
}

async fn labels(s: &TestServer) {
    // Created with labels; metadata shows them.
    let (st, v) = put(
        s,
        "ci-1",
        r#"{"labels":{"team":"web","app.example.com/kind":"ci"}}"#,
    )
    .await;
    assert_eq!(st, 201, "{v}");
    assert_eq!(
        v["labels"],
        json!({"team":"web","app.example.com/kind":"ci"})
    );
    assert_eq!(v["cancel_requested"], json!(false));
    // A second PUT replaces them; a PUT without a body keeps them.
    let (st, v) = put(s, "ci-1", r#"{"labels":{"team":"api"}}"#).await;
    assert_eq!((st, &v["labels"]), (200, &json!({"team":"api"})), "{v}");
    let (st, v) = put(s, "ci-1", "").await;
    assert_eq!((st, &v["labels"]), (200, &json!({"team":"api"})), "{v}");
    s.append("ci-1", "x").await;
    assert_eq!(s.meta("ci-1").await["labels"], json!({"team":"api"}));
    let (st, _) = put(s, "ci-2", r#"{"labels":{"team":"web"}}"#).await;
    assert_eq!(st, 201);
    s.append("agent-1", "x").await;
    // The list filters by label and by id prefix.
    let (_, v) = s.get_json("/v1/streams?label.team=web").await;
    assert_eq!(ids(&v), vec!["ci-2"]);
    let (_, v) = s.get_json("/v1/streams?label.team=api&prefix=ci-").await;
    assert_eq!(ids(&v), vec!["ci-1"]);
    let (_, v) = s.get_json("/v1/streams?prefix=ci-").await;
    assert_eq!(ids(&v), vec!["ci-2", "ci-1"]);
    let (_, v) = s.get_json("/v1/streams?label.team=nobody").await;
    assert_eq!(ids(&v), Vec::<&str>::new());
    // Bad labels change nothing.
    let too_many: serde_json::Map<String, Value> =
        (0..17).map(|i| (format!("k{i}"), json!("v"))).collect();
    for bad in [
        json!({"labels": {"bad key": "v"}}).to_string(),
        json!({"labels": {"k": 1}}).to_string(),
        json!({"labels": {"k": "x".repeat(257)}}).to_string(),
        json!({"labels": Value::Object(too_many)}).to_string(),
        json!({"labels": ["k"]}).to_string(),
        json!({"tags": {}}).to_string(),
    ] {
        let (st, v) = put(s, "ci-1", &bad).await;
        assert_eq!(st, 400, "{bad}: {v}");
        assert!(
            matches!(
                v["error"]["code"].as_str(),
                Some("invalid_labels" | "unknown_field")
            ),
            "{bad}: {v}"
        );
    }
    assert_eq!(s.meta("ci-1").await["labels"], json!({"team":"api"}));
    let (st, v) = s.get_json("/v1/streams?label.bad%20key=x").await;
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (400, Some("invalid_labels"))
    );
}

async fn cancel(s: &TestServer) {
    let first = s.append("job", "a").await;
    assert_eq!(first.get("cancel_requested"), None, "{first}");
    let mut watch = s.watch("job", "?from=start", None).await;
    let (st, v) = s.post("/v1/streams/job/cancel", "").await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["cancel_requested"], json!(true));
    assert_eq!(v["events"], json!(2), "one event appended: {v}");
    // Idempotent: the second cancel appends nothing.
    let (st, v) = s.post("/v1/streams/job/cancel", "").await;
    assert_eq!((st, &v["events"]), (200, &json!(2)), "{v}");
    // Every later append's answer says so; the stream stays open.
    let later = s.append("job", "b").await;
    assert_eq!(later["cancel_requested"], json!(true), "{later}");
    assert_eq!(s.meta("job").await["state"], json!("open"));
    s.complete("job").await;
    let (st, v) = s.post("/v1/streams/job/cancel", "").await;
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (409, Some("stream_ended")),
        "{v}"
    );
    let (st, v) = s.post("/v1/streams/nope/cancel", "").await;
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (404, Some("stream_not_found")),
        "{v}"
    );
    // In the log, in order, with an id, exactly once.
    let events = watch.collect(Duration::from_secs(10)).await;
    let types: Vec<&str> = events.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(
        types,
        vec![
            "message",
            "jobcast.cancel_requested",
            "message",
            "jobcast.end"
        ]
    );
    assert_eq!(events[1].data, "{}");
    assert!(
        events[1].id_set && events[1].last_event_id.ends_with("-2"),
        "{:?}",
        events[1]
    );
}

#[tokio::test]
async fn labels_on_sqlite() {
    labels(&TestServer::start().await).await;
}

#[tokio::test]
async fn labels_on_postgres() {
    let db = pg::Database::create().await;
    let config = jobcast_server::Config {
        db: db.url(),
        ..Default::default()
    };
    labels(&TestServer::start_in(tempfile::tempdir().unwrap(), config).await).await;
}

#[tokio::test]
async fn cancel_on_sqlite() {
    cancel(&TestServer::start().await).await;
}

#[tokio::test]
async fn cancel_on_postgres() {
    let db = pg::Database::create().await;
    let config = jobcast_server::Config {
        db: db.url(),
        ..Default::default()
    };
    cancel(&TestServer::start_in(tempfile::tempdir().unwrap(), config).await).await;
}
