//! The abuse soak (issue 15), bounded in time, against the real binary: a
//! producer appends and a good watcher watches, first quietly, then while
//! others hold stalled readers on a large stream, slow bodies, trickled
//! heads and many idle connections from one address.
//!
//! It asserts what must hold whatever the machine's speed: the good watcher
//! gets every event exactly once, every append is acknowledged, the memory
//! the abuse adds stays within `--memory-budget`, and every abusive
//! connection ends by itself. The latencies (quiet and under abuse) are
//! measured and printed, not asserted (timing thresholds do not go into
//! tests on noisy machines); docs/security.md has the figures.
//! `JOBCAST_ABUSE_SECONDS` (default 6) sets each phase's length.

mod cli_support;

use std::time::{Duration, Instant};

use cli_support::Server;
use jobcast_protocol::decode::{Decoder, Frame};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const BUDGET: usize = 64 << 20;

fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

fn p99(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() as f64 * 0.99) as usize).min(v.len() - 1)]
}

/// Appends one small event every 10 ms for `secs`; the ack latencies (ms)
/// and when each append was sent.
async fn produce(url: &str, stream: &str, from: u64, secs: f64) -> (Vec<f64>, Vec<Instant>) {
    let client = reqwest::Client::new();
    let until = Instant::now() + Duration::from_secs_f64(secs);
    let mut acks = Vec::new();
    let mut sent_at = Vec::new();
    let mut n = from;
    while Instant::now() < until {
        n += 1;
        let sent = Instant::now();
        let body = serde_json::json!({ "data": format!("{n}") }).to_string();
        let res = client
            .post(format!("{url}/v1/streams/{stream}/events"))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("append");
        assert_eq!(res.status(), 201, "append {n}: {:?}", res.text().await);
        acks.push(sent.elapsed().as_secs_f64() * 1000.0);
        sent_at.push(sent);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    (acks, sent_at)
}

/// The good watcher: every event of `stream`, with the time each arrived.
async fn good_watcher(url: String, stream: String, count: u64) -> Vec<(u64, Instant)> {
    let res = reqwest::Client::new()
        .get(format!("{url}/v1/streams/{stream}/events?wait=60"))
        .header("accept", "text/event-stream")
        .send()
        .await
        .expect("watch");
    assert_eq!(res.status(), 200);
    let mut body = res;
    let mut dec = Decoder::new();
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while (got.len() as u64) < count && Instant::now() < deadline {
        let Ok(Some(chunk)) = body.chunk().await else {
            break;
        };
        let now = Instant::now();
        let mut frames = Vec::new();
        dec.feed(&chunk, &mut frames);
        for f in frames {
            if let Frame::Event(e) = f {
                let seq = jobcast_protocol::EventId::parse(&e.last_event_id)
                    .expect("id")
                    .seq;
                got.push((seq, now));
            }
        }
    }
    got
}

/// Whether the server closed `sock` within `limit` (EOF or a reset).
async fn closed_within(sock: &mut TcpStream, limit: Duration) -> bool {
    let until = tokio::time::Instant::now() + limit;
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match tokio::time::timeout_at(until, sock.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abuse_soak_keeps_the_good_watcher_whole_and_bounded() {
    let secs: f64 = std::env::var("JOBCAST_ABUSE_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(6.0);
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("jobcast.db").display());
    let budget = BUDGET.to_string();
    let server = Server::start_with(
        &db,
        0,
        &[
            "--memory-budget",
            &budget,
            "--write-timeout",
            "3s",
            "--header-timeout",
            "2s",
            "--body-timeout",
            "2s",
        ],
    )
    .expect("start jobcast");
    let url = server.url.clone();
    let pid = server.child.id();
    let addr: std::net::SocketAddr = url.trim_start_matches("http://").parse().unwrap();
    let client = reqwest::Client::new();

    // A large stream for the stalled readers: 40 events of 512 KiB.
    let big = "x".repeat(512 << 10);
    for _ in 0..40 {
        let res = client
            .post(format!("{url}/v1/streams/big/events"))
            .header("content-type", "application/json")
            .body(serde_json::json!({ "data": big }).to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 201);
    }
    let quiet_rss = rss_kb(pid);

    // Phase 1, quiet: the producer and the good watcher alone.
    let watcher = tokio::spawn(good_watcher(url.clone(), "good".into(), u64::MAX));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (mut quiet_acks, quiet_sent) = produce(&url, "good", 0, secs).await;
    let quiet_n = quiet_sent.len() as u64;

    // Phase 2, abuse, while the same producer and watcher go on.
    let mut stalled = Vec::new();
    for _ in 0..60 {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.set_recv_buffer_size(4096).unwrap();
        let mut s = sock.connect(addr).await.unwrap();
        s.write_all(
            b"GET /v1/streams/big/events HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n",
        )
        .await
        .unwrap();
        stalled.push(s);
    }
    let mut slow_bodies = Vec::new();
    for i in 0..20 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let head = format!(
            "POST /v1/streams/slow{i}/events HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n{{\"data\""
        );
        s.write_all(head.as_bytes()).await.unwrap();
        slow_bodies.push(s);
    }
    let mut trickled = Vec::new();
    for _ in 0..20 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"G").await.unwrap();
        trickled.push(s);
    }
    let mut idle = Vec::new();
    for _ in 0..200 {
        idle.push(TcpStream::connect(addr).await.unwrap());
    }
    // Trickle the heads a byte at a time while the producer runs.
    let trickler = tokio::spawn(async move {
        for _ in 0..20 {
            for s in trickled.iter_mut() {
                let _ = s.write_all(b"E").await;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        trickled
    });
    let rss_probe = tokio::spawn(async move {
        let mut peak = 0;
        for _ in 0..((secs * 10.0) as u64) {
            peak = peak.max(rss_kb(pid));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        peak
    });
    let abuse_started = Instant::now();
    let (mut abuse_acks, abuse_sent) = produce(&url, "good", quiet_n, secs).await;
    let abuse_n = abuse_sent.len() as u64;
    let peak_rss = rss_probe.await.unwrap();

    // Every event reached the good watcher exactly once, in order.
    let res = client
        .post(format!("{url}/v1/streams/good/complete"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let got = tokio::time::timeout(Duration::from_secs(60), async {
        // The watcher stops at the end event (seq total + 1) or its deadline.
        loop {
            if watcher.is_finished() {
                break watcher.await.unwrap();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    let total = quiet_n + abuse_n;
    let got = match got.await {
        Ok(g) => g,
        Err(_) => panic!("the good watcher did not finish"),
    };
    let seqs: Vec<u64> = got.iter().map(|(s, _)| *s).collect();
    assert_eq!(seqs, (1..=total + 1).collect::<Vec<_>>(), "good watcher");
    // Publish-to-receive, from when each append was sent.
    let sent: Vec<Instant> = quiet_sent.iter().chain(&abuse_sent).copied().collect();
    let delivery = |range: std::ops::Range<usize>| -> Vec<f64> {
        range
            .map(|i| got[i].1.saturating_duration_since(sent[i]).as_secs_f64() * 1000.0)
            .collect()
    };
    let mut quiet_delivery = delivery(0..quiet_n as usize);
    let mut abuse_delivery = delivery(quiet_n as usize..total as usize);

    // The memory the abuse added stays within the budget.
    let added = peak_rss.saturating_sub(quiet_rss) * 1024;
    assert!(
        added <= BUDGET as u64,
        "abuse added {added} bytes of RSS, over the {BUDGET}-byte budget (quiet {quiet_rss} KiB, peak {peak_rss} KiB)"
    );

    // Every abusive connection ends by itself (write, body and head timeouts).
    let trickled = trickler.await.unwrap();
    let limit = Duration::from_secs(20);
    for s in stalled.iter_mut() {
        assert!(closed_within(s, limit).await, "a stalled reader was kept");
    }
    for s in slow_bodies.iter_mut() {
        assert!(closed_within(s, limit).await, "a slow body was kept");
    }
    for mut s in trickled {
        assert!(
            closed_within(&mut s, limit).await,
            "a trickled head was kept"
        );
    }
    for s in idle.iter_mut() {
        assert!(closed_within(s, limit).await, "an idle connection was kept");
    }
    let ended_in = abuse_started.elapsed();

    println!(
        "abuse soak ({secs} s per phase): quiet: ack p99 {:.2} ms, delivery p99 {:.2} ms over {quiet_n} appends; \
         under abuse: ack p99 {:.2} ms, delivery p99 {:.2} ms over {abuse_n} appends; \
         RSS quiet {} MiB, peak {} MiB (budget {} MiB); every abusive connection ended within {:.1} s",
        p99(&mut quiet_acks),
        p99(&mut quiet_delivery),
        p99(&mut abuse_acks),
        p99(&mut abuse_delivery),
        quiet_rss / 1024,
        peak_rss / 1024,
        BUDGET >> 20,
        ended_in.as_secs_f64()
    );
}
