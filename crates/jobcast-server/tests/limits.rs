//! Every limit tripped answers its status (413, 400, 429 or 503 with
//! `Retry-After`) and a JSON error, and everyone else keeps being served:
//! connections per server and per client address, watchers per stream,
//! body size, event size, events per batch.

mod common;

use std::net::IpAddr;

use common::{status_json, Sse, TestServer, T};
use serde_json::Value;

/// A client whose connections come from `ip` (any 127.0.0.0/8 address is this machine).
fn client_from(ip: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .local_address(ip.parse::<IpAddr>().unwrap())
        .build()
        .unwrap()
}

async fn watch(client: &reqwest::Client, s: &TestServer, stream: &str) -> Sse {
    let res = client
        .get(s.url(&format!("/v1/streams/{stream}/events")))
        .header("accept", "text/event-stream")
        .send()
        .await
        .expect("watch");
    Sse::new(res)
}

/// A refused answer: its status, a `Retry-After`, and the JSON error code.
async fn refused(res: reqwest::Result<reqwest::Response>) -> (u16, String, String) {
    let res = res.expect("a refusal is an answer, not a reset");
    let retry_after = res
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let (status, v) = status_json(res).await;
    (
        status,
        retry_after,
        v["error"]["code"].as_str().unwrap_or("").to_owned(),
    )
}

/// Reads the first event of a watch (the one appended before it started).
async fn first_event(w: &mut Sse) -> String {
    w.next_event(T).await.expect("an event").data
}

#[tokio::test]
async fn connections_per_server() {
    let s = TestServer::start_with(|c| c.max_connections = 2).await;
    // Connection 1: a producer whose keep-alive connection stays open.
    let producer = reqwest::Client::new();
    let append = |data: &'static str| {
        producer
            .post(s.url("/v1/streams/c-1/events"))
            .header("content-type", "application/json")
            .body(format!(r#"{{"data":"{data}"}}"#))
            .send()
    };
    assert_eq!(append("one").await.unwrap().status(), 201);
    // Connection 2: a watcher.
    let mut w = watch(&reqwest::Client::new(), &s, "c-1").await;
    assert_eq!(w.status, 200);
    assert_eq!(first_event(&mut w).await, "one");
    // Connection 3: over the limit.
    let third = reqwest::Client::new();
    let (status, retry_after, code) = refused(third.get(s.url("/healthz")).send().await).await;
    assert_eq!(
        (status, retry_after.as_str(), code.as_str()),
        (503, "1", "too_many_connections")
    );
    // Everyone connected keeps being served.
    assert_eq!(append("two").await.unwrap().status(), 201);
    assert_eq!(first_event(&mut w).await, "two");
    // A slot freed is a slot for the next client.
    drop(w);
    let mut served = false;
    for _ in 0..100 {
        let res = third.get(s.url("/healthz")).send().await;
        if res.is_ok_and(|r| r.status() == 200) {
            served = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(served, "a freed connection slot was not given back");
    // Counted (at least the refusal above; the retries may add more).
    let metrics = s.server.state().metrics.encode();
    let refused: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix(r#"jobcast_connections_refused_total{reason="server"} "#))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(refused >= 1, "{metrics}");
}

#[tokio::test]
async fn connections_per_ip() {
    let s = TestServer::start_with(|c| c.max_connections_per_ip = Some(2)).await;
    s.append("ip-1", "one").await;
    let a = client_from("127.0.0.2");
    let mut w1 = watch(&client_from("127.0.0.2"), &s, "ip-1").await;
    let mut w2 = watch(&client_from("127.0.0.2"), &s, "ip-1").await;
    assert_eq!((w1.status, w2.status), (200, 200));
    let (status, retry_after, code) = refused(a.get(s.url("/healthz")).send().await).await;
    assert_eq!(
        (status, retry_after.as_str(), code.as_str()),
        (429, "1", "too_many_connections_per_ip")
    );
    // Another address is served, and the first address's watchers go on.
    let b = client_from("127.0.0.3");
    let res = b
        .post(s.url("/v1/streams/ip-1/events"))
        .header("content-type", "application/json")
        .body(r#"{"data":"two"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    for w in [&mut w1, &mut w2] {
        assert_eq!(first_event(w).await, "one");
        assert_eq!(first_event(w).await, "two");
    }
}

#[tokio::test]
async fn watchers_per_stream() {
    let s = TestServer::start_with(|c| c.max_watchers_per_stream = 2).await;
    s.append("w-1", "one").await;
    s.append("w-2", "one").await;
    let mut w1 = s.watch("w-1", "", None).await;
    let mut w2 = s.watch("w-1", "", None).await;
    assert_eq!((w1.status, w2.status), (200, 200));
    let res = s
        .client
        .get(s.url("/v1/streams/w-1/events"))
        .header("accept", "text/event-stream")
        .send()
        .await;
    let (status, retry_after, code) = refused(res).await;
    assert_eq!(
        (status, retry_after.as_str(), code.as_str()),
        (503, "5", "too_many_watchers")
    );
    // Another stream is watched; the first stream's watchers go on.
    let mut other = s.watch("w-2", "", None).await;
    assert_eq!(other.status, 200);
    assert_eq!(first_event(&mut other).await, "one");
    s.append("w-1", "two").await;
    for w in [&mut w1, &mut w2] {
        assert_eq!(first_event(w).await, "one");
        assert_eq!(first_event(w).await, "two");
    }
    // A watcher leaving makes room.
    drop(w1);
    let mut room = false;
    for _ in 0..100 {
        let w = s.watch("w-1", "", None).await;
        if w.status == 200 {
            room = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(room, "a watcher that left still counted");
}

#[tokio::test]
async fn body_event_and_batch_limits() {
    let s = TestServer::start_with(|c| {
        c.max_body_bytes = 4096;
        c.max_event_bytes = 100;
        c.max_batch = 3;
    })
    .await;
    s.append("b-1", "before").await;
    let mut w = s.watch("b-1", "", None).await;
    assert_eq!(first_event(&mut w).await, "before");
    let big_body = format!(r#"{{"data":"{}"}}"#, "x".repeat(10_000));
    let big_event = format!(r#"{{"data":"{}"}}"#, "x".repeat(101));
    let batch = r#"[{"data":"1"},{"data":"2"},{"data":"3"},{"data":"4"}]"#;
    let cases: [(&str, u16, &str); 3] = [
        (&big_body, 413, "body_too_large"),
        (&big_event, 413, "event_too_large"),
        (batch, 400, "batch_too_large"),
    ];
    for (body, status, code) in cases {
        let (got, v): (u16, Value) = s.post("/v1/streams/b-1/events", body).await;
        assert_eq!(
            (got, v["error"]["code"].as_str()),
            (status, Some(code)),
            "{v}"
        );
        // Nothing was appended, and the next producer and the watcher go on.
        s.append("b-1", code).await;
        assert_eq!(first_event(&mut w).await, code);
    }
    assert_eq!(s.meta("b-1").await["events"], 4);
}

/// `--max-watchers-per-ip`: a third watcher from one address gets 429;
/// another address is served; a watcher leaving makes room (issue 15).
#[tokio::test]
async fn watchers_per_ip() {
    let s = TestServer::start_with(|c| c.max_watchers_per_ip = Some(2)).await;
    s.append("i-1", "one").await;
    let a = client_from("127.0.0.1");
    let b = client_from("127.0.0.2");
    let mut w1 = watch(&a, &s, "i-1").await;
    let w2 = watch(&a, &s, "i-1").await;
    assert_eq!((w1.status, w2.status), (200, 200));
    let res = a
        .get(s.url("/v1/streams/i-1/events"))
        .header("accept", "text/event-stream")
        .send()
        .await;
    let (status, retry_after, code) = refused(res).await;
    assert_eq!(
        (status, retry_after.as_str(), code.as_str()),
        (429, "5", "too_many_watchers")
    );
    // Another address, and the same address's JSON reads, are served.
    let mut other = watch(&b, &s, "i-1").await;
    assert_eq!(other.status, 200);
    assert_eq!(first_event(&mut other).await, "one");
    assert_eq!(first_event(&mut w1).await, "one");
    let (status, _) =
        status_json(a.get(s.url("/v1/streams/i-1/events")).send().await.unwrap()).await;
    assert_eq!(status, 200);
    drop(w2);
    let mut room = false;
    for _ in 0..100 {
        if watch(&a, &s, "i-1").await.status == 200 {
            room = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(room, "a watcher that left still counted");
}

/// `--max-watchers-per-subject`: the token's `sub` is capped across streams
/// and addresses; another subject is served.
#[tokio::test]
async fn watchers_per_subject() {
    use jobcast_server::Auth;
    const SECRET: &str = "a test secret, long enough for HS256";
    let s = TestServer::start_with(|c| {
        c.max_watchers_per_subject = Some(1);
        c.auth = Some(Auth::hs256(SECRET).unwrap());
    })
    .await;
    let token = |sub: &str| {
        let exp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 600;
        let claims = serde_json::json!({
            "sub": sub, "exp": exp,
            "jobcast": {"publish": ["*"], "subscribe": ["*"]}
        });
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap()
    };
    let get = |stream: &str, t: &str, ip: &str| {
        client_from(ip)
            .get(s.url(&format!("/v1/streams/{stream}/events?wait=5")))
            .header("accept", "text/event-stream")
            .bearer_auth(t.to_owned())
            .send()
    };
    let alice = token("alice");
    let w = Sse::new(get("s-1", &alice, "127.0.0.1").await.unwrap());
    assert_eq!(w.status, 200);
    let (status, _, code) = refused(get("s-2", &alice, "127.0.0.3").await).await;
    assert_eq!((status, code.as_str()), (429, "too_many_watchers"));
    let bob = Sse::new(get("s-2", &token("bob"), "127.0.0.3").await.unwrap());
    assert_eq!(bob.status, 200);
    drop(w);
    let mut room = false;
    for _ in 0..100 {
        if get("s-2", &alice, "127.0.0.1").await.unwrap().status() == 200 {
            room = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(room, "a watcher that left still counted");
}
