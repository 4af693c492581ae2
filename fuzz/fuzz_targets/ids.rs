//! Stream and event ids: parsing never panics, and whatever parses formats
//! back to exactly the text it came from (one spelling per id).
#![no_main]

use jobcast_protocol::{validate_stream_id, EventId, StreamId};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    let Ok(s) = std::str::from_utf8(input) else {
        return;
    };
    if let Ok(id) = EventId::parse(s) {
        let text = id.to_string();
        assert_eq!(text, s);
        assert_eq!(EventId::parse(&text).ok(), Some(id));
    }
    match StreamId::parse(s) {
        Ok(id) => {
            assert_eq!(id.as_str(), s);
            assert!(validate_stream_id(s).is_ok());
            assert!(!s.is_empty() && s.len() <= 200);
        }
        Err(_) => assert!(validate_stream_id(s).is_err()),
    }
});
