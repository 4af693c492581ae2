//! The pure parts of the benchmarks: the payload every event carries, the
//! exactly-once-in-order check, latency histograms and their summaries,
//! `/proc` parsing.

use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;
use serde::Serialize;

/// The largest latency a histogram tracks exactly, in µs (60 s); larger ones are clamped.
const MAX_LATENCY_US: u64 = 60_000_000;

/// Wall-clock time in nanoseconds since the Unix epoch (0 if the clock is before it).
pub(super) fn unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Appends the data of one benchmark event: `{"seq":N,"t":NANOS}`, plus
/// `"p":"xxx…"` of `pad` bytes when asked. Both servers carry it as is, so
/// order and latency are checked the same way on both.
pub(super) fn write_payload(out: &mut Vec<u8>, seq: u64, t: u64, pad: usize) {
    out.extend_from_slice(b"{\"seq\":");
    out.extend_from_slice(seq.to_string().as_bytes());
    out.extend_from_slice(b",\"t\":");
    out.extend_from_slice(t.to_string().as_bytes());
    if pad > 0 {
        out.extend_from_slice(b",\"p\":\"");
        out.resize(out.len() + pad, b'x');
        out.push(b'"');
    }
    out.push(b'}');
}

/// Reads `(seq, t)` back from an event's data (see [`write_payload`]).
pub(super) fn parse_payload(data: &str) -> Option<(u64, u64)> {
    let rest = data.strip_prefix("{\"seq\":")?;
    let (seq, rest) = leading_u64(rest)?;
    let rest = rest.strip_prefix(",\"t\":")?;
    let (t, rest) = leading_u64(rest)?;
    (rest.starts_with('}') || rest.starts_with(',')).then_some((seq, t))
}

fn leading_u64(s: &str) -> Option<(u64, &str)> {
    let end = s
        .bytes()
        .position(|b| !b.is_ascii_digit())
        .unwrap_or(s.len());
    let n = s[..end].parse().ok()?;
    Some((n, &s[end..]))
}

/// The seq of a jobcast SSE id `{epoch}-{seq}`.
pub(super) fn id_seq(id: &str) -> Option<u64> {
    id.rsplit_once('-')?.1.parse().ok()
}

/// Checks that one watcher sees seqs 1, 2, 3 … each exactly once, in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct SeqCheck {
    /// The seq expected next, minus one: the highest seq delivered in order.
    pub(super) last: u64,
    /// Events that arrived exactly when expected.
    pub(super) in_order: u64,
    /// Events whose seq was already passed (duplicates or late reorders).
    pub(super) duplicates: u64,
    /// Jumps forward over missing seqs.
    pub(super) gaps: u64,
    /// Seqs jumped over.
    pub(super) skipped: u64,
}

impl SeqCheck {
    /// Records one delivered seq.
    pub(super) fn observe(&mut self, seq: u64) {
        if seq == self.last + 1 {
            self.in_order += 1;
            self.last = seq;
        } else if seq <= self.last {
            self.duplicates += 1;
        } else {
            self.gaps += 1;
            self.skipped += seq - self.last - 1;
            self.last = seq;
        }
    }

    /// Seqs of `1..=total` never seen in order.
    pub(super) fn missing(&self, total: u64) -> u64 {
        self.skipped + total.saturating_sub(self.last)
    }

    /// Every seq of `1..=total` exactly once, in order, nothing else.
    pub(super) fn complete(&self, total: u64) -> bool {
        self.in_order == total && self.last == total && self.duplicates == 0 && self.gaps == 0
    }
}

/// A latency histogram in microseconds.
pub(super) fn histogram() -> Histogram<u64> {
    // 3 significant figures from 1 µs to 60 s: the bounds are constants that
    // hdrhistogram accepts (low >= 1, high >= 2 * low, sigfig <= 5).
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).expect("valid constant histogram bounds")
}

/// Latency histograms shared by many tasks: each task records into one shard
/// (by its index), so a lock is rarely contended and never held across I/O.
#[derive(Debug)]
pub(super) struct Shards {
    shards: Vec<Mutex<Histogram<u64>>>,
}

impl Shards {
    /// `n` empty shards (at least one).
    pub(super) fn new(n: usize) -> Self {
        Self {
            shards: (0..n.max(1)).map(|_| Mutex::new(histogram())).collect(),
        }
    }

    /// Records latencies (µs) from task `i`.
    pub(super) fn record(&self, i: usize, values: &[u64]) {
        if values.is_empty() {
            return;
        }
        let mut h = lock(&self.shards[i % self.shards.len()]);
        for &v in values {
            h.saturating_record(v);
        }
    }

    /// All shards merged.
    pub(super) fn merged(&self) -> Histogram<u64> {
        let mut all = histogram();
        for s in &self.shards {
            // Same bounds everywhere, so adding cannot fail; saturate anyway.
            let h = lock(s);
            for v in h.iter_recorded() {
                all.saturating_record_n(v.value_iterated_to(), v.count_at_value());
            }
        }
        all
    }
}

/// Locks, ignoring poisoning (a panicking recorder leaves a valid histogram).
pub(super) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Merges `src` into `dst` (same bounds).
pub(super) fn merge_into(dst: &mut Histogram<u64>, src: &Histogram<u64>) {
    for v in src.iter_recorded() {
        dst.saturating_record_n(v.value_iterated_to(), v.count_at_value());
    }
}

/// A latency distribution, in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub(super) struct Latency {
    /// Samples.
    pub(super) count: u64,
    /// Mean.
    pub(super) mean_us: f64,
    /// Median.
    pub(super) p50_us: u64,
    /// 90th percentile.
    pub(super) p90_us: u64,
    /// 99th percentile.
    pub(super) p99_us: u64,
    /// 99.9th percentile.
    pub(super) p999_us: u64,
    /// Largest (clamped at 60 s).
    pub(super) max_us: u64,
}

impl Latency {
    /// Summarises a histogram (all zero when empty).
    pub(super) fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        Self {
            count: h.len(),
            mean_us: (h.mean() * 10.0).round() / 10.0,
            p50_us: h.value_at_quantile(0.50),
            p90_us: h.value_at_quantile(0.90),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            max_us: h.max(),
        }
    }

    /// `p50 / p90 / p99 / p999 / max` in milliseconds, for a table.
    pub(super) fn row(&self) -> String {
        format!(
            "{} / {} / {} / {} / {} ms",
            ms(self.p50_us),
            ms(self.p90_us),
            ms(self.p99_us),
            ms(self.p999_us),
            ms(self.max_us)
        )
    }
}

/// Microseconds as milliseconds with a precision that fits the size.
pub(super) fn ms(us: u64) -> String {
    let v = us as f64 / 1000.0;
    if v < 10.0 {
        format!("{v:.2}")
    } else if v < 100.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.0}")
    }
}

/// `n / secs`, 0 when no time passed.
pub(super) fn rate(n: u64, secs: f64) -> f64 {
    if secs > 0.0 {
        n as f64 / secs
    } else {
        0.0
    }
}

/// Memory figures of one process, from `/proc/PID/status`, in KiB.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub(super) struct Mem {
    /// Resident set size.
    pub(super) vm_rss_kib: u64,
    /// Resident anonymous memory (heap, stacks): what connections cost.
    pub(super) rss_anon_kib: u64,
    /// Resident shared memory (nchan's shared zone lives here).
    pub(super) rss_shmem_kib: u64,
}

impl Mem {
    /// Parses the text of `/proc/PID/status`.
    pub(super) fn parse(status: &str) -> Option<Self> {
        let mut m = Self::default();
        let mut seen = false;
        for line in status.lines() {
            let Some((key, value)) = line.split_once(':') else {
                continue;
            };
            let kib = || {
                value
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .ok()
            };
            match key {
                "VmRSS" => {
                    m.vm_rss_kib = kib()?;
                    seen = true;
                }
                "RssAnon" => m.rss_anon_kib = kib()?,
                "RssShmem" => m.rss_shmem_kib = kib()?,
                _ => {}
            }
        }
        seen.then_some(m)
    }

    /// Reads the sum over `pids`.
    pub(super) fn read(pids: &[u32]) -> anyhow::Result<Self> {
        use anyhow::Context;
        let mut sum = Self::default();
        for pid in pids {
            let path = format!("/proc/{pid}/status");
            let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
            let m = Self::parse(&text).with_context(|| format!("{path}: no VmRSS"))?;
            sum.vm_rss_kib += m.vm_rss_kib;
            sum.rss_anon_kib += m.rss_anon_kib;
            sum.rss_shmem_kib += m.rss_shmem_kib;
        }
        Ok(sum)
    }
}

/// Linux reports process times in USER_HZ ticks, 100 per second on every
/// mainstream architecture (what `getconf CLK_TCK` prints).
const TICKS_PER_SEC: f64 = 100.0;

/// CPU time (user + system) of a process from the text of `/proc/PID/stat`, in seconds.
pub(super) fn parse_cpu_secs(stat: &str) -> Option<f64> {
    // The command name (field 2) may hold spaces and parentheses: skip past the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    // Field 3 (state) is the first after ')'; utime and stime are fields 14 and 15.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime + stime) as f64 / TICKS_PER_SEC)
}

/// CPU seconds used so far by `pids` together (`None` when one cannot be read).
pub(super) fn cpu_secs(pids: &[u32]) -> Option<f64> {
    pids.iter()
        .map(|pid| parse_cpu_secs(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?))
        .sum()
}

/// CPU seconds used so far by this process.
pub(super) fn own_cpu_secs() -> Option<f64> {
    parse_cpu_secs(&std::fs::read_to_string("/proc/self/stat").ok()?)
}

/// Busy CPU seconds of the whole machine so far, all cores together (the
/// first line of `/proc/stat`, less idle and iowait).
pub(super) fn machine_busy_secs() -> Option<f64> {
    parse_machine_busy(&std::fs::read_to_string("/proc/stat").ok()?)
}

fn parse_machine_busy(stat: &str) -> Option<f64> {
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .take(8)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    let (total, idle) = (v.iter().sum::<u64>(), v.get(3)? + v.get(4)?);
    Some((total - idle) as f64 / TICKS_PER_SEC)
}

/// CPU seconds used so far by every process named `postgres` on the
/// machine (whatever database it serves; backends that exited are gone from
/// the sum).
pub(super) fn postgres_cpu_secs() -> Option<f64> {
    let mut sum = 0.0;
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let name = entry.file_name();
        if !name
            .to_str()
            .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
        {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        if stat.contains("(postgres)") {
            sum += parse_cpu_secs(&stat).unwrap_or(0.0);
        }
    }
    Some(sum)
}

/// The 1, 5 and 15 minute load averages (`/proc/loadavg`).
pub(super) fn loadavg() -> Option<[f64; 3]> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    let mut it = text.split_whitespace().map(|f| f.parse::<f64>().ok());
    Some([it.next()??, it.next()??, it.next()??])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machine_busy() {
        let stat = "cpu  100 5 50 1000 20 1 2 0 0 0\ncpu0 1 2 3 4 5 6 7 8 9 10\n";
        assert_eq!(parse_machine_busy(stat), Some(1.58));
        assert_eq!(parse_machine_busy("intr 1 2"), None);
    }

    #[test]
    fn payload_round_trip() {
        let mut buf = Vec::new();
        write_payload(&mut buf, 42, 1_795_410_930_123_456_789, 0);
        let s = String::from_utf8(buf).unwrap();
        assert_eq!(s, r#"{"seq":42,"t":1795410930123456789}"#);
        assert_eq!(parse_payload(&s), Some((42, 1_795_410_930_123_456_789)));

        let mut buf = Vec::new();
        write_payload(&mut buf, 7, 9, 5);
        let s = String::from_utf8(buf).unwrap();
        assert_eq!(s, r#"{"seq":7,"t":9,"p":"xxxxx"}"#);
        assert_eq!(parse_payload(&s), Some((7, 9)));
        // The padded payload is valid JSON (jobcast stores it compact, unchanged).
        assert!(serde_json::from_str::<serde_json::Value>(&s).is_ok());
    }

    #[test]
    fn payload_rejects_other_data() {
        assert_eq!(parse_payload("hello"), None);
        assert_eq!(parse_payload(r#"{"seq":,"t":1}"#), None);
        assert_eq!(parse_payload(r#"{"seq":1,"t":2x"#), None);
        assert_eq!(parse_payload(r#"{"seq":1}"#), None);
    }

    #[test]
    fn id_seq_parses_jobcast_ids() {
        assert_eq!(id_seq("k3x9q-42"), Some(42));
        assert_eq!(id_seq("1795410930:0"), None);
        assert_eq!(id_seq(""), None);
    }

    #[test]
    fn seq_check_exactly_once_in_order() {
        let mut c = SeqCheck::default();
        for s in 1..=5 {
            c.observe(s);
        }
        assert!(c.complete(5));
        assert_eq!(c.missing(5), 0);
        assert!(!c.complete(6));
        assert_eq!(c.missing(6), 1);
    }

    #[test]
    fn seq_check_finds_duplicates_gaps_and_reorders() {
        let mut c = SeqCheck::default();
        for s in [1, 2, 2, 4, 3, 5] {
            c.observe(s);
        }
        assert_eq!(c.duplicates, 2, "the repeated 2 and the late 3");
        assert_eq!(c.gaps, 1);
        assert_eq!(c.skipped, 1);
        assert_eq!(c.missing(5), 1);
        assert!(!c.complete(5));

        let mut c = SeqCheck::default();
        c.observe(2);
        assert_eq!(c.missing(2), 1);
        assert!(!c.complete(2));
    }

    #[test]
    fn shards_merge_and_summarise() {
        let s = Shards::new(4);
        s.record(0, &[100, 200]);
        s.record(5, &[300]);
        s.record(2, &[u64::MAX]);
        let h = s.merged();
        assert_eq!(h.len(), 4);
        let l = Latency::of(&h);
        assert_eq!(l.count, 4);
        assert!((199..=201).contains(&l.p50_us), "{l:?}");
        assert!(
            l.max_us >= MAX_LATENCY_US - MAX_LATENCY_US / 1000,
            "clamped: {l:?}"
        );

        let mut all = histogram();
        merge_into(&mut all, &h);
        merge_into(&mut all, &h);
        assert_eq!(all.len(), 8);
        assert_eq!(Latency::of(&histogram()), Latency::default());
    }

    #[test]
    fn ms_formatting_and_rates() {
        assert_eq!(ms(1234), "1.23");
        assert_eq!(ms(12_345), "12.3");
        assert_eq!(ms(123_456), "123");
        assert_eq!(rate(10, 2.0), 5.0);
        assert_eq!(rate(10, 0.0), 0.0);
    }

    #[test]
    fn proc_stat_parsing() {
        let stat =
            "22794 (a (b) c) R 22792 22792 18837 0 -1 4194304 99 0 0 0 250 50 0 0 20 0 1 0 378593";
        assert_eq!(parse_cpu_secs(stat), Some(3.0));
        assert_eq!(parse_cpu_secs("garbage"), None);
        assert!(own_cpu_secs().is_some());
    }

    #[test]
    fn proc_status_parsing() {
        let text = "Name:\tjobcast\nVmPeak:\t  100 kB\nVmRSS:\t   12345 kB\nRssAnon:\t    8000 kB\nRssFile:\t 4000 kB\nRssShmem:\t 345 kB\n";
        assert_eq!(
            Mem::parse(text),
            Some(Mem {
                vm_rss_kib: 12345,
                rss_anon_kib: 8000,
                rss_shmem_kib: 345,
            })
        );
        assert_eq!(Mem::parse("Name:\tx\n"), None);
    }
}
