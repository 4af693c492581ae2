//! The core guarantees against a real server: exactly once, in order, no
//! gaps, whatever the timing; resume; late and early watchers; the end.

mod common;

use common::{seq_of, TestServer, T};
use std::time::Duration;

#[tokio::test]
async fn append_then_watch_gets_everything_in_order_then_end() {
    let s = TestServer::start().await;
    let a = s.append("job", "one").await;
    s.append_batch("job", &["two".into(), "three\nlines".into()])
        .await;
    s.complete("job").await;
    let epoch = a["first_id"]
        .as_str()
        .unwrap()
        .split('-')
        .next()
        .unwrap()
        .to_owned();
    let mut w = s.watch("job", "", None).await;
    assert_eq!(w.status, 200);
    let events = w.collect(T).await;
    let ids: Vec<_> = events.iter().map(|e| e.last_event_id.clone()).collect();
    assert_eq!(
        ids,
        (1..=4).map(|i| format!("{epoch}-{i}")).collect::<Vec<_>>()
    );
    let data: Vec<_> = events.iter().map(|e| e.data.as_str()).collect();
    assert_eq!(&data[..3], ["one", "two", "three\nlines"]);
    assert_eq!(events[3].event, "jobcast.end");
    assert!(String::from_utf8_lossy(&w.raw).starts_with("retry: 3000\n"));
}

#[tokio::test]
async fn resume_with_header_and_query_continues_at_next_event() {
    let s = TestServer::start().await;
    for i in 1..=5 {
        s.append("r", &format!("e{i}")).await;
    }
    s.complete("r").await;
    let epoch = s.meta("r").await["epoch"].as_str().unwrap().to_owned();
    let mut w = s.watch("r", "", Some(&format!("{epoch}-2"))).await;
    let seqs: Vec<u64> = w.collect(T).await.iter().map(seq_of).collect();
    assert_eq!(seqs, vec![3, 4, 5, 6]);
    let mut w = s
        .watch("r", &format!("?last_event_id={epoch}-4"), None)
        .await;
    let seqs: Vec<u64> = w.collect(T).await.iter().map(seq_of).collect();
    assert_eq!(seqs, vec![5, 6]);
    // The header wins over the query parameter.
    let mut w = s
        .watch(
            "r",
            &format!("?last_event_id={epoch}-1"),
            Some(&format!("{epoch}-5")),
        )
        .await;
    let seqs: Vec<u64> = w.collect(T).await.iter().map(seq_of).collect();
    assert_eq!(seqs, vec![6]);
}

/// A watcher attaching while a producer appends at full speed and then
/// completes gets every seq exactly once and then the end — with varied timing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watcher_racing_a_fast_producer_gets_every_seq_once() {
    let s = std::sync::Arc::new(TestServer::start().await);
    for rep in 0..200u64 {
        let stream = format!("race-{rep}");
        let n = 5 + rep % 20;
        let producer = {
            let s = s.clone();
            let stream = stream.clone();
            tokio::spawn(async move {
                for i in 0..n {
                    if i % 3 == 0 {
                        s.append_batch(&stream, &[format!("{i}a"), format!("{i}b")])
                            .await;
                    } else {
                        s.append(&stream, &format!("{i}")).await;
                    }
                }
                s.complete(&stream).await;
            })
        };
        // Attach at a varied moment: before, during or after the producer.
        let delay = Duration::from_micros((rep * 397) % 4000);
        tokio::time::sleep(delay).await;
        let query = if rep % 2 == 0 { "" } else { "?wait=10" };
        let mut w = s.watch(&stream, query, None).await;
        let events = w.collect(T).await;
        producer.await.unwrap();
        let total = s.meta(&stream).await["events"].as_u64().unwrap();
        let seqs: Vec<u64> = events.iter().map(seq_of).collect();
        assert_eq!(seqs, (1..=total).collect::<Vec<_>>(), "rep {rep}");
        assert_eq!(events.last().unwrap().event, "jobcast.end", "rep {rep}");
    }
}

#[tokio::test]
async fn watcher_before_the_stream_exists_gets_everything_once_created() {
    let s = TestServer::start().await;
    let mut w = s.watch("early", "?wait=30", None).await;
    assert_eq!(w.status, 200);
    tokio::time::sleep(Duration::from_millis(100)).await;
    s.append("early", "a").await;
    s.append("early", "b").await;
    s.complete("early").await;
    let events = w.collect(T).await;
    assert_eq!(events.iter().map(seq_of).collect::<Vec<_>>(), vec![1, 2, 3]);
    assert_eq!(events[2].event, "jobcast.end");
}

#[tokio::test]
async fn watcher_of_a_stream_that_never_comes_gets_not_found() {
    let s = TestServer::start().await;
    let mut w = s.watch("never", "?wait=1", None).await;
    let events = w.collect(T).await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].event, "jobcast.error");
    let v: serde_json::Value = serde_json::from_str(&events[0].data).unwrap();
    assert_eq!(v["code"], "stream_not_found");
    assert_eq!(v["retryable"], false);
}

#[tokio::test]
async fn resuming_at_the_end_is_204() {
    let s = TestServer::start().await;
    s.append("done", "x").await;
    s.complete("done").await;
    let epoch = s.meta("done").await["epoch"].as_str().unwrap().to_owned();
    let w = s.watch("done", "", Some(&format!("{epoch}-2"))).await;
    assert_eq!(w.status, 204);
    // One before the end still gets the end.
    let mut w = s.watch("done", "", Some(&format!("{epoch}-1"))).await;
    assert_eq!(w.status, 200);
    let events = w.collect(T).await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].event, "jobcast.end");
}

#[tokio::test]
async fn deleting_a_watched_stream_sends_stream_deleted_and_closes() {
    let s = TestServer::start().await;
    s.append("del", "x").await;
    let mut w = s.watch("del", "", None).await;
    assert_eq!(w.next_event(T).await.unwrap().data, "x");
    let res = s
        .client
        .delete(s.url("/v1/streams/del"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 204);
    // A new stream under the same id must never reach the old watcher.
    s.append("del", "new").await;
    let rest = w.collect(T).await;
    assert_eq!(rest.len(), 1, "{rest:?}");
    assert_eq!(rest[0].event, "jobcast.error");
    let v: serde_json::Value = serde_json::from_str(&rest[0].data).unwrap();
    assert_eq!(
        (v["code"].as_str(), v["retryable"].as_bool()),
        (Some("stream_deleted"), Some(false))
    );
    assert!(
        rest[0].last_event_id.ends_with("-1"),
        "control events carry no id"
    );
}

#[tokio::test]
async fn resuming_with_an_older_epoch_sends_reset_first() {
    let s = TestServer::start().await;
    s.append("re", "old").await;
    let old = s.meta("re").await["epoch"].as_str().unwrap().to_owned();
    let res = s
        .client
        .delete(s.url("/v1/streams/re"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 204);
    s.append("re", "new1").await;
    s.append("re", "new2").await;
    s.complete("re").await;
    let new = s.meta("re").await["epoch"].as_str().unwrap().to_owned();
    assert_ne!(old, new);
    let mut w = s.watch("re", "", Some(&format!("{old}-1"))).await;
    let events = w.collect(T).await;
    assert_eq!(events[0].event, "jobcast.reset");
    let v: serde_json::Value = serde_json::from_str(&events[0].data).unwrap();
    assert_eq!(v["reason"], "epoch_mismatch");
    assert_eq!(v["requested"], format!("{old}-1"));
    assert_eq!(v["resumed_from"], format!("{new}-0"));
    let data: Vec<_> = events[1..].iter().map(|e| e.data.as_str()).collect();
    assert_eq!(&data[..2], ["new1", "new2"]);
    assert_eq!(events.len(), 4);
}

#[tokio::test]
async fn data_with_line_breaks_round_trips_as_data_never_fields() {
    let s = TestServer::start().await;
    let nasty = [
        "a\rb",
        "a\nb",
        "a\r\nb",
        "x\n\nevent: evil\nid: 999\ndata: injected",
        "\n",
        " lead",
        "retry: 1",
    ];
    for d in nasty {
        s.append("inj", d).await;
    }
    s.complete("inj").await;
    let mut w = s.watch("inj", "", None).await;
    let events = w.collect(T).await;
    assert_eq!(events.len(), nasty.len() + 1);
    for (e, d) in events.iter().zip(nasty) {
        // CR, LF and CRLF are line breaks: they come back as LF.
        let want = d.replace("\r\n", "\n").replace('\r', "\n");
        assert_eq!(e.data, want);
        assert_eq!(e.event, "message");
    }
    let seqs: Vec<u64> = events.iter().map(seq_of).collect();
    assert_eq!(seqs, (1..=nasty.len() as u64 + 1).collect::<Vec<_>>());
}

#[tokio::test]
async fn live_watcher_after_end_gets_only_the_end() {
    let s = TestServer::start().await;
    s.append("lv", "a").await;
    let mut live = s.watch("lv", "?from=live", None).await;
    // Nothing old is sent to a live watcher.
    tokio::time::sleep(Duration::from_millis(100)).await;
    s.append("lv", "b").await;
    s.complete("lv").await;
    let seqs: Vec<u64> = live.collect(T).await.iter().map(seq_of).collect();
    assert_eq!(seqs, vec![2, 3]);
    let mut after = s.watch("lv", "?from=live", None).await;
    let events = after.collect(T).await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].event, "jobcast.end");
}

#[tokio::test]
async fn heartbeats_are_comments_on_idle_connections() {
    let s = TestServer::start_with(|c| c.heartbeat = Duration::from_millis(200)).await;
    s.append("hb", "x").await;
    let mut w = s.watch("hb", "", None).await;
    w.next_event(T).await.unwrap();
    let mut comments = 0;
    while comments < 2 {
        match w.next_frame(T).await {
            Some(jobcast_protocol::decode::Frame::Comment(_)) => comments += 1,
            Some(other) => panic!("only heartbeats expected, got {other:?}"),
            None => panic!("closed before two heartbeats"),
        }
    }
    let raw = String::from_utf8_lossy(&w.raw).into_owned();
    assert!(
        raw.ends_with(":\n:\n") || raw.contains("\n\n:\n:\n"),
        "{raw:?}"
    );
}
