//! `?from=tail:N` through the real server, on SQLite and on PostgreSQL (each
//! test in its own database on `JOBCAST_TEST_PG`): the last N events then
//! live, at the edges — N = 0, N beyond the log, after trimming, across the
//! end — on SSE and on the JSON page; never a `jobcast.reset`; bad N is 400.

mod common;
mod pg;

use common::{seq_of, TestServer, T};
use jobcast_server::Config;

/// One server per backend, configured by `f` (the PostgreSQL database is
/// dropped after its server).
async fn servers(f: impl Fn(&mut Config)) -> Vec<(&'static str, TestServer, Option<pg::Database>)> {
    let sqlite = TestServer::start_with(&f).await;
    let db = pg::Database::create().await;
    let mut config = Config {
        db: db.url(),
        ..Config::default()
    };
    f(&mut config);
    let postgres = TestServer::start_in(tempfile::tempdir().unwrap(), config).await;
    vec![("sqlite", sqlite, None), ("postgres", postgres, Some(db))]
}

/// The seqs and types of a JSON page, with its `next` and whether it has a reset.
async fn page(
    s: &TestServer,
    stream: &str,
    query: &str,
) -> (Vec<(u64, String)>, serde_json::Value, bool) {
    let (status, v) = s
        .get_json(&format!("/v1/streams/{stream}/events?{query}"))
        .await;
    assert_eq!(status, 200, "{query}: {v}");
    let events = v["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["seq"].as_u64().unwrap(),
                e["type"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    (events, v["next"].clone(), v.get("reset").is_some())
}

fn seqs(p: &[(u64, String)]) -> Vec<u64> {
    p.iter().map(|e| e.0).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_inside_the_log_beyond_it_and_zero() {
    for (backend, s, _db) in servers(|_| {}).await {
        for i in 1..=10 {
            s.append("t", &format!("e{i}")).await;
        }
        let epoch = s.meta("t").await["epoch"].as_str().unwrap().to_owned();
        // The last 3, then live: the first event's id says where it begins.
        let mut w = s.watch("t", "?from=tail:3", None).await;
        assert_eq!(w.status, 200, "{backend}");
        for want in 8..=10 {
            let e = w.next_event(T).await.unwrap();
            assert_ne!(e.event, "jobcast.reset", "{backend}");
            assert_eq!(seq_of(&e), want, "{backend}");
        }
        s.append("t", "e11").await;
        let e = w.next_event(T).await.unwrap();
        assert_eq!((seq_of(&e), e.data.as_str()), (11, "e11"), "{backend}");
        assert_eq!(e.last_event_id, format!("{epoch}-11"));

        // Longer than the log: from the start, no reset.
        let mut w = s.watch("t", "?from=tail:500", None).await;
        let first = w.next_event(T).await.unwrap();
        assert_eq!(
            (first.event.as_str(), seq_of(&first)),
            ("message", 1),
            "{backend}"
        );

        // N = 0 is live: only what comes next.
        let mut w = s.watch("t", "?from=tail:0", None).await;
        s.append("t", "e12").await;
        assert_eq!(seq_of(&w.next_event(T).await.unwrap()), 12, "{backend}");

        // The JSON page: the same start points, with `next` to go on from.
        let (p, next, reset) = page(&s, "t", "from=tail:2").await;
        assert_eq!((seqs(&p), reset), (vec![11, 12], false), "{backend}");
        assert_eq!(next, format!("{epoch}-12"));
        let (p, _, _) = page(&s, "t", "from=tail:50&limit=5").await;
        assert_eq!(seqs(&p), vec![1, 2, 3, 4, 5], "{backend}");
        let (p, next, _) = page(&s, "t", "from=tail:0").await;
        assert_eq!(
            (seqs(&p), next),
            (vec![], format!("{epoch}-12").into()),
            "{backend}"
        );
        // An explicit position wins over from=.
        let (p, _, _) = page(&s, "t", &format!("after={epoch}-10&from=tail:1")).await;
        assert_eq!(seqs(&p), vec![11, 12], "{backend}");

        // A stream that does not exist yet: everything it will hold is new.
        let mut w = s.watch("later", "?from=tail:5", None).await;
        s.append("later", "first").await;
        assert_eq!(seq_of(&w.next_event(T).await.unwrap()), 1, "{backend}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_after_trimming_starts_at_the_first_kept_event() {
    for (backend, s, _db) in servers(|c| c.max_events_per_stream = Some(5)).await {
        for i in 1..=12 {
            s.append("cap", &format!("e{i}")).await;
        }
        // 8..=12 are kept: tail:3 is inside, tail:5 all of it, tail:9 more.
        for (n, first) in [(3, 10), (5, 8), (9, 8)] {
            let mut w = s.watch("cap", &format!("?from=tail:{n}"), None).await;
            let e = w.next_event(T).await.unwrap();
            assert_eq!(e.event, "message", "{backend} tail:{n}: no reset");
            assert_eq!(seq_of(&e), first, "{backend} tail:{n}");
            let (p, _, reset) = page(&s, "cap", &format!("from=tail:{n}")).await;
            assert_eq!(p.first().map(|e| e.0), Some(first), "{backend} tail:{n}");
            assert!(!reset, "{backend} tail:{n}: a page without reset");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_across_the_end_includes_it_then_closes() {
    for (backend, s, _db) in servers(|_| {}).await {
        for i in 1..=4 {
            s.append("done", &format!("e{i}")).await;
        }
        s.complete("done").await; // jobcast.end is seq 5
        let mut w = s.watch("done", "?from=tail:2", None).await;
        assert_eq!(w.status, 200, "{backend}: never a 204 for a tail");
        let got: Vec<(u64, String)> = w
            .collect(T)
            .await
            .iter()
            .map(|e| (seq_of(e), e.event.clone()))
            .collect();
        assert_eq!(
            got,
            vec![(4, "message".into()), (5, "jobcast.end".into())],
            "{backend}"
        );
        // tail:1 is the end alone; tail:0 (live) too; tail:99 everything.
        for (q, want) in [
            ("tail:1", vec![5]),
            ("tail:0", vec![5]),
            ("tail:99", vec![1, 2, 3, 4, 5]),
        ] {
            let mut w = s.watch("done", &format!("?from={q}"), None).await;
            let got: Vec<u64> = w.collect(T).await.iter().map(seq_of).collect();
            assert_eq!(got, want, "{backend} {q}");
            let (p, next, _) = page(&s, "done", &format!("from={q}")).await;
            assert_eq!(seqs(&p), want, "{backend} page {q}");
            assert_eq!(
                next,
                serde_json::Value::Null,
                "{backend} page {q}: the end was returned"
            );
        }
    }
}

#[tokio::test]
async fn bad_tails_are_400_invalid_from() {
    let s = TestServer::start().await;
    s.append("b", "x").await;
    for bad in [
        "tail:-1",
        "tail:abc",
        "tail:",
        "tail:1.5",
        "tail:%2B1",
        "tail:1000001",
        "tail:18446744073709551616",
        "tail:99999999999999999999999999",
    ] {
        let w = s.watch("b", &format!("?from={bad}"), None).await;
        assert_eq!(w.status, 400, "SSE {bad}");
        let (status, v) = s
            .get_json(&format!("/v1/streams/b/events?from={bad}"))
            .await;
        assert_eq!(status, 400, "page {bad}");
        assert_eq!(v["error"]["code"], "invalid_from", "{bad}: {v}");
    }
}
