//! HTTP/2 in the owned accept loop: h2c with prior knowledge (reqwest and
//! curl) and TLS with ALPN, each HTTP/1.1 guarantee per HTTP/2 stream — a
//! stalled stream is reset after the write timeout while its connection
//! goes on, every watcher gets `shutting_down`, the per-address watcher cap
//! counts stream requests — no connection headers on an HTTP/2 answer, and
//! a certificate reload that drops nothing.

mod common;

use std::time::Duration;

use common::{seq_of, status_json, Sse, TestServer, T};
use jobcast_server::tls::{Tls, TlsFiles};
use jobcast_server::{Config, Jobcast};

/// A reqwest client that speaks HTTP/2 from the first byte.
fn h2c() -> reqwest::Client {
    reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap()
}

/// A counter or gauge from /metrics (read over its own HTTP/1.1 connection), 0 when absent.
async fn metric(url: &str, series: &str) -> u64 {
    let text = reqwest::Client::builder()
        .http1_only()
        .build()
        .unwrap()
        .get(format!("{url}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let prefix = format!("{series} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map_or(0, |v| v.trim().parse::<f64>().unwrap() as u64)
}

async fn watch(c: &reqwest::Client, url: &str, stream: &str, query: &str) -> Sse {
    let res = c
        .get(format!("{url}/v1/streams/{stream}/events{query}"))
        .header("accept", "text/event-stream")
        .send()
        .await
        .expect("watch");
    assert_eq!(res.version(), reqwest::Version::HTTP_2);
    Sse::new(res)
}

async fn append(c: &reqwest::Client, url: &str, stream: &str, data: &str) {
    let res = c
        .post(format!("{url}/v1/streams/{stream}/events"))
        .header("content-type", "application/json")
        .body(serde_json::json!({ "data": data }).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sse_answer_on_http2_carries_no_connection_headers() {
    let s = TestServer::start().await;
    let c = h2c();
    append(&c, &s.url, "h", "one").await;
    let mut w = watch(&c, &s.url, "h", "").await;
    assert_eq!(w.status, 200);
    for name in [
        "connection",
        "keep-alive",
        "transfer-encoding",
        "proxy-connection",
        "upgrade",
    ] {
        assert!(
            w.headers.get(name).is_none(),
            "{name} on HTTP/2: {:?}",
            w.headers
        );
    }
    assert_eq!(w.headers["content-type"], "text/event-stream");
    assert_eq!(w.headers["cache-control"], "no-store, no-transform");
    assert_eq!(w.headers["x-accel-buffering"], "no");
    assert_eq!(seq_of(&w.next_event(T).await.unwrap()), 1);
    // The JSON routes answer on the same connection.
    let res = c.get(s.url("/v1/streams/h")).send().await.unwrap();
    assert_eq!(res.version(), reqwest::Version::HTTP_2);
    let (status, meta) = status_json(res).await;
    assert_eq!((status, meta["watchers"].as_u64()), (200, Some(1)));
    assert_eq!(
        metric(&s.url, "jobcast_connections_accepted_total{proto=\"h2c\"}").await,
        1
    );
}

/// A client that stops reading one stream keeps that stream's window shut:
/// hyper stops polling its body. The stream is reset after the write
/// timeout and its watcher freed; the other stream on the same connection
/// goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_stream_is_reset_and_its_connection_goes_on() {
    let s = TestServer::start_with(|c| {
        c.write_timeout = Duration::from_secs(1);
        c.heartbeat = Duration::from_millis(500);
    })
    .await;
    // A 64 KiB window per stream (the protocol's default), a large one for
    // the connection: only the stalled stream is stuck.
    let c = reqwest::Client::builder()
        .http2_prior_knowledge()
        .http2_initial_stream_window_size(65_535)
        .http2_initial_connection_window_size(16 << 20)
        .http2_adaptive_window(false)
        .build()
        .unwrap();
    let stalled = watch(&c, &s.url, "stall", "").await;
    let mut fine = watch(&c, &s.url, "fine", "").await;
    // 512 KiB for the stalled watcher, which reads none of it.
    let big = "x".repeat(32 << 10);
    for _ in 0..16 {
        append(&c, &s.url, "stall", &big).await;
    }
    let mut freed = false;
    for _ in 0..300 {
        let (_, meta) = s.get_json("/v1/streams/stall").await;
        if meta["watchers"] == 0 && metric(&s.url, "jobcast_write_timeouts_total").await >= 1 {
            freed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(freed, "the stalled stream's watcher was not freed");
    // The connection and its other stream are fine.
    append(&c, &s.url, "fine", "still here").await;
    let e = fine.next_event(T).await.unwrap();
    assert_eq!(e.data, "still here");
    assert_eq!(
        metric(&s.url, "jobcast_connections_accepted_total{proto=\"h2c\"}").await,
        1
    );
    drop(stalled);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_http2_watcher_gets_shutting_down() {
    let s = TestServer::start().await;
    let c = h2c();
    let mut readers = Vec::new();
    for i in 0..5 {
        let mut w = watch(&c, &s.url, &format!("sd-{i}"), "?from=live").await;
        // The retry line: the response is open before shutting down.
        w.next_frame(T).await.unwrap();
        readers.push(tokio::spawn(async move { w.collect(T).await }));
    }
    s.stop().await;
    for r in readers {
        let events = r.await.unwrap();
        let last = events.last().expect("an event before the close");
        assert_eq!(last.event, "jobcast.error");
        let p: serde_json::Value = serde_json::from_str(&last.data).unwrap();
        assert_eq!(
            (p["code"].as_str(), p["retryable"].as_bool()),
            (Some("shutting_down"), Some(true))
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watcher_cap_per_address_counts_http2_streams() {
    let s = TestServer::start_with(|c| c.max_watchers_per_ip = Some(2)).await;
    let c = h2c();
    let mut a = watch(&c, &s.url, "cap-a", "").await;
    let mut b = watch(&c, &s.url, "cap-b", "").await;
    a.next_frame(T).await.unwrap();
    b.next_frame(T).await.unwrap();
    let res = c
        .get(s.url("/v1/streams/cap-c/events"))
        .header("accept", "text/event-stream")
        .send()
        .await
        .unwrap();
    let (status, v) = status_json(res).await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (429, Some("too_many_watchers"))
    );
    // One stream closed: its place is free again.
    drop(a);
    let mut ok = false;
    for _ in 0..100 {
        let res = c
            .get(s.url("/v1/streams/cap-c/events"))
            .header("accept", "text/event-stream")
            .send()
            .await
            .unwrap();
        if res.status() == 200 {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ok, "a freed place is taken again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_with_http2_prior_knowledge() {
    let s = TestServer::start().await;
    for i in 1..=3 {
        s.append("curl", &format!("e{i}")).await;
    }
    s.complete("curl").await;
    let epoch = s.meta("curl").await["epoch"].as_str().unwrap().to_owned();
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "--http2-prior-knowledge", "-N", "--max-time", "20"])
        .args([
            "-H",
            "accept: text/event-stream",
            "-w",
            "\nversion=%{http_version}\n",
        ])
        .arg(s.url("/v1/streams/curl/events?from=tail:2"))
        .output()
        .await
        .expect("curl is installed");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.starts_with("retry: 3000\n"), "{text}");
    assert!(
        !text.contains(&format!("id: {epoch}-1\n")),
        "tail:2: {text}"
    );
    assert!(
        text.contains(&format!("id: {epoch}-3\ndata: e3\n")),
        "{text}"
    );
    assert!(
        text.contains(&format!("event: jobcast.end\nid: {epoch}-4\n"))
            || text.contains(&format!("id: {epoch}-4\nevent: jobcast.end\n")),
        "{text}"
    );
    assert!(text.ends_with("version=2\n"), "{text}");
    assert_eq!(
        metric(&s.url, "jobcast_connections_accepted_total{proto=\"h2c\"}").await,
        1
    );
}

fn write_cert(dir: &std::path::Path) -> (TlsFiles, Vec<u8>) {
    let c = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let files = TlsFiles {
        cert: dir.join("cert.pem"),
        key: dir.join("key.pem"),
    };
    std::fs::write(&files.cert, c.cert.pem()).unwrap();
    std::fs::write(&files.key, c.key_pair.serialize_pem()).unwrap();
    (files, c.cert.pem().into_bytes())
}

fn trusting(pem: &[u8]) -> reqwest::Client {
    reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(pem).unwrap())
        .build()
        .unwrap()
}

/// A reload swaps the certificate for new handshakes; a watch open on the
/// old one goes on receiving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_reload_drops_no_connection() {
    let dir = tempfile::tempdir().unwrap();
    let (files, first) = write_cert(dir.path());
    let tls = Tls::load(files).unwrap();
    let config = Config {
        db: format!("sqlite://{}", dir.path().join("j.db").display()),
        ..Config::default()
    };
    let server = Jobcast::open(config).await.unwrap().with_tls(tls.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!(
        "https://localhost:{}",
        listener.local_addr().unwrap().port()
    );
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(server.serve(listener, async {
        let _ = stopped.await;
    }));
    let old = trusting(&first);
    let mut w = watch(&old, &url, "r", "").await;
    append(&old, &url, "r", "before").await;
    assert_eq!(w.next_event(T).await.unwrap().data, "before");

    let (_, second) = write_cert(dir.path());
    tls.reload().unwrap();
    // New handshakes get the new certificate…
    assert!(trusting(&first)
        .get(format!("{url}/healthz"))
        .send()
        .await
        .is_err());
    let new = trusting(&second);
    assert_eq!(
        new.get(format!("{url}/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    // …and the watch opened before goes on, on its connection.
    append(&new, &url, "r", "after").await;
    assert_eq!(w.next_event(T).await.unwrap().data, "after");
    let _ = stop.send(());
    task.await.unwrap().unwrap();
}
