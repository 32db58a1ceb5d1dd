"""The incremental SSE parser (``proxycore.http.sse``): WHATWG event-stream rules at any split.

Every stream in the table is fed whole, one byte at a time, and cut in two at every
position: the parser must give the same events, ``last_id`` and boundary state each
time, because the proxy feeds it whatever the upstream reads happen to be.
"""

from __future__ import annotations

import json
import tracemalloc
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Final

import pytest

from proxycore.http.sse import HEARTBEAT, SSEEvent, SSEParser, error_event, is_event_stream

BOM: Final = b"\xef\xbb\xbf"

#: (type, data, id, retry) of one dispatched event.
Ev = tuple[str, str, str | None, int | None]


@dataclass(frozen=True)
class Case:
    stream: bytes
    events: Sequence[Ev]
    last_id: str | None = None
    #: Whether the parser is between events once the whole stream was fed.
    boundary: bool = True


def msg(data: str, id: str | None = None, type: str = "message", retry: int | None = None) -> Ev:
    return (type, data, id, retry)


CASES: Final[dict[str, Case]] = {
    "one-event": Case(b"data: hello\n\n", [msg("hello")]),
    "multi-line-data": Case(b"data: a\ndata: b\ndata: c\n\n", [msg("a\nb\nc")]),
    "crlf": Case(b"data: a\r\ndata: b\r\n\r\ndata: c\r\n\r\n", [msg("a\nb"), msg("c")]),
    "cr-only": Case(b"data: a\rdata: b\r\rdata: c\r\r", [msg("a\nb"), msg("c")]),
    "mixed-line-ends": Case(b"data: a\r\ndata: b\rdata: c\n\r\n", [msg("a\nb\nc")]),
    # A CR ends a line; an LF right after it belongs to the same line end (whatever the
    # split), while a second CR is a blank line of its own.
    "cr-then-lf-vs-cr-then-cr": Case(
        b"data: a\r\n\rdata: b\r\r\n", [msg("a"), msg("b")], boundary=True
    ),
    "bom": Case(BOM + b"data: x\n\n", [msg("x")]),
    "bom-only-skipped-once": Case(BOM + BOM + b"data: x\n\ndata: y\n\n", [msg("y")]),
    "bom-later-is-data-of-field-name": Case(b"data: a\n\n" + BOM + b"data: b\n\n", [msg("a")]),
    "bom-alone": Case(BOM, []),
    "comments": Case(b": hello\ndata: x\n: between\ndata: y\n\n:only a comment\n\n", [msg("x\ny")]),
    "event-id-retry": Case(
        b"event: add\nid: 7\nretry: 3000\ndata: x\n\n",
        [msg("x", id="7", type="add", retry=3000)],
        last_id="7",
    ),
    "event-type-resets-after-dispatch": Case(
        b"event: add\ndata: 1\n\ndata: 2\n\n", [msg("1", type="add"), msg("2")]
    ),
    "id-with-nul-ignored": Case(
        b"id: 1\ndata: a\n\nid: 2\x003\ndata: b\n\n", [msg("a", id="1"), msg("b", id="1")], "1"
    ),
    "last-id-carries-over": Case(
        b"id: 5\ndata: a\n\ndata: b\n\nid: 6\ndata: c\n\n",
        [msg("a", id="5"), msg("b", id="5"), msg("c", id="6")],
        last_id="6",
    ),
    "id-without-data-still-sets-last-id": Case(
        b"id: 9\n\ndata: x\n\n", [msg("x", id="9")], last_id="9"
    ),
    "empty-id-resets": Case(
        b"id: 4\ndata: a\n\nid\ndata: b\n\n", [msg("a", id="4"), msg("b", id="")], last_id=""
    ),
    "retry-non-digits-ignored": Case(
        b"retry: 12a\ndata: a\n\nretry: -5\ndata: b\n\nretry:\ndata: c\n\nretry: 42\ndata: d\n\n",
        [msg("a"), msg("b"), msg("c"), msg("d", retry=42)],
    ),
    "field-without-colon": Case(b"data\n\nevent\ndata: x\n\n", [msg(""), msg("x")]),
    "data-without-space": Case(b"data:x\n\ndata:  two\n\n", [msg("x"), msg(" two")]),
    "colon-in-value": Case(b"data: a: b:c\n\n", [msg("a: b:c")]),
    "unknown-field-ignored": Case(b"foo: bar\ndata: x\nDATA: y\n\n", [msg("x")]),
    "utf8": Case("data: héllo ✓\n\n".encode(), [msg("héllo ✓")]),
    "missing-final-blank-line": Case(b"data: a\n\ndata: b\n", [msg("a")], boundary=False),
    "missing-final-line-end": Case(b"data: a\n\ndata: b", [msg("a")], boundary=False),
    "empty-data-buffer-not-dispatched": Case(b"\n\n\nevent: ping\n\nretry: 5\n\n", []),
    "heartbeat-is-a-comment": Case(
        b"data: a\n\n" + HEARTBEAT + b"data: b\n\n", [msg("a"), msg("b")]
    ),
}


def split_feeds(stream: bytes) -> Iterator[tuple[str, list[bytes]]]:
    """Every way the test feeds ``stream``: whole, byte by byte, and cut at each position."""
    yield "whole", [stream]
    yield "bytewise", [stream[i : i + 1] for i in range(len(stream))]
    for cut in range(len(stream) + 1):
        yield f"cut@{cut}", [stream[:cut], stream[cut:]]


def as_tuple(event: SSEEvent) -> Ev:
    return (event.type, event.data, event.id, event.retry)


@pytest.mark.parametrize("name", list(CASES))
def test_stream_parses_the_same_at_every_split(name: str) -> None:
    case = CASES[name]
    for how, pieces in split_feeds(case.stream):
        parser = SSEParser()
        got: list[Ev] = []
        for piece in pieces:
            got.extend(as_tuple(e) for e in parser.feed(piece))
        assert got == list(case.events), how
        assert [as_tuple(e) for e in parser.events] == list(case.events), how
        assert parser.count == len(case.events), how
        assert parser.last_id == case.last_id, how
        assert parser.at_boundary is case.boundary, how
        assert not parser.truncated, how


def test_events_are_returned_by_the_feed_that_completes_them() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: a\n") == []
    assert [e.data for e in parser.feed(b"\ndata: b\n\ndata: c")] == ["a", "b"]
    assert [e.data for e in parser.feed(b"\n\n")] == ["c"]


def test_memoryview_and_bytearray_input() -> None:
    parser = SSEParser()
    buf = bytearray(b"data: x\n\ndata: y\n\n")
    assert [e.data for e in parser.feed(memoryview(buf)[:9])] == ["x"]
    assert [e.data for e in parser.feed(buf[9:])] == ["y"]


# --------------------------------------------------------------------------- at_boundary


@pytest.mark.parametrize(
    ("fed", "boundary"),
    [
        pytest.param(b"", True, id="nothing"),
        pytest.param(b"da", False, id="inside-field-name"),
        pytest.param(b"data: x", False, id="inside-data-line"),
        pytest.param(b"data: x\n", False, id="after-data-line"),
        pytest.param(b"event: e\n", False, id="after-event-line"),
        pytest.param(b"id: 1\n", False, id="after-id-line"),
        pytest.param(b"data: x\n\n", True, id="after-event"),
        pytest.param(b"data: x\r\n\r\n", True, id="after-crlf-event"),
        pytest.param(b"data: x\r\r", True, id="after-cr-event-maybe-lf-next"),
        pytest.param(b": comment", False, id="inside-comment"),
        pytest.param(b": comment\n", True, id="after-comment-line"),
        pytest.param(b"data: x\n: comment\n", False, id="comment-inside-event"),
        pytest.param(b"data: x\n\ndata: y", False, id="inside-second-event"),
        pytest.param(b"event: ping\n\n", True, id="after-empty-event"),
        pytest.param(BOM[:2], False, id="inside-bom"),
        pytest.param(BOM, True, id="after-bom"),
    ],
)
def test_at_boundary(fed: bytes, boundary: bool) -> None:
    parser = SSEParser()
    parser.feed(fed)
    assert parser.at_boundary is boundary


def test_at_boundary_byte_by_byte_matches_event_ends() -> None:
    """Fed one byte at a time, the parser is at a boundary exactly after each event."""
    stream = b"data: a\n\nevent: x\ndata: b\r\n\r\n: c\n"
    ends = {len(b"data: a\n\n"), len(b"data: a\n\nevent: x\ndata: b\r\n\r"), len(stream)}
    ends.add(len(b"data: a\n\nevent: x\ndata: b\r\n\r\n"))  # the LF of the CRLF: still between
    parser = SSEParser()
    for i in range(len(stream)):
        parser.feed(stream[i : i + 1])
        assert parser.at_boundary is (i + 1 in ends), (i, stream[: i + 1])


# --------------------------------------------------------------------------- max_bytes


def test_truncation_records_truncated_and_keeps_counting() -> None:
    parser = SSEParser(max_bytes=1024)
    events = [b"data: %04d %s\n\n" % (n, b"x" * 90) for n in range(200)]
    dispatched = 0
    for event in events:
        dispatched += len(parser.feed(event))
    assert dispatched == 200, "every event is still parsed and returned"
    assert parser.count == 200
    assert parser.truncated
    kept = parser.events
    assert 0 < len(kept) < 200
    assert sum(len(e.data) + len(e.type) for e in kept) <= 1024
    assert [e.data[:4] for e in kept] == [f"{n:04d}" for n in range(len(kept))]


def test_truncation_keeps_a_prefix_without_holes() -> None:
    """Once an event did not fit, later (smaller) events are not kept either.

    The transcript lists ``events`` in order; a later small event slipping in after a
    dropped big one would make the list look contiguous when it is not.
    """
    parser = SSEParser(max_bytes=1024)
    parser.feed(b"data: " + b"a" * 600 + b"\n\n")  # kept
    parser.feed(b"data: " + b"b" * 600 + b"\n\n")  # does not fit: truncated from here on
    parser.feed(b"data: c\n\n")  # would fit in the room left, but comes after a hole
    assert parser.count == 3
    assert parser.truncated
    assert [e.data[0] for e in parser.events] == ["a"]


def test_long_line_is_bounded_and_marks_truncated() -> None:
    parser = SSEParser(max_bytes=1024)
    parser.feed(b"data: " + b"z" * 100_000 + b"\n\ndata: after\n\n")
    assert parser.count == 2
    assert parser.truncated
    assert all(len(e.data) <= 1024 for e in parser.events)
    assert parser.at_boundary


def test_one_endless_event_does_not_grow_memory_past_max_bytes() -> None:
    """An upstream that sends data lines and never the blank line: the tap stays bounded.

    ``max_bytes`` is the parser's memory bound for a transcript; a multi-line event must
    not be able to make it hold more (here 640 KiB of ``data:`` lines, bound 1 KiB).
    """
    parser = SSEParser(max_bytes=1024)
    piece = b"data: " + b"y" * 58 + b"\n"  # 65 bytes a line
    block = piece * 63  # ~4 KiB: one proxy read
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for _ in range(160):
            parser.feed(block)
        grown = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert not parser.at_boundary
    assert grown < 64 * 1024, f"parser holds {grown} bytes for a 1 KiB bound"


# --------------------------------------------------------------------------- error_event


@pytest.mark.parametrize(
    ("status", "message", "request_id"),
    [
        (502, "cannot connect to upstream 127.0.0.1:9: Connection refused", "abc123"),
        (504, 'multi\nline "quoted" message é ✓\r\n: not a comment', "r-1"),
        (429, "", "0" * 24),
    ],
)
def test_error_event_is_one_valid_sse_event_with_json_data(
    status: int, message: str, request_id: str
) -> None:
    raw = error_event(status, message, request_id)
    assert raw.startswith(b"event: error\n")
    assert raw.endswith(b"\n\n")
    parser = SSEParser()
    (event,) = parser.feed(raw)
    assert parser.at_boundary
    assert event.type == "error"
    assert json.loads(event.data) == {
        "type": "error",
        "status": status,
        "message": message,
        "request_id": request_id,
    }
    # Appended after any complete event, it parses as its own event.
    parser2 = SSEParser()
    assert [e.type for e in parser2.feed(b"data: a\r\n\r\n" + raw)] == ["message", "error"]


# --------------------------------------------------------------------------- is_event_stream


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (b"text/event-stream", True),
        (b"text/event-stream; charset=utf-8", True),
        (b"Text/Event-Stream;charset=UTF-8", True),
        (b"  TEXT/EVENT-STREAM  ; x=y", True),
        (None, False),
        (b"", False),
        (b"text/plain", False),
        (b"text/event-streams", False),
        (b"application/json; text/event-stream", False),
        (b"text/event", False),
    ],
)
def test_is_event_stream(value: bytes | None, expected: bool) -> None:
    assert is_event_stream(value) is expected
