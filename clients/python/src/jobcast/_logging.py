"""A logging.Handler that streams log records to a jobcast stream."""

from __future__ import annotations

import datetime
import logging
import threading
from typing import Any, Dict

from ._batcher import Batcher
from ._client import Stream


class JobcastHandler(logging.Handler):
    """Streams each record as one event (type `log` by default) whose data is
    `{"level", "logger", "message", "time"}` (plus `exc` with the formatted
    traceback). Records go through a background batcher (flushed every
    `max_delay` seconds), so logging never waits for the network; when its
    queue is full a record is dropped and counted in `dropped`, rather than
    blocking the program. Records caused by the batcher's own requests (httpx
    logs each request) are ignored, so the handler cannot feed itself.

        handler = jobcast.JobcastHandler(jobcast.Stream(url, "build-42"))
        logging.getLogger().addHandler(handler)

    `close()` (also called by `logging.shutdown()` at exit) flushes the
    batcher; it does not end the stream."""

    def __init__(
        self,
        stream: Stream,
        level: int = logging.NOTSET,
        *,
        type: str = "log",
        max_delay: float = 0.2,
        max_events: int = 500,
        max_queue: int = 10_000,
    ) -> None:
        super().__init__(level)
        self.stream = stream
        self.event_type = type
        self.dropped = 0
        self._batcher: Batcher = stream.batcher(max_events=max_events, max_delay=max_delay, max_queue=max_queue)
        self._local = threading.local()

    def to_data(self, record: logging.LogRecord) -> Dict[str, Any]:
        """The event data of a record (override to add fields)."""
        data: Dict[str, Any] = {
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage() if self.formatter is None else self.format(record),
            "time": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
        }
        if record.exc_info and self.formatter is None:
            data["exc"] = logging.Formatter().formatException(record.exc_info)
        return data

    def emit(self, record: logging.LogRecord) -> None:
        if threading.current_thread() is self._batcher.thread or getattr(self._local, "busy", False):
            return
        self._local.busy = True
        try:
            if not self._batcher.append(self.to_data(record), type=self.event_type, block=False):
                self.dropped += 1
        except Exception:
            self.handleError(record)
        finally:
            self._local.busy = False

    def flush(self) -> None:
        """Waits until every record so far is acknowledged (at most 10 s)."""
        try:
            self._batcher.flush(timeout=10.0)
        except Exception:
            pass

    def close(self) -> None:
        try:
            self._batcher.close()
        except Exception:
            pass
        finally:
            super().close()


