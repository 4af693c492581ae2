//! Reconnect and retry delays: exponential backoff with full jitter, and the
//! `Retry-After` header. Pure functions: no clock, no random source of their
//! own, so they are tested without either.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The ceiling of the first retry (attempt 0).
pub const BASE: Duration = Duration::from_secs(1);
/// The largest ceiling: attempts beyond `log2(MAX / BASE)` all draw from `[0, MAX)`.
pub const MAX: Duration = Duration::from_secs(30);
/// The longest floor honoured (a `retry:`, `retry_after_ms` or `Retry-After`
/// beyond it is taken as this), so a bogus value cannot park a client forever.
pub const MAX_FLOOR: Duration = Duration::from_secs(3600);

/// The delay before retry number `attempt` (0 for the first retry):
/// full jitter, `random × min(30 s, 1 s × 2^attempt)`, then at least `floor`.
///
/// `random` is a sample of `[0, 1)` (values outside are clamped, NaN counts as 0).
///
/// ```
/// use std::time::Duration;
/// use jobcast_client::backoff::backoff;
/// assert_eq!(backoff(3, Duration::ZERO, 0.5), Duration::from_secs(4));
/// assert_eq!(backoff(3, Duration::from_secs(6), 0.5), Duration::from_secs(6));
/// ```
pub fn backoff(attempt: u32, floor: Duration, random: f64) -> Duration {
    backoff_with(attempt, floor, random, BASE, MAX)
}

/// [`backoff`] with another base and maximum (e.g. faster retries on a LAN or in tests).
pub fn backoff_with(
    attempt: u32,
    floor: Duration,
    random: f64,
    base: Duration,
    max: Duration,
) -> Duration {
    let ceiling = match 1u32.checked_shl(attempt) {
        Some(factor) => base.saturating_mul(factor).min(max),
        None => max,
    };
    let random = if random.is_nan() {
        0.0
    } else {
        random.clamp(0.0, 1.0)
    };
    let jitter = Duration::try_from_secs_f64(ceiling.as_secs_f64() * random)
        .unwrap_or(ceiling)
        .min(ceiling);
    jitter.max(floor.min(MAX_FLOOR))
}

/// Parses a `Retry-After` header value: delay-seconds, or an HTTP-date
/// (IMF-fixdate, RFC 850 or asctime, as RFC 9110 requires recipients to accept),
/// relative to `now`. A date in the past means no delay. `None` when unparseable.
///
/// ```
/// use std::time::{Duration, UNIX_EPOCH};
/// use jobcast_client::backoff::parse_retry_after;
/// let now = UNIX_EPOCH + Duration::from_secs(784111770);
/// assert_eq!(parse_retry_after("7", now), Some(Duration::from_secs(7)));
/// assert_eq!(parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT", now), Some(Duration::from_secs(7)));
/// ```
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        // Digits only: parsing fails only on overflow, which is "very long".
        let secs = value.parse::<u64>().unwrap_or(u64::MAX);
        return Some(Duration::from_secs(secs).min(MAX_FLOOR));
    }
    let at = UNIX_EPOCH + Duration::from_secs(parse_http_date(value)?);
    Some(
        at.duration_since(now)
            .unwrap_or(Duration::ZERO)
            .min(MAX_FLOOR),
    )
}

/// Seconds since the Unix epoch of an HTTP-date.
fn parse_http_date(s: &str) -> Option<u64> {
    let parts: Vec<&str> = s.split_ascii_whitespace().collect();
    let (day, month, year, time) = match parts.as_slice() {
        // IMF-fixdate: Sun, 06 Nov 1994 08:49:37 GMT
        [wd, day, mon, year, time, "GMT"] if wd.ends_with(',') && year.len() == 4 => {
            (*day, *mon, year.parse::<u64>().ok()?, *time)
        }
        // RFC 850: Sunday, 06-Nov-94 08:49:37 GMT
        [wd, date, time, "GMT"] if wd.ends_with(',') => {
            let mut it = date.split('-');
            let (day, mon, yy) = (it.next()?, it.next()?, it.next()?);
            if it.next().is_some() || yy.len() != 2 {
                return None;
            }
            let yy = yy.parse::<u64>().ok()?;
            // Two-digit years: RFC 9110 says a year more than 50 years ahead is
            // in the past century; for current dates this is the usual pivot.
            let year = if yy < 70 { 2000 + yy } else { 1900 + yy };
            (day, mon, year, *time)
        }
        // asctime: Sun Nov  6 08:49:37 1994
        [_wd, mon, day, time, year] if year.len() == 4 => {
            (*day, *mon, year.parse::<u64>().ok()?, *time)
        }
        _ => return None,
    };
    if day.is_empty() || day.len() > 2 || !day.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let day: u64 = day.parse().ok()?;
    let month = 1 + [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ]
    .iter()
    .position(|m| *m == month)? as u64;
    let mut hms = time.split(':');
    let mut field = |max: u64| -> Option<u64> {
        let f = hms.next()?;
        if f.len() != 2 || !f.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        f.parse::<u64>().ok().filter(|v| *v <= max)
    };
    let (h, m, sec) = (field(23)?, field(59)?, field(60)?);
    if hms.next().is_some() || !(1..=31).contains(&day) || year < 1970 {
        return None;
    }
    let days = days_from_civil(year, month, day);
    Some(days * 86_400 + h * 3600 + m * 60 + sec)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm), year ≥ 1970.
fn days_from_civil(year: u64, month: u64, day: u64) -> u64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y / 400;
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;
    const MS: fn(u64) -> Duration = Duration::from_millis;

    #[test]
    fn ceiling_doubles_from_one_second_to_thirty() {
        // random near 1 shows the ceiling of each attempt.
        let top = 0.999;
        let ceilings: Vec<u64> = (0..8)
            .map(|a| backoff(a, Duration::ZERO, top).as_millis() as u64)
            .collect();
        assert_eq!(
            ceilings,
            vec![999, 1998, 3996, 7992, 15984, 29970, 29970, 29970]
        );
    }

    #[test]
    fn full_jitter_scales_the_ceiling() {
        assert_eq!(backoff(0, Duration::ZERO, 0.0), Duration::ZERO);
        assert_eq!(backoff(0, Duration::ZERO, 0.5), MS(500));
        assert_eq!(backoff(2, Duration::ZERO, 0.25), S(1));
        assert_eq!(backoff(10, Duration::ZERO, 0.5), S(15));
    }

    #[test]
    fn floor_wins_when_larger() {
        assert_eq!(backoff(0, S(3), 0.9), S(3));
        assert_eq!(backoff(5, S(3), 0.5), S(15));
        assert_eq!(backoff(5, S(20), 0.5), S(20));
        // A floor above the cap is honoured (the server asked for it) ...
        assert_eq!(backoff(9, S(90), 0.99), S(90));
        // ... up to MAX_FLOOR.
        assert_eq!(backoff(0, S(1_000_000), 0.0), MAX_FLOOR);
    }

    #[test]
    fn huge_attempts_and_odd_random_values_do_not_panic() {
        for a in [31, 32, 33, 64, u32::MAX] {
            assert_eq!(backoff(a, Duration::ZERO, 0.5), S(15), "attempt {a}");
        }
        assert_eq!(backoff(1, Duration::ZERO, f64::NAN), Duration::ZERO);
        assert_eq!(backoff(1, Duration::ZERO, -3.0), Duration::ZERO);
        assert_eq!(backoff(1, Duration::ZERO, 7.0), S(2));
        assert_eq!(backoff(1, Duration::ZERO, f64::INFINITY), S(2));
        let huge = backoff_with(u32::MAX, Duration::ZERO, 1.0, Duration::MAX, Duration::MAX);
        assert_eq!(huge, Duration::MAX);
    }

    #[test]
    fn custom_base_and_max() {
        let d = |a| backoff_with(a, Duration::ZERO, 0.5, MS(10), MS(100));
        assert_eq!(
            [d(0), d(1), d(2), d(3), d(4), d(20)],
            [MS(5), MS(10), MS(20), MS(40), MS(50), MS(50)]
        );
    }

    #[test]
    fn retry_after_seconds() {
        let now = UNIX_EPOCH + S(1_000_000_000);
        assert_eq!(parse_retry_after("0", now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after(" 120 ", now), Some(S(120)));
        assert_eq!(
            parse_retry_after("99999999999999999999999", now),
            Some(MAX_FLOOR)
        );
        for bad in ["", "-1", "1.5", "+3", "soon", "3 s", "0x10"] {
            assert_eq!(parse_retry_after(bad, now), None, "{bad:?}");
        }
    }

    #[test]
    fn retry_after_http_dates_in_all_three_formats() {
        // 1994-11-06T08:49:37Z is 784111777.
        let now = UNIX_EPOCH + S(784_111_777 - 30);
        for v in [
            "Sun, 06 Nov 1994 08:49:37 GMT",
            "Sunday, 06-Nov-94 08:49:37 GMT",
            "Sun Nov  6 08:49:37 1994",
        ] {
            assert_eq!(parse_retry_after(v, now), Some(S(30)), "{v}");
        }
        // In the past: retry at once.
        let later = UNIX_EPOCH + S(784_111_777 + 5);
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT", later),
            Some(Duration::ZERO)
        );
        // A leap day and a recent date.
        assert_eq!(
            parse_http_date("Thu, 29 Feb 2024 00:00:00 GMT"),
            Some(1_709_164_800)
        );
        assert_eq!(parse_http_date("Thu, 01 Jan 1970 00:00:00 GMT"), Some(0));
        for bad in [
            "Sun, 06 Nov 1994 08:49:37 UTC",
            "Sun, 06 Foo 1994 08:49:37 GMT",
            "Sun, 32 Nov 1994 08:49:37 GMT",
            "Sun, 06 Nov 1994 24:00:00 GMT",
            "Sun, 06 Nov 1994 8:49:37 GMT",
            "Sun 06 Nov 1994 08:49:37 GMT",
            "2024-02-29T00:00:00Z",
        ] {
            assert_eq!(parse_http_date(bad), None, "{bad:?}");
        }
    }
}
