//! The store conformance suite: what every backend of `Store` must do, run
//! against the `Store` API itself (no HTTP), on SQLite and on PostgreSQL
//! (each test in its own database on the server named by `JOBCAST_TEST_PG`,
//! default `postgres://postgres@127.0.0.1:5432`).

mod pg;

use std::sync::Arc;

use jobcast_protocol::StreamState;
use jobcast_server::hub::Hub;
use jobcast_server::metrics::Metrics;
use jobcast_server::store::{
    IdempotencyKey, NewEvent, Refusal, Store, WriteOp, WriteOutcome, WriteRequest,
};
use jobcast_server::Config;

/// A store under test, with what holds its data (dropped after the store).
struct Backend {
    store: Store,
    _dir: tempfile::TempDir,
    _db: Option<pg::Database>,
}

/// Every backend the suite runs against, configured by `f`.
async fn backends(f: impl Fn(&mut Config)) -> Vec<Backend> {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config {
        db: format!("sqlite://{}", dir.path().join("c.db").display()),
        ..Config::default()
    };
    f(&mut config);
    let sqlite = Store::open(&config, Hub::new(1 << 20), Metrics::new())
        .await
        .unwrap();
    let db = pg::Database::create().await;
    config.db = db.url();
    let postgres = Store::open(&config, Hub::new(1 << 20), Metrics::new())
        .await
        .unwrap();
    vec![
        Backend {
            store: sqlite,
            _dir: dir,
            _db: None,
        },
        Backend {
            store: postgres,
            _dir: tempfile::tempdir().unwrap(),
            _db: Some(db),
        },
    ]
}

fn events(n: usize, tag: &str) -> WriteOp {
    WriteOp::Append(
        (0..n)
            .map(|i| NewEvent {
                event_type: "message".into(),
                data: format!("{tag}-{i}"),
            })
            .collect(),
    )
}

async fn write(store: &Store, stream: &str, op: WriteOp, key: Option<&str>) -> WriteOutcome {
    let idempotency = key.map(|k| IdempotencyKey {
        key: k.into(),
        hash: [k.len() as u8; 32],
    });
    store
        .write(WriteRequest {
            stream: stream.into(),
            op,
            idempotency,
        })
        .await
        .unwrap()
}

/// Ends a stream as `completed`.
fn completed() -> WriteOp {
    WriteOp::End {
        state: StreamState::Completed,
        data: r#"{"state":"completed"}"#.into(),
    }
}

/// The ids `list` answers (newest first), optionally in one state.
async fn list_ids(store: &Store, state: Option<StreamState>) -> Vec<String> {
    let q = jobcast_server::store::ListQuery {
        state,
        limit: 10,
        ..Default::default()
    };
    store
        .list(&q)
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.id)
        .collect()
}

async fn all_events(store: &Store, stream: &str) -> Vec<(u64, String, String)> {
    let mut out = Vec::new();
    let mut after = 0;
    loop {
        let page = store.read(stream, after, 100).await.unwrap().unwrap();
        if page.events.is_empty() {
            return out;
        }
        for e in page.events {
            after = e.seq;
            out.push((e.seq, e.event_type, e.data));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seqs_are_dense_and_batches_contiguous_under_concurrency() {
    for b in backends(|_| {}).await {
        let store = Arc::new(b.store.clone());
        let mut tasks = Vec::new();
        for p in 0..8 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                let mut ranges = Vec::new();
                for i in 0..25 {
                    match write(&store, "c", events(1 + (i % 4), &format!("p{p}i{i}")), None).await
                    {
                        WriteOutcome::Appended {
                            first_seq,
                            last_seq,
                            ..
                        } => ranges.push((first_seq, last_seq, format!("p{p}i{i}"))),
                        other => panic!("{other:?}"),
                    }
                }
                ranges
            }));
        }
        let mut ranges = Vec::new();
        for t in tasks {
            ranges.extend(t.await.unwrap());
        }
        let log = all_events(&store, "c").await;
        assert_eq!(
            log.iter().map(|e| e.0).collect::<Vec<_>>(),
            (1..=log.len() as u64).collect::<Vec<_>>(),
            "dense, no duplicates"
        );
        // Each batch occupies exactly its acknowledged range, in order.
        for (first, last, tag) in ranges {
            for (k, seq) in (first..=last).enumerate() {
                assert_eq!(log[seq as usize - 1].2, format!("{tag}-{k}"));
            }
        }
        let meta = store.meta("c").await.unwrap().unwrap();
        assert_eq!(meta.head, log.len() as u64);
    }
}

#[tokio::test]
async fn the_end_is_an_event_written_with_the_state_change() {
    for b in backends(|_| {}).await {
        let s = &b.store;
        write(s, "e", events(3, "x"), None).await;
        let end = WriteOp::End {
            state: StreamState::Failed,
            data: r#"{"state":"failed","error":"boom"}"#.into(),
        };
        let WriteOutcome::Ended { meta } = write(s, "e", end.clone(), None).await else {
            panic!("not ended")
        };
        assert_eq!((meta.state, meta.head), (StreamState::Failed, 4));
        let page = s.read("e", 0, 100).await.unwrap().unwrap();
        assert_eq!(page.meta.state, StreamState::Failed);
        let last = page.events.last().unwrap();
        assert_eq!((last.seq, last.event_type.as_str()), (4, "jobcast.end"));
        assert!(matches!(
            write(s, "e", events(1, "late"), None).await,
            WriteOutcome::Refused(Refusal::StreamEnded)
        ));
        assert!(matches!(
            write(s, "e", end, None).await,
            WriteOutcome::Refused(Refusal::StreamEnded)
        ));
        assert_eq!(all_events(s, "e").await.len(), 4, "refusals wrote nothing");
    }
}

#[tokio::test]
async fn idempotency_keys_replay_and_refuse_reuse() {
    for b in backends(|_| {}).await {
        let s = &b.store;
        let first = write(s, "i", events(2, "a"), Some("k1")).await;
        assert!(matches!(
            first,
            WriteOutcome::Appended {
                first_seq: 1,
                last_seq: 2,
                ..
            }
        ));
        match write(s, "i", events(2, "a"), Some("k1")).await {
            WriteOutcome::Replayed { status, body } => {
                assert_eq!(status, 201);
                assert!(body.contains("\"count\":2"), "{body}");
            }
            other => panic!("{other:?}"),
        }
        // Same key, another request (another hash): refused.
        assert!(matches!(
            write(s, "i", events(1, "b"), Some("k1-other")).await,
            WriteOutcome::Appended { .. }
        ));
        let reused = s
            .write(WriteRequest {
                stream: "i".into(),
                op: events(1, "c"),
                idempotency: Some(IdempotencyKey {
                    key: "k1".into(),
                    hash: [9; 32],
                }),
            })
            .await
            .unwrap();
        assert!(matches!(
            reused,
            WriteOutcome::Refused(Refusal::IdempotencyKeyReused)
        ));
        assert_eq!(all_events(s, "i").await.len(), 3);
    }
}

#[tokio::test]
async fn delete_frees_the_id_and_a_new_creation_starts_over() {
    for b in backends(|_| {}).await {
        let s = &b.store;
        write(s, "d", events(5, "old"), None).await;
        let old = s.meta("d").await.unwrap().unwrap();
        assert!(matches!(
            write(s, "d", WriteOp::Delete, None).await,
            WriteOutcome::Deleted
        ));
        assert!(s.meta("d").await.unwrap().is_none());
        assert!(matches!(
            write(s, "d", WriteOp::Delete, None).await,
            WriteOutcome::Refused(Refusal::NotFound)
        ));
        let WriteOutcome::Created { meta, created } = write(s, "d", WriteOp::Create, None).await
        else {
            panic!("not created")
        };
        assert!(created);
        assert_ne!(meta.key, old.key, "keys are never reused");
        assert_ne!(meta.epoch, old.epoch);
        write(s, "d", events(1, "new"), None).await;
        let log = all_events(s, "d").await;
        assert_eq!(
            log,
            vec![(1, "message".into(), "new-0".into())],
            "no old event leaks"
        );
    }
}

#[tokio::test]
async fn trimming_keeps_the_newest_and_says_where_history_starts() {
    for b in backends(|c| c.max_events_per_stream = Some(3)).await {
        let s = &b.store;
        for i in 0..4 {
            write(s, "t", events(2, &format!("b{i}")), None).await;
        }
        let page = s.read("t", 0, 100).await.unwrap().unwrap();
        assert_eq!((page.meta.head, page.meta.first_seq), (8, 6));
        assert_eq!(
            page.events.iter().map(|e| e.seq).collect::<Vec<_>>(),
            vec![6, 7, 8]
        );
    }
}

#[tokio::test]
async fn list_is_newest_first_and_filters_by_state() {
    for b in backends(|_| {}).await {
        let s = &b.store;
        for id in ["l1", "l2", "l3"] {
            write(s, id, WriteOp::Create, None).await;
        }
        let end = completed();
        write(s, "l2", end, None).await;
        assert_eq!(list_ids(s, None).await, ["l3", "l2", "l1"]);
        assert_eq!(list_ids(s, Some(StreamState::Completed)).await, ["l2"]);
    }
}

#[tokio::test]
async fn retention_deletes_ended_streams_past_their_ttl() {
    for b in backends(|c| {
        c.retention_ttl = std::time::Duration::from_millis(1);
        c.retention_interval = std::time::Duration::from_millis(20);
    })
    .await
    {
        let s = &b.store;
        write(s, "kept-open", events(2, "o"), None).await;
        write(s, "ended", events(2, "e"), None).await;
        let end = completed();
        write(s, "ended", end, None).await;
        let mut gone = false;
        for _ in 0..500 {
            if s.meta("ended").await.unwrap().is_none() {
                gone = true;
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert!(gone, "the ended stream outlived its retention");
        assert!(
            s.meta("kept-open").await.unwrap().is_some(),
            "open streams are kept"
        );
        assert_eq!(all_events(s, "kept-open").await.len(), 2);
    }
}

#[tokio::test]
async fn any_utf8_data_round_trips() {
    for b in backends(|_| {}).await {
        let s = &b.store;
        let data = "nul \u{0} crlf \r\n emoji \u{1F600} quote \"";
        let op = WriteOp::Append(vec![NewEvent {
            event_type: "t.1:x-y".into(),
            data: data.into(),
        }]);
        write(s, "u", op, None).await;
        assert_eq!(
            all_events(s, "u").await,
            vec![(1, "t.1:x-y".to_string(), data.to_string())]
        );
    }
}
