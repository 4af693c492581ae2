"""The producer side: `Client` / `AsyncClient` (every request of the HTTP
API, retried safely) and `Stream` / `AsyncStream` (one stream's producer,
a context manager that ends it). The retry rules are written once, as a
generator of I/O operations that the sync and the async driver perform."""

from __future__ import annotations

import inspect
import json
import random as _random
import threading
import time
import uuid
from dataclasses import dataclass
from types import TracebackType
from typing import (
    TYPE_CHECKING,
    Any,
    Callable,
    Dict,
    Generator,
    Iterable,
    List,
    Optional,
    Tuple,
    Type,
    TypeVar,
    Union,
)

import httpx
import logging

from ._backoff import backoff
from ._types import Appended, JobcastError, NewEvent, valid_event_type, valid_stream_id
from ._watch import DEFAULT_URL, TokenSource, Watch, _error_of

if TYPE_CHECKING:
    import asyncio

    from ._batcher import AsyncBatcher, Batcher

#: The server's largest batch (`--max-batch`, default 1000).
MAX_BATCH = 1000
_log = logging.getLogger("jobcast")
T = TypeVar("T")


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


#: "No value given" (`complete()` without data differs from `complete(data=None)`).
MISSING: Any = _Missing()


@dataclass(frozen=True)
class RetryPolicy:
    """How producer requests are retried: network errors, 5xx, 408 and 429
    (and one `token_expired` when the token is a function), with backoff and
    full jitter, `Retry-After` as a floor, until either bound is reached."""

    #: Attempts in all, the first included (1 = no retry).
    max_attempts: int = 10
    #: No new attempt starts after this many seconds since the first.
    max_elapsed: float = 120.0


def idempotency_key() -> str:
    """A random 128-bit Idempotency-Key, as 32 hex digits."""
    return uuid.uuid4().hex


def encode_event(data: Any, type: Optional[str] = None) -> bytes:
    """One event as the API's JSON (`{"type"?, "data"}`), checked here so that
    a bad value fails at the call, not in a background flush."""
    if isinstance(data, NewEvent):
        data, type = data.data, data.type if data.type is not None else type
    if type is not None and not valid_event_type(type):
        raise JobcastError(
            "invalid_event_type",
            f"not an event type (or reserved: jobcast.…): {type!r}",
        )
    if isinstance(data, str) and data == "":
        raise JobcastError("empty_data", "data must not be empty (browsers drop such events); send null instead")
    ev: Dict[str, Any] = {"data": data} if type is None else {"type": type, "data": data}
    try:
        return json.dumps(ev, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")
    except (TypeError, ValueError) as e:
        raise JobcastError("invalid_data", f"data is not JSON-serialisable: {e}") from e


def _check_stream(stream: str) -> None:
    if not valid_stream_id(stream):
        raise JobcastError("invalid_stream_id", f"not a stream id: {stream!r}")


def _appended(body: Any) -> Appended:
    if not isinstance(body, dict):
        raise JobcastError("protocol", f"an append answer that is not an object: {body!r}")
    return Appended(
        first_id=str(body.get("first_id")),
        last_id=str(body.get("last_id")),
        count=int(body.get("count", 0)),
        cancel_requested=body.get("cancel_requested") is True,
        raw=body,
    )


def _combine(parts: List[Appended]) -> Appended:
    if len(parts) == 1:
        return parts[0]
    return Appended(
        first_id=parts[0].first_id,
        last_id=parts[-1].last_id,
        count=sum(p.count for p in parts),
        cancel_requested=any(p.cancel_requested for p in parts),
        raw={"batches": [p.raw for p in parts]},
    )


def _batches(items: Iterable[Any], type: Optional[str]) -> List[bytes]:
    """Bodies of at most MAX_BATCH events each (at least one)."""
    parts = [encode_event(d, type) for d in items]
    if not parts:
        raise JobcastError("empty_batch", "extend() needs at least one event")
    return [b"[" + b",".join(parts[i : i + MAX_BATCH]) + b"]" for i in range(0, len(parts), MAX_BATCH)]


# -- the request logic, written once ----------------------------------------


@dataclass
class _Http:
    method: str
    url: str
    headers: Dict[str, str]
    content: Optional[bytes]


@dataclass
class _Pause:
    seconds: float


@dataclass
class _GetToken:
    pass


_ReqOp = Union[_Http, _Pause, _GetToken]


class _Core:
    """What Client and AsyncClient share: options and the retry logic."""

    def __init__(
        self,
        url: str,
        token: TokenSource,
        timeout: float,
        retry: RetryPolicy,
        backoff_base: float,
        backoff_max: float,
        random: Callable[[], float],
    ) -> None:
        self.url = (url or DEFAULT_URL).strip().rstrip("/")
        self.token = token
        self.timeout = timeout
        self.retry = retry
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.random = random

    def request(
        self,
        method: str,
        path: str,
        content: Optional[bytes] = None,
        key: Optional[str] = None,
        not_found_after_retry_ok: bool = False,
    ) -> Generator[_ReqOp, Any, Tuple[int, bytes]]:
        """Sends a request, retrying per the RetryPolicy; returns (status, body) of a 2xx."""
        url = self.url + path
        started = time.monotonic()
        attempt = 0
        uncertain = False
        refreshed = False
        while True:
            headers: Dict[str, str] = {"accept": "application/json"}
            if content is not None:
                headers["content-type"] = "application/json"
            if key is not None:
                headers["idempotency-key"] = key
            token = (yield _GetToken()) if callable(self.token) else self.token
            if token:
                headers["authorization"] = f"Bearer {token}"
            try:
                status, rheaders, body = yield _Http(method, url, headers, content)
            except (httpx.TransportError, OSError) as e:
                uncertain = True
                error = JobcastError("network", f"{method} {url}: {type(e).__name__}: {e}", retryable=True)
                floor = 0.0
            else:
                if 200 <= status < 300:
                    return status, body
                if status == 404 and uncertain and not_found_after_retry_ok:
                    return 204, b""
                error = _error_of(status, rheaders, body)
                if error.code == "token_expired" and callable(self.token) and not refreshed:
                    refreshed = True  # ask the function again, once, at once
                    continue
                if not error.retryable:
                    raise error
                # A 5xx may have come after the work was done (e.g. a proxy timeout).
                uncertain = True
                floor = error.retry_after or 0.0
            attempt += 1
            delay = backoff(attempt - 1, floor, self.random(), self.backoff_base, self.backoff_max)
            elapsed = time.monotonic() - started
            if attempt >= self.retry.max_attempts or elapsed + delay > self.retry.max_elapsed:
                if attempt == 1:
                    raise error
                raise JobcastError(
                    "gave_up",
                    f"gave up after {attempt} attempts in {elapsed:.3f} s: {error}",
                    status=error.status,
                    last=error,
                )
            yield _Pause(delay)


def _json(status: int, body: bytes) -> Any:
    try:
        return json.loads(body) if body else None
    except ValueError as e:
        raise JobcastError("protocol", f"a {status} answer that is not JSON: {body[:200]!r}") from e


def _end_body(data: Any) -> Optional[bytes]:
    if data is MISSING:
        return None
    return json.dumps({"data": data}, ensure_ascii=False, separators=(",", ":")).encode()


class Client:
    """A jobcast client (sync, on httpx.Client; thread-safe). Producer
    requests are retried on network errors, 5xx, 408 and 429 per `retry`;
    appends, complete and fail carry an Idempotency-Key kept across the
    retries of one call, so a retry never appends twice."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        token: TokenSource = None,
        timeout: float = 30.0,
        retry: RetryPolicy = RetryPolicy(),
        backoff_base: float = 1.0,
        backoff_max: float = 30.0,
        random: Callable[[], float] = _random.random,
        http: Optional[httpx.Client] = None,
    ) -> None:
        self._core = _Core(url, token, timeout, retry, backoff_base, backoff_max, random)
        self._own = http is None
        self.http = http if http is not None else httpx.Client(timeout=timeout)

    @property
    def url(self) -> str:
        return self._core.url

    def _drive(self, gen: Generator[_ReqOp, Any, T]) -> T:
        value: Any = None
        exc: Optional[BaseException] = None
        while True:
            try:
                op = gen.throw(exc) if exc is not None else gen.send(value)
            except StopIteration as stop:
                return stop.value  # type: ignore[no-any-return]
            value, exc = None, None
            if isinstance(op, _Http):
                try:
                    r = self.http.request(op.method, op.url, headers=op.headers, content=op.content)
                    value = (r.status_code, r.headers, r.content)
                except Exception as e:
                    exc = e
            elif isinstance(op, _Pause):
                time.sleep(op.seconds)
            else:
                tok = self._core.token
                t = tok() if callable(tok) else tok
                if inspect.isawaitable(t):
                    raise TypeError("an async token function needs AsyncClient")
                value = t

    def _call(self, method: str, path: str, content: Optional[bytes] = None, key: Optional[str] = None) -> Any:
        return _json(*self._drive(self._core.request(method, path, content, key)))

    def append(self, stream: str, data: Any, *, type: Optional[str] = None, key: Optional[str] = None) -> Appended:
        """Appends one event (creating the stream if needed). `data`: any JSON
        value; a string is stored as is. `key`: the Idempotency-Key (default: a
        new one, kept across this call's retries; give your own to make a
        resumed process safe too)."""
        _check_stream(stream)
        body = encode_event(data, type)
        return _appended(self._call("POST", f"/v1/streams/{stream}/events", body, key or idempotency_key()))

    def append_raw(self, stream: str, body: bytes, key: Optional[str] = None) -> Appended:
        """Appends an already encoded JSON body (one event or a batch)."""
        _check_stream(stream)
        return _appended(self._call("POST", f"/v1/streams/{stream}/events", body, key or idempotency_key()))

    def extend(self, stream: str, items: Iterable[Any], *, type: Optional[str] = None) -> Appended:
        """Appends events in batches of up to 1000 (each batch all or nothing,
        under its own Idempotency-Key). An item is a data value (of `type`) or a `NewEvent`."""
        _check_stream(stream)
        return _combine([self.append_raw(stream, b) for b in _batches(items, type)])

    def create(self, stream: str, *, labels: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
        """Creates the stream if it does not exist (idempotent); its metadata."""
        _check_stream(stream)
        body = None if labels is None else json.dumps({"labels": labels}).encode()
        return dict(self._call("PUT", f"/v1/streams/{stream}", body))

    def complete(self, stream: str, data: Any = MISSING) -> Dict[str, Any]:
        """Ends the stream as `completed`, with optional final data (any JSON value)."""
        _check_stream(stream)
        return dict(self._call("POST", f"/v1/streams/{stream}/complete", _end_body(data), idempotency_key()))

    def fail(self, stream: str, error: str) -> Dict[str, Any]:
        """Ends the stream as `failed` with a message."""
        _check_stream(stream)
        body = json.dumps({"error": str(error)}, ensure_ascii=False).encode()
        return dict(self._call("POST", f"/v1/streams/{stream}/fail", body, idempotency_key()))

    def cancel(self, stream: str) -> Dict[str, Any]:
        """Asks the stream's producer to stop (`POST …/cancel`)."""
        _check_stream(stream)
        return dict(self._call("POST", f"/v1/streams/{stream}/cancel", None, idempotency_key()))

    def delete(self, stream: str) -> None:
        """Deletes the stream and its log (a 404 answering a retry counts as done)."""
        _check_stream(stream)
        self._drive(self._core.request("DELETE", f"/v1/streams/{stream}", not_found_after_retry_ok=True))

    def info(self, stream: str) -> Dict[str, Any]:
        """The stream's metadata (JobcastError `stream_not_found`, status 404, when absent)."""
        _check_stream(stream)
        return dict(self._call("GET", f"/v1/streams/{stream}"))

    def stream(self, stream: str) -> Stream:
        """A producer of `stream` on this client."""
        return Stream(self, stream)

    def watch(self, stream: str, *, from_: str = "start", **options: Any) -> Watch:
        """A watch of `stream` with this client's URL and token (see `jobcast.watch`)."""
        options.setdefault("token", self._core.token)
        return Watch(self._core.url, stream, from_=from_, **options)

    def close(self) -> None:
        if self._own:
            self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, t: Optional[Type[BaseException]], e: Optional[BaseException], tb: Optional[TracebackType]
    ) -> None:
        self.close()


class AsyncClient:
    """`Client` for asyncio (on httpx.AsyncClient); the same methods, awaited."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        token: TokenSource = None,
        timeout: float = 30.0,
        retry: RetryPolicy = RetryPolicy(),
        backoff_base: float = 1.0,
        backoff_max: float = 30.0,
        random: Callable[[], float] = _random.random,
        http: Optional[httpx.AsyncClient] = None,
    ) -> None:
        self._core = _Core(url, token, timeout, retry, backoff_base, backoff_max, random)
        self._own = http is None
        self.http = http if http is not None else httpx.AsyncClient(timeout=timeout)

    @property
    def url(self) -> str:
        return self._core.url

    async def _drive(self, gen: Generator[_ReqOp, Any, T]) -> T:
        import asyncio

        value: Any = None
        exc: Optional[BaseException] = None
        while True:
            try:
                op = gen.throw(exc) if exc is not None else gen.send(value)
            except StopIteration as stop:
                return stop.value  # type: ignore[no-any-return]
            value, exc = None, None
            if isinstance(op, _Http):
                try:
                    r = await self.http.request(op.method, op.url, headers=op.headers, content=op.content)
                    value = (r.status_code, r.headers, r.content)
                except Exception as e:
                    exc = e
            elif isinstance(op, _Pause):
                await asyncio.sleep(op.seconds)
            else:
                tok = self._core.token
                t = tok() if callable(tok) else tok
                if inspect.isawaitable(t):
                    t = await t
                value = t

    async def _call(self, method: str, path: str, content: Optional[bytes] = None, key: Optional[str] = None) -> Any:
        return _json(*(await self._drive(self._core.request(method, path, content, key))))

    async def append(self, stream: str, data: Any, *, type: Optional[str] = None, key: Optional[str] = None) -> Appended:
        _check_stream(stream)
        body = encode_event(data, type)
        return _appended(await self._call("POST", f"/v1/streams/{stream}/events", body, key or idempotency_key()))

    async def append_raw(self, stream: str, body: bytes, key: Optional[str] = None) -> Appended:
        _check_stream(stream)
        return _appended(await self._call("POST", f"/v1/streams/{stream}/events", body, key or idempotency_key()))

    async def extend(self, stream: str, items: Iterable[Any], *, type: Optional[str] = None) -> Appended:
        _check_stream(stream)
        return _combine([await self.append_raw(stream, b) for b in _batches(items, type)])

    async def create(self, stream: str, *, labels: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
        _check_stream(stream)
        body = None if labels is None else json.dumps({"labels": labels}).encode()
        return dict(await self._call("PUT", f"/v1/streams/{stream}", body))

    async def complete(self, stream: str, data: Any = MISSING) -> Dict[str, Any]:
        _check_stream(stream)
        return dict(await self._call("POST", f"/v1/streams/{stream}/complete", _end_body(data), idempotency_key()))

    async def fail(self, stream: str, error: str) -> Dict[str, Any]:
        _check_stream(stream)
        body = json.dumps({"error": str(error)}, ensure_ascii=False).encode()
        return dict(await self._call("POST", f"/v1/streams/{stream}/fail", body, idempotency_key()))

    async def cancel(self, stream: str) -> Dict[str, Any]:
        _check_stream(stream)
        return dict(await self._call("POST", f"/v1/streams/{stream}/cancel", None, idempotency_key()))

    async def delete(self, stream: str) -> None:
        _check_stream(stream)
        await self._drive(self._core.request("DELETE", f"/v1/streams/{stream}", not_found_after_retry_ok=True))

    async def info(self, stream: str) -> Dict[str, Any]:
        _check_stream(stream)
        return dict(await self._call("GET", f"/v1/streams/{stream}"))

    def stream(self, stream: str) -> AsyncStream:
        return AsyncStream(self, stream)

    def watch(self, stream: str, *, from_: str = "start", **options: Any) -> Watch:
        options.setdefault("token", self._core.token)
        return Watch(self._core.url, stream, from_=from_, **options)

    async def aclose(self) -> None:
        if self._own:
            await self.http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, t: Optional[Type[BaseException]], e: Optional[BaseException], tb: Optional[TracebackType]
    ) -> None:
        await self.aclose()


def _message(e: BaseException) -> str:
    """The exception's message for `fail` (its class name when it has none)."""
    text = str(e).strip()
    return text if text else type(e).__name__


class _StreamBase:
    id: str

    def __init__(self) -> None:
        self._cancel = False
        #: The stream was completed or failed (by this object, or found ended: 409).
        self.ended = False
        #: The id of the last event this producer appended.
        self.last_id: Optional[str] = None

    @property
    def cancel_requested(self) -> bool:
        """True once an answer of the server said that the stream's cancel was
        requested (`POST /v1/streams/{id}/cancel`): stop the work and end the stream."""
        return self._cancel

    def _note(self, answer: Union[Appended, Dict[str, Any]]) -> None:
        flag = answer.cancel_requested if isinstance(answer, Appended) else answer.get("cancel_requested") is True
        if isinstance(answer, Appended):
            self.last_id = answer.last_id
        if flag and not self._cancel:
            self._cancel = True
            self._set_cancel_event()

    def _set_cancel_event(self) -> None:
        raise NotImplementedError

    def _forget(self, batcher: object) -> None:
        """A batcher closed by itself: the stream need not close it again."""
        bs: List[Any] = getattr(self, "_batchers", [])
        if batcher in bs:
            bs.remove(batcher)

    def _noted_error(self, e: JobcastError) -> None:
        if e.code == "stream_ended":
            self.ended = True


class Stream(_StreamBase):
    """The producer of one stream. As a context manager it completes the
    stream when the block ends normally and fails it with the exception's
    message when the block raises (the exception propagates)::

        with jobcast.Stream("http://127.0.0.1:7700", "build-42") as s:
            s.append("compiling")
            s.append({"pct": 50}, type="progress")
    """

    def __init__(self, url: Union[str, Client] = DEFAULT_URL, stream: str = "", **client_options: Any) -> None:
        super().__init__()
        _check_stream(stream)
        self.id = stream
        if isinstance(url, Client):
            if client_options:
                raise TypeError("client options go to the Client, not to Stream(client, …)")
            self.client, self._own = url, False
        else:
            self.client, self._own = Client(url, **client_options), True
        #: Set once the stream's cancel was requested (see `cancel_requested`).
        self.cancel_event = threading.Event()
        self._batchers: List[Batcher] = []

    def _set_cancel_event(self) -> None:
        self.cancel_event.set()

    def append(self, data: Any, *, type: Optional[str] = None, key: Optional[str] = None) -> Appended:
        """Appends one event; see `Client.append`."""
        try:
            a = self.client.append(self.id, data, type=type, key=key)
        except JobcastError as e:
            self._noted_error(e)
            raise
        self._note(a)
        return a

    def extend(self, items: Iterable[Any], *, type: Optional[str] = None) -> Appended:
        """Appends events in batches of up to 1000; see `Client.extend`."""
        try:
            a = self.client.extend(self.id, items, type=type)
        except JobcastError as e:
            self._noted_error(e)
            raise
        self._note(a)
        return a

    def _append_raw(self, body: bytes, key: str) -> Appended:
        try:
            a = self.client.append_raw(self.id, body, key)
        except JobcastError as e:
            self._noted_error(e)
            raise
        self._note(a)
        return a

    def create(self, *, labels: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
        info = self.client.create(self.id, labels=labels)
        self._note(info)
        return info

    def batcher(
        self,
        *,
        max_events: int = 500,
        max_delay: float = 0.05,
        max_queue: int = 10_000,
        max_bytes: int = 4 << 20,
    ) -> Batcher:
        """A background batcher for high-rate producers (token streams): events
        are sent in one request every `max_delay` seconds or `max_events`
        events, whichever comes first; at most `max_queue` wait, then `append`
        blocks (back-pressure). Completing or failing the stream flushes it first."""
        from ._batcher import Batcher

        b = Batcher(self, max_events=max_events, max_delay=max_delay, max_queue=max_queue, max_bytes=max_bytes)
        self._batchers.append(b)
        return b

    def _close_batchers(self) -> None:
        bs, self._batchers = self._batchers, []
        error: Optional[BaseException] = None
        for b in bs:
            try:
                b.close()
            except BaseException as e:  # every batcher is closed; the first error is raised
                error = error or e
        if error is not None:
            raise error

    def complete(self, data: Any = MISSING) -> Dict[str, Any]:
        """Ends the stream as `completed` (after flushing its batchers)."""
        self._close_batchers()
        try:
            info = self.client.complete(self.id, data)
        except JobcastError as e:
            self._noted_error(e)
            raise
        self.ended = True
        self._note(info)
        return info

    def fail(self, error: str) -> Dict[str, Any]:
        """Ends the stream as `failed` with `error` (after flushing its
        batchers; a flush error is raised after the stream was failed)."""
        flush_error: Optional[BaseException] = None
        try:
            self._close_batchers()
        except Exception as e:
            flush_error = e
        try:
            info = self.client.fail(self.id, error)
        except JobcastError as e:
            self._noted_error(e)
            raise
        self.ended = True
        self._note(info)
        if flush_error is not None:
            raise flush_error
        return info

    def check_cancel(self) -> bool:
        """Asks the server (GET the metadata) whether a cancel was requested."""
        self._note(self.client.info(self.id))
        return self.cancel_requested

    def close(self) -> None:
        """Flushes the batchers and closes the client if this Stream made it (the stream stays open)."""
        try:
            self._close_batchers()
        finally:
            if self._own:
                self.client.close()

    def __enter__(self) -> Stream:
        return self

    def __exit__(
        self, t: Optional[Type[BaseException]], e: Optional[BaseException], tb: Optional[TracebackType]
    ) -> None:
        try:
            if e is None:
                if not self.ended:
                    try:
                        self.complete()
                    except BaseException as ce:
                        # E.g. a batcher lost events: the block is over, so the
                        # stream ends, as failed, and the error propagates.
                        if not self.ended:
                            try:
                                self.fail(_message(ce))
                            except Exception as fe:
                                _log.warning("jobcast: failing stream %s after %r: %s", self.id, ce, fe)
                        raise
            elif not self.ended:
                try:
                    self.fail(_message(e))
                except Exception as fe:  # the block's exception is the one that propagates
                    _log.warning("jobcast: failing stream %s after %r: %s", self.id, e, fe)
        finally:
            if self._own:
                self.client.close()


class AsyncStream(_StreamBase):
    """`Stream` for asyncio: `async with`, awaited methods, `cancel_event` an asyncio.Event."""

    def __init__(self, url: Union[str, AsyncClient] = DEFAULT_URL, stream: str = "", **client_options: Any) -> None:
        super().__init__()
        _check_stream(stream)
        self.id = stream
        if isinstance(url, AsyncClient):
            if client_options:
                raise TypeError("client options go to the AsyncClient, not to AsyncStream(client, …)")
            self.client, self._own = url, False
        else:
            self.client, self._own = AsyncClient(url, **client_options), True
        self._event: Optional[asyncio.Event] = None
        self._batchers: List[AsyncBatcher] = []

    @property
    def cancel_event(self) -> asyncio.Event:
        """Set once the stream's cancel was requested (made on first use, in the running loop)."""
        import asyncio

        if self._event is None:
            self._event = asyncio.Event()
            if self._cancel:
                self._event.set()
        return self._event

    def _set_cancel_event(self) -> None:
        if self._event is not None:
            self._event.set()

    async def append(self, data: Any, *, type: Optional[str] = None, key: Optional[str] = None) -> Appended:
        try:
            a = await self.client.append(self.id, data, type=type, key=key)
        except JobcastError as e:
            self._noted_error(e)
            raise
        self._note(a)
        return a

    async def extend(self, items: Iterable[Any], *, type: Optional[str] = None) -> Appended:
        try:
            a = await self.client.extend(self.id, items, type=type)
        except JobcastError as e:
            self._noted_error(e)
            raise
        self._note(a)
        return a

    async def _append_raw(self, body: bytes, key: str) -> Appended:
        try:
            a = await self.client.append_raw(self.id, body, key)
        except JobcastError as e:
            self._noted_error(e)
            raise
        self._note(a)
        return a

    async def create(self, *, labels: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
        info = await self.client.create(self.id, labels=labels)
        self._note(info)
        return info

    def batcher(
        self,
        *,
        max_events: int = 500,
        max_delay: float = 0.05,
        max_queue: int = 10_000,
        max_bytes: int = 4 << 20,
    ) -> AsyncBatcher:
        """See `Stream.batcher`; `append` is awaited (it waits while the queue is full)."""
        from ._batcher import AsyncBatcher

        b = AsyncBatcher(self, max_events=max_events, max_delay=max_delay, max_queue=max_queue, max_bytes=max_bytes)
        self._batchers.append(b)
        return b

    async def _close_batchers(self) -> None:
        bs, self._batchers = self._batchers, []
        error: Optional[BaseException] = None
        for b in bs:
            try:
                await b.aclose()
            except BaseException as e:
                error = error or e
        if error is not None:
            raise error

    async def complete(self, data: Any = MISSING) -> Dict[str, Any]:
        await self._close_batchers()
        try:
            info = await self.client.complete(self.id, data)
        except JobcastError as e:
            self._noted_error(e)
            raise
        self.ended = True
        self._note(info)
        return info

    async def fail(self, error: str) -> Dict[str, Any]:
        flush_error: Optional[BaseException] = None
        try:
            await self._close_batchers()
        except Exception as e:
            flush_error = e
        try:
            info = await self.client.fail(self.id, error)
        except JobcastError as e:
            self._noted_error(e)
            raise
        self.ended = True
        self._note(info)
        if flush_error is not None:
            raise flush_error
        return info

    async def check_cancel(self) -> bool:
        self._note(await self.client.info(self.id))
        return self.cancel_requested

    async def aclose(self) -> None:
        try:
            await self._close_batchers()
        finally:
            if self._own:
                await self.client.aclose()

    async def __aenter__(self) -> AsyncStream:
        return self

    async def __aexit__(
        self, t: Optional[Type[BaseException]], e: Optional[BaseException], tb: Optional[TracebackType]
    ) -> None:
        try:
            if e is None:
                if not self.ended:
                    try:
                        await self.complete()
                    except BaseException as ce:
                        # E.g. a batcher lost events: the block is over, so the
                        # stream ends, as failed, and the error propagates.
                        if not self.ended:
                            try:
                                await self.fail(_message(ce))
                            except Exception as fe:
                                _log.warning("jobcast: failing stream %s after %r: %s", self.id, ce, fe)
                        raise
            elif not self.ended:
                try:
                    await self.fail(_message(e))
                except Exception as fe:  # the block's exception is the one that propagates
                    _log.warning("jobcast: failing stream %s after %r: %s", self.id, e, fe)
        finally:
            if self._own:
                await self.client.aclose()
