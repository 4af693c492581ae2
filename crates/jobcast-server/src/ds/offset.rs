//! DS offsets, cursors and time stamps (pure).
//!
//! An offset is `{key:016}_{seq:016}`: the creation key of the stream that
//! owns the message at `seq` (a fork's inherited messages keep their
//! source's key), then the seq of the last message before the position.
//! Zero-padded decimal, so lexicographic order is numeric order; a stream
//! deleted and created again has a larger key, so an offset of the old log
//! never names a position of the new one.

/// Where a read starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// `-1` or no offset: the beginning.
    Beginning,
    /// `now`: the tail.
    Now,
    /// A position: the owner's creation key and the seq.
    At(i64, u64),
}

/// The offset of position `seq` owned by creation `key`.
pub fn encode(key: i64, seq: u64) -> String {
    format!("{:016}_{seq:016}", key.max(0))
}

/// Parses an offset parameter.
pub fn parse(s: &str) -> Option<Start> {
    match s {
        "-1" => return Some(Start::Beginning),
        "now" => return Some(Start::Now),
        _ => {}
    }
    let (k, q) = s.split_once('_')?;
    // Exactly as encoded: 16 digits, or more only without a leading zero.
    let canonical = |f: &str| {
        (f.len() == 16 || (f.len() > 16 && !f.starts_with('0')))
            && f.bytes().all(|b| b.is_ascii_digit())
    };
    if !canonical(k) || !canonical(q) {
        return None;
    }
    match (k.parse().ok()?, q.parse().ok()?) {
        // All zeros (no creation has key 0): the beginning, as other servers write it.
        (0, 0) => Some(Start::Beginning),
        (k, q) => Some(Start::At(k, q)),
    }
}

/// 2024-10-09T00:00:00Z in unix seconds: the protocol's cursor epoch.
const CURSOR_EPOCH_S: i64 = 1_728_432_000;
/// The protocol's cursor interval.
const CURSOR_INTERVAL_S: i64 = 20;

/// The cursor for a live answer at `now_ms` given the client's `cursor`:
/// the interval number, or strictly more than the client's when it is not
/// behind (`jitter` intervals, 1..=180, i.e. up to an hour).
pub fn cursor(now_ms: i64, client: Option<&str>, jitter: u64) -> String {
    let interval = ((now_ms / 1000 - CURSOR_EPOCH_S) / CURSOR_INTERVAL_S).max(0) as u64;
    match client.and_then(|c| c.parse::<u64>().ok()) {
        Some(c) if c >= interval => (c + jitter.clamp(1, 180)).to_string(),
        _ => interval.to_string(),
    }
}

/// Parses an RFC 3339 time stamp (`Z` or `±HH:MM`) to unix milliseconds.
pub fn parse_rfc3339(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    if b[13] != b':' || b[16] != b':' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let t = s.get(r)?;
        t.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| t.parse().ok())?
    };
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, se) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || se > 60 {
        return None;
    }
    let mut i = 19;
    let mut ms = 0i64;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while b.get(i).is_some_and(|c| c.is_ascii_digit()) {
            i += 1;
        }
        if i == start {
            return None;
        }
        let frac = &s[start..i.min(start + 3)];
        ms = frac.parse::<i64>().ok()? * 10i64.pow(3 - frac.len() as u32);
    }
    let offset_s = match s.get(i..)? {
        "Z" | "z" => 0,
        rest if rest.len() == 6 && (rest.starts_with('+') || rest.starts_with('-')) => {
            if rest.as_bytes()[3] != b':' {
                return None;
            }
            let oh = num(i + 1..i + 3)?;
            let om = num(i + 4..i + 6)?;
            if oh > 23 || om > 59 {
                return None;
            }
            let v = oh * 3600 + om * 60;
            if rest.starts_with('-') {
                -v
            } else {
                v
            }
        }
        _ => return None,
    };
    // Days from civil (Howard Hinnant's algorithm).
    let (y2, m2) = if mo <= 2 {
        (y - 1, mo + 9)
    } else {
        (y, mo - 3)
    };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let doy = (153 * m2 + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + h * 3600 + mi * 60 + se - offset_s;
    Some(secs * 1000 + ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_sort_like_positions() {
        let a = encode(3, 9);
        let b = encode(3, 10);
        let c = encode(4, 0);
        assert!(a < b && b < c, "{a} {b} {c}");
        assert_eq!(parse(&b), Some(Start::At(3, 10)));
        assert_eq!(parse("-1"), Some(Start::Beginning));
        assert_eq!(parse("now"), Some(Start::Now));
        assert_eq!(
            parse("0000000000000000_0000000000000000"),
            Some(Start::Beginning)
        );
        for bad in ["", "0,1", "0 1", "3_10", &b[1..], &format!("{b}0"), "x"] {
            assert_eq!(parse(bad), None, "{bad}");
        }
        assert!(!encode(i64::MAX, u64::MAX).contains([',', '&', '=', '?', '/']));
    }

    #[test]
    fn cursors_never_go_back() {
        let now = (CURSOR_EPOCH_S + 20 * 1000) * 1000;
        assert_eq!(cursor(now, None, 5), "1000");
        assert_eq!(cursor(now, Some("999"), 5), "1000");
        assert_eq!(cursor(now, Some("1000"), 5), "1005");
        assert_eq!(cursor(now, Some("5000"), 0), "5001");
        assert_eq!(cursor(now, Some("junk"), 5), "1000");
    }

    #[test]
    fn rfc3339() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            parse_rfc3339("2023-11-14T22:13:20.123Z"),
            Some(1_700_000_000_123)
        );
        assert_eq!(
            parse_rfc3339("2023-11-14T23:13:20.123+01:00"),
            Some(1_700_000_000_123)
        );
        assert_eq!(
            parse_rfc3339("2023-11-14T21:13:20-01:00"),
            Some(1_700_000_000_000)
        );
        for bad in [
            "",
            "tomorrow",
            "2023-13-14T22:13:20Z",
            "2023-11-14T22:13:20",
            "2023-11-14T22:13:20+0100",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
    }
}
