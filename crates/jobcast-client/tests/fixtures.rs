//! The client's SSE decoding against fixtures:
//! - every fixture of `jobcast-protocol` through the client's frame reader
//!   (whole, a byte at a time, and in pseudo-random chunks);
//! - the client's own fixtures (`tests/fixtures`), one per parsing rule of the
//!   contract's "Clients" section and per control event, served over HTTP by
//!   a scripted server and read with a real [`jobcast_client::Watch`]: the
//!   items delivered, and the Last-Event-ID sent when it reconnects.

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use common::{collect, fast_client, Reply, Scripted, T};
use jobcast_client::sse::{Frame, FrameReader};
use jobcast_client::{Error, Item, Start};
use serde_json::{json, Value};

fn sse_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{dir:?}: {e}"))
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "sse"))
        .collect();
    v.sort();
    v
}

fn frame_json(f: &Frame) -> Value {
    match f {
        Frame::Event(e) => json!({"event": {
            "event": e.event, "data": e.data, "last_event_id": e.last_event_id, "id_set": e.id_set
        }}),
        Frame::Retry(ms) => json!({ "retry": ms }),
        Frame::Comment(c) => json!({ "comment": c }),
    }
}

fn decode_chunked(input: &[u8], sizes: &mut impl Iterator<Item = usize>) -> Vec<Frame> {
    let mut r = FrameReader::new();
    let mut out = Vec::new();
    let mut rest = input;
    while !rest.is_empty() {
        let n = sizes.next().unwrap_or(1).clamp(1, rest.len());
        r.feed(&rest[..n], &mut out)
            .expect("fixtures stay within the bound");
        rest = &rest[n..];
    }
    r.finish();
    out
}

#[test]
fn protocol_fixtures_through_the_client_reader() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../jobcast-protocol/tests/fixtures");
    let inputs = sse_files(&dir);
    assert!(inputs.len() >= 15, "protocol fixtures not found in {dir:?}");
    for sse in inputs {
        let name = sse.display().to_string();
        let input = fs::read(&sse).expect("read");
        let expected: Value =
            serde_json::from_str(&fs::read_to_string(sse.with_extension("json")).expect("json"))
                .expect("parse");
        let whole: Vec<Value> = FrameReader::decode_all(&input)
            .iter()
            .map(frame_json)
            .collect();
        assert_eq!(Value::from(whole), expected, "{name} (whole)");
        let bytewise: Vec<Value> = decode_chunked(&input, &mut std::iter::repeat(1))
            .iter()
            .map(frame_json)
            .collect();
        assert_eq!(Value::from(bytewise), expected, "{name} (byte at a time)");
        // Deterministic odd chunk sizes: 1, 3, 2, 5, 7, 4, …
        let mut sizes = [1usize, 3, 2, 5, 7, 4, 11, 6].into_iter().cycle();
        let chunked: Vec<Value> = decode_chunked(&input, &mut sizes)
            .iter()
            .map(frame_json)
            .collect();
        assert_eq!(Value::from(chunked), expected, "{name} (chunked)");
    }
}

/// Each parsing rule the contract names for clients has its own fixture.
#[test]
fn a_client_fixture_for_every_parsing_rule() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    for rule in [
        "bom",
        "bom_only_at_start",
        "line_endings_cr",
        "line_endings_lf",
        "line_endings_crlf",
        "line_endings_mixed",
        "multiline_data",
        "id_nul_ignored",
        "retry_digits_only",
        "comments_and_heartbeats",
        "incomplete_final_event",
        "duplicates_dropped",
        "reset_then_new_epoch",
        "control_event_does_not_move_position",
        "end_completed",
        "end_failed",
        "error_retryable",
        "error_not_retryable",
        "event_without_id",
    ] {
        assert!(
            dir.join(format!("{rule}.sse")).is_file(),
            "missing fixture {rule}.sse"
        );
        assert!(
            dir.join(format!("{rule}.json")).is_file(),
            "missing fixture {rule}.json"
        );
    }
}

fn item_json(item: &Result<Item, Error>) -> Value {
    match item {
        Ok(Item::Event(e)) => {
            json!({"event": {"id": e.id.to_string(), "type": e.event_type, "data": e.data}})
        }
        Ok(Item::Reset(r)) => json!({ "reset": r }),
        Ok(Item::End(e)) => {
            let mut v = serde_json::to_value(&e.payload).expect("end");
            v["id"] = json!(e.id.as_ref().map(|i| i.to_string()));
            json!({ "end": v })
        }
        Err(Error::Stream(p)) => json!({ "error": p.code }),
        Err(Error::Protocol { .. }) => json!({ "error": "protocol" }),
        Err(e) => json!({ "error": e.to_string() }),
        Ok(other) => panic!("unexpected item {other:?}"),
    }
}

#[tokio::test]
async fn client_fixtures_over_http() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let inputs = sse_files(&dir);
    assert!(inputs.len() >= 19);
    for sse in inputs {
        let name = sse.display().to_string();
        let body = fs::read(&sse).expect("read");
        let expected: Value =
            serde_json::from_str(&fs::read_to_string(sse.with_extension("json")).expect("json"))
                .expect("parse");
        for chunk in [usize::MAX, 3] {
            // The stream, then 204 to any reconnect: the watch ends there.
            let server = Scripted::start(
                vec![Reply::sse(body.clone()).chunked(chunk)],
                Reply::status(204),
            )
            .await;
            let client = fast_client(&server.url);
            let mut watch = client.watch("job", Start::Beginning);
            let items: Vec<Value> = collect(&mut watch, T).await.iter().map(item_json).collect();
            assert_eq!(
                Value::from(items),
                expected["items"],
                "{name} chunk {chunk}"
            );
            let seen = server.seen();
            assert_eq!(seen[0].target, "/v1/streams/job/events", "{name}");
            assert_eq!(
                seen[0].header("accept"),
                Some("text/event-stream"),
                "{name}"
            );
            assert_eq!(seen[0].header("last-event-id"), None, "{name}");
            match &expected["reconnect"] {
                Value::Null => assert_eq!(seen.len(), 1, "{name}: must not reconnect"),
                rc => {
                    assert_eq!(seen.len(), 2, "{name}: must reconnect once");
                    assert_eq!(
                        seen[1].header("last-event-id"),
                        rc["last_event_id"].as_str(),
                        "{name}: Last-Event-ID of the reconnect"
                    );
                }
            }
        }
    }
}
