"""The Python Durable Streams client (pip package durable-streams, pinned in
requirements.txt) against the real jobcast binary: writes, then reads
catch-up, long-poll and SSE from a saved offset across a kill -9 of the
server (same port, same SQLite file); and reads a stream written with
jobcast's own API. Every wait is bounded (httpx timeouts, item counts)."""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from durable_streams import DurableStream, stream

HERE = pathlib.Path(__file__).resolve().parent
BIN = os.environ.get("JOBCAST_BIN", str(HERE.parents[2] / "target" / "debug" / "jobcast"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    def __init__(self) -> None:
        self.dir = tempfile.TemporaryDirectory()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        db = f"sqlite://{self.dir.name}/jobcast.db"
        self.proc = subprocess.Popen(
            [BIN, "serve", "--listen", f"127.0.0.1:{self.port}", "--db", db, "--ds-long-poll", "2s"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.url}/healthz", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("jobcast did not answer /healthz within 10 s")

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()  # SIGKILL
        self.proc.wait(timeout=10)


@pytest.fixture
def server() -> Iterator[Server]:
    s = Server()
    s.start()
    yield s
    s.kill9()
    s.dir.cleanup()


def items(n: int, first: int) -> list[dict[str, int]]:
    return [{"n": i} for i in range(first, first + n)]


def take(url: str, offset: str, live: str, n: int) -> list[Any]:
    """The first n JSON items from offset, read live (bounded by n and httpx's timeout)."""
    got: list[Any] = []
    with stream(url, offset=offset, live=live, timeout=10) as res:  # type: ignore[arg-type]
        for item in res.iter_json():
            got.append(item)
            if len(got) >= n:
                break
    return got


def test_python_client_resumes_from_an_offset_across_kill_9(server: Server) -> None:
    url = f"{server.url}/ds/v1/stream/py-client-log"
    handle = DurableStream.create(url, content_type="application/json")
    for item in items(10, 1):
        handle.append(item)
    with stream(url, live=False) as res:
        assert res.read_json() == items(10, 1)
        saved = res.offset
    server.kill9()
    server.start()
    handle = DurableStream.connect(url)
    for item in items(10, 11):
        handle.append(item)
    with stream(url, offset=saved, live=False) as res:
        assert res.read_json() == items(10, 11), "catch-up from the saved offset"
    assert take(url, saved, "long-poll", 10) == items(10, 11), "long-poll from the saved offset"
    assert take(url, saved, "sse", 10) == items(10, 11), "SSE from the saved offset"
    with stream(url, live=False) as res:
        assert res.read_json() == items(20, 1), "the whole log after kill -9"


def test_python_client_reads_a_jobcast_stream(server: Server) -> None:
    body = json.dumps([{"type": "tick", "data": {"n": i}} for i in range(1, 4)]).encode()
    req = urllib.request.Request(
        f"{server.url}/v1/streams/py-native/events",
        data=body,
        headers={"content-type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.status == 201
    with stream(f"{server.url}/ds/v1/stream/py-native", live=False) as res:
        assert res.read_json() == items(3, 1)
