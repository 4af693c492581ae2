//! The watch's reconnect rules over real HTTP, against a scripted server:
//! what is retried, what stops, 204, dedupe and resets across reconnects,
//! live starts, give-up, read timeouts, and the headers sent.

mod common;

use std::time::Duration;

use common::{collect, fast_client, Reply, Scripted, T};
use jobcast_client::{Client, Error, EventId, Item, ResetReason, Start, State, StreamState};

const END: &str = "event: jobcast.end\nid: ab-9\ndata: {\"state\":\"completed\"}\n\n";

fn events(items: &[Result<Item, Error>]) -> Vec<String> {
    items
        .iter()
        .map(|i| match i {
            Ok(Item::Event(e)) => format!("{} {}", e.id, e.data),
            Ok(Item::Reset(r)) => format!("reset {:?}", r.reason),
            Ok(Item::End(e)) => format!("end {}", e.state().as_str()),
            Err(e) => format!("error {}", e.code().unwrap_or("-")),
            Ok(other) => format!("{other:?}"),
        })
        .collect()
}

#[tokio::test]
async fn retryable_statuses_are_retried_until_the_stream_opens() {
    let server = Scripted::start(
        vec![
            Reply::error(503, "store_unavailable").header("retry-after", "0"),
            Reply::error(429, "too_many"),
            Reply::error(408, "timeout"),
            Reply::error(500, "oops"),
            Reply::status(502),
            Reply::hang_up(),
            Reply::sse(format!("retry: 5\n\nid: ab-1\ndata: x\n\n{END}")),
        ],
        Reply::status(500),
    )
    .await;
    let client = fast_client(&server.url);
    let mut watch = client.watch("job", Start::Beginning);
    let items = collect(&mut watch, T).await;
    assert_eq!(events(&items), vec!["ab-1 x", "end completed"]);
    assert_eq!(server.seen().len(), 7);
    assert_eq!(watch.state(), State::Closed);
}

#[tokio::test]
async fn other_client_errors_stop_at_once() {
    for status in [400u16, 401, 403, 404, 405, 409, 410, 413, 415, 422] {
        let server = Scripted::start(vec![Reply::error(status, "nope")], Reply::status(200)).await;
        let client = fast_client(&server.url);
        let items = collect(&mut client.watch("job", Start::Beginning), T).await;
        assert_eq!(items.len(), 1, "{status}");
        match &items[0] {
            Err(e @ Error::Api { .. }) => {
                assert_eq!(e.status(), Some(status));
                assert_eq!(e.code(), Some("nope"));
                assert!(!e.is_retryable());
            }
            other => panic!("{status}: {other:?}"),
        }
        assert_eq!(server.seen().len(), 1, "{status}: no retry");
    }
}

#[tokio::test]
async fn not_an_event_stream_stops() {
    let server = Scripted::start(vec![Reply::json(200, "{}")], Reply::status(200)).await;
    let items = collect(
        &mut fast_client(&server.url).watch("job", Start::Beginning),
        T,
    )
    .await;
    assert!(
        matches!(items.as_slice(), [Err(Error::Protocol { .. })]),
        "{items:?}"
    );
    assert_eq!(server.seen().len(), 1);
}

#[tokio::test]
async fn no_content_finishes_without_an_item() {
    let server = Scripted::start(vec![Reply::status(204)], Reply::status(500)).await;
    let client = fast_client(&server.url);
    let mut watch = client.watch("job", Start::After(EventId::new("ab", 9)));
    let items = collect(&mut watch, T).await;
    assert!(items.is_empty(), "{items:?}");
    assert_eq!(server.seen().len(), 1);
    assert_eq!(server.seen()[0].header("last-event-id"), Some("ab-9"));
}

/// The guarantee's client half: a server that resends what the client
/// already has (it ignores Last-Event-ID) still yields each event once.
#[tokio::test]
async fn events_resent_after_a_reconnect_are_delivered_once() {
    let server = Scripted::start(
        vec![
            Reply::sse("id: ab-1\ndata: a\n\nid: ab-2\ndata: b\n\n"),
            Reply::sse("id: ab-1\ndata: a\n\nid: ab-2\ndata: b\n\nid: ab-3\ndata: c\n\n"),
            Reply::sse(format!(
                "id: ab-2\ndata: b\n\nid: ab-3\ndata: c\n\nid: ab-4\ndata: d\n\n{END}"
            )),
        ],
        Reply::status(500),
    )
    .await;
    let client = fast_client(&server.url);
    let items = collect(&mut client.watch("job", Start::Beginning), T).await;
    assert_eq!(
        events(&items),
        vec!["ab-1 a", "ab-2 b", "ab-3 c", "ab-4 d", "end completed"]
    );
    let seen = server.seen();
    assert_eq!(seen[1].header("last-event-id"), Some("ab-2"));
    assert_eq!(seen[2].header("last-event-id"), Some("ab-3"));
}

#[tokio::test]
async fn a_reset_is_surfaced_and_the_position_follows_the_server() {
    let server = Scripted::start(
        vec![
            Reply::sse("id: ab-1\ndata: a\n\nid: ab-2\ndata: b\n\n"),
            Reply::sse(concat!(
                "event: jobcast.reset\n",
                "data: {\"reason\":\"epoch_mismatch\",\"requested\":\"ab-2\",\"resumed_from\":\"cd-0\"}\n\n",
                "id: cd-1\ndata: new\n\n"
            )),
            Reply::sse("id: cd-2\ndata: newer\n\nevent: jobcast.end\nid: cd-3\ndata: {\"state\":\"failed\",\"error\":\"e\"}\n\n"),
        ],
        Reply::status(500),
    )
    .await;
    let client = fast_client(&server.url);
    let items = collect(&mut client.watch("job", Start::Beginning), T).await;
    assert_eq!(
        events(&items),
        vec![
            "ab-1 a",
            "ab-2 b",
            "reset EpochMismatch",
            "cd-1 new",
            "cd-2 newer",
            "end failed"
        ]
    );
    match &items[2] {
        Ok(Item::Reset(r)) => assert_eq!(r.reason, ResetReason::EpochMismatch),
        other => panic!("{other:?}"),
    }
    assert_eq!(server.seen()[2].header("last-event-id"), Some("cd-1"));
}

#[tokio::test]
async fn a_retryable_stream_error_reconnects_and_a_final_one_stops() {
    let server = Scripted::start(
        vec![
            Reply::sse("id: ab-1\ndata: a\n\nevent: jobcast.error\ndata: {\"code\":\"shutting_down\",\"message\":\"m\",\"retryable\":true,\"retry_after_ms\":10}\n\n"),
            Reply::sse("id: ab-2\ndata: b\n\nevent: jobcast.error\ndata: {\"code\":\"stream_deleted\",\"message\":\"gone\",\"retryable\":false}\n\n"),
        ],
        Reply::status(500),
    )
    .await;
    let client = fast_client(&server.url);
    let items = collect(&mut client.watch("job", Start::Beginning), T).await;
    assert_eq!(
        events(&items),
        vec!["ab-1 a", "ab-2 b", "error stream_deleted"]
    );
    assert_eq!(server.seen().len(), 2);
    assert_eq!(server.seen()[1].header("last-event-id"), Some("ab-1"));
}

#[tokio::test]
async fn live_start_resumes_from_the_head_it_looked_up() {
    let meta = |state: &str, last: &str| {
        Reply::json(
            200,
            &format!(
                r#"{{"id":"job","epoch":"ab","state":"{state}","created_at":"t","updated_at":"t","last_id":{last},"events":5,"watchers":0}}"#
            ),
        )
    };
    // Open stream: the head is the position; a reconnect before any event
    // still resumes from it (nothing appended meanwhile is missed).
    let server = Scripted::start(
        vec![
            meta("open", "\"ab-5\""),
            Reply::sse("retry: 1\n\n"),
            Reply::sse(format!("id: ab-6\ndata: x\n\n{END}")),
        ],
        Reply::status(500),
    )
    .await;
    let items = collect(&mut fast_client(&server.url).watch("job", Start::Live), T).await;
    assert_eq!(events(&items), vec!["ab-6 x", "end completed"]);
    let seen = server.seen();
    assert_eq!(seen[0].target, "/v1/streams/job");
    assert_eq!(seen[1].header("last-event-id"), Some("ab-5"));
    assert_eq!(seen[2].header("last-event-id"), Some("ab-5"));

    // Empty stream: from `{epoch}-0`.
    let server = Scripted::start(vec![meta("open", "null")], Reply::status(204)).await;
    collect(&mut fast_client(&server.url).watch("job", Start::Live), T).await;
    assert_eq!(server.seen()[1].header("last-event-id"), Some("ab-0"));

    // No such stream yet: everything it will hold is live.
    let server = Scripted::start(
        vec![Reply::error(404, "stream_not_found")],
        Reply::status(204),
    )
    .await;
    collect(&mut fast_client(&server.url).watch("job", Start::Live), T).await;
    let seen = server.seen();
    assert_eq!(
        (seen[1].target.as_str(), seen[1].header("last-event-id")),
        ("/v1/streams/job/events", None)
    );

    // Ended: `?from=live` (the server answers with the end).
    let server = Scripted::start(vec![meta("completed", "\"ab-5\"")], Reply::sse(END)).await;
    let items = collect(&mut fast_client(&server.url).watch("job", Start::Live), T).await;
    assert_eq!(events(&items), vec!["end completed"]);
    assert_eq!(server.seen()[1].target, "/v1/streams/job/events?from=live");
}

#[tokio::test]
async fn gives_up_after_the_configured_time() {
    let server = Scripted::start(vec![], Reply::error(503, "store_unavailable")).await;
    let client = Client::builder(&server.url)
        .backoff(Duration::from_millis(2), Duration::from_millis(20))
        .give_up_after(Duration::from_millis(300))
        .build()
        .unwrap();
    let items = collect(&mut client.watch("job", Start::Beginning), T).await;
    match items.as_slice() {
        [Err(e @ Error::GaveUp { attempts, .. })] => {
            assert!(*attempts > 1);
            assert_eq!(e.status(), Some(503));
            assert_eq!(e.code(), Some("store_unavailable"));
            // The chain is kept: GaveUp -> Api.
            let source = std::error::Error::source(e).expect("source");
            assert!(source.to_string().contains("503"), "{source}");
        }
        other => panic!("{other:?}"),
    }
    assert!(server.seen().len() > 1);
}

#[tokio::test]
async fn a_silent_connection_is_dropped_after_the_read_timeout() {
    let server = Scripted::start(
        vec![Reply::sse("retry: 1\n\nid: ab-1\ndata: a\n\n").hold(Duration::from_secs(20))],
        Reply::sse(format!("id: ab-2\ndata: b\n\n{END}")),
    )
    .await;
    let client = Client::builder(&server.url)
        .backoff(Duration::from_millis(2), Duration::from_millis(20))
        .read_timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let items = collect(&mut client.watch("job", Start::Beginning), T).await;
    assert_eq!(events(&items), vec!["ab-1 a", "ab-2 b", "end completed"]);
    assert_eq!(server.seen()[1].header("last-event-id"), Some("ab-1"));
}

#[tokio::test]
async fn token_and_user_agent_are_sent() {
    let server = Scripted::start(vec![], Reply::status(204)).await;
    let client = Client::builder(&format!("{}/", server.url))
        .token("s3cret")
        .user_agent("tests/1")
        .build()
        .unwrap();
    assert!(
        !format!("{client:?}").contains("s3cret"),
        "Debug leaks the token"
    );
    collect(&mut client.watch("job", Start::Beginning), T).await;
    let seen = &server.seen()[0];
    assert_eq!(seen.header("authorization"), Some("Bearer s3cret"));
    assert_eq!(seen.header("user-agent"), Some("tests/1"));
    assert_eq!(seen.target, "/v1/streams/job/events");
}

#[tokio::test]
async fn invalid_stream_ids_fail_before_any_request() {
    let server = Scripted::start(vec![], Reply::status(204)).await;
    let client = fast_client(&server.url);
    let items = collect(&mut client.watch("a/b", Start::Beginning), T).await;
    assert!(matches!(
        items.as_slice(),
        [Err(Error::InvalidInput { .. })]
    ));
    assert!(matches!(
        client.append("-x", "d").await,
        Err(Error::InvalidInput { .. })
    ));
    assert!(server.seen().is_empty());
    assert!("x-1".parse::<Start>().is_ok());
    assert_eq!("live".parse::<Start>().unwrap(), Start::Live);
    assert!("nope".parse::<Start>().is_err());
    assert!(Client::new("ftp://x").is_err());
    assert!(Client::new("not a url").is_err());
    let _ = StreamState::Open;
}

/// A broken proxy that never ends a line must not grow the client without
/// bound: past the decoder's limit (16 MiB by default) the connection counts
/// as broken, and the watch reconnects from the last event it delivered.
#[tokio::test]
async fn an_endless_line_is_cut_off_and_the_watch_reconnects() {
    let mut first = b"id: ab-1\ndata: x\n\ndata: ".to_vec();
    first.resize(first.len() + 17 * 1024 * 1024, b'z');
    let server = Scripted::start(
        vec![
            Reply::sse(first)
                .chunked(256 * 1024)
                .hold(Duration::from_secs(120)),
            Reply::sse(format!("id: ab-2\ndata: y\n\n{END}")),
        ],
        Reply::status(500),
    )
    .await;
    // No read timeout within the test's time: only the line limit can end
    // the first connection.
    let client = Client::builder(&server.url)
        .backoff(Duration::from_millis(5), Duration::from_millis(100))
        .give_up_after(Duration::from_secs(20))
        .read_timeout(Duration::from_secs(300))
        .build()
        .unwrap();
    let items = collect(
        &mut client.watch("job", Start::Beginning),
        Duration::from_secs(20),
    )
    .await;
    assert_eq!(events(&items), vec!["ab-1 x", "ab-2 y", "end completed"]);
    let seen = server.seen();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[1].header("last-event-id"), Some("ab-1"));
}
