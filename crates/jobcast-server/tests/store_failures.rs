//! Guarantee 7: the store may fail; the server may not. Appends answer 503
//! with nothing written; watchers that need the store back off with
//! heartbeats and then get a retryable `store_unavailable`; watchers that do
//! not need it keep being served; after recovery nothing is missing.

mod common;
mod pg;

use std::time::Duration;

use common::{seq_of, TestServer, T};
use jobcast_server::{Config, Jobcast};
use sqlx::Connection;

async fn start_faulty(
    f: impl FnOnce(&mut Config),
) -> (TestServer, jobcast_server::store::FaultSwitch) {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config {
        db: format!("sqlite://{}", dir.path().join("jobcast.db").display()),
        ..Config::default()
    };
    f(&mut config);
    let (server, switch) = Jobcast::open_with_faults(config).await.unwrap();
    (TestServer::serve(dir, server).await, switch)
}

#[tokio::test]
async fn outage_then_recovery_with_injected_faults() {
    let (s, switch) = start_faulty(|c| {
        c.heartbeat = Duration::from_millis(200);
        c.store_retry_limit = Duration::from_secs(1);
    })
    .await;
    s.append("up", "before").await;
    // A live watcher that does not need the store while it is down.
    let mut live = s.watch("up", "", None).await;
    assert_eq!(live.next_event(T).await.unwrap().data, "before");
    // A watcher waiting for a stream that does not exist polls the store.
    let mut waiting = s.watch("later", "?wait=60", None).await;
    assert_eq!(waiting.status, 200);

    switch.set_failing(true);
    let res = s
        .client
        .post(s.url("/v1/streams/up/events"))
        .header("content-type", "application/json")
        .body(r#"{"data":"lost"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 503);
    assert!(res.headers().contains_key("retry-after"));
    let v: serde_json::Value = res.json().await.unwrap();
    assert_eq!(v["error"]["code"], "store_unavailable");
    let ready = s.client.get(s.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 503);

    // The waiting watcher gets heartbeats, then a retryable store_unavailable.
    let events = waiting.collect(T).await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].event, "jobcast.error");
    let e: serde_json::Value = serde_json::from_str(&events[0].data).unwrap();
    assert_eq!(e["code"], "store_unavailable");
    assert_eq!(e["retryable"], true);
    assert!(e["retry_after_ms"].as_u64().is_some());
    assert!(
        String::from_utf8_lossy(&waiting.raw).contains("\n:\n"),
        "heartbeats continued"
    );

    switch.set_failing(false);
    s.append("up", "after").await;
    s.complete("up").await;
    // The live watcher was kept and resumes with no gap and no duplicate.
    let rest = live.collect(T).await;
    assert_eq!(
        rest.iter().map(|e| e.data.as_str()).collect::<Vec<_>>()[..1],
        ["after"]
    );
    assert_eq!(rest.iter().map(seq_of).collect::<Vec<_>>(), vec![2, 3]);
    // The failed append wrote nothing.
    let (_, page) = s.get_json("/v1/streams/up/events").await;
    let data: Vec<_> = page["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["data"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(data[..2], ["before", "after"]);
    assert_eq!(data.len(), 3);
    // The watcher that gave up reconnects and gets the stream once it exists.
    s.append("later", "x").await;
    let mut again = s.watch("later", "?wait=5", None).await;
    assert_eq!(again.next_event(T).await.unwrap().data, "x");
}

/// A real outage: another process holds SQLite's write lock. Appends fail
/// with 503 (after the busy timeout) and change nothing; readers are still
/// served; after the lock is released everything continues.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_outage_write_lock_held_by_another_connection() {
    let s = TestServer::start_with(|c| c.busy_timeout = Duration::from_millis(500)).await;
    s.append("w", "one").await;
    let mut watcher = s.watch("w", "", None).await;
    assert_eq!(watcher.next_event(T).await.unwrap().data, "one");
    let path = s.dir.path().join("jobcast.db");
    let mut other = sqlx::SqliteConnection::connect(&format!("sqlite://{}", path.display()))
        .await
        .unwrap();
    sqlx::query("BEGIN EXCLUSIVE")
        .execute(&mut other)
        .await
        .unwrap();

    let (status, v) = s
        .post("/v1/streams/w/events", r#"[{"data":"a"},{"data":"b"}]"#)
        .await;
    assert_eq!(status, 503, "{v}");
    assert_eq!(v["error"]["code"], "store_unavailable");
    // Reads still work while writes cannot.
    assert_eq!(s.meta("w").await["events"], 1);

    sqlx::query("ROLLBACK").execute(&mut other).await.unwrap();
    other.close().await.unwrap();
    s.append("w", "two").await;
    s.complete("w").await;
    let rest = watcher.collect(T).await;
    assert_eq!(rest.iter().map(seq_of).collect::<Vec<_>>(), vec![2, 3]);
    assert_eq!(rest[0].data, "two", "the failed batch left nothing behind");
}

/// `/readyz` asks the writer too. The writer really stops (its thread on
/// SQLite, its task on PostgreSQL, exits) while the HTTP server and the read
/// pool keep serving: ready turns into 503 with the JSON error body, live
/// stays 200, and reads still answer.
#[tokio::test]
async fn readyz_is_503_when_the_writer_is_gone() {
    let db = pg::Database::create().await;
    for url in [None, Some(db.url())] {
        let backend = if url.is_some() { "postgres" } else { "sqlite" };
        let s = TestServer::start_with(|c| {
            if let Some(url) = url {
                c.db = url;
            }
        })
        .await;
        s.append("r", "before").await;
        let (status, body) = s.get_json("/readyz").await;
        assert_eq!(
            (status, &body["status"]),
            (200, &"ready".into()),
            "{backend}"
        );

        s.server.state().store.stop_writer().await;

        let (status, body) = s.get_json("/readyz").await;
        assert_eq!(status, 503, "{backend}: {body}");
        assert_eq!(
            body["error"]["code"], "store_unavailable",
            "{backend}: {body}"
        );
        assert!(body["error"]["message"].is_string(), "{backend}: {body}");
        let (status, body) = s.get_json("/healthz").await;
        assert_eq!(status, 200, "{backend}: {body}");
        // Reads do not need the writer.
        assert_eq!(s.meta("r").await["events"], 1, "{backend}");
        s.stop().await;
    }
}
