//! The SSE decoder: never panics, and the frames do not depend on how the
//! bytes were split into chunks (the first byte of input picks the split).
#![no_main]

use jobcast_protocol::decode::Decoder;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    let Some((&split, bytes)) = input.split_first() else {
        return;
    };
    let mut whole = Vec::new();
    let mut d = Decoder::new();
    d.feed(bytes, &mut whole);
    d.finish();

    let at = (split as usize).min(bytes.len());
    let mut parts = Vec::new();
    let mut d = Decoder::new();
    d.feed(&bytes[..at], &mut parts);
    d.feed(&bytes[at..], &mut parts);
    d.finish();
    assert_eq!(whole, parts, "split at {at}");

    let mut bytewise = Vec::new();
    let mut d = Decoder::new();
    for b in bytes.chunks(1) {
        d.feed(b, &mut bytewise);
    }
    d.finish();
    assert_eq!(whole, bytewise, "byte by byte");
});
