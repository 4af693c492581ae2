"""The producer against the real server: retries across kill -9 restarts
with no duplicates, answers lost after the commit (one Idempotency-Key per
append), the batcher at 20 000 events/s with no loss, the logging handler."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any, List

import pytest
from support import Proxy, Server, until

import jobcast
from jobcast import JobcastError

FAST: Any = dict(backoff_base=0.05, backoff_max=0.3, retry=jobcast.RetryPolicy(max_attempts=100, max_elapsed=30))


def datas(server: Server, stream: str) -> List[Any]:
    return [e["data"] for e in server.log_of(stream) if e["type"] != "jobcast.end"]


def test_retries_across_kill_9_restarts_write_each_event_once() -> None:
    """One event per append, 600 appends; the server is killed (SIGKILL) and
    started again three times while appends are in flight. Each append is
    retried under its own Idempotency-Key until it succeeds: the log holds
    every event once, in order (an append committed just before the kill is
    answered by the replay, not written again)."""
    server = Server()
    server.start()
    try:
        stream = "kill9-produce"
        total = 600
        progress = [0]
        errors: List[BaseException] = []

        def produce() -> None:
            try:
                with jobcast.Stream(server.url, stream, **FAST) as s:
                    for i in range(total):
                        s.append(str(i))
                        progress[0] = i + 1
            except BaseException as e:
                errors.append(e)

        t = threading.Thread(target=produce)
        t.start()
        kills = 0
        for at in (100, 250, 400):
            until(lambda: progress[0] >= at or not t.is_alive(), 30, f"{at} appends")
            assert t.is_alive(), "the producer finished before the kill"
            server.kill9()
            kills += 1
            time.sleep(0.2)  # appends fail (refused) and are retried meanwhile
            server.start()
        t.join(60)
        assert not errors, errors
        assert kills == 3
        log = server.log_of(stream)
        assert [e["data"] for e in log[:-1]] == [str(i) for i in range(total)]
        assert log[-1]["type"] == "jobcast.end" and log[-1]["seq"] == total + 1
    finally:
        server.dispose()


def test_an_answer_lost_after_the_commit_is_replayed_not_appended_again(server: Server) -> None:
    proxy = Proxy(server.url, "drop", drops=3)
    try:
        s = jobcast.Stream(proxy.url, "lost-answers", **FAST)
        answers = [s.append(f"e{i}") for i in range(5)]
        s.complete()
        s.close()
        assert proxy.seen["dropped"] == 3
        assert datas(server, "lost-answers") == [f"e{i}" for i in range(5)]
        assert [a.first_id.split("-")[1] for a in answers] == ["1", "2", "3", "4", "5"]
    finally:
        proxy.close()


def test_batcher_at_20000_events_per_second_loses_nothing(server: Server) -> None:
    """40 000 events offered at 20 000/s (paced in 1 ms steps); every one is
    in the log once, in order. Speed is measured by bench.py, not asserted."""
    stream = "batcher-20k"
    total, rate = 40_000, 20_000
    with jobcast.Stream(server.url, stream) as s:
        with s.batcher(max_events=1000, max_delay=0.02) as b:
            start = time.monotonic()
            i = 0
            while i < total:
                due = int((time.monotonic() - start) * rate) + 20
                while i < min(due, total):
                    b.append(i, type="token")
                    i += 1
                time.sleep(0.001)
        assert b.sent == total and b.lost == 0
        assert b.batches < total / 10, "events were batched"
    got = datas(server, stream)
    assert got == [str(i) for i in range(total)]


def test_async_batcher_and_stream(server: Server) -> None:
    stream = "async-batcher"

    async def main() -> None:
        async with jobcast.AsyncStream(server.url, stream) as s:
            await s.append({"role": "assistant"}, type="start")
            b = s.batcher(max_events=200, max_delay=0.01, max_queue=500)
            for i in range(5000):
                await b.append(f"t{i}", type="token")
        # leaving the block flushed the batcher, then completed
        assert b.sent == 5000

    asyncio.run(main())
    log = server.log_of(stream)
    assert [e["data"] for e in log[1:-1]] == [f"t{i}" for i in range(5000)]
    assert log[-1]["type"] == "jobcast.end"


def test_context_manager_end_states(server: Server) -> None:
    with pytest.raises(ZeroDivisionError):
        with jobcast.Stream(server.url, "cm-fail") as s:
            s.append("working")
            1 / 0
    end = list(jobcast.watch(server.url, "cm-fail"))[-1]
    assert isinstance(end, jobcast.End) and end.state == "failed" and end.error == "division by zero"
    with jobcast.Stream(server.url, "cm-ok") as s:
        s.extend(["a", "b"], type="step")
        s.complete(data={"artifact": "app.tar.gz"})
    end = list(jobcast.watch(server.url, "cm-ok"))[-1]
    assert isinstance(end, jobcast.End) and end.ok and end.data == {"artifact": "app.tar.gz"}
    late = jobcast.Stream(server.url, "cm-ok")
    with pytest.raises(JobcastError) as e:
        late.append("late")
    assert e.value.code == "stream_ended" and e.value.status == 409 and late.ended
    late.close()


def test_logging_handler_streams_records(server: Server) -> None:
    log = logging.getLogger("jobcast-test-app")
    log.setLevel(logging.INFO)
    stream = jobcast.Stream(server.url, "logs")
    handler = jobcast.JobcastHandler(stream, max_delay=0.01)
    log.addHandler(handler)
    # httpx logs every request at INFO: the handler must not feed itself.
    logging.getLogger("httpx").setLevel(logging.INFO)
    logging.getLogger("httpx").addHandler(handler)
    try:
        log.info("step %d", 1)
        log.warning("disk at %d%%", 91)
        try:
            raise RuntimeError("oops")
        except RuntimeError:
            log.exception("failed")
        handler.flush()
    finally:
        log.removeHandler(handler)
        logging.getLogger("httpx").removeHandler(handler)
        handler.close()
    stream.complete()
    stream.close()
    events = [e for e in server.log_of("logs") if e["type"] == "log"]
    import json

    records = [json.loads(e["data"]) for e in events]
    assert [(r["level"], r["message"]) for r in records] == [
        ("INFO", "step 1"),
        ("WARNING", "disk at 91%"),
        ("ERROR", "failed"),
    ]
    assert "RuntimeError: oops" in records[2]["exc"]
    assert records[0]["logger"] == "jobcast-test-app" and records[0]["time"].endswith("Z")
