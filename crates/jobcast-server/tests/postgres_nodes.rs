//! Several nodes on one PostgreSQL database, in one process: appends on any
//! node reach watchers on every node through LISTEN/NOTIFY, in order, once.
//! (The process-level tests — SIGKILL, a cut listener, an outage — are in
//! crates/jobcast/tests/multinode.rs.)

mod common;
mod pg;

use std::collections::BTreeSet;

use common::{seq_of, TestServer, T};
use jobcast_server::Config;

async fn node(db: &pg::Database) -> TestServer {
    let config = Config {
        db: db.url(),
        ..Config::default()
    };
    TestServer::start_in(tempfile::tempdir().unwrap(), config).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn appends_on_two_nodes_reach_watchers_on_every_node_once_in_order() {
    let db = pg::Database::create().await;
    let nodes = [node(&db).await, node(&db).await, node(&db).await];
    // Watchers attach before the stream exists (they wait for it).
    let mut watchers = Vec::new();
    for n in &nodes {
        watchers.push(n.watch("shared", "", None).await);
    }
    let mut producers = Vec::new();
    for p in 0..4 {
        let client = nodes[p % 2].client.clone();
        let url = nodes[p % 2].url("/v1/streams/shared/events");
        producers.push(tokio::spawn(async move {
            for i in 0..40 {
                let body = if i % 3 == 0 {
                    format!(r#"[{{"data":"p{p}-{i}a"}},{{"data":"p{p}-{i}b"}}]"#)
                } else {
                    format!(r#"{{"data":"p{p}-{i}"}}"#)
                };
                let res = client
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(res.status(), 201);
            }
        }));
    }
    for p in producers {
        p.await.unwrap();
    }
    nodes[2].complete("shared").await;
    let expected = 4 * (40 + 14) + 1;
    let mut logs = Vec::new();
    for w in &mut watchers {
        let events = w.collect(T).await;
        let seqs: Vec<u64> = events.iter().map(seq_of).collect();
        assert_eq!(
            seqs,
            (1..=expected as u64).collect::<Vec<_>>(),
            "every seq once, in order"
        );
        assert_eq!(events.last().unwrap().event, "jobcast.end");
        let data: BTreeSet<String> = events[..events.len() - 1]
            .iter()
            .map(|e| e.data.clone())
            .collect();
        assert_eq!(data.len(), expected - 1, "no event lost or repeated");
        logs.push(events.iter().map(|e| e.data.clone()).collect::<Vec<_>>());
    }
    assert!(
        logs.windows(2).all(|w| w[0] == w[1]),
        "every node delivers the same log"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_watcher_on_another_node_gets_each_append_without_the_stream_ending() {
    let db = pg::Database::create().await;
    let (a, b) = (node(&db).await, node(&db).await);
    a.append("live", "first").await;
    let mut w = b.watch("live", "", None).await;
    assert_eq!(w.next_event(T).await.unwrap().data, "first");
    // Each append on A reaches B's watcher while the stream stays open.
    for i in 0..20 {
        a.append("live", &format!("e{i}")).await;
        let e = w.next_event(T).await.unwrap();
        assert_eq!(
            (seq_of(&e), e.data.as_str()),
            (i + 2, format!("e{i}").as_str())
        );
    }
    // A deletion on A closes B's watcher with stream_deleted.
    let res = a
        .client
        .delete(a.url("/v1/streams/live"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 204);
    let e = w.next_event(T).await.unwrap();
    assert_eq!(e.event, "jobcast.error");
    assert!(e.data.contains("stream_deleted"), "{}", e.data);
}
