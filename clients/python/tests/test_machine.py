"""The watch rules without sockets: the Rust client's fixtures (the shared
conformance cases) through the parser and the machine, fed whole, byte by
byte and in 7-byte chunks; the status table; dedupe, resets, giving up,
token refresh, and JSON pages."""

from __future__ import annotations

import json
from typing import Any, Dict, List, Union

import pytest
from support import FIXTURES

from jobcast import End, Event, JobcastError, Reset, SseEvent, SseParser, SseRetry
from jobcast._machine import Machine, Out, Settings, verdict

SETTINGS = Settings(give_up_after=300, healthy_after=5, base=1, maximum=30)


def item_json(item: Union[Event, Reset, End, JobcastError]) -> Dict[str, Any]:
    if isinstance(item, Event):
        return {"event": {"id": item.id, "type": item.type, "data": item.data}}
    if isinstance(item, Reset):
        return {"reset": {"reason": item.reason, "requested": item.requested, "resumed_from": item.resumed_from}}
    if isinstance(item, End):
        end: Dict[str, Any] = {"id": item.id, "state": item.state}
        if item.error is not None:
            end["error"] = item.error
        if item.data is not None:
            end["data"] = item.data
        return {"end": end}
    return {"error": item.code}


def feed(m: Machine, p: SseParser, chunk: bytes, out: Out, now: float = 1.0) -> None:
    for f in p.feed(chunk):
        if isinstance(f, SseEvent):
            m.on_sse_event(now, f.last_event_id, f.type, f.data, 0.0, out)
        elif isinstance(f, SseRetry):
            m.on_retry(f.ms)


def sse(m: Machine, text: str, out: Out, now: float = 1.0) -> None:
    feed(m, SseParser(), text.encode(), out, now)


def fixtures() -> List[str]:
    names = sorted(p.stem for p in FIXTURES.glob("*.sse"))
    assert len(names) >= 10, names
    return names


@pytest.mark.parametrize("name", fixtures())
def test_client_fixture(name: str) -> None:
    body = (FIXTURES / f"{name}.sse").read_bytes()
    expect = json.loads((FIXTURES / f"{name}.json").read_text())
    for split in (max(1, len(body)), 1, 7):
        m = Machine("start", SETTINGS, 0.0)
        out: Out = []
        m.on_open(0.0)
        p = SseParser()
        for i in range(0, len(body), split):
            feed(m, p, body[i : i + split], out)
        m.on_closed(1.0, None, 0.0, out)
        assert [item_json(i) for i in out] == expect["items"], f"{name} split {split}"
        rc = expect["reconnect"]
        if rc is None:
            assert m.status == "closed", name
        else:
            assert m.status == "reconnecting", name
            assert m.position() == (("after", rc["last_event_id"]) if rc["last_event_id"] else ("start", None))
            # random 0: the delay is exactly the floor.
            assert round(m.delay * 1000) == (rc.get("floor_ms") or 0), name


def test_status_table() -> None:
    table = [
        (200, True, "open"), (200, False, "stop"), (201, True, "stop"), (204, False, "finish"),
        (204, True, "finish"), (301, False, "stop"), (400, False, "stop"), (401, False, "stop"),
        (403, False, "stop"), (404, False, "stop"), (408, False, "retry"), (409, False, "stop"),
        (429, False, "retry"), (500, False, "retry"), (502, False, "retry"), (503, False, "retry"),
    ]
    for status, es, want in table:
        assert verdict(status, es) == want, status
    for status in (401, 404):
        m = Machine("start", SETTINGS, 0)
        out: Out = []
        m.on_refused(0, status, JobcastError(f"http_{status}", "x", status=status), 0.5, out)
        assert (m.status, m.reason, len(out)) == ("closed", "error", 1)
    m = Machine("start", SETTINGS, 0)
    out = []
    m.on_refused(0, 204, JobcastError("http_204", "x"), 0.5, out)
    assert (m.reason, out) == ("no_content", [])


def test_retry_after_is_a_floor_and_5xx_retries() -> None:
    m = Machine("start", SETTINGS, 0)
    out: Out = []
    m.on_refused(0, 503, JobcastError("store_unavailable", "x", status=503, retry_after=7), 0.5, out)
    assert (m.status, m.delay, out) == ("reconnecting", 7, [])
    m.on_timer()
    assert m.status == "connecting"


def test_dedupe_across_connections_and_reset_moves_the_position() -> None:
    m = Machine("ab-2", SETTINGS, 0)
    out: Out = []
    m.on_open(0)
    sse(m, "id: ab-1\ndata: old\n\nid: ab-3\ndata: new\n\nid: ab-3\ndata: again\n\n", out)
    assert [i.id for i in out if isinstance(i, Event)] == ["ab-3"]
    m.on_closed(1, None, 0, out)
    m.on_timer()
    assert m.position() == ("after", "ab-3")
    m.on_open(2)
    sse(m, 'event: jobcast.reset\ndata: {"reason":"epoch_mismatch","requested":"ab-3","resumed_from":"cd-0"}\n\n'
        "id: cd-1\ndata: fresh\n\n", out)
    assert isinstance(out[1], Reset) and out[1].reason == "epoch_mismatch"
    assert isinstance(out[2], Event) and out[2].id == "cd-1" and out[2].seq == 1
    assert m.position() == ("after", "cd-1")


def test_gives_up_after_the_time_without_a_healthy_connection() -> None:
    m = Machine("start", SETTINGS, 0)
    out: Out = []
    t = 0.0
    for _ in range(100):
        if m.status == "closed":
            break
        m.on_network_error(t, JobcastError("network", "refused", retryable=True), 0.999, out)
        if m.status == "reconnecting":
            t = m.retry_at
            m.on_timer()
    assert m.status == "closed" and m.reason == "gave_up"
    assert t >= 300
    assert isinstance(out[-1], JobcastError) and out[-1].code == "gave_up"
    assert out[-1].last is not None and out[-1].last.code == "network"


def test_a_healthy_connection_resets_the_backoff() -> None:
    m = Machine("start", SETTINGS, 0)
    out: Out = []
    for _ in range(4):
        m.on_network_error(0, JobcastError("network", "x", retryable=True), 0.999, out)
        m.on_timer()
    assert m.attempt == 4
    m.on_open(10)
    sse(m, "id: ab-1\ndata: x\n\n", out)
    m.on_closed(11, None, 0.999, out)
    assert m.attempt == 1 and m.delay == pytest.approx(0.999)
    # Open long enough without events also counts as healthy.
    m.on_timer()
    m.on_network_error(12, JobcastError("network", "x", retryable=True), 0.999, out)
    m.on_timer()
    m.on_open(13)
    m.on_closed(13 + 5, None, 0.5, out)
    assert m.attempt == 1


def test_retryable_error_and_retry_field_are_floors() -> None:
    m = Machine("start", SETTINGS, 0)
    out: Out = []
    m.on_open(0)
    sse(m, 'retry: 2500\n\nevent: jobcast.error\ndata: {"code":"store_unavailable","message":"m",'
        '"retryable":true,"retry_after_ms":4000}\n\n', out)
    assert out == [] and m.status == "reconnecting" and m.delay == 4
    m.on_timer()
    m.on_network_error(1, JobcastError("network", "x", retryable=True), 0, out)
    assert m.delay == 2.5  # the stream's retry: is kept across connections


def test_token_expired_reconnects_only_with_a_token_function() -> None:
    data = 'event: jobcast.error\ndata: {"code":"token_expired","message":"m","retryable":false,"refresh":true}\n\n'
    m = Machine("start", SETTINGS, 0)
    out: Out = []
    m.on_open(0)
    sse(m, data, out)
    assert m.status == "closed" and isinstance(out[0], JobcastError) and out[0].refresh
    m = Machine("start", Settings(can_refresh=True), 0)
    out = []
    m.on_open(0)
    sse(m, "id: ab-1\ndata: x\n\n" + data, out)
    assert m.status == "reconnecting" and m.position() == ("after", "ab-1")
    assert [type(i) for i in out] == [Event]


def test_non_retryable_error_stops() -> None:
    m = Machine("start", SETTINGS, 0)
    out: Out = []
    m.on_open(0)
    sse(m, 'event: jobcast.error\ndata: {"code":"stream_deleted","message":"gone","retryable":false}\n\n', out)
    assert m.reason == "error" and isinstance(out[0], JobcastError) and out[0].code == "stream_deleted"


def test_pages() -> None:
    m = Machine("start", SETTINGS, 0)
    out: Out = []
    m.on_page(0, {"events": [], "next": "ab-0", "state": "open"}, out)
    assert m.position() == ("after", "ab-0")
    page = {
        "events": [
            {"id": "ab-1", "seq": 1, "type": "tick", "data": "1", "time": "2026-01-01T00:00:00.000Z"},
            {"id": "ab-2", "seq": 2, "type": "message", "data": "2", "time": "t"},
        ],
        "next": "ab-2",
        "state": "open",
    }
    m.on_page(1, page, out)
    m.on_page(2, page, out)  # the same page again: nothing new
    assert [(i.id, i.type, i.time) for i in out if isinstance(i, Event)] == [
        ("ab-1", "tick", "2026-01-01T00:00:00.000Z"),
        ("ab-2", "message", "t"),
    ]
    m.on_page(3, {"events": [{"id": "ab-3", "type": "jobcast.end", "data": '{"state":"failed","error":"e"}'}],
                  "next": None, "state": "failed"}, out)
    assert isinstance(out[-1], End) and out[-1].state == "failed" and out[-1].error == "e"
    assert m.reason == "end"
    m = Machine("zz-9", SETTINGS, 0)
    out = []
    m.on_page(0, {"events": [{"id": "cd-1", "type": "message", "data": "x"}], "next": "cd-1",
                  "reset": {"reason": "epoch_mismatch", "requested": "zz-9", "resumed_from": None}}, out)
    assert isinstance(out[0], Reset) and isinstance(out[1], Event) and out[1].id == "cd-1"
    m.on_page(1, {"events": [], "next": None}, out)
    assert m.reason == "end"


def test_live_start_and_bad_from() -> None:
    m = Machine("live", SETTINGS, 0)
    assert m.needs_live_position() and m.position() == ("live", None)
    m.resolve_live(None)
    assert m.position() == ("start", None)
    with pytest.raises(JobcastError) as e:
        Machine("not-an-id!", SETTINGS, 0)
    assert e.value.code == "invalid_event_id"
