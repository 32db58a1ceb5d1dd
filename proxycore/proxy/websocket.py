"""WebSocket relay for ``websocket = true`` routes (trio-websocket on both sides).

``Exchange.run`` calls :func:`relay_websocket` after routing, admission (inbound auth,
policy and rate limits) and the ``on_request`` hook have run (an answer from the hook goes
to the client instead; its header changes are the upstream handshake's). It is handed a
frozen :class:`~proxycore.proxy.ws_handshake.UpgradeRequest` and lent the access record,
and returns an :class:`~proxycore.proxy.ws_handshake.UpgradeResult`; the handshakes are in
``ws_handshake.py``, the session relay here.
``on_response_head`` sees the upstream's 101 or refusal head before the client does.
Errors name the route, never the upstream's address (that goes to the access log).
One session:

1. The client's handshake is checked (HTTP/1.1, no body, version 13, a key, ASCII where
   wsproto decodes); a bad one is a JSON error (400, 426). It is then *parsed, not
   answered*: trio-websocket's server side reads a stream that replays the head the proxy
   already read (``raw_head + pending``), then the connection's socket.
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
import time
from typing import Final

import trio
from trio_websocket import CloseReason, ConnectionClosed, WebSocketConnection

from ..errors import ProxyError, UpstreamConnectError, connect_reason, public_reason
from ..net.stream import RawStream, StreamBroken, connect_tcp
from ..net.tls import start_tls
from ..observe.accesslog import ExchangeRecord, access_logger
from ..proxy.ws_handshake import (
    GOING_AWAY,
    Connector,
    Handshake,
    UpgradeRequest,
    UpgradeResult,
    UpstreamSocket,
    check_client,
    close_ws,
)
from ..proxy.ws_streams import RawTrioStream

__all__ = ["open_upstream", "relay_websocket"]

POLICY, INTERNAL = 1008, 1011
#: Codes that never travel in a frame: the peer vanished (or its TLS failed).
_ABNORMAL: Final = frozenset({1006, 1015})
LIFETIME_REASON: Final = "session lifetime exceeded, reconnect"

Close = tuple[int, str]


async def open_upstream(up: UpgradeRequest) -> UpstreamSocket:
    """The upstream connection of an upgrade: TCP, then for ``wss://`` (and ``https://``)
    TLS through :func:`~proxycore.net.tls.start_tls`, the pool's handshake path."""
    target = up.spec.target
    address = f"{target.host}:{target.port}"  # for the access log only
    try:
        sock = await connect_tcp(target.host, target.port)
    except OSError as exc:
        raise UpstreamConnectError(
            f"cannot connect to {up.where}: {connect_reason(exc)}",
            detail=f"{address}: {exc.strerror or exc}",
        ) from None

    # Writes to the upstream are bounded by the route's ``send`` (RawStream's timer).
    raw = RawStream(sock, send_timeout=up.timeouts.send)
    if target.scheme == "http":
        return UpstreamSocket(RawTrioStream(raw), raw.close)
    try:
        tls = await start_tls(sock, target.host, up.spec.ca_file, transport=RawTrioStream(raw))
    except StreamBroken as exc:
        raise UpstreamConnectError(
            f"{up.where}: {public_reason(str(exc))}", detail=f"{address}: {exc}"
        ) from None
    return UpstreamSocket(tls, raw.close)


def _size(message: str | bytes) -> int:
    if isinstance(message, bytes) or message.isascii():
        return len(message)
    return len(message.encode("utf-8"))


async def relay_websocket(
    up: UpgradeRequest, record: ExchangeRecord, *, connect: Connector = open_upstream
) -> UpgradeResult:
    """Proxy one WebSocket session (see the module docstring). Raises :class:`ProxyError`
    only before anything was sent to the client. Writes only the lent ``record``."""
    subprotocols = check_client(up)
    target = up.spec.target
    record.upstream = f"{target.scheme}://{target.host_header}"
    handshake = Handshake(up, record, connect)
    error: ProxyError | None = None
    try:
        async with trio.open_nursery() as readers:
            try:
                pair = await handshake.open(readers, subprotocols)
                if pair is not None:
                    await _Session(up, record).relay(*pair)
            except ProxyError as exc:
                error = exc  # kept out of the nursery: it would wrap it in a group
            readers.cancel_scope.cancel()
    finally:
        linger = handshake.close()
    if error is not None:
        raise error
    if handshake.rejected is not None:
        await handshake.relay_refusal()
        return UpgradeResult(head_sent=True, linger=True)
    return UpgradeResult(head_sent=handshake.accepted, linger=linger)


class _Session:
    """One accepted session: the relay, its timers and its log line."""

    def __init__(self, up: UpgradeRequest, record: ExchangeRecord) -> None:
        self.record, self.drain = record, up.drain
        self.ws, self.timeouts = up.route.ws, up.timeouts
        self.outcome, self.client_close, self.upstream_close = "", (0, ""), (0, "")
        self.ended = trio.Event()
        self.messages, self.sizes = [0, 0], [0, 0]  # [client -> upstream, upstream -> client]
        self.started, self.idle_deadline = 0.0, math.inf
        self.up_blocked = False  # the client -> upstream pump waits on the upstream

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
                closing.start_soon(close_ws, client_ws, *self.client_close)
                closing.start_soon(close_ws, upstream_ws, *self.upstream_close)
            nursery.cancel_scope.cancel()
        self.log_session()

    def finish(self, outcome: str, client: Close, upstream: Close) -> None:
        """The first ending wins: the code and reason for each side; then both close."""
        if not self.ended.is_set():
            self.outcome, self.client_close, self.upstream_close = outcome, client, upstream
            if outcome == "websocket_upstream_lost":
                self.record.error_kind = "reset"
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
        state, lifetime = self.drain, self.ws.max_lifetime
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
        rec = self.record
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
