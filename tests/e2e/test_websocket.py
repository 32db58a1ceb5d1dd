"""WebSocket proxying end to end (``proxycore/proxy/websocket.py``).

Real sockets on 127.0.0.1. Upstreams: hypercorn ASGI apps (``tests/ws_apps.py``) where the
messages and the handshake the upstream got matter; a trio-websocket server
(``WsUpstream``) where the close code the upstream saw matters (hypercorn doesn't tell its
app); raw sockets for refusals, abrupt deaths and counting connections. Clients:
trio-websocket, or a raw socket with a tiny frame codec where the test must control or
see frames.

Clock: always the real one. The timer tests scale the timers down to tenths of a second
and assert elapsed times only from below, measured from before the handshake (a timer
never fires early); ``autojump_clock`` with real sockets jumps while bytes are in flight.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import tracemalloc
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Final

import pytest
import trio
import trustme
from trio_websocket import ConnectionClosed, WebSocketConnection, wrap_client_stream

from proxycore import Config, Inject, Route, ServerSettings, Timeouts, serve
from proxycore.config import Inbound, WebSocketSettings
from proxycore.ops.server import Server
from proxycore.security.secrets import generate_secret
from tests.e2e.test_tls import serve_tls_app, write_ca, write_cert
from tests.helpers import read_http_response, read_until, start_app, start_raw_server
from tests.ws_apps import (
    WsUpstream,
    auth_app,
    bad_accept_upstream,
    die_after_handshake,
    make_refusing_upstream,
    make_ws_headers_app,
    ws_echo_app,
)

#: Real-clock cap per test.
CAP: Final = 10.0
#: The proxy's wait for a closing handshake the peer never answers (``CLOSE_TIMEOUT_S``).
CLOSE_WAIT: Final = 5.0
TOKEN: Final = "tok-WS-UPSTREAM-5ecret-0123456789"
HANDSHAKE: Final = (
    b"GET %s HTTP/1.1\r\nHost: proxy\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n%s\r\n"
)

Headers = list[tuple[bytes, bytes]]


# --------------------------------------------------------------------------- helpers


def ws_route(port: int, prefix: str = "/ws/", **kw: Any) -> Route:
    return Route(prefix=prefix, upstream=f"http://127.0.0.1:{port}/", websocket=True, **kw)


async def start(
    nursery: trio.Nursery, routes: Sequence[Route], *, inbound: Inbound | None = None
) -> tuple[str, int]:
    config = Config(
        routes=tuple(routes),
        server=ServerSettings(listen=("127.0.0.1:0",)),
        inbound=inbound or Inbound(),
    )
    addresses: list[tuple[str, int]] = await nursery.start(serve, config)
    return addresses[0]


class WsClient:
    """``async with WsClient(nursery, proxy, path) as ws``: a trio-websocket client.

    Built on a stream of our own, closed on exit: trio-websocket's client leaves its socket
    open when the server closed first (it waits for the server's TCP close, and its
    ``aclose`` is then a no-op), which the proxy does in half of these tests.
    """

    def __init__(
        self,
        nursery: trio.Nursery,
        proxy: tuple[str, int],
        path: str = "/ws/x",
        *,
        subprotocols: Iterable[str] = (),
        extra_headers: Headers | None = None,
        max_message_size: int = 1 << 24,
    ) -> None:
        self.nursery, self.proxy, self.path = nursery, proxy, path
        self.subprotocols, self.extra_headers = list(subprotocols), extra_headers
        self.max_message_size = max_message_size

    async def __aenter__(self) -> WebSocketConnection:
        self.stream = await trio.open_tcp_stream(*self.proxy)
        self.ws = await wrap_client_stream(
            self.nursery,
            self.stream,
            "proxy",
            self.path,
            subprotocols=self.subprotocols,
            extra_headers=self.extra_headers,
            message_queue_size=1,
            max_message_size=self.max_message_size,
        )
        return self.ws

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        with trio.move_on_after(5):
            await self.ws.aclose()
        await trio.aclose_forcefully(self.stream)


async def http_handshake(
    proxy: tuple[str, int], path: bytes, extra: bytes = b""
) -> tuple[int, Headers, bytes]:
    """A handshake by hand that gets a plain HTTP answer: ``(status, headers, body)``."""
    async with await trio.open_tcp_stream(*proxy) as stream:
        await stream.send_all(HANDSHAKE % (path, extra))
        return await read_http_response(stream)


async def raw_handshake(
    proxy: tuple[str, int], path: bytes = b"/ws/x", extra: bytes = b""
) -> tuple[trio.SocketStream, bytes, bytes]:
    """Send a handshake by hand: the stream, the response head, and bytes read past it."""
    stream = await trio.open_tcp_stream(*proxy)
    await stream.send_all(HANDSHAKE % (path, extra))
    got = await read_until(stream, b"\r\n\r\n")
    end = got.index(b"\r\n\r\n") + 4
    return stream, got[:end], got[end:]


def client_frame(opcode: int, payload: bytes, *, fin: bool = True) -> bytes:
    """A client frame: masked (zero key, so the payload reads as is), any length."""
    n = len(payload)
    first = bytes([(0x80 if fin else 0) | opcode])
    if n < 126:
        size = bytes([0x80 | n])
    elif n < 65536:
        size = bytes([0x80 | 126]) + n.to_bytes(2, "big")
    else:
        size = bytes([0x80 | 127]) + n.to_bytes(8, "big")
    return first + size + b"\0\0\0\0" + payload


class FrameReader:
    """Reads the proxy's (unmasked) frames off a raw stream."""

    def __init__(self, stream: trio.SocketStream, buffered: bytes = b"") -> None:
        self.stream = stream
        self.buf = bytearray(buffered)

    async def _need(self, n: int) -> None:
        while len(self.buf) < n:
            data = await self.stream.receive_some(65536)
            if not data:
                raise EOFError
            self.buf += data

    async def frame(self) -> tuple[int, bool, bytes]:
        """``(opcode, fin, payload)``; EOFError when the connection ends."""
        await self._need(2)
        first, second = self.buf[0], self.buf[1]
        assert not second & 0x80, "server frames are never masked"
        n, offset = second & 0x7F, 2
        if n >= 126:
            offset = 4 if n == 126 else 10
            await self._need(offset)
            n = int.from_bytes(self.buf[2:offset], "big")
        await self._need(offset + n)
        payload = bytes(self.buf[offset : offset + n])
        del self.buf[: offset + n]
        return first & 0x0F, bool(first & 0x80), payload


def close_of(payload: bytes) -> tuple[int, str]:
    return int.from_bytes(payload[:2], "big"), payload[2:].decode()


async def closed_with(ws: WebSocketConnection) -> tuple[int, str | None]:
    """Wait for the proxy to close ``ws``: the code and reason it sent."""
    with pytest.raises(ConnectionClosed) as info:
        while True:
            await ws.get_message()
    reason = info.value.reason
    assert reason is not None
    return reason.code, reason.reason


class AccessLog(logging.Handler):
    """The ``proxycore.access`` lines of one test: exchanges, and websocket sessions."""

    def __init__(self) -> None:
        super().__init__()
        self.exchanges: list[dict[str, Any]] = []
        self.sessions: list[dict[str, Any]] = []
        self._more = trio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        line = json.loads(record.getMessage())
        (self.sessions if line.get("type") == "websocket" else self.exchanges).append(line)
        self._more.set()
        self._more = trio.Event()

    async def session(self) -> dict[str, Any]:
        """Wait for the (one) session line: the proxy logs it after both closes."""
        while not self.sessions:
            await self._more.wait()
        (line,) = self.sessions
        return line


@pytest.fixture
def access_log() -> Iterator[AccessLog]:
    logger = logging.getLogger("proxycore.access")
    handler, level = AccessLog(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


# --------------------------------------------------------------------------- messages


async def test_echo_text_and_binary_and_access_log(access_log: AccessLog) -> None:
    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            _, up = await start_app(nursery, ws_echo_app)
            proxy = await start(nursery, [ws_route(up)])
            async with WsClient(nursery, proxy) as ws:
                assert ws.subprotocol is None
                messages: list[str | bytes] = ["héllo", b"\x00\xffbin", "", b"", "x" * 70000]
                for message in messages:
                    await ws.send_message(message)
                    echoed = await ws.get_message()
                    assert echoed == message and type(echoed) is type(message)
                burst = [f"m{i}" if i % 2 else b"m%d" % i for i in range(50)]
                for message in burst:  # pipelined: all sent before any is read
                    await ws.send_message(message)
                assert [await ws.get_message() for _ in burst] == burst  # in order, typed
                await ws.aclose(1000, "done")
            line = await access_log.session()
            nursery.cancel_scope.cancel()
    assert line["messages_in"] == line["messages_out"] == 55
    burst_bytes = sum(len(f"m{i}") for i in range(50))
    assert line["bytes_in"] == line["bytes_out"] == len("héllo".encode()) + 5 + 70000 + burst_bytes
    assert (line["client_close_code"], line["upstream_close_code"]) == (1000, 1000)
    assert line["route"] == "/ws/" and line["request_id"] and line["duration_ms"] > 0
    (record,) = access_log.exchanges
    assert record["status"] == 101 and record["outcome"] == "websocket_closed"
    assert record["bytes_in"] == line["bytes_in"] and record["request_id"] == line["request_id"]


async def test_large_fragmented_message_arrives_whole() -> None:
    size, piece = 1 << 20, 64 * 1024
    data = os.urandom(size)
    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            _, up = await start_app(nursery, ws_echo_app)
            proxy = await start(nursery, [ws_route(up)])
            stream, head, rest = await raw_handshake(proxy)
            assert head.startswith(b"HTTP/1.1 101 ")
            for i in range(0, size, piece):
                opcode = 0x2 if i == 0 else 0x0
                await stream.send_all(
                    client_frame(opcode, data[i : i + piece], fin=i + piece >= size)
                )
            await stream.send_all(client_frame(0x1, b"after"))
            frames = FrameReader(stream, rest)
            got = bytearray()
            opcode, fin, payload = await frames.frame()
            assert opcode == 0x2
            got += payload
            while not fin:
                opcode, fin, payload = await frames.frame()
                assert opcode == 0x0
                got += payload
            assert got == data  # one message, whole: the next one is the text that followed
            assert await frames.frame() == (0x1, True, b"after")
            await stream.aclose()
            nursery.cancel_scope.cancel()


async def test_message_over_the_limit_is_closed_with_1009_both_ways() -> None:
    limit = 64 * 1024
    settings = WebSocketSettings(max_message_bytes=limit)
    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            _, up = await start_app(nursery, ws_echo_app)
            proxy = await start(nursery, [ws_route(up, ws=settings)])
            async with WsClient(nursery, proxy) as ws:
                await ws.send_message(b"y" * limit)  # at the limit: fine
                assert await ws.get_message() == b"y" * limit
                await ws.send_message(b"y" * (limit + 1))
                code, reason = await closed_with(ws)
                assert code == 1009 and reason is not None and str(limit) in reason
            async with WsClient(nursery, proxy) as ws:  # the upstream sends too much
                await ws.send_message(f"big:{limit + 1}")
                code, reason = await closed_with(ws)
                assert code == 1009 and reason is not None and str(limit) in reason
            nursery.cancel_scope.cancel()


# --------------------------------------------------------------------------- closing


async def test_close_codes_and_reasons_pass_through_both_ways() -> None:
    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            _, echo = await start_app(nursery, ws_echo_app)
            recorder = WsUpstream()
            up = await recorder.start(nursery)
            proxy = await start(nursery, [ws_route(echo), ws_route(up, prefix="/rec/")])
            async with WsClient(nursery, proxy) as ws:
                await ws.send_message("close:4002:later, maybe")
                assert await closed_with(ws) == (4002, "later, maybe")
            async with WsClient(nursery, proxy, "/rec/x") as ws:
                await ws.send_message("hi")
                assert await ws.get_message() == "hi"
                await ws.aclose(4001, "bye")
            await recorder.closed.wait()
            (reason,) = recorder.closes
            assert reason is not None and (reason.code, reason.reason) == (4001, "bye")
            nursery.cancel_scope.cancel()


async def test_abrupt_upstream_death_closes_the_client_with_1011(
    access_log: AccessLog,
) -> None:
    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            up = await start_raw_server(nursery, die_after_handshake)
            proxy = await start(nursery, [ws_route(up)])
            async with WsClient(nursery, proxy) as ws:
                assert await ws.get_message() == "hello"
                assert (await closed_with(ws))[0] == 1011
            line = await access_log.session()
            nursery.cancel_scope.cancel()
    assert (line["client_close_code"], line["upstream_close_code"]) == (1011, 1006)
    assert line["outcome"] == "websocket_upstream_lost"


async def test_abrupt_client_death_closes_the_upstream_with_1001() -> None:
    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            recorder = WsUpstream()
            up = await recorder.start(nursery)
            proxy = await start(nursery, [ws_route(up)])
            stream, head, _ = await raw_handshake(proxy)
            assert head.startswith(b"HTTP/1.1 101 ")
            sock = stream.socket
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
            await stream.aclose()  # SO_LINGER 0: a TCP reset, no close frame
            await recorder.closed.wait()
            (reason,) = recorder.closes
            assert reason is not None and reason.code == 1001
            nursery.cancel_scope.cancel()


# --------------------------------------------------------------------------- handshake


async def test_subprotocol_headers_and_no_extensions(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PC_WS_KEY", TOKEN)
    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            _, up = await start_app(nursery, make_ws_headers_app(prefer=("chat.v1", "chat.v2")))
            _, auth = await start_app(nursery, auth_app)
            inbound = Inbound(
                mode="forward_auth",
                url=f"http://127.0.0.1:{auth}/auth",
                identity_headers=(("X-User", "X-Authenticated-User"),),
            )
            route = ws_route(up, inject=Inject(header="x-api-key", token_env="PC_WS_KEY"))
            proxy = await start(nursery, [route], inbound=inbound)
            headers = [
                (b"Authorization", b"Bearer good"),
                (b"X-Authenticated-User", b"mallory"),
                (b"X-Api-Key", b"client-copy"),
                (b"Sec-WebSocket-Extensions", b"permessage-deflate"),
                (b"Cookie", b"c=1"),
            ]
            async with WsClient(
                nursery,
                proxy,
                "/ws/chat?room=1",
                subprotocols=["chat.v2", "chat.v1"],
                extra_headers=headers,
            ) as ws:
                assert ws.subprotocol == "chat.v1"  # the upstream's choice (not the client's first)
                sent = dict(ws.handshake_headers)
                assert sent[b"set-cookie"] == b"ws=1" and sent[b"x-request-id"]
                assert b"sec-websocket-extensions" not in sent
                report = json.loads(await ws.get_message())
            nursery.cancel_scope.cancel()
    assert report["path"] == "/chat" and report["query"] == "room=1"
    assert report["subprotocols"] == ["chat.v2", "chat.v1"]
    got: dict[str, list[str]] = {}
    for name, value in report["headers"]:
        got.setdefault(name.lower(), []).append(value)
    assert got["x-api-key"] == [TOKEN]
    assert got["x-authenticated-user"] == ["alice"]
    assert "authorization" not in got and "sec-websocket-extensions" not in got
    assert got["cookie"] == ["c=1"] and got["x-forwarded-for"] == ["127.0.0.1"]
    assert got["x-request-id"] == [sent[b"x-request-id"].decode()]
    assert got["host"] == [f"127.0.0.1:{up}"] and len(got["sec-websocket-key"]) == 1


async def test_inbound_auth_refused_before_any_upstream_connection(tmp_path: Path) -> None:
    secret_file = tmp_path / "inbound.secret"
    generate_secret(str(secret_file))
    secret = secret_file.read_text().strip()
    connections: list[int] = []
    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            counted = await start_raw_server(nursery, make_refusing_upstream(connections))
            _, up = await start_app(nursery, make_ws_headers_app())
            inbound = Inbound(mode="bearer", secret_file=str(secret_file))
            routes = [ws_route(counted), ws_route(up, prefix="/ok/")]
            proxy = await start(nursery, routes, inbound=inbound)
            for extra in (b"", b"Authorization: Bearer wrong-wrong-wrong-wrong-wrong\r\n"):
                status, _, body = await http_handshake(proxy, b"/ws/x", extra)
                assert status == 401 and json.loads(body)["error"]["type"] == "unauthorized"
            assert connections == []
            auth = [(b"Authorization", f"Bearer {secret}".encode())]
            async with WsClient(nursery, proxy, "/ok/", extra_headers=auth) as ws:
                report = json.loads(await ws.get_message())
            assert not [v for n, v in report["headers"] if n.lower() == "authorization"]
            nursery.cancel_scope.cancel()


async def test_upstream_refusal_is_relayed_and_nothing_tunnelled() -> None:
    connections: list[int] = []
    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            up = await start_raw_server(nursery, make_refusing_upstream(connections))
            proxy = await start(nursery, [ws_route(up)])
            async with await trio.open_tcp_stream(*proxy) as stream:
                await stream.send_all(HANDSHAKE % (b"/ws/x", b"X-Request-ID: ws-req-1\r\n"))
                status, headers, body = await read_http_response(stream)
                assert (status, body) == (403, b"not allowed")
                got = dict(headers)
                assert got[b"x-why"] == b"nope" and got[b"x-request-id"] == b"ws-req-1"
                assert got[b"connection"] == b"close" and b"x-hop" not in got
                await stream.send_all(client_frame(0x1, b"tunnel?"))
                assert await stream.receive_some(4096) == b""  # closed; nothing after the 403
            assert connections == [1]
            nursery.cancel_scope.cancel()


async def test_refusals_before_the_upstream() -> None:
    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            _, up = await start_app(nursery, ws_echo_app)
            plain = Route(prefix="/plain/", upstream=f"http://127.0.0.1:{up}/")
            closed_port = ws_route(9, prefix="/down/", timeouts=Timeouts(connect=2))
            bad = await start_raw_server(nursery, bad_accept_upstream)
            proxy = await start(nursery, [ws_route(up), plain, closed_port, ws_route(bad, "/bad/")])
            for path, status, kind in [
                (b"/plain/x", 400, "bad_request"),  # not a websocket route
                (b"/down/x", 502, "upstream_unreachable"),
                (b"/bad/x", 502, "upstream_protocol_error"),  # a wrong Sec-WebSocket-Accept
            ]:
                got, _, body = await http_handshake(proxy, path)
                assert (got, json.loads(body)["error"]["type"]) == (status, kind)
            old = b"Sec-WebSocket-Version: 8\r\n"  # a second version header: the last counts
            status, headers, _ = await http_handshake(proxy, b"/ws/x", old)
            assert status == 426 and (b"sec-websocket-version", b"13") in headers
            nursery.cancel_scope.cancel()


async def test_wss_upstream_checks_the_certificate(tmp_path: Path) -> None:
    ca, other = trustme.CA(), trustme.CA()
    pem = write_cert(tmp_path, ca, "localhost")
    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(serve_tls_app, ws_echo_app, pem)
            upstream = f"https://localhost:{port}/"
            good = Route("/ws/", upstream, websocket=True, ca_file=str(write_ca(tmp_path, ca)))
            wrong_ca = str(write_ca(tmp_path, other, "other.pem"))
            wrong = Route("/wrong/", upstream, websocket=True, ca_file=wrong_ca)
            proxy = await start(nursery, [good, wrong])
            async with WsClient(nursery, proxy) as ws:
                await ws.send_message("over tls")
                assert await ws.get_message() == "over tls"
            status, _, body = await http_handshake(proxy, b"/wrong/x")
            assert status == 502 and "TLS" in json.loads(body)["error"]["message"]
            nursery.cancel_scope.cancel()


async def test_graceful_shutdown_closes_sessions_with_1001() -> None:
    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            recorder = WsUpstream()
            up = await recorder.start(nursery)
            config = Config(
                routes=(ws_route(up),),
                server=ServerSettings(listen=("127.0.0.1:0",), shutdown_grace=30),
            )
            server = Server(config)
            proxy = (await nursery.start(server.run))[0]
            done = trio.Event()

            async def run_until_drained() -> None:
                async with WsClient(nursery, proxy) as ws:
                    await ws.send_message("x")
                    assert await ws.get_message() == "x"
                    server.shutdown()
                    assert await closed_with(ws) == (1001, "server shutting down")
                done.set()

            nursery.start_soon(run_until_drained)
            with trio.fail_after(5):  # well before shutdown_grace
                await done.wait()
                await recorder.closed.wait()
            (reason,) = recorder.closes
            assert reason is not None and reason.code == 1001
            nursery.cancel_scope.cancel()


# --------------------------------------------------------------------------- timers


async def test_ping_timeout_closes_both_sides(access_log: AccessLog) -> None:
    """A client that never answers: one ping at ``ping_interval``, the close (1001, ping
    timeout) ``ping_timeout`` later, the connection closed after the closing handshake's
    wait; the upstream gets 1001 too."""
    interval, timeout = 0.4, 0.2
    settings = WebSocketSettings(ping_interval=interval, ping_timeout=timeout)
    with trio.fail_after(CAP + CLOSE_WAIT):
        async with trio.open_nursery() as nursery:
            recorder = WsUpstream()
            up = await recorder.start(nursery)
            proxy = await start(nursery, [ws_route(up, ws=settings)])
            start_time = trio.current_time()
            stream, head, rest = await raw_handshake(proxy)
            assert head.startswith(b"HTTP/1.1 101 ")
            frames = FrameReader(stream, rest)
            seen: list[tuple[float, int, bytes]] = []
            async with stream:
                with pytest.raises(EOFError):
                    while True:  # read everything, never answer
                        opcode, _, payload = await frames.frame()
                        seen.append((trio.current_time() - start_time, opcode, payload))
            eof_at = trio.current_time() - start_time
            assert [op for _, op, _ in seen] == [0x9, 0x8]
            assert seen[0][0] >= interval
            assert seen[1][0] >= interval + timeout
            assert close_of(seen[1][2]) == (1001, "ping timeout")
            assert eof_at >= interval + timeout + CLOSE_WAIT  # after the closing handshake
            await recorder.closed.wait()
            (reason,) = recorder.closes
            assert reason is not None and reason.code == 1001
            line = await access_log.session()
            nursery.cancel_scope.cancel()
    assert line["outcome"] == "websocket_ping_timeout"
    assert (line["client_close_code"], line["upstream_close_code"]) == (1001, 1001)


async def test_lifetime_closes_both_with_1008() -> None:
    lifetime = 0.5
    settings = WebSocketSettings(ping_interval=30, max_lifetime=lifetime)
    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            recorder = WsUpstream()
            up = await recorder.start(nursery)
            proxy = await start(nursery, [ws_route(up, ws=settings)])
            opened = trio.current_time()
            async with WsClient(nursery, proxy) as ws:
                await ws.send_message("x")
                assert await ws.get_message() == "x"
                code, reason = await closed_with(ws)
                assert trio.current_time() - opened >= lifetime
            assert (code, reason) == (1008, "session lifetime exceeded, reconnect")
            await recorder.closed.wait()
            (up_reason,) = recorder.closes
            assert up_reason is not None and up_reason.code == 1008
            assert up_reason.reason == "session lifetime exceeded, reconnect"
            nursery.cancel_scope.cancel()


async def test_idle_closes_both_with_1001() -> None:
    """Pings and pongs every 0.2 s are not messages; a message half-way through ``idle``
    moves the deadline: the close comes no sooner than ``idle`` after that message."""
    idle = 1.0
    settings = WebSocketSettings(ping_interval=0.2)  # pongs are not messages
    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            recorder = WsUpstream()
            up = await recorder.start(nursery)
            route = ws_route(up, ws=settings, timeouts=Timeouts(idle=idle))
            proxy = await start(nursery, [route])
            async with WsClient(nursery, proxy) as ws:
                await trio.sleep(idle / 2)
                sent = trio.current_time()
                await ws.send_message("still here")  # moves the idle deadline
                assert await ws.get_message() == "still here"
                assert await closed_with(ws) == (1001, "idle timeout")
                assert trio.current_time() - sent >= idle
            await recorder.closed.wait()
            (reason,) = recorder.closes
            assert reason is not None and (reason.code, reason.reason) == (1001, "idle timeout")
            nursery.cancel_scope.cancel()


# --------------------------------------------------------------------------- backpressure


async def test_memory_stays_bounded_when_one_side_floods() -> None:
    """Each way, a side tries to push 64 MiB while the other reads slowly: memory stays flat.

    The bound: with ``message_queue_size=1`` on both connections the proxy holds, per
    direction, the message being reassembled by its reader, one queued message and the one
    being written (plus its frame copy): a handful of 256 KiB messages, whatever the volume.
    The test's own client and upstream (also ``message_queue_size=1``) add a few more.
    Beyond that the flooder is held back by TCP: kernel socket buffers (not seen by
    tracemalloc, which counts every Python allocation in this process) take some MiB, so
    it gets well short of 64 MiB; unbounded buffering would hold all it could send.
    """
    size, count = 256 * 1024, 256
    payload = b"z" * size
    sent = [0, 0]  # by the flooding client, by the flooding upstream

    async def flood(ws: WebSocketConnection, who: int) -> None:
        for _ in range(count):
            await ws.send_message(payload)
            sent[who] += 1

    async def upstream_flood(ws: WebSocketConnection) -> None:
        await flood(ws, 1)

    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            slow = WsUpstream(read_delay=0.05, echo=False)
            flooder = WsUpstream(on_open=upstream_flood, echo=False)
            slow_port, flood_port = await slow.start(nursery), await flooder.start(nursery)
            routes = [ws_route(slow_port), ws_route(flood_port, prefix="/flood/")]
            proxy = await start(nursery, routes)
            tracemalloc.start()
            try:
                base = tracemalloc.get_traced_memory()[0]
                async with (
                    WsClient(nursery, proxy) as up_ws,
                    WsClient(nursery, proxy, "/flood/x", max_message_size=size) as down_ws,
                ):
                    nursery.start_soon(flood, up_ws, 0)
                    read = 0
                    with trio.move_on_after(1.5):
                        while True:  # about 5 MiB/s, as the slow upstream reads
                            assert len(await down_ws.get_message()) == size
                            read += 1
                            await trio.sleep(0.05)
                    peak = tracemalloc.get_traced_memory()[1] - base
                    nursery.cancel_scope.cancel()
            finally:
                tracemalloc.stop()
    assert read > 5 and slow.received > 5 * size  # traffic flowed both ways ...
    assert max(sent) < count // 2  # ... but neither flooder got far ahead of its reader
    assert peak < 8 * 1024 * 1024, f"peak grew by {peak / 2**20:.1f} MiB"
