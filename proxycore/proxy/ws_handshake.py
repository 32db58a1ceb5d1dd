"""The WebSocket upgrade's values and its two handshakes (``websocket.py`` has the entry
point, the session relay and ``open_upstream``, the connector used in production).

The exchange hands an upgrade a frozen :class:`UpgradeRequest` (the head after hooks,
request id, route match, admission, timeouts, the client connection and the bytes to
replay) and the access record it lends, and gets an :class:`UpgradeResult` back (whether a
response went out, whether the connection must linger). Nothing else of the caller is
read or written here.

:class:`Handshake` holds one upgrade's handshakes: the client's head is checked
(:func:`check_client`), parsed by trio-websocket's server side from a stream that replays
it (:class:`ClientStream`), then the upstream handshake runs within the route's
``connect`` timeout. Its 101 makes the client's 101. A refusal is relayed as a plain
response (:meth:`Handshake.relay_refusal`); one whose body is over
:data:`~proxycore.proxy.ws_streams.MAX_REFUSAL_BODY` (64 KiB) is a 502 instead (the
upstream's stream is read through :class:`~proxycore.proxy.ws_streams.RefusalCap`). The
trio streams the handshakes use are in :mod:`~proxycore.proxy.ws_streams`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final, NamedTuple, Protocol, cast

import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    WebSocketConnection,
    WebSocketRequest,
    wrap_client_stream,
    wrap_server_stream,
)

from ..config import Route, Timeouts, UpstreamSpec
from ..errors import (
    BadRequest,
    ClientGone,
    DownstreamError,
    UpstreamConnectTimeout,
    UpstreamProtocolError,
    UpstreamReset,
)
from ..http.headers import (
    HOP_BY_HOP,
    NO_BODY,
    Framing,
    Headers,
    downstream_response_headers,
    reason_phrase,
    serialize_head,
    upstream_request_headers,
)
from ..http.router import Match
from ..net.stream import RawStream
from ..observe.accesslog import ExchangeRecord
from ..proxy.ws_streams import MAX_REFUSAL_BODY, RECV_BYTES, ClientStream, RefusalCap
from ..security.admission import Admission

__all__ = [
    "CLOSE_TIMEOUT_S",
    "GOING_AWAY",
    "RECV_BYTES",
    "WS_HANDSHAKE",
    "ClientStream",
    "Connector",
    "DrainSignal",
    "Handshake",
    "ResponseHeadHook",
    "UpgradeRequest",
    "UpgradeRequired",
    "UpgradeResult",
    "UpstreamSocket",
    "check_client",
    "close_ws",
]

log: Final = logging.getLogger("proxycore.websocket")

#: How long each closing handshake may take before the connection is cut.
CLOSE_TIMEOUT_S: Final = 5.0
#: Handshake headers trio-websocket makes itself: client copies never go upstream.
WS_HANDSHAKE: Final = frozenset(
    b"sec-websocket-" + n for n in (b"key", b"version", b"extensions", b"protocol", b"accept")
)
_NOT_IN_101: Final = WS_HANDSHAKE | HOP_BY_HOP | {b"content-length", b"x-request-id"}
GOING_AWAY: Final = 1001

#: Runs ``on_response_head`` on an upstream head (the hook may change ``headers`` in
#: place); raises a ``ProxyError`` (500) if the hook failed or set an invalid header.
ResponseHeadHook = Callable[[int, Headers], Awaitable[None]]


class DrainSignal(Protocol):
    """The server's graceful-shutdown signal (``ProxyState`` is one)."""

    @property
    def draining(self) -> bool: ...

    @property
    def idle_waits(self) -> set[trio.CancelScope]:
        """Scopes cancelled when draining starts (a session registers its timer)."""
        ...


@dataclass(frozen=True, slots=True)
class UpgradeRequest:
    """What a WebSocket upgrade reads: fixed when the exchange hands the request over."""

    #: The request target as received (checked for what wsproto decodes).
    target: bytes
    #: The client's headers after ``on_request`` (read, never changed).
    headers: Headers
    http_11: bool
    #: Bytes past the head, or a body still to come: a handshake must have none.
    has_body: bool
    request_id: bytes
    #: The ``X-Forwarded-For`` value for the upstream handshake.
    forwarded_for: bytes
    match: Match
    query: bytes
    admission: Admission
    #: The route's timeouts (``connect`` bounds the upstream handshake, ``idle`` the session).
    timeouts: Timeouts
    #: The client connection: the connection's ``RawStream`` (its socket object is used,
    #: never a second one), or any trio stream (tests). The upgrade may close it.
    client: RawStream | trio.abc.Stream
    #: The bytes already read from the client (the raw head and anything after it).
    replay: bytes
    drain: DrainSignal
    response_head: ResponseHeadHook | None = None
    #: The upstream of the route's group this upgrade goes to (None: the first).
    upstream: UpstreamSpec | None = None
    #: That upstream's injected credential field, if it has one.
    credential: tuple[bytes, bytes] | None = None

    @property
    def route(self) -> Route:
        return self.match.route

    @property
    def spec(self) -> UpstreamSpec:
        return self.upstream if self.upstream is not None else self.match.route.group[0]

    @property
    def resource(self) -> bytes:
        """The upstream path and query of the handshake."""
        return self.match.path_for(self.spec) + self.query

    @property
    def where(self) -> str:
        """The upstream as errors name it to the client: by route, never by address."""
        return f"the upstream of route {self.route.name!r}"


@dataclass(frozen=True, slots=True)
class UpgradeResult:
    """What an upgrade tells the exchange; the lent record has the rest (status, bytes)."""

    #: A response went to the client: the 101 (then a session), or the upstream's refusal.
    head_sent: bool
    #: The client connection is still open and must be closed lingering (the refusal was
    #: sent, or trio-websocket left the socket open after the session).
    linger: bool


class UpstreamSocket(NamedTuple):
    stream: trio.abc.Stream
    #: Closes the connection at once (no TLS close_notify); idempotent, never blocks.
    close: Callable[[], None]


#: Opens the upstream connection for an upgrade (``websocket.open_upstream``; tests
#: script one). Raises ``UpstreamConnectError`` when it can't.
Connector = Callable[[UpgradeRequest], Awaitable[UpstreamSocket]]


class UpgradeRequired(DownstreamError):
    status = 426
    type = "upgrade_required"


def check_client(up: UpgradeRequest) -> list[str]:
    """Refuse what trio-websocket's server side would; the offered subprotocols."""
    if not up.http_11:
        raise BadRequest("WebSocket needs HTTP/1.1")
    if up.has_body:
        raise BadRequest("a WebSocket handshake must not have a body")
    values: dict[bytes, list[bytes]] = {}
    for name, value in up.headers:
        values.setdefault(name.lower(), []).append(value)
    if values.get(b"sec-websocket-version", [b""])[-1].strip() != b"13":
        raise UpgradeRequired(
            "only WebSocket version 13 is supported",
            headers=[(b"Sec-WebSocket-Version", b"13")],
        )
    if not values.get(b"sec-websocket-key"):
        raise BadRequest("missing Sec-WebSocket-Key")
    protocols = b",".join(values.get(b"sec-websocket-protocol", []))
    try:  # what wsproto decodes (the Host is sent upstream, so ASCII too)
        for value in (up.target, protocols, *values.get(b"host", [])):
            value.decode("ascii")
        b",".join(values.get(b"sec-websocket-extensions", [])).decode("ascii")
        for host in values.get(b"host", []):
            host.decode("idna")
    except UnicodeError:
        raise BadRequest("invalid bytes in the WebSocket handshake") from None
    return [s for s in (p.decode().strip() for p in protocols.split(b",")) if s]


async def close_ws(ws: WebSocketConnection, code: int, reason: str) -> None:
    """Closing handshake, bounded; a no-op on a side that is already closed."""
    with trio.move_on_after(CLOSE_TIMEOUT_S):
        await ws.aclose(code, reason or None)


class _Reader:
    """Passed to trio-websocket as the nursery for a connection's reader task.

    trio-websocket lets the reader's exceptions escape into that nursery (a refused
    upstream handshake raises ``ConnectionRejected`` there; a malformed 101 an h11/wsproto
    error). Here the exception is kept instead, and ``watch`` (a scope waiting on a
    handshake) is cancelled when the reader ends, so a peer that quits mid-handshake is
    seen at once.
    """

    def __init__(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        self.error: Exception | None = None
        self.done = False
        self.watch: trio.CancelScope | None = None

    def start_soon(self, fn: Callable[..., Awaitable[object]], *args: object) -> None:
        self._nursery.start_soon(self._run, fn, *args)

    async def _run(self, fn: Callable[..., Awaitable[object]], *args: object) -> None:
        try:
            await fn(*args)
        except Exception as exc:
            self.error = exc
            if self.watch is None:
                log.warning("WebSocket reader failed: %s", type(exc).__name__)
        finally:
            self.done = True
            if self.watch is not None:
                self.watch.cancel()

    @property
    def nursery(self) -> trio.Nursery:
        return cast("trio.Nursery", self)  # trio-websocket only calls start_soon on it


class Handshake:
    """One upgrade's two handshakes. ``open`` runs them; then, with the readers' nursery
    gone, ``close`` (always) and ``relay_refusal`` (if the upstream refused).

    Writes only the lent ``record``: upstream, ttfb, status and outcome.
    """

    def __init__(self, up: UpgradeRequest, record: ExchangeRecord, connect: Connector) -> None:
        self.up, self.record, self._connect = up, record, connect
        self.client = ClientStream(up.client, up.replay)
        self.upstream: UpstreamSocket | None = None
        #: The upstream's refusal, to relay once the readers are gone.
        self.rejected: ConnectionRejected | None = None
        #: The client got its 101.
        self.accepted = False

    async def open(
        self, readers: trio.Nursery, subprotocols: list[str]
    ) -> tuple[WebSocketConnection, WebSocketConnection] | None:
        """Both handshakes, the upstream's first: (client, upstream) connections after the
        client's 101, or None (refused: ``rejected``; or the client went away). Raises
        :class:`ProxyError` only before anything was sent to the client."""
        rec = self.record
        client_reader, upstream_reader = _Reader(readers), _Reader(readers)
        request: WebSocketRequest | None = None
        with trio.CancelScope() as client_reader.watch:
            request = await wrap_server_stream(
                client_reader.nursery,
                self.client,
                message_queue_size=1,
                max_message_size=self.up.route.ws.max_message_bytes,
                receive_buffer_size=None,  # the replay in one piece, then RECV_BYTES
            )
        if request is None:  # trio-websocket refused the head (check_client should have)
            raise BadRequest("malformed WebSocket handshake")
        upstream_ws = await self.connect_upstream(upstream_reader, client_reader, subprotocols)
        rec.ttfb = trio.current_time() - rec.started
        if upstream_ws is None:
            return None
        reply = await self.reply_headers(upstream_ws)
        try:
            client_ws = await request.accept(
                subprotocol=upstream_ws.subprotocol, extra_headers=reply
            )
        except ConnectionClosed:
            rec.status, rec.outcome = ClientGone.status, ClientGone.outcome
            await close_ws(upstream_ws, GOING_AWAY, "client went away")
            return None
        self.accepted = True
        rec.status = 101
        return client_ws, upstream_ws

    def close(self) -> bool:
        """Close the upstream connection; True if the client's must linger: after a 101,
        trio-websocket left it open (the client's close came first, or it stopped reading
        after a too-big message), so the connection closes it, lingering."""
        if self.upstream is not None:
            self.upstream.close()
        return self.accepted and not self.client.closed

    def upstream_headers(self, host: bytes) -> Headers:
        """The headers an HTTP request would get upstream (X-Forwarded-*, X-Request-ID,
        identity, injected credential); never the client's handshake headers."""
        up = self.up
        return upstream_request_headers(
            up.headers,
            host=host,
            forwarded_for=up.forwarded_for,
            request_id=up.request_id,
            framing=NO_BODY,
            identity_encoding=False,
            drop=up.admission.drop | WS_HANDSHAKE,
            extra=up.admission.extra
            if up.credential is None
            else [*up.admission.extra, up.credential],
        )

    async def connect_upstream(
        self, reader: _Reader, client: _Reader, subprotocols: list[str]
    ) -> WebSocketConnection | None:
        """The upstream connection after its 101; None if it refused (``self.rejected``)."""
        up, target = self.up, self.up.spec.target
        host = target.host_header.encode("ascii")
        if up.spec.preserve_host:
            host = next((v for n, v in up.headers if n.lower() == b"host"), host)
        headers = self.upstream_headers(host)
        ws: WebSocketConnection | None = None
        cap: RefusalCap | None = None
        with trio.move_on_after(up.timeouts.connect) as timer:
            self.upstream = await self._connect(up)
            cap = RefusalCap(self.upstream.stream)
            with trio.CancelScope() as scope:
                reader.watch = client.watch = scope  # either reader ending stops the wait
                ws = await wrap_client_stream(
                    reader.nursery,
                    cast("trio.SocketStream", cap),  # any trio stream works
                    host.decode("ascii"),  # trio-websocket sends Host itself
                    up.resource.decode("ascii"),
                    subprotocols=subprotocols,
                    extra_headers=[(n, v) for n, v in headers if n.lower() != b"host"],
                    message_queue_size=1,
                    max_message_size=up.route.ws.max_message_bytes,
                    receive_buffer_size=RECV_BYTES,
                )
            reader.watch = client.watch = None
        if ws is not None:
            return ws
        where, address = up.where, f"{target.host}:{target.port}"
        if timer.cancelled_caught:
            raise UpstreamConnectTimeout(
                f"WebSocket handshake with {where} timed out",
                detail=f"{address}: WebSocket handshake timed out",
            )
        if not reader.done:
            raise ClientGone("client went away during the WebSocket handshake")
        if cap is not None and cap.too_large:
            raise UpstreamProtocolError(
                f"WebSocket refusal from {where} larger than {MAX_REFUSAL_BODY // 1024} KiB",
                detail=f"{address}: refusal body over {MAX_REFUSAL_BODY} bytes",
            )
        if isinstance(reader.error, ConnectionRejected):
            self.rejected = reader.error
            return None
        if reader.error is not None:
            raise UpstreamProtocolError(
                f"invalid WebSocket handshake response from {where}",
                detail=f"{address}: {type(reader.error).__name__}",
            )
        raise UpstreamReset(
            f"{where} closed the connection during the WebSocket handshake",
            detail=f"{address}: closed during the WebSocket handshake",
        )

    async def reply_headers(self, upstream: WebSocketConnection) -> Headers:
        """Headers of the upstream's 101 worth passing on (Set-Cookie...), plus X-Request-ID.

        ``on_response_head`` sees (and may change) them first, as any response head."""
        headers: Headers = list(upstream.handshake_headers)
        if self.up.response_head is not None:
            await self.up.response_head(101, headers)
        out = [(n, v) for n, v in headers if n.lower() not in _NOT_IN_101]
        return [*out, (b"X-Request-ID", self.up.request_id)]

    async def relay_refusal(self) -> None:
        """The upstream's refusal as a plain response (after ``on_response_head``); the
        connection then closes. Raises :class:`ProxyError` (a hook's 500) before sending."""
        assert self.rejected is not None
        up, rec = self.up, self.record
        status, body = self.rejected.status_code, self.rejected.body or b""
        framing = Framing("length", len(body))
        if status < 200 or status in (204, 304):
            body, framing = b"", NO_BODY
        up_headers: Headers = list(self.rejected.headers)
        if up.response_head is not None:
            await up.response_head(status, up_headers)
        headers = downstream_response_headers(
            up_headers,
            request_id=up.request_id,
            framing=framing,
            keep_length=False,
            close=True,
        )
        head = serialize_head(b"HTTP/1.1 %d %s\r\n" % (status, reason_phrase(status)), headers)
        rec.status, rec.outcome, rec.bytes_out = status, "websocket_refused", len(body)
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await self.client.send_all(head + body)
