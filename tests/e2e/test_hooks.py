"""Hooks of the embedded library (``proxycore.proxy.hooks``), end to end.

The proxy is started with ``await nursery.start(functools.partial(serve, config,
hooks=Hooks(...)))``. Upstreams are hypercorn (``echo_app``) where the request seen
upstream matters, raw sockets where bytes or timing matter. Hook failures are checked
on the ``proxycore.proxy.exchange`` logger and by reusing the client connection afterwards.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from typing import Final

import h11
import pytest
import trio

from proxycore import Config, Route, ServerSettings, serve
from proxycore.config import SSESettings
from proxycore.http.sse import SSEEvent, SSEParser
from proxycore.proxy.hooks import ExchangeInfo, Headers, Hooks, Request, Response, Summary
from tests.apps import echo_app
from tests.helpers import read_until, start_app, start_raw_server

CAP: Final = 10.0
SSE_HEAD: Final = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
)
LAST_CHUNK: Final = b"0\r\n\r\n"


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


async def wait_eof(stream: trio.SocketStream) -> None:
    try:
        while await stream.receive_some(65536):
            pass
    except trio.BrokenResourceError:
        pass


async def start_hooked_proxy(
    nursery: trio.Nursery, routes: Sequence[Route], hooks: Hooks
) -> tuple[str, int]:
    config = Config(routes=tuple(routes), server=ServerSettings(listen=("127.0.0.1:0",)))
    addresses: list[tuple[str, int]] = await nursery.start(
        functools.partial(serve, config, hooks=hooks)
    )
    return addresses[0]


class Client:
    """A raw keep-alive client; h11 writes requests and parses responses."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.h11 = h11.Connection(h11.CLIENT)
        self.body = bytearray()
        #: The framed size of every body chunk received (chunk header + data + CRLF).
        self.chunk_sizes: list[int] = []
        self.eof = False

    async def request(
        self,
        method: bytes,
        target: bytes,
        headers: Iterable[tuple[bytes, bytes]] = (),
        body: bytes = b"",
    ) -> None:
        all_headers = [(b"host", b"proxy"), *headers]
        if body or method == b"POST":
            all_headers.append((b"content-length", b"%d" % len(body)))
        out = self.h11.send(h11.Request(method=method, target=target, headers=all_headers)) or b""
        if body:
            out += self.h11.send(h11.Data(data=body)) or b""
        out += self.h11.send(h11.EndOfMessage()) or b""
        await self.stream.send_all(out)

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

    def _add(self, data: bytes) -> None:
        self.body += data
        self.chunk_sizes.append(len(b"%x\r\n" % len(data)) + len(data) + 2)

    async def body_at_least(self, size: int) -> bytes:
        while len(self.body) < size:
            event = await self._event()
            assert isinstance(event, h11.Data), f"expected body data, got {event!r}"
            self._add(bytes(event.data))
        return bytes(self.body)

    async def read_to_end(self) -> bool:
        while True:
            try:
                event = await self._event()
            except h11.RemoteProtocolError:
                if self.eof:
                    return False
                raise
            if isinstance(event, h11.Data):
                self._add(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                return True
            else:
                raise AssertionError(f"unexpected {event!r}")

    async def exchange(
        self,
        method: bytes,
        target: bytes,
        headers: Iterable[tuple[bytes, bytes]] = (),
        body: bytes = b"",
    ) -> tuple[h11.Response, bytes]:
        """One whole request/response on this connection (ready for the next one after)."""
        if self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE:
            self.h11.start_next_cycle()
            self.body.clear()
            self.chunk_sizes.clear()
        await self.request(method, target, headers, body)
        response = await self.head()
        assert await self.read_to_end()
        return response, bytes(self.body)


@asynccontextmanager
async def open_client(host: str, port: int) -> AsyncIterator[Client]:
    async with await trio.open_tcp_stream(host, port) as stream:
        yield Client(stream)


def header(response: h11.Response, name: bytes) -> bytes | None:
    values = [v for n, v in response.headers if n == name]
    return values[0] if values else None


def request_id_of(response: h11.Response) -> str:
    value = header(response, b"x-request-id")
    assert value is not None
    return value.decode()


def hook_failures(caplog: pytest.LogCaptureFixture, name: str) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name == "proxycore.exchange" and name in r.getMessage() and r.levelno >= logging.ERROR
    ]


# --------------------------------------------------------------------------- on_request


async def test_on_request_sees_the_request_and_adds_a_header() -> None:
    seen: list[Request] = []

    async def on_request(request: Request) -> Response | None:
        seen.append(request)
        request.headers.append((b"X-Hooked", b"yes"))
        return None

    body = b'{"message": "hi"}'
    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            up_host, up_port = await start_app(nursery, echo_app)
            route = Route(prefix="/api/", upstream=f"http://{up_host}:{up_port}/v1/")
            host, port = await start_hooked_proxy(nursery, [route], Hooks(on_request=on_request))
            async with open_client(host, port) as client:
                response, echoed = await client.exchange(
                    b"POST", b"/api/items?a=1&b=2", [(b"X-Custom", b"value")], body
                )
            nursery.cancel_scope.cancel()
    assert response.status_code == 200
    echo = json.loads(echoed)
    assert echo["path"] == "/v1/items"
    assert ["x-hooked", "yes"] in echo["headers"]
    assert echo["body_len"] == len(body)
    (request,) = seen
    assert request.method == "POST"
    assert request.path == "/api/items"
    assert request.query == "?a=1&b=2"
    assert (b"x-custom", b"value") in [(n.lower(), v) for n, v in request.headers]
    assert request.body == body
    assert request.exchange.request_id == request_id_of(response)
    assert request.exchange.route == "/api/"
    assert request.exchange.path == "/api/items"
    assert request.exchange.method == "POST"
    assert request.exchange.client == "127.0.0.1"


async def test_on_request_body_is_none_while_the_body_is_still_coming() -> None:
    """Only part of the body came with the head: ``body`` is None and the body streams."""
    seen: list[bytes | None] = []
    hook_ran = trio.Event()

    async def on_request(request: Request) -> Response | None:
        seen.append(request.body)
        hook_ran.set()
        return None

    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            up_host, up_port = await start_app(nursery, echo_app)
            route = Route(prefix="/", upstream=f"http://{up_host}:{up_port}/")
            host, port = await start_hooked_proxy(nursery, [route], Hooks(on_request=on_request))
            async with await trio.open_tcp_stream(host, port) as stream:
                await stream.send_all(
                    b"POST /x HTTP/1.1\r\nHost: p\r\nContent-Length: 10\r\n\r\nhello"
                )
                await hook_ran.wait()
                await stream.send_all(b"world")
                data = await read_until(stream, b"}")
            nursery.cancel_scope.cancel()
    assert seen == [None]
    assert b'"body_len": 10' in data


async def test_on_request_body_of_a_chunked_request_is_not_its_framing() -> None:
    """A chunked request complete in the first read: ``body`` is the payload (or None),
    never the chunk framing (a hook parsing the JSON body would choke on it)."""
    seen: list[bytes | None] = []

    async def on_request(request: Request) -> Response | None:
        seen.append(request.body)
        return None

    payload = b'{"message": "hi"}'
    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            up_host, up_port = await start_app(nursery, echo_app)
            route = Route(prefix="/", upstream=f"http://{up_host}:{up_port}/")
            host, port = await start_hooked_proxy(nursery, [route], Hooks(on_request=on_request))
            async with await trio.open_tcp_stream(host, port) as stream:
                await stream.send_all(
                    b"POST /x HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: chunked\r\n\r\n"
                    + chunk(payload)
                    + LAST_CHUNK
                )
                data = await read_until(stream, b"}")
            nursery.cancel_scope.cancel()
    assert b'"body_len": %d' % len(payload) in data
    assert seen in ([payload], [None]), seen


async def test_on_request_can_answer_directly() -> None:
    """A policy hook: 403 for /deny/ paths (the upstream is never asked), others pass."""
    upstream_requests: list[bytes] = []
    ended: list[Summary] = []

    async def upstream(stream: trio.SocketStream) -> None:
        while True:
            try:
                head = await read_until(stream, b"\r\n\r\n")
            except EOFError:
                return
            upstream_requests.append(head.split(b"\r\n", 1)[0])
            await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    async def on_request(request: Request) -> Response | None:
        if request.path.startswith("/deny/"):
            return Response(
                403,
                headers=[(b"Content-Type", b"text/plain"), (b"Content-Length", b"999")],
                body=b"denied by policy",
            )
        return None

    async def on_exchange_end(exchange: ExchangeInfo, summary: Summary) -> None:
        ended.append(summary)

    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            port = await start_raw_server(nursery, upstream)
            route = Route(prefix="/", upstream=f"http://127.0.0.1:{port}/")
            hooks = Hooks(on_request=on_request, on_exchange_end=on_exchange_end)
            host, pport = await start_hooked_proxy(nursery, [route], hooks)
            async with open_client(host, pport) as client:
                denied, denied_body = await client.exchange(b"GET", b"/deny/secret")
                assert upstream_requests == []
                allowed, allowed_body = await client.exchange(b"GET", b"/fine")
            nursery.cancel_scope.cancel()
    assert denied.status_code == 403
    assert denied_body == b"denied by policy"
    assert header(denied, b"content-length") == b"16"
    assert header(denied, b"content-type") == b"text/plain"
    assert header(denied, b"x-request-id")
    assert allowed.status_code == 200
    assert allowed_body == b"ok"
    assert upstream_requests == [b"GET /fine HTTP/1.1"]
    assert [s.outcome for s in ended] == ["answered_by_hook", "complete"]
    assert [s.status for s in ended] == [403, 200]


# --------------------------------------------------------------------------- on_response_head


async def test_on_response_head_sees_status_and_headers_and_can_add_one() -> None:
    seen: list[tuple[str, int, Headers]] = []

    async def on_response_head(exchange: ExchangeInfo, status: int, headers: Headers) -> None:
        seen.append((exchange.request_id, status, list(headers)))
        headers.append((b"X-From-Hook", b"1"))

    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            up_host, up_port = await start_app(nursery, echo_app)
            route = Route(prefix="/", upstream=f"http://{up_host}:{up_port}/")
            hooks = Hooks(on_response_head=on_response_head)
            host, port = await start_hooked_proxy(nursery, [route], hooks)
            async with open_client(host, port) as client:
                response, _ = await client.exchange(b"GET", b"/x", [(b"x-echo-status", b"201")])
            nursery.cancel_scope.cancel()
    assert response.status_code == 201
    assert header(response, b"x-from-hook") == b"1"
    ((request_id, status, headers),) = seen
    assert request_id == request_id_of(response)
    assert status == 201
    assert (b"content-type", b"application/json") in [(n.lower(), v) for n, v in headers]


# --------------------------------------------------------------------------- on_sse_event

EVENTS: Final = (
    b"id: 1\ndata: zero\n\n",
    b"event: delta\ndata: one\ndata: two\n\n",
    b": comment\n\n",
    b"data: three\r\n\r\ndata: four\n\n",
)


@pytest.mark.parametrize(
    "sse",
    [
        pytest.param(SSESettings(), id="plain-route-hook-only"),
        pytest.param(SSESettings(heartbeat=15, errors=True), id="sse-route"),
    ],
)
async def test_on_sse_event_gets_every_event_after_it_was_forwarded(sse: SSESettings) -> None:
    """The hook for event n waits until the client has event n's bytes: were the hook
    called before forwarding, the test would deadlock (and hit its cap)."""
    stream_bytes = b"".join(EVENTS)
    expected = SSEParser().feed(stream_bytes)
    ends: list[int] = []
    parser = SSEParser()
    for i in range(len(stream_bytes)):  # where each event's bytes end
        if parser.feed(stream_bytes[i : i + 1]):
            ends.append(i + 1)
    seen: list[tuple[str, SSEEvent]] = []
    client_has: list[trio.Event] = [trio.Event() for _ in expected]

    async def on_sse_event(exchange: ExchangeInfo, event: SSEEvent) -> None:
        await client_has[len(seen)].wait()
        seen.append((exchange.request_id, event))

    async def upstream(stream: trio.SocketStream) -> None:
        await read_until(stream, b"\r\n\r\n")
        await stream.send_all(SSE_HEAD + b"".join(chunk(e) for e in EVENTS) + LAST_CHUNK)
        await wait_eof(stream)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            port = await start_raw_server(nursery, upstream)
            route = Route(prefix="/", upstream=f"http://127.0.0.1:{port}/", sse=sse)
            hooks = Hooks(on_sse_event=on_sse_event)
            host, pport = await start_hooked_proxy(nursery, [route], hooks)
            async with open_client(host, pport) as client:
                await client.request(b"GET", b"/events")
                response = await client.head()
                for n, end in enumerate(ends):
                    await client.body_at_least(end)
                    client_has[n].set()
                assert await client.read_to_end()
            nursery.cancel_scope.cancel()
    assert bytes(client.body) == stream_bytes
    assert [e.as_dict() for _, e in seen] == [e.as_dict() for e in expected]
    assert [e.data for _, e in seen] == ["zero", "one\ntwo", "three", "four"]
    rid = header(response, b"x-request-id")
    assert rid is not None
    assert {r for r, _ in seen} == {rid.decode()}


# --------------------------------------------------------------------------- on_exchange_end


async def test_on_exchange_end_summary_of_an_sse_stream() -> None:
    """Head after 0.3 s, last event 0.2 s later: ttfb at least 0.3 s, duration at least
    0.5 s (real clock: only lower bounds are exact), events from the tap."""
    ended: list[tuple[ExchangeInfo, Summary]] = []
    done = trio.Event()

    async def on_exchange_end(exchange: ExchangeInfo, summary: Summary) -> None:
        ended.append((exchange, summary))
        done.set()

    async def upstream(stream: trio.SocketStream) -> None:
        await read_until(stream, b"\r\n\r\n")
        await trio.sleep(0.3)
        await stream.send_all(SSE_HEAD + chunk(EVENTS[0]))
        await trio.sleep(0.2)
        await stream.send_all(chunk(EVENTS[1]) + LAST_CHUNK)
        await wait_eof(stream)

    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            port = await start_raw_server(nursery, upstream)
            route = Route(
                prefix="/", upstream=f"http://127.0.0.1:{port}/", sse=SSESettings(heartbeat=60)
            )
            host, pport = await start_hooked_proxy(
                nursery, [route], Hooks(on_exchange_end=on_exchange_end)
            )
            async with open_client(host, pport) as client:
                response, body = await client.exchange(b"GET", b"/events?x=1")
                await done.wait()
            nursery.cancel_scope.cancel()
    assert body == EVENTS[0] + EVENTS[1]
    ((exchange, summary),) = ended
    assert exchange.request_id == request_id_of(response)
    assert exchange.path == "/events"
    assert summary.status == 200
    assert summary.outcome == "complete"
    assert summary.bytes_in == 0
    assert summary.bytes_out == sum(client.chunk_sizes) + len(LAST_CHUNK)
    assert summary.ttfb is not None
    assert summary.ttfb >= 0.3
    assert summary.duration >= 0.5
    assert summary.ttfb <= summary.duration
    assert summary.events is not None
    assert [e.as_dict() for e in summary.events] == [
        {"type": "message", "id": "1", "data": "zero"},
        {"type": "delta", "id": "1", "data": "one\ntwo"},
    ]
    assert summary.events_truncated is False


async def test_on_exchange_end_without_the_tap_has_no_events() -> None:
    ended: list[Summary] = []
    done = trio.Event()

    async def on_exchange_end(exchange: ExchangeInfo, summary: Summary) -> None:
        ended.append(summary)
        done.set()

    body = b"0123456789"
    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            up_host, up_port = await start_app(nursery, echo_app)
            route = Route(prefix="/", upstream=f"http://{up_host}:{up_port}/")
            hooks = Hooks(on_exchange_end=on_exchange_end)
            host, port = await start_hooked_proxy(nursery, [route], hooks)
            async with open_client(host, port) as client:
                response, echoed = await client.exchange(b"POST", b"/x", body=body)
                await done.wait()
            nursery.cancel_scope.cancel()
    (summary,) = ended
    assert response.status_code == 200
    assert summary.status == 200
    assert summary.outcome == "complete"
    assert summary.bytes_in == len(body)
    assert summary.bytes_out == len(echoed)
    assert summary.events is None
    assert summary.events_truncated is False


# --------------------------------------------------------------------------- failing hooks


async def test_raising_on_request_gives_500_logs_and_keeps_the_connection(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def on_request(request: Request) -> Response | None:
        if request.path == "/boom":
            raise RuntimeError("hook bug")
        return None

    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            up_host, up_port = await start_app(nursery, echo_app)
            route = Route(prefix="/", upstream=f"http://{up_host}:{up_port}/")
            host, port = await start_hooked_proxy(nursery, [route], Hooks(on_request=on_request))
            async with open_client(host, port) as client:
                failed, failed_body = await client.exchange(b"GET", b"/boom")
                ok, _ = await client.exchange(b"GET", b"/fine")  # same connection
            nursery.cancel_scope.cancel()
    assert failed.status_code == 500
    assert header(failed, b"content-type") == b"application/json"
    assert header(failed, b"connection") != b"close"
    error = json.loads(failed_body)["error"]
    request_id = header(failed, b"x-request-id")
    assert request_id is not None
    assert error["type"] == "internal_error"
    assert error["request_id"] == request_id.decode()
    assert "hook bug" not in failed_body.decode()
    assert ok.status_code == 200
    (record,) = hook_failures(caplog, "on_request")
    assert request_id.decode() in record.getMessage()
    assert record.exc_info is not None
    assert isinstance(record.exc_info[1], RuntimeError)


async def test_raising_on_response_head_gives_500(caplog: pytest.LogCaptureFixture) -> None:
    calls = 0

    async def on_response_head(exchange: ExchangeInfo, status: int, headers: Headers) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ValueError("head hook bug")

    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            up_host, up_port = await start_app(nursery, echo_app)
            route = Route(prefix="/", upstream=f"http://{up_host}:{up_port}/")
            hooks = Hooks(on_response_head=on_response_head)
            host, port = await start_hooked_proxy(nursery, [route], hooks)
            async with open_client(host, port) as client:
                failed, failed_body = await client.exchange(b"GET", b"/x")
                ok, _ = await client.exchange(b"GET", b"/y")
            nursery.cancel_scope.cancel()
    assert failed.status_code == 500
    request_id = header(failed, b"x-request-id")
    assert request_id is not None
    assert json.loads(failed_body)["error"]["request_id"] == request_id.decode()
    assert ok.status_code == 200
    (record,) = hook_failures(caplog, "on_response_head")
    assert request_id.decode() in record.getMessage()


async def test_raising_on_sse_event_and_on_exchange_end_leave_the_stream_alone(
    caplog: pytest.LogCaptureFixture,
) -> None:
    ended = trio.Event()

    async def on_sse_event(exchange: ExchangeInfo, event: SSEEvent) -> None:
        raise RuntimeError(f"event hook bug on {event.data}")

    async def on_exchange_end(exchange: ExchangeInfo, summary: Summary) -> None:
        ended.set()
        raise RuntimeError("end hook bug")

    async def upstream(stream: trio.SocketStream) -> None:
        while True:
            try:
                await read_until(stream, b"\r\n\r\n")
            except EOFError:
                return
            await stream.send_all(SSE_HEAD + b"".join(chunk(e) for e in EVENTS) + LAST_CHUNK)

    stream_bytes = b"".join(EVENTS)
    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            port = await start_raw_server(nursery, upstream)
            route = Route(prefix="/", upstream=f"http://127.0.0.1:{port}/")
            hooks = Hooks(on_sse_event=on_sse_event, on_exchange_end=on_exchange_end)
            host, pport = await start_hooked_proxy(nursery, [route], hooks)
            async with open_client(host, pport) as client:
                first, first_body = await client.exchange(b"GET", b"/events")
                await ended.wait()
                second, second_body = await client.exchange(b"GET", b"/events")
            nursery.cancel_scope.cancel()
    assert first.status_code == second.status_code == 200
    assert first_body == second_body == stream_bytes
    request_id = header(first, b"x-request-id")
    assert request_id is not None
    event_failures = hook_failures(caplog, "on_sse_event")
    assert len(event_failures) == 2 * len(SSEParser().feed(stream_bytes))
    assert request_id.decode() in event_failures[0].getMessage()
    assert len(hook_failures(caplog, "on_exchange_end")) == 2
