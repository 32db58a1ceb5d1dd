"""WebSocket relay for ``websocket = true`` routes (trio-websocket on both sides).

``Exchange.run`` calls :func:`relay_websocket` after routing, admission (inbound auth,
policy and rate limits) and the ``on_request`` hook have run (an answer from the hook goes
to the client instead; its header changes are the upstream handshake's).
``on_response_head`` sees the upstream's 101 or refusal head before the client does.
Errors name the route, never the upstream's address (that goes to the access log).
One session:

1. The client's handshake is checked (HTTP/1.1, no body, version 13, a key, ASCII where
   wsproto decodes); a bad one is a JSON error (400, 426). It is then *parsed, not
   answered*: trio-websocket's server side reads a stream that replays the head the proxy
   already read (``raw_head + pending``), then the socket.
2. Upstream handshake within the route's ``connect`` timeout: ``ws://`` or ``wss://`` (SNI,
   hostname check, ``ca_file``), path ``upstream_path + query``, the client's subprotocols
   and the headers an HTTP request would get (X-Forwarded-*, X-Request-ID, identity,
   injected credential; never the client's credential, identity or handshake headers).
   Unreachable: 502/504 JSON via the exchange. Refused (any status but 101): that status,
   headers (hop-by-hop dropped) and body go to the client and the connection closes, so
   no byte is ever tunnelled after it.
3. Only then does the client get 101, with the upstream's subprotocol and no extensions:
   permessage-deflate is not supported (never offered upstream, never accepted).
4. Relay in one nursery: a task per direction (text stays text, binary binary, in order),
   client pings, the idle/lifetime timer and a drain watch. ``message_queue_size=1`` on
   both connections: a slow reader stops the other side's reads, so a session holds a few
   messages (each <= ``max_message_bytes``; larger: close 1009, from trio-websocket).
5. The first ending picks the close codes: a close frame is passed on (code and reason);
   a side gone without one makes the other get 1011 (upstream lost) or 1001 (client gone);
   idle 1001, lifetime 1008, ping timeout 1001 (the client is presumed gone), shutdown
   1001. Both closing handshakes run concurrently, each at most ``CLOSE_TIMEOUT_S``, while
   the pumps still run: a frame being written is finished first, never cut mid-frame.

The access record gets status 101 and the message bytes each way; one more JSON line per
session (messages, bytes, both close codes) goes to the ``proxycore.access`` logger.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import socket
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Final, cast

import trio
from trio_websocket import (
    CloseReason,
    ConnectionClosed,
    ConnectionRejected,
    WebSocketConnection,
    WebSocketRequest,
    wrap_client_stream,
    wrap_server_stream,
)

from ..errors import (
    BadRequest,
    ClientGone,
    DownstreamError,
    ProxyError,
    UpstreamConnectError,
    UpstreamConnectTimeout,
    UpstreamProtocolError,
    UpstreamReset,
    connect_reason,
    public_reason,
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
from ..net.pool import _tls_contexts
from ..net.stream import StreamBroken, connect_tcp
from ..observe.accesslog import access_logger

if TYPE_CHECKING:
    from ..http.router import Match
    from ..proxy.exchange import Exchange
    from ..security.admission import Admission

__all__ = ["relay_websocket"]

log: Final = logging.getLogger("proxycore.websocket")

#: How long each closing handshake may take before the connection is cut.
CLOSE_TIMEOUT_S: Final = 5.0
#: Socket read size, both sides (4 KiB halves throughput: wsproto's cost is per read).
RECV_BYTES: Final = 65536
#: Handshake headers trio-websocket makes itself: client copies never go upstream.
WS_HANDSHAKE: Final = frozenset(
    b"sec-websocket-" + n for n in (b"key", b"version", b"extensions", b"protocol", b"accept")
)
_NOT_IN_101: Final = WS_HANDSHAKE | HOP_BY_HOP | {b"content-length", b"x-request-id"}
GOING_AWAY, POLICY, INTERNAL = 1001, 1008, 1011
#: Codes that never travel in a frame: the peer vanished (or its TLS failed).
_ABNORMAL: Final = frozenset({1006, 1015})
LIFETIME_REASON: Final = "session lifetime exceeded, reconnect"

Close = tuple[int, str]


class UpgradeRequired(DownstreamError):
    status = 426
    type = "upgrade_required"


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


class _ClientStream(trio.abc.Stream):
    """The client's socket as a trio stream that first replays the bytes already read.

    It wraps the very ``socket.socket`` object the connection's ``RawStream`` holds (no
    dup), so whichever closes first closes it: trio's close and ``RawStream.close`` both
    check ``fileno() != -1`` and call ``notify_closing`` first, so the descriptor is
    closed exactly once and no task is left waiting on a number the kernel may reuse.
    """

    def __init__(self, sock: socket.socket, replay: bytes) -> None:
        self._stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
        self._replay = replay

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self._replay:  # in one piece: wsproto's h11 refuses a partial head over 16 KiB
            await trio.lowlevel.checkpoint()
            data, self._replay = self._replay, b""
            return data
        return await self._stream.receive_some(max_bytes or RECV_BYTES)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self._stream.aclose()


def _size(message: str | bytes) -> int:
    if isinstance(message, bytes) or message.isascii():
        return len(message)
    return len(message.encode("utf-8"))


async def _close(ws: WebSocketConnection, code: int, reason: str) -> None:
    """Closing handshake, bounded; a no-op on a side that is already closed."""
    with trio.move_on_after(CLOSE_TIMEOUT_S):
        await ws.aclose(code, reason or None)


class _Session:
    def __init__(self, exchange: Exchange, match: Match, query: bytes, admission: Admission):
        self.x, self.route, self.admission = exchange, match.route, admission
        self.resource = match.upstream_path + query
        self.ws = self.route.ws
        self.timeouts = exchange.snapshot.config.timeouts_for(self.route)
        self.client_ws: WebSocketConnection | None = None
        self.up_sock: trio.socket.SocketType | None = None
        self.rejected: ConnectionRejected | None = None
        self.outcome, self.client_close, self.upstream_close = "", (0, ""), (0, "")
        self.ended = trio.Event()
        self.messages, self.sizes = [0, 0], [0, 0]  # [client -> upstream, upstream -> client]
        self.started, self.idle_deadline = 0.0, math.inf
        self.up_blocked = False  # the client -> upstream pump waits on the upstream

    async def run(self) -> None:
        subprotocols = self.check_client()
        rec, up = self.x.record, self.route.target
        rec.upstream = f"{up.scheme}://{up.host_header}"
        error: ProxyError | None = None
        try:
            async with trio.open_nursery() as readers:
                try:
                    await self.handshake(readers, subprotocols)
                except ProxyError as exc:
                    error = exc  # kept out of the nursery: it would wrap it in a group
                readers.cancel_scope.cancel()
        finally:
            if self.up_sock is not None:
                self.up_sock.close()
            if self.client_ws is not None and self.x.client.stream.sock.fileno() != -1:
                # trio-websocket left it open (the client's close came first, or it stopped
                # reading after a too-big message): the connection closes it, lingering.
                self.x.client.linger = True
        if error is not None:
            raise error
        if self.rejected is not None:
            await self.relay_refusal(self.rejected)

    # -- handshake ---------------------------------------------------------

    def check_client(self) -> list[str]:
        """Refuse what trio-websocket's server side would; the offered subprotocols."""
        x = self.x
        if not x.client_11:
            raise BadRequest("WebSocket needs HTTP/1.1")
        if x.body_start or not x.request_done:
            raise BadRequest("a WebSocket handshake must not have a body")
        values: dict[bytes, list[bytes]] = {}
        for name, value in x.headers:
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
            for value in (x.request.target, protocols, *values.get(b"host", [])):
                value.decode("ascii")
            b",".join(values.get(b"sec-websocket-extensions", [])).decode("ascii")
            for host in values.get(b"host", []):
                host.decode("idna")
        except UnicodeError:
            raise BadRequest("invalid bytes in the WebSocket handshake") from None
        return [s for s in (p.decode().strip() for p in protocols.split(b",")) if s]

    async def handshake(self, readers: trio.Nursery, subprotocols: list[str]) -> None:
        rec = self.x.record
        client_reader, upstream_reader = _Reader(readers), _Reader(readers)
        client = self.x.client
        request: WebSocketRequest | None = None
        with trio.CancelScope() as client_reader.watch:
            request = await wrap_server_stream(
                client_reader.nursery,
                _ClientStream(client.stream.sock, client.raw_head + client.pending),
                message_queue_size=1,
                max_message_size=self.ws.max_message_bytes,
                receive_buffer_size=None,  # the replay in one piece, then RECV_BYTES
            )
        if request is None:  # trio-websocket refused the head (check_client should have)
            raise BadRequest("malformed WebSocket handshake")
        upstream_ws = await self.connect_upstream(upstream_reader, client_reader, subprotocols)
        rec.ttfb = trio.current_time() - rec.started
        if upstream_ws is None:
            return
        reply = await self.reply_headers(upstream_ws)
        try:
            self.client_ws = await request.accept(
                subprotocol=upstream_ws.subprotocol, extra_headers=reply
            )
        except ConnectionClosed:
            rec.status, rec.outcome = ClientGone.status, ClientGone.outcome
            await _close(upstream_ws, GOING_AWAY, "client went away")
            return
        self.x.head_sent = True
        rec.status = 101
        await self.relay(self.client_ws, upstream_ws)

    @property
    def where(self) -> str:
        """The upstream as errors name it to the client: by route, never by address."""
        return f"the upstream of route {self.route.name!r}"

    async def open_upstream(self) -> trio.SocketStream | trio.SSLStream[trio.SocketStream]:
        up = self.route.target
        address = f"{up.host}:{up.port}"  # for the access log only
        try:
            self.up_sock = trio.socket.from_stdlib_socket(await connect_tcp(up.host, up.port))
        except OSError as exc:
            raise UpstreamConnectError(
                f"cannot connect to {self.where}: {connect_reason(exc)}",
                detail=f"{address}: {exc.strerror or exc}",
            ) from None
        stream = trio.SocketStream(self.up_sock)
        if up.scheme == "http":
            return stream
        context = _tls_contexts.get(self.route.ca_file)
        tls = trio.SSLStream(stream, context, server_hostname=up.host, https_compatible=True)
        try:
            await tls.do_handshake()
        except trio.BrokenResourceError as exc:
            cause = exc.__cause__
            reason = getattr(cause, "verify_message", None) or getattr(cause, "reason", None)
            reason = str(reason or type(cause).__name__)
            raise UpstreamConnectError(
                f"{self.where}: TLS handshake failed: {public_reason(reason)}",
                detail=f"{address}: TLS handshake failed: {reason}",
            ) from None
        return tls

    async def connect_upstream(
        self, reader: _Reader, client: _Reader, subprotocols: list[str]
    ) -> WebSocketConnection | None:
        """The upstream connection after its 101; None if it refused (``self.rejected``)."""
        x, up = self.x, self.route.target
        host = up.host_header.encode("ascii")
        if self.route.preserve_host:
            host = next((v for n, v in x.headers if n.lower() == b"host"), host)
        headers = upstream_request_headers(
            x.headers,
            host=host,
            forwarded_for=x.forwarded_for,
            request_id=x.request_id,
            framing=NO_BODY,
            identity_encoding=False,
            drop=self.admission.drop | WS_HANDSHAKE,
            extra=self.admission.extra,
        )
        ws: WebSocketConnection | None = None
        with trio.move_on_after(self.timeouts.connect) as timer:
            stream = await self.open_upstream()
            with trio.CancelScope() as scope:
                reader.watch = client.watch = scope  # either reader ending stops the wait
                ws = await wrap_client_stream(
                    reader.nursery,
                    stream,
                    host.decode("ascii"),  # trio-websocket sends Host itself
                    self.resource.decode("ascii"),
                    subprotocols=subprotocols,
                    extra_headers=[(n, v) for n, v in headers if n.lower() != b"host"],
                    message_queue_size=1,
                    max_message_size=self.ws.max_message_bytes,
                    receive_buffer_size=RECV_BYTES,
                )
            reader.watch = client.watch = None
        if ws is not None:
            return ws
        where, address = self.where, f"{up.host}:{up.port}"
        if timer.cancelled_caught:
            raise UpstreamConnectTimeout(
                f"WebSocket handshake with {where} timed out",
                detail=f"{address}: WebSocket handshake timed out",
            )
        if not reader.done:
            raise ClientGone("client went away during the WebSocket handshake")
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
        headers = await self.response_head_hook(101, list(upstream.handshake_headers))
        out = [(n, v) for n, v in headers if n.lower() not in _NOT_IN_101]
        return [*out, (b"X-Request-ID", self.x.request_id)]

    async def response_head_hook(self, status: int, headers: Headers) -> Headers:
        """Run ``on_response_head`` on an upstream head, as for HTTP responses: a hook that
        fails or sets an invalid header is a 500 (nothing was sent to the client yet)."""
        x = self.x
        if x.hooks.on_response_head is not None:
            hook = x.hooks.on_response_head(x.info, status, headers)
            await x._call_hook("on_response_head", hook)
            x._check_hook_headers("on_response_head", headers)
        return headers

    async def relay_refusal(self, exc: ConnectionRejected) -> None:
        """The upstream's refusal as a plain response; then the connection closes."""
        x, rec = self.x, self.x.record
        status, body = exc.status_code, exc.body or b""
        framing = Framing("length", len(body))
        if status < 200 or status in (204, 304):
            body, framing = b"", NO_BODY
        up_headers = await self.response_head_hook(status, list(exc.headers))
        headers = downstream_response_headers(
            up_headers,
            request_id=x.request_id,
            framing=framing,
            keep_length=False,
            close=True,
        )
        head = serialize_head(b"HTTP/1.1 %d %s\r\n" % (status, reason_phrase(status)), headers)
        rec.status, rec.outcome, rec.bytes_out = status, "websocket_refused", len(body)
        x.head_sent = x.client.linger = True
        with contextlib.suppress(StreamBroken):
            await x.client.stream.send_all(head + body)

    # -- session -----------------------------------------------------------

    async def relay(self, client_ws: WebSocketConnection, upstream_ws: WebSocketConnection) -> None:
        self.started = trio.current_time()
        self.idle_deadline = self.started + self.timeouts.idle
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.pump, client_ws, upstream_ws, 0)
            nursery.start_soon(self.pump, upstream_ws, client_ws, 1)
            nursery.start_soon(self.timers)
            if self.ws.ping_interval:
                nursery.start_soon(self.keepalive, client_ws)
            await self.ended.wait()
            # The pumps keep running: a frame being written is finished (the close frame
            # queues behind it), or cut with the connection if the close times out.
            async with trio.open_nursery() as closing:
                closing.start_soon(_close, client_ws, *self.client_close)
                closing.start_soon(_close, upstream_ws, *self.upstream_close)
            nursery.cancel_scope.cancel()
        self.log_session()

    def finish(self, outcome: str, client: Close, upstream: Close) -> None:
        """The first ending wins: the code and reason for each side; then both close."""
        if not self.ended.is_set():
            self.outcome, self.client_close, self.upstream_close = outcome, client, upstream
            if outcome == "websocket_upstream_lost":
                self.x.record.error_kind = "reset"
            self.ended.set()

    def closed_by(self, client_side: bool, reason: CloseReason | None) -> None:
        code = reason.code if reason is not None else 1006
        text = (reason.reason if reason is not None else None) or ""
        if code in _ABNORMAL and client_side:
            self.finish("websocket_client_gone", (code, ""), (GOING_AWAY, "client went away"))
        elif code in _ABNORMAL:
            lost = (INTERNAL, "upstream connection lost")
            self.finish("websocket_upstream_lost", lost, (code, ""))
        else:
            own, passed = (code, text), (1000 if code == 1005 else code, text)  # 1005: no code
            self.finish("websocket_closed", *((own, passed) if client_side else (passed, own)))

    async def pump(self, src: WebSocketConnection, dst: WebSocketConnection, way: int) -> None:
        """Messages from ``src`` to ``dst`` in order; ``way`` 0 is client -> upstream."""
        while True:
            try:
                message = await src.get_message()
            except ConnectionClosed as exc:
                self.closed_by(way == 0, exc.reason)
                return
            self.idle_deadline = trio.current_time() + self.timeouts.idle
            if way == 0:
                self.up_blocked = True
            try:
                await dst.send_message(message)
            except ConnectionClosed:
                break  # dst is closing: its own pump says why, after what it had queued
            finally:
                if way == 0:
                    self.up_blocked = False
            self.messages[way] += 1
            self.sizes[way] += _size(message)
        # Keep reading (and dropping), so src's reader isn't stuck behind a full queue and
        # can take part in the closing handshake.
        with contextlib.suppress(ConnectionClosed):
            while True:
                await src.get_message()

    async def timers(self) -> None:
        """Idle and lifetime deadlines, and graceful shutdown: registered like a keep-alive
        wait (``start_draining`` cancels those), a drain closes the session with 1001 at once
        instead of being held ``shutdown_grace`` by sessions that could last hours."""
        state, lifetime = self.x.client.state, self.ws.max_lifetime
        end = self.started + lifetime if lifetime else math.inf
        with trio.CancelScope() as drain:
            state.idle_waits.add(drain)
            try:
                while not state.draining:
                    await trio.sleep_until(min(self.idle_deadline, end))
                    now = trio.current_time()
                    if now >= end:
                        why = (POLICY, LIFETIME_REASON)
                        self.finish("websocket_lifetime_exceeded", why, why)
                        return
                    if now >= self.idle_deadline:
                        why = (GOING_AWAY, "idle timeout")
                        self.finish("websocket_idle_timeout", why, why)
                        return
            finally:
                state.idle_waits.discard(drain)
        why = (GOING_AWAY, "server shutting down")
        self.finish("websocket_shutdown", why, why)

    async def keepalive(self, ws: WebSocketConnection) -> None:
        """Ping the client; no pong within ``ping_timeout``: it is presumed gone (1001).

        A pong can't be read while the client -> upstream pump waits on a slow upstream
        (the reader is blocked behind a queued message): that is the upstream's slowness,
        not a dead client, so such a timeout doesn't count.
        """
        while True:
            await trio.sleep(self.ws.ping_interval)
            with trio.move_on_after(self.ws.ping_timeout) as wait:
                try:
                    await ws.ping()
                except ConnectionClosed:
                    return  # the pumps say why
            if wait.cancelled_caught and not self.up_blocked:
                why = (GOING_AWAY, "ping timeout")
                self.finish("websocket_ping_timeout", why, (GOING_AWAY, "client ping timeout"))
                return

    def log_session(self) -> None:
        rec = self.x.record
        rec.bytes_in, rec.bytes_out = self.sizes
        rec.outcome = self.outcome
        if access_logger.isEnabledFor(logging.INFO):
            line = {
                "time": round(time.time(), 6),
                "pid": os.getpid(),
                "type": "websocket",
                "request_id": rec.request_id,
                "client": rec.client,
                "route": rec.route,
                "upstream": rec.upstream,
                "duration_ms": round((trio.current_time() - rec.started) * 1000, 3),
                "messages_in": self.messages[0],
                "messages_out": self.messages[1],
                "bytes_in": self.sizes[0],
                "bytes_out": self.sizes[1],
                "client_close_code": self.client_close[0],
                "upstream_close_code": self.upstream_close[0],
                "outcome": self.outcome,
            }
            access_logger.info(json.dumps(line, separators=(",", ":")))


async def relay_websocket(
    exchange: Exchange, match: Match, query: bytes, admission: Admission
) -> None:
    """Proxy one WebSocket session (see the module docstring). Raises :class:`ProxyError`
    only before anything was sent to the client."""
    await _Session(exchange, match, query, admission).run()
