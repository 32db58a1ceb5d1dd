"""Real-socket tests for proxycore.tools.sim and the tests/apps.py upstreams."""

from __future__ import annotations

import hashlib
import itertools
import json
import os

import h11
import pytest
import trio

from proxycore.tools.sim import Message, Receive, Scope, Send, make_app, parse_event_data, serve_app
from tests.apps import (
    echo_app,
    make_huge_app,
    make_silent_stream_app,
    make_slow_head_app,
    make_sse_app,
    sse_event,
)
from tests.helpers import (
    http_request,
    read_http_response,
    read_until,
    start_app,
    start_raw_server,
)

MiB = 1024 * 1024


def header(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for n, v in headers:
        if n == name:
            return v
    return None


class Timed:
    """A streamed response with the arrival time of the head and of each SSE event."""

    def __init__(self) -> None:
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.sent_at = 0.0
        self.head_at = 0.0
        self.events: list[tuple[float, bytes]] = []


async def timed_sse_get(host: str, port: int, target: str) -> Timed:
    """GET ``target`` and timestamp each ``\\n\\n``-terminated event as it is parsed."""
    result = Timed()
    conn = h11.Connection(our_role=h11.CLIENT)
    async with await trio.open_tcp_stream(host, port) as stream:
        request = h11.Request(method="GET", target=target, headers=[("host", "sim")])
        data = (conn.send(request) or b"") + (conn.send(h11.EndOfMessage()) or b"")
        result.sent_at = trio.current_time()
        await stream.send_all(data)
        pending = b""
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
            elif isinstance(event, h11.Response):
                result.status = event.status_code
                result.headers = list(event.headers)
                result.head_at = trio.current_time()
            elif isinstance(event, h11.Data):
                now = trio.current_time()
                pending += event.data
                while b"\n\n" in pending:
                    one, pending = pending.split(b"\n\n", 1)
                    result.events.append((now, one + b"\n\n"))
            elif isinstance(event, h11.EndOfMessage):
                assert pending == b""
                return result
            else:
                raise AssertionError(event)


def split_events(body: bytes) -> list[bytes]:
    assert body.endswith(b"\n\n")
    return [part + b"\n\n" for part in body[:-2].split(b"\n\n")]


# --------------------------------------------------------------------------- sim: /stream


async def test_stream_events_are_spread_over_time() -> None:
    ttft, interval, events, size = 0.1, 0.05, 8, 128
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            host, port = await start_app(
                nursery, make_app(ttft=ttft, interval=interval, events=events, event_bytes=size)
            )
            r = await timed_sse_get(host, port, "/v1/stream")
            nursery.cancel_scope.cancel()

    assert r.status == 200
    assert header(r.headers, b"content-type") == b"text/event-stream"
    assert header(r.headers, b"cache-control") == b"no-cache"
    assert header(r.headers, b"content-length") is None

    parsed = [parse_event_data(raw) for _, raw in r.events]
    assert len(parsed) == events + 1
    deltas, done = parsed[:-1], parsed[-1]
    assert done == {"type": "done", "seq": events}
    assert [d and d["type"] for d in deltas] == ["text_delta"] * events
    assert [d and d["seq"] for d in deltas] == list(range(events))
    stamps = [d["t_ns"] for d in deltas if d is not None]
    ints = [t for t in stamps if isinstance(t, int)]
    assert ints == stamps
    assert ints == sorted(ints)
    assert all(len(raw) == size for _, raw in r.events[:-1])

    arrivals = [t for t, _ in r.events[:-1]]
    # Head goes out at once; the first token only after ttft.
    assert r.head_at < arrivals[0]
    assert arrivals[0] - r.sent_at >= ttft * 0.5
    assert arrivals[0] - r.head_at >= ttft * 0.5
    # Not batched: spread over roughly (events - 1) * interval, mostly distinct reads.
    assert arrivals[-1] - arrivals[0] >= (events - 1) * interval * 0.5
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    assert sum(gap >= interval * 0.3 for gap in gaps) >= len(gaps) // 2


async def test_stream_query_overrides() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            # Defaults would take 1000 s; the query makes it instant.
            host, port = await start_app(nursery, make_app(ttft=500, interval=500, events=2))
            t0 = trio.current_time()
            status, _, body = await http_request(
                host, port, "GET", "/v1/stream?events=3&size=300&ttft_ms=0&interval_ms=0"
            )
            assert trio.current_time() - t0 < 5
            assert status == 200
            raw = split_events(body)
            assert len(raw) == 4
            assert all(len(e) == 300 for e in raw[:3])
            assert parse_event_data(raw[3]) == {"type": "done", "seq": 3}
            first = parse_event_data(raw[0])
            assert first is not None
            assert isinstance(first["text"], str)
            assert len(first["text"]) > 200

            # ttft_ms really delays the first event; zero events still sends "done".
            t0 = trio.current_time()
            status, _, body = await http_request(
                host, port, "GET", "/stream?events=0&ttft_ms=200&interval_ms=0"
            )
            assert status == 200
            assert trio.current_time() - t0 >= 0.19
            assert split_events(body) == [b'data: {"type": "done", "seq": 0}\n\n']
            nursery.cancel_scope.cancel()


async def test_stream_small_size_is_not_truncated() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            host, port = await start_app(nursery, make_app(ttft=0, interval=0))
            status, _, body = await http_request(host, port, "GET", "/v1/stream?events=2&size=0")
            assert status == 200
            events = [parse_event_data(e) for e in split_events(body)]
            assert [e and e.get("text") for e in events[:2]] == ["", ""]
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    "query",
    [
        "events=-1",
        "events=1000001",
        "events=abc",
        "events=",
        "events=1.5",
        "size=-3",
        "size=1048577",
        "interval_ms=-1",
        "interval_ms=x",
        "ttft_ms=nan",
        "ttft_ms=inf",
        "ttft_ms=-0.5",
    ],
)
async def test_stream_bad_query_is_400(query: str) -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            host, port = await start_app(nursery, make_app())
            status, headers, body = await http_request(host, port, "GET", f"/v1/stream?{query}")
            assert status == 400
            assert header(headers, b"content-type") == b"application/json"
            assert "error" in json.loads(body)
            nursery.cancel_scope.cancel()


async def test_stream_accepts_posted_json_and_rejects_other_methods() -> None:
    payload = json.dumps({"messages": [{"role": "user", "content": "x" * 300_000}]}).encode()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            host, port = await start_app(nursery, make_app(ttft=0, interval=0, events=4))
            status, _, body = await http_request(
                host,
                port,
                "POST",
                "/v1/chat/stream",
                [("content-type", "application/json")],
                payload,
            )
            assert status == 200
            assert len(split_events(body)) == 5
            status, _, _ = await http_request(host, port, "PUT", "/v1/stream", body=b"{}")
            assert status == 405
            nursery.cancel_scope.cancel()


async def test_stream_stops_when_client_disconnects() -> None:
    finished = trio.Event()
    inner = make_app(ttft=0, interval=0.01, events=100_000)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await inner(scope, receive, send)
        finally:
            if scope["type"] == "http":
                finished.set()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            host, port = await start_app(nursery, app)
            stream = await trio.open_tcp_stream(host, port)
            await stream.send_all(b"GET /v1/stream HTTP/1.1\r\nhost: sim\r\n\r\n")
            await read_until(stream, b'"seq": 1,')
            await stream.aclose()
            with trio.fail_after(2):
                await finished.wait()
            nursery.cancel_scope.cancel()


# --------------------------------------------------------------------------- sim: others


async def test_small_big_healthz_404() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            host, port = await start_app(nursery, make_app())

            status, headers, body = await http_request(host, port, "GET", "/small")
            assert (status, len(body)) == (200, 100)
            assert header(headers, b"content-length") == b"100"
            assert (header(headers, b"content-type") or b"").startswith(b"text/plain")

            status, headers, body = await http_request(host, port, "GET", "/big?mib=2")
            assert (status, len(body)) == (200, 2 * MiB)
            assert header(headers, b"content-length") == str(2 * MiB).encode()

            status, _, body = await http_request(host, port, "GET", "/big")
            assert (status, len(body)) == (200, MiB)
            status, _, _ = await http_request(host, port, "GET", "/big?mib=1025")
            assert status == 400

            status, _, body = await http_request(host, port, "GET", "/healthz")
            assert (status, body) == (200, b"ok")

            status, headers, body = await http_request(host, port, "GET", "/nope")
            assert status == 404
            assert header(headers, b"content-type") == b"application/json"
            assert json.loads(body)["error"] == "not found"
            nursery.cancel_scope.cancel()


async def test_big_arrives_in_many_writes() -> None:
    """/big is streamed, not built in memory: the client sees it in several reads."""
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            host, port = await start_app(nursery, make_app())
            async with await trio.open_tcp_stream(host, port) as stream:
                await stream.send_all(b"GET /big?mib=4 HTTP/1.1\r\nhost: sim\r\n\r\n")
                status, _, body = await read_http_response(stream)
            assert (status, len(body)) == (200, 4 * MiB)
            nursery.cancel_scope.cancel()


async def test_upload_counts_and_hashes() -> None:
    data = os.urandom(300_001)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            host, port = await start_app(nursery, make_app())
            for method in ("POST", "PUT"):
                status, _, body = await http_request(host, port, method, "/upload", body=data)
                assert status == 200
                assert json.loads(body) == {
                    "bytes": len(data),
                    "sha256": hashlib.sha256(data).hexdigest(),
                }
            status, _, body = await http_request(host, port, "POST", "/upload")
            assert json.loads(body) == {"bytes": 0, "sha256": hashlib.sha256().hexdigest()}
            status, _, _ = await http_request(host, port, "GET", "/upload")
            assert status == 405
            nursery.cancel_scope.cancel()


async def test_keep_alive_connection_is_reused() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            host, port = await start_app(nursery, make_app())
            async with await trio.open_tcp_stream(host, port) as stream:
                for _ in range(3):
                    await stream.send_all(b"GET /healthz HTTP/1.1\r\nhost: sim\r\n\r\n")
                    status, _, body = await read_http_response(stream)
                    assert (status, body) == (200, b"ok")
            nursery.cancel_scope.cancel()


async def test_lifespan_is_acknowledged() -> None:
    app = make_app()
    inbox = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    sent: list[Message] = []

    async def receive() -> Message:
        return inbox.pop(0)

    async def send(message: Message) -> None:
        sent.append(message)

    with trio.fail_after(10):
        await app({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send)
    assert [m["type"] for m in sent] == [
        "lifespan.startup.complete",
        "lifespan.shutdown.complete",
    ]


async def test_serve_app_stops_on_cancel_even_mid_stream() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            host, port = await nursery.start(serve_app, make_app(ttft=0, events=1_000_000))
            assert host == "127.0.0.1"
            assert port > 0
            stream = await trio.open_tcp_stream(host, port)
            await stream.send_all(b"GET /v1/stream HTTP/1.1\r\nhost: sim\r\n\r\n")
            await read_until(stream, b"text_delta")
            t0 = trio.current_time()
            nursery.cancel_scope.cancel()
        assert trio.current_time() - t0 < 2
        # The connection was torn down and the port no longer listens.
        with pytest.raises((trio.BrokenResourceError, EOFError)):
            await read_until(stream, b"never")
        await stream.aclose()
        with pytest.raises(OSError):
            await trio.open_tcp_stream(host, port)


def test_parse_event_data() -> None:
    assert parse_event_data(b'data: {"a": 1}\n') == {"a": 1}
    assert parse_event_data(b'data:{"a": 1}') == {"a": 1}
    assert parse_event_data(b"data: [DONE]") is None
    assert parse_event_data(b"data: 5") is None
    assert parse_event_data(b": keep-alive") is None
    assert parse_event_data(b'event: {"a": 1}') is None


def test_make_app_rejects_bad_defaults() -> None:
    with pytest.raises(ValueError):
        make_app(ttft=-1)
    with pytest.raises(ValueError):
        make_app(interval=float("nan"))
    with pytest.raises(ValueError):
        make_app(events=1_000_001)
    with pytest.raises(ValueError):
        make_app(event_bytes=MiB + 1)


# --------------------------------------------------------------------------- tests/apps.py


async def test_echo_app_reports_request() -> None:
    data = os.urandom(10_000)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            host, port = await start_app(nursery, echo_app)
            status, headers, body = await http_request(
                host,
                port,
                "POST",
                "/p/a%20th?x=1&y=%2F",
                [("X-Custom", "Value"), ("x-dup", "1"), ("x-dup", "2")],
                data,
            )
            nursery.cancel_scope.cancel()
    assert status == 200
    assert header(headers, b"content-type") == b"application/json"
    echo = json.loads(body)
    assert echo["method"] == "POST"
    assert echo["path"] == "/p/a%20th"
    assert echo["query"] == "x=1&y=%2F"
    assert echo["headers"] == [
        ["host", f"{host}:{port}"],
        ["x-custom", "Value"],
        ["x-dup", "1"],
        ["x-dup", "2"],
        ["content-length", "10000"],
    ]
    assert echo["body_len"] == len(data)
    assert echo["body_sha256"] == hashlib.sha256(data).hexdigest()


async def test_echo_app_status_override() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            host, port = await start_app(nursery, echo_app)
            status, _, body = await http_request(host, port, "GET", "/", [("x-echo-status", "418")])
            assert status == 418
            assert json.loads(body)["body_len"] == 0
            status, _, _ = await http_request(host, port, "GET", "/", [("x-echo-status", "503")])
            assert status == 503
            nursery.cancel_scope.cancel()


async def test_echo_app_streams_body_back_as_it_arrives() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            host, port = await start_app(nursery, echo_app)
            conn = h11.Connection(our_role=h11.CLIENT)
            async with await trio.open_tcp_stream(host, port) as stream:
                request = h11.Request(
                    method="POST",
                    target="/",
                    headers=[
                        ("host", "x"),
                        ("transfer-encoding", "chunked"),
                        ("x-echo-stream-body", "1"),
                    ],
                )
                await stream.send_all(conn.send(request) or b"")
                received = bytearray()
                for piece in (b"first-", b"second-", b"third"):
                    await stream.send_all(conn.send(h11.Data(data=piece)) or b"")
                    # The piece comes back before we send the rest of the body.
                    while not received.endswith(piece):
                        event = conn.next_event()
                        if event is h11.NEED_DATA:
                            conn.receive_data(await stream.receive_some(65536))
                        elif isinstance(event, h11.Response):
                            assert event.status_code == 200
                        elif isinstance(event, h11.Data):
                            received += event.data
                        else:
                            raise AssertionError(event)
                await stream.send_all(conn.send(h11.EndOfMessage()) or b"")
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        conn.receive_data(await stream.receive_some(65536))
                    elif isinstance(event, h11.EndOfMessage):
                        break
                    else:
                        raise AssertionError(event)
            assert bytes(received) == b"first-second-third"
            nursery.cancel_scope.cancel()


async def test_sse_app() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            host, port = await start_app(nursery, make_sse_app(5, 0.05))
            r = await timed_sse_get(host, port, "/events")
            assert r.status == 200
            assert header(r.headers, b"content-type") == b"text/event-stream"
            assert [raw for _, raw in r.events] == [sse_event(n) for n in range(5)]
            assert r.events[-1][0] - r.events[0][0] >= 4 * 0.05 * 0.5

            host, port = await start_app(nursery, make_sse_app(3, 0, b"x" * 1000))
            status, _, body = await http_request(host, port, "GET", "/")
            assert status == 200
            assert body == b"".join(sse_event(n, b"x" * 1000) for n in range(3))
            assert sse_event(2, b"p") == b"data: 2 p\n\n"
            nursery.cancel_scope.cancel()


async def test_slow_head_app() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            host, port = await start_app(nursery, make_slow_head_app(0.3))
            t0 = trio.current_time()
            status, _, body = await http_request(host, port, "GET", "/")
            assert trio.current_time() - t0 >= 0.29
            assert (status, body) == (200, b"late")
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize("chunked", [False, True])
async def test_huge_app(chunked: bool) -> None:
    total = 5 * MiB + 7
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            host, port = await start_app(nursery, make_huge_app(total, chunked=chunked))
            status, headers, body = await http_request(host, port, "GET", "/")
            assert status == 200
            assert len(body) == total
            assert body.count(b"x") == total
            if chunked:
                assert header(headers, b"content-length") is None
                assert header(headers, b"transfer-encoding") == b"chunked"
            else:
                assert header(headers, b"content-length") == str(total).encode()
            nursery.cancel_scope.cancel()


async def test_silent_stream_app() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            host, port = await start_app(nursery, make_silent_stream_app(b"a\n\n", 0.3, b"b\n\n"))
            r = await timed_sse_get(host, port, "/")
            assert [raw for _, raw in r.events] == [b"a\n\n", b"b\n\n"]
            assert r.events[1][0] - r.events[0][0] >= 0.25
            nursery.cancel_scope.cancel()


# --------------------------------------------------------------------------- helpers


async def test_raw_server_and_response_parsing() -> None:
    responses = {
        b"/ok": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
        b"/close": b"HTTP/1.1 201 Created\r\nConnection: close\r\n\r\nuntil-eof",
        b"/cont": b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n",
        b"/trunc": b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\nshort",
    }

    async def handler(stream: trio.SocketStream) -> None:
        request = await read_until(stream, b"\r\n\r\n")
        target = request.split(b" ", 2)[1]
        await stream.send_all(responses[target])

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            port = await start_raw_server(nursery, handler)
            assert await http_request("127.0.0.1", port, "GET", "/ok") == (
                200,
                [(b"content-length", b"5")],
                b"hello",
            )
            status, _, body = await http_request("127.0.0.1", port, "GET", "/close")
            assert (status, body) == (201, b"until-eof")
            status, _, body = await http_request("127.0.0.1", port, "GET", "/cont")
            assert (status, body) == (204, b"")
            with pytest.raises(h11.RemoteProtocolError):
                await http_request("127.0.0.1", port, "GET", "/trunc")
            nursery.cancel_scope.cancel()
