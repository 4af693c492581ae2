"""Background batchers for high-rate producers (an LLM's tokens, log lines):
events are encoded at `append` (a bad value fails there), queued, and sent
in one request every `max_delay` seconds or `max_events` events, whichever
comes first, one request at a time so that the log keeps the order of
`append`. The queue is bounded: when `max_queue` events wait, `append`
blocks (the sync batcher) or waits (the async one) until a batch has gone:
back-pressure instead of unbounded memory. Every batch carries its own
Idempotency-Key, kept across its retries, so a retried batch is written once.

A batch that still fails after the retries stops the batcher: that error is
raised by the next `append`, `flush` or `close`; `lost` counts the events
that were not written."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from types import TracebackType
from typing import TYPE_CHECKING, Any, Deque, Iterable, List, Optional, Type

from ._client import MAX_BATCH, encode_event, idempotency_key

if TYPE_CHECKING:
    from ._client import AsyncStream, Stream


class _Common:
    def __init__(self, max_events: int, max_delay: float, max_queue: int, max_bytes: int) -> None:
        if not 1 <= max_events <= MAX_BATCH:
            raise ValueError(f"max_events must be 1..{MAX_BATCH}")
        if max_queue < 1 or max_delay < 0 or max_bytes < 1024:
            raise ValueError("max_queue ≥ 1, max_delay ≥ 0, max_bytes ≥ 1024")
        self.max_events = max_events
        self.max_delay = max_delay
        self.max_queue = max_queue
        self.max_bytes = max_bytes
        self._queue: Deque[bytes] = deque()
        #: When the oldest queued event arrived (None: the queue is empty).
        self._since: Optional[float] = None
        self._closing = False
        self._flush_wanted = False
        self._error: Optional[BaseException] = None
        #: Events appended, acknowledged by the server, and given up on.
        self.appended = 0
        self.sent = 0
        self.lost = 0
        #: Requests made (batches acknowledged).
        self.batches = 0

    def _take(self) -> List[bytes]:
        """The next batch: at most max_events events and max_bytes of body."""
        q = self._queue
        batch: List[bytes] = []
        size = 2
        while q and len(batch) < self.max_events:
            n = len(q[0]) + 1
            if batch and size + n > self.max_bytes:
                break
            batch.append(q.popleft())
            size += n
        self._since = time.monotonic() if q else None
        return batch

    def _due(self) -> Optional[float]:
        """Seconds until the queue should be sent (0: now); None: nothing queued."""
        if not self._queue or self._since is None:
            return None
        if len(self._queue) >= self.max_events or self._closing or self._flush_wanted:
            return 0.0
        return max(0.0, self._since + self.max_delay - time.monotonic())

    def _failed(self, e: BaseException, batch: List[bytes]) -> None:
        self._error = e
        self.lost += len(batch) + len(self._queue)
        self._queue.clear()
        self._since = None

    def _check(self) -> None:
        if self._error is not None:
            raise self._error
        if self._closing:
            raise RuntimeError("the batcher is closed")


class Batcher(_Common):
    """The sync batcher: a daemon thread sends the batches. Made by
    `Stream.batcher()`; a context manager that flushes and stops on exit."""

    def __init__(self, stream: Stream, *, max_events: int, max_delay: float, max_queue: int, max_bytes: int) -> None:
        super().__init__(max_events, max_delay, max_queue, max_bytes)
        self._stream = stream
        self._cond = threading.Condition()
        self._inflight = 0
        self._thread = threading.Thread(target=self._run, name=f"jobcast-batcher-{stream.id}", daemon=True)
        self._thread.start()

    @property
    def thread(self) -> threading.Thread:
        """The thread that sends (a log handler ignores the records it causes)."""
        return self._thread

    def append(self, data: Any, *, type: Optional[str] = None, block: bool = True) -> bool:
        """Queues one event. When the queue is full, waits for room
        (`block=True`) or drops the event and returns False."""
        part = encode_event(data, type)
        with self._cond:
            self._check()
            while len(self._queue) >= self.max_queue:
                if not block:
                    return False
                self._cond.wait()
                self._check()
            if not self._queue:
                self._since = time.monotonic()
            self._queue.append(part)
            self.appended += 1
            if len(self._queue) >= self.max_events or len(self._queue) == 1:
                self._cond.notify_all()
        return True

    def extend(self, items: Iterable[Any], *, type: Optional[str] = None) -> None:
        """Queues events in order (waiting for room as needed)."""
        for d in items:
            self.append(d, type=type)

    def flush(self, timeout: Optional[float] = None) -> None:
        """Sends everything queued now and waits for the server's answers."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            target = self.appended
            self._flush_wanted = True
            self._cond.notify_all()
            while self.sent + self.lost < target and self._error is None:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(f"flush: {target - self.sent} events not acknowledged in time")
                self._cond.wait(left)
            self._flush_wanted = False
            if self._error is not None:
                raise self._error

    def close(self) -> None:
        """Flushes and stops the thread. Idempotent; raises the batcher's error."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join()
        self._stream._forget(self)
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    due = self._due()
                    if due == 0.0:
                        break
                    if due is None and self._closing:
                        return
                    self._cond.wait(due)
                batch = self._take()
                self._inflight = len(batch)
                self._cond.notify_all()  # room in the queue
            body = b"[" + b",".join(batch) + b"]"
            try:
                self._stream._append_raw(body, idempotency_key())
            except BaseException as e:
                with self._cond:
                    self._inflight = 0
                    self._failed(e, batch)
                    self._cond.notify_all()
                return
            with self._cond:
                self._inflight = 0
                self.sent += len(batch)
                self.batches += 1
                self._cond.notify_all()

    def __enter__(self) -> Batcher:
        return self

    def __exit__(
        self, t: Optional[Type[BaseException]], e: Optional[BaseException], tb: Optional[TracebackType]
    ) -> None:
        self.close()


class AsyncBatcher(_Common):
    """The asyncio batcher: a task sends the batches. Made by `AsyncStream.batcher()`."""

    def __init__(
        self, stream: AsyncStream, *, max_events: int, max_delay: float, max_queue: int, max_bytes: int
    ) -> None:
        super().__init__(max_events, max_delay, max_queue, max_bytes)
        self._stream = stream
        self._cond: Optional[asyncio.Condition] = None
        self._task: Optional[asyncio.Task[None]] = None

    def _start(self) -> asyncio.Condition:
        if self._cond is None:
            self._cond = asyncio.Condition()
            self._task = asyncio.get_running_loop().create_task(self._run())
        return self._cond

    async def append(self, data: Any, *, type: Optional[str] = None, block: bool = True) -> bool:
        """Queues one event; waits while the queue is full (or drops it with `block=False`)."""
        part = encode_event(data, type)
        cond = self._start()
        async with cond:
            self._check()
            while len(self._queue) >= self.max_queue:
                if not block:
                    return False
                await cond.wait()
                self._check()
            if not self._queue:
                self._since = time.monotonic()
            self._queue.append(part)
            self.appended += 1
            if len(self._queue) >= self.max_events or len(self._queue) == 1:
                cond.notify_all()
        return True

    async def extend(self, items: Iterable[Any], *, type: Optional[str] = None) -> None:
        for d in items:
            await self.append(d, type=type)

    async def flush(self) -> None:
        cond = self._start()
        async with cond:
            target = self.appended
            self._flush_wanted = True
            cond.notify_all()
            while self.sent + self.lost < target and self._error is None:
                await cond.wait()
            self._flush_wanted = False
            if self._error is not None:
                raise self._error

    async def aclose(self) -> None:
        if self._cond is not None:
            async with self._cond:
                self._closing = True
                self._cond.notify_all()
            assert self._task is not None
            await self._task
        self._closing = True
        self._stream._forget(self)
        if self._error is not None:
            raise self._error

    async def _run(self) -> None:
        cond = self._cond
        assert cond is not None
        while True:
            async with cond:
                while True:
                    due = self._due()
                    if due == 0.0:
                        break
                    if due is None and self._closing:
                        return
                    try:
                        await asyncio.wait_for(cond.wait(), due)
                    except asyncio.TimeoutError:
                        pass
                batch = self._take()
                cond.notify_all()
            body = b"[" + b",".join(batch) + b"]"
            try:
                await self._stream._append_raw(body, idempotency_key())
            except BaseException as e:
                async with cond:
                    self._failed(e, batch)
                    cond.notify_all()
                if isinstance(e, asyncio.CancelledError):
                    raise
                return
            async with cond:
                self.sent += len(batch)
                self.batches += 1
                cond.notify_all()

    async def __aenter__(self) -> AsyncBatcher:
        return self

    async def __aexit__(
        self, t: Optional[Type[BaseException]], e: Optional[BaseException], tb: Optional[TracebackType]
    ) -> None:
        await self.aclose()
