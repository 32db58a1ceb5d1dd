"""Every body pump in ``proxycore/net/pipe.py``, driven by scripted streams (no sockets).

Each test names in its docstring the logic that would have to break for it to fail.
Timing tests use ``autojump_clock``: with scripted streams no real I/O can race it, so
idle expiries are asserted exactly.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Final

import pytest
import trio
from trio.testing import MockClock, wait_all_tasks_blocked

from proxycore.http.chunked import ChunkedScanner
from proxycore.net.pipe import (
    BULK_CHUNK,
    BULK_THRESHOLD,
    CHUNK,
    BodyTooLarge,
    FramingError,
    IdleTimeout,
    SinkFailed,
    SourceFailed,
    bulk_buffer,
    pump_chunked,
    pump_chunked_decoded,
    pump_length,
    pump_until_close,
)
from proxycore.net.stream import StreamBroken
from tests.inmem.scripted import EOF, Pause, ScriptedStream, ScriptItem, trickle

#: A chunked body with an extension, two data chunks and a trailer section.
BODY: Final = b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trace: 1\r\n\r\n"
DATA: Final = b"hello world"
#: The next message on the connection, right behind the body.
NEXT: Final = b"GET /next HTTP/1.1\r\n\r\n"
IDLE: Final = 10.0
SPLITS: Final = (1, 2, 3, 7, 4096)


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def rest_of(src: ScriptedStream) -> bytes:
    """The scripted bytes the pump did not read."""
    return b"".join(item for item in src.script_left if isinstance(item, bytes))


# A pump reduced to (src, dst, buf) -> bytes moved, for tests that apply to all of them.
Pump = Callable[[ScriptedStream, ScriptedStream, bytearray], Awaitable[object]]


def _length(src: ScriptedStream, dst: ScriptedStream, buf: bytearray) -> Awaitable[object]:
    return pump_length(src, dst, buf, 1 << 20, IDLE)


def _chunked(src: ScriptedStream, dst: ScriptedStream, buf: bytearray) -> Awaitable[object]:
    return pump_chunked(src, dst, buf, ChunkedScanner(), IDLE)


def _decoded(src: ScriptedStream, dst: ScriptedStream, buf: bytearray) -> Awaitable[object]:
    return pump_chunked_decoded(src, dst, buf, ChunkedScanner(), IDLE)


def _close(src: ScriptedStream, dst: ScriptedStream, buf: bytearray) -> Awaitable[object]:
    return pump_until_close(src, dst, buf, IDLE, chunk_encode=False)


def _close_chunked(src: ScriptedStream, dst: ScriptedStream, buf: bytearray) -> Awaitable[object]:
    return pump_until_close(src, dst, buf, IDLE, chunk_encode=True)


#: Each pump, with a first read for it (valid framing, body not finished) and what it
#: writes for that read.
PUMPS: Final = [
    pytest.param(_length, b"abcd", b"abcd", id="length"),
    pytest.param(_chunked, b"4\r\nabcd\r\n", b"4\r\nabcd\r\n", id="chunked"),
    pytest.param(_decoded, b"4\r\nabcd\r\n", b"abcd", id="chunked-decoded"),
    pytest.param(_close, b"abcd", b"abcd", id="until-close"),
    pytest.param(_close_chunked, b"abcd", b"4\r\nabcd\r\n", id="until-close-chunked"),
]


# --------------------------------------------------------------------------- Content-Length


async def test_length_copies_exactly_the_body_and_leaves_the_next_message() -> None:
    """Read sizing (``min(len(buf), remaining)``): the pump never reads past the body, so
    the next pipelined message stays in the source."""
    src = ScriptedStream([b"hello", b" wor", b"ld" + NEXT])
    dst = ScriptedStream()
    moved = await pump_length(src, dst, bytearray(CHUNK), len(DATA), IDLE)
    assert moved == len(DATA)
    assert dst.written == DATA
    assert rest_of(src) == NEXT


async def test_length_writes_each_read_before_the_next_in_buffer_sized_reads() -> None:
    """No read ahead, no batching: one write per read, each at most ``len(buf)``."""
    src = ScriptedStream([b"abcdefghij"])
    dst = ScriptedStream()
    assert await pump_length(src, dst, bytearray(4), 10, IDLE) == 10
    assert dst.writes == [b"abcd", b"efgh", b"ij"]
    assert src.reads == 3


async def test_length_source_eof_mid_body_is_source_failed_with_moved() -> None:
    """A Content-Length body whose source ends early: ``SourceFailed`` (not a clean end),
    and ``moved`` counts the bytes already written."""
    src = ScriptedStream([b"abc", EOF])
    dst = ScriptedStream()
    with pytest.raises(SourceFailed, match="7 bytes early") as info:
        await pump_length(src, dst, bytearray(CHUNK), 10, IDLE)
    assert info.value.moved == 3
    assert dst.written == b"abc"


async def test_length_read_error_is_source_failed() -> None:
    """``StreamBroken`` on a read maps to ``SourceFailed`` (the upstream side), with moved."""
    src = ScriptedStream([b"abc", StreamBroken("ECONNRESET")])
    dst = ScriptedStream()
    with pytest.raises(SourceFailed, match="ECONNRESET") as info:
        await pump_length(src, dst, bytearray(CHUNK), 10, IDLE)
    assert info.value.moved == 3


async def test_length_write_error_is_sink_failed_with_moved() -> None:
    """``StreamBroken`` on a write maps to ``SinkFailed``; ``moved`` counts only the writes
    that completed (the sink's ``bytes_sent`` has the part of the failed one)."""
    src = ScriptedStream([b"abcd", b"efgh", b"ijkl"])
    dst = ScriptedStream(break_after=6)
    with pytest.raises(SinkFailed) as info:
        await pump_length(src, dst, bytearray(CHUNK), 12, IDLE)
    assert info.value.moved == 4
    assert dst.bytes_sent == 6 == len(dst.written)
    assert src.reads == 2  # stopped at the failed write: the third read never happened


def test_bulk_buffer_only_for_large_bodies() -> None:
    """``bulk_buffer``: the caller's buffer up to ``BULK_THRESHOLD``, a 64 KiB one above."""
    default = bytearray(CHUNK)
    assert bulk_buffer(BULK_THRESHOLD, default) is default
    big = bulk_buffer(BULK_THRESHOLD + 1, default)
    assert big is not default
    assert len(big) == BULK_CHUNK


async def test_length_with_a_bulk_buffer_reads_64_kib_at_a_time() -> None:
    """``pump_length`` sizes reads by ``len(buf)`` (not ``CHUNK``), capped by ``remaining``."""
    size = BULK_THRESHOLD + 1000
    src = ScriptedStream([b"x" * size])
    dst = ScriptedStream()
    assert await pump_length(src, dst, bulk_buffer(size, bytearray(CHUNK)), size, IDLE) == size
    assert [len(w) for w in dst.writes] == [BULK_CHUNK] * 4 + [1000]


# --------------------------------------------------------------------------- chunked passthrough


@pytest.mark.parametrize("split", SPLITS)
async def test_chunked_passthrough_is_byte_exact_and_stops_at_the_body_end(split: int) -> None:
    """Chunked to a chunked sink: the body is written unchanged (extensions, trailers), the
    end is found by the scanner however the reads split it, and the bytes past the end of
    the last read come back as leftover (the rest is still unread in the source)."""
    src = ScriptedStream(trickle(BODY + NEXT, split))
    dst = ScriptedStream()
    moved, leftover = await pump_chunked(src, dst, bytearray(CHUNK), ChunkedScanner(), IDLE)
    assert dst.written == BODY
    assert moved == len(BODY)
    assert leftover + rest_of(src) == NEXT
    if split >= len(BODY + NEXT):
        assert leftover == NEXT


async def test_chunked_passthrough_at_every_split_point() -> None:
    """Chunk boundaries split across two reads at every offset (inside a size line, an
    extension, data, a CRLF, the trailer): passthrough still byte exact, same end."""
    for cut in range(1, len(BODY)):
        src = ScriptedStream([BODY[:cut], BODY[cut:] + NEXT])
        dst = ScriptedStream()
        moved, leftover = await pump_chunked(src, dst, bytearray(CHUNK), ChunkedScanner(), IDLE)
        assert (dst.written, moved, leftover) == (BODY, len(BODY), NEXT), cut
        assert dst.writes == [BODY[:cut], BODY[cut:]], cut


async def test_chunked_malformed_framing_is_framing_error_before_writing_it() -> None:
    """The scanner validates each read before it is written: a bad read raises
    ``FramingError`` and is not passed on; earlier good reads were."""
    src = ScriptedStream([b"3\r\nabc\r\n", b"zz\r\n"])
    dst = ScriptedStream()
    with pytest.raises(FramingError) as info:
        await pump_chunked(src, dst, bytearray(CHUNK), ChunkedScanner(), IDLE)
    assert dst.written == b"3\r\nabc\r\n"
    assert info.value.moved == len(b"3\r\nabc\r\n")


async def test_chunked_source_eof_before_last_chunk_is_source_failed() -> None:
    """A chunked body cut before its last chunk is a failure, never a clean end."""
    src = ScriptedStream([b"5\r\nhel", EOF])
    dst = ScriptedStream()
    with pytest.raises(SourceFailed, match="before its last chunk") as info:
        await pump_chunked(src, dst, bytearray(CHUNK), ChunkedScanner(), IDLE)
    assert info.value.moved == len(b"5\r\nhel")
    assert dst.written == b"5\r\nhel"


async def test_chunked_sink_failure_is_sink_failed() -> None:
    """A write error while passing a chunked body through maps to ``SinkFailed``."""
    src = ScriptedStream(trickle(BODY, 8))
    dst = ScriptedStream(break_after=10)
    with pytest.raises(SinkFailed) as info:
        await pump_chunked(src, dst, bytearray(CHUNK), ChunkedScanner(), IDLE)
    assert info.value.moved == 8


async def test_chunked_max_payload_stops_before_writing_the_read_that_crosses_it() -> None:
    """``max_payload``: the read whose data takes the body past the limit is not written."""
    src = ScriptedStream([b"3\r\nabc\r\n", b"4\r\ndefg\r\n", b"0\r\n\r\n"])
    dst = ScriptedStream()
    with pytest.raises(BodyTooLarge) as info:
        await pump_chunked(
            src, dst, bytearray(CHUNK), ChunkedScanner(), IDLE, max_payload=6, drop_trailers=True
        )
    assert dst.written == b"3\r\nabc\r\n"
    assert info.value.moved == len(b"3\r\nabc\r\n")


async def test_chunked_max_payload_counts_what_a_size_line_promises() -> None:
    """``max_payload`` uses ``declared_bytes``: a size line promising too much is refused
    before its data arrives (no 1 MiB is read first)."""
    src = ScriptedStream([b"3\r\nabc\r\n", b"100000\r\n"])
    dst = ScriptedStream()
    with pytest.raises(BodyTooLarge):
        await pump_chunked(src, dst, bytearray(CHUNK), ChunkedScanner(), IDLE, max_payload=10)
    assert dst.written == b"3\r\nabc\r\n"
    assert src.reads == 2


async def test_chunked_max_payload_at_the_limit_passes() -> None:
    """The limit is inclusive: a body of exactly ``max_payload`` data bytes goes through."""
    src = ScriptedStream([BODY])
    dst = ScriptedStream()
    moved, _ = await pump_chunked(
        src, dst, bytearray(CHUNK), ChunkedScanner(), IDLE, max_payload=len(DATA)
    )
    assert moved == len(BODY)


@pytest.mark.parametrize("split", SPLITS)
async def test_request_trailers_are_validated_and_dropped(split: int) -> None:
    """``drop_trailers``: the trailer section is not written; the body ends ``0\\r\\n\\r\\n``
    (trailer_start is honoured when the trailer is split across reads); the next message
    is still not consumed."""
    body = b"3\r\nabc\r\n0\r\nX-Secret: s3cr3t\r\nX-Other: 2\r\n\r\n"
    src = ScriptedStream(trickle(body + NEXT, split))
    dst = ScriptedStream()
    moved, leftover = await pump_chunked(
        src, dst, bytearray(CHUNK), ChunkedScanner(), IDLE, drop_trailers=True
    )
    assert dst.written == b"3\r\nabc\r\n0\r\n\r\n"
    assert moved == len(dst.written)
    assert leftover + rest_of(src) == NEXT


async def test_dropped_trailers_are_still_validated() -> None:
    """Dropping trailers does not skip their validation: a framing field as a trailer is
    a ``FramingError`` (RFC 9110 6.5.1), never silently passed."""
    src = ScriptedStream([b"3\r\nabc\r\n0\r\nContent-Length: 5\r\n\r\n"])
    dst = ScriptedStream()
    with pytest.raises(FramingError):
        await pump_chunked(src, dst, bytearray(CHUNK), ChunkedScanner(), IDLE, drop_trailers=True)


async def test_drop_trailers_without_trailers_is_unchanged() -> None:
    """With no trailer section, ``drop_trailers`` writes the body exactly as received."""
    body = b"3\r\nabc\r\n0\r\n\r\n"
    src = ScriptedStream(trickle(body, 1))
    dst = ScriptedStream()
    await pump_chunked(src, dst, bytearray(CHUNK), ChunkedScanner(), IDLE, drop_trailers=True)
    assert dst.written == body


# --------------------------------------------------------------------------- chunked decoded


@pytest.mark.parametrize("split", SPLITS)
async def test_chunked_decoded_writes_only_the_data(split: int) -> None:
    """For HTTP/1.0 clients: only chunk payload is written (no size lines, extensions,
    CRLFs or trailers), however the reads split the framing; leftover as passthrough."""
    src = ScriptedStream(trickle(BODY + NEXT, split))
    dst = ScriptedStream()
    moved, leftover = await pump_chunked_decoded(src, dst, bytearray(CHUNK), ChunkedScanner(), IDLE)
    assert dst.written == DATA
    assert moved == len(DATA)
    assert leftover + rest_of(src) == NEXT


async def test_chunked_decoded_eof_mid_body_and_bad_framing() -> None:
    """Decoded pump: EOF before the last chunk is ``SourceFailed`` (moved = data bytes
    written), malformed framing is ``FramingError``."""
    src = ScriptedStream([b"5\r\nhel", EOF])
    dst = ScriptedStream()
    with pytest.raises(SourceFailed) as info:
        await pump_chunked_decoded(src, dst, bytearray(CHUNK), ChunkedScanner(), IDLE)
    assert (info.value.moved, dst.written) == (3, b"hel")
    bad = ScriptedStream([b"5\r\nhelloXX"])
    with pytest.raises(FramingError):
        await pump_chunked_decoded(bad, ScriptedStream(), bytearray(CHUNK), ChunkedScanner(), IDLE)


# --------------------------------------------------------------------------- until close


async def test_until_close_raw_copies_until_eof() -> None:
    """Close-delimited, no re-framing: each read is written as is; EOF ends the body."""
    src = ScriptedStream([b"abc", b"de", EOF, b"never read"])
    dst = ScriptedStream()
    moved = await pump_until_close(src, dst, bytearray(CHUNK), IDLE, chunk_encode=False)
    assert (moved, dst.writes) == (5, [b"abc", b"de"])
    assert rest_of(src) == b"never read"


async def test_until_close_rechunked_frames_each_read_and_ends_with_last_chunk() -> None:
    """``chunk_encode``: one chunk per read (no batching), then the last chunk at EOF."""
    src = ScriptedStream([b"abc", b"x" * 20, EOF])
    dst = ScriptedStream()
    moved = await pump_until_close(src, dst, bytearray(CHUNK), IDLE, chunk_encode=True)
    assert dst.writes == [chunk(b"abc"), chunk(b"x" * 20), b"0\r\n\r\n"]
    assert moved == len(dst.written)


async def test_until_close_reset_is_source_failed_without_a_last_chunk() -> None:
    """A reset is not a clean end: ``SourceFailed``, and no last chunk is written (the
    client must be able to tell a cut body from a complete one)."""
    src = ScriptedStream([b"abc", StreamBroken("ECONNRESET")])
    dst = ScriptedStream()
    with pytest.raises(SourceFailed) as info:
        await pump_until_close(src, dst, bytearray(CHUNK), IDLE, chunk_encode=True)
    assert dst.written == chunk(b"abc")
    assert info.value.moved == len(chunk(b"abc"))


# --------------------------------------------------------------------------- idle timeouts


@pytest.mark.parametrize(("pump", "first", "out"), PUMPS)
async def test_idle_is_per_gap_and_expires_exactly(
    autojump_clock: MockClock, pump: Pump, first: bytes, out: bytes
) -> None:
    """``idle`` bounds the silence between reads, not the body: the deadline moves after
    every chunk. Two 9 s gaps pass (idle 10 s); a longer gap raises ``IdleTimeout`` exactly
    10 s after the last chunk, with moved = bytes written."""
    script: list[ScriptItem] = [first, Pause(9), first, Pause(9), first]
    src = ScriptedStream(script)  # then silence: a read waits at the script's end
    dst = ScriptedStream()
    start = trio.current_time()
    with pytest.raises(IdleTimeout) as info:
        await pump(src, dst, bytearray(CHUNK))
    assert trio.current_time() - start == 18 + IDLE
    assert dst.written == out * 3
    assert info.value.moved == 3 * len(out)


@pytest.mark.parametrize(("pump", "first", "out"), PUMPS)
async def test_idle_covers_a_write_that_cannot_proceed(
    autojump_clock: MockClock, pump: Pump, first: bytes, out: bytes
) -> None:
    """A sink that never drains is bounded by ``idle`` too, and it is the sink's failure
    (``SinkFailed``), not the source's silence (``IdleTimeout``)."""
    src = ScriptedStream([first])
    dst = ScriptedStream()
    dst.block_writes()
    start = trio.current_time()
    with pytest.raises(SinkFailed) as info:
        await pump(src, dst, bytearray(CHUNK))
    assert trio.current_time() - start == IDLE
    assert info.value.moved == 0
    assert "write stalled" in str(info.value)


# --------------------------------------------------------------------------- backpressure


@pytest.mark.parametrize(("pump", "first", "out"), PUMPS)
async def test_a_blocked_sink_stops_reading(pump: Pump, first: bytes, out: bytes) -> None:
    """Backpressure: the next read starts only after the previous bytes were written, so
    a sink that does not drain holds the source (no read ahead, no unbounded buffer)."""
    src = ScriptedStream([first] * 5)
    dst = ScriptedStream()
    dst.block_writes()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pump, src, dst, bytearray(CHUNK))
        await wait_all_tasks_blocked()
        assert src.reads == 1
        assert dst.writes == []
        dst.unblock_writes()
        await wait_all_tasks_blocked()  # now waiting on the source, at the script's end
        assert src.reads == 6
        assert dst.written == out * 5
        dst.block_writes()
        src.feed(first, first)  # the waiting (6th) read gets one, its write blocks
        await wait_all_tasks_blocked()
        assert src.reads == 6
        assert dst.written == out * 5
        dst.unblock_writes()
        await wait_all_tasks_blocked()
        assert src.reads == 8
        assert dst.written == out * 7
        nursery.cancel_scope.cancel()
