//! Two jobcast nodes on one PostgreSQL database behind a real nginx running
//! exactly the documented config (docs/nginx/jobcast.conf, also printed in
//! docs/operations.md): events pass through unbuffered, and a watcher
//! survives the death of the node it was on.

mod cli_support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use cli_support::nginx::{self, Nginx};
use cli_support::pg::TestDb;
use cli_support::sse::{self, Close, Watcher};
use cli_support::Server;
use jobcast_protocol::decode::Frame;

/// Two nodes on a new database, and nginx in front of them.
async fn cluster() -> (TestDb, Vec<Server>, Nginx) {
    let db = TestDb::create().await;
    let nodes: Vec<Server> = (0..2)
        .map(|_| Server::start_with(&db.url, 0, &["--heartbeat", "1s"]).expect("start node"))
        .collect();
    let nginx = Nginx::start([nodes[0].port, nodes[1].port]);
    (db, nodes, nginx)
}

/// What docs/operations.md shows is what the tests run (both configs).
#[test]
fn operations_md_shows_the_tested_h2_config() {
    let ops = std::fs::read_to_string(nginx::repo().join("docs/operations.md")).unwrap();
    let conf = nginx::documented("jobcast-h2.conf");
    assert!(
        ops.contains(&format!("```nginx\n{conf}```")),
        "docs/operations.md must show docs/nginx/jobcast-h2.conf verbatim in an ```nginx block"
    );
}

/// nginx terminating TLS with HTTP/2 in front of two nodes (the documented
/// jobcast-h2.conf): a page's 50 watches on one HTTP/2 connection to nginx,
/// each stream produced through the same connection, every event exactly
/// once, in order, then the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_watches_on_one_http2_connection_through_nginx() {
    let db = TestDb::create().await;
    let nodes: Vec<Server> = (0..2)
        .map(|_| Server::start_with(&db.url, 0, &["--heartbeat", "1s"]).expect("start node"))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let (cert_file, key_file) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_file, cert.cert.pem()).unwrap();
    std::fs::write(&key_file, cert.key_pair.serialize_pem()).unwrap();
    let nginx = Nginx::start_h2([nodes[0].port, nodes[1].port], &cert_file, &key_file);
    let client = reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(cert.cert.pem().as_bytes()).unwrap())
        .build()
        .unwrap();
    let streams: Vec<String> = (0..50).map(|i| format!("page-{i}")).collect();
    let mut watches = Vec::new();
    for s in &streams {
        let mut w = Watcher::new(s);
        let mut sse = match w.open(&client, &nginx.url).await {
            Ok(sse) => sse,
            Err(close) => panic!("watch {s} through nginx: {close:?}\n{}", nginx.error_log()),
        };
        // The retry line: the response is open, through nginx, before any event.
        match sse.next_frame(Duration::from_secs(30)).await {
            Some(Frame::Retry(_)) => {}
            other => panic!("{s}: first frame {other:?}"),
        }
        for name in ["connection", "keep-alive", "transfer-encoding"] {
            assert!(
                sse.headers.get(name).is_none(),
                "{name} on HTTP/2: {:?}",
                sse.headers
            );
        }
        watches.push((w, sse));
    }
    let res = client
        .get(format!("{}/healthz", nginx.url))
        .send()
        .await
        .unwrap();
    assert_eq!(
        res.version(),
        reqwest::Version::HTTP_2,
        "nginx speaks HTTP/2 to the client"
    );
    let urls = vec![nginx.url.clone()];
    for round in 1..=5 {
        for s in &streams {
            assert_eq!(
                sse::append(&client, &nginx.url, s, &format!("{s} {round}")).await,
                round
            );
        }
    }
    for s in &streams {
        sse::complete(&client, &urls, s, 10).await;
    }
    let reads = watches.into_iter().map(|(mut w, mut sse)| async move {
        let close = w.read(&mut sse, None).await;
        (w, close)
    });
    for (w, close) in futures::future::join_all(reads).await {
        assert_eq!(close, Some(Close::End), "{}", w.stream);
        let expected: Vec<String> = (1..=5).map(|r| format!("{} {r}", w.stream)).collect();
        w.assert_exactly_once(&expected);
        assert_eq!(
            w.connections, 1,
            "{}: one response carried everything",
            w.stream
        );
    }
}

/// What docs/operations.md shows is what the test runs.
#[test]
fn operations_md_shows_the_tested_config() {
    let ops = std::fs::read_to_string(nginx::repo().join("docs/operations.md")).unwrap();
    let conf = nginx::documented_conf();
    let block = format!("```nginx\n{conf}```");
    assert!(
        ops.contains(&block),
        "docs/operations.md must show docs/nginx/jobcast.conf verbatim in an ```nginx block"
    );
}

/// Each event reaches a watcher through nginx while the response stays
/// open: event i+1 is appended only after event i arrived, so a buffering
/// proxy would hold event 1 (and the test would time out).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_pass_through_nginx_unbuffered() {
    let (_db, _nodes, nginx) = cluster().await;
    let client = reqwest::Client::new();
    let stream = "through-nginx";
    let mut w = Watcher::new(stream);
    // As a browser asks: a proxy that compressed the stream would hold it back.
    w.headers
        .push(("accept-encoding".into(), "gzip, deflate, br".into()));
    let mut sse = match w.open(&client, &nginx.url).await {
        Ok(sse) => sse,
        Err(close) => panic!("watch through nginx: {close:?}\n{}", nginx.error_log()),
    };
    assert_eq!(sse.headers["content-type"], "text/event-stream");
    assert!(
        sse.headers.get("content-encoding").is_none(),
        "the stream is not compressed: {:?}",
        sse.headers
    );
    // The first bytes (the retry line) pass before any event exists.
    match sse.next_frame(Duration::from_secs(30)).await {
        Some(Frame::Retry(_)) => {}
        other => panic!("first frame through nginx: {other:?}"),
    }
    let mut expected = Vec::new();
    for i in 1..=5u64 {
        let data = format!("event {i}");
        let seq = sse::append(&client, &nginx.url, stream, &data).await;
        assert_eq!(seq, i);
        expected.push(data);
        assert_eq!(w.read(&mut sse, Some(i as usize)).await, None, "event {i}");
    }
    sse::complete(&client, std::slice::from_ref(&nginx.url), stream, 10).await;
    assert_eq!(w.read(&mut sse, None).await, Some(Close::End));
    w.assert_exactly_once(&expected);
    assert_eq!(w.connections, 1, "one response carried everything");
}

/// The node holding a watcher's connection is killed (SIGKILL) while events
/// are appended through nginx: the watcher reconnects through nginx with
/// Last-Event-ID, lands on the other node, and gets every event exactly once,
/// then the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_through_nginx_survives_a_node_death() {
    let (_db, mut nodes, nginx) = cluster().await;
    let client = reqwest::Client::new();
    let stream = "node-death";
    let urls = vec![nginx.url.clone()];
    let res = client
        .put(format!("{}/v1/streams/{stream}", nginx.url))
        .send()
        .await
        .expect("PUT");
    assert_eq!(res.status(), 201, "PUT {stream}");

    let mut w = Watcher::new(stream);
    let mut sse = w
        .open(&client, &nginx.url)
        .await
        .expect("watch through nginx");
    // Which node holds it (`watchers` counts this node's only).
    let mut victim = None;
    for _ in 0..400 {
        for (i, n) in nodes.iter().enumerate() {
            let v: serde_json::Value = client
                .get(format!("{}/v1/streams/{stream}", n.url))
                .send()
                .await
                .expect("meta")
                .json()
                .await
                .unwrap_or_default();
            if v["watchers"].as_u64().unwrap_or(0) >= 1 {
                victim = Some(i);
            }
        }
        if victim.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let victim = victim.expect("no node reports the watcher");

    // A producer through nginx, one event at a time, each with its own
    // Idempotency-Key: a POST cut by the node's death (502) is retried
    // without appending twice. It stops when `stop_at` falls to its count.
    let stop_at = Arc::new(AtomicUsize::new(usize::MAX));
    let producer = {
        let (client, urls, stop_at) = (client.clone(), urls.clone(), stop_at.clone());
        tokio::spawn(async move {
            let mut sent = Vec::new();
            for i in 0..5_000usize {
                if i >= stop_at.load(Ordering::SeqCst) {
                    break;
                }
                let data = format!("e{i}");
                let (id, _) = sse::append_with_key(
                    &client,
                    &urls,
                    stream,
                    &format!("k{i}"),
                    &data,
                    100,
                    Duration::from_millis(100),
                )
                .await;
                assert_eq!(
                    sse::seq(&id),
                    i as u64 + 1,
                    "acked seqs follow the producer's order"
                );
                sent.push(data);
            }
            sent
        })
    };
    assert_eq!(w.read(&mut sse, Some(10)).await, None, "ten events first");
    nodes[victim].kill();
    let before = w.events.len();
    let close = w.read(&mut sse, None).await;
    assert!(
        matches!(close, Some(Close::Cut(_))),
        "the watch through the dead node was cut: {close:?}"
    );
    drop(sse);
    // Let the producer get 20 appends past the death, then stop it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let v = cli_support::read_log(&client, &nginx.url, stream).await;
        if v.len() >= before + 20 {
            stop_at.store(0, Ordering::SeqCst);
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "appends stalled after the death"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let sent = producer.await.expect("producer");
    sse::complete(&client, &urls, stream, 50).await;

    w.follow(&client, &urls, Duration::from_millis(100), 20)
        .await;
    assert!(
        w.events.len() > before,
        "the watcher resumed after the death"
    );
    w.assert_exactly_once(&sent);
    assert!(w.connections >= 2, "it reconnected");
    let _ = nginx.error_log();
}
