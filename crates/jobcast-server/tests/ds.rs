//! Durable Streams against a real server (127.0.0.1:0, real SQLite files,
//! real PostgreSQL databases): what the official conformance suite does not
//! check — offsets of a deleted stream never read its successor's log, one
//! log seen through both protocols (Last-Event-ID resume on a DS JSON
//! stream), the auth guard on DS paths, soft deletes and TTLs surviving a
//! restart, a DS long-poll on one PostgreSQL node woken by an append on
//! another, and bad input answered with stable codes.

mod common;
mod pg;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{seq_of, TestServer, T};
use jobcast_server::auth::Auth;
use jobcast_server::Config;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

/// A DS request; returns (status, headers, body).
async fn ds(
    s: &TestServer,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, reqwest::header::HeaderMap, String) {
    let mut req = s.client.request(
        method.parse().unwrap(),
        s.url(&format!("/ds/v1/stream/{path}")),
    );
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let res = req.body(body.to_owned()).send().await.unwrap();
    let status = res.status().as_u16();
    let h = res.headers().clone();
    (status, h, res.text().await.unwrap())
}

fn header<'a>(h: &'a reqwest::header::HeaderMap, name: &str) -> &'a str {
    h.get(name).and_then(|v| v.to_str().ok()).unwrap_or("")
}

const JSON: (&str, &str) = ("content-type", "application/json");
const TEXT: (&str, &str) = ("content-type", "text/plain");

#[tokio::test]
async fn an_offset_of_a_deleted_stream_never_reads_its_successor() {
    let s = TestServer::start().await;
    let (st, h, _) = ds(&s, "PUT", "reborn", &[TEXT], "old data").await;
    assert_eq!(st, 201);
    let old_tail = header(&h, "stream-next-offset").to_owned();
    assert_eq!(ds(&s, "DELETE", "reborn", &[], "").await.0, 204);
    assert_eq!(
        ds(&s, "PUT", "reborn", &[TEXT], "new data, longer").await.0,
        201
    );
    // The old tail is a position of the old creation: refused, never a read of the new log.
    let (st, _, body) = ds(&s, "GET", &format!("reborn?offset={old_tail}"), &[], "").await;
    assert_eq!(st, 410, "{body}");
    assert!(body.contains("offset_gone"), "{body}");
    let (st, h, body) = ds(&s, "GET", "reborn?offset=-1", &[], "").await;
    assert_eq!((st, body.as_str()), (200, "new data, longer"));
    assert!(
        header(&h, "stream-next-offset") > old_tail.as_str(),
        "offsets only grow"
    );
}

#[tokio::test]
async fn a_ds_json_stream_is_a_jobcast_stream_resumable_with_last_event_id() {
    let s = TestServer::start().await;
    assert_eq!(
        ds(&s, "PUT", "both", &[JSON], r#"[{"n":1},"two"]"#).await.0,
        201
    );
    assert_eq!(
        ds(&s, "POST", "both", &[JSON], r#"[[3],{"n":4}]"#).await.0,
        204
    );
    let (st, page) = s.get_json("/v1/streams/both/events").await;
    assert_eq!(st, 200);
    let data: Vec<&str> = page["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["data"].as_str().unwrap())
        .collect();
    assert_eq!(data, [r#"{"n":1}"#, r#""two""#, "[3]", r#"{"n":4}"#]);
    let second = page["events"][1]["id"].as_str().unwrap().to_owned();
    // Resume after the second message with Last-Event-ID; the DS close is the end.
    let mut sse = s.watch("both", "", Some(&second)).await;
    let first = sse.next_event(T).await.unwrap();
    assert_eq!((seq_of(&first), first.data.as_str()), (3, "[3]"));
    assert_eq!(sse.next_event(T).await.unwrap().data, r#"{"n":4}"#);
    let (st, _, _) = ds(
        &s,
        "POST",
        "both",
        &[JSON, ("stream-closed", "true")],
        r#"{"n":5}"#,
    )
    .await;
    assert_eq!(st, 204);
    assert_eq!(sse.next_event(T).await.unwrap().data, r#"{"n":5}"#);
    let end = sse.next_event(T).await.unwrap();
    assert_eq!(end.event, "jobcast.end");
    assert_eq!(s.meta("both").await["state"], "completed");
    // And a jobcast append shows up in DS JSON mode as one message.
    assert_eq!(
        s.post("/v1/streams/native/events", r#"{"data":{"k":"v"}}"#)
            .await
            .0,
        201
    );
    let (st, h, body) = ds(&s, "GET", "native?offset=-1", &[], "").await;
    assert_eq!((st, body.as_str()), (200, r#"[{"k":"v"}]"#));
    assert_eq!(header(&h, "content-type"), "application/json");
}

const SECRET: &str = "a test secret, long enough for HS256";

fn token(publish: &[&str], subscribe: &[&str]) -> String {
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    let claims = json!({ "exp": exp, "jobcast": { "publish": publish, "subscribe": subscribe } });
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

#[tokio::test]
async fn the_auth_guard_matches_ds_paths_against_the_token_patterns() {
    let s = TestServer::start_with(|c| {
        c.auth = Some(Auth::hs256(SECRET).unwrap().with_leeway(Duration::ZERO));
    })
    .await;
    let writer = format!("Bearer {}", token(&["team-a.*"], &[]));
    let reader = format!("Bearer {}", token(&[], &["team-a.*"]));
    let auth = |t: &str| ("authorization", t.to_owned());
    let put = |t: Option<String>, path: &'static str| {
        let s = &s;
        async move {
            let mut h = vec![("content-type", "text/plain".to_owned())];
            h.extend(t.map(|t| auth(&t)));
            let h: Vec<(&str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
            ds(s, "PUT", path, &h, "x").await.0
        }
    };
    assert_eq!(put(None, "team-a.one").await, 401);
    assert_eq!(put(Some(reader.clone()), "team-a.one").await, 403);
    assert_eq!(put(Some(writer.clone()), "team-b.one").await, 403);
    assert_eq!(put(Some(writer.clone()), "team-a.one").await, 201);
    let get = |t: &str| {
        let s = &s;
        let t = t.to_owned();
        async move {
            ds(
                s,
                "GET",
                "team-a.one?offset=-1",
                &[("authorization", &t)],
                "",
            )
            .await
        }
    };
    let (st, h, body) = get(&reader).await;
    assert_eq!((st, body.as_str()), (200, "x"));
    // A read that carried credentials is never cached publicly.
    assert_eq!(header(&h, "cache-control"), "private, no-store");
    assert_eq!(
        get(&writer).await.0,
        403,
        "publish does not grant subscribe"
    );
}

#[tokio::test]
async fn soft_deletes_and_ttls_survive_a_restart() {
    let s = TestServer::start().await;
    assert_eq!(ds(&s, "PUT", "src", &[TEXT], "abc").await.0, 201);
    assert_eq!(
        ds(
            &s,
            "PUT",
            "fork",
            &[TEXT, ("stream-forked-from", "src")],
            "def"
        )
        .await
        .0,
        201
    );
    assert_eq!(ds(&s, "DELETE", "src", &[], "").await.0, 204);
    assert_eq!(
        ds(&s, "PUT", "short", &[TEXT, ("stream-ttl", "1")], "t")
            .await
            .0,
        201
    );
    let dir = s.stop().await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let config = Config {
        db: format!("sqlite://{}", dir.path().join("jobcast.db").display()),
        ..Config::default()
    };
    let s = TestServer::start_in(dir, config).await;
    assert_eq!(ds(&s, "GET", "src?offset=-1", &[], "").await.0, 410);
    assert_eq!(ds(&s, "PUT", "src", &[TEXT], "").await.0, 409);
    let (st, _, body) = ds(&s, "GET", "fork?offset=-1", &[], "").await;
    assert_eq!((st, body.as_str()), (200, "abcdef"));
    assert_eq!(ds(&s, "HEAD", "short", &[], "").await.0, 404, "expired");
    // The last fork gone, the soft-deleted source goes too: its id is free.
    assert_eq!(ds(&s, "DELETE", "fork", &[], "").await.0, 204);
    assert_eq!(ds(&s, "GET", "src?offset=-1", &[], "").await.0, 404);
    assert_eq!(ds(&s, "PUT", "src", &[TEXT], "").await.0, 201);
}

/// method, path, headers, body, status, code.
type BadCase = (
    &'static str,
    &'static str,
    Vec<(&'static str, &'static str)>,
    &'static str,
    u16,
    &'static str,
);

#[tokio::test]
async fn bad_input_gets_a_stable_code_never_a_500() {
    let s = TestServer::start().await;
    assert_eq!(ds(&s, "PUT", "j", &[JSON], "").await.0, 201);
    let cases: Vec<BadCase> = vec![
        ("POST", "j", vec![JSON], "{nope", 400, "invalid_json"),
        ("POST", "j", vec![JSON], "[]", 400, "empty_batch"),
        ("POST", "j", vec![], "1", 400, "missing_content_type"),
        ("POST", "j", vec![JSON], "", 400, "empty_body"),
        (
            "POST",
            "j",
            vec![JSON, ("producer-id", "p")],
            "1",
            400,
            "invalid_producer",
        ),
        (
            "POST",
            "j",
            vec![
                JSON,
                ("producer-id", "p"),
                ("producer-epoch", "01"),
                ("producer-seq", "0"),
            ],
            "1",
            400,
            "invalid_producer",
        ),
        ("POST", "j", vec![TEXT], "1", 409, "content_type_mismatch"),
        (
            "PUT",
            "k",
            vec![("stream-ttl", "1.5")],
            "",
            400,
            "invalid_ttl",
        ),
        (
            "PUT",
            "k",
            vec![("stream-expires-at", "soon")],
            "",
            400,
            "invalid_expires_at",
        ),
        (
            "PUT",
            "k",
            vec![
                ("stream-ttl", "1"),
                ("stream-expires-at", "2030-01-01T00:00:00Z"),
            ],
            "",
            400,
            "ttl_and_expiry",
        ),
        (
            "PUT",
            "k",
            vec![("stream-forked-from", "j"), ("stream-fork-offset", "zz")],
            "",
            400,
            "invalid_fork_offset",
        ),
        ("PUT", "bad%20id", vec![], "", 400, "invalid_stream_id"),
        ("GET", "j?offset=1,2", vec![], "", 400, "invalid_offset"),
        (
            "GET",
            "j?offset=-1&offset=-1",
            vec![],
            "",
            400,
            "invalid_query",
        ),
        (
            "GET",
            "j?offset=-1&live=push",
            vec![],
            "",
            400,
            "invalid_live",
        ),
        ("GET", "j?live=sse", vec![], "", 400, "offset_required"),
        (
            "GET",
            "nothing?offset=-1",
            vec![],
            "",
            404,
            "stream_not_found",
        ),
    ];
    for (method, path, headers, body, status, code) in cases {
        let (st, _, text) = ds(&s, method, path, &headers, body).await;
        let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        assert_eq!(
            (st, v["error"]["code"].as_str().unwrap_or("")),
            (status, code),
            "{method} {path}: {text}"
        );
    }
}

#[tokio::test]
async fn a_ds_byte_stream_is_ds_only_on_v1() {
    let s = TestServer::start().await;
    let bin = [("content-type", "application/octet-stream")];
    assert_eq!(ds(&s, "PUT", "blob", &bin, "\u{0}\u{ff}").await.0, 201);
    let (st, body) = s.get_json("/v1/streams/blob/events").await;
    assert_eq!(
        (st, body["error"]["code"].as_str()),
        (409, Some("ds_byte_stream"))
    );
    let res = s
        .client
        .get(s.url("/v1/streams/blob/events"))
        .header("accept", "text/event-stream")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 409);
}

#[tokio::test]
async fn an_empty_prefix_turns_durable_streams_off() {
    let s = TestServer::start_with(|c| c.ds_prefix = String::new()).await;
    assert_eq!(ds(&s, "PUT", "x", &[TEXT], "a").await.0, 404);
}

async fn pg_node(db: &pg::Database) -> TestServer {
    let config = Config {
        db: db.url(),
        ds_long_poll: Duration::from_secs(30),
        ..Config::default()
    };
    TestServer::start_in(tempfile::tempdir().unwrap(), config).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_ds_long_poll_on_one_pg_node_is_woken_by_an_append_on_another() {
    let db = pg::Database::create().await;
    let (a, b) = (pg_node(&db).await, pg_node(&db).await);
    let (st, h, _) = ds(&a, "PUT", "multi", &[TEXT], "one ").await;
    assert_eq!(st, 201);
    let tail = header(&h, "stream-next-offset").to_owned();
    let poll = {
        let client = b.client.clone();
        let url = b.url(&format!("/ds/v1/stream/multi?offset={tail}&live=long-poll"));
        tokio::spawn(async move {
            let res = client.get(url).send().await.unwrap();
            (res.status().as_u16(), res.text().await.unwrap())
        })
    };
    // The long-poll is waiting on node b (30 s) when node a appends.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(ds(&a, "POST", "multi", &[TEXT], "two").await.0, 204);
    let (st, body) = tokio::time::timeout(T, poll)
        .await
        .expect("woken before its timeout")
        .unwrap();
    assert_eq!((st, body.as_str()), (200, "two"));
    let (st, _, body) = ds(&b, "GET", "multi?offset=-1", &[], "").await;
    assert_eq!((st, body.as_str()), (200, "one two"));
}
