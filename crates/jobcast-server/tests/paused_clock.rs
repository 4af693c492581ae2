//! Heartbeat cadence and maximum duration on tokio's paused clock. The store
//! (SQLite, with worker threads that would make a paused clock jump) is used
//! only to set the stream up; once the watcher is live it waits on the hub
//! and its timers alone, and the clock is paused from then on.

use std::time::Duration;

use axum::body::Body;
use http_body_util::BodyExt;
use jobcast_server::{Config, Jobcast};
use tokio::time::Instant;
use tower::ServiceExt;

async fn live_watcher(config: Config) -> (Jobcast, Body, tempfile::TempDir) {
    let server = Jobcast::open(config).await.unwrap();
    let append = http::Request::post("/v1/streams/s/events")
        .header("content-type", "application/json")
        .body(Body::from(r#"{"data":"first"}"#))
        .unwrap();
    let res = server.router().oneshot(append).await.unwrap();
    assert_eq!(res.status(), 201);
    let watch = http::Request::get("/v1/streams/s/events")
        .header("accept", "text/event-stream")
        .body(Body::empty())
        .unwrap();
    let res = server.router().oneshot(watch).await.unwrap();
    assert_eq!(res.status(), 200);
    let mut body = res.into_body();
    // retry line, then the one event: the watcher is now live.
    let mut got = String::new();
    while !got.contains("data: first\n\n") {
        let frame = body.frame().await.unwrap().unwrap();
        got.push_str(&String::from_utf8_lossy(frame.data_ref().unwrap()));
    }
    (server, body, tempfile::tempdir().unwrap())
}

fn config(dir: &tempfile::TempDir) -> Config {
    Config {
        db: format!("sqlite://{}", dir.path().join("j.db").display()),
        // Keep the writer's housekeeping timer out of the paused window.
        retention_interval: Duration::from_secs(24 * 3600),
        ..Config::default()
    }
}

#[tokio::test]
async fn heartbeats_come_exactly_every_interval_when_idle() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(&dir);
    c.heartbeat = Duration::from_secs(15);
    let (_server, mut body, _d) = live_watcher(c).await;
    tokio::time::pause();
    // The first heartbeat was armed in real time before the pause (a few ms
    // of setup may have passed); every later one is armed on the paused clock.
    let first = body.frame().await.unwrap().unwrap();
    assert_eq!(first.data_ref().unwrap().as_ref(), b":\n");
    for _ in 0..5 {
        let t0 = Instant::now();
        let frame = body.frame().await.unwrap().unwrap();
        assert_eq!(frame.data_ref().unwrap().as_ref(), b":\n");
        // Exact on the paused clock, but for tokio's 1 ms timer granularity.
        let gap = t0.elapsed();
        assert!(
            gap >= Duration::from_secs(15) && gap <= Duration::from_millis(15_005),
            "{gap:?}"
        );
    }
}

#[tokio::test]
async fn connection_ends_by_itself_at_the_jittered_maximum_duration() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(&dir);
    c.heartbeat = Duration::from_secs(15);
    c.max_duration = Duration::from_secs(100);
    let (_server, mut body, _d) = live_watcher(c).await;
    tokio::time::pause();
    let t0 = Instant::now();
    let mut heartbeats = 0;
    while let Some(frame) = body.frame().await {
        assert_eq!(frame.unwrap().data_ref().unwrap().as_ref(), b":\n");
        heartbeats += 1;
        assert!(
            heartbeats < 10,
            "the connection outlived its maximum duration"
        );
    }
    let lived = t0.elapsed();
    // Jittered down by at most 10% (the setup before pausing took a little real time).
    assert!(lived <= Duration::from_secs(100), "{lived:?}");
    assert!(lived >= Duration::from_secs(89), "{lived:?}");
    assert_eq!(heartbeats as u64, lived.as_secs() / 15);
}
