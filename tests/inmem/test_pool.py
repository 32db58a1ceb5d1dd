"""The upstream keep-alive pool (``proxycore/net/pool.py``) over scripted streams.

A pooled connection is an ``UpstreamConnection`` around a :class:`ScriptedStream`: an
empty script is a live idle upstream (nothing to read, not closed), ``[EOF]`` one that
closed while idle, ``[b"..."]`` one that sent stray bytes. Expiry is asserted exactly on
``autojump_clock`` (no sockets, so nothing races the mock clock).
"""

from __future__ import annotations

from typing import Final

import trio
from trio.testing import MockClock

from proxycore.config import PoolSettings
from proxycore.net.pool import Origin, Pool, UpstreamConnection
from proxycore.net.stream import StreamBroken
from tests.inmem.scripted import EOF, ScriptedStream, ScriptItem

A: Final = Origin("http", "a.example", 80)
B: Final = Origin("http", "b.example", 80)
A_TLS: Final = Origin("https", "a.example", 80)


def conn(origin: Origin = A, script: list[ScriptItem] | None = None) -> UpstreamConnection:
    return UpstreamConnection(origin, ScriptedStream(script or ()))


def closed(c: UpstreamConnection) -> bool:
    stream = c.stream
    assert isinstance(stream, ScriptedStream)
    return stream.closed


def pool(max_idle: int = 4, idle_timeout: float = 30.0) -> Pool:
    return Pool(PoolSettings(max_idle_per_origin=max_idle, idle_timeout=idle_timeout))


async def test_checkin_then_checkout_reuses_the_connection() -> None:
    """checkin keeps a connection for its origin; checkout hands that same object back
    once (it leaves the pool), counting the finished exchange in ``uses``."""
    p = pool()
    assert p.checkout(A) is None
    c = conn()
    p.checkin(c)
    assert p.counts() == {A: 1}
    assert p.checkout(A) is c
    assert c.uses == 1
    assert not closed(c)
    assert p.checkout(A) is None
    assert p.counts() == {}


async def test_connections_are_kept_per_origin() -> None:
    """The origin key includes scheme, host and port: no connection crosses origins
    (an http connection is never handed out for https)."""
    p = pool()
    a, b = conn(A), conn(B)
    p.checkin(a)
    p.checkin(b)
    assert p.checkout(A_TLS) is None
    assert p.checkout(B) is b
    assert p.checkout(A) is a


async def test_checkout_gives_the_most_recently_used_first() -> None:
    """LIFO: the freshest connection is the least likely to have been closed upstream."""
    p = pool()
    first, second = conn(), conn()
    p.checkin(first)
    p.checkin(second)
    assert p.checkout(A) is second
    assert p.checkout(A) is first


async def test_max_idle_per_origin_closes_the_extra_connection() -> None:
    """At most ``max_idle_per_origin`` idle per origin: the one checked in past the limit
    is closed (not leaked, not kept); other origins have their own limit."""
    p = pool(max_idle=2)
    kept = [conn(), conn()]
    extra = conn()
    for c in [*kept, extra]:
        p.checkin(c)
    other = conn(B)
    p.checkin(other)
    assert closed(extra)
    assert not any(closed(c) for c in kept)
    assert p.counts() == {A: 2, B: 1}


async def test_max_idle_zero_disables_pooling() -> None:
    """``max_idle_per_origin=0``: every checked-in connection is closed at once."""
    p = pool(max_idle=0)
    c = conn()
    p.checkin(c)
    assert closed(c)
    assert p.checkout(A) is None


async def test_idle_expiry_at_checkout_is_exact(autojump_clock: MockClock) -> None:
    """``idle_timeout`` (30 s): a connection idle exactly 30 s is still handed out; one
    idle longer is closed at checkout instead of being reused."""
    p = pool(idle_timeout=30)
    fresh = conn()
    p.checkin(fresh)
    await trio.sleep(30)
    assert p.checkout(A) is fresh
    stale = conn()
    p.checkin(stale)
    await trio.sleep(30.5)
    assert p.checkout(A) is None
    assert closed(stale)


async def test_checkin_restarts_the_idle_clock(autojump_clock: MockClock) -> None:
    """``idle_since`` is set at each checkin: a connection reused every 20 s never expires
    although it is older than ``idle_timeout``."""
    p = pool(idle_timeout=30)
    c = conn()
    for _ in range(5):
        p.checkin(c)
        await trio.sleep(20)
        assert p.checkout(A) is c
    assert c.uses == 5


async def test_a_connection_the_upstream_closed_is_not_reused() -> None:
    """An idle connection that is readable (EOF, stray bytes left over, or a reset) is
    dead: checkout closes it and moves on to the next one."""
    p = pool()
    live = conn()
    p.checkin(live)
    dead = [conn(script=[EOF]), conn(script=[b"HTTP/1.1 200 OK\r\n"]), conn(script=[])]
    dead_stream = dead[2].stream
    assert isinstance(dead_stream, ScriptedStream)
    dead_stream.feed(StreamBroken("ECONNRESET"))
    for c in dead:
        p.checkin(c)
    assert p.checkout(A) is live
    assert all(closed(c) for c in dead)
    assert p.checkout(A) is None


async def test_sweep_closes_expired_and_dead_keeps_live(autojump_clock: MockClock) -> None:
    """``sweep``: expired and upstream-closed idle connections are closed and counted; live
    fresh ones stay, in order."""
    p = pool(idle_timeout=30)
    old = conn()
    p.checkin(old)
    await trio.sleep(31)
    live1, gone, live2 = conn(), conn(script=[EOF]), conn()
    for c in (live1, gone, live2):
        p.checkin(c)
    assert p.sweep() == 2
    assert closed(old)
    assert closed(gone)
    assert p.counts() == {A: 2}
    assert p.checkout(A) is live2
    assert p.checkout(A) is live1


async def test_run_sweeper_sweeps_periodically(autojump_clock: MockClock) -> None:
    """The sweeper task closes an expired idle connection without any checkout."""
    p = pool(idle_timeout=30)
    c = conn()
    p.checkin(c)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(p.run_sweeper, 5.0)
        await trio.sleep(34)
        assert not closed(c)
        await trio.sleep(2)  # the sweep at 35 s
        assert closed(c)
        assert p.counts() == {}
        nursery.cancel_scope.cancel()


async def test_close_all_closes_every_idle_connection() -> None:
    p = pool()
    cs = [conn(A), conn(A), conn(B)]
    for c in cs:
        p.checkin(c)
    p.close_all()
    assert all(closed(c) for c in cs)
    assert p.counts() == {}


async def test_busy_counts_per_origin() -> None:
    """``mark_busy``/``mark_free`` count connections in use; an origin at zero is dropped."""
    p = pool()
    p.mark_busy(A)
    p.mark_busy(A)
    p.mark_busy(B)
    assert p.busy == {A: 2, B: 1}
    p.mark_free(A)
    p.mark_free(B)
    assert p.busy == {A: 1}
    p.mark_free(A)
    assert p.busy == {}
