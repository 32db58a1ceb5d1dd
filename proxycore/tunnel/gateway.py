"""The gateway side of a tunnel: one client's WebSocket session (docs/tunnel.md).

The exchange hands over an upgrade on ``[tunnel] path`` after the listener's admission
(an unauthenticated handshake got 401 before this) and its own handshake checks:
:func:`serve_session` gets the client connection as a trio stream that replays the head,
answers 101 with trio-websocket's server side, then:

- an identity outside ``[tunnel] allowed`` is closed with 1008;
- ``register`` opens a :class:`~proxycore.tunnel.sessions.Session` (a gateway-made id,
  answered by ``register_ack``; over ``max_sessions`` or ``max_sessions_per_owner``: an
  ``error`` then close 1013). A new registration replaces an older session of the same
  owner and server name (a reconnecting client's old socket may not be dead yet);
- ``heartbeat`` is answered at once, and the gateway sends its own every
  ``heartbeat_interval``; no frame at all for ``heartbeat_timeout`` closes with 1001;
- ``response`` and ``notification`` go to :meth:`Session.deliver` (the waiting caller, or
  the subscribers);
- ``unregister`` closes with 1000; malformed input gets an ``error`` frame and the session
  stays up;
- a graceful shutdown closes with 1001.

When the socket ends for any reason the session ends at once: pending callers fail with
``SessionClosed``, subscribers get ``closed``. One JSON line per session goes to the
``proxycore.access`` logger.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from typing import Final, Protocol

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, wrap_server_stream

from ..config import Tunnel
from ..observe.accesslog import ExchangeRecord, access_logger
from ..tunnel.protocol import (
    ClientMessage,
    Heartbeat,
    Notification,
    ProtocolError,
    Register,
    Response,
    Unregister,
    error_frame,
    heartbeat_frame,
    parse_client,
    register_ack_frame,
)
from ..tunnel.sessions import Caller, LimitReached, Registry, Session

__all__ = ["NORMAL", "POLICY", "TRY_AGAIN_LATER", "DrainSignal", "serve_session"]

log: Final = logging.getLogger("proxycore.tunnel")

NORMAL, GOING_AWAY, POLICY, TRY_AGAIN_LATER = 1000, 1001, 1008, 1013
#: How long a closing handshake may take before the connection is cut.
CLOSE_TIMEOUT_S: Final = 5.0
#: trio-websocket's own limit is this many times ``max_message_bytes``: frames between
#: the two get an ``error`` frame, larger ones close the connection (1009).
HARD_LIMIT_FACTOR: Final = 4


class DrainSignal(Protocol):
    """The server's graceful-shutdown signal (``ProxyState`` is one)."""

    @property
    def draining(self) -> bool: ...

    @property
    def idle_waits(self) -> set[trio.CancelScope]: ...


def allowed(settings: Tunnel, caller: Caller) -> bool:
    """May ``caller`` open a session? ``allowed`` empty: everyone the listener admitted."""
    return not settings.allowed or caller.identity in settings.allowed


async def serve_session(
    stream: trio.abc.Stream,
    registry: Registry,
    caller: Caller,
    *,
    record: ExchangeRecord,
    drain: DrainSignal | None = None,
) -> bool:
    """Accept the upgrade on ``stream`` and run the session to its end; True if the
    client got its 101 (False: trio-websocket refused the handshake, nothing sent but
    its own 400). Raises what trio-websocket raises on a malformed handshake (the
    exchange checked it first). Writes only the lent ``record`` (status, outcome, bytes)."""
    settings = registry.settings
    async with trio.open_nursery() as nursery:
        request = await wrap_server_stream(
            nursery,
            stream,
            message_queue_size=1,
            max_message_size=HARD_LIMIT_FACTOR * settings.max_message_bytes,
        )
        try:
            ws = await request.accept()
        except ConnectionClosed:
            record.status, record.outcome = 499, "client_gone"
            nursery.cancel_scope.cancel()
            return False
        record.status = 101
        run = _Run(ws, registry, caller, record)
        if not allowed(settings, caller):
            run.outcome = "tunnel_not_allowed"
            await run.close(POLICY, "not allowed to open a tunnel")
        else:
            await run.serve(drain)
        run.log()
        nursery.cancel_scope.cancel()
    return True


class _Run:
    """One accepted socket: its session (after ``register``), timers and log line."""

    def __init__(
        self, ws: WebSocketConnection, registry: Registry, caller: Caller, record: ExchangeRecord
    ) -> None:
        self.ws, self.registry, self.caller, self.record = ws, registry, caller, record
        self.settings = registry.settings
        self.session: Session | None = None
        self.outcome, self.close_code = "", 0
        self.deadline = math.inf  # silence deadline (trio time)
        self.started = trio.current_time()
        self.messages, self.sizes = [0, 0], [0, 0]  # [from client, to client]
        self.done = trio.Event()

    # -- sending -------------------------------------------------------------------------

    async def send(self, frame: str) -> None:
        """One frame to the client; a closed socket is ``ClosedResourceError``."""
        try:
            await self.ws.send_message(frame)
        except ConnectionClosed as exc:
            raise trio.ClosedResourceError("tunnel socket closed") from exc
        self.messages[1] += 1
        self.sizes[1] += len(frame)

    async def reply(self, frame: str) -> None:
        """A frame of the gateway's own: a closed socket is left to the reader to notice."""
        with contextlib.suppress(trio.ClosedResourceError, trio.BrokenResourceError):
            await self.send(frame)

    async def close(self, code: int, reason: str = "") -> None:
        """Close the socket (at most ``CLOSE_TIMEOUT_S`` for the handshake)."""
        if not self.close_code:
            self.close_code = code
        if self.session is not None:
            self.session.end(self.outcome or "closed")  # pending callers fail now
        with trio.move_on_after(CLOSE_TIMEOUT_S) as timer:
            timer.shield = True  # a cancelled caller still closes properly
            with contextlib.suppress(ConnectionClosed, trio.BrokenResourceError):
                await self.ws.aclose(code, reason)
        self.done.set()

    async def close_session(self, code: int, reason: str) -> None:
        """``Session.close`` from an HTTP caller."""
        if not self.outcome:
            self.outcome = "tunnel_closed_by_api"
        await self.close(code, reason)

    # -- the session ---------------------------------------------------------------------

    async def serve(self, drain: DrainSignal | None) -> None:
        self.deadline = trio.current_time() + self.settings.heartbeat_timeout
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.timers, drain)
                nursery.start_soon(self.read)
                await self.done.wait()
                nursery.cancel_scope.cancel()
        finally:
            if self.session is not None:
                self.session.end(self.outcome or "closed")

    async def read(self) -> None:
        while True:
            try:
                frame = await self.ws.get_message()
            except ConnectionClosed as exc:
                code = exc.reason.code if exc.reason is not None else 1006
                if not self.outcome:
                    self.outcome = "tunnel_client_gone" if code == 1006 else "tunnel_closed"
                    self.close_code = code
                self.done.set()
                return
            self.messages[0] += 1
            self.sizes[0] += len(frame)
            self.deadline = trio.current_time() + self.settings.heartbeat_timeout
            try:
                message = parse_client(frame, self.settings.max_message_bytes)
            except ProtocolError as exc:
                await self.reply(error_frame(str(exc)))
                continue
            await self.handle(message)

    async def handle(self, message: ClientMessage) -> None:
        session = self.session
        if isinstance(message, Heartbeat):
            if session is not None:
                session.heartbeat()
            await self.reply(heartbeat_frame(session.id if session is not None else ""))
        elif isinstance(message, Register):
            await self.register(message)
        elif isinstance(message, Unregister):
            self.outcome = "tunnel_unregistered"
            await self.close(NORMAL, "unregistered")
        elif isinstance(message, Response | Notification):
            if session is None:
                await self.reply(error_frame("not registered: send 'register' first"))
            else:
                session.deliver(message.payload)

    async def register(self, message: Register) -> None:
        if self.session is not None:
            await self.reply(error_frame("already registered"))
            return
        owner = self.caller.identity
        for older in self.registry.same_name(owner, message.server_name):
            await older.close(NORMAL, "replaced by a new registration")
        try:
            session = self.registry.open(
                owner,
                message.server_name,
                description=message.description,
                protocol=message.protocol,
                send_frame=self.send,
                close_socket=self.close_session,
            )
        except LimitReached as exc:
            self.outcome = "tunnel_limit_reached"
            await self.reply(error_frame(str(exc)))
            await self.close(TRY_AGAIN_LATER, str(exc))
            return
        self.session = session
        self.record.upstream = f"tunnel:{session.id}"
        session.publish("events", "connected", {"sessionId": session.id})
        await self.reply(register_ack_frame(session.id))
        session.publish("events", "registered", session.as_dict())
        log.info("tunnel session %s registered (%s)", session.id, message.server_name)

    async def timers(self, drain: DrainSignal | None) -> None:
        """Heartbeats every ``heartbeat_interval``; the silence deadline; shutdown."""
        interval = self.settings.heartbeat_interval
        beat = trio.current_time() + interval
        with trio.CancelScope() as scope:
            if drain is not None:
                drain.idle_waits.add(scope)
            try:
                while drain is None or not drain.draining:
                    await trio.sleep_until(min(beat, self.deadline))
                    now = trio.current_time()
                    if now >= self.deadline:
                        self.outcome = "tunnel_heartbeat_timeout"
                        await self.close(GOING_AWAY, "heartbeat timeout")
                        return
                    if now >= beat:
                        beat = now + interval
                        if self.session is not None:
                            await self.reply(heartbeat_frame(self.session.id))
            finally:
                if drain is not None:
                    drain.idle_waits.discard(scope)
        self.outcome = "tunnel_shutdown"
        await self.close(GOING_AWAY, "server shutting down")

    def log(self) -> None:
        rec, session = self.record, self.session
        rec.bytes_in, rec.bytes_out = self.sizes
        rec.outcome = self.outcome or "tunnel_closed"
        if access_logger.isEnabledFor(logging.INFO):
            line = {
                "time": round(time.time(), 6),
                "pid": os.getpid(),
                "type": "tunnel_session",
                "request_id": rec.request_id,
                "client": rec.client,
                "route": rec.route,
                "session_id": session.id if session is not None else "",
                "server_name": session.server_name if session is not None else "",
                "owner": self.caller.identity,
                "duration_ms": round((trio.current_time() - self.started) * 1000, 3),
                "messages_in": self.messages[0],
                "messages_out": self.messages[1],
                "bytes_in": self.sizes[0],
                "bytes_out": self.sizes[1],
                "close_code": self.close_code,
                "outcome": rec.outcome,
            }
            access_logger.info(json.dumps(line, separators=(",", ":")))
