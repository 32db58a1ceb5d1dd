"""WebSocket relay for ``websocket = true`` routes (RFC 6455, via trio-websocket + wsproto).

``Exchange.run`` calls :func:`relay_websocket` after routing and admission, so inbound
auth, policy and rate limits have already run. The flow of one session:

1. The client's handshake is checked (HTTP/1.1, no body, ASCII target, version 13, a key);
   a bad one is an ordinary JSON error (400, or 426 for another version).
2. The client side is *parsed, not answered*: a trio-websocket server connection reads a
   stream that first replays the head the proxy already read (``raw_head + pending``),
   then the socket. Nothing is sent to the client yet.
3. The upstream handshake, within the route's ``connect`` timeout: ``ws://`` or ``wss://``
   (SNI, hostname check, the route's ``ca_file``), path ``upstream_path + query``, the
   client's subprotocols, and the headers an HTTP request would carry (X-Forwarded-*,
   X-Request-ID, identity, injected credential; never the client's credential or identity
   copies, nor its handshake headers: trio-websocket makes its own). Unreachable upstream:
   502/504 JSON through the exchange's error path. Refused (any status but 101): that
   status, headers (hop-by-hop dropped) and body go to the client as a plain response, and
   the connection is closed: no byte is ever tunnelled after it.
4. Only after the upstream's 101 does the client get its 101, with the upstream's chosen
   subprotocol and no extensions (permessage-deflate is not supported: never offered
   upstream, never accepted from the client).
5. Relay, in one nursery: one task per direction (text stays text, binary stays binary,
   order kept), client keepalive pings, the idle / lifetime timer, and a drain watch.
   Both connections use ``message_queue_size=1``: a slow reader on one side stops the
   other side's reads, so memory per session is a few messages (each at most
   ``max_message_bytes``; a larger one is refused with close code 1009 by trio-websocket).
6. The first ending decides the close codes: a close frame from one side is passed to the
   other (code and reason); a side that vanishes without one makes the other get 1011
   (upstream lost) or 1001 (client gone); idle 1001, lifetime 1008, ping timeout 1001 (the
   client is presumed gone), shutdown 1001. Both closing handshakes then run concurrently,
   each bounded by ``CLOSE_TIMEOUT_S``, while the pumps still run (so a frame being written
   is finished, never cut mid-frame, before the close frame), and the session ends.

The access record gets status 101 and message bytes each way; one extra JSON line per
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

from .accesslog import access_logger
from .errors import (
    BadRequest,
    ClientGone,
    DownstreamError,
    ProxyError,
    UpstreamConnectError,
    UpstreamConnectTimeout,
    UpstreamProtocolError,
    UpstreamReset,
)
from .headers import (
    HOP_BY_HOP,
    NO_BODY,
    Framing,
    Headers,
    downstream_response_headers,
    reason_phrase,
    serialize_head,
    upstream_request_headers,
)
from .pool import _tls_contexts
from .stream import StreamBroken, connect_tcp

if TYPE_CHECKING:
    from .exchange import Exchange
    from .router import Match
    from .security import Admission

__all__ = ["relay_websocket"]

log: Final = logging.getLogger("proxycore.websocket")

#: How long each closing handshake may take before the connection is cut.
CLOSE_TIMEOUT_S: Final = 5.0
#: Socket read size on both sides (trio-websocket's default).
RECV_BYTES: Final = 4096
#: Handshake headers trio-websocket makes itself: client copies never pass upstream.
WS_HANDSHAKE: Final = frozenset(
    {
        b"sec-websocket-key",
        b"sec-websocket-version",
        b"sec-websocket-extensions",
        b"sec-websocket-protocol",
        b"sec-websocket-accept",
    }
)
_NOT_IN_101: Final = WS_HANDSHAKE | HOP_BY_HOP | {b"content-length", b"x-request-id"}
GOING_AWAY: Final = 1001
POLICY_VIOLATION: Final = 1008
INTERNAL_ERROR: Final = 1011
#: Close codes that never travel in a frame: the peer vanished (or TLS failed).
_ABNORMAL: Final = frozenset({1006, 1015})
LIFETIME_REASON: Final = "session lifetime exceeded, reconnect"


class UpgradeRequired(DownstreamError):
    status = 426
    type = "upgrade_required"


class _Reader:
    """Stands in for the nursery trio-websocket starts a connection's reader task in.

    trio-websocket lets the reader's exceptions escape into that nursery: a refused upstream
    handshake raises ``ConnectionRejected`` there, and a malformed 101 an h11/wsproto
    protocol error. Run through this, the exception is kept instead of cancelling the
    session, and ``watch`` (a scope waiting on a handshake) is cancelled when the reader
    ends, so a peer that closes or misbehaves mid-handshake is seen at once.
    """

    def __init__(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        self.error: Exception | None = None
        self.done = False
        self.watch: trio.CancelScope | None = None

    def start_soon(self, fn: Callable[[], Awaitable[object]], *args: object) -> None:
        self._nursery.start_soon(self._run, fn)

    async def _run(self, fn: Callable[[], Awaitable[object]]) -> None:
        try:
            await fn()
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

    It wraps the very ``socket.socket`` object the connection's ``RawStream`` holds (no dup),
    so whichever closes first closes it: trio's close and ``RawStream.close`` both check
    ``fileno() != -1`` and call ``notify_closing`` first, so the descriptor is closed exactly
    once and no task is left waiting on a number the kernel may reuse.
    """

    def __init__(self, sock: socket.socket, replay: bytes) -> None:
        self.sock = sock
        self._stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
        self._replay = replay

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self._replay:
            # Whole: wsproto's h11 refuses an incomplete head past 16 KiB, ours may be 64.
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


def _text_size(message: str | bytes) -> int:
    if isinstance(message, bytes) or message.isascii():
        return len(message)
    return len(message.encode("utf-8"))


async def _close(ws: WebSocketConnection | None, code: int, reason: str) -> None:
    """Closing handshake, bounded; a no-op on a side that is already closed."""
    if ws is not None:
        with trio.move_on_after(CLOSE_TIMEOUT_S):
            await ws.aclose(code, reason or None)


class _Session:
    def __init__(self, exchange: Exchange, match: Match, query: bytes, admission: Admission):
        self.x = exchange
        self.route = match.route
        self.resource = match.upstream_path + query
        self.admission = admission
        self.ws = self.route.ws
        self.timeouts = exchange.snapshot.config.timeouts_for(self.route)
        self.client_ws: WebSocketConnection | None = None
        self.upstream_ws: WebSocketConnection | None = None
        self.up_sock: trio.socket.SocketType | None = None
        self.rejected: ConnectionRejected | None = None
        self.outcome = ""
        self.client_close = (0, "")
        self.upstream_close = (0, "")
        self.ended = trio.Event()
        self.messages = [0, 0]  # in (client -> upstream), out
        self.sizes = [0, 0]
        self.started = 0.0
        self.idle_deadline = math.inf
        self.up_blocked = False  # the client -> upstream pump waits on the upstream

    # -- handshake ---------------------------------------------------------

    def check_client(self) -> list[str]:
        """Refuse what trio-websocket's server side would; return the offered subprotocols."""
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
        try:
            x.request.target.decode("ascii")
            x.client.raw_head.decode("ascii")  # wsproto decodes Host, target, protocols
            offered = [p for v in values.get(b"sec-websocket-protocol", []) for p in v.split(b",")]
            return [s for s in (p.decode("ascii").strip() for p in offered) if s]
        except UnicodeDecodeError:
            raise BadRequest("non-ASCII bytes in the WebSocket handshake") from None

    async def parse_client(self, reader: _Reader) -> WebSocketRequest:
        client = self.x.client
        stream = _ClientStream(client.stream.sock, client.raw_head + client.pending)
        request: WebSocketRequest | None = None
        with trio.CancelScope() as reader.watch:
            request = await wrap_server_stream(
                reader.nursery,
                stream,
                message_queue_size=1,
                max_message_size=self.ws.max_message_bytes,
                receive_buffer_size=None,  # the replay in one piece; then RECV_BYTES reads
            )
        if request is None:  # trio-websocket refused the head (check_client should have)
            raise BadRequest("malformed WebSocket handshake")
        return request

    def upstream_headers(self) -> tuple[str, Headers]:
        x, route = self.x, self.route
        host = route.target.host_header.encode("ascii")
        if route.preserve_host:
            host = next((v for n, v in x.headers if n.lower() == b"host"), host)
        headers = upstream_request_headers(
            x.headers,
            host=host,
            client_ip=x.client.peer_ip.encode(),
            request_id=x.request_id,
            framing=NO_BODY,
            identity_encoding=False,
            drop=self.admission.drop | WS_HANDSHAKE,
            extra=self.admission.extra,
        )
        return host.decode("latin-1"), [(n, v) for n, v in headers if n.lower() != b"host"]

    async def open_upstream(self) -> trio.SocketStream | trio.SSLStream[trio.SocketStream]:
        up = self.route.target
        try:
            sock = trio.socket.from_stdlib_socket(await connect_tcp(up.host, up.port))
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise UpstreamConnectError(
                f"cannot connect to upstream {up.host}:{up.port}: {reason}"
            ) from None
        self.up_sock = sock
        stream = trio.SocketStream(sock)
        if up.scheme == "http":
            return stream
        tls = trio.SSLStream(
            stream,
            _tls_contexts.get(self.route.ca_file),
            server_hostname=up.host,
            https_compatible=True,
        )
        try:
            await tls.do_handshake()
        except trio.BrokenResourceError as exc:
            cause = exc.__cause__
            why = getattr(cause, "verify_message", None) or getattr(cause, "reason", None)
            raise UpstreamConnectError(
                f"upstream {up.host}:{up.port}: TLS handshake failed: {why or type(cause).__name__}"
            ) from None
        return tls

    async def connect_upstream(
        self, reader: _Reader, client: _Reader, subprotocols: list[str]
    ) -> WebSocketConnection | None:
        """The upstream connection after its 101; None if it refused (``self.rejected``)."""
        up = self.route.target
        host, headers = self.upstream_headers()
        ws: WebSocketConnection | None = None
        with trio.move_on_after(self.timeouts.connect) as timer:
            stream = await self.open_upstream()
            with trio.CancelScope() as scope:
                reader.watch = client.watch = scope  # either reader ending stops the wait
                ws = await wrap_client_stream(
                    reader.nursery,
                    stream,
                    host,
                    self.resource.decode("ascii"),
                    subprotocols=subprotocols,
                    extra_headers=headers,
                    message_queue_size=1,
                    max_message_size=self.ws.max_message_bytes,
                    receive_buffer_size=RECV_BYTES,
                )
            reader.watch = client.watch = None
        if ws is not None:
            return ws
        if timer.cancelled_caught:
            raise UpstreamConnectTimeout(
                f"WebSocket handshake with upstream {up.host}:{up.port} timed out"
            )
        if not reader.done:
            raise ClientGone("client went away during the WebSocket handshake")
        if isinstance(reader.error, ConnectionRejected):
            self.rejected = reader.error
            return None
        if reader.error is not None:
            raise UpstreamProtocolError("invalid WebSocket handshake response from upstream")
        raise UpstreamReset("upstream closed the connection during the WebSocket handshake")

    async def relay_refusal(self, exc: ConnectionRejected) -> None:
        """The upstream's refusal as a plain response; the connection then closes (lingering)."""
        x, rec = self.x, self.x.record
        status, body = exc.status_code, exc.body or b""
        framing = NO_BODY if status < 200 or status in (204, 304) else Framing("length", len(body))
        headers = downstream_response_headers(
            list(exc.headers),
            request_id=x.request_id,
            framing=framing,
            keep_length=False,
            close=True,
        )
        head = serialize_head(b"HTTP/1.1 %d %s\r\n" % (status, reason_phrase(status)), headers)
        rec.status, rec.outcome = status, "websocket_refused"
        rec.bytes_out = len(body) if framing is not NO_BODY else 0
        x.head_sent = True
        x.client.linger = True
        with contextlib.suppress(StreamBroken):
            await x.client.stream.send_all(head + body if rec.bytes_out else head)

    def reply_headers(self, upstream: WebSocketConnection) -> Headers:
        """Headers of the upstream's 101 worth passing on (Set-Cookie...), plus X-Request-ID."""
        out = [(n, v) for n, v in upstream.handshake_headers if n.lower() not in _NOT_IN_101]
        out.append((b"X-Request-ID", self.x.request_id))
        return out

    # -- session -----------------------------------------------------------

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
                    error = exc  # kept out of the nursery: it would wrap it in an ExceptionGroup
                readers.cancel_scope.cancel()
        finally:
            if self.up_sock is not None:
                self.up_sock.close()
            if self.client_ws is not None and self.x.client.stream.sock.fileno() != -1:
                # trio-websocket left the client socket open (the client closed first, or a
                # message was too big and it stopped reading): close it gently, lingering.
                self.x.client.linger = True
        if error is not None:
            raise error
        if self.rejected is not None:
            await self.relay_refusal(self.rejected)

    async def handshake(self, readers: trio.Nursery, subprotocols: list[str]) -> None:
        x, rec = self.x, self.x.record
        client_reader, upstream_reader = _Reader(readers), _Reader(readers)
        request = await self.parse_client(client_reader)
        upstream_ws = await self.connect_upstream(upstream_reader, client_reader, subprotocols)
        rec.ttfb = trio.current_time() - rec.started
        if upstream_ws is None:
            return
        self.upstream_ws = upstream_ws
        try:
            self.client_ws = await request.accept(
                subprotocol=upstream_ws.subprotocol, extra_headers=self.reply_headers(upstream_ws)
            )
        except ConnectionClosed:
            rec.status, rec.outcome = ClientGone.status, "client_gone"
            await _close(upstream_ws, GOING_AWAY, "client went away")
            return
        x.head_sent = True
        rec.status = 101
        await self.relay(self.client_ws, upstream_ws)

    async def relay(self, client_ws: WebSocketConnection, upstream_ws: WebSocketConnection) -> None:
        self.started = trio.current_time()
        self.idle_deadline = self.started + self.timeouts.idle
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.pump, client_ws, upstream_ws, 0)
            nursery.start_soon(self.pump, upstream_ws, client_ws, 1)
            nursery.start_soon(self.timers)
            nursery.start_soon(self.drain_watch)
            if self.ws.ping_interval:
                nursery.start_soon(self.keepalive, client_ws)
            await self.ended.wait()
            # The pumps keep running meanwhile: a frame being written is finished (the close
            # frame queues behind it), or cut with the connection when a close times out.
            async with trio.open_nursery() as closing:
                closing.start_soon(_close, client_ws, *self.client_close)
                closing.start_soon(_close, upstream_ws, *self.upstream_close)
            nursery.cancel_scope.cancel()
        self.log_session()

    def finish(self, outcome: str, client: tuple[int, str], upstream: tuple[int, str]) -> None:
        """The first ending wins: codes (and reasons) for each side, then close both."""
        if self.ended.is_set():
            return
        self.outcome, self.client_close, self.upstream_close = outcome, client, upstream
        if outcome == "websocket_upstream_lost":
            self.x.record.error_kind = "reset"
        self.ended.set()

    def closed_by(self, client_side: bool, reason: CloseReason | None) -> None:
        code = reason.code if reason is not None else 1006
        text = (reason.reason if reason is not None else None) or ""
        if code in _ABNORMAL:  # no close frame: the peer vanished
            if client_side:
                self.finish("websocket_client_gone", (code, ""), (GOING_AWAY, "client went away"))
            else:
                lost = (INTERNAL_ERROR, "upstream connection lost")
                self.finish("websocket_upstream_lost", lost, (code, ""))
            return
        passed = (1000 if code == 1005 else code, text)  # 1005: the close frame had no code
        if client_side:
            self.finish("websocket_closed", (code, text), passed)
        else:
            self.finish("websocket_closed", passed, (code, text))

    async def pump(self, src: WebSocketConnection, dst: WebSocketConnection, way: int) -> None:
        """Messages from ``src`` to ``dst`` in order; ``way`` 0 is client -> upstream."""
        inbound = way == 0
        idle = self.timeouts.idle
        while True:
            try:
                message = await src.get_message()
            except ConnectionClosed as exc:
                self.closed_by(inbound, exc.reason)
                return
            self.idle_deadline = trio.current_time() + idle
            self.up_blocked = inbound
            try:
                await dst.send_message(message)
            except ConnectionClosed:
                return  # dst is closing: its own pump says why, after what it had queued
            finally:
                if inbound:
                    self.up_blocked = False
            self.messages[way] += 1
            self.sizes[way] += _text_size(message)

    async def timers(self) -> None:
        lifetime = self.ws.max_lifetime
        end = self.started + lifetime if lifetime else math.inf
        while True:
            await trio.sleep_until(min(self.idle_deadline, end))
            now = trio.current_time()
            if now >= end:
                why = (POLICY_VIOLATION, LIFETIME_REASON)
                self.finish("websocket_lifetime_exceeded", why, why)
                return
            if now >= self.idle_deadline:
                why = (GOING_AWAY, "idle timeout")
                self.finish("websocket_idle_timeout", why, why)
                return

    async def keepalive(self, ws: WebSocketConnection) -> None:
        """Ping the client; no pong in time: it is presumed gone (1001 both ways).

        A pong can't be read while the client -> upstream pump waits on a slow upstream
        (trio-websocket's reader is then blocked behind a queued message): that is the
        upstream's slowness, not a dead client, so such a timeout doesn't count.
        """
        interval, timeout = self.ws.ping_interval, self.ws.ping_timeout
        while True:
            await trio.sleep(interval)
            with trio.move_on_after(timeout) as wait:
                try:
                    await ws.ping()
                except ConnectionClosed:
                    return  # the pumps report why
            if wait.cancelled_caught and not self.up_blocked:
                why = (GOING_AWAY, "ping timeout")
                self.finish("websocket_ping_timeout", why, (GOING_AWAY, "client ping timeout"))
                return

    async def drain_watch(self) -> None:
        """A graceful shutdown closes the session with 1001 at once.

        Registered like a keep-alive wait (``start_draining`` cancels those), so the drain
        doesn't wait ``shutdown_grace`` for sessions that could last hours.
        """
        state = self.x.client.state
        with trio.CancelScope() as scope:
            state.idle_waits.add(scope)
            try:
                if not state.draining:
                    await trio.sleep_forever()
            finally:
                state.idle_waits.discard(scope)
        why = (GOING_AWAY, "server shutting down")
        self.finish("websocket_shutdown", why, why)

    def log_session(self) -> None:
        rec = self.x.record
        rec.bytes_in, rec.bytes_out = self.sizes
        rec.outcome = self.outcome
        if not access_logger.isEnabledFor(logging.INFO):
            return
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
    """Proxy one WebSocket session (see the module docstring).

    Raises :class:`ProxyError` only before anything was sent to the client.
    """
    await _Session(exchange, match, query, admission).run()
