//! SIGTERM (SPEC "Details", Reading): stop accepting, send `shutting_down` to
//! every watcher, finish appends in flight, exit — and lose no acknowledged
//! event.

mod cli_support;

use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cli_support::Server;
use jobcast_protocol::decode::{Decoder, Frame, SseEvent};
use jobcast_protocol::{ErrorPayload, EventId};

/// An SSE response read with the protocol decoder.
struct Watch {
    res: reqwest::Response,
    decoder: Decoder,
    frames: std::collections::VecDeque<Frame>,
}

impl Watch {
    /// The next frame, or None when the response ended (or broke).
    async fn next_frame(&mut self, timeout: Duration) -> Option<Frame> {
        loop {
            if let Some(f) = self.frames.pop_front() {
                return Some(f);
            }
            let chunk = tokio::time::timeout(timeout, self.res.chunk())
                .await
                .unwrap_or_else(|_| panic!("no SSE bytes within {timeout:?}"));
            match chunk {
                Ok(Some(bytes)) => {
                    let mut out = Vec::new();
                    self.decoder.feed(&bytes, &mut out);
                    self.frames.extend(out);
                }
                Ok(None) | Err(_) => {
                    self.decoder.finish();
                    return None;
                }
            }
        }
    }
}

fn seq_of(id: &str) -> u64 {
    EventId::parse(id)
        .unwrap_or_else(|_| panic!("bad id {id:?}"))
        .seq
}

/// (first seq, last seq, tag) of an acknowledged append; event k has data `{tag}-k{k}`.
type Ack = (u64, u64, String);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_tells_every_watcher_and_loses_no_acknowledged_event() {
    const WATCHERS: usize = 100;
    const STREAM: &str = "job";
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("d.db").display());
    // Killed on drop if an assertion fails before it exits by itself.
    let mut server = Server::start_with(&db, 0, &["--heartbeat", "1s"]).expect("start jobcast");
    let url = server.url.clone();
    let pid = server.child.id();
    let client = reqwest::Client::new();

    let res = client
        .put(format!("{url}/v1/streams/{STREAM}"))
        .send()
        .await
        .expect("PUT stream");
    assert_eq!(res.status(), 201, "PUT stream");

    // 100 watchers, each connected for sure: its `retry:` line was read.
    let mut watchers = Vec::new();
    for i in 0..WATCHERS {
        let res = client
            .get(format!("{url}/v1/streams/{STREAM}/events"))
            .header("accept", "text/event-stream")
            .send()
            .await
            .unwrap_or_else(|e| panic!("watcher {i}: {e}"));
        assert_eq!(res.status(), 200, "watcher {i}");
        let mut w = Watch {
            res,
            decoder: Decoder::new(),
            frames: Default::default(),
        };
        match w.next_frame(Duration::from_secs(10)).await {
            Some(Frame::Retry(_)) => {}
            other => panic!("watcher {i}: expected retry first, got {other:?}"),
        }
        watchers.push(tokio::spawn(async move {
            // Every event in order from seq 1, then what ended the response.
            let mut want = 1u64;
            let mut last: Option<SseEvent> = None;
            while let Some(f) = w.next_frame(Duration::from_secs(20)).await {
                if let Frame::Event(e) = f {
                    if e.event == "message" {
                        assert_eq!(seq_of(&e.last_event_id), want, "watcher {i}: gap or repeat");
                        want += 1;
                    }
                    last = Some(e);
                }
            }
            (want - 1, last)
        }));
    }

    // 4 producers appending in a loop, recording what was acknowledged.
    let acked: Arc<Mutex<Vec<Ack>>> = Arc::default();
    let mut producers = Vec::new();
    for p in 0..4 {
        let (client, url, acked) = (client.clone(), url.clone(), acked.clone());
        producers.push(tokio::spawn(async move {
            for i in 0..100_000u64 {
                let tag = format!("p{p}-i{i}");
                let body: Vec<_> = (0..(1 + i % 5))
                    .map(|k| serde_json::json!({ "data": format!("{tag}-k{k}") }))
                    .collect();
                let res = client
                    .post(format!("{url}/v1/streams/{STREAM}/events"))
                    .header("content-type", "application/json")
                    .body(serde_json::Value::from(body).to_string())
                    .send()
                    .await;
                let Ok(res) = res else { return };
                if res.status() != 201 {
                    return;
                }
                let Ok(v) = res.json::<serde_json::Value>().await else {
                    return;
                };
                let seq = |k: &str| seq_of(v[k].as_str().expect("id in the answer"));
                acked
                    .lock()
                    .unwrap()
                    .push((seq("first_id"), seq("last_id"), tag));
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let acked_before = acked.lock().unwrap().len();
    assert!(
        acked_before > 0,
        "no append was acknowledged in a second of producing"
    );

    let status = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("kill -TERM");
    assert!(status.success(), "kill -TERM failed");
    let sent = Instant::now();
    let exit = loop {
        if let Some(s) = server.child.try_wait().expect("try_wait") {
            break s;
        }
        assert!(
            sent.elapsed() < Duration::from_secs(15),
            "jobcast did not exit within 15 s of SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let exited_after = sent.elapsed();
    assert!(exit.success(), "jobcast exited with {exit} after SIGTERM");

    for p in producers {
        tokio::time::timeout(Duration::from_secs(15), p)
            .await
            .expect("a producer did not stop after the server exited")
            .expect("producer");
    }
    let mut seen = Vec::new();
    for (i, w) in watchers.into_iter().enumerate() {
        let (events, last) = tokio::time::timeout(Duration::from_secs(15), w)
            .await
            .unwrap_or_else(|_| panic!("watcher {i}: its response did not end"))
            .expect("watcher");
        let last = last.unwrap_or_else(|| panic!("watcher {i}: no event at all"));
        assert_eq!(
            last.event, "jobcast.error",
            "watcher {i}: the response ended without jobcast.error (last: {last:?})"
        );
        let err: ErrorPayload = serde_json::from_str(&last.data)
            .unwrap_or_else(|e| panic!("watcher {i}: error data {:?}: {e}", last.data));
        assert_eq!(err.code, "shutting_down", "watcher {i}: {err:?}");
        assert!(err.retryable, "watcher {i}: shutting_down is retryable");
        assert!(
            err.retry_after_ms.is_some(),
            "watcher {i}: shutting_down carries retry_after_ms"
        );
        seen.push(events);
    }
    let acked = acked.lock().unwrap().clone();
    eprintln!(
        "shutdown: exited {exited_after:?} after SIGTERM; {} appends acknowledged \
         ({acked_before} before SIGTERM); watchers had received {}..={} events",
        acked.len(),
        seen.iter().min().unwrap_or(&0),
        seen.iter().max().unwrap_or(&0),
    );

    // Restart on the same database: every acknowledged event is there.
    let server = Server::start_on(&db, 0).expect("restart jobcast");
    let log = cli_support::read_log(&client, &server.url, STREAM).await;
    for (i, e) in log.iter().enumerate() {
        assert_eq!(e["seq"].as_u64(), Some(i as u64 + 1), "seqs are dense");
    }
    for (first, last, tag) in &acked {
        for (k, seq) in (*first..=*last).enumerate() {
            let e = log
                .get(seq as usize - 1)
                .unwrap_or_else(|| panic!("lost acknowledged seq {seq} ({tag})"));
            assert_eq!(e["data"], format!("{tag}-k{k}"), "seq {seq}");
        }
    }
    // Watchers never saw an event that is not in the log.
    let max_seen = seen.iter().copied().max().unwrap_or(0);
    assert!(
        max_seen as usize <= log.len(),
        "a watcher saw seq {max_seen}, the log has {}",
        log.len()
    );
}
