"""The values and protocols the upstream core (:mod:`proxycore.proxy.upstream`) shares
with its two front ends: where the request body comes from (:class:`RequestBody`), the
response head it hands the sink (:class:`ResponseHead`), and the body whose client the
process's downstream watch can see (:class:`WatchedClient`). Re-exported by
:mod:`~proxycore.proxy.upstream`.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

from ..http.headers import Framing, Headers
from ..net.stream import RawStream, Stream

__all__ = ["RequestBody", "ResponseHead", "WatchedClient"]


class RequestBody(Protocol):
    """Where the rest of the request body comes from (native: the client socket;
    ASGI: ``receive()``)."""

    #: The whole body went upstream (in the head's write, or pumped since).
    done: bool
    #: Start the body side with the exchange, even with no body left to pump.
    eager: bool

    async def send_rest(self, up: Stream, idle: float) -> bool:
        """Pump the rest of the body to ``up``: True (and :attr:`done` set) once all of
        it went, False if the upstream stopped reading (its response decides).

        ``idle`` is the route's ``client_body``: the longest silence between two reads.
        Raises :class:`~proxycore.errors.ProxyError` for a downstream failure (gone,
        stalled for ``idle``, malformed, too large).
        """
        ...

    async def wait_gone(self) -> bool:
        """After the body: True once the downstream went away; False as soon as that
        can no longer be told, or no longer matters."""
        ...


class WatchedClient(Protocol):
    """A body whose downstream the process's watch can see (the native front end)."""

    def watch_stream(self) -> RawStream | None:
        """The client socket to watch (the body done), or None: nothing to watch (bytes
        of a next request already in hand; :meth:`RequestBody.wait_gone` says False)."""
        ...


class ResponseHead(NamedTuple):
    """The upstream's final response head, after the ``on_response_head`` hook."""

    status: int
    reason: bytes
    headers: Headers
    framing: Framing
    #: What the head allows: HTTP/1.1, no ``Connection: close``, not close-delimited.
    reusable: bool
    #: Body bytes read with the head.
    trailing: bytes
    #: An event stream (``text/event-stream`` with a body); the SSE headers were added.
    sse: bool
