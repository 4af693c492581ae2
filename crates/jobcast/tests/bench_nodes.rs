//! `jobcast bench … --db postgres://… --nodes 3`: the bench starts three
//! nodes on a database of its own, spreads the producers over them, reports
//! each node's count and PostgreSQL's settings, and drops the database at
//! the end. A smoke test of the machinery, not a measurement: no timing is
//! checked.

mod cli_support;

use std::process::Command;

use cli_support::pg;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_on_three_postgres_nodes_reports_each_node_and_cleans_up() {
    let dir = tempfile::tempdir().expect("tempdir");
    let json = dir.path().join("ingest.json");
    let out = Command::new(cli_support::bin())
        .args(["bench", "ingest", "--db", &pg::base(), "--nodes", "3"])
        .args(["--producers", "6", "--batch", "1", "--duration", "1s"])
        .args(["--timeout", "30s", "--json"])
        .arg(&json)
        .output()
        .expect("run jobcast bench");
    assert!(
        out.status.success(),
        "bench failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("JSON written")).expect("JSON");
    assert_eq!(doc["nodes"], 3);
    assert_eq!(doc["store"]["kind"], "postgres");
    assert_eq!(doc["store"]["nodes"], 3);
    for s in ["synchronous_commit", "fsync", "wal_sync_method"] {
        assert!(doc["store"]["settings"][s].is_string(), "SHOW {s}: {doc}");
    }
    let per_node = doc["runs"][0]["per_node"].as_array().expect("per_node");
    assert_eq!(per_node.len(), 3);
    // Two producers per node: every node took appends.
    let sum: u64 = per_node
        .iter()
        .map(|n| {
            let e = n["events"].as_u64().expect("events");
            assert!(e > 0, "a node took no appends: {per_node:?}");
            e
        })
        .sum();
    assert_eq!(Some(sum), doc["runs"][0]["events"].as_u64());

    // The bench dropped its database.
    let name = doc["store"]["database"].as_str().expect("database name");
    assert!(name.starts_with("jobcast_bench_"), "{name}");
    let mut admin = pg::admin().await;
    let (left,): (i64,) = sqlx::query_as("SELECT count(*) FROM pg_database WHERE datname = $1")
        .bind(name)
        .fetch_one(&mut admin)
        .await
        .expect("pg_database");
    assert_eq!(left, 0, "database {name} was not dropped");
}
