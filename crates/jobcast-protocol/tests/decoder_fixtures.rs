//! Runs the SSE decoder against every `tests/fixtures/*.sse` file and compares
//! the frames with the sibling `*.json` expectation.

use std::fs;
use std::path::{Path, PathBuf};

use jobcast_protocol::decode::{Decoder, Frame, SseEvent};
use serde_json::Value;

const MIN_FIXTURES: usize = 15;

fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn fixture_inputs() -> Vec<PathBuf> {
    let mut paths: Vec<PathBuf> = fs::read_dir(fixtures_dir())
        .expect("read fixtures dir")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "sse"))
        .collect();
    paths.sort();
    paths
}

fn decode_whole(input: &[u8]) -> Vec<Frame> {
    let mut d = Decoder::new();
    let mut out = Vec::new();
    d.feed(input, &mut out);
    d.finish();
    out
}

fn decode_bytewise(input: &[u8]) -> Vec<Frame> {
    let mut d = Decoder::new();
    let mut out = Vec::new();
    for b in input {
        d.feed(std::slice::from_ref(b), &mut out);
    }
    d.finish();
    out
}

fn str_field<'a>(obj: &'a Value, key: &str, ctx: &str) -> &'a str {
    obj.get(key)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("{ctx}: missing string field {key:?} in {obj}"))
}

/// Checks one decoded frame against its JSON expectation, field by field.
fn check_frame(actual: &Frame, expected: &Value, ctx: &str) {
    let obj = expected
        .as_object()
        .unwrap_or_else(|| panic!("{ctx}: expected frame must be an object: {expected}"));
    assert_eq!(
        obj.len(),
        1,
        "{ctx}: frame object must have one key: {expected}"
    );
    let (kind, body) = obj.iter().next().expect("one key");
    match (kind.as_str(), actual) {
        (
            "event",
            Frame::Event(SseEvent {
                event,
                data,
                last_event_id,
                id_set,
            }),
        ) => {
            let fields = body
                .as_object()
                .unwrap_or_else(|| panic!("{ctx}: event body must be an object"));
            assert_eq!(
                fields.len(),
                4,
                "{ctx}: event must have exactly 4 fields: {body}"
            );
            assert_eq!(event, str_field(body, "event", ctx), "{ctx}: event type");
            assert_eq!(data, str_field(body, "data", ctx), "{ctx}: data");
            assert_eq!(
                last_event_id,
                str_field(body, "last_event_id", ctx),
                "{ctx}: last_event_id"
            );
            let want_id_set = body
                .get("id_set")
                .and_then(Value::as_bool)
                .unwrap_or_else(|| panic!("{ctx}: missing bool field id_set"));
            assert_eq!(*id_set, want_id_set, "{ctx}: id_set");
        }
        ("retry", Frame::Retry(ms)) => {
            let want = body
                .as_u64()
                .unwrap_or_else(|| panic!("{ctx}: retry must be a u64: {body}"));
            assert_eq!(*ms, want, "{ctx}: retry");
        }
        ("comment", Frame::Comment(text)) => {
            let want = body
                .as_str()
                .unwrap_or_else(|| panic!("{ctx}: comment must be a string: {body}"));
            assert_eq!(text, want, "{ctx}: comment");
        }
        ("event" | "retry" | "comment", other) => {
            panic!("{ctx}: expected a {kind} frame {body}, got {other:?}")
        }
        (unknown, _) => panic!("{ctx}: unknown frame kind {unknown:?} in expectation"),
    }
}

fn check_frames(actual: &[Frame], expected: &[Value], ctx: &str) {
    for (i, (a, e)) in actual.iter().zip(expected).enumerate() {
        check_frame(a, e, &format!("{ctx} frame #{i}"));
    }
    assert_eq!(
        actual.len(),
        expected.len(),
        "{ctx}: frame count; got {actual:?}"
    );
}

#[test]
fn all_fixtures_match() {
    let inputs = fixture_inputs();
    assert!(
        inputs.len() >= MIN_FIXTURES,
        "expected at least {MIN_FIXTURES} fixtures, found {}",
        inputs.len()
    );

    for sse in &inputs {
        let name = sse.file_name().expect("file name").to_string_lossy();
        let json_path = sse.with_extension("json");
        let input = fs::read(sse).unwrap_or_else(|e| panic!("{name}: read: {e}"));
        let json = fs::read_to_string(&json_path)
            .unwrap_or_else(|e| panic!("{name}: missing expectation {json_path:?}: {e}"));
        let expected: Value =
            serde_json::from_str(&json).unwrap_or_else(|e| panic!("{name}: bad JSON: {e}"));
        let expected = expected
            .as_array()
            .unwrap_or_else(|| panic!("{name}: expectation must be a JSON array"));

        check_frames(&decode_whole(&input), expected, &format!("{name} (whole)"));
        check_frames(
            &decode_bytewise(&input),
            expected,
            &format!("{name} (byte at a time)"),
        );
    }
}

#[test]
fn every_expectation_has_an_input() {
    for entry in fs::read_dir(fixtures_dir()).expect("read fixtures dir") {
        let path = entry.expect("dir entry").path();
        if path.extension().is_some_and(|e| e == "json") {
            assert!(
                path.with_extension("sse").is_file(),
                "{path:?} has no sibling .sse input"
            );
        }
    }
}
