"""TLS to upstreams: one client context per CA file, one handshake path.

Every upstream TLS connection (the pool's ``https`` connections through
:func:`open_tls_stream`, ``wss://`` WebSocket upstreams through :func:`start_tls`) is made
by one handshake: SNI and hostname check for the upstream's host,
the route's ``ca_file`` (else the system store), ALPN ``http/1.1``. A failed handshake is
one error, :class:`TLSHandshakeFailed` (a :class:`~proxycore.net.stream.StreamBroken`),
whose message is ``"TLS handshake failed: <reason>"``. The reason is the verifier's
message when there is one. It may quote the host, so callers pass it through
``errors.public_reason`` before a client sees it.
"""

from __future__ import annotations

import socket
import ssl
from typing import TypeVar

import trio

from ..net.stream import RawStream, RawTransport, StreamBroken, TLSStream

__all__ = ["TLSHandshakeFailed", "open_tls_stream", "start_tls", "tls_context"]


class TLSHandshakeFailed(StreamBroken):
    """The TLS handshake with an upstream failed (certificate, protocol, reset)."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"TLS handshake failed: {reason}")
        #: Why, in full (may name the host: for logs, or through ``public_reason``).
        self.reason = reason


_contexts: dict[str | None, ssl.SSLContext] = {}


def tls_context(ca_file: str | None) -> ssl.SSLContext:
    """The client context for ``ca_file`` (None: the system store), built on first use."""
    ctx = _contexts.get(ca_file)
    if ctx is None:
        ctx = ssl.create_default_context()
        if ca_file is not None:
            ctx.load_verify_locations(cafile=ca_file)
        ctx.set_alpn_protocols(["http/1.1"])
        _contexts[ca_file] = ctx
    return ctx


async def start_tls(
    sock: socket.socket,
    server_hostname: str,
    ca_file: str | None,
    *,
    transport: trio.abc.Stream | None = None,
) -> trio.SSLStream[trio.abc.Stream]:
    """Handshake on a connected socket; the TLS stream over it (WebSocket upstreams:
    ``https_compatible``, trio-websocket reads the end of a session itself).

    ``transport``: the trio stream over ``sock`` to run TLS on (default: a
    ``trio.SocketStream``). A checkpoint; the caller's cancel scope carries the timeout.
    On any failure, cancellation included, ``sock`` is closed. Raises
    :class:`TLSHandshakeFailed`.
    """
    sock.setblocking(False)
    if transport is None:
        transport = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
    return await _handshake(sock, transport, server_hostname, ca_file, https_compatible=True)


async def open_tls_stream(
    sock: socket.socket, server_hostname: str, ca_file: str | None
) -> TLSStream:
    """Handshake on a connected socket; the pool's :class:`TLSStream` over it.

    Over a :class:`RawTransport` (writes bounded by the stream's send timeout) and strict
    about the end: an upstream closing without ``close_notify`` is a truncation (see
    :class:`TLSStream`). Same failures as :func:`start_tls`.
    """
    raw = RawStream(sock)
    transport = RawTransport(raw)
    tls = await _handshake(sock, transport, server_hostname, ca_file, https_compatible=False)
    return TLSStream(tls, raw)


_T = TypeVar("_T", bound=trio.abc.Stream)


async def _handshake(
    sock: socket.socket,
    transport: _T,
    server_hostname: str,
    ca_file: str | None,
    *,
    https_compatible: bool,
) -> trio.SSLStream[_T]:
    try:
        tls = trio.SSLStream(
            transport,
            tls_context(ca_file),
            server_hostname=server_hostname,
            https_compatible=https_compatible,
        )
        await tls.do_handshake()
    except BaseException as exc:
        if sock.fileno() != -1:
            trio.lowlevel.notify_closing(sock)
            sock.close()
        if isinstance(exc, trio.BrokenResourceError):
            cause = exc.__cause__
            reason = getattr(cause, "verify_message", None) or getattr(cause, "reason", None)
            raise TLSHandshakeFailed(str(reason or type(cause).__name__)) from None
        if isinstance(exc, StreamBroken):  # the RawTransport's own failure (reset...)
            raise TLSHandshakeFailed(str(exc)) from None
        raise
    return tls
