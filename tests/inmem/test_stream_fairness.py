"""``RawStream`` reads: fairness, and a cancelled read consumes nothing (socket pairs).

A run of reads that never blocks must still yield to trio every ``_YIELD_EVERY`` reads;
that checkpoint is taken before the next read takes any byte, so a cancellation there
(a pump's idle scope firing, a client gone) loses no data: the body pumps rely on it to
re-arm their lazy idle scope and read again (``net/pipe.py``).
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
import trio

from proxycore.net.stream import RawStream, RawTransport

DATA = bytes(range(256)) * 256  # 64 KiB, never drained by 100-byte reads


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, RawStream]]:
    a, b = socket.socketpair()
    a.sendall(DATA)
    stream = RawStream(b)
    yield a, stream
    a.close()
    stream.sock.close()  # (outside trio: no notify_closing)


async def test_a_run_of_reads_that_never_blocks_yields(
    pair: tuple[socket.socket, RawStream], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, stream = pair
    ran = 0
    checkpoints = 0
    checkpoint = trio.lowlevel.checkpoint

    async def counted() -> None:
        nonlocal checkpoints
        checkpoints += 1
        await checkpoint()

    async def other() -> None:
        nonlocal ran
        while True:
            ran += 1
            await checkpoint()  # the original: not counted

    buf = bytearray(100)
    got = bytearray()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(other)
        await trio.lowlevel.checkpoint()  # let it start
        before = ran
        monkeypatch.setattr(trio.lowlevel, "checkpoint", counted)
        for _ in range(40):
            n = await stream.recv_into(buf, 100)
            assert n == 100  # never a short read: never waits for readability
            got += buf[:n]
        monkeypatch.undo()
        assert checkpoints == 2  # before the 17th and the 33rd read
        assert ran > before  # and the other task ran meanwhile
        nursery.cancel_scope.cancel()
    assert bytes(got) == DATA[:4000]


async def test_a_read_cancelled_at_its_fairness_checkpoint_loses_nothing(
    pair: tuple[socket.socket, RawStream],
) -> None:
    _, stream = pair
    buf = bytearray(100)
    got = bytearray()
    cancelled = 0
    while len(got) < 5000:
        with trio.CancelScope() as scope:
            scope.cancel()  # every read is cancelled at its first checkpoint, if any
            n = await stream.recv_into(buf, 100)
            got += buf[:n]
        if scope.cancelled_caught:
            cancelled += 1
    assert cancelled >= 2  # the fairness checkpoints were cancellation points
    assert bytes(got) == DATA[: len(got)]  # and consumed nothing


async def test_tls_transport_read_cancelled_at_its_fairness_checkpoint_loses_nothing(
    pair: tuple[socket.socket, RawStream],
) -> None:
    _, stream = pair
    transport = RawTransport(stream)
    got = bytearray()
    cancelled = 0
    while len(got) < 5000:
        with trio.CancelScope() as scope:
            scope.cancel()
            got += await transport.receive_some(100)
        if scope.cancelled_caught:
            cancelled += 1
    assert cancelled >= 2
    assert bytes(got) == DATA[: len(got)]
