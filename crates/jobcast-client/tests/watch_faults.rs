//! Exactly once, in order, across real faults: a real server, a watcher
//! behind a proxy that cuts connections at random points and on command,
//! and a server stopped and started again on the same address and store.

mod common;

use std::time::Duration;

use common::{collect, TestServer, T};
use futures::StreamExt;
use jobcast_client::{Client, Error, Item, NewEvent, Start, StreamState};

const EVENTS: usize = 20_000;
const BATCH: usize = 250;

/// Appends `EVENTS` events (`e1` … `e20000`) in batches, pausing now and
/// then so that the watcher is live while they arrive, then completes.
async fn produce(client: Client, stream: &'static str) {
    for b in 0..EVENTS / BATCH {
        let batch: Vec<NewEvent> = (1..=BATCH)
            .map(|i| NewEvent::text(format!("e{}", b * BATCH + i)))
            .collect();
        client.append_batch(stream, &batch).await.expect("append");
        if b % 2 == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    client.complete(stream, None).await.expect("complete");
}

/// Every event exactly once, in order, then the end — and nothing else.
fn assert_exactly_once(items: &[Result<Item, Error>], events: u64) {
    let mut want = 1u64;
    for (i, item) in items.iter().enumerate() {
        match item {
            Ok(Item::Event(e)) => {
                assert_eq!(e.seq(), want, "item #{i}: seq");
                assert_eq!(e.data, format!("e{want}"), "item #{i}: data");
                want += 1;
            }
            Ok(Item::End(end)) => {
                assert_eq!(i, items.len() - 1, "the end is the last item");
                assert_eq!(end.state(), StreamState::Completed);
                assert_eq!(end.id.as_ref().map(|id| id.seq), Some(events + 1));
            }
            other => panic!("item #{i}: unexpected {other:?}"),
        }
    }
    assert_eq!(want - 1, events, "events delivered");
    assert!(
        matches!(items.last(), Some(Ok(Item::End(_)))),
        "ends with End"
    );
}

fn watcher(url: &str) -> Client {
    Client::builder(url)
        .backoff(Duration::from_millis(5), Duration::from_millis(100))
        .give_up_after(Duration::from_secs(30))
        .read_timeout(Duration::from_secs(10))
        .build()
        .expect("client")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_thousand_events_through_a_cutting_proxy_arrive_exactly_once_in_order() {
    let server = TestServer::start().await;
    let proxy = common::Proxy::start(server.addr, 0x5eed).await;
    // Cut each connection after a random 1 byte .. 24 KiB of the response:
    // inside headers, inside events, between them.
    proxy.cut_randomly(1, 24 * 1024);

    let producer = tokio::spawn(produce(Client::new(&server.url).unwrap(), "faulty"));
    let chaos = {
        // And cut everything on command a few times while it streams.
        let cut = async {
            for _ in 0..10 {
                tokio::time::sleep(Duration::from_millis(40)).await;
                proxy.cut_all();
            }
        };
        let watch = async {
            let mut w = watcher(&proxy.url).watch("faulty", Start::Beginning);
            collect(&mut w, Duration::from_secs(50)).await
        };
        let ((), items) = tokio::join!(cut, watch);
        items
    };
    producer.await.expect("producer");
    assert_exactly_once(&chaos, EVENTS as u64);
    assert!(
        proxy.cuts() >= 20,
        "the proxy cut only {} connections: the test proves nothing",
        proxy.cuts()
    );
    eprintln!("{} connections, {} cuts", proxy.connections(), proxy.cuts());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_resumes_across_a_server_restart_on_the_same_address_and_store() {
    let mut server = TestServer::start().await;
    let client = Client::new(&server.url).unwrap();
    let stream = "restarted";
    for i in 1..=300 {
        client.append(stream, format!("e{i}")).await.unwrap();
    }
    let mut watch = watcher(&server.url).watch(stream, Start::Beginning);
    // Read part of the log, so the restart happens mid-stream.
    let mut items = Vec::new();
    while items.len() < 150 {
        let item = tokio::time::timeout(T, watch.next())
            .await
            .expect("an event in time")
            .expect("not ended");
        items.push(item);
    }
    let reader = tokio::spawn(async move {
        let rest = collect(&mut watch, Duration::from_secs(50)).await;
        items.extend(rest);
        items
    });
    server.stop().await; // watchers get a retryable shutting_down
    tokio::time::sleep(Duration::from_millis(200)).await; // connection refused meanwhile
    server.start_again().await;
    let client = Client::new(&server.url).unwrap();
    for chunk in 0..10 {
        let batch: Vec<NewEvent> = (1..=1000)
            .map(|i| NewEvent::text(format!("e{}", 300 + chunk * 1000 + i)))
            .collect();
        client.append_batch(stream, &batch).await.unwrap();
    }
    client.complete(stream, None).await.unwrap();
    let items = reader.await.expect("reader");
    assert_exactly_once(&items, 10_300);
}
