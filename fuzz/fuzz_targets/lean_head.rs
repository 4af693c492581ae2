//! The lean path's request-head parser: never panics, and only a complete
//! body-less `GET /v1/streams/…/events` is taken as a watch.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    if jobcast_server::lean_head_is_watch(input) {
        // Empty lines before a request line are allowed (RFC 9112 §2.2), as hyper does.
        let start = input
            .iter()
            .position(|b| *b != b'\r' && *b != b'\n')
            .unwrap_or(input.len());
        assert!(input[start..].starts_with(b"GET /v1/streams/"));
        assert!(input.ends_with(b"\n"));
    }
});
