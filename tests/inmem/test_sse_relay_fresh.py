"""``SSERelay`` with ``buf=None`` over socket pairs: a fresh ``bytes`` per upstream read.

The client gets exactly what the buffered relay writes (each upstream framing, events
held back to their boundary, bytes past a chunked body as ``leftover``); a scripted
upstream (no ``recv``) gets a 4 KiB buffer.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Final

import pytest

from proxycore.http.sse import SSEEvent, SSEParser
from proxycore.net.pipe import CHUNK
from proxycore.net.stream import RawStream, Stream
from proxycore.proxy.sse_relay import SSERelay
from tests.inmem.scripted import EOF, ScriptedStream

EVENTS: Final = (b"data: zero\n\n", b"event: x\ndata: one\n\n")
NEXT: Final = b"GET /next HTTP/1.1\r\n\r\n"


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


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

    def close(self) -> None:
        for s in (self.up, self.down, self.src.sock, self.dst.sock):
            s.close()


@pytest.fixture
def pair() -> Iterator[Pair]:
    p = Pair()
    yield p
    p.close()


def relay(up: Stream, down: Stream, buf: bytearray | None, seen: list[SSEEvent]) -> SSERelay:
    async def on_event(event: SSEEvent) -> None:
        seen.append(event)

    return SSERelay(
        up=up,
        down=down,
        buf=buf,
        idle=30,
        chunked_out=True,
        parser=SSEParser(),
        heartbeat=0,
        on_event=on_event,
    )


BODIES: Final = [
    # (framing, upstream bytes, length, what the client gets, leftover)
    pytest.param(
        "chunked",
        chunk(EVENTS[0]) + chunk(EVENTS[1][:9]) + chunk(EVENTS[1][9:]) + b"0\r\n\r\n" + NEXT,
        0,
        NEXT,
        id="chunked",
    ),
    pytest.param("length", EVENTS[0] + EVENTS[1], len(EVENTS[0] + EVENTS[1]), b"", id="length"),
    pytest.param("close", EVENTS[0] + EVENTS[1], 0, b"", id="close"),
]


@pytest.mark.parametrize(("kind", "body", "length", "leftover"), BODIES)
@pytest.mark.parametrize("fresh", [True, False])
async def test_fresh_reads_relay_as_the_buffered_relay_does(
    pair: Pair, kind: str, body: bytes, length: int, leftover: bytes, fresh: bool
) -> None:
    pair.up.sendall(body)
    if kind == "close":
        pair.up.shutdown(socket.SHUT_WR)
    seen: list[SSEEvent] = []
    r = relay(pair.src, pair.dst, None if fresh else bytearray(CHUNK), seen)
    await r.run(b"", kind, length)
    await r.finish()
    # One read takes the whole body (sent before the relay starts): one chunk up to the
    # last event boundary, then the last chunk.
    assert pair.received() == chunk(b"".join(EVENTS)) + b"0\r\n\r\n"
    assert [e.data for e in seen] == ["zero", "one"]
    if kind == "chunked":
        assert r.leftover == leftover[: len(r.leftover)]
        assert NEXT.startswith(r.leftover)


async def test_a_scripted_upstream_gets_a_buffer() -> None:
    up = ScriptedStream([EVENTS[0], EVENTS[1], EOF])
    down = ScriptedStream()
    seen: list[SSEEvent] = []
    r = relay(up, down, None, seen)
    await r.run(b"", "close", 0)
    assert down.written == chunk(EVENTS[0]) + chunk(EVENTS[1])
