"""``ProxyApp`` (proxycore/proxy/asgi.py) served by hypercorn's trio worker, end to end.

The proxy app runs under hypercorn on 127.0.0.1 (``proxycore.tools.sim.serve_app``, which runs
lifespan); upstreams are ``tests.apps`` apps under hypercorn, or raw sockets where bytes,
timing or connection counts matter. The HTTP/1.1 client is ``ProxyClient`` from
``test_streaming`` (h11, client role), so a truncated body is told apart from a complete
one; HTTP/2 is spoken with the ``h2`` library (prior knowledge, cleartext).
"""

from __future__ import annotations

import hashlib
import json
import logging
import socket
import tracemalloc
from pathlib import Path
from typing import Any, Final

import h2.config
import h2.connection
import h2.events
import h11
import pytest
import trio

from proxycore import Config, Hooks, Request, Response, Route
from proxycore.config import Inbound, RetryPolicy, UpstreamEntry
from proxycore.proxy.asgi import ProxyApp
from proxycore.security.secrets import generate_secret
from tests.apps import echo_app, sse_event
from tests.e2e.test_streaming import (
    LAST_CHUNK,
    SSE_HEAD,
    chunk,
    header,
    open_client,
    reset,
    wait_eof,
)
from tests.helpers import http_request, read_until, start_app, start_raw_server

KiB: Final = 1024
MiB: Final = 1024 * KiB
Headers = list[tuple[bytes, bytes]]


def proxy_app(upstream: str, **config: Any) -> ProxyApp:
    return ProxyApp(Config(routes=(Route(prefix="/", upstream=upstream),), **config))


async def start(nursery: trio.Nursery, app: ProxyApp) -> tuple[str, int]:
    """Serve ``app`` with hypercorn (trio worker, lifespan on); ``(host, port)``."""
    return await start_app(nursery, app)


def hget(headers: Headers, name: bytes) -> bytes | None:
    return next((v for n, v in headers if n.lower() == name), None)


def json_error(status: int, headers: Headers, body: bytes, expected: int) -> dict[str, str]:
    assert status == expected, (status, body)
    assert hget(headers, b"content-type") == b"application/json"
    error: dict[str, str] = json.loads(body)["error"]
    assert set(error) == {"type", "message", "request_id"}
    assert error["request_id"].encode() == hget(headers, b"x-request-id")
    return error


def free_port() -> int:
    """A port nothing listens on (bound, then closed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# --------------------------------------------------------------------------- round trips


async def test_get_and_post_round_trip_with_forwarded_headers() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            up_host, up_port = await start_app(nursery, echo_app)
            app = proxy_app(f"http://{up_host}:{up_port}/base/")
            host, port = await start(nursery, app)
            assert app.state is not None  # lifespan built the state before any request
            status, headers, body = await http_request(
                host,
                port,
                "GET",
                "/a/b?x=1&y=%20",
                [("x-forwarded-for", "10.0.0.7"), ("x-request-id", "req-123"), ("te", "x")],
            )
            assert status == 200
            assert hget(headers, b"x-request-id") == b"req-123"
            echoed = json.loads(body)
            assert (echoed["method"], echoed["path"]) == ("GET", "/base/a/b")
            assert echoed["query"] == "x=1&y=%20"
            seen = dict(echoed["headers"])
            assert seen["host"] == f"{up_host}:{up_port}"
            assert seen["x-forwarded-for"] == "127.0.0.1"  # the client's chain is not trusted
            assert seen["x-forwarded-proto"] == "http"
            assert seen["x-forwarded-host"] == f"{host}:{port}"
            assert seen["x-request-id"] == "req-123"
            assert "te" not in seen

            payload = bytes(range(256)) * 1000
            status, headers, body = await http_request(host, port, "POST", "/up", body=payload)
            assert status == 200
            echoed = json.loads(body)
            assert echoed["body_len"] == len(payload)
            assert echoed["body_sha256"] == hashlib.sha256(payload).hexdigest()
            assert dict(echoed["headers"])["content-length"] == str(len(payload))
            nursery.cancel_scope.cancel()


async def test_chunked_upload_streams_piece_by_piece() -> None:
    """Each uploaded piece comes back (echoed by the upstream) before the next is sent."""
    pieces = [b"piece %d|" % i * (i + 1) for i in range(6)]
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            up_host, up_port = await start_app(nursery, echo_app)
            host, port = await start(nursery, proxy_app(f"http://{up_host}:{up_port}/"))
            async with open_client(host, port) as client:
                headers = [(b"transfer-encoding", b"chunked"), (b"x-echo-stream-body", b"1")]
                await client.request(b"POST", b"/upload", headers, end=False)
                sent = b""
                for i, piece in enumerate(pieces):
                    await client.send(h11.Data(data=piece))
                    sent += piece
                    if i == 0:
                        assert (await client.head()).status_code == 200
                    assert await client.body_at_least(len(sent)) == sent
                await client.send(h11.EndOfMessage())
                assert await client.read_to_end()
                assert bytes(client.body) == b"".join(pieces)
            nursery.cancel_scope.cancel()


async def test_upstream_connection_is_reused() -> None:
    connections = 0
    body = b"hello"

    async def upstream(stream: trio.SocketStream) -> None:
        nonlocal connections
        connections += 1
        while True:
            try:
                await read_until(stream, b"\r\n\r\n")
            except EOFError:
                return
            await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n" + body)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            up_port = await start_raw_server(nursery, upstream)
            host, port = await start(nursery, proxy_app(f"http://127.0.0.1:{up_port}/"))
            for _ in range(3):
                status, headers, got = await http_request(host, port, "GET", "/x")
                assert (status, got) == (200, body)
                assert hget(headers, b"content-length") == b"5"
            assert connections == 1
            nursery.cancel_scope.cancel()


# --------------------------------------------------------------------------- streaming


async def test_sse_events_arrive_one_by_one_in_lockstep() -> None:
    """The upstream sends the next event only after the client got the previous one."""
    events = [sse_event(n) for n in range(8)]
    go_send, go_recv = trio.open_memory_channel[None](0)

    async def upstream(stream: trio.SocketStream) -> None:
        await read_until(stream, b"\r\n\r\n")
        await stream.send_all(SSE_HEAD)
        for event in events:
            await go_recv.receive()
            await stream.send_all(chunk(event))
        await go_recv.receive()
        await stream.send_all(LAST_CHUNK)
        await wait_eof(stream)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            up_port = await start_raw_server(nursery, upstream)
            host, port = await start(nursery, proxy_app(f"http://127.0.0.1:{up_port}/"))
            async with open_client(host, port) as client:
                await client.request(b"GET", b"/events", [(b"accept", b"text/event-stream")])
                response = await client.head()
                assert response.status_code == 200
                assert header(response, b"content-type") == b"text/event-stream"
                assert header(response, b"x-accel-buffering") == b"no"
                for n in range(len(events)):
                    await go_send.send(None)
                    expected = b"".join(events[: n + 1])
                    assert await client.body_at_least(len(expected)) == expected
                await go_send.send(None)
                assert await client.read_to_end()
                assert bytes(client.body) == b"".join(events)
            nursery.cancel_scope.cancel()


async def test_slow_client_keeps_memory_bounded() -> None:
    """A 64 MiB body offered as fast as possible to a client that pauses and reads slowly.

    Everything (upstream, hypercorn, ProxyApp, client) runs in this process, so tracemalloc
    sees every Python allocation. The client reads the head, pauses, reads 4 MiB in 4 KiB
    reads, pauses again, then leaves: a proxy that buffered would have pulled (most of) the
    64 MiB from the upstream by then. Pushing all 64 MiB through hypercorn under tracemalloc
    would take ~10 s here; the pauses prove the bound without it.

    Margins: kernel socket buffers (upstream send, proxy receive, hypercorn send, client
    receive) hold what is in flight, up to a few MiB on loopback; hypercorn adds its own
    buffers to the proxy's 4 KiB (a 64 KiB read per connection, up to 10 queued request
    messages, h11's output, and on HTTP/2 a 32 KiB stream buffer). Measured here: ~0.25 MiB
    of peak growth and ~0.25 MiB in flight. 16 MiB is generous for a busier or differently
    tuned machine and still 4x below the body size a buffering proxy would pull in.
    """
    total, block, slow_part, bound = 64 * MiB, 64 * KiB, 4 * MiB, 16 * MiB
    sent = received = 0
    upstream_done = trio.Event()

    async def upstream(stream: trio.SocketStream) -> None:
        nonlocal sent
        await read_until(stream, b"\r\n\r\n")
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % total)
        try:
            for i in range(total // block):
                await stream.send_all(i.to_bytes(8, "big") * (block // 8))
                sent += block
        finally:
            upstream_done.set()

    async def plateau() -> int:
        """Wait until ``sent`` has not moved for 3 samples 0.1 s apart; return it."""
        last, still = -1, 0
        while still < 3:
            await trio.sleep(0.1)
            still, last = (still + 1 if sent == last else 0), sent
        return last

    tracemalloc.start()
    try:
        with trio.fail_after(15):
            async with trio.open_nursery() as nursery:
                up_port = await start_raw_server(nursery, upstream)
                host, port = await start(nursery, proxy_app(f"http://127.0.0.1:{up_port}/"))
                client = await trio.open_tcp_stream(host, port)
                baseline = tracemalloc.get_traced_memory()[0]
                tracemalloc.reset_peak()
                await client.send_all(b"GET /huge HTTP/1.1\r\nHost: proxy\r\n\r\n")
                head, _, first = (await read_until(client, b"\r\n\r\n")).partition(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 200 ")
                assert b"content-length: %d" % total in head.lower()
                received = len(first)
                assert await plateau() - received < bound  # 1. paused
                max_ahead = 0
                while received < slow_part:  # 2. slow reads
                    data = await client.receive_some(4 * KiB)
                    assert data
                    received += len(data)
                    max_ahead = max(max_ahead, sent - received)
                    if received % (64 * KiB) < len(data):
                        await trio.sleep(0.001)
                assert max_ahead < bound
                assert await plateau() - received < bound  # 3. paused again
                peak = tracemalloc.get_traced_memory()[1]
                await client.aclose()  # 4. the client leaves: the upstream is cut
                with trio.fail_after(3):
                    await upstream_done.wait()
                nursery.cancel_scope.cancel()
    finally:
        tracemalloc.stop()
    assert sent < total
    assert peak - baseline < bound, f"memory grew by {(peak - baseline) / MiB:.1f} MiB"


# --------------------------------------------------------------------------- refusals


async def test_bad_target_400_and_no_route_404() -> None:
    routes = (Route(prefix="/api/", upstream=f"http://127.0.0.1:{free_port()}/"),)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            host, port = await start(nursery, ProxyApp(Config(routes=routes)))
            error = json_error(*await http_request(host, port, "GET", "/nope"), 404)
            assert error["type"] == "no_route"
            error = json_error(*await http_request(host, port, "GET", "/api/%2e%2e/x"), 400)
            assert error["type"] == "bad_request"
            nursery.cancel_scope.cancel()


async def test_bearer_inbound_refuses_401_and_admits_the_secret(tmp_path: Path) -> None:
    secret_file = tmp_path / "inbound.secret"
    generate_secret(str(secret_file))
    secret = secret_file.read_text().strip()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            up_host, up_port = await start_app(nursery, echo_app)
            inbound = Inbound(mode="bearer", secret_file=str(secret_file))
            app = proxy_app(f"http://{up_host}:{up_port}/", inbound=inbound)
            host, port = await start(nursery, app)
            for auth in [(), [("authorization", "Bearer not-the-secret-0123456789")]]:
                status, headers, body = await http_request(host, port, "GET", "/x", auth)
                assert json_error(status, headers, body, 401)["type"] == "unauthorized"
                assert hget(headers, b"www-authenticate") == b'Bearer realm="proxycore"'
            good = [("authorization", f"Bearer {secret}")]
            status, _, body = await http_request(host, port, "GET", "/x", good)
            assert status == 200
            assert "authorization" not in dict(json.loads(body)["headers"])
            nursery.cancel_scope.cancel()


async def test_upstream_refused_is_502_logged_and_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="proxycore.access")
    app = proxy_app(f"http://127.0.0.1:{free_port()}/")
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            host, port = await start(nursery, app)
            error = json_error(*await http_request(host, port, "GET", "/x?k=secret"), 502)
            assert error["type"] == "upstream_unreachable"
            nursery.cancel_scope.cancel()
    (line,) = [json.loads(r.getMessage()) for r in caplog.records if r.name == "proxycore.access"]
    assert (line["status"], line["path"], line["route"]) == (502, "/x", "/")
    assert (line["outcome"], line["request_id"]) == ("upstream_connect_error", error["request_id"])
    assert app.state is not None
    metrics = app.state.metrics.exposition()
    assert b'proxycore_requests_total{route="/",status_class="5xx"} 1.0' in metrics


async def test_websocket_handshake_is_refused_403() -> None:
    handshake = (
        b"GET /ws HTTP/1.1\r\nHost: proxy\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            host, port = await start(nursery, proxy_app(f"http://127.0.0.1:{free_port()}/"))
            async with await trio.open_tcp_stream(host, port) as stream:
                await stream.send_all(handshake)
                assert (await read_until(stream, b"\r\n\r\n")).startswith(b"HTTP/1.1 403 ")
            nursery.cancel_scope.cancel()


async def test_websocket_is_refused_and_lazy_state_without_lifespan() -> None:
    app = proxy_app(f"http://127.0.0.1:{free_port()}/")
    messages: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "websocket.connect"}

    async def send(message: Any) -> None:
        messages.append(message)

    await app({"type": "websocket"}, receive, send)
    assert messages == [{"type": "websocket.close", "code": 1003}]
    before = app.state
    assert before is None
    # No lifespan: the first request builds the state.
    messages.clear()
    scope = {
        "type": "http",
        "method": "GET",
        "path": "/x",
        "raw_path": b"/x",
        "query_string": b"",
        "headers": [],
        "client": ("127.0.0.1", 1),
    }

    async def receive_http() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    await app(scope, receive_http, send)
    assert app.state is not None
    assert [m["type"] for m in messages] == ["http.response.start", "http.response.body"]
    assert messages[0]["status"] == 502


# --------------------------------------------------------------------------- failures


@pytest.mark.parametrize("framing", ["chunked", "length"])
async def test_upstream_failure_mid_body_truncates_the_response(framing: str) -> None:
    events = [sse_event(n) for n in range(3)]
    got_events = trio.Event()

    async def upstream(stream: trio.SocketStream) -> None:
        await read_until(stream, b"\r\n\r\n")
        if framing == "chunked":
            await stream.send_all(SSE_HEAD + b"".join(chunk(e) for e in events))
        else:
            await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
            await stream.send_all(b"".join(events))
        await got_events.wait()
        reset(stream)
        await stream.aclose()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            up_port = await start_raw_server(nursery, upstream)
            host, port = await start(nursery, proxy_app(f"http://127.0.0.1:{up_port}/"))
            async with open_client(host, port) as client:
                await client.request(b"GET", b"/events")
                assert (await client.head()).status_code == 200
                expected = b"".join(events)
                assert await client.body_at_least(len(expected)) == expected
                got_events.set()
                assert not await client.read_to_end(), "a failed body was passed off as complete"
                assert bytes(client.body) == expected
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize("when", ["before_head", "mid_body"])
async def test_client_disconnect_cancels_the_upstream(when: str) -> None:
    got_request, upstream_closed = trio.Event(), trio.Event()

    async def upstream(stream: trio.SocketStream) -> None:
        await read_until(stream, b"\r\n\r\n")
        got_request.set()
        if when == "mid_body":
            await stream.send_all(SSE_HEAD + chunk(sse_event(0)))
        await wait_eof(stream)  # silent "forever"
        upstream_closed.set()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            up_port = await start_raw_server(nursery, upstream)
            host, port = await start(nursery, proxy_app(f"http://127.0.0.1:{up_port}/"))
            async with open_client(host, port) as client:
                await client.request(b"GET", b"/events")
                await got_request.wait()
                if when == "mid_body":
                    assert (await client.head()).status_code == 200
                    assert await client.body_at_least(len(sse_event(0))) == sse_event(0)
                await client.stream.aclose()
                with trio.fail_after(3):
                    await upstream_closed.wait()
            nursery.cancel_scope.cancel()


# --------------------------------------------------------------------------- HTTP/2


async def h2_request(
    host: str, port: int, path: bytes, body: list[bytes] | None = None, wait: float = 5.0
) -> tuple[Headers, bytes, bool]:
    """One request over cleartext HTTP/2 (prior knowledge): ``(headers, body, ended)``.

    A GET, or with ``body`` a POST whose pieces go in separate DATA frames, without a
    content-length. ``ended`` is False if the response stream was reset, or neither ended
    nor reset within ``wait`` seconds of its last frame.
    """
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    headers: Headers = []
    received = bytearray()
    method = b"GET" if body is None else b"POST"
    request = [(b":method", method), (b":path", path), (b":scheme", b"http")]
    async with await trio.open_tcp_stream(host, port) as stream:
        conn.send_headers(1, [*request, (b":authority", b"proxy")], end_stream=body is None)
        for i, piece in enumerate(body or ()):
            conn.send_data(1, piece, end_stream=i == len(body or ()) - 1)
            await stream.send_all(conn.data_to_send())
        await stream.send_all(conn.data_to_send())
        while True:
            data = b""
            with trio.move_on_after(wait):
                data = await stream.receive_some(64 * KiB)
            if not data:  # timeout or connection closed
                return headers, bytes(received), False
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    headers = list(event.headers)
                elif isinstance(event, h2.events.DataReceived):
                    received += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, 1)
                elif isinstance(event, h2.events.StreamEnded):
                    return headers, bytes(received), True
                elif isinstance(event, h2.events.StreamReset):
                    return headers, bytes(received), False
            await stream.send_all(conn.data_to_send())


async def test_http2_round_trip_and_truncation() -> None:
    async def upstream(stream: trio.SocketStream) -> None:
        while True:
            head = (await read_until(stream, b"\r\n\r\n")).split(b"\r\n", 1)[0]
            if b"/fail" in head:
                await stream.send_all(SSE_HEAD + chunk(sse_event(0)))
                reset(stream)
                return
            await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            up_port = await start_raw_server(nursery, upstream)
            host, port = await start(nursery, proxy_app(f"http://127.0.0.1:{up_port}/"))
            headers, body, ended = await h2_request(host, port, b"/ok")
            assert (hget(headers, b":status"), body, ended) == (b"200", b"hello", True)
            headers, body, ended = await h2_request(host, port, b"/fail", wait=1.0)
            assert hget(headers, b":status") == b"200"
            assert body == sse_event(0)
            assert not ended, "a failed body was passed off as complete"
            nursery.cancel_scope.cancel()


async def test_http2_upload_without_length_is_chunked_upstream() -> None:
    pieces = [b"a" * 5000, b"b" * 7000, b"c"]
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            up_host, up_port = await start_app(nursery, echo_app)
            host, port = await start(nursery, proxy_app(f"http://{up_host}:{up_port}/"))
            headers, body, ended = await h2_request(host, port, b"/up", pieces)
            assert (hget(headers, b":status"), ended) == (b"200", True)
            echoed = json.loads(body)
            assert echoed["body_len"] == sum(map(len, pieces))
            assert echoed["body_sha256"] == hashlib.sha256(b"".join(pieces)).hexdigest()
            assert dict(echoed["headers"])["transfer-encoding"] == "chunked"
            headers, body, ended = await h2_request(host, port, b"/get")
            seen = dict(json.loads(body)["headers"])  # no body: no framing header upstream
            assert "content-length" not in seen
            assert "transfer-encoding" not in seen
            nursery.cancel_scope.cancel()


# --------------------------------------------------------------------------- ASGI called directly
# ProxyApp driven with plain ``receive``/``send`` callables (no ASGI server): what the app
# sends is asserted message by message. The upstream is a raw socket server.


async def call_app(
    app: ProxyApp, messages: list[dict[str, Any]], **scope: Any
) -> list[dict[str, Any]]:
    """Run one ``http`` request through ``app``; the messages it sent, in order."""
    incoming = list(messages)
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if incoming:
            return incoming.pop(0)
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    async def send(message: Any) -> None:
        sent.append(dict(message))

    base: dict[str, Any] = {
        "type": "http",
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/x",
        "raw_path": b"/x",
        "query_string": b"",
        "headers": [(b"host", b"app.example")],
        "client": ("127.0.0.1", 40000),
        "extensions": {},
    }
    try:
        await app({**base, **scope}, receive, send)
    finally:
        if app.state is not None:  # no lifespan here: close what the pool kept
            app.state.pool.close_all()
    return sent


EARLY: Final = b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"
NO_BODY_MESSAGE: Final = {"type": "http.request", "body": b"", "more_body": False}


async def early_hints_upstream(nursery: trio.Nursery, heads: list[bytes]) -> int:
    async def upstream(stream: trio.SocketStream) -> None:
        heads.append(await read_until(stream, b"\r\n\r\n"))
        await stream.send_all(EARLY + b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await trio.sleep_forever()

    return await start_raw_server(nursery, upstream)


async def test_early_hints_are_relayed_where_the_server_offers_them() -> None:
    """An upstream 103 becomes ``http.response.early_hint`` (its Link values) when the
    scope offers the extension (hypercorn: HTTP/2 and 3); X-Forwarded-Proto is the
    scope's scheme."""
    heads: list[bytes] = []
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            port = await early_hints_upstream(nursery, heads)
            app = proxy_app(f"http://127.0.0.1:{port}/")
            sent = await call_app(
                app,
                [NO_BODY_MESSAGE],
                http_version="2",
                scheme="https",
                extensions={"http.response.early_hint": {}},
            )
            nursery.cancel_scope.cancel()
    assert [m["type"] for m in sent] == [
        "http.response.early_hint",
        "http.response.start",
        "http.response.body",
    ]
    assert sent[0]["links"] == [b"</a.css>; rel=preload"]
    assert sent[1]["status"] == 200
    assert sent[2]["body"] == b"ok"
    assert b"\r\nX-Forwarded-Proto: https\r\n" in heads[0]


async def test_early_hints_are_dropped_without_the_extension() -> None:
    heads: list[bytes] = []
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            port = await early_hints_upstream(nursery, heads)
            sent = await call_app(proxy_app(f"http://127.0.0.1:{port}/"), [NO_BODY_MESSAGE])
            nursery.cancel_scope.cancel()
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    assert b"\r\nX-Forwarded-Proto: http\r\n" in heads[0]


async def test_max_body_bytes_is_checked_on_the_first_body_message() -> None:
    """No framing header (HTTP/2): a complete first message over the route's limit is a
    413, and nothing goes upstream."""
    heads: list[bytes] = []
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            port = await early_hints_upstream(nursery, heads)
            route = Route(prefix="/", upstream=f"http://127.0.0.1:{port}/", max_body_bytes=3)
            app = ProxyApp(Config(routes=(route,)))
            message = {"type": "http.request", "body": b"abcd", "more_body": False}
            sent = await call_app(app, [message], method="POST", http_version="2")
            nursery.cancel_scope.cancel()
    assert sent[0]["type"] == "http.response.start"
    assert sent[0]["status"] == 413
    assert heads == []


async def test_on_request_hook_sees_the_same_request_view_as_native() -> None:
    """The hook gets the decision path and the query with its ``?``, as on the native
    server (both front ends build the request through ``preflight.request_view``)."""
    seen: list[tuple[str, str]] = []

    async def on_request(request: Request) -> Response:
        seen.append((request.path, request.query))
        return Response(status=200, body=b"hooked")

    app = ProxyApp(
        Config(routes=(Route(prefix="/", upstream="http://127.0.0.1:9/"),)),
        hooks=Hooks(on_request=on_request),
    )
    with trio.fail_after(10):
        sent = await call_app(
            app, [NO_BODY_MESSAGE], path="/a//b", raw_path=b"/a//b", query_string=b"x=1"
        )
    assert seen == [("/a/b", "?x=1")]
    assert sent[-1]["body"] == b"hooked"


async def test_group_route_retries_a_503_with_the_body_replayed_under_asgi(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The ASGI front end shares the group core: a small POST body is gathered, a 503 is
    retried on the other upstream with the body intact, a refused upstream is skipped."""
    caplog.set_level(logging.INFO, logger="proxycore.access")
    seen: list[bytes] = []

    async def unavailable(stream: trio.SocketStream) -> None:
        seen.append(await read_until(stream, b"\r\n\r\n"))
        await stream.send_all(b"HTTP/1.1 503 Busy\r\nContent-Length: 4\r\n\r\nbusy")

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            busy = await start_raw_server(nursery, unavailable)
            up_host, up_port = await start_app(nursery, echo_app)
            route = Route(
                prefix="/",
                upstreams=(
                    UpstreamEntry(f"http://127.0.0.1:{busy}/", name="busy"),
                    UpstreamEntry(f"http://{up_host}:{up_port}/", name="echo"),
                ),
                balance="round_robin",
                retry=RetryPolicy(attempts=2, on=("503",)),
            )
            app = ProxyApp(Config(routes=(route,)))
            host, port = await start(nursery, app)
            payload = b'{"model": "m", "messages": []}'
            for _ in range(4):
                status, _, body = await http_request(host, port, "POST", "/v1", body=payload)
                assert status == 200, body
                echoed = json.loads(body)
                assert echoed["body_sha256"] == hashlib.sha256(payload).hexdigest()
            nursery.cancel_scope.cancel()
    assert len(seen) == 2  # round robin sent every other request to "busy" first
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "proxycore.access"]
    retried = [line["attempts"] for line in lines if "attempts" in line]
    assert (
        retried
        == [[{"upstream": "busy", "outcome": "503"}, {"upstream": "echo", "outcome": "200"}]] * 2
    )
