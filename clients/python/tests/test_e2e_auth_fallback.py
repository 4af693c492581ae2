"""Against the real server: token expiry and refresh (`--jwt-secret`), and
the long-poll fallback behind a proxy that buffers SSE."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any, Dict, Iterator, List, Optional

import jwt
import pytest
from support import Proxy, Server, until

import jobcast
from jobcast import End, Event, JobcastError

SECRET = "a-test-secret-for-jobcast-python-client-0123456789"
FAST: Any = dict(backoff_base=0.05, backoff_max=0.3, random=lambda: 0.5)


def token(seconds: float, grants: Optional[Dict[str, List[str]]] = None) -> str:
    claims = {"jobcast": grants or {"publish": ["*"], "subscribe": ["*"]}, "exp": int(time.time() + seconds)}
    return jwt.encode(claims, SECRET, algorithm="HS256")


@pytest.fixture(scope="module")
def auth_server() -> Iterator[Server]:
    s = Server(["--jwt-secret", SECRET, "--jwt-leeway", "0s"])
    s.start()
    try:
        yield s
    finally:
        s.dispose()


def collect(w: jobcast.Watch, items: List[Any], errors: List[BaseException], mode: str = "sync") -> threading.Thread:
    """Runs the watch on a thread: `for` (sync) or `async for` in its own event loop."""

    async def arun() -> None:
        async for item in w:
            items.append(item)

    def run() -> None:
        try:
            if mode == "sync":
                for item in w:
                    items.append(item)
            else:
                asyncio.run(arun())
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=run)
    t.start()
    return t


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_token_expiry_and_refresh(auth_server: Server, mode: str) -> None:
    """Each connection gets a token valid for ~2 s; the server closes the
    stream with `token_expired` (refresh: true) and the watch reconnects with
    a fresh one, resuming where it was: every event once. The async watch
    takes a coroutine function."""
    stream = f"auth-refresh-{mode}"
    admin = jobcast.Client(auth_server.url, token=token(3600), **FAST)
    minted: List[str] = []

    def fresh() -> str:
        minted.append(token(2, {"subscribe": [stream]}))
        return minted[-1]

    async def afresh() -> str:
        await asyncio.sleep(0)
        return fresh()

    items: List[Any] = []
    errors: List[BaseException] = []
    w = jobcast.watch(auth_server.url, stream, token=fresh if mode == "sync" else afresh, **FAST)
    t = collect(w, items, errors, mode)
    for i in range(1, 46):
        admin.append(stream, {"n": i})
        time.sleep(0.1)
    admin.complete(stream)
    t.join(20)
    admin.close()
    assert not errors, errors
    assert [i.seq for i in items if isinstance(i, Event)] == list(range(1, 46))
    assert isinstance(items[-1], End)
    assert len(minted) >= 3, "reconnected with fresh tokens"
    assert w.reconnects >= 2


def test_an_expired_fixed_token_stops_and_401_is_not_retried(auth_server: Server) -> None:
    stream = "auth-fixed"
    admin = jobcast.Client(auth_server.url, token=token(3600))
    admin.append(stream, "x")
    w = jobcast.watch(auth_server.url, stream, token=token(1), **FAST)
    with pytest.raises(JobcastError) as e:
        for _ in w:
            pass
    assert e.value.code == "token_expired" and e.value.refresh
    for bad in (None, jwt.encode({"exp": int(time.time()) + 60, "jobcast": {"subscribe": ["*"]}}, "other-secret-0123456789-0123456789")):
        w = jobcast.watch(auth_server.url, stream, token=bad, **FAST)
        with pytest.raises(JobcastError) as e:
            list(w)
        assert e.value.status == 401 and w.reconnects == 0
    # A producer without the publish grant: 403, not retried.
    with pytest.raises(JobcastError) as e:
        jobcast.Client(auth_server.url, token=token(60, {"subscribe": ["*"]})).append(stream, "y")
    assert e.value.status == 403
    admin.close()


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_long_poll_fallback_behind_a_proxy_that_buffers_sse(server: Server, mode: str) -> None:
    stream = f"fallback-buffer-{mode}"
    proxy = Proxy(server.url, "buffer")
    try:
        server.publish_range(stream, 1, 3)
        items: List[Any] = []
        errors: List[BaseException] = []
        w = jobcast.watch(proxy.url, stream, first_byte_timeout=0.3, fallback_after=2, poll_wait=1, **FAST)
        t = collect(w, items, errors, mode)
        until(lambda: len(items) == 3, 15, "events 1..3 through long-poll")
        server.publish_range(stream, 4, 6)
        until(lambda: len(items) == 6, 15, "events 4..6 through long-poll")
        server.publish_range(stream, 7, 7)
        server.complete(stream)
        t.join(15)
        assert not errors, errors
        events = [i for i in items if isinstance(i, Event)]
        assert [e.seq for e in events] == list(range(1, 8))
        assert all(e.time and e.time.endswith("Z") for e in events), "pages carry the time"
        assert isinstance(items[-1], End) and items[-1].state == "completed"
        assert w.transport == "poll" and w.close_reason == "end"
        assert proxy.seen["sse"] == 2, "two SSE attempts before the fallback"
        assert proxy.seen["json"] >= 2
    finally:
        proxy.close()


def test_forced_long_poll_across_a_restart() -> None:
    server = Server()
    server.start()
    try:
        stream = "poll-restart"
        server.publish_range(stream, 1, 2)
        items: List[Any] = []
        errors: List[BaseException] = []
        w = jobcast.watch(server.url, stream, transport="poll", poll_wait=1, **FAST)
        t = collect(w, items, errors)
        until(lambda: len(items) == 2, 10, "events 1, 2")
        server.kill9()
        server.start()
        server.publish_range(stream, 3, 4)
        server.complete(stream)
        t.join(15)
        assert not errors, errors
        assert [i.seq for i in items if isinstance(i, Event)] == [1, 2, 3, 4]
        assert isinstance(items[-1], End)
    finally:
        server.dispose()
