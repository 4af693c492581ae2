//! The lean SSE writer and hyper answer watch requests the same way.

mod common;

use std::time::Duration;

use common::{seq_of, TestServer, T};
use futures::StreamExt;
use jobcast_protocol::decode::{Decoder, Frame};

/// Watches over a fresh connection (so the lean path can take it) and
/// returns (status, headers, events).
async fn watch_fresh(
    s: &TestServer,
    path: &str,
    last_id: Option<&str>,
) -> (
    u16,
    reqwest::header::HeaderMap,
    Vec<jobcast_protocol::decode::SseEvent>,
) {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let mut req = client
        .get(s.url(path))
        .header("accept", "text/event-stream");
    if let Some(id) = last_id {
        req = req.header("last-event-id", id);
    }
    let res = req.send().await.unwrap();
    let (status, headers) = (res.status().as_u16(), res.headers().clone());
    let mut body = res.bytes_stream();
    let mut dec = Decoder::new();
    let mut frames = Vec::new();
    while let Some(chunk) = tokio::time::timeout(T, body.next()).await.expect("stalled") {
        dec.feed(&chunk.unwrap(), &mut frames);
    }
    let events = frames
        .into_iter()
        .filter_map(|f| match f {
            Frame::Event(e) => Some(e),
            _ => None,
        })
        .collect();
    (status, headers, events)
}

async fn scenario(lean: bool) {
    let s = TestServer::start_with(|c| c.lean_sse = lean).await;
    s.append_batch("l", &["a".into(), "b\r\nc".into()]).await;
    let live = {
        let s_url = s.url.clone();
        tokio::spawn(async move {
            let client = reqwest::Client::builder()
                .pool_max_idle_per_host(0)
                .build()
                .unwrap();
            let res = client
                .get(format!("{s_url}/v1/streams/l/events?from=live"))
                .header("accept", "text/event-stream")
                .send()
                .await
                .unwrap();
            let bytes = tokio::time::timeout(T, res.bytes()).await.unwrap().unwrap();
            let mut frames = Vec::new();
            Decoder::new().feed(&bytes, &mut frames);
            frames.len()
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    s.append("l", "d").await;
    s.complete("l").await;
    let (status, headers, events) = watch_fresh(&s, "/v1/streams/l/events", None).await;
    assert_eq!(status, 200);
    assert_eq!(headers["content-type"], "text/event-stream");
    assert_eq!(headers["cache-control"], "no-store, no-transform");
    assert_eq!(headers["x-accel-buffering"], "no");
    assert_eq!(
        headers.get("connection").map(|v| v == "close"),
        lean.then_some(true)
    );
    assert_eq!(
        events.iter().map(seq_of).collect::<Vec<_>>(),
        vec![1, 2, 3, 4]
    );
    assert_eq!(events[1].data, "b\nc");
    assert_eq!(events[3].event, "jobcast.end");
    // retry, "d", end
    assert_eq!(live.await.unwrap(), 3);
    let epoch = s.meta("l").await["epoch"].as_str().unwrap().to_owned();
    let (status, _, events) =
        watch_fresh(&s, "/v1/streams/l/events", Some(&format!("{epoch}-4"))).await;
    assert_eq!((status, events.len()), (204, 0));
    let (status, headers, _) = watch_fresh(&s, "/v1/streams/l/events", Some("nope")).await;
    assert_eq!(status, 400);
    assert_eq!(headers["content-type"], "application/json");
    let (status, _, _) = watch_fresh(&s, "/v1/streams/-x/events", None).await;
    assert_eq!(status, 400);
}

#[tokio::test]
async fn lean_path_answers_like_hyper() {
    scenario(true).await;
}

#[tokio::test]
async fn hyper_path_answers_the_same() {
    scenario(false).await;
}

/// A keep-alive connection used first for JSON and then for SSE is served
/// by hyper throughout, and pipelined requests are answered in order.
#[tokio::test]
async fn reused_connections_stay_with_hyper() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = TestServer::start().await;
    s.append("k", "x").await;
    s.complete("k").await;
    let addr = s.url.trim_start_matches("http://").to_owned();
    let mut sock = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let req = "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\nGET /v1/streams/k/events HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\nConnection: close\r\n\r\n";
    sock.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(T, sock.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 200 OK"), "{text}");
    assert!(text.contains(r#"{"status":"ok"}"#), "{text}");
    assert!(text.contains("event: jobcast.end"), "{text}");
}
