"""The chunked and until-close pumps with ``buf=None``: a fresh ``bytes`` per read.

Over ``RawStream`` pairs (``RawStream.recv``: no buffer held between reads) the output
is byte for byte what the buffered pumps write, the bytes past a chunked body come back
as leftover, backpressure holds (the next read only after the write), and the lazy idle
deadline works the same. Any other source (here a scripted one) gets a 4 KiB buffer.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from functools import partial
from typing import Final

import pytest
import trio

from proxycore.http.chunked import ChunkedScanner
from proxycore.net.pipe import (
    IdleTimeout,
    pump_chunked,
    pump_chunked_decoded,
    pump_until_close,
)
from proxycore.net.stream import RawStream
from tests.inmem.scripted import EOF, ScriptedStream

BODY: Final = b"5;ext=1\r\nhello\r\n6\r\n world\r\n" + b"1000\r\n" + b"z" * 4096 + b"\r\n0\r\n\r\n"
NEXT: Final = b"GET /next HTTP/1.1\r\n\r\n"
DATA: Final = b"hello world" + b"z" * 4096


class Pair:
    def __init__(self) -> None:
        self.up, far = socket.socketpair()
        near, self.down = socket.socketpair()
        self.src = RawStream(far)
        self.dst = RawStream(near)

    def received(self) -> bytes:
        self.dst.sock.shutdown(socket.SHUT_WR)
        out = bytearray()
        while data := self.down.recv(65536):
            out += data
        return bytes(out)

    def rest(self, leftover: bytes) -> bytes:
        """The bytes past the body: what the pump returned plus what it did not read."""
        out = leftover
        with contextlib.suppress(BlockingIOError):
            out += self.src.sock.recv(65536)
        return out

    def close(self) -> None:
        for s in (self.up, self.down, self.src.sock, self.dst.sock):
            s.close()


@pytest.fixture
def pair() -> Iterator[Pair]:
    p = Pair()
    yield p
    p.close()


async def test_chunked_fresh_reads_pass_the_body_through_and_return_the_rest(
    pair: Pair,
) -> None:
    pair.up.sendall(BODY + NEXT)
    moved, leftover = await pump_chunked(pair.src, pair.dst, None, ChunkedScanner(), 5.0)
    assert pair.received() == BODY
    assert moved == len(BODY)
    assert pair.rest(leftover) == NEXT


async def test_chunked_fresh_reads_dropping_trailers(pair: Pair) -> None:
    body = b"3\r\nabc\r\n0\r\nX-T: 1\r\n\r\n"
    pair.up.sendall(body)
    moved, _ = await pump_chunked(
        pair.src, pair.dst, None, ChunkedScanner(), 5.0, drop_trailers=True
    )
    assert pair.received() == b"3\r\nabc\r\n0\r\n\r\n"
    assert moved == len(b"3\r\nabc\r\n0\r\n\r\n")


async def test_decoded_fresh_reads_write_only_the_data(pair: Pair) -> None:
    pair.up.sendall(BODY + NEXT)
    moved, leftover = await pump_chunked_decoded(pair.src, pair.dst, None, ChunkedScanner(), 5.0)
    assert pair.received() == DATA
    assert moved == len(DATA)
    assert pair.rest(leftover) == NEXT


@pytest.mark.parametrize("chunk_encode", [False, True])
async def test_until_close_fresh_reads(pair: Pair, chunk_encode: bool) -> None:
    pair.up.sendall(b"x" * 10000)
    pair.up.shutdown(socket.SHUT_WR)
    await pump_until_close(pair.src, pair.dst, None, 5.0, chunk_encode=chunk_encode)
    got = pair.received()
    if not chunk_encode:
        assert got == b"x" * 10000
    else:
        spans: list[tuple[int, int]] = []
        scanner = ChunkedScanner()
        assert scanner.feed(got, 0, None, spans) == len(got)
        assert scanner.done
        assert b"".join(got[s:e] for s, e in spans) == b"x" * 10000


async def test_fresh_reads_wait_for_the_write_before_the_next_read(pair: Pair) -> None:
    """Backpressure: the client stops reading, so the pump stops reading the upstream
    (its socket buffer fills instead of the proxy's memory)."""
    pair.dst.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    pair.up.setblocking(False)
    big = b"y" * (4 << 20)
    sent = 0
    async with trio.open_nursery() as nursery:
        pump = partial(pump_until_close, chunk_encode=False)
        nursery.start_soon(pump, pair.src, pair.dst, None, 5.0)
        for _ in range(50):
            with contextlib.suppress(BlockingIOError):
                sent += pair.up.send(big[sent:])
            await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert sent < len(big)  # the upstream could not push it all: nobody read it


async def test_fresh_reads_idle_timeout(pair: Pair) -> None:
    pair.up.sendall(b"3\r\nabc\r\n")
    with pytest.raises(IdleTimeout) as info:
        await pump_chunked(pair.src, pair.dst, None, ChunkedScanner(), 0.2)
    assert info.value.moved == len(b"3\r\nabc\r\n")


async def test_a_source_without_fresh_reads_gets_a_buffer() -> None:
    src = ScriptedStream([BODY[:7], BODY[7:] + NEXT])
    dst = ScriptedStream()
    moved, leftover = await pump_chunked(src, dst, None, ChunkedScanner(), 5.0)
    assert dst.written == BODY
    assert moved == len(BODY)
    assert leftover == NEXT
    src = ScriptedStream([b"abc", EOF])
    dst = ScriptedStream()
    await pump_until_close(src, dst, None, 5.0, chunk_encode=False)
    assert dst.written == b"abc"
