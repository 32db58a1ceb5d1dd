"""The process-wide downstream watch (``proxycore/net/watch.py``) on real socket pairs.

Real clock, no speed assertions: each test has a generous ``fail_after`` cap only so a
regression fails instead of hanging.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Final

import pytest
import trio

from proxycore.net.stream import RawStream
from proxycore.net.watch import DownstreamWatch, downstream_watch, unwatch

CAP: Final = 10.0


class Seen:
    """Collects the callbacks of registrations."""

    def __init__(self) -> None:
        self.calls: dict[str, bool] = {}
        self.changed = trio.Event()

    def callback(self, name: str, fail: bool = False) -> Callable[[bool], None]:
        def on_ready(closed: bool) -> None:
            self.calls[name] = closed
            self.changed.set()
            self.changed = trio.Event()
            if fail:
                raise RuntimeError("boom")

        return on_ready

    async def until(self, count: int) -> None:
        while len(self.calls) < count:
            await self.changed.wait()


@contextmanager
def pairs(n: int) -> Iterator[list[tuple[RawStream, socket.socket]]]:
    """``n`` (proxy side as a RawStream, client side) socket pairs, closed at the end."""
    made = [socket.socketpair() for _ in range(n)]
    try:
        yield [(RawStream(a), b) for a, b in made]
    finally:
        for a, b in made:
            a.close()
            b.close()


async def stopped(w: DownstreamWatch) -> None:
    """Until the watch's system task ended."""
    while w.running:  # noqa: ASYNC110
        await trio.sleep(0.01)


def watch(linger: float = 0.0) -> DownstreamWatch:
    w = downstream_watch()
    w.linger = linger
    return w


async def test_a_closed_client_and_a_client_sending_bytes() -> None:
    w, seen = watch(), Seen()
    assert w is downstream_watch()  # one per run
    with trio.fail_after(CAP), pairs(3) as socks:
        for name, (stream, _) in zip("abc", socks, strict=True):
            assert w.add(stream, seen.callback(name))
        assert len(w) == 3
        socks[0][1].close()  # a: gone
        socks[1][1].sendall(b"GET /next HTTP/1.1\r\n")  # b: a pipelined request
        await seen.until(2)
        assert seen.calls == {"a": True, "b": False}
        # The bytes were only peeked: the next cycle reads them.
        assert socks[1][0].sock.recv(100) == b"GET /next HTTP/1.1\r\n"
        assert len(w) == 1  # each registration ends with its callback; c is still watched
        socks[2][1].shutdown(socket.SHUT_WR)  # a half-close is a client gone too
        await seen.until(3)
        assert seen.calls["c"] is True
        assert len(w) == 0


async def test_a_discarded_registration_is_never_reported() -> None:
    w, seen = watch(), Seen()
    with trio.fail_after(CAP), pairs(2) as socks:
        (a, a_peer), (b, b_peer) = socks
        w.add(a, seen.callback("a"))
        w.add(b, seen.callback("b"))
        w.discard(a)
        w.discard(a)  # idempotent
        a_peer.close()
        b_peer.close()
        await seen.until(1)
        await trio.sleep(0.05)
        assert seen.calls == {"b": True}


async def test_many_streams_at_once() -> None:
    w, seen = watch(), Seen()
    n = 300
    with trio.fail_after(CAP), pairs(n) as socks:
        for i, (stream, _) in enumerate(socks):
            w.add(stream, seen.callback(str(i)))
        for i, (_, peer) in enumerate(socks):
            if i % 3 == 0:
                peer.close()
            elif i % 3 == 1:
                peer.sendall(b"x")
        await seen.until(n - n // 3)
        assert seen.calls == {str(i): i % 3 == 0 for i in range(n) if i % 3 != 2}
        assert len(w) == n // 3
        for i, (stream, _) in enumerate(socks):
            if i % 3 == 2:
                w.discard(stream)
        assert len(w) == 0


async def test_fd_reuse_after_close_reaches_the_new_socket_only() -> None:
    """The close path discards before closing; a socket made after it may get the same fd
    number: its registration is its own, and a discard of the old stream (closed: no fd)
    never removes it."""
    w, seen = watch(), Seen()
    with trio.fail_after(CAP):
        first, first_peer = socket.socketpair()
        old = RawStream(first)
        fd = first.fileno()
        w.add(old, seen.callback("old"))
        unwatch(old)  # the connection's close path: before the close
        old.close()
        first_peer.close()
        reused = [socket.socketpair() for _ in range(4)]  # the lowest free fd comes back
        try:
            new = next(RawStream(a) for a, _ in reused if a.fileno() == fd)
            peer = next(b for a, b in reused if a is new.sock)
            assert w.add(new, seen.callback("new"))
            w.discard(old)  # closed: names no fd, removes nothing
            assert len(w) == 1
            peer.close()
            await seen.until(1)
            assert seen.calls == {"new": True}
        finally:
            for a, b in reused:
                a.close()
                b.close()


async def test_a_socket_closed_without_discard_is_replaced_by_its_fd_successor() -> None:
    """A registration whose socket was closed unannounced (a bug elsewhere) can't capture
    the next socket with its fd number: the new registration replaces it."""
    w, seen = watch(), Seen()
    with trio.fail_after(CAP):
        first, first_peer = socket.socketpair()
        fd = first.fileno()
        w.add(RawStream(first), seen.callback("stale"))
        first.close()  # the kernel drops it from the epoll set
        first_peer.close()
        second, second_peer = socket.socketpair()
        try:
            assert second.fileno() == fd
            stream = RawStream(second)
            assert w.add(stream, seen.callback("new"))
            assert len(w) == 1
            second_peer.close()
            await seen.until(1)
            assert seen.calls == {"new": True}
        finally:
            second.close()
            second_peer.close()


async def test_a_closed_socket_is_not_watched() -> None:
    w = watch()
    a, b = socket.socketpair()
    stream = RawStream(a)
    a.close()
    b.close()
    assert not w.add(stream, lambda closed: None)
    assert len(w) == 0


async def test_the_task_ends_when_nothing_is_watched_and_starts_again() -> None:
    w, seen = watch(linger=0.05), Seen()
    with trio.fail_after(CAP), pairs(2) as socks:
        (a, a_peer), (b, b_peer) = socks
        starts = w.starts
        w.add(a, seen.callback("a"))
        assert w.running and w.starts == starts + 1
        a_peer.close()
        await seen.until(1)
        await stopped(w)  # nothing watched: it ends after the linger
        w.add(b, seen.callback("b"))
        assert w.running and w.starts == starts + 2  # a new system task
        b_peer.close()
        await seen.until(2)
        assert seen.calls == {"a": True, "b": True}


async def test_the_task_stays_while_registrations_come_within_the_linger() -> None:
    w, seen = watch(linger=CAP), Seen()
    with trio.fail_after(CAP), pairs(2) as socks:
        (a, _), (b, b_peer) = socks
        w.add(a, seen.callback("a"))
        starts = w.starts
        w.discard(a)
        await trio.sleep(0.02)
        assert w.running
        w.add(b, seen.callback("b"))
        assert w.starts == starts  # the same task
        b_peer.close()
        await seen.until(1)
        w.linger = 0.0


async def test_a_failing_callback_is_logged_and_the_run_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, logger="proxycore.downstream")
    w, seen = watch(), Seen()
    with trio.fail_after(CAP), pairs(3) as socks:
        (a, a_peer), (b, b_peer), (c, c_peer) = socks
        w.add(a, seen.callback("a", fail=True))
        w.add(b, seen.callback("b"))
        a_peer.close()
        b_peer.close()
        await seen.until(2)
        assert seen.calls == {"a": True, "b": True}
        assert any("callback failed" in r.getMessage() for r in caplog.records)
        w.add(c, seen.callback("c"))
        c_peer.close()
        await seen.until(3)
    await trio.lowlevel.checkpoint()  # the run is alive


async def test_a_failure_of_the_watch_itself_hands_its_watches_to_tasks_not_the_run(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.ERROR, logger="proxycore.downstream")
    w, seen = watch(), Seen()
    with trio.fail_after(CAP), pairs(2) as socks:
        (a, a_peer), (b, b_peer) = socks
        w.add(a, seen.callback("a"))
        w.add(b, seen.callback("b"))

        def broken(self: DownstreamWatch, epoll: object) -> None:
            raise OSError("epoll broke")

        monkeypatch.setattr(DownstreamWatch, "_dispatch", broken)
        a_peer.close()
        # The watch failed; each stream is now watched by a task of its own, so the
        # close is still seen, and the other stream is still watched.
        await seen.until(1)
        assert seen.calls == {"a": True}
        assert len(w) == 1
        await stopped(w)
        assert any("watch failed" in r.getMessage() for r in caplog.records)
        monkeypatch.undo()
        b_peer.close()
        await seen.until(2)
        assert seen.calls == {"a": True, "b": True}
        assert len(w) == 0
        c, c_peer = socket.socketpair()
        try:
            w.add(RawStream(c), seen.callback("c"))
            assert w.running  # a new epoll task serves new registrations
            c_peer.close()
            await seen.until(3)
            assert seen.calls["c"] is True
        finally:
            c.close()
