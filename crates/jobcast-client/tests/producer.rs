//! The producer API against a real server, and its retries: an append whose
//! answer is lost after the server committed it is retried with the same
//! Idempotency-Key and creates no duplicate.

mod common;

use std::time::Duration;

use common::{collect, Proxy, Reply, Scripted, TestServer, T};
use jobcast_client::{
    Client, Error, EventId, Item, ListOptions, NewEvent, RetryPolicy, Start, StreamState,
};

fn fast(url: &str) -> Client {
    Client::builder(url)
        .backoff(Duration::from_millis(2), Duration::from_millis(20))
        .build()
        .unwrap()
}

/// The stream's log as (seq, data) through the JSON page.
async fn log_of(url: &str, stream: &str) -> Vec<(u64, String)> {
    let v: serde_json::Value = reqwest::get(format!("{url}/v1/streams/{stream}/events?limit=1000"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    v["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["seq"].as_u64().unwrap(),
                e["data"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_answer_is_retried_without_a_duplicate() {
    let server = TestServer::start().await;
    let proxy = Proxy::start(server.addr, 7).await;
    let client = fast(&proxy.url);

    // The first two attempts reach the server, which commits and answers;
    // the proxy drops each answer. The third attempt gets the replayed answer.
    proxy.drop_next_responses(2);
    let appended = client
        .append_batch("lost", &[NewEvent::text("a"), NewEvent::text("b")])
        .await
        .expect("append");
    assert_eq!(
        proxy.dropped_responses(),
        2,
        "the answers were not dropped: the test proves nothing"
    );
    assert_eq!(appended.first_id.seq, 1);
    assert_eq!(appended.last_id.seq, 2);
    assert_eq!(appended.count, 2);

    // One logical append, committed once.
    assert_eq!(
        log_of(&server.url, "lost").await,
        vec![(1, "a".into()), (2, "b".into())]
    );
    let info = client.get("lost").await.unwrap();
    assert_eq!(info.events, 2);

    // The same for a single event and for complete.
    proxy.drop_next_responses(1);
    let one = client.append("lost", "c").await.unwrap();
    assert_eq!(one.first_id.seq, 3);
    proxy.drop_next_responses(1);
    let done = client.complete("lost", None).await.unwrap();
    assert_eq!(done.state, StreamState::Completed);
    assert_eq!(proxy.dropped_responses(), 4);
    let log = log_of(&server.url, "lost").await;
    assert_eq!(log.len(), 4, "{log:?}"); // a, b, c, jobcast.end
}

#[tokio::test]
async fn retries_reuse_one_key_per_logical_append() {
    let ok = r#"{"first_id":"ab-1","last_id":"ab-1","count":1}"#;
    let server = Scripted::start(
        vec![
            Reply::error(503, "store_unavailable").header("retry-after", "0"),
            Reply::hang_up(),
            Reply::error(500, "oops"),
            Reply::json(201, ok),
            Reply::json(201, ok),
        ],
        Reply::status(500),
    )
    .await;
    let client = fast(&server.url);
    let a = client
        .append("job", NewEvent::text("x").with_type("log"))
        .await
        .unwrap();
    assert_eq!(a.first_id, EventId::new("ab", 1));
    client.append("job", "y").await.unwrap();
    let seen = server.seen();
    assert_eq!(seen.len(), 5);
    let keys: Vec<&str> = seen
        .iter()
        .map(|s| s.header("idempotency-key").unwrap())
        .collect();
    assert!(
        keys[0].len() == 32 && keys[0].bytes().all(|b| b.is_ascii_hexdigit()),
        "{}",
        keys[0]
    );
    assert!(
        keys[..4].iter().all(|k| *k == keys[0]),
        "one key for all retries: {keys:?}"
    );
    assert_ne!(keys[4], keys[0], "a new key for a new append");
    assert_eq!(seen[0].body, br#"{"type":"log","data":"x"}"#);
    assert_eq!(seen[0].header("content-type"), Some("application/json"));
    assert_eq!(seen[0].target, "/v1/streams/job/events");
}

#[tokio::test]
async fn client_errors_are_not_retried_and_retries_are_bounded() {
    let server = Scripted::start(vec![Reply::error(409, "stream_ended")], Reply::status(500)).await;
    let err = fast(&server.url).append("job", "x").await.unwrap_err();
    assert_eq!(
        (err.status(), err.code()),
        (Some(409), Some("stream_ended"))
    );
    assert_eq!(server.seen().len(), 1);

    let server = Scripted::start(vec![], Reply::error(503, "store_unavailable")).await;
    let client = Client::builder(&server.url)
        .backoff(Duration::from_millis(1), Duration::from_millis(5))
        .retry(RetryPolicy {
            max_attempts: 4,
            max_elapsed: Duration::from_secs(10),
        })
        .build()
        .unwrap();
    match client.append("job", "x").await {
        Err(e @ Error::GaveUp { attempts: 4, .. }) => assert_eq!(e.status(), Some(503)),
        other => panic!("{other:?}"),
    }
    assert_eq!(server.seen().len(), 4);

    // A delete whose first attempt may have succeeded: the 404 of the retry is success.
    let server = Scripted::start(
        vec![Reply::hang_up(), Reply::error(404, "stream_not_found")],
        Reply::status(500),
    )
    .await;
    fast(&server.url)
        .delete("job")
        .await
        .expect("delete after an uncertain attempt");
    // A plain 404 is an error.
    let server = Scripted::start(
        vec![Reply::error(404, "stream_not_found")],
        Reply::status(500),
    )
    .await;
    assert_eq!(
        fast(&server.url).delete("job").await.unwrap_err().status(),
        Some(404)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_whole_producer_api_against_a_real_server() {
    let server = TestServer::start().await;
    let client = Client::new(&server.url).unwrap();
    let created = client.create("p1").await.unwrap();
    assert_eq!(
        (created.state, created.events, created.last_id.clone()),
        (StreamState::Open, 0, None)
    );
    client.append("p1", "text").await.unwrap();
    let json = NewEvent::json(&serde_json::json!({"b": 1, "a": [true, null]})).unwrap();
    let batch = client
        .append_batch(
            "p1",
            &[json.with_type("progress"), NewEvent::text("line1\nline2")],
        )
        .await
        .unwrap();
    assert_eq!(
        (batch.first_id.seq, batch.last_id.seq, batch.count),
        (2, 3, 2)
    );
    let done = client
        .complete("p1", Some(&serde_json::json!({"artifact": "x.tar"})))
        .await
        .unwrap();
    assert_eq!(done.state, StreamState::Completed);

    let items = collect(&mut client.watch("p1", Start::Beginning), T).await;
    let got: Vec<String> = items
        .iter()
        .map(|i| match i {
            Ok(Item::Event(e)) => format!("{} {}", e.event_type, e.data),
            Ok(Item::End(e)) => format!(
                "end {} {}",
                e.state().as_str(),
                e.payload.data.as_ref().map(|d| d.get()).unwrap_or("")
            ),
            other => format!("{other:?}"),
        })
        .collect();
    assert_eq!(
        got,
        vec![
            "message text",
            "progress {\"b\":1,\"a\":[true,null]}",
            "message line1\nline2",
            "end completed {\"artifact\":\"x.tar\"}",
        ]
    );

    client.append("p2", "x").await.unwrap();
    client.fail("p2", "tests failed").await.unwrap();
    let items = collect(&mut client.watch("p2", Start::Live), T).await;
    match items.as_slice() {
        [Ok(Item::End(e))] => {
            assert_eq!(e.state(), StreamState::Failed);
            assert_eq!(e.payload.error.as_deref(), Some("tests failed"));
        }
        other => panic!("{other:?}"),
    }
    // Resuming at the end: 204, nothing more.
    let end = client.get("p2").await.unwrap().last_id.unwrap();
    assert!(collect(&mut client.watch("p2", Start::After(end)), T)
        .await
        .is_empty());

    let ended = client.append("p2", "late").await.unwrap_err();
    assert_eq!(ended.code(), Some("stream_ended"));
    assert_eq!(
        client.complete("p2", None).await.unwrap_err().status(),
        Some(409)
    );

    let all = client.list(&ListOptions::default()).await.unwrap();
    let ids: Vec<&str> = all.streams.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(ids, vec!["p2", "p1"]);
    let failed = client
        .list(&ListOptions {
            state: Some(StreamState::Failed),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(failed.streams.len(), 1);
    let page = client
        .list(&ListOptions {
            limit: Some(1),
            ..Default::default()
        })
        .await
        .unwrap();
    let next = page.next.clone().expect("a next page");
    let page2 = client
        .list(&ListOptions {
            limit: Some(1),
            after: Some(next),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(page2.streams[0].id, "p1");

    client.delete("p1").await.unwrap();
    let gone = client.get("p1").await.unwrap_err();
    assert_eq!(
        (gone.status(), gone.code()),
        (Some(404), Some("stream_not_found"))
    );
    assert_eq!(client.delete("p1").await.unwrap_err().status(), Some(404));
    let empty = client.append("p3", "").await.unwrap_err();
    assert_eq!(empty.code(), Some("empty_data"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_stream_ends_the_watch_with_its_error() {
    let server = TestServer::start().await;
    let client = Client::new(&server.url).unwrap();
    client.append("d", "x").await.unwrap();
    let mut watch = client.watch("d", Start::Beginning);
    let first = tokio::time::timeout(T, futures::StreamExt::next(&mut watch))
        .await
        .unwrap();
    assert!(matches!(first, Some(Ok(Item::Event(_)))));
    client.delete("d").await.unwrap();
    let rest = collect(&mut watch, T).await;
    match rest.as_slice() {
        [Err(e @ Error::Stream(p))] => {
            assert_eq!(p.code, "stream_deleted");
            assert!(!e.is_retryable());
        }
        other => panic!("{other:?}"),
    }
}

/// A producer appending in a loop learns of a cancel request from the
/// answer to its first append made after the request was answered (no
/// polling), through `cancel_signal`, and ends the stream; the log holds
/// one `jobcast.cancel_requested` in order. Labels round-trip and filter.
#[tokio::test]
async fn a_producer_learns_of_a_cancel_from_its_next_append() {
    let server = TestServer::start().await;
    let producer = fast(&server.url);
    let other = fast(&server.url);
    let labels: std::collections::BTreeMap<String, String> =
        [("team".to_owned(), "web".to_owned())].into();
    let info = producer.set_labels("gen-1", &labels).await.unwrap();
    assert_eq!(
        (info.labels.clone(), info.cancel_requested),
        (labels.clone(), false)
    );
    let page = producer
        .list(&ListOptions {
            labels: vec![("team".into(), "web".into())],
            prefix: Some("gen-".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(page.streams.len(), 1);
    let mut signal = producer.cancel_signal("gen-1");
    assert!(!signal.is_requested());
    let work = {
        let producer = producer.clone();
        tokio::spawn(async move {
            // (append started, answer's flag) per append, until the signal fires.
            let mut seen = Vec::new();
            for i in 0..10_000u32 {
                let started = tokio::time::Instant::now();
                let a = producer
                    .append("gen-1", format!("token {i}"))
                    .await
                    .unwrap();
                seen.push((started, a.cancel_requested));
                if a.cancel_requested {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            producer
                .complete("gen-1", Some(&serde_json::json!({"cancelled": true})))
                .await
                .unwrap();
            seen
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let asked = other.cancel("gen-1").await.unwrap();
    let answered = tokio::time::Instant::now();
    assert!(asked.cancel_requested);
    tokio::time::timeout(T, signal.requested())
        .await
        .expect("the producer learns of the cancel");
    let observed = answered.elapsed();
    let seen = work.await.unwrap();
    // Every append started after the cancel was answered says so (the
    // one in flight at that moment may too: it committed after the
    // cancel); the producer stopped at the first flagged answer.
    assert!(
        seen.iter()
            .filter(|(started, _)| *started >= answered)
            .all(|(_, c)| *c),
        "{seen:?}"
    );
    assert_eq!(seen.iter().filter(|(_, c)| *c).count(), 1, "{seen:?}");
    assert!(seen.last().is_some_and(|(_, c)| *c));
    println!("cancel answered -> producer's signal: {observed:?}");
    let types: Vec<String> = {
        let v: serde_json::Value =
            reqwest::get(format!("{}/v1/streams/gen-1/events?limit=1000", server.url))
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
        v["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["type"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(
        types
            .iter()
            .filter(|t| *t == "jobcast.cancel_requested")
            .count(),
        1
    );
    assert_eq!(types.last().map(String::as_str), Some("jobcast.end"));
    let info = other.get("gen-1").await.unwrap();
    assert_eq!(
        (info.state, info.cancel_requested),
        (StreamState::Completed, true)
    );
    // Once ended: 409 stream_ended.
    match other.cancel("gen-1").await {
        Err(Error::Api { status: 409, .. }) => {}
        other => panic!("{other:?}"),
    }
}
