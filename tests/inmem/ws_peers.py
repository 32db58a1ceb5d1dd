"""The scripted peers of ``test_ws_dispatch.py``: an upgrade over trio memory streams.

:func:`upgrade` builds an :class:`UpgradeRequest` whose client is one end of a memory
stream pair (the test holds the other, the client's head in ``replay``). :class:`Upstream`
is a connector handing the proxy one end of another pair; the test's end runs a
:data:`Script`: raw bytes (:func:`raw_script`, :func:`accept_script`) or trio-websocket's
server side. :func:`run` drives ``relay_websocket`` against both and returns its result
(or error) and the lent access record. No sockets: ``autojump_clock`` is safe.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Final

import trio
import trio.testing

from proxycore.config import Route, Timeouts, WebSocketSettings
from proxycore.http.headers import Headers
from proxycore.http.router import Match
from proxycore.observe.accesslog import ExchangeRecord
from proxycore.proxy.websocket import relay_websocket
from proxycore.proxy.ws_handshake import (
    UpgradeRequest,
    UpgradeResult,
    UpstreamSocket,
)
from proxycore.security.admission import Admission

__all__ = [
    "CAP_S",
    "CONNECT_S",
    "HEAD",
    "KEY",
    "RID",
    "ROUTE",
    "Drain",
    "Script",
    "Upstream",
    "accept_script",
    "accept_token",
    "client_frame",
    "head_fields",
    "raw_script",
    "read_all",
    "read_head",
    "run",
    "server_frame",
    "upgrade",
]

KEY: Final = b"dGhlIHNhbXBsZSBub25jZQ=="
RID: Final = b"rid-ws-1"
HEAD: Final = (
    b"GET /ws/chat?room=1 HTTP/1.1\r\nHost: proxy.example\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\nSec-WebSocket-Key: " + KEY + b"\r\nSec-WebSocket-Version: 13\r\n"
    b"Sec-WebSocket-Protocol: chat.v2, chat.v1\r\nAuthorization: Bearer client\r\n"
    b"Cookie: c=1\r\n\r\n"
)
ROUTE: Final = Route(
    "/ws/",
    "http://up.example:8080/",
    name="chat",
    websocket=True,
    ws=WebSocketSettings(ping_interval=0),
)
CONNECT_S: Final = 7.0


def accept_token(key: bytes) -> bytes:
    return base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())


def head_fields(head: bytes) -> Headers:
    lines = head.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]
    return [(n.strip(), v.strip()) for n, v in (line.split(b":", 1) for line in lines)]


def client_frame(opcode: int, payload: bytes) -> bytes:
    """One final client frame, masked with the zero key (payload unchanged), < 126 bytes."""
    return bytes([0x80 | opcode, 0x80 | len(payload)]) + b"\0\0\0\0" + payload


def server_frame(opcode: int, payload: bytes) -> bytes:
    return bytes([0x80 | opcode, len(payload)]) + payload


@dataclass
class Drain:
    draining: bool = False
    idle_waits: set[trio.CancelScope] = field(default_factory=set)


@dataclass
class Upstream:
    """The scripted upstream: the connector hands the proxy one end of a memory pair."""

    opened: int = 0
    closed: int = 0
    ends: list[trio.abc.Stream] = field(default_factory=list)
    connected: trio.Event = field(default_factory=trio.Event)

    async def connect(self, up: UpgradeRequest) -> UpstreamSocket:
        proxy_end, test_end = trio.testing.memory_stream_pair()
        self.opened += 1
        self.ends.append(test_end)
        self.connected.set()

        def close() -> None:
            self.closed += 1

        return UpstreamSocket(proxy_end, close)


def upgrade(client: trio.abc.Stream, **changes: object) -> UpgradeRequest:
    up = UpgradeRequest(
        target=b"/ws/chat?room=1",
        headers=head_fields(HEAD),
        http_11=True,
        has_body=False,
        request_id=RID,
        forwarded_for=b"203.0.113.7",
        match=Match(ROUTE, b"/chat"),
        query=b"?room=1",
        admission=Admission(drop=frozenset({b"authorization"}), extra=[(b"X-User", b"alice")]),
        timeouts=Timeouts(connect=CONNECT_S, idle=60.0),
        client=client,
        replay=HEAD,
        drain=Drain(),
    )
    return replace(up, **changes)  # type: ignore[arg-type]


async def read_head(stream: trio.abc.ReceiveStream) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await stream.receive_some()
        assert chunk, f"EOF before the end of the head: {data!r}"
        data += chunk
    return data


async def read_all(stream: trio.abc.ReceiveStream, wait: float = 1.0) -> tuple[bytes, bool]:
    """What is there until the peer closes (True) or stays silent for ``wait`` s (False)."""
    data = b""
    while True:
        with trio.move_on_after(wait):
            chunk = await stream.receive_some()
            if not chunk:
                return data, True
            data += chunk
            continue
        return data, False


Script = Callable[[trio.abc.Stream], Awaitable[None]]
#: Bounds every test on the mock clock: a deadlock jumps here and fails.
CAP_S: Final = 600.0


async def run(
    up: UpgradeRequest,
    upstream: Upstream,
    script: Script,
    client: Callable[[], Awaitable[None]] | None = None,
) -> tuple[UpgradeResult | BaseException, ExchangeRecord]:
    """``relay_websocket`` against ``script`` (the test's end of the upstream pair) and
    ``client`` (the test's client side); both are cancelled when the upgrade returns."""
    record = ExchangeRecord(request_id=RID.decode(), started=trio.current_time())
    outcome: list[UpgradeResult | BaseException] = []

    async def upstream_side() -> None:
        await upstream.connected.wait()
        await script(upstream.ends[0])

    with trio.fail_after(CAP_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(upstream_side)
            if client is not None:
                nursery.start_soon(client)
            try:
                outcome.append(await relay_websocket(up, record, connect=upstream.connect))
            except Exception as exc:
                outcome.append(exc)
            nursery.cancel_scope.cancel()
    return outcome[0], record


def accept_script(seen: list[bytes], extra: bytes = b"") -> Script:
    async def script(stream: trio.abc.Stream) -> None:
        head = await read_head(stream)
        seen.append(head)
        key = next(v for n, v in head_fields(head) if n.lower() == b"sec-websocket-key")
        await stream.send_all(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + accept_token(key) + b"\r\n" + extra + b"\r\n"
        )
        await trio.sleep_forever()

    return script


def raw_script(reply: bytes, *, close: bool = False) -> Script:
    async def script(stream: trio.abc.Stream) -> None:
        await read_head(stream)
        if reply:
            await stream.send_all(reply)
        if close:
            await stream.aclose()
        await trio.sleep_forever()

    return script
