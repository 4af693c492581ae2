//! The memory budget (issue 15 finding 2): watchers that never read cannot
//! pin unbounded memory. Replay is written in bounded pieces, each frame held
//! in the budget until its socket took it; past the budget new replays get
//! 503 `memory_budget_exceeded` and nothing already acknowledged is lost.

mod common;

use common::{seq_of, TestServer, T};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn used(metrics: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("jobcast_memory_used_bytes "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no jobcast_memory_used_bytes in {metrics}"))
}

/// A watcher whose socket accepts (almost) nothing: a 4 KiB receive buffer,
/// and it never reads.
async fn stalled(addr: std::net::SocketAddr, stream: &str) -> tokio::net::TcpStream {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let mut s = sock.connect(addr).await.unwrap();
    let req = format!(
        "GET /v1/streams/{stream}/events HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_watchers_are_bounded_by_the_memory_budget() {
    const BUDGET: usize = 8 << 20;
    let s = TestServer::start_with(|c| {
        c.memory_budget = BUDGET;
        c.write_timeout = Duration::from_secs(60);
    })
    .await;
    let big = "x".repeat(512 << 10);
    for _ in 0..30 {
        s.append("big", &big).await;
    }
    // Streams of their own for most of the stalled watchers (watchers of
    // one stream share its catch-up pages, so they cost little more than one).
    for i in 0..30 {
        for _ in 0..3 {
            s.append(&format!("big{i}"), &big).await;
        }
    }
    let addr: std::net::SocketAddr = s.url.trim_start_matches("http://").parse().unwrap();
    let mut socks = Vec::new();
    for _ in 0..10 {
        socks.push(stalled(addr, "big").await);
    }
    for i in 0..30 {
        socks.push(stalled(addr, &format!("big{i}")).await);
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (_, metrics) = s.get_json("/metrics").await;
    let held = used(metrics.as_str().unwrap());
    // One page of margin: a permit may grow to its frame past the limit.
    assert!(
        held <= (BUDGET + (1 << 20)) as u64,
        "{held} bytes held with a budget of {BUDGET}"
    );
    // Some were refused, with the stable code and a Retry-After.
    let mut refused = 0;
    for sock in &mut socks {
        let mut head = [0u8; 512];
        if let Ok(Ok(n)) =
            tokio::time::timeout(Duration::from_millis(200), sock.read(&mut head)).await
        {
            let text = String::from_utf8_lossy(&head[..n]);
            if text.starts_with("HTTP/1.1 503") {
                assert!(text.to_ascii_lowercase().contains("retry-after"), "{text}");
                refused += 1;
            }
        }
    }
    assert!(refused > 0, "no replay was refused past the budget");

    // A live watcher of another stream needs no replay and is served.
    let mut live = s.watch("other", "?from=live&wait=10", None).await;
    assert_eq!(live.status, 200);
    tokio::time::sleep(Duration::from_millis(200)).await;
    s.append("other", "fresh").await;
    assert_eq!(live.next_event(T).await.unwrap().data, "fresh");

    // The stalled watchers go away: the budget empties, and a replay of the
    // whole log gets every event exactly once.
    drop(socks);
    let mut freed = false;
    for _ in 0..100 {
        let (_, metrics) = s.get_json("/metrics").await;
        // The rings of two watched streams may stay.
        if used(metrics.as_str().unwrap()) < (2 << 20) {
            freed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(freed, "the budget did not empty after the watchers left");
    s.complete("big").await;
    let mut w = s.watch("big", "", None).await;
    assert_eq!(w.status, 200);
    let seqs: Vec<u64> = w.collect(T).await.iter().map(seq_of).collect();
    assert_eq!(seqs, (1..=31).collect::<Vec<_>>());
}

/// Request bodies count against the budget while they are read: past it a
/// body is refused with 503 `memory_budget_exceeded` and nothing is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_bodies_count_against_the_budget() {
    let s = TestServer::start_with(|c| {
        c.memory_budget = 1 << 20;
        c.body_timeout = Duration::from_secs(30);
    })
    .await;
    let addr: std::net::SocketAddr = s.url.trim_start_matches("http://").parse().unwrap();
    // A producer that declares 900 KiB and sends it slowly holds its share.
    let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /v1/streams/b/events HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        900 << 10
    );
    slow.write_all(head.as_bytes()).await.unwrap();
    slow.write_all(b"{\"data\":\"").await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Another large body does not fit now.
    let body = serde_json::json!({ "data": "y".repeat(600 << 10) }).to_string();
    let (status, v) = s.post("/v1/streams/b2/events", &body).await;
    assert_eq!(status, 503, "{v}");
    assert_eq!(v["error"]["code"], "memory_budget_exceeded");
    let (status, _) = s.get_json("/v1/streams/b2").await;
    assert_eq!(status, 404, "a refused append wrote nothing");
    // Small appends still fit.
    s.append("b3", "small").await;
    // The slow producer goes away: its share is free again.
    drop(slow);
    let mut ok = false;
    for _ in 0..50 {
        let (status, _) = s.post("/v1/streams/b2/events", &body).await;
        if status == 201 {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ok, "the budget was not released after the body went away");
}
