"""The watch's rules as a pure state machine: inputs are what happened (a
response status, a parsed SSE frame, a JSON page, the end of a connection, a
timer) with the time and a random sample; outputs are items for the
application, the next status and when to reconnect. The I/O shells
(_watch.py) only perform what the machine decides, so every rule is tested
without sockets or a clock. Mirrors crates/jobcast-client/src/machine.rs and
clients/js/src/machine.js (times in seconds here)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, List, Optional, Tuple, Union

from ._backoff import MAX_FLOOR, backoff
from ._types import (
    END_EVENT,
    ERROR_EVENT,
    RESERVED_PREFIX,
    RESET_EVENT,
    End,
    Event,
    EventId,
    Item,
    JobcastError,
    Reset,
)

#: What the machine hands to the shell, in order: items, or the error the watch stops with.
Out = List[Union[Item, JobcastError]]


def retryable_status(status: int) -> bool:
    """5xx, 408 Request Timeout and 429 Too Many Requests are retried."""
    return 500 <= status <= 599 or status in (408, 429)


def verdict(status: int, event_stream: bool) -> str:
    """What a response status means for a watch: `open`, `finish` (204),
    `retry` or `stop`."""
    if status == 200 and event_stream:
        return "open"
    if status == 204:
        return "finish"
    if retryable_status(status):
        return "retry"
    return "stop"


@dataclass(frozen=True)
class Settings:
    """Timing settings, in seconds."""

    give_up_after: float = 300.0
    healthy_after: float = 5.0
    base: float = 1.0
    maximum: float = 30.0
    #: The token can be renewed: `token_expired` with `refresh` reconnects.
    can_refresh: bool = False


def _loads(s: str) -> Any:
    try:
        return json.loads(s)
    except ValueError:
        return None


def _end(id: Optional[str], payload: dict[str, Any]) -> End:
    error = payload.get("error")
    return End(
        id=id,
        state="failed" if payload.get("state") == "failed" else "completed",
        error=error if isinstance(error, str) else None,
        data=payload.get("data"),
    )


class Machine:
    """The reconnect state machine of one watch. `status` is one of
    `connecting`, `open`, `reconnecting`, `closed`; `reason` (once closed) one
    of `end`, `no_content` (204), `error`, `gave_up`, `closed`."""

    def __init__(self, from_: str, settings: Settings, now: float) -> None:
        self.status = "connecting"
        self.reason: Optional[str] = None
        self.settings = settings
        #: Started with `live` and not yet resolved to a position.
        self.live = from_ == "live"
        #: The last event delivered: sent as Last-Event-ID, and events at or before it are dropped.
        self.last: Optional[EventId] = None
        if from_ not in ("start", "live"):
            self.last = EventId.parse(from_)
            if self.last is None:
                raise JobcastError("invalid_event_id", f"not an event id: {from_!r}")
        #: Failed attempts since the last healthy connection (the backoff exponent).
        self.attempt = 0
        self.unhealthy_since = now
        #: The floor set by the stream's `retry:`; kept across connections.
        self.retry_floor = 0.0
        self.connected_at = now
        self.delivered = False
        self.retry_at = now
        #: The delay chosen for the current wait.
        self.delay = 0.0
        #: What made the current wait necessary.
        self.last_error: Optional[JobcastError] = None

    def needs_live_position(self) -> bool:
        """Whether the shell must look up the stream's head before connecting."""
        return self.live and self.last is None

    def resolve_live(self, head: Optional[EventId]) -> None:
        """The live start resolved: the head of an open stream, or None for a
        stream that does not exist yet (everything it will have is live)."""
        self.live = False
        self.last = head

    def position(self) -> Tuple[str, Optional[str]]:
        """Where the next connection starts: (`start`, None), (`live`, None) or (`after`, id)."""
        if self.last is not None:
            return ("after", str(self.last))
        return ("live", None) if self.live else ("start", None)

    def on_open(self, now: float) -> None:
        """The response was `200 text/event-stream`."""
        self.status = "open"
        self.connected_at = now
        self.delivered = False

    def on_refused(self, now: float, status: int, error: JobcastError, random: float, out: Out) -> None:
        """The response was anything else; `error.retry_after` is a floor."""
        v = verdict(status, False)
        if v == "finish":
            self.close("no_content")
        elif v == "retry":
            self._fail(now, error, error.retry_after or 0.0, False, random, out)
        else:
            self.stop(error, out)

    def on_network_error(self, now: float, error: JobcastError, random: float, out: Out) -> None:
        """The request got no response (refused, reset, timed out)."""
        self._fail(now, error, 0.0, False, random, out)

    def on_retry(self, ms: int) -> None:
        """The stream's `retry:` field."""
        self.retry_floor = min(ms / 1000.0, MAX_FLOOR)

    def on_sse_event(
        self, now: float, id: Optional[str], type: str, data: str, random: float, out: Out
    ) -> None:
        """One event of the open stream; `id` is the last-event-id buffer at dispatch."""
        if self.status != "open":
            return  # after the end or an error, the rest is ignored
        if type == END_EVENT:
            payload = _loads(data)
            if not isinstance(payload, dict) or payload.get("state") not in ("completed", "failed"):
                self._protocol(f"bad {END_EVENT} data {data!r}", out)
                return
            eid = EventId.parse(id)
            if eid is not None:
                self.last = eid
            out.append(_end(str(eid) if eid else None, payload))
            self.close("end")
        elif type == ERROR_EVENT:
            p = _loads(data)
            if not isinstance(p, dict) or not isinstance(p.get("code"), str) or not isinstance(p.get("retryable"), bool):
                self._protocol(f"bad {ERROR_EVENT} data {data!r}", out)
                return
            ms = p.get("retry_after_ms")
            retry_after = ms / 1000.0 if isinstance(ms, (int, float)) and not isinstance(ms, bool) else None
            err = JobcastError(
                p["code"],
                str(p.get("message", p["code"])),
                retryable=p["retryable"],
                retry_after=retry_after,
                refresh=p.get("refresh") is True,
            )
            if err.retryable:
                # The server itself reported a problem: only delivered events
                # make this connection count as healthy.
                self._fail(now, err, retry_after or 0.0, self.delivered, random, out)
            elif err.refresh and self.settings.can_refresh:
                # A fresh token is asked for on the next attempt.
                self._fail(now, err, 0.0, self.delivered, random, out)
            else:
                self.stop(err, out)
        elif type == RESET_EVENT:
            p = _loads(data)
            if not isinstance(p, dict) or not isinstance(p.get("reason"), str):
                self._protocol(f"bad {RESET_EVENT} data {data!r}", out)
                return
            self._apply_reset(p, out)
        elif type.startswith(RESERVED_PREFIX):
            pass  # an unknown control event (a newer server): ignored
        else:
            eid = EventId.parse(id)
            if eid is None:
                self._protocol(
                    f"an event without a valid id (got {id!r}); cannot deliver it exactly once", out
                )
                return
            self._deliver(eid, type, data, None, out)

    def on_page(self, now: float, page: Any, out: Out) -> None:
        """A JSON page of the long-poll transport: `{events, next, state, reset?}`."""
        if not isinstance(page, dict) or not isinstance(page.get("events"), list):
            self._protocol("a JSON page without events", out)
            return
        # Any page is a healthy exchange with the server.
        self.status = "open"
        self.attempt = 0
        self.unhealthy_since = now
        self.connected_at = now
        reset = page.get("reset")
        if isinstance(reset, dict):
            self._apply_reset(reset, out)
        for e in page["events"]:
            if self.status != "open":
                return
            if not isinstance(e, dict):
                self._protocol("a page event that is not an object", out)
                return
            eid = EventId.parse(e.get("id"))
            t = e.get("type")
            type = t if isinstance(t, str) else "message"
            d = e.get("data")
            data = d if isinstance(d, str) else json.dumps(d, separators=(",", ":"), ensure_ascii=False)
            if eid is None:
                self._protocol(f"a page event without a valid id: {e.get('id')!r}", out)
                return
            if type == END_EVENT:
                payload = _loads(data)
                if not isinstance(payload, dict):
                    self._protocol(f"bad {END_EVENT} data", out)
                    return
                self.last = eid
                out.append(_end(str(eid), payload))
                self.close("end")
                return
            if type.startswith(RESERVED_PREFIX):
                continue
            tm = e.get("time")
            self._deliver(eid, type, data, tm if isinstance(tm, str) else None, out)
        if self.status != "open":
            return
        if page.get("next", "") is None:
            # The server says the end was returned; we did not see it (a
            # stream that ended before this client's position): nothing more.
            self.close("end")
        elif self.last is None:
            # An empty stream: `next` is `{epoch}-0`, the position to poll from.
            nxt = EventId.parse(page.get("next"))
            if nxt is not None:
                self.last = nxt

    def on_closed(self, now: float, error: Optional[JobcastError], random: float, out: Out) -> None:
        """The open stream ended (closed by the server, cut, or timed out)."""
        if self.status != "open":
            return
        healthy = self.delivered or now - self.connected_at >= self.settings.healthy_after
        self._fail(
            now,
            error
            or JobcastError(
                "disconnected", "the connection closed before the end of the stream", retryable=True
            ),
            0.0,
            healthy,
            random,
            out,
        )

    def on_timer(self) -> None:
        """The reconnect delay is over."""
        if self.status == "reconnecting":
            self.status = "connecting"

    def stop(self, error: JobcastError, out: Out) -> None:
        """Stops with `error` as the last output."""
        out.append(error)
        self.close("gave_up" if error.code == "gave_up" else "error")

    def close(self, reason: str) -> None:
        if self.status == "closed":
            return
        self.status = "closed"
        self.reason = reason

    def _apply_reset(self, p: dict[str, Any], out: Out) -> None:
        # From now on the server's position is the reference (its epoch may differ).
        resumed = p.get("resumed_from")
        requested = p.get("requested")
        self.last = EventId.parse(resumed)
        self.live = False
        self.delivered = True
        out.append(
            Reset(
                reason=str(p.get("reason")),
                requested=requested if isinstance(requested, str) else None,
                resumed_from=resumed if isinstance(resumed, str) else None,
            )
        )

    def _deliver(self, id: EventId, type: str, data: str, time: Optional[str], out: Out) -> None:
        """Delivers an event unless it was delivered already (dedupe by seq)."""
        last = self.last
        if last is not None and last.epoch == id.epoch and id.seq <= last.seq:
            return
        self.last = id
        self.live = False
        self.delivered = True
        out.append(Event(id=f"{id.epoch}-{id.seq}", seq=id.seq, type=type, data=data, time=time))

    def _protocol(self, detail: str, out: Out) -> None:
        self.stop(JobcastError("protocol", detail), out)

    def _fail(
        self, now: float, error: JobcastError, once_floor: float, healthy: bool, random: float, out: Out
    ) -> None:
        """A connection attempt failed or a connection ended: wait and
        reconnect, or give up after `give_up_after` without a healthy connection."""
        if self.status == "closed":
            return
        if healthy:
            self.attempt = 0
            self.unhealthy_since = now
        elapsed = now - self.unhealthy_since
        if elapsed >= self.settings.give_up_after:
            self.stop(
                JobcastError(
                    "gave_up",
                    f"gave up after {self.attempt + 1} attempts in {elapsed:.3f} s: {error.message}",
                    last=error,
                ),
                out,
            )
            return
        floor = max(self.retry_floor, once_floor)
        self.delay = backoff(self.attempt, floor, random, self.settings.base, self.settings.maximum)
        self.attempt += 1
        self.retry_at = now + self.delay
        self.last_error = error
        self.status = "reconnecting"
