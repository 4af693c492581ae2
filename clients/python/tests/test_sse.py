"""The SSE parser: the shared fixtures, and fuzzing (hypothesis) against a
character-by-character reference written from the WHATWG text, under every
way of cutting the bytes into chunks."""

from __future__ import annotations

from typing import List, Optional, Tuple

from hypothesis import given, settings
from hypothesis import strategies as st

from jobcast import SseComment, SseEvent, SseParser, SseRetry
from jobcast._sse import Frame


def reference(body: bytes) -> List[Frame]:
    """WHATWG 9.2.6, literally: decode (a BOM stripped), split lines at CRLF,
    LF or CR, one line at a time; no chunking at all."""
    text = body.decode("utf-8", "replace")
    if text.startswith("\ufeff"):
        text = text[1:]
    out: List[Frame] = []
    data = ""
    event_type = ""
    last_id: Optional[str] = None
    i = 0
    line_start = 0
    lines: List[str] = []
    while i < len(text):
        c = text[i]
        if c == "\r" or c == "\n":
            lines.append(text[line_start:i])
            if c == "\r" and i + 1 < len(text) and text[i + 1] == "\n":
                i += 1
            line_start = i + 1
        i += 1
    # text[line_start:] is an incomplete line: never processed.
    for line in lines:
        if line == "":
            if data == "":
                event_type = ""
                continue
            if data.endswith("\n"):
                data = data[:-1]
            out.append(SseEvent(event_type or "message", data, last_id))
            data = ""
            event_type = ""
            continue
        if line.startswith(":"):
            out.append(SseComment(line[1:]))
            continue
        if ":" in line:
            field, value = line.split(":", 1)
            if value.startswith(" "):
                value = value[1:]
        else:
            field, value = line, ""
        if field == "event":
            event_type = value
        elif field == "data":
            data += value + "\n"
        elif field == "id":
            if "\0" not in value:
                last_id = value
        elif field == "retry":
            if value and all("0" <= ch <= "9" for ch in value):
                out.append(SseRetry(int(value)))
    return out


def parse_chunked(body: bytes, cuts: List[int]) -> List[Frame]:
    p = SseParser()
    out: List[Frame] = []
    prev = 0
    for c in sorted(set(x % (len(body) + 1) for x in cuts)) + [len(body)]:
        out.extend(p.feed(body[prev:c]))
        prev = c
    out.extend(p.finish())
    return out


# Bytes that hit the interesting paths: field names, separators, every line end,
# a BOM, NUL, multi-byte and broken UTF-8.
atoms = st.sampled_from(
    [
        b"data", b"data:", b"data: ", b"event:", b"event: x", b"id:", b"id: ab-1", b"id: a\0b",
        b"retry:", b"retry: 1500", b"retry: 15x", b":", b": hi", b"\r", b"\n", b"\r\n", b"\n\n",
        b"\r\r", b" ", b"x", b"\xef\xbb\xbf", b"\xc3\xa9", b"\xe2\x82", b"\xac", b"\xff", b"\0",
        b"foo:bar", b"jobcast.end", b"{}",
    ]
)
bodies = st.lists(atoms, max_size=40).map(b"".join) | st.binary(max_size=200)


@settings(max_examples=1500, deadline=None)
@given(bodies, st.lists(st.integers(min_value=0, max_value=10_000), max_size=12))
def test_matches_the_reference_however_the_bytes_are_cut(body: bytes, cuts: List[int]) -> None:
    assert parse_chunked(body, cuts) == reference(body)


@settings(max_examples=300, deadline=None)
@given(bodies)
def test_byte_by_byte_is_the_same(body: bytes) -> None:
    assert parse_chunked(body, list(range(len(body)))) == reference(body)


line_text = st.text(st.characters(codec="utf-8", exclude_characters="\r\n"), max_size=20)


@settings(max_examples=500, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.from_regex(r"[a-z]{1,4}-[1-9][0-9]{0,3}", fullmatch=True),
            st.sampled_from(["message", "tick", "token"]),
            st.lists(line_text, min_size=1, max_size=4),
        ),
        max_size=8,
    ),
    st.sampled_from(["\n", "\r", "\r\n"]),
    st.lists(st.integers(min_value=0, max_value=4000), max_size=8),
)
def test_what_an_encoder_writes_comes_back(
    events: List[Tuple[str, str, List[str]]], eol: str, cuts: List[int]
) -> None:
    """Any data (split into lines as the server splits it) survives any line
    ending and any chunking; nothing leaks between events."""
    text = "retry: 3000" + eol
    for id, type, lines in events:
        text += f"id: {id}{eol}"
        if type != "message":
            text += f"event: {type}{eol}"
        text += "".join(f"data: {ln}{eol}" for ln in lines) + eol
        text += f":{eol}"
    got = parse_chunked(text.encode(), cuts)
    want: List[Frame] = [SseRetry(3000)]
    for id, type, lines in events:
        want += [SseEvent(type, "\n".join(lines), id), SseComment("")]
    assert got == want


def test_bom_only_once_and_only_at_the_start() -> None:
    p = SseParser()
    assert p.feed(b"\xef\xbb") == []
    frames = p.feed(b"\xbfdata: a\n\n\xef\xbb\xbfdata: b\n\n")
    assert frames == [SseEvent("message", "a", None)]  # "\ufeffdata" is an unknown field


def test_crlf_split_across_chunks_dispatches_at_once() -> None:
    p = SseParser()
    assert p.feed(b"data: a\r\n\r") == [SseEvent("message", "a", None)]
    assert p.feed(b"\ndata: b\r\r") == [SseEvent("message", "b", None)]


def test_incomplete_final_event_is_dropped() -> None:
    p = SseParser()
    assert p.feed(b"id: x-1\ndata: whole\n\nid: x-2\ndata: half") == [SseEvent("message", "whole", "x-1")]
    assert p.finish() == []
