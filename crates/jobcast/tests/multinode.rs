//! Several `jobcast serve` processes on one PostgreSQL database (SPEC
//! "Deployment", many nodes): appends on any node reach watchers on every
//! node through LISTEN/NOTIFY, a watcher resumes on any node with no gap,
//! and neither a lost listener connection nor a PostgreSQL outage loses or
//! repeats an event. Each test has a database of its own.

mod cli_support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use cli_support::pg::{self, TestDb};
use cli_support::proxy::CutProxy;
use cli_support::sse::{self, Close, Watcher};
use cli_support::Server;

/// Starts `n` nodes on `db` (one after the other: each runs the migrations).
fn nodes(db: &str, n: usize, extra: &[&str]) -> Vec<Server> {
    (0..n)
        .map(|i| Server::start_with(db, 0, extra).unwrap_or_else(|| panic!("start node {i}")))
        .collect()
}

/// Waits (bounded) until the node at `url` has a watcher on `stream` (which
/// must exist: a watcher waiting for a stream is not counted).
async fn attached(url: &str, stream: &str) {
    cli_support::wait_for_watcher(url, stream).await;
}

/// Creates `stream` on the node at `url`.
async fn create(client: &reqwest::Client, url: &str, stream: &str) {
    let res = client
        .put(format!("{url}/v1/streams/{stream}"))
        .send()
        .await
        .expect("PUT");
    assert_eq!(res.status(), 201, "PUT {stream}");
}

/// Producers append to nodes 1 and 2 at once on one stream; watchers on all
/// three nodes, attached before the first append, receive the same sequence:
/// every event exactly once, in seq order, matching what was acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_deliver_the_same_sequence_exactly_once() {
    const PRODUCERS: usize = 4;
    const APPENDS: usize = 40;
    let db = TestDb::create().await;
    let nodes = nodes(&db.url, 3, &[]);
    let client = reqwest::Client::new();
    let stream = "shared";
    create(&client, &nodes[0].url, stream).await;

    let mut watchers = Vec::new();
    for n in &nodes {
        let mut w = Watcher::new(stream);
        let mut sse = w.open(&client, &n.url).await.expect("watch");
        watchers.push(tokio::spawn(async move {
            let close = w.read(&mut sse, None).await;
            (w, close)
        }));
        attached(&n.url, stream).await;
    }

    // Producer p appends batches of 1..=5 events to node p % 2 (nodes 1 and 2).
    let mut producers = Vec::new();
    for p in 0..PRODUCERS {
        let (client, url) = (client.clone(), nodes[p % 2].url.clone());
        producers.push(tokio::spawn(async move {
            let mut acks = Vec::new();
            for i in 0..APPENDS {
                let tag = format!("p{p}-i{i}");
                let batch: Vec<_> = (0..1 + (p + i) % 5)
                    .map(|k| serde_json::json!({ "data": format!("{tag}-k{k}") }))
                    .collect();
                let res = client
                    .post(format!("{url}/v1/streams/{stream}/events"))
                    .header("content-type", "application/json")
                    .body(serde_json::Value::from(batch).to_string())
                    .send()
                    .await
                    .expect("append");
                assert_eq!(res.status(), 201, "append on {url}");
                let v: serde_json::Value = res.json().await.expect("JSON");
                let id = |k: &str| sse::seq(v[k].as_str().expect("id"));
                acks.push((id("first_id"), id("last_id"), tag));
            }
            acks
        }));
    }
    let mut acks = Vec::new();
    for (p, producer) in producers.into_iter().enumerate() {
        let mine = producer.await.expect("producer");
        // Each producer's appends are stored in its own order.
        assert!(
            mine.windows(2).all(|w| w[0].1 < w[1].0),
            "producer {p}'s appends out of order: {mine:?}"
        );
        acks.extend(mine);
    }
    sse::complete(&client, std::slice::from_ref(&nodes[0].url), stream, 10).await;

    // What was acknowledged, by seq: the store's order.
    acks.sort();
    let mut expected = Vec::new();
    for (first, last, tag) in &acks {
        assert_eq!(
            *first,
            expected.len() as u64 + 1,
            "acknowledged seqs are dense, each once"
        );
        for k in 0..=(last - first) {
            expected.push(format!("{tag}-k{k}"));
        }
    }
    for (i, w) in watchers.into_iter().enumerate() {
        let (w, close) = w.await.expect("watcher");
        assert_eq!(
            close,
            Some(Close::End),
            "node {i}'s watcher: {:?}\n{}",
            w.errors,
            nodes[i].log_tail()
        );
        w.assert_exactly_once(&expected);
        assert_eq!(w.connections, 1);
    }
    let log = cli_support::read_log(&client, &nodes[2].url, stream).await;
    assert_eq!(
        log.len(),
        expected.len() + 1,
        "the log holds every event and the end"
    );
}

/// A watcher's node is killed (SIGKILL) while events are appended on
/// another node; the watcher resumes on a third node with Last-Event-ID and
/// gets every event exactly once, then the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_resumes_on_another_node_after_sigkill() {
    let db = TestDb::create().await;
    let mut nodes = nodes(&db.url, 3, &[]);
    let client = reqwest::Client::new();
    let stream = "killed";
    let producer_url = nodes[1].url.clone();
    create(&client, &producer_url, stream).await;

    let mut w = Watcher::new(stream);
    let mut sse = w.open(&client, &nodes[0].url).await.expect("watch node 1");
    attached(&nodes[0].url, stream).await;

    // One event at a time on node 2 until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let producer = {
        let (client, stop) = (client.clone(), stop.clone());
        tokio::spawn(async move {
            let mut sent = Vec::new();
            for i in 0..20_000u64 {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let data = format!("e{i}");
                assert_eq!(
                    sse::append(&client, &producer_url, stream, &data).await,
                    i + 1
                );
                sent.push(data);
            }
            sent
        })
    };

    assert_eq!(
        w.read(&mut sse, Some(20)).await,
        None,
        "20 events on node 1"
    );
    nodes[0].kill();
    let close = w.read(&mut sse, None).await;
    assert!(
        matches!(close, Some(Close::Cut(_))),
        "node 1's response was cut: {close:?}"
    );
    drop(sse);
    let seen_on_node_1 = w.events.len();
    // The producer goes on after the death: at least 50 more events.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let meta: serde_json::Value = client
            .get(format!("{}/v1/streams/{stream}", nodes[1].url))
            .send()
            .await
            .expect("meta")
            .json()
            .await
            .expect("meta JSON");
        if meta["events"].as_u64().unwrap_or(0) >= seen_on_node_1 as u64 + 50 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the producer stalled"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::SeqCst);
    let sent = producer.await.expect("producer");
    sse::complete(&client, std::slice::from_ref(&nodes[1].url), stream, 10).await;

    // Resume on node 3 from the last id node 1 delivered.
    let mut sse = w.open(&client, &nodes[2].url).await.expect("watch node 3");
    assert_eq!(w.read(&mut sse, None).await, Some(Close::End));
    assert!(seen_on_node_1 < sent.len(), "node 1 died mid-stream");
    w.assert_exactly_once(&sent);
    assert_eq!(w.connections, 2);
}

/// Every listener connection of the database is terminated
/// (pg_terminate_backend) and new connections are refused while events are
/// appended on node 2, so node 1 gets no notification of them: once its
/// listener is back, node 1 re-syncs the watched stream from the store and
/// its watcher, on the same response, still gets everything exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminated_listener_loses_no_event() {
    let db = TestDb::create().await;
    let nodes = nodes(&db.url, 2, &["--heartbeat", "1s"]);
    let client = reqwest::Client::new();
    let stream = "listener";
    create(&client, &nodes[1].url, stream).await;
    let mut expected = Vec::new();
    let mut append = |data: String| {
        expected.push(data.clone());
        let (client, url) = (client.clone(), nodes[1].url.clone());
        async move { sse::append(&client, &url, stream, &data).await }
    };

    let mut w = Watcher::new(stream);
    let mut sse = w.open(&client, &nodes[0].url).await.expect("watch node 1");
    attached(&nodes[0].url, stream).await;
    db.wait_for_listeners(2, Duration::from_secs(30)).await;
    for i in 0..10 {
        append(format!("before-{i}")).await;
    }
    assert_eq!(
        w.read(&mut sse, Some(10)).await,
        None,
        "live through NOTIFY"
    );

    // Cut the listeners and keep them out while appending.
    eprintln!("cutting the listeners");
    db.allow_connections(false).await;
    let terminated = db.terminate_listeners().await;
    assert_eq!(terminated, 2, "one listener connection per node");
    db.wait_for_listeners(0, Duration::from_secs(30)).await;
    eprintln!("appending while no listener is connected");
    for i in 0..10 {
        append(format!("during-{i}")).await;
    }
    assert_eq!(db.listeners().await, 0, "no listener saw those appends");
    db.allow_connections(true).await;
    eprintln!("listeners may connect again");
    db.wait_for_listeners(2, Duration::from_secs(30)).await;
    eprintln!("listeners are back");
    // No further append: only the re-sync can bring these.
    assert_eq!(
        w.read(&mut sse, Some(20)).await,
        None,
        "events appended while the listener was away"
    );

    for i in 0..10 {
        append(format!("after-{i}")).await;
    }
    sse::complete(&client, std::slice::from_ref(&nodes[1].url), stream, 10).await;
    assert_eq!(w.read(&mut sse, None).await, Some(Close::End));
    w.assert_exactly_once(&expected);
    assert_eq!(w.connections, 1, "one response carried everything");
}

/// PostgreSQL becomes unreachable for 10 s (the TCP proxy in front of it
/// closes every connection and refuses new ones): appends answer 503
/// `store_unavailable`, a watcher that needs the store gets a retryable
/// `store_unavailable`. When it is back, every watcher (resuming with its
/// Last-Event-ID where it was closed) gets every event once, in order, and
/// the log has each acknowledged event once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_outage_answers_503_then_resumes_with_no_gap() {
    const BEFORE: usize = 20;
    const TOTAL: usize = 60;
    let db = TestDb::create().await;
    let proxy = CutProxy::start(pg::addr()).await;
    let nodes = nodes(
        &db.url_via(proxy.addr),
        2,
        &["--heartbeat", "1s", "--store-retry-limit", "2s"],
    );
    let urls: Vec<String> = nodes.iter().map(|n| n.url.clone()).collect();
    let client = reqwest::Client::new();
    let stream = "outage";
    let expected: Vec<String> = (0..TOTAL).map(|i| format!("e{i}")).collect();
    create(&client, &urls[1], stream).await;

    // A watcher on each node, attached before the first append, following
    // its own node through errors and cuts.
    let mut followers = Vec::new();
    for url in &urls {
        let mut w = Watcher::new(stream);
        let mut sse = w.open(&client, url).await.expect("watch");
        attached(url, stream).await;
        let (client, url) = (client.clone(), url.clone());
        followers.push(tokio::spawn(async move {
            if w.read(&mut sse, None).await != Some(Close::End) {
                drop(sse);
                w.follow(&client, &[url], Duration::from_millis(200), 200)
                    .await;
            }
            w
        }));
    }

    let mut epoch = String::new();
    for i in 0..BEFORE {
        let (id, refusals) = append_e(&client, &urls[0], i).await;
        assert_eq!(sse::seq(&id), i as u64 + 1);
        assert!(refusals.is_empty(), "{refusals:?}");
        epoch = id.split('-').next().unwrap().to_owned();
    }

    proxy.cut();
    let cut_at = tokio::time::Instant::now();
    // During the outage: the next append is refused with 503
    // store_unavailable (on either node; tried with the key it will be
    // retried with later)...
    let mut refused = Vec::new();
    for url in urls.iter().chain(&urls) {
        let res = client
            .post(format!("{url}/v1/streams/{stream}/events"))
            .header("content-type", "application/json")
            .header("idempotency-key", format!("k{BEFORE}"))
            .timeout(sse::FRAME)
            .body(serde_json::json!({ "data": format!("e{BEFORE}") }).to_string())
            .send()
            .await
            .expect("append during the outage");
        let status = res.status().as_u16();
        let v: serde_json::Value = res.json().await.unwrap_or_default();
        refused.push((status, v["error"]["code"].clone()));
    }
    assert!(
        refused
            .iter()
            .all(|(s, c)| *s == 503 && c == "store_unavailable"),
        "appends during the outage: {refused:?}"
    );
    // Neither node is ready without its store.
    for url in &urls {
        let res = client
            .get(format!("{url}/readyz"))
            .send()
            .await
            .expect("readyz");
        assert_eq!(res.status(), 503, "{url}/readyz during the outage");
    }
    // ...and a watcher that needs the store (resuming after seq 5, on node
    // 2) gets a retryable store_unavailable. It already had seqs 1..=5.
    let mut late = Watcher::new(stream);
    late.last_id = Some(format!("{epoch}-5"));
    late.events = (1..=5).map(|s| (s, format!("e{}", s - 1))).collect();
    let close = match late.open(&client, &urls[1]).await {
        Ok(mut sse) => late.read(&mut sse, None).await,
        Err(close) => Some(close),
    };
    match &close {
        Some(Close::Error(v)) => {
            let code = v["code"].as_str().or(v["error"]["code"].as_str());
            assert_eq!(code, Some("store_unavailable"), "{v}");
            assert!(v["retryable"] == true || v["status"] == 503, "{v}");
        }
        other => panic!("a watcher needing the store during the outage: {other:?}"),
    }
    tokio::time::sleep_until(cut_at + Duration::from_secs(10)).await;
    proxy.restore();

    // The producer goes on where it was refused, each append retried with
    // its key until it is taken; any refusal meanwhile is a 503.
    for i in BEFORE..TOTAL {
        let (id, refusals) = append_e(&client, &urls[0], i).await;
        assert_eq!(sse::seq(&id), i as u64 + 1, "e{i}");
        assert!(
            refusals
                .iter()
                .all(|(s, c)| *s == 503 && c == "store_unavailable"),
            "refusals after the outage: {refusals:?}"
        );
    }
    sse::complete(&client, &urls, stream, 50).await;

    late.follow(&client, &urls[1..], Duration::from_millis(200), 200)
        .await;
    late.assert_exactly_once(&expected);
    for (i, f) in followers.into_iter().enumerate() {
        let w = f.await.expect("follower");
        w.assert_exactly_once(&expected);
        for e in &w.errors {
            assert!(
                e["retryable"] == true || e["status"] == 503,
                "node {i}'s watcher got a non-retryable error: {e}"
            );
        }
    }
    let log = cli_support::read_log(&client, &urls[1], stream).await;
    let data: Vec<&str> = log.iter().filter_map(|e| e["data"].as_str()).collect();
    assert_eq!(
        data.len(),
        TOTAL + 1,
        "each event once in the log, and the end"
    );
    assert_eq!(
        &data[..TOTAL],
        expected.iter().map(String::as_str).collect::<Vec<_>>()
    );
    assert!(
        proxy.refused() > 0,
        "the nodes tried to reconnect during the outage"
    );
}

/// Appends `e{i}` with the Idempotency-Key `k{i}` to the node at `url`,
/// retrying until it is taken (bounded); returns its id and the refusals.
async fn append_e(client: &reqwest::Client, url: &str, i: usize) -> (String, Vec<(u16, String)>) {
    sse::append_with_key(
        client,
        &[url.to_owned()],
        "outage",
        &format!("k{i}"),
        &format!("e{i}"),
        400,
        Duration::from_millis(100),
    )
    .await
}

/// The silent blackhole: PostgreSQL stops answering node 1 without closing
/// anything (the proxy in front of it keeps node 1's connections open and
/// drops every byte both ways; new connections pass). Node 1's listener
/// notices at its next check (`--listener-ping 1s`, unanswered for 5 s),
/// reconnects and re-syncs, its reads on the dead connections give up
/// after `--pg-query-timeout` (those connections are discarded), and its
/// watcher, on the same response, gets every event appended on node 2
/// exactly once, with no error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silently_blackholed_postgres_link_is_noticed_and_loses_no_event() {
    let db = TestDb::create().await;
    let proxy = CutProxy::start(pg::addr()).await;
    let quick = ["--listener-ping", "1s", "--pg-query-timeout", "2s"];
    let via = Server::start_with(&db.url_via(proxy.addr), 0, &quick).expect("node 1");
    let direct = Server::start_with(&db.url, 0, &quick).expect("node 2");
    let client = reqwest::Client::new();
    let stream = "blackhole";
    create(&client, &direct.url, stream).await;
    let mut expected = Vec::new();
    let mut append = |data: String| {
        expected.push(data.clone());
        let (client, url) = (client.clone(), direct.url.clone());
        async move { sse::append(&client, &url, stream, &data).await }
    };

    let mut w = Watcher::new(stream);
    let mut sse = w.open(&client, &via.url).await.expect("watch node 1");
    attached(&via.url, stream).await;
    db.wait_for_listeners(2, Duration::from_secs(30)).await;
    for i in 0..10 {
        append(format!("before-{i}")).await;
    }
    assert_eq!(
        w.read(&mut sse, Some(10)).await,
        None,
        "live through NOTIFY"
    );

    eprintln!("blackholing node 1's connections");
    proxy.blackhole();
    for i in 0..10 {
        append(format!("during-{i}")).await;
    }
    // No further append: only the listener noticing and re-syncing brings these.
    assert_eq!(
        w.read(&mut sse, Some(20)).await,
        None,
        "events appended after the link went silent\n{}",
        via.log_tail()
    );
    for i in 0..10 {
        append(format!("after-{i}")).await;
    }
    sse::complete(&client, std::slice::from_ref(&direct.url), stream, 10).await;
    assert_eq!(w.read(&mut sse, None).await, Some(Close::End));
    w.assert_exactly_once(&expected);
    assert!(w.errors.is_empty(), "{:?}", w.errors);
    assert_eq!(w.connections, 1, "one response carried everything");
    assert!(
        via.log_tail().contains("does not answer"),
        "node 1's listener noticed the silent link\n{}",
        via.log_tail()
    );
}
