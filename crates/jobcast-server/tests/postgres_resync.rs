//! Issue 13: after a node's listener connection is re-established, each
//! watched stream is re-synced once (the listener reads the events after
//! its ring's head and publishes them), not each watcher: 3 nodes on one
//! PostgreSQL, watchers spread over 30 streams, every listener connection
//! terminated (pg_terminate_backend) while events are appended.
//!
//! `JOBCAST_RESYNC_WATCHERS` sets the number of watchers (300 by default;
//! the size is 3000).

mod common;
mod pg;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{ids_of_watch, TestServer};
use jobcast_server::Config;

const STREAMS: usize = 30;

/// `jobcast_store_queries_total{kind}` in a /metrics text.
fn queries(metrics: &str, kind: &str) -> u64 {
    let prefix = format!("jobcast_store_queries_total{{kind=\"{kind}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

async fn metrics(s: &TestServer) -> String {
    let res = s
        .client
        .get(s.url("/metrics"))
        .send()
        .await
        .expect("metrics");
    res.text().await.expect("metrics text")
}

/// Store reads by (re-sync, watchers' pages, watchers' metadata) on each node.
async fn reads(nodes: &[Arc<TestServer>]) -> Vec<[u64; 3]> {
    let mut out = Vec::new();
    for n in nodes {
        let m = metrics(n).await;
        out.push([
            queries(&m, "resync"),
            queries(&m, "page"),
            queries(&m, "meta"),
        ]);
    }
    out
}

/// Appends `data` to `stream` on `node`, retrying refusals (bounded).
async fn append(node: &TestServer, stream: &str, data: &str) {
    let body = serde_json::json!({ "data": data }).to_string();
    for _ in 0..100 {
        let (status, _) = node
            .post(&format!("/v1/streams/{stream}/events"), &body)
            .await;
        if status == 201 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("append of {data} to {stream} never taken");
}

/// One event on every stream, from nodes 0 and 1 in turn (or from `only`).
async fn round(nodes: &[Arc<TestServer>], r: usize, only: Option<usize>) {
    for s in 0..STREAMS {
        let node = only.unwrap_or((r + s) % 2);
        append(&nodes[node], &format!("s{s}"), &format!("r{r}")).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_reconnect_re_syncs_each_stream_once_not_each_watcher() {
    let watchers: usize = std::env::var("JOBCAST_RESYNC_WATCHERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    assert!(watchers >= 3 * STREAMS, "every node watches every stream");
    let db = pg::Database::create().await;
    let mut nodes = Vec::new();
    for _ in 0..3 {
        let config = Config {
            db: db.url(),
            ..Config::default()
        };
        nodes.push(Arc::new(
            TestServer::start_in(tempfile::tempdir().unwrap(), config).await,
        ));
    }
    db.wait_for_listeners(3).await;
    for s in 0..STREAMS {
        let res = nodes[0]
            .client
            .put(nodes[0].url(&format!("/v1/streams/s{s}")))
            .send()
            .await
            .expect("PUT");
        assert_eq!(res.status(), 201);
    }
    let received = Arc::new(AtomicU64::new(0));
    // Attached 300 at a time (100 per node): a thousand first reads at once
    // would wait longer than the busy timeout for the pool's 16 connections.
    let mut tasks = Vec::new();
    for i in 0..watchers {
        let node = nodes[i % 3].clone();
        let received = received.clone();
        let stream = format!("s{}", (i / 3) % STREAMS);
        tasks.push(tokio::spawn(async move {
            ids_of_watch(&node.client, &node.url, &stream, None, Some(&received)).await
        }));
        if (i + 1) % 300 != 0 && i + 1 != watchers {
            continue;
        }
        // Bounded: every watcher so far is attached on its node.
        for (k, n) in nodes.iter().enumerate() {
            let want = format!("jobcast_watchers {}", (i + 1 + 2 - k) / 3);
            let mut tries = 0;
            while !metrics(n).await.lines().any(|l| l == want) {
                tries += 1;
                assert!(tries < 1200, "watchers never attached");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    let until = |events: u64| {
        let received = received.clone();
        async move {
            let want = events * watchers as u64;
            for _ in 0..2400 {
                if received.load(Ordering::Relaxed) >= want {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            panic!(
                "watchers received {} of {want} events",
                received.load(Ordering::Relaxed)
            );
        }
    };
    for r in 0..5 {
        round(&nodes, r, None).await;
    }
    until(5).await;

    // Every listener goes, and stays away while events are appended.
    db.allow_connections(false).await;
    assert_eq!(db.terminate_listeners().await, 3, "one listener per node");
    db.wait_for_listeners(0).await;
    let before = reads(&nodes).await;
    // From node 1 only: nodes 0 and 2 hear of none of them (a node's own
    // commits between missed ones would leave holes its watchers fill
    // from the store as they would any hole: not the re-sync's reads).
    for r in 5..10 {
        round(&nodes, r, Some(1)).await;
    }
    db.allow_connections(true).await;
    db.wait_for_listeners(3).await;
    // Only the re-sync brings rounds 5..10 to the other nodes' watchers.
    until(10).await;
    let after = reads(&nodes).await;

    for r in 10..15 {
        round(&nodes, r, None).await;
    }
    for s in 0..STREAMS {
        nodes[2].complete(&format!("s{s}")).await;
    }
    let want: Vec<u64> = (1..=16).collect();
    for t in tasks {
        let (seqs, errors) = t.await.expect("watcher");
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(seqs, want, "every event once, in order");
    }
    for (i, (b, a)) in before.iter().zip(&after).enumerate() {
        let [resync, pages, metas] = [0, 1, 2].map(|k| a[k] - b[k]);
        println!(
            "node {i}: {} watchers on {STREAMS} streams; during the re-sync {resync} re-sync reads, \
             {pages} watcher page reads, {metas} metadata reads",
            watchers / 3
        );
        assert!(
            resync + pages + metas <= 2 * STREAMS as u64,
            "node {i}: {resync} + {pages} + {metas} store reads for {STREAMS} watched streams"
        );
    }
}
