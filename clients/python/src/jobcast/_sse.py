"""The WHATWG event-stream parser ("9.2.6 Interpreting an event stream"),
incremental over bytes, implemented once for both the sync and the async
watch and fuzzed against a character-by-character reference
(tests/test_sse.py).

- UTF-8 decoding with replacement; one leading BOM is stripped;
- CR, LF and CRLF end lines, also when a CRLF is split across chunks;
- `data` lines are joined with LF; a block without data dispatches nothing
  (no phantom empty message) but still sets the last-event-id buffer;
- an `id` containing NUL is ignored; `retry` only when it is all ASCII digits;
- an incomplete final event (no blank line) is never dispatched.

A new parser per connection: what a cut connection left half-written never
leaks into the next one.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass
from typing import List, Optional, Union


@dataclass(frozen=True)
class SseEvent:
    """A dispatched event. `last_event_id` is the last-event-id buffer at
    dispatch (WHATWG: it persists across the events of a connection)."""

    type: str
    data: str
    last_event_id: Optional[str]


@dataclass(frozen=True)
class SseRetry:
    """A `retry:` field: the reconnection time, in milliseconds."""

    ms: int


@dataclass(frozen=True)
class SseComment:
    """A comment line (`:…`), e.g. a heartbeat."""

    text: str


Frame = Union[SseEvent, SseRetry, SseComment]


class SseParser:
    """Feed bytes, get frames."""

    __slots__ = (
        "_decoder",
        "_started",
        "_skip_lf",
        "_pending",
        "_data",
        "_has_data",
        "_type",
        "_last_id",
    )

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._started = False
        self._skip_lf = False
        self._pending = ""
        self._data: List[str] = []
        self._has_data = False
        self._type = ""
        self._last_id: Optional[str] = None

    @property
    def last_event_id(self) -> Optional[str]:
        """The last-event-id buffer (None until an `id` field was seen)."""
        return self._last_id

    def feed(self, chunk: bytes) -> List[Frame]:
        """The frames completed by `chunk`."""
        text = self._decoder.decode(chunk)
        return self._text(text)

    def finish(self) -> List[Frame]:
        """The end of the stream: flushes the decoder. A final event without its
        blank line is discarded, as the spec says."""
        text = self._decoder.decode(b"", final=True)
        frames = self._text(text)
        self._pending = ""
        self._data = []
        self._has_data = False
        self._type = ""
        return frames

    def _text(self, text: str) -> List[Frame]:
        if not text:
            return []
        if not self._started:
            self._started = True
            if text[0] == "\ufeff":
                text = text[1:]
                if not text:
                    return []
        if self._skip_lf:
            self._skip_lf = False
            if text[0] == "\n":
                text = text[1:]
                if not text:
                    return []
        # A CR at the end is a line end now; a LF starting the next chunk then
        # belongs to it (CRLF split across chunks).
        self._skip_lf = text[-1] == "\r"
        if "\r" in text:
            text = text.replace("\r\n", "\n").replace("\r", "\n")
        if "\n" not in text:
            self._pending += text
            return []
        lines = text.split("\n")
        if self._pending:
            lines[0] = self._pending + lines[0]
        self._pending = lines.pop()
        out: List[Frame] = []
        for line in lines:
            self._line(line, out)
        return out

    def _line(self, line: str, out: List[Frame]) -> None:
        if not line:
            self._dispatch(out)
            return
        colon = line.find(":")
        if colon == 0:
            out.append(SseComment(line[1:]))
            return
        if colon < 0:
            name, value = line, ""
        else:
            name = line[:colon]
            value = line[colon + 1 :]
            if value[:1] == " ":
                value = value[1:]
        if name == "data":
            self._data.append(value)
            self._has_data = True
        elif name == "event":
            self._type = value
        elif name == "id":
            if "\0" not in value:
                self._last_id = value
        elif name == "retry":
            if value and value.isascii() and value.isdigit():
                out.append(SseRetry(int(value)))
        # Any other field is ignored.

    def _dispatch(self, out: List[Frame]) -> None:
        if not self._has_data:
            self._type = ""
            return
        data = "\n".join(self._data)
        out.append(SseEvent(self._type or "message", data, self._last_id))
        self._data = []
        self._has_data = False
        self._type = ""
