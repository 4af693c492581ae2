"""The producer against a fake server (httpx.MockTransport): one
Idempotency-Key across the retries of a call, Retry-After as a floor, what is
not retried, the context manager, cancel requests (the server feature is not
there yet: its answers are faked here), the batcher's back-pressure."""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any, Callable, Dict, List

import httpx
import pytest

import jobcast
from jobcast import JobcastError

URL = "http://jobcast.test"


class Fake:
    """Records requests; `answers` are popped in order (the last one repeats)."""

    def __init__(self, *answers: Callable[[httpx.Request], httpx.Response]) -> None:
        self.answers = list(answers)
        self.requests: List[httpx.Request] = []
        self.seq = 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        f = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        return f(request)

    def keys(self) -> List[str]:
        return [r.headers.get("idempotency-key", "") for r in self.requests]

    def bodies(self) -> List[Any]:
        return [json.loads(r.content) if r.content else None for r in self.requests]


def ok(cancel: bool = False) -> Callable[[httpx.Request], httpx.Response]:
    def answer(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.content else None
        n = len(body) if isinstance(body, list) else 1
        if request.url.path.endswith("/events"):
            out: Dict[str, Any] = {"first_id": "ab-1", "last_id": f"ab-{n}", "count": n}
            if cancel:
                out["cancel_requested"] = True
            return httpx.Response(201, json=out)
        meta = {"id": "s", "epoch": "ab", "state": "open", "cancel_requested": cancel}
        if request.url.path.endswith("/complete"):
            meta["state"] = "completed"
        if request.url.path.endswith("/fail"):
            meta["state"] = "failed"
        return httpx.Response(200, json=meta)

    return answer


def status(code: int, headers: Dict[str, str] | None = None, err: str = "x") -> Callable[[httpx.Request], httpx.Response]:
    return lambda _r: httpx.Response(code, headers=headers, json={"error": {"code": err, "message": "m"}})


def refuse(_r: httpx.Request) -> httpx.Response:
    raise httpx.ConnectError("refused")


@pytest.fixture()
def sleeps(monkeypatch: pytest.MonkeyPatch) -> List[float]:
    got: List[float] = []
    monkeypatch.setattr(jobcast._client.time, "sleep", lambda s: got.append(s))  # type: ignore[attr-defined]
    return got


def client(fake: Fake, **kw: Any) -> jobcast.Client:
    return jobcast.Client(URL, http=httpx.Client(transport=httpx.MockTransport(fake)), random=lambda: 0.5, **kw)


def test_one_key_across_retries_and_retry_after_is_a_floor(sleeps: List[float]) -> None:
    fake = Fake(status(503, {"retry-after": "2"}), refuse, status(429), ok())
    a = client(fake).append("s", {"x": 1}, type="t")
    assert a.count == 1
    keys = fake.keys()
    assert len(keys) == 4 and len(set(keys)) == 1 and len(keys[0]) == 32
    assert fake.bodies()[0] == {"type": "t", "data": {"x": 1}}
    # attempt 0 with Retry-After 2 → 2 s; then 0.5 × 2 s, 0.5 × 4 s (full jitter, random 0.5).
    assert sleeps == [2.0, 1.0, 2.0]
    # A new call gets a new key.
    client(fake).append("s", "y")
    assert fake.keys()[-1] != keys[0]


def test_not_retried_and_giving_up(sleeps: List[float]) -> None:
    for code, err in [(400, "empty_data"), (401, "unauthorized"), (409, "stream_ended"), (422, "idempotency_key_reused")]:
        fake = Fake(status(code, err=err))
        with pytest.raises(JobcastError) as e:
            client(fake).append("s", "x")
        assert (e.value.status, e.value.code, len(fake.requests)) == (code, err, 1)
    fake = Fake(status(503))
    with pytest.raises(JobcastError) as e:
        client(fake, retry=jobcast.RetryPolicy(max_attempts=3)).append("s", "x")
    assert e.value.code == "gave_up" and e.value.last is not None and e.value.last.status == 503
    assert len(fake.requests) == 3


def test_invalid_input_fails_at_the_call() -> None:
    fake = Fake(ok())
    c = client(fake)
    for data, type, code in [("", None, "empty_data"), ("x", "jobcast.end", "invalid_event_type"),
                             ("x", "bad type", "invalid_event_type"), (object(), None, "invalid_data"),
                             (float("nan"), None, "invalid_data")]:
        with pytest.raises(JobcastError) as e:
            c.append("s", data, type=type)
        assert e.value.code == code
    with pytest.raises(JobcastError):
        c.append("bad/id", "x")
    with pytest.raises(JobcastError):
        c.extend("s", [])
    assert fake.requests == []


def test_extend_splits_into_batches_of_1000() -> None:
    fake = Fake(ok())
    a = client(fake).extend("s", [jobcast.NewEvent(i, type="n") for i in range(2500)])
    assert [len(b) for b in fake.bodies()] == [1000, 1000, 500]
    assert len(set(fake.keys())) == 3
    assert a.count == 2500 and fake.bodies()[0][0] == {"type": "n", "data": 0}


def test_delete_404_after_an_uncertain_attempt_is_done(sleeps: List[float]) -> None:
    fake = Fake(refuse, status(404, err="stream_not_found"))
    client(fake).delete("s")
    with pytest.raises(JobcastError):
        client(Fake(status(404, err="stream_not_found"))).delete("s")


def test_producer_refreshes_an_expired_token_once() -> None:
    calls: List[int] = []

    def token() -> str:
        calls.append(1)
        return f"t{len(calls)}"

    fake = Fake(status(401, err="token_expired"), ok())
    client(fake, token=token).append("s", "x")
    assert [r.headers["authorization"] for r in fake.requests] == ["Bearer t1", "Bearer t2"]
    fake = Fake(status(401, err="token_expired"))
    with pytest.raises(JobcastError):
        client(fake, token=token).append("s", "x")
    assert len(fake.requests) == 2


def test_context_manager_completes_or_fails_with_the_message() -> None:
    fake = Fake(ok())
    with jobcast.Stream(client(fake), "s") as s:
        s.append("a")
    assert [r.url.path for r in fake.requests] == ["/v1/streams/s/events", "/v1/streams/s/complete"]
    assert fake.requests[1].content == b""
    assert s.ended and s.last_id == "ab-1"

    fake = Fake(ok())
    with pytest.raises(ValueError):
        with jobcast.Stream(client(fake), "s") as s:
            s.append("a")
            raise ValueError("the model crashed")
    assert fake.requests[-1].url.path == "/v1/streams/s/fail"
    assert fake.bodies()[-1] == {"error": "the model crashed"}

    fake = Fake(ok())
    with pytest.raises(KeyError):
        with jobcast.Stream(client(fake), "s"):
            raise KeyError()
    assert fake.bodies()[-1] == {"error": "KeyError"}

    fake = Fake(ok())
    with jobcast.Stream(client(fake), "s") as s:
        s.complete(data={"tokens": 3})
    assert [r.url.path for r in fake.requests] == ["/v1/streams/s/complete"]
    assert fake.bodies() == [{"data": {"tokens": 3}}]

    # Found ended (409): the exit does not try to end it again.
    fake = Fake(status(409, err="stream_ended"))
    with pytest.raises(JobcastError):
        with jobcast.Stream(client(fake), "s") as s:
            s.append("late")
    assert s.ended and len(fake.requests) == 1


def test_cancel_request_is_surfaced_once_the_server_has_it() -> None:
    fake = Fake(ok(), ok(cancel=True), ok(cancel=False))
    s = jobcast.Stream(client(fake), "s")
    s.append("1")
    assert not s.cancel_requested and not s.cancel_event.is_set()
    s.append("2")
    assert s.cancel_requested and s.cancel_event.is_set()
    s.append("3")  # stays set
    assert s.cancel_requested
    # From the metadata (check_cancel), and through a batcher's answers.
    s2 = jobcast.Stream(client(Fake(ok(cancel=True))), "s")
    assert s2.check_cancel() and s2.cancel_event.is_set()
    s3 = jobcast.Stream(client(Fake(ok(cancel=True))), "s")
    with s3.batcher(max_delay=0) as b:
        b.append("tok")
    assert s3.cancel_event.wait(5)
    # A worker thread can wait on the event.
    s4 = jobcast.Stream(client(Fake(ok(cancel=True))), "s")
    waiter = threading.Thread(target=lambda: s4.cancel_event.wait(5))
    waiter.start()
    s4.append("x")
    waiter.join(5)
    assert not waiter.is_alive()


def test_async_cancel_event_and_context_manager() -> None:
    async def main() -> None:
        fake = Fake(ok(), ok(cancel=True))
        c = jobcast.AsyncClient(URL, http=httpx.AsyncClient(transport=httpx.MockTransport(fake)))
        async with jobcast.AsyncStream(c, "s") as s:
            event = s.cancel_event
            waiter = asyncio.ensure_future(event.wait())
            await s.append("1")
            assert not s.cancel_requested and not waiter.done()
            async with s.batcher(max_delay=0) as b:
                await b.append("2")
            await asyncio.wait_for(waiter, 5)
            assert s.cancel_requested
        assert fake.requests[-1].url.path == "/v1/streams/s/complete"
        fake = Fake(ok())
        c = jobcast.AsyncClient(URL, http=httpx.AsyncClient(transport=httpx.MockTransport(fake)))
        with pytest.raises(RuntimeError):
            async with jobcast.AsyncStream(c, "s") as s:
                raise RuntimeError("boom")
        assert fake.bodies()[-1] == {"error": "boom"}

    asyncio.run(main())


def test_batcher_back_pressure_and_order() -> None:
    gate = threading.Event()
    fake = Fake(ok())

    def slow(request: httpx.Request) -> httpx.Response:
        assert gate.wait(10)
        return fake(request)

    c = jobcast.Client(URL, http=httpx.Client(transport=httpx.MockTransport(slow)))
    s = jobcast.Stream(c, "s")
    b = s.batcher(max_events=5, max_delay=0, max_queue=10)
    for i in range(5):
        b.append(i)
    jobcast_wait = 0
    while b._inflight == 0 and jobcast_wait < 500:  # the first batch is on its way (and stuck)
        threading.Event().wait(0.01)
        jobcast_wait += 1
    for i in range(5, 15):
        assert b.append(i, block=False)
    assert not b.append(15, block=False), "the queue is full: dropped, not queued"
    blocked = threading.Thread(target=lambda: b.append(16))
    blocked.start()
    blocked.join(0.2)
    assert blocked.is_alive(), "append waits while the queue is full"
    gate.set()
    blocked.join(5)
    s.complete()
    sent = [e["data"] for body in fake.bodies() if isinstance(body, list) for e in body]
    assert sent == [*range(15), 16]
    assert b.sent == 16 and b.lost == 0 and b.batches >= 4
    assert fake.requests[-1].url.path.endswith("/complete"), "complete flushed the batcher first"


def test_batcher_failure_is_raised_and_counted(sleeps: List[float]) -> None:
    fake = Fake(status(400, err="batch_too_large"))
    s = jobcast.Stream(client(fake), "s")
    b = s.batcher(max_delay=0)
    b.append("x")
    with pytest.raises(JobcastError):
        b.flush(timeout=5)
    with pytest.raises(JobcastError):
        b.append("y")
    assert b.lost == 1
    with pytest.raises(JobcastError):
        b.close()


def test_a_lost_batch_fails_the_stream_on_exit(sleeps: List[float]) -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        if isinstance(json.loads(request.content or b"null"), list):
            return status(400, err="event_too_large")(request)
        return ok()(request)

    fake = Fake(answer)
    with pytest.raises(JobcastError) as e:
        with jobcast.Stream(client(fake), "s") as s:
            with s.batcher(max_delay=0) as b:
                b.append("x")
                b.flush()
    assert e.value.code == "event_too_large"
    assert s.ended and fake.requests[-1].url.path.endswith("/fail")
    assert [r.url.path for r in fake.requests].count("/v1/streams/s/fail") == 1
    fake = Fake(answer)
    with pytest.raises(JobcastError):
        with jobcast.Stream(client(fake), "s") as s:
            s.batcher(max_delay=10).append("x")  # sent (and refused) at exit
    assert fake.requests[-1].url.path.endswith("/fail")
    assert fake.bodies()[-1] == {"error": "event_too_large (400): m"}
