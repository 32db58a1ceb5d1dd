"""The SSE features of a route (``Route.sse``): detection headers, heartbeats, in-band
errors, the transcript tap, and byte-exact relaying with all of them on.

Upstreams are raw sockets so the test decides every byte and when it is sent. The
client parses responses with h11, so a stream cut without its terminal chunk is told
apart from one that ended cleanly; each ``h11.Data`` is one chunk the proxy wrote.

Clock: the real one, never ``autojump_clock``. Autojump with real sockets (and the
transcript's worker threads) in flight jumps the clock while bytes are still on their
way, which failed this file on a loaded CI machine. So timeouts here are short (tenths
of a second), an upstream that must wait for a heartbeat waits for the client to have
seen one (not for a time), and elapsed times are only asserted from below (measured
from before the request: a timer never fires early). The exact timing of heartbeats and
of the relay's idle timeout is asserted on the mock clock over scripted streams in
``tests/inmem/test_sse_relay.py``.
"""

from __future__ import annotations

import functools
import json
import socket
import struct
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Final

import h11
import pytest
import trio

import proxycore.observe.transcript
from proxycore import Config, Route, ServerSettings, Timeouts, serve
from proxycore.config import SSESettings
from proxycore.http.sse import HEARTBEAT, SSEEvent, SSEParser
from proxycore.proxy.hooks import ExchangeInfo, Hooks
from tests.helpers import read_until, start_proxy, start_raw_server

#: Outer cap of every test (real time).
REAL_CAP: Final = 10.0
#: Heartbeat interval and idle timeout of the timing tests (real seconds): short, and
#: the idle timeout several heartbeats long.
BEAT: Final = 0.1
IDLE: Final = 0.5
#: Response timeout of the tests where the upstream never answers.
RESPONSE: Final = 0.3
SSE_HEAD: Final = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
)
LAST_CHUNK: Final = b"0\r\n\r\n"
ACCEPT_SSE: Final = ((b"accept", b"text/event-stream"),)
UNEXPECTED: Final = "unexpected error on a client connection"


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def reset(stream: trio.SocketStream) -> None:
    """Make the next close of ``stream`` send a TCP RST instead of a FIN."""
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


async def wait_eof(stream: trio.SocketStream) -> None:
    try:
        while await stream.receive_some(65536):
            pass
    except trio.BrokenResourceError:
        pass


def refused_port() -> int:
    """A loopback port nobody listens on (bound, never listening: connect is refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def sse_route(upstream: str, sse: SSESettings, **timeouts: float) -> Route:
    return Route(
        prefix="/", upstream=upstream, sse=sse, timeouts=Timeouts(**timeouts) if timeouts else None
    )


class Client:
    """A raw client connection; h11 writes the request and parses the response.

    ``chunks`` holds every piece of body data with the (trio) time it arrived.
    """

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.h11 = h11.Connection(h11.CLIENT)
        self.chunks: list[tuple[float, bytes]] = []
        self.eof = False

    @property
    def body(self) -> bytes:
        return b"".join(data for _, data in self.chunks)

    async def request(
        self, target: bytes = b"/events", headers: Iterable[tuple[bytes, bytes]] = ()
    ) -> None:
        request = h11.Request(method=b"GET", target=target, headers=[(b"host", b"p"), *headers])
        await self.stream.send_all(
            (self.h11.send(request) or b"") + (self.h11.send(h11.EndOfMessage()) or b"")
        )

    async def _event(self) -> h11.Event:
        while True:
            event = self.h11.next_event()
            if event is not h11.NEED_DATA:
                assert not isinstance(event, type), f"unexpected h11 sentinel {event!r}"
                return event
            try:
                data = await self.stream.receive_some(65536)
            except trio.BrokenResourceError:
                data = b""
            self.eof = not data
            self.h11.receive_data(data)

    async def head(self) -> h11.Response:
        event = await self._event()
        assert isinstance(event, h11.Response), f"expected a head, got {event!r}"
        return event

    async def body_at_least(self, size: int) -> bytes:
        while len(self.body) < size:
            event = await self._event()
            assert isinstance(event, h11.Data), f"expected body data, got {event!r}"
            self.chunks.append((trio.current_time(), bytes(event.data)))
        return self.body

    async def read_to_end(self) -> bool:
        """The rest of the body: True on a clean end, False if cut by a close."""
        while True:
            try:
                event = await self._event()
            except h11.RemoteProtocolError:
                if self.eof:
                    return False
                raise
            if isinstance(event, h11.Data):
                self.chunks.append((trio.current_time(), bytes(event.data)))
            elif isinstance(event, h11.EndOfMessage):
                return True
            else:
                raise AssertionError(f"unexpected {event!r}")


@asynccontextmanager
async def open_client(host: str, port: int) -> AsyncIterator[Client]:
    async with await trio.open_tcp_stream(host, port) as stream:
        yield Client(stream)


def header(response: h11.Response, name: bytes) -> list[bytes]:
    return [v for n, v in response.headers if n == name]


def parse(body: bytes) -> tuple[list[SSEEvent], SSEParser]:
    parser = SSEParser()
    return parser.feed(body), parser


def check_error_event(event: SSEEvent, status: int, request_id: bytes) -> None:
    assert event.type == "error"
    data = json.loads(event.data)
    assert set(data) == {"type", "status", "message", "request_id"}
    assert data["type"] == "error"
    assert data["status"] == status
    assert isinstance(data["message"], str)
    assert data["message"]
    assert data["request_id"] == request_id.decode()


def unexpected_errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if UNEXPECTED in r.getMessage()]


# --------------------------------------------------------------------------- detection


@pytest.mark.parametrize(
    "sse",
    [
        pytest.param(SSESettings(), id="plain-route"),
        pytest.param(SSESettings(heartbeat=15, errors=True), id="sse-route"),
    ],
)
@pytest.mark.parametrize(
    ("content_type", "upstream_headers", "expected"),
    [
        pytest.param(
            b"text/event-stream",
            b"",
            {b"cache-control": [b"no-cache, no-transform"], b"x-accel-buffering": [b"no"]},
            id="sse-without-cache-control",
        ),
        pytest.param(
            b"Text/Event-Stream; charset=utf-8",
            b"",
            {b"cache-control": [b"no-cache, no-transform"], b"x-accel-buffering": [b"no"]},
            id="sse-content-type-with-parameters",
        ),
        pytest.param(
            b"text/event-stream",
            b"Cache-Control: private, max-age=0\r\n",
            {b"cache-control": [b"private, max-age=0"], b"x-accel-buffering": [b"no"]},
            id="sse-with-own-cache-control",
        ),
        pytest.param(
            b"text/event-stream",
            b"X-Accel-Buffering: yes\r\n",
            {b"cache-control": [b"no-cache, no-transform"], b"x-accel-buffering": [b"yes"]},
            id="sse-with-own-x-accel-buffering",
        ),
        pytest.param(
            b"application/json",
            b"",
            {b"cache-control": [], b"x-accel-buffering": []},
            id="not-sse",
        ),
    ],
)
async def test_sse_detection_headers(
    sse: SSESettings, content_type: bytes, upstream_headers: bytes, expected: dict[bytes, object]
) -> None:
    body = b"data: x\n\n"

    async def upstream(stream: trio.SocketStream) -> None:
        await read_until(stream, b"\r\n\r\n")
        await stream.send_all(
            b"HTTP/1.1 200 OK\r\nContent-Type: %s\r\n%sContent-Length: %d\r\n\r\n%s"
            % (content_type, upstream_headers, len(body), body)
        )
        await wait_eof(stream)

    with trio.fail_after(REAL_CAP):
        async with trio.open_nursery() as nursery:
            port = await start_raw_server(nursery, upstream)
            host, pport = await start_proxy(nursery, [sse_route(f"http://127.0.0.1:{port}/", sse)])
            async with open_client(host, pport) as client:
                await client.request(headers=ACCEPT_SSE)
                response = await client.head()
                assert response.status_code == 200
                for name, values in expected.items():
                    assert header(response, name) == values, name
                assert await client.read_to_end()
                assert client.body == body
            nursery.cancel_scope.cancel()


# --------------------------------------------------------------------------- heartbeats


def heartbeat_times(client: Client) -> list[float]:
    return [t for t, data in client.chunks if data == HEARTBEAT]


def without_heartbeats(client: Client) -> bytes:
    return b"".join(data for _, data in client.chunks if data != HEARTBEAT)


async def test_heartbeats_fill_a_silence_between_events() -> None:
    """An event, silence, an event: keep-alives go out during the silence and the events
    arrive unchanged around them (cadence to the second: ``tests/inmem``)."""
    first, second = b"data: one\n\n", b"data: two\n\n"
    beats_seen = trio.Event()

    async def upstream(stream: trio.SocketStream) -> None:
        await read_until(stream, b"\r\n\r\n")
        await stream.send_all(SSE_HEAD + chunk(first))
        await beats_seen.wait()
        await stream.send_all(chunk(second) + LAST_CHUNK)
        await wait_eof(stream)

    with trio.fail_after(REAL_CAP):
        async with trio.open_nursery() as nursery:
            port = await start_raw_server(nursery, upstream)
            route = sse_route(f"http://127.0.0.1:{port}/", SSESettings(heartbeat=BEAT))
            host, pport = await start_proxy(nursery, [route])
            async with open_client(host, pport) as client:
                await client.request()
                assert (await client.head()).status_code == 200
                await client.body_at_least(len(first) + 2 * len(HEARTBEAT))
                beats_seen.set()
                assert await client.read_to_end()
            nursery.cancel_scope.cancel()
    assert client.body.count(HEARTBEAT) >= 2
    assert client.body.replace(HEARTBEAT, b"") == first + second
    assert client.body.endswith(HEARTBEAT + second)


async def test_no_heartbeat_in_the_middle_of_an_event() -> None:
    """Half an event, a silence of several heartbeats, the rest: no keep-alive between the
    halves. After the event is complete the keep-alives resume."""
    halves = (b"data: par", b"tial\n\n")
    beat_seen = trio.Event()

    async def upstream(stream: trio.SocketStream) -> None:
        await read_until(stream, b"\r\n\r\n")
        await stream.send_all(SSE_HEAD + chunk(halves[0]))
        await trio.sleep(5 * BEAT)
        await stream.send_all(chunk(halves[1]))
        await beat_seen.wait()
        await stream.send_all(LAST_CHUNK)
        await wait_eof(stream)

    with trio.fail_after(REAL_CAP):
        async with trio.open_nursery() as nursery:
            port = await start_raw_server(nursery, upstream)
            route = sse_route(f"http://127.0.0.1:{port}/", SSESettings(heartbeat=BEAT))
            host, pport = await start_proxy(nursery, [route])
            async with open_client(host, pport) as client:
                await client.request()
                assert (await client.head()).status_code == 200
                while b"data: partial\n\n" + HEARTBEAT not in client.body:
                    await client.body_at_least(len(client.body) + 1)
                beat_seen.set()
                assert await client.read_to_end()
            nursery.cancel_scope.cancel()
    assert client.body.replace(HEARTBEAT, b"") == b"data: partial\n\n"
    assert b"data: partial\n\n" in client.body, "a keep-alive went out between the halves"


async def test_heartbeat_before_a_leading_bom_keeps_the_first_event() -> None:
    """The upstream thinks until a heartbeat went out, then starts its stream with a
    UTF-8 BOM.

    A BOM is skipped only at the very start of a stream. Whatever the proxy sent first
    must not turn the upstream's BOM into part of a field name: the client must still
    see the first event. Design decision: heartbeats during the think time matter more
    than the BOM's bytes, so after a heartbeat the proxy drops that one leading BOM (a
    no-op anywhere but first) and forwards everything else unchanged.
    """
    stream_bytes = b"\xef\xbb\xbfdata: first\n\ndata: second\n\n"
    beat_seen = trio.Event()

    async def upstream(stream: trio.SocketStream) -> None:
        await read_until(stream, b"\r\n\r\n")
        await stream.send_all(SSE_HEAD)
        await beat_seen.wait()
        await stream.send_all(chunk(stream_bytes) + LAST_CHUNK)
        await wait_eof(stream)

    with trio.fail_after(REAL_CAP):
        async with trio.open_nursery() as nursery:
            port = await start_raw_server(nursery, upstream)
            route = sse_route(f"http://127.0.0.1:{port}/", SSESettings(heartbeat=BEAT))
            host, pport = await start_proxy(nursery, [route])
            async with open_client(host, pport) as client:
                await client.request()
                assert (await client.head()).status_code == 200
                await client.body_at_least(len(HEARTBEAT))
                beat_seen.set()
                assert await client.read_to_end()
            nursery.cancel_scope.cancel()
    assert client.body.startswith(b": keep-alive\n\n")  # the heartbeat did go out first
    assert without_heartbeats(client) == stream_bytes[3:]  # all but the BOM
    assert [e.data for e in SSEParser().feed(stream_bytes)] == ["first", "second"]
    assert [e.data for e in parse(client.body)[0]] == ["first", "second"], client.body


async def test_heartbeats_are_not_upstream_activity(caplog: pytest.LogCaptureFixture) -> None:
    """idle of five heartbeats: keep-alives go out, yet the silent upstream is cut at the
    idle timeout (errors off: the client connection is cut, no terminal chunk)."""
    first = b"data: one\n\n"
    upstream_closed = trio.Event()

    async def upstream(stream: trio.SocketStream) -> None:
        await read_until(stream, b"\r\n\r\n")
        await stream.send_all(SSE_HEAD + chunk(first))
        await wait_eof(stream)
        upstream_closed.set()

    with trio.fail_after(REAL_CAP):
        async with trio.open_nursery() as nursery:
            port = await start_raw_server(nursery, upstream)
            sse = SSESettings(heartbeat=BEAT)
            route = sse_route(f"http://127.0.0.1:{port}/", sse, idle=IDLE)
            host, pport = await start_proxy(nursery, [route])
            async with open_client(host, pport) as client:
                start = trio.current_time()
                await client.request()
                assert (await client.head()).status_code == 200
                await client.body_at_least(len(first) + len(HEARTBEAT))
                assert not await client.read_to_end()
                cut = trio.current_time() - start
                await upstream_closed.wait()
            nursery.cancel_scope.cancel()
    assert client.body.count(HEARTBEAT) >= 1
    assert client.body.replace(HEARTBEAT, b"") == first
    assert cut >= IDLE
    assert not unexpected_errors(caplog)


# --------------------------------------------------------------------------- errors


def _answers_with(status: int) -> Callable[[trio.SocketStream], Awaitable[None]]:
    body = b'{"error": "upstream says no"}'
    reason = {429: b"Too Many Requests", 500: b"Internal Server Error"}[status]

    async def upstream(stream: trio.SocketStream) -> None:
        await read_until(stream, b"\r\n\r\n")
        await stream.send_all(
            b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (status, reason, len(body), body)
        )
        await wait_eof(stream)

    return upstream


async def _never_answers(stream: trio.SocketStream) -> None:
    await read_until(stream, b"\r\n\r\n")
    await wait_eof(stream)


async def _start_failing_upstream(nursery: trio.Nursery, kind: str) -> str:
    if kind == "refused":
        return f"http://127.0.0.1:{refused_port()}/"
    if kind == "response-timeout":
        port = await start_raw_server(nursery, _never_answers)
    else:
        port = await start_raw_server(nursery, _answers_with(int(kind)))
    return f"http://127.0.0.1:{port}/"


@pytest.mark.parametrize(
    ("kind", "status", "at"),
    [
        pytest.param("refused", 502, 0.0, id="refused"),
        pytest.param("response-timeout", 504, RESPONSE, id="response-timeout"),
        pytest.param("429", 429, 0.0, id="upstream-429"),
        pytest.param("500", 500, 0.0, id="upstream-500"),
    ],
)
@pytest.mark.parametrize("client_request_id", [None, b"client-given-id-42"])
async def test_failure_before_head_is_one_sse_error_event(
    kind: str, status: int, at: float, client_request_id: bytes | None
) -> None:
    with trio.fail_after(REAL_CAP):
        async with trio.open_nursery() as nursery:
            upstream = await _start_failing_upstream(nursery, kind)
            route = sse_route(upstream, SSESettings(errors=True), response=RESPONSE)
            host, pport = await start_proxy(nursery, [route])
            async with open_client(host, pport) as client:
                extra = [] if client_request_id is None else [(b"x-request-id", client_request_id)]
                start = trio.current_time()
                await client.request(headers=[*ACCEPT_SSE, *extra])
                response = await client.head()
                answered = trio.current_time() - start
                assert await client.read_to_end()
            nursery.cancel_scope.cancel()
    assert response.status_code == 200
    assert header(response, b"content-type") == [b"text/event-stream"]
    assert header(response, b"cache-control") == [b"no-cache, no-transform"]
    assert header(response, b"x-accel-buffering") == [b"no"]
    (request_id,) = header(response, b"x-request-id")
    if client_request_id is not None:
        assert request_id == client_request_id
    events, parser = parse(client.body)
    assert len(events) == 1, client.body
    assert parser.at_boundary
    check_error_event(events[0], status, request_id)
    assert answered >= at


@pytest.mark.parametrize(
    ("kind", "status", "error_type"),
    [
        pytest.param("refused", 502, "upstream_unreachable", id="refused"),
        pytest.param("response-timeout", 504, "upstream_timeout", id="response-timeout"),
    ],
)
async def test_client_without_accept_gets_plain_json_errors(
    kind: str, status: int, error_type: str
) -> None:
    with trio.fail_after(REAL_CAP):
        async with trio.open_nursery() as nursery:
            upstream = await _start_failing_upstream(nursery, kind)
            sse = SSESettings(errors=True, heartbeat=BEAT)
            route = sse_route(upstream, sse, response=RESPONSE)
            host, pport = await start_proxy(nursery, [route])
            async with open_client(host, pport) as client:
                await client.request(headers=[(b"accept", b"application/json")])
                response = await client.head()
                assert await client.read_to_end()
            nursery.cancel_scope.cancel()
    assert response.status_code == status
    assert header(response, b"content-type") == [b"application/json"]
    error = json.loads(client.body)["error"]
    assert error["type"] == error_type
    assert [error["request_id"].encode()] == header(response, b"x-request-id")


@pytest.mark.parametrize("status", [429, 500])
async def test_client_without_accept_gets_the_upstream_error_status_as_is(status: int) -> None:
    with trio.fail_after(REAL_CAP):
        async with trio.open_nursery() as nursery:
            upstream = await _start_failing_upstream(nursery, str(status))
            route = sse_route(upstream, SSESettings(errors=True))
            host, pport = await start_proxy(nursery, [route])
            async with open_client(host, pport) as client:
                await client.request()
                response = await client.head()
                assert await client.read_to_end()
            nursery.cancel_scope.cancel()
    assert response.status_code == status
    assert client.body == b'{"error": "upstream says no"}'


EVENTS: Final = (b"id: 1\ndata: zero\n\n", b"event: delta\ndata: one\n\n")


@pytest.mark.parametrize(
    ("head", "body", "how", "mid_event"),
    [
        pytest.param(SSE_HEAD, [chunk(e) for e in EVENTS], "fin", False, id="chunked-fin"),
        pytest.param(SSE_HEAD, [chunk(e) for e in EVENTS], "rst", False, id="chunked-rst"),
        pytest.param(
            SSE_HEAD,
            [*(chunk(e) for e in EVENTS), chunk(b"data: par")],
            "fin",
            True,
            id="chunked-fin-mid-event",
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Length: 1000\r\n\r\n",
            list(EVENTS),
            "fin",
            False,
            id="length-short",
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n",
            list(EVENTS),
            "rst",
            False,
            id="close-delimited-rst",
        ),
    ],
)
async def test_upstream_death_after_head_ends_with_error_event_and_clean_end(
    head: bytes, body: list[bytes], how: str, mid_event: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """Errors on: the events so far, an ``error`` event at an event boundary, then a
    clean end (terminal chunk). The start of an unfinished event is held back by the
    proxy and dropped: the error event follows the last complete event."""
    got_events = trio.Event()
    decoded = b"".join(EVENTS)

    async def upstream(stream: trio.SocketStream) -> None:
        await read_until(stream, b"\r\n\r\n")
        await stream.send_all(head + b"".join(body))
        await got_events.wait()
        if how == "rst":
            reset(stream)
        await stream.aclose()

    with trio.fail_after(REAL_CAP):
        async with trio.open_nursery() as nursery:
            port = await start_raw_server(nursery, upstream)
            route = sse_route(f"http://127.0.0.1:{port}/", SSESettings(errors=True, heartbeat=15))
            host, pport = await start_proxy(nursery, [route])
            async with open_client(host, pport) as client:
                await client.request(headers=ACCEPT_SSE)
                response = await client.head()
                assert response.status_code == 200
                assert await client.body_at_least(len(decoded)) == decoded
                got_events.set()
                clean = await client.read_to_end()
            nursery.cancel_scope.cancel()
    (request_id,) = header(response, b"x-request-id")
    assert clean, f"no clean end after the error event; body {client.body!r}"
    assert client.body.startswith(decoded)
    assert b"data: par" not in client.body
    events, parser = parse(client.body)
    assert parser.at_boundary
    assert [e.data for e in events] == ["zero", "one", events[-1].data]
    assert [e.type for e in events].count("error") == 1
    check_error_event(events[-1], 502, request_id)
    assert not unexpected_errors(caplog)


async def test_idle_timeout_mid_stream_ends_with_error_event(
    caplog: pytest.LogCaptureFixture,
) -> None:
    first = b"data: one\n\n"

    async def upstream(stream: trio.SocketStream) -> None:
        await read_until(stream, b"\r\n\r\n")
        await stream.send_all(SSE_HEAD + chunk(first))
        await wait_eof(stream)

    with trio.fail_after(REAL_CAP):
        async with trio.open_nursery() as nursery:
            port = await start_raw_server(nursery, upstream)
            route = sse_route(f"http://127.0.0.1:{port}/", SSESettings(errors=True), idle=IDLE)
            host, pport = await start_proxy(nursery, [route])
            async with open_client(host, pport) as client:
                start = trio.current_time()
                await client.request(headers=ACCEPT_SSE)
                response = await client.head()
                await client.body_at_least(len(first))
                clean = await client.read_to_end()
                ended = trio.current_time() - start
            nursery.cancel_scope.cancel()
    (request_id,) = header(response, b"x-request-id")
    assert clean, f"no clean end after the error event; body {client.body!r}"
    events, parser = parse(client.body)
    assert [e.type for e in events] == ["message", "error"]
    check_error_event(events[1], 504, request_id)
    assert parser.at_boundary
    assert ended >= IDLE
    assert not unexpected_errors(caplog)


@pytest.mark.parametrize("feature", ["heartbeat", "transcript"])
async def test_errors_off_upstream_death_cuts_the_client(
    feature: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A route with another SSE feature but ``errors=false``: no error event, no clean end."""
    got_events = trio.Event()

    async def upstream(stream: trio.SocketStream) -> None:
        await read_until(stream, b"\r\n\r\n")
        await stream.send_all(SSE_HEAD + b"".join(chunk(e) for e in EVENTS))
        await got_events.wait()
        await stream.aclose()

    if feature == "heartbeat":
        sse = SSESettings(heartbeat=15)
    else:
        sse = SSESettings(transcript=str(tmp_path / "t.jsonl"))
    with trio.fail_after(REAL_CAP):
        async with trio.open_nursery() as nursery:
            port = await start_raw_server(nursery, upstream)
            host, pport = await start_proxy(nursery, [sse_route(f"http://127.0.0.1:{port}/", sse)])
            async with open_client(host, pport) as client:
                await client.request(headers=ACCEPT_SSE)
                assert (await client.head()).status_code == 200
                await client.body_at_least(len(b"".join(EVENTS)))
                got_events.set()
                assert not await client.read_to_end(), "a failed stream was passed off as complete"
            nursery.cancel_scope.cancel()
    assert client.body == b"".join(EVENTS)
    assert not unexpected_errors(caplog)


# --------------------------------------------------------------------------- transcript


async def read_transcript(path: Path, lines: int = 1) -> list[dict[str, object]]:
    """Wait (bounded by the caller's cap) until ``path`` holds ``lines`` JSON lines."""
    file = trio.Path(path)
    while True:
        if await file.exists():
            text = await file.read_text()
            if text.count("\n") >= lines:
                return [json.loads(line) for line in text.splitlines()]
        await trio.sleep(0.01)


async def test_transcript_of_a_complete_stream(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    events = [
        b"id: 1\ndata: zero\n\n",
        b"event: delta\nid: 2\ndata: one\ndata: more\n\n",
        b": comment\n\n",
        b"data: two\n\n",
    ]
    go_send, go_recv = trio.open_memory_channel[None](0)

    async def upstream(stream: trio.SocketStream) -> None:
        await read_until(stream, b"\r\n\r\n")
        await stream.send_all(SSE_HEAD)
        for event in events:
            await go_recv.receive()
            await stream.send_all(chunk(event))
        await stream.send_all(LAST_CHUNK)
        await wait_eof(stream)

    with trio.fail_after(REAL_CAP):
        async with trio.open_nursery() as nursery:
            port = await start_raw_server(nursery, upstream)
            route = Route(
                prefix="/sse/",
                upstream=f"http://127.0.0.1:{port}/",
                sse=SSESettings(transcript=str(path)),
            )
            host, pport = await start_proxy(nursery, [route])
            async with open_client(host, pport) as client:
                await client.request(b"/sse/events?token=secret")
                response = await client.head()
                for n in range(len(events)):
                    await go_send.send(None)
                    await client.body_at_least(len(b"".join(events[: n + 1])))
                assert await client.read_to_end()
                (record,) = await read_transcript(path)
            nursery.cancel_scope.cancel()
    assert client.body == b"".join(events)
    (request_id,) = header(response, b"x-request-id")
    assert record["request_id"] == request_id.decode()
    assert record["route"] == "/sse/"
    assert record["path"] == "/sse/events"
    assert "secret" not in json.dumps(record)
    assert record["status"] == 200
    assert record["events"] == [
        {"type": "message", "id": "1", "data": "zero"},
        {"type": "delta", "id": "2", "data": "one\nmore"},
        {"type": "message", "id": "2", "data": "two"},
    ]
    assert record["events_count"] == 3
    assert record["truncated"] is False
    assert record["outcome"] == "complete"


async def test_transcript_client_gone(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    first = b"data: zero\n\n"
    upstream_closed = trio.Event()

    async def upstream(stream: trio.SocketStream) -> None:
        await read_until(stream, b"\r\n\r\n")
        await stream.send_all(SSE_HEAD + chunk(first))
        await wait_eof(stream)  # silent until the proxy lets go
        upstream_closed.set()

    with trio.fail_after(REAL_CAP):
        async with trio.open_nursery() as nursery:
            port = await start_raw_server(nursery, upstream)
            route = sse_route(f"http://127.0.0.1:{port}/", SSESettings(transcript=str(path)))
            host, pport = await start_proxy(nursery, [route])
            async with open_client(host, pport) as client:
                await client.request()
                assert (await client.head()).status_code == 200
                await client.body_at_least(len(first))
                await client.stream.aclose()
            await upstream_closed.wait()
            (record,) = await read_transcript(path)
            nursery.cancel_scope.cancel()
    assert record["outcome"] == "client_gone"
    assert record["events"] == [{"type": "message", "data": "zero"}]
    assert record["events_count"] == 1


@pytest.mark.parametrize("errors", [False, True])
async def test_transcript_upstream_failed(
    tmp_path: Path, errors: bool, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "t.jsonl"
    first = b"data: zero\n\n"
    got_first = trio.Event()

    async def upstream(stream: trio.SocketStream) -> None:
        await read_until(stream, b"\r\n\r\n")
        await stream.send_all(SSE_HEAD + chunk(first) + chunk(b"data: half"))
        await got_first.wait()
        reset(stream)
        await stream.aclose()

    with trio.fail_after(REAL_CAP):
        async with trio.open_nursery() as nursery:
            port = await start_raw_server(nursery, upstream)
            sse = SSESettings(transcript=str(path), errors=errors)
            host, pport = await start_proxy(nursery, [sse_route(f"http://127.0.0.1:{port}/", sse)])
            async with open_client(host, pport) as client:
                await client.request(headers=ACCEPT_SSE)
                assert (await client.head()).status_code == 200
                await client.body_at_least(len(first))
                got_first.set()
                assert await client.read_to_end() is errors
                (record,) = await read_transcript(path)
            nursery.cancel_scope.cancel()
    assert record["outcome"] == "upstream_failed"
    assert record["events"] == [{"type": "message", "data": "zero"}]
    assert record["events_count"] == 1
    assert not unexpected_errors(caplog)


async def test_transcript_idle_timeout(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    first = b"data: zero\n\n"

    async def upstream(stream: trio.SocketStream) -> None:
        await read_until(stream, b"\r\n\r\n")
        await stream.send_all(SSE_HEAD + chunk(first))
        await wait_eof(stream)

    with trio.fail_after(REAL_CAP):
        async with trio.open_nursery() as nursery:
            port = await start_raw_server(nursery, upstream)
            sse = SSESettings(transcript=str(path), heartbeat=BEAT)
            route = sse_route(f"http://127.0.0.1:{port}/", sse, idle=IDLE)
            host, pport = await start_proxy(nursery, [route])
            async with open_client(host, pport) as client:
                await client.request()
                assert (await client.head()).status_code == 200
                assert not await client.read_to_end()
                (record,) = await read_transcript(path)
            nursery.cancel_scope.cancel()
    assert record["outcome"] == "timeout"
    assert record["events"] == [{"type": "message", "data": "zero"}]


async def test_transcript_memory_bound(tmp_path: Path) -> None:
    """transcript_max_bytes=1024, ~100 KB of events: truncated, <= 1 KiB kept, all counted."""
    path = tmp_path / "t.jsonl"
    events = [b"data: %04d %s\n\n" % (n, b"x" * 88) for n in range(1000)]
    stream_bytes = b"".join(events)
    assert len(stream_bytes) >= 100_000

    async def upstream(stream: trio.SocketStream) -> None:
        await read_until(stream, b"\r\n\r\n")
        await stream.send_all(SSE_HEAD + b"".join(chunk(e) for e in events) + LAST_CHUNK)
        await wait_eof(stream)

    with trio.fail_after(REAL_CAP):
        async with trio.open_nursery() as nursery:
            port = await start_raw_server(nursery, upstream)
            sse = SSESettings(transcript=str(path), transcript_max_bytes=1024)
            host, pport = await start_proxy(nursery, [sse_route(f"http://127.0.0.1:{port}/", sse)])
            async with open_client(host, pport) as client:
                await client.request()
                assert (await client.head()).status_code == 200
                assert await client.read_to_end()
                (record,) = await read_transcript(path)
            nursery.cancel_scope.cancel()
    assert client.body == stream_bytes
    assert record["truncated"] is True
    assert record["events_count"] == 1000
    kept = record["events"]
    assert isinstance(kept, list)
    assert 0 < len(kept) < 1000
    assert sum(len(e["data"]) + len(e["type"]) for e in kept) <= 1024
    assert [e["data"] for e in kept] == [events[n][6:-2].decode() for n in range(len(kept))]
    assert len(json.dumps(kept)) < 2048


async def test_slow_transcript_writer_does_not_delay_delivery(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The disk write is stuck (a gate the test opens at the end) while streams flow.

    Two streams in lockstep: the first one's line is queued and its write hangs; the
    second stream is relayed completely while that write is still pending. Then the
    gate opens and both lines are written.
    """
    path = tmp_path / "t.jsonl"
    gate = threading.Event()
    started = threading.Event()
    real_append = proxycore.observe.transcript.append_line

    def stuck_append(target: str, line: bytes) -> None:
        started.set()
        gate.wait(5.0)  # bounded: a proxy blocking its event loop here still ends
        real_append(target, line)

    monkeypatch.setattr(proxycore.observe.transcript, "append_line", stuck_append)
    events = [b"data: %d\n\n" % n for n in range(5)]
    go_send, go_recv = trio.open_memory_channel[None](0)

    async def upstream(stream: trio.SocketStream) -> None:
        await read_until(stream, b"\r\n\r\n")
        await stream.send_all(SSE_HEAD.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))
        for event in events:
            await go_recv.receive()
            await stream.send_all(chunk(event))
        await go_recv.receive()
        await stream.send_all(LAST_CHUNK)

    async def one_stream(host: str, port: int) -> None:
        async with open_client(host, port) as client:
            await client.request()
            assert (await client.head()).status_code == 200
            for n in range(len(events)):
                await go_send.send(None)
                await client.body_at_least(len(b"".join(events[: n + 1])))
            await go_send.send(None)
            assert await client.read_to_end()
            assert client.body == b"".join(events)

    try:
        with trio.fail_after(REAL_CAP):
            async with trio.open_nursery() as nursery:
                port = await start_raw_server(nursery, upstream)
                sse = SSESettings(transcript=str(path), heartbeat=15)
                route = sse_route(f"http://127.0.0.1:{port}/", sse)
                host, pport = await start_proxy(nursery, [route])
                await one_stream(host, pport)
                assert await trio.to_thread.run_sync(started.wait, 5.0)
                await one_stream(host, pport)
                assert not path.exists(), "the write was supposed to be still pending"
                gate.set()
                records = await read_transcript(path, 2)
                nursery.cancel_scope.cancel()
    finally:
        gate.set()
    assert [r["outcome"] for r in records] == ["complete", "complete"]
    assert [r["events_count"] for r in records] == [5, 5]


# --------------------------------------------------------------------------- bytes


#: Awkward pieces: CR/LF split across reads, CR-only line ends, comments, a
#: multi-byte character split, an event larger than one 4 KiB read, a missing space.
PIECES: Final = (
    b"data: first\r",
    b"\n\r\n",
    b": a comment\n",
    b"event: upd",
    b"ate\nid: 1\ndata: h\xc3",
    b"\xa9\rdata:line2\r\r",
    b"data: a\n\ndata: " + b"x" * 5000 + b"\n\n",
    b"retry: 10\ndata: tail\r\n",
    b"\r\n",
)


@pytest.mark.parametrize("framing", ["chunked", "length", "close"])
async def test_bytes_are_never_altered_with_every_feature_on(tmp_path: Path, framing: str) -> None:
    """heartbeat, errors, transcript and an ``on_sse_event`` hook all on, pauses longer
    than a heartbeat between the pieces (mid-event ones included), and one wait at an
    event boundary until the client got a keep-alive: the body minus the keep-alive
    chunks is the upstream's bytes."""
    total = b"".join(PIECES)
    seen: list[SSEEvent] = []
    beat = 0.05
    beat_seen = trio.Event()

    async def on_sse_event(exchange: ExchangeInfo, event: SSEEvent) -> None:
        seen.append(event)

    async def upstream(stream: trio.SocketStream) -> None:
        await read_until(stream, b"\r\n\r\n")
        head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
        if framing == "chunked":
            head += b"Transfer-Encoding: chunked\r\n"
        elif framing == "length":
            head += b"Content-Length: %d\r\n" % len(total)
        await stream.send_all(head + b"\r\n")
        for n, piece in enumerate(PIECES):
            await trio.sleep(1.5 * beat)
            await stream.send_all(chunk(piece) if framing == "chunked" else piece)
            if n == 1:  # at an event boundary: wait until a keep-alive got in
                await beat_seen.wait()
        if framing == "chunked":
            await stream.send_all(LAST_CHUNK)
            await wait_eof(stream)

    path = tmp_path / "t.jsonl"
    with trio.fail_after(REAL_CAP):
        async with trio.open_nursery() as nursery:
            port = await start_raw_server(nursery, upstream)
            sse = SSESettings(heartbeat=beat, errors=True, transcript=str(path))
            config = Config(
                routes=(sse_route(f"http://127.0.0.1:{port}/", sse),),
                server=ServerSettings(listen=("127.0.0.1:0",)),
            )
            start = functools.partial(serve, config, hooks=Hooks(on_sse_event=on_sse_event))
            ((host, pport),) = await nursery.start(start)
            async with open_client(host, pport) as client:
                await client.request(headers=ACCEPT_SSE)
                assert (await client.head()).status_code == 200
                # Only keep-alives can add to the first event before beat_seen is set.
                await client.body_at_least(len(PIECES[0] + PIECES[1] + HEARTBEAT))
                beat_seen.set()
                assert await client.read_to_end()
            (record,) = await read_transcript(path)
            nursery.cancel_scope.cancel()
    assert without_heartbeats(client) == total
    assert heartbeat_times(client), "the pauses were meant to let heartbeats in"
    expected = SSEParser().feed(total)
    assert [e.data for e in expected] == ["first", "hé\nline2", "a", "x" * 5000, "tail"]
    assert [e.as_dict() for e in seen] == [e.as_dict() for e in expected]
    assert record["events"] == [e.as_dict() for e in expected]
    assert record["outcome"] == "complete"
    # The client's own parse of what it got sees the same events (heartbeats are comments).
    assert [e.as_dict() for e in parse(client.body)[0]] == [e.as_dict() for e in expected]
