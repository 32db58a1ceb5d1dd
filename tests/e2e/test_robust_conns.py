"""Connections end correctly and every write has a bound (issue 12), on real sockets.

127.0.0.1, port 0, the real clock with short timeouts; no wall-clock upper bounds (each
test has a generous ``fail_after`` cap only so that a regression fails instead of hanging).

- a write cut mid-way (``RawStream.write_cut``) is never followed by more bytes, and the
  client connection is never reused after it;
- ``[timeouts] send``: a client that stops reading is cut (the upstream connection too);
- ``[timeouts] client_body``: a trickled upload gets 408;
- an upstream answering before the request body is complete: the client, still sending,
  can send on and read the answer (lingering close, no reset);
- https: a close-delimited body whose upstream closes without ``close_notify`` is a
  truncation (no last chunk); known-length bodies are unaffected;
- ``Upgrade: h2c`` (``curl --http2``) is served as HTTP/1.1, the offer dropped;
- a WebSocket refusal over 64 KiB is a 502, not buffered and relayed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Final

import pytest
import trio
import trustme
from trio_websocket import ConnectionClosed, wrap_client_stream

from proxycore import Config, Route, Timeouts
from proxycore.http.headers import without_h2c_offer
from proxycore.net.stream import RawStream, SendTimeout, StreamBroken
from proxycore.proxy import connection as connection_module
from proxycore.proxy.connection import ClientConnection
from proxycore.proxy.exchange import ExchangeOutcome
from proxycore.proxy.state import ProxyState
from tests.e2e.test_tls import write_ca
from tests.helpers import read_http_response, read_until, start_proxy, start_raw_server
from tests.ws_apps import accept_token, make_refusing_upstream

#: Real-clock cap per test (a regression hangs into it; nothing asserts speed).
CAP: Final = 15.0
SHORT: Final = 0.3
LAST_CHUNK: Final = b"0\r\n\r\n"

Headers = list[tuple[bytes, bytes]]


async def read_to_eof(stream: trio.abc.ReceiveStream) -> bytes:
    """Everything until the peer closes (or resets) the connection."""
    got = bytearray()
    try:
        while data := await stream.receive_some(65536):
            got += data
    except trio.BrokenResourceError:
        pass
    return bytes(got)


def error_type(body: bytes) -> str:
    kind = json.loads(body)["error"]["type"]
    assert isinstance(kind, str)
    return kind


# --------------------------------------------------------------------------- RawStream


def full_pair() -> tuple[socket.socket, socket.socket]:
    """A connected pair with small buffers (a write of a few MiB blocks)."""
    a, b = socket.socketpair()
    for s in (a, b):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
    return a, b


def drain(sock: socket.socket) -> int:
    sock.setblocking(False)
    n = 0
    try:
        while data := sock.recv(1 << 20):
            n += len(data)
    except BlockingIOError:
        pass
    return n


async def test_send_timeout_cuts_the_stream_and_refuses_every_later_write() -> None:
    a, b = full_pair()
    stream = RawStream(a, send_timeout=SHORT)
    with trio.fail_after(CAP), a, b:
        start = trio.current_time()
        with pytest.raises(SendTimeout):
            await stream.send_all(b"x" * (4 << 20))
        assert trio.current_time() - start >= SHORT
        assert stream.write_cut
        assert drain(b) > 0  # part of the write left: the peer holds a partial message
        with pytest.raises(StreamBroken, match="write cut"):
            await stream.send_all(b"0\r\n\r\n")  # however much room there is now
        assert drain(b) == 0


async def test_cancelled_mid_write_is_cut_before_any_byte_is_not() -> None:
    a, b = full_pair()
    stream = RawStream(a)  # no send bound: the caller's scope cancels
    with trio.fail_after(CAP), a, b:
        with trio.move_on_after(SHORT):
            await stream.send_all(b"x" * (4 << 20))
        assert stream.write_cut
    a, b = full_pair()
    stream = RawStream(a)
    with trio.fail_after(CAP), a, b:
        a.setblocking(False)
        try:
            while True:
                a.send(b"f" * 65536)  # fill the buffers behind the stream's back
        except BlockingIOError:
            pass
        with trio.move_on_after(SHORT):
            await stream.send_all(b"y" * 10)  # blocks at once: nothing of it left
        assert not stream.write_cut
        drain(b)
        await stream.send_all(b"z")  # still a clean stream


async def test_a_cut_client_connection_is_never_reused(monkeypatch: pytest.MonkeyPatch) -> None:
    """The keep-alive loop itself: even an exchange that says "reuse" ends the connection
    once its stream is cut (a partial write may sit in the client's buffer)."""
    runs: list[int] = []

    class CuttingExchange:
        def __init__(self, client: ClientConnection, *args: object) -> None:
            self.client = client

        async def run(self) -> ExchangeOutcome:
            runs.append(1)
            self.client.stream._cut = True  # what a cancelled partial write leaves
            return ExchangeOutcome(True, b"")

    monkeypatch.setattr(connection_module, "Exchange", CuttingExchange)
    a, b = socket.socketpair()
    state = ProxyState(Config(routes=(Route(prefix="/", upstream="http://127.0.0.1:9/"),)))
    conn = ClientConnection(a, "127.0.0.1", state)
    peer = trio.SocketStream(trio.socket.from_stdlib_socket(b))
    with trio.fail_after(CAP):
        await peer.send_all(b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\nGET /2 HTTP/1.1\r\nHost: x\r\n\r\n")
        await conn.serve()
        assert await read_to_eof(peer) == b""
    assert runs == [1]
    await peer.aclose()


# ------------------------------------------------------------------ send, through the proxy


async def test_a_client_that_stops_reading_is_cut_after_send(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``send`` (0.3 s) bounds a write to a client that reads nothing, under a 60 s
    ``idle``: the client connection is cut (no last chunk), the upstream's closed, and
    the access line counts exactly the body bytes the client got (a cut write's part
    that left included) and blames the client."""
    caplog.set_level(logging.INFO, logger="proxycore.access")
    upstream_done = trio.Event()

    async def endless(stream: trio.SocketStream) -> None:
        try:
            await read_until(stream, b"\r\n\r\n")
            await stream.send_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            while True:
                await stream.send_all(b"10000\r\n" + b"d" * 0x10000 + b"\r\n")
        finally:
            upstream_done.set()

    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            port = await start_raw_server(nursery, endless)
            host, pport = await start_proxy(
                nursery, f"http://127.0.0.1:{port}/", timeouts=Timeouts(send=SHORT, idle=60)
            )
            client = await trio.open_tcp_stream(host, pport)
            async with client:
                await client.send_all(b"GET /big HTTP/1.1\r\nHost: proxy\r\n\r\n")
                head = await read_until(client, b"\r\n\r\n")
                await upstream_done.wait()  # the proxy gave up: the upstream was closed
                got = await read_to_eof(client)  # what was in flight, then the cut
            body = head.partition(b"\r\n\r\n")[2] + got
            assert not body.endswith(LAST_CHUNK)
            nursery.cancel_scope.cancel()
    (line,) = [json.loads(r.getMessage()) for r in caplog.records if r.name == "proxycore.access"]
    assert (line["status"], line["outcome"]) == (200, "client_gone")
    assert line["bytes_out"] == len(body)


async def test_a_trickled_upload_gets_408_after_client_body() -> None:
    upstream_closed = trio.Event()

    async def upstream(stream: trio.SocketStream) -> None:
        try:
            await read_to_eof(stream)
        finally:
            upstream_closed.set()

    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            port = await start_raw_server(nursery, upstream)
            host, pport = await start_proxy(
                nursery, f"http://127.0.0.1:{port}/", timeouts=Timeouts(client_body=0.5)
            )
            async with await trio.open_tcp_stream(host, pport) as client:
                await client.send_all(
                    b"POST /up HTTP/1.1\r\nHost: proxy\r\nContent-Length: 10\r\n\r\na"
                )
                await trio.sleep(0.2)
                await client.send_all(b"b")  # a gap shorter than client_body: fine
                start = trio.current_time()
                status, _, body = await read_http_response(client, b"POST")
                assert (status, error_type(body)) == (408, "request_timeout")
                assert trio.current_time() - start >= 0.5
                await upstream_closed.wait()
            nursery.cancel_scope.cancel()


# --------------------------------------------------------------------------- early answer


async def test_early_answer_reaches_a_client_still_sending_its_body() -> None:
    """The upstream answers 413 after the head; the client goes on sending its body
    (as a client that writes the whole request before reading does), then reads. It must
    be able to: the proxy closes lingering (reads and drops), it doesn't reset."""
    early = (
        b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 8\r\nConnection: close\r\n\r\ntoo big!"
    )

    async def upstream(stream: trio.SocketStream) -> None:
        await read_until(stream, b"\r\n\r\n")
        await stream.send_all(early)

    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            port = await start_raw_server(nursery, upstream)
            host, pport = await start_proxy(nursery, f"http://127.0.0.1:{port}/")
            async with await trio.open_tcp_stream(host, pport) as client:
                size = 512 * 1024
                await client.send_all(
                    b"POST /up HTTP/1.1\r\nHost: proxy\r\nContent-Length: %d\r\n\r\n" % size
                )
                await trio.sleep(0.3)  # the answer is back and the exchange over by now
                for _ in range(size // 8192):
                    await client.send_all(b"u" * 8192)  # no reset: the proxy still reads
                status, headers, body = await read_http_response(client, b"POST")
                assert (status, body) == (413, b"too big!")
                assert (b"connection", b"close") in headers
                assert await read_to_eof(client) == b""
            nursery.cancel_scope.cancel()


# --------------------------------------------------------------------------- TLS close_notify


TLSHandler = Callable[[trio.SSLStream[trio.SocketStream]], Awaitable[None]]


async def serve_tls_raw(
    handler: TLSHandler,
    ca: trustme.CA,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(ctx)
    async with trio.open_nursery() as nursery:
        listeners: list[trio.SSLListener[trio.SocketStream]] = await nursery.start(
            partial(trio.serve_ssl_over_tcp, handler, 0, ctx, host="127.0.0.1")
        )
        transport = listeners[0].transport_listener
        assert isinstance(transport, trio.SocketListener)
        task_status.started(transport.socket.getsockname()[1])


def tls_upstream(response: bytes, *, close_notify: bool) -> TLSHandler:
    async def handler(stream: trio.SSLStream[trio.SocketStream]) -> None:
        try:
            data = b""
            while b"\r\n\r\n" not in data:
                more = await stream.receive_some(65536)
                if not more:
                    return
                data += more
            await stream.send_all(response)
            if close_notify:
                await stream.aclose()
            else:
                await stream.transport_stream.aclose()  # FIN without close_notify
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    return handler


@pytest.mark.parametrize("close_notify", [True, False], ids=["close_notify", "bare-fin"])
async def test_tls_close_delimited_body_without_close_notify_is_a_truncation(
    tmp_path: Path, close_notify: bool
) -> None:
    ca = trustme.CA()
    ca_file = write_ca(tmp_path, ca)
    up = tls_upstream(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nhello", close_notify=close_notify
    )
    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            port: int = await nursery.start(serve_tls_raw, up, ca)
            route = Route("/", f"https://localhost:{port}/", ca_file=str(ca_file))
            host, pport = await start_proxy(nursery, [route])
            async with await trio.open_tcp_stream(host, pport) as client:
                await client.send_all(b"GET / HTTP/1.1\r\nHost: proxy\r\n\r\n")
                got = b""
                while not got.endswith(LAST_CHUNK):  # the end, or the proxy's cut (EOF)
                    more = await client.receive_some(65536)
                    if not more:
                        break
                    got += more
            nursery.cancel_scope.cancel()
    head, _, body = got.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"transfer-encoding: chunked" in head.lower()
    if close_notify:
        assert body == b"5\r\nhello\r\n" + LAST_CHUNK
    else:
        assert body == b"5\r\nhello\r\n"  # cut: a client sees a truncated body


async def test_tls_known_length_body_without_close_notify_is_complete(tmp_path: Path) -> None:
    ca = trustme.CA()
    ca_file = write_ca(tmp_path, ca)
    up = tls_upstream(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", close_notify=False)
    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            port: int = await nursery.start(serve_tls_raw, up, ca)
            route = Route("/", f"https://localhost:{port}/", ca_file=str(ca_file))
            host, pport = await start_proxy(nursery, [route])
            async with await trio.open_tcp_stream(host, pport) as client:
                for _ in range(2):  # the second request: the pool drops the dead connection
                    await client.send_all(b"GET / HTTP/1.1\r\nHost: proxy\r\n\r\n")
                    status, _, body = await read_http_response(client)
                    assert (status, body) == (200, b"hello")
            nursery.cancel_scope.cancel()


async def test_tls_upstream_that_stops_reading_the_body_is_bounded_by_send(
    tmp_path: Path,
) -> None:
    """Writes over TLS are bounded too (the TLS stream runs on a RawStream): the upload
    to an upstream that takes nothing stops after ``send``, then ``response`` bounds the
    wait for its answer: 504, under a 60 s ``client_body``."""
    ca = trustme.CA()
    ca_file = write_ca(tmp_path, ca)

    async def deaf(stream: trio.SSLStream[trio.SocketStream]) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            data += await stream.receive_some(65536)
        await trio.sleep_forever()

    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            port: int = await nursery.start(serve_tls_raw, deaf, ca)
            route = Route(
                "/",
                f"https://localhost:{port}/",
                ca_file=str(ca_file),
                timeouts=Timeouts(send=SHORT, response=SHORT, client_body=60),
            )
            host, pport = await start_proxy(nursery, [route])
            async with await trio.open_tcp_stream(host, pport) as client:
                size = 64 << 20

                async def upload() -> None:
                    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                        await client.send_all(
                            b"POST / HTTP/1.1\r\nHost: proxy\r\nContent-Length: %d\r\n\r\n" % size
                        )
                        for _ in range(size // 65536):
                            await client.send_all(b"u" * 65536)

                nursery.start_soon(upload)
                status, _, body = await read_http_response(client, b"POST")
                assert (status, error_type(body)) == (504, "upstream_timeout")
            nursery.cancel_scope.cancel()


# --------------------------------------------------------------------------- h2c


def test_without_h2c_offer_drops_only_a_pure_h2c_offer() -> None:
    offer: Headers = [
        (b"Host", b"x"),
        (b"Connection", b"Upgrade, HTTP2-Settings, keep-alive"),
        (b"Upgrade", b"h2c"),
        (b"HTTP2-Settings", b"AAMAAABkAAQCAAAAAAIAAAAA"),
    ]
    assert without_h2c_offer(offer) == [(b"Host", b"x"), (b"Connection", b"keep-alive")]
    bare: Headers = [(b"Connection", b"Upgrade, HTTP2-Settings"), (b"Upgrade", b"H2C")]
    assert without_h2c_offer(bare) == []
    assert without_h2c_offer([(b"Connection", b"Upgrade"), (b"Upgrade", b"websocket")]) is None
    assert without_h2c_offer([(b"Upgrade", b"h2c, websocket")]) is None
    assert without_h2c_offer([(b"Upgrade", b"")]) is None
    assert without_h2c_offer([(b"Host", b"x")]) is None


@pytest.mark.parametrize("websocket", [False, True], ids=["plain-route", "websocket-route"])
async def test_h2c_upgrade_offer_is_served_as_http11(websocket: bool) -> None:
    """What ``curl --http2 http://...`` sends: 200 over HTTP/1.1, not a 400; the upstream
    sees neither the offer nor its Connection tokens."""
    heads: list[bytes] = []

    async def upstream(stream: trio.SocketStream) -> None:
        heads.append(await read_until(stream, b"\r\n\r\n"))
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            port = await start_raw_server(nursery, upstream)
            route = Route("/", f"http://127.0.0.1:{port}/", websocket=websocket)
            host, pport = await start_proxy(nursery, [route])
            async with await trio.open_tcp_stream(host, pport) as client:
                await client.send_all(
                    b"GET /x HTTP/1.1\r\nHost: proxy\r\nUser-Agent: curl/8.5.0\r\n"
                    b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
                    b"HTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n"
                )
                status, headers, body = await read_http_response(client)
                assert (status, body) == (200, b"ok")
                assert not [v for n, v in headers if n == b"upgrade"]
                # The connection stays usable: the next request on it is served too.
                await client.send_all(b"GET /y HTTP/1.1\r\nHost: proxy\r\n\r\n")
                assert (await read_http_response(client))[0] == 200
            nursery.cancel_scope.cancel()
    lowered = heads[0].lower()
    assert b"upgrade" not in lowered and b"http2-settings" not in lowered


# --------------------------------------------------------------------------- WebSocket refusal


WS_HANDSHAKE: Final = (
    b"GET /ws/x HTTP/1.1\r\nHost: proxy\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


@pytest.mark.parametrize("size", [60 * 1024, 100 * 1024], ids=["under-cap", "over-cap"])
async def test_websocket_refusal_body_is_capped_at_64k(size: int) -> None:
    connections: list[int] = []
    refusal = b"n" * size
    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            up = await start_raw_server(nursery, make_refusing_upstream(connections, refusal))
            route = Route("/ws/", f"http://127.0.0.1:{up}/", websocket=True)
            host, pport = await start_proxy(nursery, [route])
            async with await trio.open_tcp_stream(host, pport) as client:
                await client.send_all(WS_HANDSHAKE)
                status, _, body = await read_http_response(client)
            nursery.cancel_scope.cancel()
    if size <= 64 * 1024:
        assert (status, body) == (403, refusal)
    else:
        assert (status, error_type(body)) == (502, "upstream_protocol_error")
        assert "64 KiB" in json.loads(body)["error"]["message"]


async def test_websocket_upstream_that_stops_reading_is_dropped_after_send() -> None:
    """Session frames to the upstream are bounded by ``send`` too (under a 60 s ``idle``):
    an upstream that takes nothing after its 101 ends the session (the client is told)."""
    client_done = trio.Event()
    upstream_saw_eof = trio.Event()

    async def deaf(stream: trio.SocketStream) -> None:
        head = await read_until(stream, b"\r\n\r\n")
        key = next(
            line.split(b":", 1)[1]
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"sec-websocket-key:")
        )
        await stream.send_all(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept_token(key) + b"\r\n\r\n"
        )
        await client_done.wait()  # reads nothing until the client's session is over
        await read_to_eof(stream)
        upstream_saw_eof.set()

    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            up = await start_raw_server(nursery, deaf)
            route = Route(
                "/ws/",
                f"http://127.0.0.1:{up}/",
                websocket=True,
                timeouts=Timeouts(send=SHORT, idle=60),
            )
            host, pport = await start_proxy(nursery, [route])
            stream = await trio.open_tcp_stream(host, pport)
            ws = await wrap_client_stream(nursery, stream, host, "/ws/x")

            async def flood() -> None:
                with contextlib.suppress(ConnectionClosed):
                    while True:
                        await ws.send_message(b"m" * 65536)

            nursery.start_soon(flood)
            with pytest.raises(ConnectionClosed):
                while True:
                    await ws.get_message()
            client_done.set()
            await upstream_saw_eof.wait()  # the proxy closed the upstream connection
            await stream.aclose()
            nursery.cancel_scope.cancel()
