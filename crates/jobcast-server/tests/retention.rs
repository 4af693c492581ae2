//! Retention: ended streams expire after their TTL; a per-stream cap trims
//! the oldest events, and trimmed history is reported, never skipped silently.

mod common;

use std::time::Duration;

use common::{seq_of, TestServer, T};

#[tokio::test]
async fn capped_stream_reports_trimmed_history() {
    let s = TestServer::start_with(|c| c.max_events_per_stream = Some(5)).await;
    for i in 1..=12 {
        s.append("cap", &format!("e{i}")).await;
    }
    let epoch = s.meta("cap").await["epoch"].as_str().unwrap().to_owned();
    // The whole log was asked for: the reset says where it really starts.
    let mut w = s.watch("cap", "", None).await;
    let reset = w.next_event(T).await.unwrap();
    assert_eq!(reset.event, "jobcast.reset");
    let r: serde_json::Value = serde_json::from_str(&reset.data).unwrap();
    assert_eq!(r["reason"], "history_trimmed");
    assert_eq!(r["requested"], format!("{epoch}-0"));
    assert_eq!(r["resumed_from"], format!("{epoch}-7"));
    for want in 8..=12 {
        assert_eq!(seq_of(&w.next_event(T).await.unwrap()), want);
    }
    // Resuming from a trimmed position.
    let mut w = s.watch("cap", "", Some(&format!("{epoch}-3"))).await;
    let reset = w.next_event(T).await.unwrap();
    let r: serde_json::Value = serde_json::from_str(&reset.data).unwrap();
    assert_eq!(
        (r["reason"].as_str(), r["requested"].as_str()),
        (Some("history_trimmed"), Some(&*format!("{epoch}-3")))
    );
    assert_eq!(seq_of(&w.next_event(T).await.unwrap()), 8);
    // Resuming from a kept position: no reset.
    let mut w = s.watch("cap", "", Some(&format!("{epoch}-9"))).await;
    assert_eq!(seq_of(&w.next_event(T).await.unwrap()), 10);
    // The JSON page says so too.
    let (_, page) = s
        .get_json(&format!("/v1/streams/cap/events?after={epoch}-2"))
        .await;
    assert_eq!(page["reset"]["reason"], "history_trimmed");
    assert_eq!(page["events"][0]["seq"], 8);
}

#[tokio::test]
async fn ended_streams_expire_after_their_ttl_and_their_events_are_purged() {
    let s = TestServer::start_with(|c| {
        c.retention_ttl = Duration::from_millis(300);
        c.retention_interval = Duration::from_millis(100);
    })
    .await;
    s.append_batch("old", &(0..50).map(|i| format!("{i}")).collect::<Vec<_>>())
        .await;
    s.complete("old").await;
    s.append("open", "stays").await;
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let (status, _) = s.get_json("/v1/streams/old").await;
        if status == 404 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "ended stream did not expire"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Open streams are kept whatever their age.
    assert_eq!(s.meta("open").await["events"], 1);
    // The purge removes the rows in the background.
    let path = s.dir.path().join("jobcast.db");
    let url = format!("sqlite://{}?mode=ro", path.display());
    loop {
        let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM events")
            .fetch_one(&pool)
            .await
            .unwrap();
        pool.close().await;
        if n == 1 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "events of the expired stream were not purged ({n} rows)"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A watcher of a stream being expired is told it was deleted.
    s.append("w", "x").await;
    let mut w = s.watch("w", "", None).await;
    w.next_event(T).await.unwrap();
    s.complete("w").await;
    let rest = w.collect(T).await;
    assert_eq!(rest.last().unwrap().event, "jobcast.end");
}

/// A connected watcher that falls behind the retention horizon is told with
/// a retryable `lagged_beyond_retention`; reconnecting with its last id gets
/// `jobcast.reset` `history_trimmed` first. Nothing is skipped silently.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watcher_overtaken_by_trimming_is_told_and_reset() {
    let s = TestServer::start_with(|c| {
        c.max_events_per_stream = Some(20);
        c.ring_bytes = 64 * 1024;
    })
    .await;
    s.append("lag", "first").await;
    // Subscribed, then not read: TCP backpressure stalls the server's writes.
    let mut w = s.watch("lag", "", None).await;
    assert_eq!(w.next_event(T).await.unwrap().data, "first");
    let big = "x".repeat(64 * 1024);
    for _ in 0..16 {
        s.append_batch("lag", &vec![big.clone(); 16]).await;
    }
    // Now read: a contiguous run, then the error (the cap overtook the watcher).
    let mut last = 1;
    let error = loop {
        let e = w.next_event(T).await.expect("closed without an error");
        if e.event == "jobcast.error" {
            break e;
        }
        let seq = seq_of(&e);
        assert_eq!(seq, last + 1, "no gap before the error");
        last = seq;
    };
    let v: serde_json::Value = serde_json::from_str(&error.data).unwrap();
    assert_eq!(v["code"], "lagged_beyond_retention");
    assert_eq!(v["retryable"], true);
    assert!(w.next_event(T).await.is_none(), "closed after the error");
    let epoch = s.meta("lag").await["epoch"].as_str().unwrap().to_owned();
    let mut again = s.watch("lag", "", Some(&format!("{epoch}-{last}"))).await;
    let reset = again.next_event(T).await.unwrap();
    assert_eq!(reset.event, "jobcast.reset");
    let r: serde_json::Value = serde_json::from_str(&reset.data).unwrap();
    assert_eq!(r["reason"], "history_trimmed");
    assert_eq!(r["resumed_from"], format!("{epoch}-{}", 257 - 20));
    assert_eq!(seq_of(&again.next_event(T).await.unwrap()), 257 - 19);
}
