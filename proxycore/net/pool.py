"""Upstream connections: opening (TCP, TLS) and a keep-alive pool per origin.

An origin is ``(scheme, host, port, ca_file)``. The pool keeps at most
``max_idle_per_origin`` idle connections per origin, most recently used
first, each for at most ``idle_timeout`` seconds. A connection is put back
only by the exchange that finished it cleanly (both messages complete, no
bytes left over); everything else is closed, never reused.

A connection that the upstream closed while idle is found at checkout (it is
readable: EOF or stray bytes) and dropped.
"""

from __future__ import annotations

import ssl
from collections import deque
from dataclasses import dataclass, field

import trio

from ..config import PoolSettings
from ..net.stream import RawStream, Stream, StreamBroken, TLSStream, connect_tcp

__all__ = ["Origin", "Pool", "UpstreamConnection", "open_connection"]

Origin = tuple[str, str, int, str | None]


@dataclass(slots=True, eq=False)
class UpstreamConnection:
    origin: Origin
    stream: Stream
    #: Exchanges completed on this connection (0 for a fresh one).
    uses: int = 0
    idle_since: float = field(default=0.0)

    def close(self) -> None:
        self.stream.close()


class _TLSContexts:
    """One client SSLContext per CA file, built on first use."""

    def __init__(self) -> None:
        self._by_ca: dict[str | None, ssl.SSLContext] = {}

    def get(self, ca_file: str | None) -> ssl.SSLContext:
        ctx = self._by_ca.get(ca_file)
        if ctx is None:
            ctx = ssl.create_default_context()
            if ca_file is not None:
                ctx.load_verify_locations(cafile=ca_file)
            ctx.set_alpn_protocols(["http/1.1"])
            self._by_ca[ca_file] = ctx
        return ctx


_tls_contexts = _TLSContexts()


async def open_connection(origin: Origin) -> UpstreamConnection:
    """Connect (and for https, handshake with SNI and hostname checks).

    A checkpoint; the caller's cancel scope carries the connect timeout.
    Raises ``OSError`` or :class:`StreamBroken` (TLS failures).
    """
    scheme, host, port, ca_file = origin
    sock = await connect_tcp(host, port)
    if scheme == "http":
        return UpstreamConnection(origin, RawStream(sock))
    try:
        sock.setblocking(False)
        trio_sock = trio.socket.from_stdlib_socket(sock)
        ssl_stream = trio.SSLStream(
            trio.SocketStream(trio_sock),
            _tls_contexts.get(ca_file),
            server_hostname=host,
            https_compatible=True,
        )
        await ssl_stream.do_handshake()
    except BaseException as exc:
        trio.lowlevel.notify_closing(sock)
        sock.close()
        if isinstance(exc, trio.BrokenResourceError):
            cause = exc.__cause__
            reason = getattr(cause, "verify_message", None) or getattr(cause, "reason", None)
            raise StreamBroken(f"TLS handshake failed: {reason or type(cause).__name__}") from None
        raise
    return UpstreamConnection(origin, TLSStream(ssl_stream, sock))


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
