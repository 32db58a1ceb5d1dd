"""The SSE parser's limits (issue 12): hostile field values, the tap's memory bound, and
the ``tail`` the relay holds back.

- ``retry`` is ASCII digits (WHATWG); a value of thousands of digits used to raise
  ``ValueError`` from ``int()`` (Python's digit limit), which escaped the exchange.
  Values longer than ``RETRY_MAX_DIGITS`` are ignored like any other invalid value.
- Every byte a kept event holds counts against ``max_bytes``: events with huge ``id``
  fields grew the tap to 19 MiB against a 1 MiB bound when only data and type counted.
- ``tail``: the bytes fed since the parser was last between events, at every split.
"""

from __future__ import annotations

import tracemalloc
from collections.abc import Iterator
from typing import Final

import pytest

from proxycore.http.sse import BOM, HEARTBEAT, RETRY_MAX_DIGITS, SSEEvent, SSEParser

# --------------------------------------------------------------------------- retry


@pytest.mark.parametrize("digits", [RETRY_MAX_DIGITS + 1, 5000, 100_000])
def test_a_retry_of_thousands_of_digits_is_ignored_not_an_error(digits: int) -> None:
    parser = SSEParser()
    (event,) = parser.feed(b"retry: " + b"9" * digits + b"\ndata: x\n\n")
    assert event.retry is None
    assert event.data == "x"
    assert parser.at_boundary


def test_a_retry_split_across_reads_is_still_bounded() -> None:
    parser = SSEParser()
    parser.feed(b"retry: ")
    for _ in range(100):
        parser.feed(b"9" * 100)
    (event,) = parser.feed(b"\ndata: y\n\n")
    assert event.retry is None


@pytest.mark.parametrize(
    ("value", "retry"),
    [
        pytest.param(b"0", 0, id="zero"),
        pytest.param(b"9" * RETRY_MAX_DIGITS, int("9" * RETRY_MAX_DIGITS), id="max-digits"),
        pytest.param(b"0" * 5000 + b"42", 42, id="leading-zeros"),
        pytest.param("١٢٣".encode(), None, id="non-ascii-digits"),
        pytest.param(b"\xef\xbc\x91", None, id="fullwidth-digit"),
        pytest.param(b"12 ", None, id="trailing-space"),
        pytest.param(b"+12", None, id="sign"),
    ],
)
def test_retry_is_ascii_digits_only(value: bytes, retry: int | None) -> None:
    (event,) = SSEParser().feed(b"retry: " + value + b"\ndata: x\n\n")
    assert event.retry == retry


# --------------------------------------------------------------------------- the tap's bound


def kept_size(events: list[SSEEvent]) -> int:
    """The bytes the kept events hold, every field counted."""
    total = 0
    for e in events:
        total += len(e.data.encode()) + len(e.type.encode())
        total += len(e.id.encode()) if e.id is not None else 0
        total += len(str(e.retry)) if e.retry is not None else 0
    return total


@pytest.mark.parametrize(
    "template",
    [
        pytest.param(b"id: %s\ndata: x\n\n", id="huge-id"),
        pytest.param(b"event: %s\ndata: x\n\n", id="huge-event-type"),
        pytest.param(b"data: %s\n\n", id="huge-data"),
        pytest.param(b"id: %s\nevent: %s\ndata: %s\n\n", id="all-three"),
    ],
)
def test_every_kept_byte_counts_against_max_bytes(template: bytes) -> None:
    """40 events each carrying a 500 KB field, bound 1 MiB: what the tap keeps stays
    within the bound (the ``id`` case kept 19 MiB when only data and type counted)."""
    bound = 1024 * 1024
    parser = SSEParser(max_bytes=bound)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for n in range(40):
            value = b"%02d" % n + b"v" * 500_000
            parser.feed(template.replace(b"%s", value))
        grown = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert parser.count == 40
    assert parser.truncated
    assert kept_size(parser.events) <= bound
    # The kept events plus one pending event's fields (each within the bound), not 40.
    assert grown < 6 * bound, f"the tap grew by {grown} bytes for a {bound} byte bound"


def test_the_last_id_counts_for_every_event_that_carries_it() -> None:
    """One huge id, then many small events: each kept event carries the id (the
    transcript lists it with every event), so each counts it."""
    parser = SSEParser(max_bytes=4096)
    parser.feed(b"id: " + b"i" * 1000 + b"\ndata: a\n\n")
    for _ in range(10):
        parser.feed(b"data: b\n\n")
    assert parser.count == 11
    assert len(parser.events) == 4  # 1000 + a few bytes each
    assert parser.truncated
    assert kept_size(parser.events) <= 4096


def test_small_events_are_all_kept() -> None:
    parser = SSEParser(max_bytes=1024)
    for n in range(10):
        parser.feed(b"id: %d\nevent: t\nretry: 5\ndata: d\n\n" % n)
    assert len(parser.events) == 10
    assert not parser.truncated


# --------------------------------------------------------------------------- tail

STREAMS: Final = {
    "lf": b"data: a\n\nevent: x\ndata: b\n\n",
    "crlf": b"data: a\r\ndata: b\r\n\r\ndata: c\r\n\r\n",
    "cr": b"data: a\rdata: b\r\rdata: c\r\r",
    "mixed": b"data: a\r\n\rdata: b\r\r\ndata: c\n\r\n",
    "comments": b": hi\n" + HEARTBEAT + b"data: x\n: inside\ndata: y\n\n: after\n",
    "bom": BOM + b"data: x\n\ndata: y",
    "bom-alone": BOM,
    "not-a-bom": b"\xef\xbbdata: x\n\n",
    "fields-without-data": b"id: 1\n\nretry: 5\n\nevent: e\n\ndata: z\n\n",
    "unfinished": b"data: a\n\nid: 2\ndata: b\ndata: c",
}


def feeds(stream: bytes) -> Iterator[list[bytes]]:
    yield [stream]
    yield [stream[i : i + 1] for i in range(len(stream))]
    for cut in range(len(stream) + 1):
        yield [stream[:cut], stream[cut:]]


def dispatched(data: bytes) -> list[tuple[str, str]]:
    return [(e.type, e.data) for e in SSEParser().feed(data)]


@pytest.mark.parametrize("name", list(STREAMS))
def test_tail_is_the_unfinished_event_at_every_split(name: str) -> None:
    """After any feed, the bytes before the tail hold every event dispatched so far and
    end between events; the tail is 0 exactly at a boundary; and the tail holds no
    complete event. That is what lets the relay send all but the tail at once."""
    stream = STREAMS[name]
    for pieces in feeds(stream):
        parser = SSEParser()
        fed = b""
        for piece in pieces:
            parser.feed(piece)
            fed += piece
            tail = parser.tail
            assert 0 <= tail <= len(fed), (pieces, fed)
            head = fed[: len(fed) - tail]
            assert dispatched(head) == dispatched(fed), (pieces, fed, tail)
            fresh = SSEParser()
            fresh.feed(head)
            assert fresh.at_boundary, (pieces, fed, tail)
            assert (tail == 0) is parser.at_boundary or fed == BOM[: len(fed)], (pieces, fed)
