//! One shared catch-up per stream (issue 13): watchers behind the ring are
//! fed from the pages one of them brings in, one store read at a time per
//! stream, so N watchers catching up cost about one watcher's reads.

mod common;

use common::{ids_of_watch, seq_of, TestServer};
use std::time::Duration;

fn page_reads(metrics: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("jobcast_store_page_reads_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no jobcast_store_page_reads_total in {metrics}"))
}

async fn reads(s: &TestServer) -> u64 {
    let (_, m) = s.get_json("/metrics").await;
    page_reads(m.as_str().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_watchers_catching_up_share_the_store_reads() {
    const EVENTS: u64 = 20_000;
    const WATCHERS: usize = 200;
    let s = TestServer::start_with(|c| c.page_size = 500).await;
    for chunk in 0..EVENTS / 1000 {
        let batch: Vec<String> = (0..1000)
            .map(|i| format!("e{}", chunk * 1000 + i))
            .collect();
        s.append_batch("log", &batch).await;
    }
    s.complete("log").await;
    let want: Vec<u64> = (1..=EVENTS + 1).collect();
    let t = Duration::from_secs(60);

    let before = reads(&s).await;
    let mut one = s.watch("log", "", None).await;
    assert_eq!(
        one.collect(t).await.iter().map(seq_of).collect::<Vec<_>>(),
        want
    );
    let alone = reads(&s).await - before;

    let before = reads(&s).await;
    // At once: all connect together (connected one by one, the first ones
    // could finish before the last ones start, the whole log fitting in
    // their socket buffers).
    let mut watchers =
        futures::future::join_all((0..WATCHERS).map(|_| s.watch("log", "", None))).await;
    let all = futures::future::join_all(watchers.iter_mut().map(|w| w.collect(t))).await;
    for events in all {
        assert_eq!(events.iter().map(seq_of).collect::<Vec<_>>(), want);
    }
    let together = reads(&s).await - before;
    println!("page reads: one watcher {alone}, {WATCHERS} watchers at once {together}");
    assert!(
        together <= 2 * alone,
        "{WATCHERS} watchers read {together} pages, one alone {alone}"
    );
}

/// Issue 13, at the scale where the cache cannot hold the whole log: the
/// watchers of one stream read at different speeds (three quarters of them
/// pause for every 16 KiB of their response, at three speeds), so they spread over more of the
/// log than the stream's catch-up cache holds (before the fix: 508 page
/// reads against one watcher's 201). Pages are kept until the
/// watchers still behind them have passed them (the front waits for room
/// instead of pushing out pages others still need), so together they cost
/// about one watcher's store reads, and each gets every event exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchers_spread_wider_than_the_cache_still_share_the_store_reads() {
    const EVENTS: u64 = 40_000;
    const WATCHERS: usize = 24;
    let s = std::sync::Arc::new(
        TestServer::start_with(|c| {
            c.page_size = 200;
            // About two pages: far less than the log (about 22 MB encoded).
            c.catchup_bytes = 256 << 10;
            // The front waits (up to 1 s) for room instead of pushing out
            // pages the slower ones still need.
            c.catchup_pace = Duration::from_secs(1);
        })
        .await,
    );
    let pad = "x".repeat(500);
    for chunk in 0..EVENTS / 1000 {
        let batch: Vec<String> = (0..1000)
            .map(|i| format!("e{}-{pad}", chunk * 1000 + i))
            .collect();
        s.append_batch("log", &batch).await;
    }
    s.complete("log").await;
    let want: Vec<u64> = (1..=EVENTS + 1).collect();

    let before = reads(&s).await;
    assert_eq!(
        ids_of_watch(&s.client, &s.url, "log", None, None).await.0,
        want
    );
    let alone = reads(&s).await - before;

    let before = reads(&s).await;
    let tasks: Vec<_> = (0..WATCHERS)
        .map(|i| {
            let s = s.clone();
            // Four speeds: flat out, and 1, 2 or 4 ms per 16 KiB.
            let pause = [None, Some(1), Some(2), Some(4)][i % 4].map(Duration::from_millis);
            tokio::spawn(async move { ids_of_watch(&s.client, &s.url, "log", pause, None).await.0 })
        })
        .collect();
    for t in tasks {
        assert_eq!(
            t.await.expect("watcher"),
            want,
            "every event once, in order"
        );
    }
    let together = reads(&s).await - before;
    println!("page reads: one watcher {alone}, {WATCHERS} watchers at once {together}");
    assert!(
        together <= 2 * alone,
        "{WATCHERS} watchers read {together} pages, one alone {alone}"
    );
}
