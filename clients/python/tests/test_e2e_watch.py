"""The watcher against the real server: exactly once across kill -9 and
SIGTERM restarts, resets after delete/recreate, 204 at the end, `live`."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any, List

import httpx
import pytest
from support import Server, until

import jobcast
from jobcast import End, Event, JobcastError, Reset

FAST: Any = dict(backoff_base=0.05, backoff_max=0.5, random=lambda: 0.5)


def test_exactly_once_across_a_kill_9_restart_mid_stream() -> None:
    """10 000 events published while the watcher reads; the server is killed
    (SIGKILL) mid-stream and started again on the same port and SQLite file.
    The watcher resumes with Last-Event-ID: every seq once, in order."""
    server = Server()
    server.start()
    try:
        stream = "kill9-watch"
        total = 10_000
        errors: List[BaseException] = []

        def produce() -> None:
            try:
                with jobcast.Client(
                    server.url, retry=jobcast.RetryPolicy(max_attempts=200, max_elapsed=60), **FAST
                ) as c:
                    for lo in range(1, total + 1, 100):
                        c.extend(stream, [{"n": i} for i in range(lo, lo + 100)], type="tick")
                        time.sleep(0.01)
                    c.complete(stream, {"ok": True})
            except BaseException as e:  # reported by the test thread
                errors.append(e)

        producer = threading.Thread(target=produce)
        producer.start()
        killed = threading.Event()

        def kill_and_restart() -> None:
            server.kill9()
            time.sleep(0.3)
            server.start()

        restarter = threading.Thread(target=kill_and_restart)
        seqs: List[int] = []
        ns: List[int] = []
        w = jobcast.watch(server.url, stream, **FAST)
        end = None
        for item in w:
            if isinstance(item, Event):
                seqs.append(item.seq)
                ns.append(item.json()["n"])
                if len(seqs) == 3000 and not killed.is_set():
                    killed.set()
                    restarter.start()
            elif isinstance(item, End):
                end = item
            else:
                pytest.fail(f"unexpected {item}")
        producer.join(60)
        restarter.join(30)
        assert not errors, errors
        assert killed.is_set()
        assert seqs == list(range(1, total + 1))
        assert ns == list(range(1, total + 1)), "the producer's retries wrote nothing twice"
        assert end is not None and end.state == "completed" and end.data == {"ok": True}
        assert w.end == end and w.close_reason == "end"
        assert w.reconnects >= 1
        assert len(server.log_of(stream)) == total + 1
    finally:
        server.dispose()


def test_async_exactly_once_across_a_sigterm_restart() -> None:
    """SIGTERM sends `shutting_down` (retryable): the async watch resumes."""
    server = Server()
    server.start()
    try:
        stream = "sigterm-watch"
        server.publish_range(stream, 1, 500)

        async def main() -> List[int]:
            seqs: List[int] = []
            restarted = False
            async for item in jobcast.watch(server.url, stream, **FAST):
                if isinstance(item, Event):
                    seqs.append(item.seq)
                    if item.seq == 500 and not restarted:
                        restarted = True
                        await asyncio.get_running_loop().run_in_executor(None, restart_and_publish)
                elif isinstance(item, End):
                    break
            return seqs

        def restart_and_publish() -> None:
            server.stop()
            server.start()
            server.publish_range(stream, 501, 1000)
            server.complete(stream)

        assert asyncio.run(main()) == list(range(1, 1001))
    finally:
        server.dispose()


def test_reset_after_delete_and_recreate(server: Server) -> None:
    stream = "recreated"
    server.publish_range(stream, 1, 3)
    w = jobcast.watch(server.url, stream, **FAST)
    got = []
    for item in w:
        got.append(item)
        if len(got) == 3:
            break
    last = w.last_event_id
    assert last is not None and last.endswith("-3")
    # A live watcher of the deleted stream gets stream_deleted (not retried).
    live = jobcast.watch(server.url, stream, from_=last, **FAST)
    failed: List[JobcastError] = []

    def run_live() -> None:
        try:
            for _ in live:
                pass
        except JobcastError as e:
            failed.append(e)

    t = threading.Thread(target=run_live)
    t.start()
    until(lambda: live.state == "open", 5, "the live watcher to connect")
    assert httpx.delete(f"{server.url}/v1/streams/{stream}").status_code == 204
    t.join(10)
    assert [e.code for e in failed] == ["stream_deleted"]
    server.publish_range(stream, 1, 2)
    server.complete(stream)
    items = list(jobcast.watch(server.url, stream, from_=last, **FAST))
    assert isinstance(items[0], Reset)
    assert items[0].reason == "epoch_mismatch" and items[0].requested == last
    evs = [i for i in items if isinstance(i, Event)]
    assert [e.seq for e in evs] == [1, 2]
    assert evs[0].id.split("-")[0] != last.split("-")[0], "a new epoch"
    assert isinstance(items[-1], End)


def test_204_at_the_end_and_live_start(server: Server) -> None:
    stream = "live-and-end"
    server.publish_range(stream, 1, 3)
    seen: List[int] = []
    w = jobcast.watch(server.url, stream, from_="live", **FAST)

    def run() -> None:
        for item in w:
            if isinstance(item, Event):
                seen.append(item.seq)

    t = threading.Thread(target=run)
    t.start()
    until(lambda: w.state == "open", 5, "the live watch to connect")
    server.publish_range(stream, 4, 5)
    server.complete(stream)
    t.join(10)
    assert seen == [4, 5]
    assert w.end is not None and w.end.id is not None
    # Resuming at the end: 204, nothing more, no End either.
    again = jobcast.watch(server.url, stream, from_=w.end.id)
    assert list(again) == []
    assert again.close_reason == "no_content"


def test_unknown_stream_waits_then_stops_and_bad_input_raises(server: Server) -> None:
    with pytest.raises(JobcastError) as e:
        jobcast.watch(server.url, "bad id")
    assert e.value.code == "invalid_stream_id"
    with pytest.raises(JobcastError) as e:
        list(jobcast.watch(server.url + "/nope", "x", **FAST))
    assert e.value.status == 404
    with pytest.raises(RuntimeError):
        w = jobcast.watch(server.url, "x")
        iter(w)
        iter(w)


def test_the_first_byte_timeout_does_not_apply_to_an_idle_stream(server: Server) -> None:
    """A 0.3 s first-byte timeout covers the response headers only; between
    heartbeats (1 s here) reads wait up to read_timeout."""
    stream = "idle"
    server.publish_range(stream, 1, 1)
    w = jobcast.watch(server.url, stream, first_byte_timeout=0.3, read_timeout=5, **FAST)
    seqs: List[int] = []

    def run() -> None:
        for item in w:
            if isinstance(item, Event):
                seqs.append(item.seq)

    t = threading.Thread(target=run)
    t.start()
    until(lambda: seqs == [1], 5, "the first event")
    time.sleep(2.5)
    server.publish_range(stream, 2, 2)
    server.complete(stream)
    t.join(10)
    assert seqs == [1, 2] and w.reconnects == 0 and w.transport == "sse"
