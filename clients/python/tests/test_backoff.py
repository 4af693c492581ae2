"""The backoff and Retry-After rules (the cases of crates/jobcast-client/src/backoff.rs)."""

from __future__ import annotations

import math

import pytest

from jobcast import backoff, parse_retry_after
from jobcast._backoff import MAX_FLOOR, parse_http_date


def test_ceiling_doubles_from_one_second_to_thirty() -> None:
    ceilings = [round(backoff(a, 0, 0.999) * 1000) for a in range(8)]
    assert ceilings == [999, 1998, 3996, 7992, 15984, 29970, 29970, 29970]


def test_full_jitter_scales_the_ceiling() -> None:
    assert backoff(0, 0, 0.0) == 0
    assert backoff(0, 0, 0.5) == 0.5
    assert backoff(2, 0, 0.25) == 1
    assert backoff(10, 0, 0.5) == 15


def test_floor_wins_when_larger() -> None:
    assert backoff(0, 3, 0.9) == 3
    assert backoff(5, 3, 0.5) == 15
    assert backoff(5, 20, 0.5) == 20
    assert backoff(9, 90, 0.99) == 90  # a floor above the cap is honoured …
    assert backoff(0, 1_000_000, 0.0) == MAX_FLOOR  # … up to MAX_FLOOR


def test_odd_inputs() -> None:
    for a in (31, 32, 64, 2**32, 10**9):
        assert backoff(a, 0, 0.5) == 15
    assert backoff(1, 0, math.nan) == 0
    assert backoff(1, 0, -3.0) == 0
    assert backoff(1, 0, 7.0) == 2
    assert backoff(1, 0, math.inf) == 2
    assert backoff(-5, 0, 0.5) == 0.5
    assert backoff(0, math.nan, 0.5) == 0.5


def test_custom_base_and_max() -> None:
    got = [backoff(a, 0, 0.5, 0.01, 0.1) for a in (0, 1, 2, 3, 4, 20)]
    assert got == pytest.approx([0.005, 0.01, 0.02, 0.04, 0.05, 0.05])


def test_retry_after_seconds() -> None:
    now = 1_000_000_000.0
    assert parse_retry_after("0", now) == 0
    assert parse_retry_after(" 120 ", now) == 120
    assert parse_retry_after("99999999999999999999999", now) == MAX_FLOOR
    for bad in ["", "-1", "1.5", "+3", "soon", "3 s", "0x10", "١٢"]:
        assert parse_retry_after(bad, now) is None, bad
    assert parse_retry_after(None, now) is None


def test_retry_after_http_dates_in_all_three_formats() -> None:
    now = 784_111_777 - 30.0
    for v in ["Sun, 06 Nov 1994 08:49:37 GMT", "Sunday, 06-Nov-94 08:49:37 GMT", "Sun Nov  6 08:49:37 1994"]:
        assert parse_retry_after(v, now) == 30, v
    assert parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT", 784_111_777 + 5.0) == 0
    assert parse_http_date("Thu, 29 Feb 2024 00:00:00 GMT") == 1_709_164_800
    assert parse_http_date("Thu, 01 Jan 1970 00:00:00 GMT") == 0
    for bad in [
        "Sun, 06 Nov 1994 08:49:37 UTC",
        "Sun, 06 Foo 1994 08:49:37 GMT",
        "Sun, 32 Nov 1994 08:49:37 GMT",
        "Sun, 06 Nov 1994 24:00:00 GMT",
        "Sun, 06 Nov 1994 8:49:37 GMT",
        "Sun 06 Nov 1994 08:49:37 GMT",
        "2024-02-29T00:00:00Z",
    ]:
        assert parse_http_date(bad) is None, bad
