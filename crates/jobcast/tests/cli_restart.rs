//! `jobcast tail` across a server crash: the server is killed (SIGKILL)
//! mid-stream while a producer appends, then started again on the same
//! address and store. tail resumes and prints every event exactly once, in
//! order, and exits 0 when the stream completes.

mod cli_support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use cli_support::{command, wait_for_watcher, Server, T};
use jobcast_client::{Client, NewEvent, RetryPolicy};
use tokio::io::AsyncBufReadExt;

const BATCHES: u64 = 150;
const PER_BATCH: u64 = 10;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_survives_a_killed_and_restarted_server() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path());
    let url = server.url.clone();

    let mut tail = command(&url, &["tail", "job", "--json"]).spawn().unwrap();
    let stdout = tail.stdout.take().unwrap();
    let printed = Arc::new(AtomicU64::new(0));
    let reader = {
        let printed = printed.clone();
        tokio::spawn(async move {
            let mut lines = tokio::io::BufReader::new(stdout).lines();
            let mut all = Vec::new();
            while let Ok(Some(line)) = lines.next_line().await {
                all.push(line);
                printed.fetch_add(1, Ordering::SeqCst);
            }
            all
        })
    };

    // The producer keeps appending across the crash: its retries reuse the
    // Idempotency-Key, so a batch committed just before the kill is not
    // appended twice after the restart.
    let producer = {
        let client = Client::builder(&url)
            .backoff(Duration::from_millis(20), Duration::from_millis(200))
            .retry(RetryPolicy {
                max_attempts: 1000,
                max_elapsed: Duration::from_secs(30),
            })
            .build()
            .unwrap();
        tokio::spawn(async move {
            for b in 0..BATCHES {
                let batch: Vec<NewEvent> = (1..=PER_BATCH)
                    .map(|i| NewEvent::text(format!("e{}", b * PER_BATCH + i)))
                    .collect();
                client.append_batch("job", &batch).await.expect("append");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            client.complete("job", None).await.expect("complete");
        })
    };

    // Kill the server once tail is attached and has printed part of the stream.
    wait_for_watcher(&url, "job").await;
    let deadline = tokio::time::Instant::now() + T;
    while printed.load(Ordering::SeqCst) < 200 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "tail printed nothing"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    server.kill();
    let at_kill = printed.load(Ordering::SeqCst);
    assert!(
        at_kill < BATCHES * PER_BATCH,
        "the stream was over before the kill ({at_kill} lines): the test proves nothing"
    );
    tokio::time::sleep(Duration::from_millis(300)).await; // refused connections meanwhile
    server.restart();
    assert_eq!(server.url, url, "same address");

    producer.await.expect("producer");
    let status = tokio::time::timeout(T, tail.wait())
        .await
        .expect("tail ends")
        .expect("wait");
    let lines = reader.await.unwrap();
    assert_eq!(status.code(), Some(0), "tail's exit code");

    let total = BATCHES * PER_BATCH;
    assert_eq!(
        lines.len() as u64,
        total + 1,
        "every event once, then the end"
    );
    for (i, line) in lines.iter().enumerate() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let seq = i as u64 + 1;
        let id = v["id"].as_str().unwrap();
        assert!(id.ends_with(&format!("-{seq}")), "line {i}: id {id}");
        if seq <= total {
            assert_eq!(v["data"], format!("e{seq}"), "line {i}");
        } else {
            assert_eq!(v["type"], "jobcast.end");
        }
    }
}
