"""Ids, events, errors: the values the client hands to the application."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Optional, Union

#: The control event that ends a stream.
END_EVENT = "jobcast.end"
#: The control event that reports a problem.
ERROR_EVENT = "jobcast.error"
#: The control event that says the resume point could not be honoured.
RESET_EVENT = "jobcast.reset"
#: Event types with this prefix are the server's control events.
RESERVED_PREFIX = "jobcast."

MAX_SEQ = 2**64 - 1
_EVENT_ID = re.compile(r"([a-z0-9]{1,16})-(0|[1-9][0-9]*)")
_STREAM_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,199}")
_EVENT_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")


def valid_stream_id(s: object) -> bool:
    """Whether `s` is a stream id (`^[A-Za-z0-9][A-Za-z0-9._:-]{0,199}$`)."""
    return isinstance(s, str) and _STREAM_ID.fullmatch(s) is not None


def valid_event_type(s: object) -> bool:
    """Whether `s` is an event type an application may append (not `jobcast.`-prefixed)."""
    return (
        isinstance(s, str)
        and _EVENT_TYPE.fullmatch(s) is not None
        and not s.startswith(RESERVED_PREFIX)
    )


@dataclass(frozen=True, order=True)
class EventId:
    """An event id `{epoch}-{seq}`."""

    epoch: str
    seq: int

    @staticmethod
    def parse(s: object) -> Optional[EventId]:
        """The id, or None when `s` is not `^[a-z0-9]{1,16}-(0|[1-9][0-9]*)$` with seq ≤ 2^64−1."""
        if not isinstance(s, str):
            return None
        m = _EVENT_ID.fullmatch(s)
        if m is None:
            return None
        seq = int(m.group(2))
        if seq > MAX_SEQ:
            return None
        return EventId(m.group(1), seq)

    def __str__(self) -> str:
        return f"{self.epoch}-{self.seq}"


@dataclass(frozen=True)
class Event:
    """An event of a stream's log, delivered once, in seq order."""

    #: `{epoch}-{seq}`: pass it as `from_=` to resume after this event.
    id: str
    #: Its position: 1, 2, 3 … per stream (per epoch).
    seq: int
    #: `message` unless the producer gave one.
    type: str
    #: The data as stored: a string sent as is, any other JSON value as compact JSON.
    data: str
    #: RFC 3339 server time (only on the long-poll transport, which has it).
    time: Optional[str] = None

    def json(self) -> Any:
        """`data` parsed as JSON (raises ValueError when it is plain text)."""
        return json.loads(self.data)


@dataclass(frozen=True)
class Reset:
    """`jobcast.reset`: the server could not resume where asked (history
    trimmed, or the stream was deleted and created again: a new epoch).
    Events may have been lost; the next events continue from `resumed_from`."""

    reason: str
    requested: Optional[str]
    resumed_from: Optional[str]


@dataclass(frozen=True)
class End:
    """The end of a stream (`jobcast.end`); nothing follows."""

    id: Optional[str]
    #: `completed` or `failed`.
    state: str
    error: Optional[str] = None
    #: The final data given to `complete` (a JSON value), None when none.
    data: Any = None

    @property
    def ok(self) -> bool:
        return self.state == "completed"


#: What a watch yields, in order: events and resets, then at most one End.
Item = Union[Event, Reset, End]


class JobcastError(Exception):
    """An error of a request or a watch. `code` is stable: the server's error
    code (`stream_not_found`, `unauthorized`, `stream_deleted`,
    `stream_ended`, …), `http_{status}` when the body had none, or one of
    `network`, `timeout`, `protocol`, `gave_up`, `token`, `invalid_input`."""

    def __init__(
        self,
        code: str,
        message: str,
        *,
        status: Optional[int] = None,
        retryable: bool = False,
        retry_after: Optional[float] = None,
        refresh: bool = False,
        last: Optional[JobcastError] = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        #: The HTTP status, for a refused request.
        self.status = status
        #: Whether a retry may succeed.
        self.retryable = retryable
        #: A floor for the next attempt, in seconds (Retry-After, retry_after_ms).
        self.retry_after = retry_after
        #: A fresh token may fix it (`token_expired`).
        self.refresh = refresh
        #: For `gave_up`: the last failure.
        self.last = last

    def __str__(self) -> str:
        head = f"{self.code}"
        if self.status is not None:
            head += f" ({self.status})"
        return f"{head}: {self.message}"

    def __repr__(self) -> str:
        return f"JobcastError({self.code!r}, {self.message!r}, status={self.status!r})"


@dataclass(frozen=True)
class NewEvent:
    """One event to append: `data` is any JSON value (a string is stored as is),
    `type` defaults to `message`."""

    data: Any
    type: Optional[str] = None


@dataclass(frozen=True)
class Appended:
    """The answer to an append: the ids of the first and last event written."""

    first_id: str
    last_id: str
    count: int
    #: The stream's producer was asked to stop (`POST …/cancel`).
    cancel_requested: bool = False
    #: The whole JSON answer.
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
