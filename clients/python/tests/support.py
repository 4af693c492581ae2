"""Test support: the real jobcast binary on a free loopback port with a real
SQLite file, restartable (SIGTERM or kill -9) on the same port and file; a
small asyncio HTTP proxy that breaks things on purpose. Every wait is bounded."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import httpx

HERE = Path(__file__).resolve().parent
#: The release binary: JOBCAST_BIN (scripts/test sets it) or the workspace's target/.
BIN = os.environ.get("JOBCAST_BIN") or str(HERE.parents[2] / "target" / "release" / "jobcast")
FIXTURES = HERE.parents[2] / "crates" / "jobcast-client" / "tests" / "fixtures"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def until(cond: Callable[[], Any], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {seconds} s waiting for {what}")
        time.sleep(0.02)


class Server:
    """A jobcast server process."""

    def __init__(self, args: Optional[List[str]] = None) -> None:
        self.dir = tempfile.mkdtemp(prefix="jobcast-py-")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = [
            "serve",
            "--listen",
            f"127.0.0.1:{self.port}",
            "--db",
            f"sqlite://{self.dir}/jobcast.db",
            "--retry",
            "200ms",
            "--heartbeat",
            "1s",
            "--shutdown-grace",
            "2s",
            *(args or []),
        ]
        self.proc: Optional[subprocess.Popen[bytes]] = None
        self.log = Path(self.dir) / "server.log"

    def start(self) -> None:
        env = {**os.environ, "RUST_LOG": "warn"}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([BIN, *self.args], stdout=log, stderr=log, env=env)
        deadline = time.monotonic() + 10
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"jobcast exited {self.proc.returncode}: {self.log.read_text()}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not answer /healthz in 10 s")
            time.sleep(0.05)

    def kill9(self) -> None:
        """SIGKILL: no shutdown, nothing flushed that was not committed."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def dispose(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- small API helpers (plain httpx, independent of the client under test)

    def post(self, path: str, body: Any = None, headers: Optional[Dict[str, str]] = None) -> Tuple[int, Any]:
        r = httpx.post(
            self.url + path,
            content=None if body is None else json.dumps(body),
            headers={"content-type": "application/json", **(headers or {})},
            timeout=30,
        )
        return r.status_code, (r.json() if r.content else None)

    def publish_range(self, stream: str, first: int, last: int, headers: Optional[Dict[str, str]] = None) -> None:
        for lo in range(first, last + 1, 1000):
            batch = [{"type": "tick", "data": {"n": i}} for i in range(lo, min(last, lo + 999) + 1)]
            status, body = self.post(f"/v1/streams/{stream}/events", batch, headers)
            assert status == 201, (status, body)

    def complete(self, stream: str, headers: Optional[Dict[str, str]] = None) -> None:
        status, body = self.post(f"/v1/streams/{stream}/complete", {"data": {"ok": True}}, headers)
        assert status == 200, (status, body)

    def log_of(self, stream: str, headers: Optional[Dict[str, str]] = None) -> List[Dict[str, Any]]:
        """The whole log through the JSON pages."""
        out: List[Dict[str, Any]] = []
        after: Optional[str] = None
        for _ in range(10_000):
            params = {"limit": "1000"}
            if after:
                params["after"] = after
            r = httpx.get(f"{self.url}/v1/streams/{stream}/events", params=params, headers=headers, timeout=30)
            assert r.status_code == 200, r.text
            page = r.json()
            out.extend(page["events"])
            if not page["events"] or page["next"] is None:
                return out
            after = page["next"]
        raise AssertionError("log_of: too many pages")


def _close_head(head: bytes) -> bytes:
    """A response head with `Connection: close` instead of any keep-alive."""
    lines = head.decode("latin-1").split("\r\n")
    kept = [ln for ln in lines if ln and not ln.lower().startswith(("connection:", "keep-alive:"))]
    return ("\r\n".join([*kept, "Connection: close", "", ""])).encode("latin-1")


class Proxy:
    """An HTTP/1.1 proxy in front of `upstream` (one request per connection,
    `Connection: close`), on its own thread and event loop. `mode`:

    - `buffer`: holds SSE responses (headers included) until the upstream
      closes, as some proxies do; JSON passes through;
    - `drop`: forwards the first `drops` POSTs to the upstream (they are
      committed) and closes the client's connection without an answer;
    - `pass`: passes everything through.
    """

    def __init__(self, upstream: str, mode: str, drops: int = 0) -> None:
        self.upstream = httpx.URL(upstream)
        self.mode = mode
        self.drops = drops
        self.seen: Dict[str, int] = {"sse": 0, "json": 0, "dropped": 0}
        self.port = 0
        self._loop: asyncio.AbstractEventLoop
        self._ready = threading.Event()
        self._server: Optional[asyncio.AbstractServer] = None
        self._thread = threading.Thread(target=self._main, daemon=True)
        self._thread.start()
        if not self._ready.wait(5):
            raise RuntimeError("proxy did not start")
        self.url = f"http://127.0.0.1:{self.port}"

    def _main(self) -> None:
        self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._start())
        self._ready.set()
        self._loop.run_forever()

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _handle(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        uw: Optional[asyncio.StreamWriter] = None
        try:
            head = await asyncio.wait_for(cr.readuntil(b"\r\n\r\n"), 30)
            lines = head.decode("latin-1").split("\r\n")
            headers = [ln for ln in lines[1:] if ln and not ln.lower().startswith(("connection:", "keep-alive:"))]
            length = 0
            sse = False
            for ln in headers:
                name, _, value = ln.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value.strip())
                if name.strip().lower() == "accept" and "text/event-stream" in value:
                    sse = True
            body = await cr.readexactly(length) if length else b""
            self.seen["sse" if sse else "json"] += 1
            ur, uw = await asyncio.open_connection(self.upstream.host, self.upstream.port)
            uw.write(("\r\n".join([lines[0], *headers, "Connection: close", "", ""])).encode("latin-1") + body)
            await uw.drain()
            drop = self.mode == "drop" and lines[0].startswith("POST") and self.seen["dropped"] < self.drops
            if drop or (self.mode == "buffer" and sse):
                # Read the whole answer first, and give up when the client leaves.
                reading = asyncio.ensure_future(ur.read())
                leaving = asyncio.ensure_future(cr.read(1))
                done, _ = await asyncio.wait({reading, leaving}, timeout=60, return_when=asyncio.FIRST_COMPLETED)
                if reading not in done:
                    reading.cancel()
                    leaving.cancel()
                    return
                leaving.cancel()
                if drop:
                    self.seen["dropped"] += 1
                    return
                answer = reading.result()
                end = answer.find(b"\r\n\r\n")
                if end >= 0:
                    answer = _close_head(answer[: end + 4]) + answer[end + 4 :]
                cw.write(answer)
                await cw.drain()
                return
            # The client must not reuse this connection: one request per connection.
            cw.write(_close_head(await ur.readuntil(b"\r\n\r\n")))
            while True:
                chunk = await ur.read(65536)
                if not chunk:
                    break
                cw.write(chunk)
                await cw.drain()
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError):
            pass
        finally:
            if uw is not None:
                uw.close()
            cw.close()

    def close(self) -> None:
        async def stop() -> None:
            if self._server is not None:
                self._server.close()
            for t in asyncio.all_tasks():
                if t is not asyncio.current_task():
                    t.cancel()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
