//! The edges of exactly once found by testing from outside (issue 12): each
//! test here failed on the server before its fix.

mod common;

use common::{seq_of, TestServer, T};
use serde_json::Value;
use std::time::Duration;

fn epoch_of(id: &Value) -> String {
    id.as_str().unwrap().split('-').next().unwrap().to_owned()
}

/// A pager that stops on an empty page or a null `next` must stop: a page
/// after the `jobcast.end` id is empty with `next: null`.
#[tokio::test]
async fn page_after_the_end_is_empty_with_null_next() {
    let s = TestServer::start().await;
    s.append("p", "one").await;
    s.complete("p").await;
    let epoch = epoch_of(&s.meta("p").await["last_id"]);
    let (status, page) = s
        .get_json(&format!("/v1/streams/p/events?after={epoch}-2"))
        .await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["events"], Value::Array(vec![]), "{page}");
    assert_eq!(page["next"], Value::Null, "{page}");
    assert_eq!(page["state"], "completed");
    // With a long-poll too: answered at once, not after the wait.
    let started = std::time::Instant::now();
    let (_, page) = s
        .get_json(&format!("/v1/streams/p/events?after={epoch}-2&wait=20"))
        .await;
    assert_eq!(page["events"], Value::Array(vec![]), "{page}");
    assert!(started.elapsed() < Duration::from_secs(15));
    // A pager from the start stops after a bounded number of pages.
    let mut after = String::new();
    let mut pages = 0;
    let mut seen = Vec::new();
    loop {
        pages += 1;
        assert!(pages < 10, "the pager does not stop");
        let q = if after.is_empty() {
            String::new()
        } else {
            format!("?after={after}")
        };
        let (_, page) = s.get_json(&format!("/v1/streams/p/events{q}")).await;
        let events = page["events"].as_array().unwrap();
        seen.extend(events.iter().map(|e| e["seq"].as_u64().unwrap()));
        if events.is_empty() || page["next"].is_null() {
            break;
        }
        after = page["next"].as_str().unwrap().to_owned();
    }
    assert_eq!(seen, vec![1, 2]);
}

/// `from=live` before the stream exists: the head at subscribing is 0, so the
/// append that creates the stream is new and is delivered.
#[tokio::test]
async fn live_watcher_before_creation_gets_the_creating_append() {
    let s = TestServer::start().await;
    let mut w = s.watch("early", "?from=live&wait=10", None).await;
    assert_eq!(w.status, 200);
    // Let the watcher find out that the stream does not exist yet.
    tokio::time::sleep(Duration::from_millis(300)).await;
    s.append_batch("early", &["one".into(), "two".into()]).await;
    s.complete("early").await;
    let events = w.collect(T).await;
    let seqs: Vec<u64> = events.iter().map(seq_of).collect();
    assert_eq!(seqs, vec![1, 2, 3], "{events:?}");
    assert_eq!(events[2].event, "jobcast.end");
}

/// The same for the JSON long-poll with `from=live`... and the live feed of
/// many watchers at once, connected before the first append.
#[tokio::test]
async fn many_live_watchers_before_creation_lose_nothing() {
    let s = TestServer::start().await;
    let mut watchers = Vec::new();
    for _ in 0..50 {
        watchers.push(s.watch("burst", "?from=live&wait=10", None).await);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    for chunk in 0..10 {
        let batch: Vec<String> = (0..10).map(|i| format!("e{}", chunk * 10 + i)).collect();
        s.append_batch("burst", &batch).await;
    }
    s.complete("burst").await;
    for mut w in watchers {
        let seqs: Vec<u64> = w.collect(T).await.iter().map(seq_of).collect();
        assert_eq!(seqs, (1..=101).collect::<Vec<_>>());
    }
}

/// A long-poll across a delete and recreate: the new log's events come with
/// a `reset` (`epoch_mismatch`) and start at seq 1, never as a continuation.
#[tokio::test]
async fn long_poll_across_delete_and_recreate_resets() {
    let s = TestServer::start().await;
    let batch: Vec<String> = (1..=10).map(|i| format!("old{i}")).collect();
    let a = s.append_batch("lp", &batch).await;
    let old = epoch_of(&a["first_id"]);
    let poll = {
        let client = s.client.clone();
        let url = s.url(&format!("/v1/streams/lp/events?after={old}-10&wait=10"));
        tokio::spawn(
            async move { common::status_json(client.get(url).send().await.unwrap()).await },
        )
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let res = s
        .client
        .delete(s.url("/v1/streams/lp"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 204);
    let batch: Vec<String> = (1..=15).map(|i| format!("new{i}")).collect();
    let b = s.append_batch("lp", &batch).await;
    let new = epoch_of(&b["first_id"]);
    assert_ne!(old, new);
    let (status, page) = poll.await.unwrap();
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["reset"]["reason"], "epoch_mismatch", "{page}");
    assert_eq!(page["reset"]["requested"], format!("{old}-10"));
    let first = &page["events"][0];
    assert_eq!(first["id"], format!("{new}-1"), "{page}");
    assert_eq!(first["data"], "new1");
}
