//! Guarantees 5–7 against a real server on real sockets: producers never
//! wait for watchers, a watcher that falls behind the ring is served from the
//! store and loses nothing, every connection ends by itself (write timeout,
//! maximum duration, a client that went away), nothing is left behind after
//! churn, and `/metrics` tells the truth.
//!
//! No timing is asserted; every wait has a generous deadline and panics with
//! what it was waiting for.

mod common;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{seq_of, TestServer, T};
use jobcast_protocol::decode::Frame;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

// ---------------------------------------------------------------- helpers

/// Polls `check` every 20 ms until it answers `Ok`, or panics after `within`
/// with `what` and the last answer.
async fn eventually<F, Fut>(what: &str, within: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    let deadline = Instant::now() + within;
    loop {
        let last = match check().await {
            Ok(()) => return,
            Err(e) => e,
        };
        if Instant::now() >= deadline {
            panic!("{what}: still not true after {within:?}; last seen: {last}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// GET /metrics parsed with a real Prometheus text parser.
///
/// The server speaks OpenMetrics (`# EOF`, counters declared without their
/// `_total` suffix in `# TYPE`). prometheus-parse ignores the `# EOF` line and
/// reads `*_total` samples as untyped (their `# TYPE` names the family without
/// the suffix), so no pre-filtering is needed; [`value`] accepts any sample type.
async fn scrape(s: &TestServer) -> prometheus_parse::Scrape {
    let res = s
        .client
        .get(s.url("/metrics"))
        .send()
        .await
        .expect("GET /metrics");
    assert_eq!(res.status(), 200, "GET /metrics");
    let text = res.text().await.expect("metrics body");
    let lines: Vec<std::io::Result<String>> = text.lines().map(|l| Ok(l.to_owned())).collect();
    prometheus_parse::Scrape::parse(lines.into_iter()).expect("metrics parse")
}

/// The sum of the samples named `name` whose labels include `labels`
/// (0 when there is none: a labelled counter appears on first use).
fn value(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match &s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => *v,
            other => panic!("{name} is not a scalar: {other:?}"),
        })
        .fold(0.0, |a, b| a + b)
}

/// Whether `/metrics` declares `name` and it is a gauge.
fn is_gauge(scrape: &prometheus_parse::Scrape, name: &str) -> bool {
    scrape
        .samples
        .iter()
        .any(|s| s.metric == name && matches!(s.value, prometheus_parse::Value::Gauge(_)))
}

/// The server's socket address.
fn addr(s: &TestServer) -> SocketAddr {
    s.url
        .trim_start_matches("http://")
        .parse()
        .expect("server address")
}

/// Creates `stream` (open, empty).
async fn create(s: &TestServer, stream: &str) {
    let res = s
        .client
        .put(s.url(&format!("/v1/streams/{stream}")))
        .send()
        .await
        .expect("PUT stream");
    assert!(
        res.status() == 201 || res.status() == 200,
        "PUT {stream}: {}",
        res.status()
    );
}

/// A raw HTTP/1.1 SSE request for `stream`.
fn sse_request(stream: &str) -> Vec<u8> {
    format!(
        "GET /v1/streams/{stream}/events HTTP/1.1\r\nHost: 127.0.0.1\r\n\
         Accept: text/event-stream\r\n\r\n"
    )
    .into_bytes()
}

/// Event data of about 200 bytes whose prefix names its seq.
fn data_for(seq: u64) -> String {
    format!("{seq:06}-{}", "x".repeat(193))
}

/// The fixed-seed xorshift64* generator: the churn is the same on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform-ish in 0..n.
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

// ------------------------------------------------------ a. stalled watcher

const FANOUT_EVENTS: u64 = 10_000;
const FANOUT_READERS: usize = 50;
/// Events of 64 KiB appended before the fan-out.
const PREFILL_EVENTS: u64 = 128;

/// Appends `PREFILL_EVENTS` events of 64 KiB (8 MiB in all): more than the
/// kernel buffers of one loopback connection hold (about 4 MiB of send buffer
/// at most here), so a watcher that never reads stalls for sure.
async fn prefill(s: &TestServer, stream: &str) {
    for b in 0..PREFILL_EVENTS / 16 {
        let batch: Vec<String> = (0..16)
            .map(|k| format!("big-{}-{}", b * 16 + k, "y".repeat(64 << 10)))
            .collect();
        s.append_batch(stream, &batch).await;
    }
}

/// Connects `FANOUT_READERS` harness watchers to `stream` with `?from=live`,
/// starts them reading (each checks every seq after the prefill once, in
/// order, then `jobcast.end`), appends `FANOUT_EVENTS` events of ~200 bytes in
/// batches of 100, completes the stream, and returns how long the producer
/// took. Panics if any reader saw a gap, a repeat, a foreign event or no end.
async fn fanout(s: &Arc<TestServer>, stream: &str) -> Duration {
    const FIRST: u64 = PREFILL_EVENTS + 1;
    const END: u64 = PREFILL_EVENTS + FANOUT_EVENTS + 1;
    let mut readers = Vec::new();
    for r in 0..FANOUT_READERS {
        // `watch` returns once the headers are in: the server subscribed before.
        let mut w = s.watch(stream, "?from=live", None).await;
        assert_eq!(w.status, 200, "reader {r}");
        let stream = stream.to_owned();
        readers.push(tokio::spawn(async move {
            let mut want = FIRST;
            loop {
                let e = w
                    .next_event(Duration::from_secs(20))
                    .await
                    .unwrap_or_else(|| {
                        panic!("{stream} reader {r}: closed before the end (next seq {want})")
                    });
                assert_eq!(seq_of(&e), want, "{stream} reader {r}: out of order");
                if want == END {
                    assert_eq!(e.event, "jobcast.end", "{stream} reader {r}");
                    break;
                }
                assert_eq!(e.event, "message", "{stream} reader {r} seq {want}");
                assert_eq!(e.data, data_for(want), "{stream} reader {r} seq {want}");
                want += 1;
            }
            assert!(
                w.next_event(T).await.is_none(),
                "{stream} reader {r}: the response goes on after jobcast.end"
            );
        }));
    }
    let started = std::time::Instant::now();
    let producer = {
        let s = s.clone();
        let stream = stream.to_owned();
        tokio::spawn(async move {
            for b in 0..FANOUT_EVENTS / 100 {
                let first = FIRST + b * 100;
                let batch: Vec<String> = (first..first + 100).map(data_for).collect();
                s.append_batch(&stream, &batch).await;
            }
            s.complete(&stream).await;
        })
    };
    tokio::time::timeout(Duration::from_secs(30), producer)
        .await
        .unwrap_or_else(|_| panic!("{stream}: the producer did not finish within 30 s"))
        .expect("producer");
    let took = started.elapsed();
    for (r, reader) in readers.into_iter().enumerate() {
        tokio::time::timeout(Duration::from_secs(30), reader)
            .await
            .unwrap_or_else(|_| panic!("{stream} reader {r} did not finish within 30 s"))
            .expect("reader");
    }
    took
}

/// Guarantees 5 and 6: a watcher whose socket accepts nothing (tiny receive
/// buffer, never read) neither stops the producer nor the 50 watchers that
/// read the same stream; the server drops it by the write timeout and frees
/// its state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_watcher_does_not_slow_others_and_is_dropped() {
    let s = Arc::new(
        TestServer::start_with(|c| {
            c.write_timeout = Duration::from_secs(2);
            c.heartbeat = Duration::from_millis(500);
        })
        .await,
    );
    let state = s.server.state().clone();

    // Baseline: the same work without a stalled watcher.
    create(&s, "base").await;
    prefill(&s, "base").await;
    let without = fanout(&s, "base").await;
    eventually("watchers gone after the baseline", T, || {
        let n = state.metrics.watchers();
        async move { (n == 0).then_some(()).ok_or(format!("gauge {n}")) }
    })
    .await;

    // The stalled watcher: a 4 KiB receive buffer, a request, and never a read.
    create(&s, "s").await;
    let sock = tokio::net::TcpSocket::new_v4().expect("socket");
    sock.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    let mut stalled = sock.connect(addr(&s)).await.expect("connect");
    stalled
        .write_all(&sse_request("s"))
        .await
        .expect("write request");
    eventually("the stalled watcher is subscribed", T, || {
        let n = state.hub.watchers_of("s");
        async move { (n == 1).then_some(()).ok_or(format!("{n} watchers of s")) }
    })
    .await;
    // 8 MiB go live to the stalled watcher: its connection stops accepting bytes.
    prefill(&s, "s").await;

    let with = fanout(&s, "s").await;
    eprintln!(
        "stalled watcher: the producer appended {FANOUT_EVENTS} events (~200 B, batches \
         of 100) to {FANOUT_READERS} reading watchers in {without:?} without a stalled \
         watcher, {with:?} with one"
    );

    // The readers are done; only the stalled watcher can be left, and the
    // server must drop it by itself (the client never closes its socket).
    let srv: &TestServer = &s;
    eventually(
        "the stalled watcher is dropped by the write timeout and the stream's state freed",
        Duration::from_secs(20),
        || {
            let (g, w, e) = (
                state.metrics.watchers(),
                state.hub.watchers(),
                state.hub.entries(),
            );
            async move {
                let m = scrape(srv).await;
                let timeouts = value(&m, "jobcast_write_timeouts_total", &[]);
                let gone = value(
                    &m,
                    "jobcast_connections_closed_total",
                    &[("reason", "client_gone")],
                );
                (g == 0 && w == 0 && e == 0 && (timeouts >= 1.0 || gone >= 1.0))
                    .then_some(())
                    .ok_or(format!(
                        "gauge {g}, hub watchers {w}, hub entries {e}, \
                         write_timeouts {timeouts}, closed{{client_gone}} {gone}"
                    ))
            }
        },
    )
    .await;

    // From the client's side: what the kernel had buffered, then the close,
    // and never the end of the stream.
    let mut received = Vec::new();
    let deadline = Instant::now() + T;
    loop {
        let mut buf = vec![0u8; 1 << 16];
        match tokio::time::timeout_at(deadline, stalled.read(&mut buf)).await {
            Err(_) => panic!(
                "the stalled connection is still open after the write timeout \
                 ({} bytes drained)",
                received.len()
            ),
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => received.extend_from_slice(&buf[..n]),
        }
    }
    let text = String::from_utf8_lossy(&received);
    assert!(
        text.starts_with("HTTP/1.1 200"),
        "{}",
        &text[..text.len().min(200)]
    );
    assert!(
        !text.contains("jobcast.end"),
        "the stalled watcher was served to the end instead of being dropped"
    );
    let m = scrape(&s).await;
    eprintln!(
        "stalled watcher: {} bytes reached it before the drop; write_timeouts_total {}, \
         closed{{client_gone}} {}",
        received.len(),
        value(&m, "jobcast_write_timeouts_total", &[]),
        value(
            &m,
            "jobcast_connections_closed_total",
            &[("reason", "client_gone")]
        ),
    );
}

// ---------------------------------------------------- b. slow but reading

/// Guarantee 5: with a tiny ring, a watcher that reads slowly falls out of it,
/// is served from the store, and still gets every event once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_reader_falls_back_to_the_store_and_loses_nothing() {
    const PRODUCERS: u64 = 4;
    const BATCH: u64 = 25;
    const N: u64 = 5_000;
    let s = Arc::new(TestServer::start_with(|c| c.ring_bytes = 4096).await);
    create(&s, "slow").await;
    let mut w = s.watch("slow", "", None).await;
    assert_eq!(w.status, 200);
    // Four producers at full speed: the writer commits their batches in
    // groups and publishes them back to back. Each batch of 25 (~6 KiB
    // encoded) is more than the whole ring, which then keeps only the newest.
    let mut producers = Vec::new();
    for p in 0..PRODUCERS {
        let s = s.clone();
        producers.push(tokio::spawn(async move {
            for b in 0..N / PRODUCERS / BATCH {
                let batch: Vec<String> = (0..BATCH)
                    .map(|k| format!("p{p}-{:05}-{}", b * BATCH + k, "x".repeat(190)))
                    .collect();
                s.append_batch("slow", &batch).await;
            }
        }));
    }
    let completer = {
        let s = s.clone();
        tokio::spawn(async move {
            for p in producers {
                p.await.expect("producer");
            }
            s.complete("slow").await;
        })
    };
    // Each producer's events arrive in its order, each once.
    let mut next_of = [0u64; PRODUCERS as usize];
    let mut want = 1u64;
    loop {
        let e = w
            .next_event(Duration::from_secs(20))
            .await
            .unwrap_or_else(|| panic!("closed before the end (next seq {want})"));
        assert_eq!(seq_of(&e), want, "out of order");
        if want == N + 1 {
            assert_eq!(e.event, "jobcast.end");
            break;
        }
        let (p, i) = e.data[1..]
            .split_once('-')
            .and_then(|(p, rest)| {
                Some((
                    p.parse::<usize>().ok()?,
                    rest.get(..5)?.parse::<u64>().ok()?,
                ))
            })
            .unwrap_or_else(|| panic!("seq {want}: foreign data {:?}", e.data));
        assert_eq!(
            i, next_of[p],
            "seq {want}: producer {p}'s events out of order"
        );
        next_of[p] += 1;
        if want % 50 == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        want += 1;
    }
    assert!(w.next_event(T).await.is_none(), "goes on after the end");
    assert_eq!(next_of, [N / PRODUCERS; PRODUCERS as usize]);
    tokio::time::timeout(Duration::from_secs(30), completer)
        .await
        .expect("producers finished")
        .expect("producers");
    let m = scrape(&s).await;
    let fallbacks = value(&m, "jobcast_slow_watcher_fallbacks_total", &[]);
    let replayed = value(&m, "jobcast_events_replayed_from_store_total", &[]);
    eprintln!("slow reader: slow_watcher_fallbacks {fallbacks}, replayed_from_store {replayed}");
    assert!(
        fallbacks > 0.0,
        "the slow watcher never fell back to the store (ring 4096 bytes)"
    );
}

// --------------------------------------------------------------- c. churn

/// What one churn watcher does.
#[derive(Debug, Clone, Copy)]
enum Churn {
    /// Give up on the request itself after this many microseconds.
    Abort(u64),
    /// Read this many frames, then drop the response.
    Read(u64),
}

/// Guarantee 6: 1 000 watchers come and go at random points (mid-replay,
/// while waiting for a stream to exist, while live); afterwards no watcher,
/// no hub entry and no task is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_leaves_nothing_behind() {
    let mut s = TestServer::start_with(|c| c.heartbeat = Duration::from_millis(300)).await;
    // No idle pool: a finished request leaves no connection task behind on
    // either side, so the task count can return to its baseline.
    s.client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .expect("client");
    let s = Arc::new(s);
    let state = s.server.state().clone();

    // "big": 2 000 events, completed; "live": appended to during the churn;
    // "later-*": do not exist (later-0 is created half-way).
    for b in 0..20u64 {
        let batch: Vec<String> = (b * 100 + 1..=b * 100 + 100).map(data_for).collect();
        s.append_batch("big", &batch).await;
    }
    s.complete("big").await;
    create(&s, "live").await;

    let baseline = tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks();

    let stop = Arc::new(AtomicBool::new(false));
    let producer = {
        let (s, stop) = (s.clone(), stop.clone());
        tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) && i < 20_000 {
                let batch: Vec<String> = (0..5).map(|k| format!("live-{i}-{k}")).collect();
                s.append_batch("live", &batch).await;
                i += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };

    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut counts = [0u32; 5];
    for wave in 0..10 {
        if wave == 5 {
            s.append("later-0", "now it exists").await;
        }
        let mut tasks = Vec::new();
        for i in 0..100 {
            let kind = rng.below(5);
            counts[kind as usize] += 1;
            let (stream, query, max_frames) = match kind {
                0 | 1 => ("big".to_owned(), "", 2_100),
                2 => (format!("later-{}", rng.below(3)), "?wait=30", 3),
                3 => ("live".to_owned(), "?from=live", 30),
                _ => ("live".to_owned(), "", 200),
            };
            let what = match rng.below(10) {
                0 => Churn::Abort(rng.below(3_000)),
                1 => Churn::Read(0),
                _ => Churn::Read(rng.below(max_frames + 1)),
            };
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                let name = format!("wave {wave} watcher {i} ({stream}{query}, {what:?})");
                let frames = match what {
                    Churn::Abort(us) => {
                        let _ = tokio::time::timeout(
                            Duration::from_micros(us),
                            s.watch(&stream, query, None),
                        )
                        .await;
                        return;
                    }
                    Churn::Read(n) => n,
                };
                let mut w = s.watch(&stream, query, None).await;
                assert_eq!(w.status, 200, "{name}");
                // Whatever it reads must be in order with no gap.
                let mut last: Option<u64> = None;
                for _ in 0..frames {
                    match w.next_frame(T).await {
                        None => break,
                        Some(Frame::Event(e)) if e.id_set => {
                            let seq = seq_of(&e);
                            if let Some(prev) = last {
                                assert_eq!(seq, prev + 1, "{name}: gap or repeat");
                            } else if query.is_empty() {
                                assert_eq!(seq, 1, "{name}: did not start at 1");
                            }
                            last = Some(seq);
                        }
                        Some(_) => {}
                    }
                }
                drop(w);
            }));
        }
        for t in tasks {
            tokio::time::timeout(Duration::from_secs(20), t)
                .await
                .expect("a churn watcher did not finish within 20 s")
                .expect("churn watcher");
        }
    }
    stop.store(true, Ordering::Relaxed);
    tokio::time::timeout(T, producer)
        .await
        .expect("the live producer stops")
        .expect("producer");
    eprintln!(
        "churn: watchers by kind [big, big, later, live(from=live), live(start)] = {counts:?}, \
         tasks at baseline {baseline}"
    );

    eventually("churn leaves no watcher, entry or task", T, || {
        let (g, w, e) = (
            state.metrics.watchers(),
            state.hub.watchers(),
            state.hub.entries(),
        );
        let tasks = tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks();
        async move {
            // Tasks that end by themselves (e.g. a store pool's idle reaper)
            // can only lower the count; a leak raises it.
            (g == 0 && w == 0 && e == 0 && tasks <= baseline)
                .then_some(())
                .ok_or(format!(
                    "gauge {g}, hub watchers {w}, hub entries {e}, \
                     alive tasks {tasks} (baseline {baseline})"
                ))
        }
    })
    .await;
    let m = scrape(&s).await;
    let opened = value(&m, "jobcast_connections_opened_total", &[]);
    let closed = value(&m, "jobcast_connections_closed_total", &[]);
    assert_eq!(opened, closed, "every opened watch connection was closed");
    eprintln!("churn: connections opened {opened}, closed {closed}");
}

// ------------------------------------------------------------- d. metrics

/// `/metrics` parses, the watchers gauge follows connections, and the
/// appended counter counts appended events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_and_track_watchers_and_appends() {
    let s = TestServer::start_with(|c| c.heartbeat = Duration::from_millis(200)).await;
    let m = scrape(&s).await;
    assert!(
        is_gauge(&m, "jobcast_watchers"),
        "jobcast_watchers is not a gauge: {:?}",
        m.samples
    );
    assert_eq!(value(&m, "jobcast_watchers", &[]), 0.0);
    assert_eq!(value(&m, "jobcast_events_appended_total", &[]), 0.0);

    for i in 0..3 {
        s.append("m", &format!("one {i}")).await;
    }
    s.append_batch("m", &(0..4).map(|i| format!("b{i}")).collect::<Vec<_>>())
        .await;

    let mut watchers = Vec::new();
    for _ in 0..3 {
        let w = s.watch("m", "", None).await;
        assert_eq!(w.status, 200);
        watchers.push(w);
    }
    let s = &s;
    eventually("jobcast_watchers reads 3", T, || async move {
        let v = value(&scrape(s).await, "jobcast_watchers", &[]);
        (v == 3.0).then_some(()).ok_or(format!("{v}"))
    })
    .await;
    drop(watchers);
    eventually("jobcast_watchers reads 0 again", T, || async move {
        let v = value(&scrape(s).await, "jobcast_watchers", &[]);
        (v == 0.0).then_some(()).ok_or(format!("{v}"))
    })
    .await;

    let m = scrape(s).await;
    assert_eq!(value(&m, "jobcast_events_appended_total", &[]), 7.0);
    assert_eq!(value(&m, "jobcast_connections_opened_total", &[]), 3.0);
    assert_eq!(
        value(
            &m,
            "jobcast_connections_closed_total",
            &[("reason", "client_gone")]
        ),
        3.0
    );
    let histograms = m
        .samples
        .iter()
        .filter(|x| x.metric == "jobcast_append_duration_seconds")
        .count();
    assert_eq!(histograms, 1, "the append latency histogram is exposed");
}

/// Every stage of an append is timed in `jobcast_append_stage_seconds`:
/// one sample per committed append for the store side, one per live batch
/// handed to a watcher for `deliver`. Counts only, never durations.
#[tokio::test]
async fn append_stages_are_timed_in_metrics() {
    let s = TestServer::start().await;
    s.append("st", "first").await;
    let mut w = s.watch("st", "", None).await;
    assert_eq!(w.status, 200);
    assert!(w.next_event(T).await.is_some(), "the first event");
    // Live: published to the hub while the watcher holds its cursor.
    s.append("st", "second").await;
    assert!(w.next_event(T).await.is_some(), "the second event");
    let text = s
        .client
        .get(s.url("/metrics"))
        .send()
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("metrics body");
    let count = |stage: &str| -> Option<f64> {
        let prefix = format!("jobcast_append_stage_seconds_count{{stage=\"{stage}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .map(|v| v.trim().parse().expect("a number"))
    };
    for stage in ["parse", "queue", "commit", "publish", "reply"] {
        assert_eq!(count(stage), Some(2.0), "stage {stage}:\n{text}");
    }
    assert!(
        count("deliver").is_some_and(|n| n >= 1.0),
        "stage deliver:\n{text}"
    );
}

// -------------------------------------------------------- e. max duration

/// Guarantee 6 (maximum duration) with guarantee 2: the connection ends by
/// itself, without `jobcast.end`, and resuming with the last id continues
/// with the next event, nothing missed or repeated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_duration_ends_the_response_and_resume_continues() {
    let s = Arc::new(
        TestServer::start_with(|c| {
            c.max_duration = Duration::from_secs(2);
            c.heartbeat = Duration::from_millis(500);
        })
        .await,
    );
    let mut appended = 0u64;
    for _ in 0..5 {
        appended += 1;
        s.append("md", &data_for(appended)).await;
    }
    let mut seen: Vec<u64> = Vec::new();
    let mut last_id: Option<String> = None;
    let mut first = true;
    let mut ended = false;
    for attempt in 0..8 {
        let started = Instant::now();
        let mut w = s.watch("md", "", last_id.as_deref()).await;
        assert_eq!(w.status, 200, "attempt {attempt}");
        if first {
            // Appended while the first connection is open.
            for _ in 0..5 {
                appended += 1;
                s.append("md", &data_for(appended)).await;
            }
        }
        let events = tokio::time::timeout(Duration::from_secs(6), w.collect(T))
            .await
            .unwrap_or_else(|_| {
                panic!("attempt {attempt}: the response did not end by itself within 6 s")
            });
        eprintln!(
            "max duration: attempt {attempt} ended after {:?} with {} events",
            started.elapsed(),
            events.len()
        );
        for e in &events {
            assert!(
                e.event == "message" || e.event == "jobcast.end",
                "attempt {attempt}: unexpected {} {}",
                e.event,
                e.data
            );
            seen.push(seq_of(e));
            last_id = Some(e.last_event_id.clone());
            if e.event == "jobcast.end" {
                ended = true;
            }
        }
        if ended {
            break;
        }
        if first {
            first = false;
            // Appended while nobody is connected.
            for _ in 0..5 {
                appended += 1;
                s.append("md", &data_for(appended)).await;
            }
        } else {
            // Appended between the second and a later reconnect; then the end.
            for _ in 0..5 {
                appended += 1;
                s.append("md", &data_for(appended)).await;
            }
            s.complete("md").await;
        }
    }
    assert!(ended, "never saw jobcast.end; seqs seen: {seen:?}");
    assert_eq!(
        seen,
        (1..=appended + 1).collect::<Vec<_>>(),
        "every seq once, in order, across reconnects"
    );
    let m = scrape(&s).await;
    let by_max = value(
        &m,
        "jobcast_connections_closed_total",
        &[("reason", "max_duration")],
    );
    assert!(
        by_max >= 2.0,
        "two connections ended at the maximum duration, counted {by_max}"
    );
}

// ------------------------------------------- f. heartbeat notices the gone

/// Guarantee 6: a client that closed its socket is noticed by the next
/// heartbeats at the latest, and its state freed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_that_went_away_is_noticed_by_heartbeats() {
    let s = TestServer::start_with(|c| c.heartbeat = Duration::from_millis(300)).await;
    let state = s.server.state().clone();
    create(&s, "hb").await;
    let mut sock = tokio::net::TcpStream::connect(addr(&s))
        .await
        .expect("connect");
    sock.write_all(&sse_request("hb")).await.expect("request");
    let mut got = Vec::new();
    let deadline = Instant::now() + T;
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let mut buf = [0u8; 1024];
        let n = tokio::time::timeout_at(deadline, sock.read(&mut buf))
            .await
            .expect("response headers within 10 s")
            .expect("read");
        assert!(
            n > 0,
            "closed before the headers: {:?}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
    }
    let head = String::from_utf8_lossy(&got);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(state.metrics.watchers(), 1, "the watcher is counted");
    assert_eq!(state.hub.watchers_of("hb"), 1);
    drop(sock);
    eventually("the server noticed the closed client", T, || {
        let (g, w, e) = (
            state.metrics.watchers(),
            state.hub.watchers(),
            state.hub.entries(),
        );
        async move {
            (g == 0 && w == 0 && e == 0)
                .then_some(())
                .ok_or(format!("gauge {g}, hub watchers {w}, hub entries {e}"))
        }
    })
    .await;
    let m = scrape(&s).await;
    assert_eq!(
        value(
            &m,
            "jobcast_connections_closed_total",
            &[("reason", "client_gone")]
        ),
        1.0
    );
}

/// Automatic checkpoints are off on the writer's connection (no commit pays
/// for one); the checkpointer thread copies the WAL into the database file.
#[tokio::test]
async fn the_wal_is_checkpointed_off_the_commit_path() {
    let server = TestServer::start().await;
    let db = server.dir.path().join("jobcast.db");
    let before = std::fs::metadata(&db).unwrap().len();
    let data: Vec<String> = (0..200).map(|i| format!("{i:0>500}")).collect();
    for _ in 0..10 {
        server.append_batch("wal", &data).await;
    }
    // ~1 MB of events: the database file grows only by checkpoints.
    let mut grown = 0;
    for _ in 0..200 {
        grown = std::fs::metadata(&db).unwrap().len();
        if grown > before + 500_000 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    assert!(
        grown > before + 500_000,
        "the database file did not grow ({before} -> {grown}): the WAL is not checkpointed"
    );
}
