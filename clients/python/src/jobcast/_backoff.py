"""Reconnect and retry delays: exponential backoff with full jitter, and the
`Retry-After` header. Pure functions: no clock and no random source of their
own (both are arguments). Mirrors crates/jobcast-client/src/backoff.rs
(durations in seconds here)."""

from __future__ import annotations

import math
import re
from typing import Optional

#: The ceiling of the first retry (attempt 0), seconds.
BASE = 1.0
#: The largest ceiling, seconds.
MAX = 30.0
#: The longest floor honoured (a `retry:`, `retry_after_ms` or `Retry-After`
#: beyond it is taken as this), so a bogus value cannot park a client forever.
MAX_FLOOR = 3600.0


def backoff(
    attempt: int,
    floor: float,
    random: float,
    base: float = BASE,
    maximum: float = MAX,
) -> float:
    """The delay before retry number `attempt` (0 for the first retry): full
    jitter, `random × min(maximum, base × 2^attempt)`, then at least `floor`
    (itself at most MAX_FLOOR). `random` is a sample of [0, 1): clamped, NaN
    counts as 0."""
    a = max(0, int(attempt))
    ceiling = maximum if a >= 1024 else min(maximum, base * 2.0**a)
    r = 0.0 if math.isnan(random) else min(1.0, max(0.0, random))
    jitter = min(ceiling, ceiling * r)
    f = 0.0 if math.isnan(floor) else min(max(0.0, floor), MAX_FLOOR)
    return max(jitter, f)


_MONTHS = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]
_IMF = re.compile(r"[A-Za-z]{3}, (\d{2}) ([A-Za-z]{3}) (\d{4}) (\d{2}):(\d{2}):(\d{2}) GMT")
_RFC850 = re.compile(r"[A-Za-z]+, (\d{2})-([A-Za-z]{3})-(\d{2}) (\d{2}):(\d{2}):(\d{2}) GMT")
_ASCTIME = re.compile(r"[A-Za-z]{3} ([A-Za-z]{3}) +(\d{1,2}) (\d{2}):(\d{2}):(\d{2}) (\d{4})")


def parse_retry_after(value: Optional[str], now: float) -> Optional[float]:
    """A `Retry-After` value as a delay in seconds (at most MAX_FLOOR):
    delay-seconds, or an HTTP-date (IMF-fixdate, RFC 850 or asctime, as RFC
    9110 asks recipients to accept) relative to `now` (Unix seconds). A date in
    the past means no delay. None when unparseable."""
    if value is None:
        return None
    v = value.strip()
    if v and v.isascii() and v.isdigit():
        return min(float(int(v)), MAX_FLOOR)
    at = parse_http_date(v)
    if at is None:
        return None
    return min(max(0.0, at - now), MAX_FLOOR)


def parse_http_date(s: str) -> Optional[int]:
    """Seconds since the Unix epoch of an HTTP-date, or None."""
    m = _IMF.fullmatch(s)
    if m:
        day, mon, year, h, mi, sec = m.groups()
        y = int(year)
    else:
        m = _RFC850.fullmatch(s)
        if m:
            day, mon, yy, h, mi, sec = m.groups()
            y = 2000 + int(yy) if int(yy) < 70 else 1900 + int(yy)
        else:
            m = _ASCTIME.fullmatch(s)
            if not m:
                return None
            mon, day, h, mi, sec, year = m.groups()
            y = int(year)
    if mon not in _MONTHS:
        return None
    month = _MONTHS.index(mon) + 1
    d, hh, mm, ss = int(day), int(h), int(mi), int(sec)
    if not (1 <= d <= 31) or hh > 23 or mm > 59 or ss > 60 or y < 1970:
        return None
    return _days_from_civil(y, month, d) * 86400 + hh * 3600 + mm * 60 + ss


def _days_from_civil(year: int, month: int, day: int) -> int:
    """Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm)."""
    y = year - 1 if month <= 2 else year
    era = y // 400
    yoe = y - era * 400
    mp = (month + 9) % 12
    doy = (153 * mp + 2) // 5 + day - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468
