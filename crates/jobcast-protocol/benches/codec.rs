//! Micro-benchmarks of the SSE encoder and the sans-IO decoder.
//!
//! `cargo bench -p jobcast-protocol` (criterion). Throughput is reported in
//! bytes of SSE text, so encoder and decoder figures compare directly.

use std::hint::black_box;

use criterion::{criterion_main, BenchmarkId, Criterion, Throughput};
use jobcast_protocol::decode::{Decoder, Frame};
use jobcast_protocol::encode;

/// The data of a typical fanout event: a small JSON object.
const SMALL: &str = r#"{"seq":123456,"t":1795410930123456789}"#;

/// A token-streaming event: a short string.
const TOKEN: &str = " the";

/// A 4 KiB event of 64 lines (a build log chunk).
fn multiline() -> String {
    let line: String = "warning: unused variable `x` --> src/main.rs:10:9 "
        .chars()
        .cycle()
        .take(63)
        .collect();
    vec![line; 64].join("\n")
}

/// `n` events of `data`, encoded as the server sends them.
fn encoded(n: u64, data: &str) -> Vec<u8> {
    let mut buf = Vec::new();
    encode::retry(&mut buf, 3000);
    for seq in 1..=n {
        encode::event(&mut buf, Some(("k3x9q2ab", seq)), "message", data);
    }
    buf
}

fn bench_encode(c: &mut Criterion) {
    let big = multiline();
    let mut g = c.benchmark_group("encode");
    for (name, data) in [
        ("small_json", SMALL),
        ("token", TOKEN),
        ("4k_64_lines", &big),
    ] {
        let mut probe = Vec::new();
        encode::event(&mut probe, Some(("k3x9q2ab", 123_456)), "message", data);
        g.throughput(Throughput::Bytes(probe.len() as u64));
        let mut buf = Vec::with_capacity(probe.len() * 2);
        g.bench_with_input(BenchmarkId::from_parameter(name), data, |b, data| {
            b.iter(|| {
                buf.clear();
                encode::event(
                    &mut buf,
                    Some(("k3x9q2ab", black_box(123_456))),
                    "message",
                    black_box(data),
                );
                black_box(buf.len())
            })
        });
    }
    g.finish();
}

fn bench_decode(c: &mut Criterion) {
    let big = multiline();
    let mut g = c.benchmark_group("decode");
    for (name, data, n) in [
        ("small_json_x1000", SMALL, 1000),
        ("token_x1000", TOKEN, 1000),
        ("4k_64_lines_x100", big.as_str(), 100),
    ] {
        let input = encoded(n, data);
        g.throughput(Throughput::Bytes(input.len() as u64));
        // Whole buffer in one feed: the best case (one read holds many events).
        g.bench_with_input(BenchmarkId::new("one_feed", name), &input, |b, input| {
            let mut out = Vec::with_capacity(n as usize + 1);
            b.iter(|| {
                let mut d = Decoder::new();
                out.clear();
                d.feed(black_box(input), &mut out);
                black_box(count_events(&out))
            })
        });
        // 1460-byte feeds (one TCP segment each): lines split across feeds.
        g.bench_with_input(BenchmarkId::new("mss_feeds", name), &input, |b, input| {
            let mut out = Vec::with_capacity(n as usize + 1);
            b.iter(|| {
                let mut d = Decoder::new();
                out.clear();
                for chunk in black_box(input).chunks(1460) {
                    d.feed(chunk, &mut out);
                }
                black_box(count_events(&out))
            })
        });
    }
    g.finish();
}

fn count_events(out: &[Frame]) -> usize {
    out.iter().filter(|f| matches!(f, Frame::Event(_))).count()
}

/// Every benchmark of this file (written out: `criterion_group!` makes an undocumented `pub fn`).
fn benches() {
    let mut c = Criterion::default().configure_from_args();
    bench_encode(&mut c);
    bench_decode(&mut c);
}

criterion_main!(benches);
