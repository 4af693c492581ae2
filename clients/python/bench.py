"""Measures the Python client's throughput against a real server (not a test:
nothing is asserted but "no loss").

    python bench.py [--events 200000] [--server URL | --bin PATH]

- batcher: events/s appended through `Stream.batcher()` (1000 events or 50 ms
  per request), from the first append to the last acknowledgement;
- watch (sync / async): events/s delivered by `watch()` replaying the log;
- live: events/s delivered to a watcher attached while the batcher writes.

Without --server it starts `--bin` (default: the workspace's
target/release/jobcast) on a free port with a temporary SQLite file.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional

import httpx

import jobcast


def start_server(binary: str) -> tuple[str, subprocess.Popen[bytes], str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    tmp = tempfile.mkdtemp(prefix="jobcast-bench-")
    proc = subprocess.Popen(
        [binary, "serve", "--listen", f"127.0.0.1:{port}", "--db", f"sqlite://{tmp}/bench.db"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return url, proc, tmp
        except httpx.HTTPError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit("the server did not start")


def bench_batcher(url: str, stream: str, n: int) -> float:
    with jobcast.Stream(url, stream) as s:
        t0 = time.perf_counter()
        with s.batcher(max_events=1000, max_delay=0.05, max_queue=20_000) as b:
            for i in range(n):
                b.append(f"tok{i}", type="token")
        dt = time.perf_counter() - t0
        assert b.sent == n and b.lost == 0
    return n / dt


def bench_watch(url: str, stream: str, n: int) -> float:
    t0 = time.perf_counter()
    count = 0
    for item in jobcast.watch(url, stream):
        if isinstance(item, jobcast.Event):
            count += 1
    dt = time.perf_counter() - t0
    assert count == n, (count, n)
    return n / dt


def bench_awatch(url: str, stream: str, n: int) -> float:
    async def main() -> float:
        t0 = time.perf_counter()
        count = 0
        async for item in jobcast.watch(url, stream):
            if isinstance(item, jobcast.Event):
                count += 1
        dt = time.perf_counter() - t0
        assert count == n, (count, n)
        return n / dt

    return asyncio.run(main())


def bench_live(url: str, stream: str, n: int) -> float:
    """A watcher attached before the producer starts: events/s it received."""
    w = jobcast.watch(url, stream)
    result: list[float] = []

    def run() -> None:
        count = 0
        t0: Optional[float] = None
        for item in w:
            if isinstance(item, jobcast.Event):
                if t0 is None:
                    t0 = time.perf_counter()
                count += 1
        assert count == n, (count, n)
        result.append(n / (time.perf_counter() - (t0 or 0.0)))

    t = threading.Thread(target=run)
    t.start()
    while w.state != "open":
        time.sleep(0.01)
    bench_batcher(url, stream, n)
    t.join()
    return result[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--server")
    default_bin = os.environ.get("JOBCAST_BIN") or str(Path(__file__).resolve().parents[2] / "target/release/jobcast")
    ap.add_argument("--bin", default=default_bin)
    args = ap.parse_args()
    n = args.events
    proc = None
    tmp = None
    url = args.server
    if url is None:
        url, proc, tmp = start_server(args.bin)
    try:
        stream = f"bench-{int(time.time())}"
        print(f"batcher:         {bench_batcher(url, stream, n):>10,.0f} events/s  ({n} events)")
        print(f"watch (sync):    {bench_watch(url, stream, n):>10,.0f} events/s  (replay)")
        print(f"watch (async):   {bench_awatch(url, stream, n):>10,.0f} events/s  (replay)")
        live = f"{stream}-live"
        print(f"watch (live):    {bench_live(url, live, n):>10,.0f} events/s  (while the batcher writes)")
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(10)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
