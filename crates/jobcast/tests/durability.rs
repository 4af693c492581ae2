//! Guarantee 1: an append is acknowledged only once committed, so a
//! `kill -9` of the server loses no acknowledged event.

mod cli_support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use cli_support::Server;

/// (stream, first seq, last seq, data prefix) of an acknowledged append.
type Ack = (String, u64, u64, String);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loses_no_acknowledged_event() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("d.db").display());
    // Killed on drop, so a failing assertion leaves no server behind.
    let mut server = Server::start_on(&db, 0).expect("start jobcast");
    let url = server.url.clone();
    let client = reqwest::Client::new();
    let acked: Arc<Mutex<Vec<Ack>>> = Arc::default();
    let mut producers = Vec::new();
    for p in 0..8 {
        let (client, url, acked) = (client.clone(), url.clone(), acked.clone());
        producers.push(tokio::spawn(async move {
            let stream = format!("job-{}", p % 4);
            for i in 0..100_000u64 {
                let tag = format!("p{p}-i{i}");
                let body: Vec<_> = (0..(1 + i % 10))
                    .map(|k| serde_json::json!({ "data": format!("{tag}-k{k}") }))
                    .collect();
                let res = client
                    .post(format!("{url}/v1/streams/{stream}/events"))
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
                let seq = |k: &str| {
                    v[k].as_str()
                        .unwrap()
                        .rsplit('-')
                        .next()
                        .unwrap()
                        .parse::<u64>()
                        .unwrap()
                };
                acked
                    .lock()
                    .unwrap()
                    .push((stream.clone(), seq("first_id"), seq("last_id"), tag));
            }
        }));
    }
    // Let appends flow, then kill -9 in the middle of them.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    server.kill();
    for p in producers {
        p.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() > 50,
        "too few appends were acknowledged: {}",
        acked.len()
    );

    let server = Server::start_on(&db, 0).expect("restart jobcast");
    let url = server.url.clone();
    let mut logs = std::collections::HashMap::new();
    for s in 0..4 {
        let stream = format!("job-{s}");
        let all = cli_support::read_log(&client, &url, &stream).await;
        for (i, e) in all.iter().enumerate() {
            assert_eq!(e["seq"].as_u64().unwrap(), i as u64 + 1, "seqs are dense");
        }
        logs.insert(stream, all);
    }
    for (stream, first, last, tag) in &acked {
        let log = &logs[stream];
        for (k, seq) in (*first..=*last).enumerate() {
            let e = log
                .get(seq as usize - 1)
                .unwrap_or_else(|| panic!("{stream} lost acknowledged seq {seq}"));
            assert_eq!(e["data"], format!("{tag}-k{k}"), "{stream} seq {seq}");
        }
    }
    drop(server);
}
