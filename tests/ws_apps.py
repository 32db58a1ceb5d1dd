"""WebSocket upstreams for ``tests/e2e/test_websocket.py``.

* ASGI apps, served with ``tests.helpers.start_app`` (hypercorn): ``ws_echo_app`` (echo, and
  commands: close with a code, send a big message), ``make_ws_headers_app`` (reports the
  handshake it got, picks a subprotocol), ``auth_app`` (a forward-auth service).
* :class:`WsUpstream`, a trio-websocket server, where the test must see what the upstream
  saw on close: hypercorn tells an ASGI app only 1000 or 1006 on disconnect, never the
  peer's code or reason. It also has no timers of its own, so the timer tests use it.
* Raw upstreams (``tests.helpers.start_raw_server``): :func:`make_refusing_upstream` answers
  the upgrade with 403 and a body; :func:`die_after_handshake` accepts, sends one message,
  and drops the connection without a close frame.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Awaitable, Callable
from typing import Final

import trio
from trio_websocket import (
    CloseReason,
    ConnectionClosed,
    WebSocketConnection,
    WebSocketRequest,
    wrap_server_stream,
)

from proxycore.tools.sim import ASGIApp, Receive, Scope, Send
from tests.helpers import read_until, start_raw_server

__all__ = [
    "WsUpstream",
    "accept_token",
    "auth_app",
    "bad_accept_upstream",
    "die_after_handshake",
    "make_refusing_upstream",
    "make_ws_headers_app",
    "server_frame",
    "ws_echo_app",
]

_GUID: Final = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def _not_websocket(scope: Scope, receive: Receive, send: Send) -> bool:
    """Handle lifespan, answer plain HTTP with 404. True if the scope was not a websocket."""
    if scope["type"] == "lifespan":
        await _lifespan(receive, send)
        return True
    if scope["type"] == "http":
        await send({"type": "http.response.start", "status": 404, "headers": []})
        await send({"type": "http.response.body", "body": b""})
        return True
    return False


async def _echo(receive: Receive, send: Send) -> None:
    """Echo text as text and bytes as bytes, with two text commands.

    ``close:<code>:<reason>`` closes with that code and reason; ``big:<n>`` sends ``n`` bytes.
    """
    while True:
        event = await receive()
        if event["type"] == "websocket.disconnect":
            return
        text, data = event.get("text"), event.get("bytes")
        if text is not None and text.startswith("close:"):
            _, code, reason = text.split(":", 2)
            await send({"type": "websocket.close", "code": int(code), "reason": reason})
            return
        if text is not None and text.startswith("big:"):
            await send({"type": "websocket.send", "bytes": b"x" * int(text[4:])})
        elif text is not None:
            await send({"type": "websocket.send", "text": text})
        else:
            await send({"type": "websocket.send", "bytes": data})


async def ws_echo_app(scope: Scope, receive: Receive, send: Send) -> None:
    if await _not_websocket(scope, receive, send):
        return
    await receive()  # websocket.connect
    await send({"type": "websocket.accept"})
    await _echo(receive, send)


def make_ws_headers_app(prefer: tuple[str, ...] = ()) -> ASGIApp:
    """Accept with the first of ``prefer`` the client offered; first message: the handshake.

    The message is JSON: ``{"path", "query", "headers": [[name, value], ...],
    "subprotocols": [...]}``. The 101 carries ``Set-Cookie: ws=1``. Then echoes.
    """

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if await _not_websocket(scope, receive, send):
            return
        await receive()
        offered: list[str] = list(scope["subprotocols"])
        chosen = next((p for p in prefer if p in offered), None)
        await send(
            {
                "type": "websocket.accept",
                "subprotocol": chosen,
                "headers": [(b"set-cookie", b"ws=1")],
            }
        )
        report = {
            "path": scope["path"],
            "query": scope["query_string"].decode("latin-1"),
            "headers": [[n.decode("latin-1"), v.decode("latin-1")] for n, v in scope["headers"]],
            "subprotocols": offered,
        }
        await send({"type": "websocket.send", "text": json.dumps(report)})
        await _echo(receive, send)

    return app


async def auth_app(scope: Scope, receive: Receive, send: Send) -> None:
    """Forward auth: ``Authorization: Bearer good`` is ``X-User: alice``; anything else 401."""
    if scope["type"] == "lifespan":
        await _lifespan(receive, send)
        return
    headers = dict(scope["headers"])
    ok = headers.get(b"authorization") == b"Bearer good"
    extra = [(b"x-user", b"alice")] if ok else []
    await send({"type": "http.response.start", "status": 200 if ok else 401, "headers": extra})
    await send({"type": "http.response.body", "body": b""})


class WsUpstream:
    """A trio-websocket upstream that echoes (or runs ``on_open``) and records each session.

    ``closes`` gets the :class:`CloseReason` the upstream saw per session (None if the
    connection ended without one); ``closed`` is set after each. ``read_delay`` sleeps
    before each message is handled (a slow reader: with ``message_queue_size=1`` it stops
    reading the socket meanwhile).
    """

    def __init__(
        self,
        *,
        read_delay: float = 0.0,
        echo: bool = True,
        on_open: Callable[[WebSocketConnection], Awaitable[None]] | None = None,
    ) -> None:
        self.read_delay = read_delay
        self.echo = echo
        self.on_open = on_open
        self.sessions = 0
        self.received = 0
        self.headers: list[list[tuple[bytes, bytes]]] = []
        self.closes: list[CloseReason | None] = []
        self.closed = trio.Event()

    async def start(self, nursery: trio.Nursery) -> int:
        """Serve on 127.0.0.1 (free port) until ``nursery`` is cancelled; the port.

        Each connection's stream is closed after its session by ``start_raw_server``
        (trio-websocket's own server leaves it open when the peer vanished).
        """
        return await start_raw_server(nursery, self._serve)

    async def _serve(self, stream: trio.SocketStream) -> None:
        async with trio.open_nursery() as nursery:
            request = await wrap_server_stream(
                nursery,
                stream,
                message_queue_size=1,
                max_message_size=64 * 1024 * 1024,
                receive_buffer_size=65536,
            )
            await self.handler(request)
            nursery.cancel_scope.cancel()

    async def handler(self, request: WebSocketRequest) -> None:
        self.sessions += 1
        self.headers.append(list(request.headers))
        ws = await request.accept()
        try:
            if self.on_open is not None:
                await self.on_open(ws)
            while True:
                message = await ws.get_message()
                if self.read_delay:
                    await trio.sleep(self.read_delay)
                self.received += len(message)
                if self.echo:
                    await ws.send_message(message)
        except ConnectionClosed as exc:
            self.closes.append(exc.reason)
            self.closed.set()


def make_refusing_upstream(
    connections: list[int], body: bytes = b"not allowed"
) -> Callable[[trio.SocketStream], Awaitable[None]]:
    """A raw handler answering any request with 403, ``X-Why: nope`` and ``body``.

    Appends to ``connections`` once per connection (so a test can count them).
    """

    async def handler(stream: trio.SocketStream) -> None:
        connections.append(1)
        await read_until(stream, b"\r\n\r\n")
        await stream.send_all(
            b"HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain\r\nX-Why: nope\r\n"
            b"Connection: close, X-Hop\r\nX-Hop: 1\r\nContent-Length: %d\r\n\r\n%s"
            % (len(body), body)
        )

    return handler


def accept_token(key: bytes) -> bytes:
    """``Sec-WebSocket-Accept`` for ``key`` (RFC 6455 section 4.2.2)."""
    return base64.b64encode(hashlib.sha1(key.strip() + _GUID).digest())


def server_frame(opcode: int, payload: bytes) -> bytes:
    """One unmasked final frame (as a server sends), payload under 126 bytes."""
    assert len(payload) < 126
    return bytes([0x80 | opcode, len(payload)]) + payload


async def die_after_handshake(stream: trio.SocketStream) -> None:
    """Raw upstream: 101, one text message ``hello``, then EOF without a close frame."""
    head = await read_until(stream, b"\r\n\r\n")
    key = next(
        line.split(b":", 1)[1]
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"sec-websocket-key:")
    )
    await stream.send_all(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + accept_token(key) + b"\r\n\r\n" + server_frame(0x1, b"hello")
    )
    await trio.sleep(0.05)


async def bad_accept_upstream(stream: trio.SocketStream) -> None:
    """Raw upstream: a 101 whose ``Sec-WebSocket-Accept`` is wrong."""
    await read_until(stream, b"\r\n\r\n")
    await stream.send_all(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + accept_token(b"not-the-key") + b"\r\n\r\n"
    )
    await trio.sleep(0.05)
