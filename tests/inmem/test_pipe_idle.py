"""The body pumps' lazy idle deadline (``net/pipe.py``), over real socket pairs.

Between two ``RawStream``s (the SSE path) a pump does not move its idle scope's deadline
per chunk: it notes the time, re-arms when a stale scope fires, and makes the deadline
exact before a write blocks (``RawStream.on_block``). These tests pin that ``idle`` keeps
its meaning there: a body with chunks more often than ``idle`` never fails, a silent one
fails with ``IdleTimeout`` no earlier than ``idle`` after its last chunk, a write stalled
by a reader that stops is the sink's failure, and a write that blocks across the stale
deadline but resumes within ``idle`` of the last chunk is neither failed nor cut.

Real sockets, so the real clock (no ``MockClock``): the gaps are 10x shorter than
``idle``, and only lower bounds of times are asserted.
"""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable, Iterator
from typing import Final

import pytest
import trio

from proxycore.http.chunked import ChunkedScanner
from proxycore.net.pipe import (
    CHUNK,
    IdleTimeout,
    SinkFailed,
    pump_chunked,
    pump_chunked_decoded,
    pump_length,
    pump_until_close,
)
from proxycore.net.stream import RawStream

IDLE: Final = 0.5
GAP: Final = IDLE / 10
EVENT: Final = b"data: " + b"x" * 90 + b"\n\n"


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


Pump = Callable[[RawStream, RawStream], Awaitable[object]]


def _length(src: RawStream, dst: RawStream) -> Awaitable[object]:
    return pump_length(src, dst, bytearray(CHUNK), 1 << 30, IDLE)


def _chunked(src: RawStream, dst: RawStream) -> Awaitable[object]:
    return pump_chunked(src, dst, bytearray(CHUNK), ChunkedScanner(), IDLE)


def _decoded(src: RawStream, dst: RawStream) -> Awaitable[object]:
    return pump_chunked_decoded(src, dst, bytearray(CHUNK), ChunkedScanner(), IDLE)


def _close(src: RawStream, dst: RawStream) -> Awaitable[object]:
    return pump_until_close(src, dst, bytearray(CHUNK), IDLE, chunk_encode=False)


def _close_chunked(src: RawStream, dst: RawStream) -> Awaitable[object]:
    return pump_until_close(src, dst, bytearray(CHUNK), IDLE, chunk_encode=True)


def _chunked_fresh(src: RawStream, dst: RawStream) -> Awaitable[object]:
    return pump_chunked(src, dst, None, ChunkedScanner(), IDLE)


def _close_fresh(src: RawStream, dst: RawStream) -> Awaitable[object]:
    return pump_until_close(src, dst, None, IDLE, chunk_encode=False)


#: The pumps that read a chunked body (it ends with a last chunk).
CHUNKED_SOURCE: Final = (_chunked, _decoded, _chunked_fresh)


#: Each pump, the bytes of one event for its source, and what it writes for them.
PUMPS: Final = [
    pytest.param(_length, EVENT, EVENT, id="length"),
    pytest.param(_chunked, chunk(EVENT), chunk(EVENT), id="chunked"),
    pytest.param(_decoded, chunk(EVENT), EVENT, id="chunked-decoded"),
    pytest.param(_close, EVENT, EVENT, id="until-close"),
    pytest.param(_close_chunked, EVENT, chunk(EVENT), id="until-close-chunked"),
    pytest.param(_chunked_fresh, chunk(EVENT), chunk(EVENT), id="chunked-fresh-reads"),
    pytest.param(_close_fresh, EVENT, EVENT, id="until-close-fresh-reads"),
]


class Pair:
    """``up`` (the test writes the source's bytes), ``src`` -> pump -> ``dst``, ``down``
    (the test reads what the pump wrote)."""

    def __init__(self, small_buffers: bool = False) -> None:
        self.up, up_far = socket.socketpair()
        dst_sock, self.down = socket.socketpair()
        if small_buffers:
            dst_sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            self.down.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.up.setblocking(False)
        self.down.setblocking(False)
        self.src = RawStream(up_far)
        self.dst = RawStream(dst_sock)
        self.received = bytearray()

    async def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                view = view[self.up.send(view) :]
            except BlockingIOError:
                await trio.lowlevel.wait_writable(self.up)

    async def read_for(self, seconds: float) -> None:
        """Read what the pump writes, for ``seconds`` (or until it closes)."""
        with trio.move_on_after(seconds):
            while True:
                await trio.lowlevel.wait_readable(self.down)
                data = self.down.recv(65536)
                if not data:
                    return
                self.received += data

    def close(self) -> None:
        for s in (self.up, self.down, self.src.sock, self.dst.sock):
            s.close()


@pytest.fixture
def pair() -> Iterator[Pair]:
    p = Pair()
    yield p
    p.close()


@pytest.mark.parametrize(("pump", "event", "out"), PUMPS)
async def test_chunks_more_often_than_idle_never_time_out(
    pair: Pair, pump: Pump, event: bytes, out: bytes
) -> None:
    """Events every idle/10 for 3 idle periods: the first scope's deadline passes (and the
    ones armed after it), each is re-armed at the last chunk + idle; nothing fails, and
    every byte arrives in order. The sink's hook is set while pumping, cleared after."""
    n = 30
    hooks: list[object] = []

    async def feed() -> None:
        for _ in range(n):
            await pair.write(event)
            hooks.append(pair.dst.on_block)
            await trio.sleep(GAP)
        if pump in CHUNKED_SOURCE:
            await pair.write(b"0\r\n\r\n")
        pair.up.shutdown(socket.SHUT_WR)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(feed)
        nursery.start_soon(pair.read_for, 60)
        if pump is _length:
            await pump_length(pair.src, pair.dst, bytearray(CHUNK), n * len(event), IDLE)
        else:
            await pump(pair.src, pair.dst)
        pair.dst.sock.shutdown(socket.SHUT_WR)
    assert bytes(pair.received).startswith(out * n)
    assert all(h is not None for h in hooks)  # the lazy mode ran
    assert pair.dst.on_block is None


@pytest.mark.parametrize(("pump", "event", "out"), PUMPS)
async def test_a_silent_body_fails_no_earlier_than_idle_after_its_last_chunk(
    pair: Pair, pump: Pump, event: bytes, out: bytes
) -> None:
    """Events every idle/10 for 2 idle periods, then silence: ``IdleTimeout``, never
    before ``idle`` has passed since the last chunk; what was read was written."""
    last = 0.0

    async def feed() -> None:
        nonlocal last
        for _ in range(20):
            await pair.write(event)
            last = trio.current_time()
            await trio.sleep(GAP)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(feed)
        nursery.start_soon(pair.read_for, 60)
        with pytest.raises(IdleTimeout) as info:
            await pump(pair.src, pair.dst)
        failed = trio.current_time()
        nursery.cancel_scope.cancel()
    assert failed - last >= IDLE
    assert info.value.moved == 20 * len(out)
    assert pair.dst.on_block is None
    assert not pair.dst.write_cut


@pytest.mark.parametrize(("pump", "event", "out"), PUMPS)
async def test_a_reader_that_stops_is_a_stalled_write(pump: Pump, event: bytes, out: bytes) -> None:
    """The client stops reading while events keep coming: once the socket buffers are
    full the write blocks, and ``idle`` after the last chunk that was written it is the
    sink's failure (``SinkFailed``, write stalled), as before the lazy deadline."""
    pair = Pair(small_buffers=True)
    try:
        done = trio.Event()

        async def feed() -> None:
            while not done.is_set():
                await pair.write(event)
                await trio.sleep(GAP / 4)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(feed)
            started = trio.current_time()
            with pytest.raises(SinkFailed) as info:
                await pump(pair.src, pair.dst)
            failed = trio.current_time()
            done.set()
            nursery.cancel_scope.cancel()
        assert "write stalled" in str(info.value)
        assert failed - started >= IDLE
        assert info.value.moved > 0
        assert pair.dst.on_block is None
    finally:
        pair.close()


@pytest.mark.parametrize(("pump", "event", "out"), PUMPS)
async def test_a_write_blocked_across_the_stale_deadline_is_not_cut(
    pump: Pump, event: bytes, out: bytes
) -> None:
    """The first scope's deadline (start + idle) passes while a write is blocked (the
    reader paused), but the reader resumes within ``idle`` of the last chunk written:
    before waiting, the write made the deadline exact, so nothing fails and nothing is
    cut; every byte arrives."""
    pair = Pair(small_buffers=True)
    try:
        big = b"y" * (256 * 1024)
        body = [event, event, event]
        last_part = chunk(big) if pump in CHUNKED_SOURCE else big
        last_out = big if pump is _decoded else last_part
        if pump is _close_chunked:
            last_out = b""  # re-chunked per read: compared as decoded data below

        async def feed() -> None:
            for part in body:
                await pair.write(part)
                await trio.sleep(GAP)
            await trio.sleep(0.4 * IDLE - len(body) * GAP)  # now ~0.4 idle after start
            await pair.write(last_part)  # the write of it blocks: the reader paused
            if pump in CHUNKED_SOURCE:
                await pair.write(b"0\r\n\r\n")
            pair.up.shutdown(socket.SHUT_WR)

        async def read() -> None:
            await pair.read_for(0.3 * IDLE)
            await trio.sleep(0.9 * IDLE)  # paused from 0.3 to 1.2 idle: start + idle inside
            await pair.read_for(60)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(feed)
            nursery.start_soon(read)
            total = len(body) * len(event) + len(last_part)
            if pump is _length:
                await pump_length(pair.src, pair.dst, bytearray(CHUNK), total, IDLE)
            else:
                await pump(pair.src, pair.dst)
            pair.dst.sock.shutdown(socket.SHUT_WR)
        assert not pair.dst.write_cut
        received = bytes(pair.received)
        assert received.startswith(out * len(body))
        if pump is _close_chunked:
            decoded = bytearray()
            scanner = ChunkedScanner()
            spans: list[tuple[int, int]] = []
            scanner.feed(received, 0, None, spans)
            assert scanner.done
            for s, e in spans:
                decoded += received[s:e]
            assert bytes(decoded) == EVENT * len(body) + big
        else:
            assert received[len(out) * len(body) :].startswith(last_out)
    finally:
        pair.close()
