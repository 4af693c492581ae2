//! The append body parser: never panics, and what it accepts keeps the
//! limits (1..=max_batch events, data within max_event_bytes, non-empty,
//! no reserved type).
#![no_main]

use jobcast_server::http::input::{parse_append, parse_complete, parse_fail, Limits};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    let limits = Limits {
        max_event_bytes: 256,
        max_batch: 8,
    };
    if let Ok(events) = parse_append(input, limits) {
        assert!((1..=limits.max_batch).contains(&events.len()));
        for e in &events {
            assert!(e.data.len() <= limits.max_event_bytes);
            assert!(!e.data.is_empty());
            assert!(!e.event_type.starts_with("jobcast."));
            assert!(jobcast_protocol::validate_event_type(&e.event_type).is_ok());
        }
    }
    let _ = parse_complete(input, limits);
    let _ = parse_fail(input, limits);
});
