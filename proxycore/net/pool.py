"""Upstream connections: opening (TCP, TLS) and a keep-alive pool per origin.

An origin is ``(scheme, host, port, ca_file)``. The pool keeps at most
``max_idle_per_origin`` idle connections per origin, most recently used
first, each for at most ``idle_timeout`` seconds. A connection is put back
only by the exchange that finished it cleanly (both messages complete, no
bytes left over); everything else is closed, never reused.

A connection that the upstream closed while idle is found at checkout (it is
readable: EOF or stray bytes) and dropped. One that dies between that check and
the first response byte is a :class:`StaleConnection`: :func:`with_stale_retry`
is the one place that retries it, always on a freshly opened connection.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import NamedTuple, TypeVar

import trio

from ..config import PoolSettings
from ..net.stream import RawStream, Stream, connect_tcp
from ..net.tls import open_tls_stream

__all__ = [
    "Origin",
    "Pool",
    "StaleConnection",
    "UpstreamConnection",
    "open_connection",
    "with_stale_retry",
]

T = TypeVar("T")


class Origin(NamedTuple):
    """Where upstream connections go; the pool's key (one idle list per origin)."""

    scheme: str
    host: str
    port: int
    ca_file: str | None = None


@dataclass(slots=True, eq=False)
class UpstreamConnection:
    origin: Origin
    stream: Stream
    #: Exchanges completed on this connection (0 for a fresh one).
    uses: int = 0
    idle_since: float = field(default=0.0)

    def close(self) -> None:
        self.stream.close()


async def open_connection(origin: Origin) -> UpstreamConnection:
    """Connect (and for https, handshake with SNI and hostname checks).

    A checkpoint; the caller's cancel scope carries the connect timeout.
    Raises ``OSError`` or :class:`StreamBroken` (TLS failures:
    :class:`~proxycore.net.tls.TLSHandshakeFailed`).
    """
    scheme, host, port, ca_file = origin
    sock = await connect_tcp(host, port)
    if scheme == "http":
        return UpstreamConnection(origin, RawStream(sock))
    return UpstreamConnection(origin, await open_tls_stream(sock, host, ca_file))


class Pool:
    """Idle keep-alive connections, per origin. Not thread-safe; one per trio run."""

    def __init__(self, settings: PoolSettings) -> None:
        self.settings = settings
        self._idle: dict[Origin, deque[UpstreamConnection]] = {}
        #: Connections in use by an exchange, per origin (for metrics).
        self.busy: dict[Origin, int] = {}

    def mark_busy(self, origin: Origin) -> None:
        self.busy[origin] = self.busy.get(origin, 0) + 1

    def mark_free(self, origin: Origin) -> None:
        left = self.busy.get(origin, 0) - 1
        if left > 0:
            self.busy[origin] = left
        else:
            self.busy.pop(origin, None)

    def checkout(self, origin: Origin) -> UpstreamConnection | None:
        """The freshest live idle connection to ``origin``, or None."""
        idle = self._idle.get(origin)
        if not idle:
            return None
        deadline = trio.current_time() - self.settings.idle_timeout
        while idle:
            conn = idle.pop()
            if conn.idle_since >= deadline and not conn.stream.has_pending_input():
                return conn
            conn.close()
        return None

    def checkin(self, conn: UpstreamConnection) -> None:
        """Keep a cleanly finished connection for reuse (or close it if full)."""
        idle = self._idle.setdefault(conn.origin, deque())
        if len(idle) >= self.settings.max_idle_per_origin:
            conn.close()
            return
        conn.uses += 1
        conn.idle_since = trio.current_time()
        idle.append(conn)

    def counts(self) -> dict[Origin, int]:
        return {origin: len(idle) for origin, idle in self._idle.items() if idle}

    def sweep(self) -> int:
        """Close idle connections past their time or closed by the upstream."""
        deadline = trio.current_time() - self.settings.idle_timeout
        closed = 0
        for idle in self._idle.values():
            keep = deque(
                c for c in idle if c.idle_since >= deadline and not c.stream.has_pending_input()
            )
            for c in idle:
                if c not in keep:
                    c.close()
                    closed += 1
            idle.clear()
            idle.extend(keep)
        return closed

    def close_all(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
            idle.clear()

    async def run_sweeper(self, every: float = 5.0) -> None:
        """Sweep forever (until cancelled); run it in the server's nursery."""
        while True:
            await trio.sleep(every)
            self.sweep()


class StaleConnection(Exception):
    """A reused connection died before any response byte (the upstream closed it while
    idle): not the upstream's answer. Raised by an attempt only when ``conn.uses``."""


async def with_stale_retry(
    pool: Pool,
    origin: Origin,
    attempt: Callable[[UpstreamConnection], Awaitable[T]],
    *,
    connect: Callable[[Origin], Awaitable[UpstreamConnection]] = open_connection,
    retry: bool = True,
) -> T:
    """Run ``attempt`` on a pooled connection to ``origin`` (or a new one from ``connect``).

    If it raises :class:`StaleConnection` and ``retry`` is set, run it once more on a
    connection from ``connect``: never another pooled one, which may be just as stale, so
    there is at most one retry. Otherwise the :class:`StaleConnection` propagates (the
    caller maps it to its own error). ``attempt`` owns the connection it is given: it
    checks it back in or closes it. Errors from ``connect`` propagate unchanged.
    """
    conn = pool.checkout(origin)
    if conn is None:
        return await attempt(await connect(origin))
    try:
        return await attempt(conn)
    except StaleConnection:
        if not retry:
            raise
    return await attempt(await connect(origin))
