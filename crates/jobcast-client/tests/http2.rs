//! The Rust client with HTTP/2 on: h2c with prior knowledge against the
//! plain listener, and HTTP/2 by ALPN over TLS with a certificate made
//! here; many watches share one connection (counted by the server); and a
//! `tail:N` start.

mod common;

use std::time::Duration;

use common::{collect, TestServer, T};
use futures::future::join_all;
use jobcast_client::{Client, Item, NewEvent, Start};
use jobcast_server::tls::{Tls, TlsFiles};
use jobcast_server::{Config, Jobcast};

/// `jobcast_connections_accepted_total{proto="…"}` read over a fresh HTTP/1.1 connection.
async fn accepted(url: &str, proto: &str, ca: Option<&[u8]>) -> u64 {
    let mut b = reqwest::Client::builder().http1_only();
    if let Some(pem) = ca {
        b = b.add_root_certificate(reqwest::Certificate::from_pem(pem).unwrap());
    }
    let text = b
        .build()
        .unwrap()
        .get(format!("{url}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let line = format!("jobcast_connections_accepted_total{{proto=\"{proto}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&line))
        .map_or(0, |v| v.trim().parse().unwrap())
}

fn client(
    url: &str,
    f: impl FnOnce(jobcast_client::ClientBuilder) -> jobcast_client::ClientBuilder,
) -> Client {
    f(Client::builder(url)
        .backoff(Duration::from_millis(5), Duration::from_millis(100))
        .give_up_after(Duration::from_secs(20))
        .read_timeout(Duration::from_secs(10)))
    .build()
    .expect("client")
}

/// 20 streams, each produced and watched through one client: every event
/// exactly once, in order, then the end; and all of it on one connection.
async fn many_watches_on_one_connection(c: &Client) {
    let streams: Vec<String> = (0..20).map(|i| format!("h2-{i}")).collect();
    let mut watches: Vec<_> = streams
        .iter()
        .map(|s| c.watch(s, Start::Beginning))
        .collect();
    for round in 0..5 {
        for s in &streams {
            c.append(s, NewEvent::text(format!("{s} {round}")))
                .await
                .expect("append over HTTP/2");
        }
    }
    for s in &streams {
        c.complete(s, None).await.expect("complete");
    }
    let all = join_all(watches.iter_mut().map(|w| collect(w, T))).await;
    for (s, items) in streams.iter().zip(all) {
        let got: Vec<String> = items
            .into_iter()
            .map(|i| match i {
                Ok(Item::Event(e)) => format!("{} {}", e.seq(), e.data),
                Ok(Item::End(_)) => "end".into(),
                other => panic!("{s}: {other:?}"),
            })
            .collect();
        let mut want: Vec<String> = (0..5).map(|r| format!("{} {s} {r}", r + 1)).collect();
        want.push("end".into());
        assert_eq!(got, want, "{s}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_prior_knowledge_carries_every_watch_on_one_connection() {
    let s = TestServer::start().await;
    let c = client(&s.url, |b| b.http2_prior_knowledge());
    many_watches_on_one_connection(&c).await;
    assert_eq!(
        accepted(&s.url, "h2c", None).await,
        1,
        "20 watches and 120 requests on one h2c connection"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_negotiates_http2_by_alpn() {
    let dir = tempfile::tempdir().unwrap();
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let files = TlsFiles {
        cert: dir.path().join("c.pem"),
        key: dir.path().join("k.pem"),
    };
    std::fs::write(&files.cert, cert.cert.pem()).unwrap();
    std::fs::write(&files.key, cert.key_pair.serialize_pem()).unwrap();
    let config = Config {
        db: format!("sqlite://{}", dir.path().join("j.db").display()),
        ..Config::default()
    };
    let server = Jobcast::open(config)
        .await
        .unwrap()
        .with_tls(Tls::load(files).unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!(
        "https://localhost:{}",
        listener.local_addr().unwrap().port()
    );
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(server.serve(listener, async {
        let _ = stopped.await;
    }));
    let pem = cert.cert.pem().into_bytes();
    let c = client(&url, |b| b.add_root_certificate_pem(pem.clone()));
    many_watches_on_one_connection(&c).await;
    assert_eq!(
        accepted(&url, "h2", Some(&pem)).await,
        1,
        "one TLS connection, HTTP/2"
    );
    assert_eq!(
        accepted(&url, "http1_tls", Some(&pem)).await,
        2,
        "only the metrics reads"
    );
    let _ = stop.send(());
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tail_start_gets_the_last_events_then_live() {
    let s = TestServer::start().await;
    let c = client(&s.url, |b| b.http2_prior_knowledge());
    for i in 1..=6 {
        c.append("t", NewEvent::text(format!("e{i}")))
            .await
            .unwrap();
    }
    let start: Start = "tail:2".parse().unwrap();
    assert_eq!(start, Start::Tail(2));
    assert!("tail:x".parse::<Start>().is_err());
    assert!("tail:-2".parse::<Start>().is_err());
    let mut w = c.watch("t", start);
    let mut got = Vec::new();
    for _ in 0..2 {
        match tokio::time::timeout(T, futures::StreamExt::next(&mut w)).await {
            Ok(Some(Ok(Item::Event(e)))) => got.push(e.data),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(got, ["e5", "e6"]);
    c.append("t", NewEvent::text("e7")).await.unwrap();
    c.complete("t", None).await.unwrap();
    let rest: Vec<String> = collect(&mut w, T)
        .await
        .into_iter()
        .map(|i| match i {
            Ok(Item::Event(e)) => e.data,
            Ok(Item::End(_)) => "end".into(),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(rest, ["e7", "end"]);
}
