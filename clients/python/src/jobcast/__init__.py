"""jobcast: the Python client of the jobcast event-log server.

Producer::

    with jobcast.Stream("http://127.0.0.1:7700", "build-42") as s:
        s.append("compiling")            # completes on exit, fails if the block raises

Watcher::

    for item in jobcast.watch("http://127.0.0.1:7700", "build-42"):
        ...                              # Event, Reset; the last item is the End

Both sync and asyncio (`AsyncStream`, `async for item in watch(...)`).
"""

from ._backoff import backoff, parse_retry_after
from ._batcher import AsyncBatcher, Batcher
from ._client import (
    MISSING,
    AsyncClient,
    AsyncStream,
    Client,
    RetryPolicy,
    Stream,
    encode_event,
    idempotency_key,
)
from ._logging import JobcastHandler
from ._sse import SseComment, SseEvent, SseParser, SseRetry
from ._types import (
    Appended,
    End,
    Event,
    EventId,
    Item,
    JobcastError,
    NewEvent,
    Reset,
)
from ._watch import DEFAULT_URL, Watch, watch

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_URL",
    "MISSING",
    "Appended",
    "AsyncBatcher",
    "AsyncClient",
    "AsyncStream",
    "Batcher",
    "Client",
    "End",
    "Event",
    "EventId",
    "Item",
    "JobcastError",
    "JobcastHandler",
    "NewEvent",
    "Reset",
    "RetryPolicy",
    "SseComment",
    "SseEvent",
    "SseParser",
    "SseRetry",
    "Stream",
    "Watch",
    "backoff",
    "encode_event",
    "idempotency_key",
    "parse_retry_after",
    "watch",
]
