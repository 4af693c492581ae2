"""The I/O shells of a watch. Every rule (what a status means, dedupe,
backoff, giving up) lives in the pure machine (_machine.py). The connection
logic itself (which request to make, when to switch to long-poll, how to read
a response) is written once, as a generator that yields I/O operations; a
sync driver (httpx.Client) and an async driver (httpx.AsyncClient) perform
them. So `for item in watch(...)` and `async for item in watch(...)` behave
the same by construction."""

from __future__ import annotations

import asyncio
import inspect
import json
import random as _random
import threading
import time
from dataclasses import dataclass
from types import TracebackType
from typing import (
    Any,
    AsyncIterator,
    Awaitable,
    Callable,
    Dict,
    Generator,
    Iterator,
    List,
    Mapping,
    Optional,
    Type,
    Union,
)
from urllib.parse import urlencode

import httpx

from ._backoff import parse_retry_after
from ._machine import Machine, Out, Settings
from ._sse import SseEvent, SseParser, SseRetry
from ._types import End, EventId, Item, JobcastError, valid_stream_id

#: Most bytes of an error body read.
MAX_ERROR_BODY = 64 * 1024
DEFAULT_URL = "http://127.0.0.1:7700"

#: A token, or a function asked for one on every connection (and after
#: `token_expired`); in an async watch it may be a coroutine function.
TokenSource = Union[str, Callable[[], Union[Optional[str], Awaitable[Optional[str]]]], None]


# -- the operations the connection logic asks its driver to perform ---------


@dataclass
class _Deliver:
    items: Out


@dataclass
class _Sleep:
    seconds: float


@dataclass
class _Token:
    pass


@dataclass
class _Send:
    url: str
    headers: Dict[str, str]
    #: Until the response headers arrive.
    first_timeout: float
    #: For each read of the body.
    body_timeout: float


@dataclass
class _Chunk:
    pass


@dataclass
class _ReadBody:
    limit: int


@dataclass
class _Release:
    pass


_Op = Union[_Deliver, _Sleep, _Token, _Send, _Chunk, _ReadBody, _Release]


@dataclass
class _Resp:
    status: int
    headers: httpx.Headers


def _error_of(status: int, headers: httpx.Headers, body: bytes) -> JobcastError:
    """The error of a refused request: the JSON error body's code and
    message, the `Retry-After` header as a floor."""
    retry_after = parse_retry_after(headers.get("retry-after"), time.time())
    code = f"http_{status}"
    message = f"HTTP {status}"
    try:
        parsed = json.loads(body[:MAX_ERROR_BODY].decode("utf-8", "replace"))
        err = parsed.get("error") if isinstance(parsed, dict) else None
        if isinstance(err, dict):
            if isinstance(err.get("code"), str):
                code = err["code"]
            if isinstance(err.get("message"), str):
                message = err["message"]
    except ValueError:
        pass  # not a jobcast error body (a proxy's page): keep the status
    return JobcastError(
        code,
        message,
        status=status,
        retryable=500 <= status <= 599 or status in (408, 429),
        retry_after=retry_after,
    )


def _network_error(e: BaseException, timed_out: bool, url: str) -> JobcastError:
    if timed_out:
        return JobcastError("timeout", f"{url}: no answer in time", retryable=True)
    return JobcastError("network", f"{url}: {type(e).__name__}: {e}", retryable=True)


class Watch:
    """A watch of one stream: iterate it (`for`, or `async for`) to get every
    event exactly once, in order, across reconnects, then the stream's `End`
    (after which the iteration stops). `Reset` items say the server could not
    resume where asked. An error that stops the watch is raised from the
    iteration as `JobcastError` (code `gave_up` after `give_up_after`
    seconds without a healthy connection). A watch is iterated once."""

    def __init__(
        self,
        url: str,
        stream: str,
        *,
        from_: str = "start",
        token: TokenSource = None,
        headers: Optional[Mapping[str, str]] = None,
        transport: str = "auto",
        fallback_after: int = 2,
        first_byte_timeout: float = 10.0,
        read_timeout: float = 45.0,
        connect_timeout: float = 10.0,
        poll_wait: int = 25,
        poll_limit: int = 1000,
        give_up_after: float = 300.0,
        healthy_after: float = 5.0,
        backoff_base: float = 1.0,
        backoff_max: float = 30.0,
        random: Callable[[], float] = _random.random,
        http: Union[httpx.Client, httpx.AsyncClient, None] = None,
    ) -> None:
        if not valid_stream_id(stream):
            raise JobcastError("invalid_stream_id", f"not a stream id: {stream!r}")
        if transport not in ("auto", "sse", "poll"):
            raise ValueError(f"transport must be 'auto', 'sse' or 'poll', not {transport!r}")
        base = (url or DEFAULT_URL).strip().rstrip("/")
        self.stream = stream
        self._events_url = f"{base}/v1/streams/{stream}/events"
        self._meta_url = f"{base}/v1/streams/{stream}"
        self._token = token
        self._headers = dict(headers or {})
        self._mode = transport
        self._fallback_after = fallback_after
        self._first_byte_timeout = first_byte_timeout
        self._read_timeout = read_timeout
        self._connect_timeout = connect_timeout
        self._poll_wait = poll_wait
        self._poll_limit = poll_limit
        self._random = random
        self._http = http
        #: `sse` or `poll`: how events arrive now.
        self.transport = "poll" if transport == "poll" else "sse"
        #: SSE failures in a row that look like a proxy breaking the stream.
        self.sse_trouble = 0
        #: How many times the watch reconnected.
        self.reconnects = 0
        #: The stream's end, once it arrived.
        self.end: Optional[End] = None
        self._out: Out = []
        self._closed = False
        self._started = False
        self._wake_sync = threading.Event()
        self._wake_async: Optional[asyncio.Event] = None
        self.machine = Machine(
            from_,
            Settings(
                give_up_after=give_up_after,
                healthy_after=healthy_after,
                base=backoff_base,
                maximum=backoff_max,
                can_refresh=callable(token),
            ),
            time.monotonic(),
        )

    # -- what the application sees --------------------------------------

    @property
    def state(self) -> str:
        """`connecting`, `open`, `reconnecting` or `closed`."""
        return self.machine.status

    @property
    def close_reason(self) -> Optional[str]:
        """Once closed: `end`, `no_content` (204: you already had the end), `error`, `gave_up` or `closed`."""
        return self.machine.reason

    @property
    def last_event_id(self) -> Optional[str]:
        """The id of the last event delivered (resume a later watch with `from_=` it), or None."""
        kind, id = self.machine.position()
        return id if kind == "after" else None

    def close(self) -> None:
        """Stops the watch: a sleep between attempts ends at once, a read in
        progress at its next chunk (heartbeats come every 15 s by default)."""
        self._closed = True
        self._wake_sync.set()
        if self._wake_async is not None:
            self._wake_async.set()

    # -- the connection logic, written once -------------------------------

    def _flush(self) -> Generator[_Op, Any, None]:
        if self._out:
            items, self._out = self._out, []
            yield _Deliver(items)

    def _run(self) -> Generator[_Op, Any, None]:
        m = self.machine
        while True:
            yield from self._flush()
            if self._closed:
                m.close("closed")
            if m.status == "closed":
                return
            if m.status == "reconnecting":
                yield _Sleep(max(0.0, m.retry_at - time.monotonic()))
                m.on_timer()
                if m.status == "connecting":
                    self.reconnects += 1
                continue
            if self._mode == "auto" and self.sse_trouble >= self._fallback_after:
                self.transport = "poll"
            try:
                if m.needs_live_position():
                    yield from self._resolve_live()
                elif self.transport == "sse":
                    yield from self._stream_once()
                else:
                    yield from self._poll_once()
            except JobcastError as e:
                if m.status != "closed":
                    m.stop(e, self._out)
            except Exception as e:  # a bug or an unexpected value: stop with it rather than loop
                if m.status != "closed":
                    m.stop(JobcastError("internal", f"{type(e).__name__}: {e}"), self._out)

    def _request_headers(self, accept: str) -> Generator[_Op, Any, Optional[Dict[str, str]]]:
        """The next request's headers, or None when the token function failed
        (a retry is then scheduled like a network error)."""
        h = dict(self._headers)
        h["accept"] = accept
        try:
            token = (yield _Token()) if callable(self._token) else self._token
        except Exception as e:
            self.machine.on_network_error(
                time.monotonic(),
                JobcastError("token", f"the token function failed: {e}", retryable=True),
                self._random(),
                self._out,
            )
            return None
        if token:
            h["authorization"] = f"Bearer {token}"
        return h

    def _refused(self, status: int, headers: httpx.Headers) -> Generator[_Op, Any, None]:
        try:
            body = yield _ReadBody(MAX_ERROR_BODY)
        except Exception:
            body = b""
        yield _Release()
        self.machine.on_refused(
            time.monotonic(), status, _error_of(status, headers, body), self._random(), self._out
        )

    def _stream_once(self) -> Generator[_Op, Any, None]:
        """One SSE connection: connect, read until it ends, hand everything to the machine."""
        m = self.machine
        kind, pos = m.position()
        headers = yield from self._request_headers("text/event-stream")
        if headers is None:
            return
        url = self._events_url
        if kind == "after" and pos is not None:
            headers["last-event-id"] = pos
        elif kind == "live":
            url += "?from=live"
        try:
            resp: _Resp = yield _Send(url, headers, self._first_byte_timeout, self._read_timeout)
        except (httpx.HTTPError, OSError) as e:
            timed_out = isinstance(e, httpx.TimeoutException)
            # A proxy that holds the response back shows up here as a timeout.
            if timed_out:
                self.sse_trouble += 1
            m.on_network_error(time.monotonic(), _network_error(e, timed_out, url), self._random(), self._out)
            return
        if self._closed:
            yield _Release()
            return
        ctype = resp.headers.get("content-type", "").strip().lower()
        if resp.status != 200 or not ctype.startswith("text/event-stream"):
            if resp.status >= 500:
                self.sse_trouble += 1
            if resp.status == 200:
                yield _Release()
                m.on_refused(
                    time.monotonic(),
                    200,
                    JobcastError("protocol", f"{url} answered 200 but not with text/event-stream"),
                    self._random(),
                    self._out,
                )
                return
            yield from self._refused(resp.status, resp.headers)
            return
        m.on_open(time.monotonic())
        parser = SseParser()
        got_bytes = False
        error: Optional[JobcastError] = None
        out = self._out
        while True:
            try:
                chunk: bytes = yield _Chunk()
            except (httpx.HTTPError, OSError) as e:
                if m.status == "open":
                    error = _network_error(e, isinstance(e, httpx.TimeoutException), url)
                break
            if not chunk:
                break
            if not got_bytes:
                got_bytes = True
                self.sse_trouble = 0
            for frame in parser.feed(chunk):
                if type(frame) is SseEvent:
                    m.on_sse_event(
                        time.monotonic(), frame.last_event_id, frame.type, frame.data, self._random(), out
                    )
                elif type(frame) is SseRetry:
                    m.on_retry(frame.ms)
                if m.status != "open":
                    break
            if out:
                yield from self._flush()
                out = self._out
            if m.status != "open" or self._closed:
                break
        # Released also after the end or an error (no yield in a finally: the
        # driver closes the response itself when the application stops early).
        yield _Release()
        if m.status != "open":
            return
        # An incomplete final event is dropped with the parser (a new one per connection).
        if not got_bytes:
            self.sse_trouble += 1
        m.on_closed(time.monotonic(), error, self._random(), self._out)

    def _poll_once(self) -> Generator[_Op, Any, None]:
        """One long-poll request for a JSON page."""
        m = self.machine
        kind, pos = m.position()
        headers = yield from self._request_headers("application/json")
        if headers is None:
            return
        params = {"wait": str(self._poll_wait), "limit": str(self._poll_limit)}
        if kind == "after" and pos is not None:
            params["after"] = pos
        url = f"{self._events_url}?{urlencode(params)}"
        timeout = self._poll_wait + self._read_timeout
        try:
            resp: _Resp = yield _Send(url, headers, timeout, self._read_timeout)
            if resp.status != 200:
                yield from self._refused(resp.status, resp.headers)
                return
            body: bytes = yield _ReadBody(1 << 62)
        except (httpx.HTTPError, OSError) as e:
            yield _Release()
            m.on_network_error(
                time.monotonic(), _network_error(e, isinstance(e, httpx.TimeoutException), url), self._random(), self._out
            )
            return
        yield _Release()
        try:
            page = json.loads(body)
        except ValueError:
            m.on_refused(
                time.monotonic(), 200, JobcastError("protocol", f"{url}: a page that is not JSON"), 0.0, self._out
            )
            return
        m.on_page(time.monotonic(), page, self._out)

    def _resolve_live(self) -> Generator[_Op, Any, None]:
        """Looks up the stream's head for a `live` start."""
        m = self.machine
        headers = yield from self._request_headers("application/json")
        if headers is None:
            return
        url = self._meta_url
        try:
            resp: _Resp = yield _Send(url, headers, self._read_timeout, self._read_timeout)
            if resp.status == 404:
                yield _Release()
                m.resolve_live(None)  # not created yet: everything it will hold is live
                return
            if resp.status != 200:
                yield from self._refused(resp.status, resp.headers)
                return
            body: bytes = yield _ReadBody(1 << 24)
        except (httpx.HTTPError, OSError) as e:
            yield _Release()
            m.on_network_error(
                time.monotonic(), _network_error(e, isinstance(e, httpx.TimeoutException), url), self._random(), self._out
            )
            return
        yield _Release()
        info = json.loads(body)
        last = EventId.parse(info.get("last_id")) if isinstance(info, dict) else None
        if isinstance(info, dict) and info.get("state") == "open":
            m.resolve_live(last or EventId.parse(f"{info.get('epoch')}-0"))
        elif last is not None:
            # Ended: resume just before the end, so that the end itself arrives.
            m.resolve_live(EventId(last.epoch, max(0, last.seq - 1)))
        else:
            m.stop(JobcastError("protocol", "stream metadata without a position"), self._out)

    # -- the sync driver ----------------------------------------------------

    def _claim(self) -> None:
        if self._started:
            raise RuntimeError("a Watch is iterated once; start another watch (from_=w.last_event_id)")
        self._started = True

    def _timeout(self, op: _Send) -> httpx.Timeout:
        return httpx.Timeout(connect=self._connect_timeout, read=op.first_timeout, write=10.0, pool=10.0)

    @staticmethod
    def _body_timeout(response: httpx.Response, op: _Send) -> None:
        # The first-byte timeout covers the headers; reads of the body get the
        # read timeout. httpx reads the per-request timeouts from the request's
        # extensions when the body iteration starts.
        t = response.request.extensions.get("timeout")
        if isinstance(t, dict):
            response.request.extensions["timeout"] = {**t, "read": op.body_timeout}

    def __iter__(self) -> Iterator[Item]:
        self._claim()
        return self._iter()

    def _iter(self) -> Iterator[Item]:
        own = self._http is None
        http = self._http if isinstance(self._http, httpx.Client) else None
        if http is None:
            if self._http is not None:
                raise TypeError("iterating with `for` needs http=httpx.Client (got an AsyncClient)")
            http = httpx.Client()
        gen = self._run()
        resp: Optional[httpx.Response] = None
        chunks: Optional[Iterator[bytes]] = None
        value: Any = None
        exc: Optional[BaseException] = None
        try:
            while True:
                try:
                    op = gen.throw(exc) if exc is not None else gen.send(value)
                except StopIteration:
                    return
                value, exc = None, None
                if isinstance(op, _Deliver):
                    for item in op.items:
                        if isinstance(item, JobcastError):
                            raise item
                        if isinstance(item, End):
                            self.end = item
                        yield item
                elif isinstance(op, _Chunk):
                    assert chunks is not None
                    try:
                        value = next(chunks, b"")
                    except Exception as e:
                        exc = e
                elif isinstance(op, _Sleep):
                    if not self._closed:
                        self._wake_sync.wait(op.seconds)
                elif isinstance(op, _Token):
                    try:
                        t = self._token() if callable(self._token) else self._token
                        if inspect.isawaitable(t):
                            raise TypeError("an async token function needs `async for`")
                        value = t
                    except Exception as e:
                        exc = e
                elif isinstance(op, _Send):
                    try:
                        req = http.build_request("GET", op.url, headers=op.headers, timeout=self._timeout(op))
                        resp = http.send(req, stream=True)
                        self._body_timeout(resp, op)
                        chunks = resp.iter_bytes()
                        value = _Resp(resp.status_code, resp.headers)
                    except Exception as e:
                        exc = e
                elif isinstance(op, _ReadBody):
                    assert resp is not None
                    try:
                        value = _read_limited(resp.iter_bytes(), op.limit)
                    except Exception as e:
                        exc = e
                elif isinstance(op, _Release):
                    if resp is not None:
                        resp.close()
                    resp, chunks = None, None
        finally:
            gen.close()
            if resp is not None:
                resp.close()
            if own:
                http.close()

    # -- the async driver -------------------------------------------------

    def __aiter__(self) -> AsyncIterator[Item]:
        self._claim()
        return self._aiter()

    async def _aiter(self) -> AsyncIterator[Item]:
        own = self._http is None
        http = self._http if isinstance(self._http, httpx.AsyncClient) else None
        if http is None:
            if self._http is not None:
                raise TypeError("`async for` needs http=httpx.AsyncClient (got a Client)")
            http = httpx.AsyncClient()
        self._wake_async = asyncio.Event()
        if self._closed:
            self._wake_async.set()
        gen = self._run()
        resp: Optional[httpx.Response] = None
        chunks: Optional[AsyncIterator[bytes]] = None
        value: Any = None
        exc: Optional[BaseException] = None
        try:
            while True:
                try:
                    op = gen.throw(exc) if exc is not None else gen.send(value)
                except StopIteration:
                    return
                value, exc = None, None
                if isinstance(op, _Deliver):
                    for item in op.items:
                        if isinstance(item, JobcastError):
                            raise item
                        if isinstance(item, End):
                            self.end = item
                        yield item
                elif isinstance(op, _Chunk):
                    assert chunks is not None
                    try:
                        value = await chunks.__anext__()
                    except StopAsyncIteration:
                        value = b""
                    except Exception as e:
                        exc = e
                elif isinstance(op, _Sleep):
                    if not self._closed:
                        try:
                            await asyncio.wait_for(self._wake_async.wait(), op.seconds)
                        except asyncio.TimeoutError:
                            pass
                elif isinstance(op, _Token):
                    try:
                        t = self._token() if callable(self._token) else self._token
                        if inspect.isawaitable(t):
                            t = await t
                        value = t
                    except Exception as e:
                        exc = e
                elif isinstance(op, _Send):
                    try:
                        req = http.build_request("GET", op.url, headers=op.headers, timeout=self._timeout(op))
                        resp = await http.send(req, stream=True)
                        self._body_timeout(resp, op)
                        chunks = resp.aiter_bytes()
                        value = _Resp(resp.status_code, resp.headers)
                    except Exception as e:
                        exc = e
                elif isinstance(op, _ReadBody):
                    assert resp is not None
                    try:
                        value = await _aread_limited(resp.aiter_bytes(), op.limit)
                    except Exception as e:
                        exc = e
                elif isinstance(op, _Release):
                    if resp is not None:
                        await resp.aclose()
                    resp, chunks = None, None
        finally:
            gen.close()
            if resp is not None:
                await resp.aclose()
            if own:
                await http.aclose()

    # -- context managers: close the watch on exit -------------------------

    def __enter__(self) -> Watch:
        return self

    def __exit__(
        self, t: Optional[Type[BaseException]], e: Optional[BaseException], tb: Optional[TracebackType]
    ) -> None:
        self.close()

    async def __aenter__(self) -> Watch:
        return self

    async def __aexit__(
        self, t: Optional[Type[BaseException]], e: Optional[BaseException], tb: Optional[TracebackType]
    ) -> None:
        self.close()


def _read_limited(chunks: Iterator[bytes], limit: int) -> bytes:
    parts: List[bytes] = []
    n = 0
    for c in chunks:
        parts.append(c)
        n += len(c)
        if n >= limit:
            break
    return b"".join(parts)[:limit]


async def _aread_limited(chunks: AsyncIterator[bytes], limit: int) -> bytes:
    parts: List[bytes] = []
    n = 0
    async for c in chunks:
        parts.append(c)
        n += len(c)
        if n >= limit:
            break
    return b"".join(parts)[:limit]


def watch(
    url: str,
    stream: str,
    *,
    from_: str = "start",
    token: TokenSource = None,
    headers: Optional[Mapping[str, str]] = None,
    transport: str = "auto",
    fallback_after: int = 2,
    first_byte_timeout: float = 10.0,
    read_timeout: float = 45.0,
    connect_timeout: float = 10.0,
    poll_wait: int = 25,
    poll_limit: int = 1000,
    give_up_after: float = 300.0,
    healthy_after: float = 5.0,
    backoff_base: float = 1.0,
    backoff_max: float = 30.0,
    random: Callable[[], float] = _random.random,
    http: Union[httpx.Client, httpx.AsyncClient, None] = None,
) -> Watch:
    """Watches `stream` on the server at `url`: iterate the result with `for`
    (sync, on httpx.Client) or `async for` (asyncio, on httpx.AsyncClient).
    Every event once, in order, across reconnects; `Reset` items when the
    server could not resume where asked; the `End` last. A watch that stops
    for another reason raises `JobcastError`.

    - `from_`: `start` (the whole log), `live` (only events after now; the
      head is looked up first, so a reconnect before the first event misses
      nothing), or the id of the last event already had (`w.last_event_id`).
    - `token`: a string, or a function (a coroutine function in an async
      watch) asked on every connection: with one, `token_expired` reconnects
      with a fresh token; with a string it stops the watch.
    - `headers`: extra request headers.
    - `transport`: `auto` (SSE, then JSON long-poll after `fallback_after` SSE
      failures in a row that point at the path: no response headers within
      `first_byte_timeout` s, a 5xx, a 200 that closed without a byte), or
      `sse` / `poll` to force one. Long-poll asks `wait=poll_wait` seconds and
      up to `poll_limit` events a page.
    - `read_timeout`: no byte for this long (heartbeats come every 15 s) is a dead connection.
    - `give_up_after`: stop (`gave_up`) after this long without a healthy
      connection; one that delivered an event or stayed open `healthy_after`
      s resets the backoff (`backoff_base` → `backoff_max`, full jitter; the
      server's `retry:`, `retry_after_ms` and `Retry-After` are floors).
    - `random`: the jitter's source; `http`: your own httpx client (proxies, TLS).
    """
    return Watch(
        url,
        stream,
        from_=from_,
        token=token,
        headers=headers,
        transport=transport,
        fallback_after=fallback_after,
        first_byte_timeout=first_byte_timeout,
        read_timeout=read_timeout,
        connect_timeout=connect_timeout,
        poll_wait=poll_wait,
        poll_limit=poll_limit,
        give_up_after=give_up_after,
        healthy_after=healthy_after,
        backoff_base=backoff_base,
        backoff_max=backoff_max,
        random=random,
        http=http,
    )
