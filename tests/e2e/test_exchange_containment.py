"""Nothing unexpected escapes an exchange (issue 12).

Any exception inside one exchange that is not a ``ProxyError`` (a bug, a library's
surprise) ends that exchange and nothing else: a 500 JSON error carrying the request id
if nothing was sent yet, else a cut; ONE log line with the request id (type and place,
never the message: it may quote request bytes), no traceback, no ExceptionGroup (an
exception in a nursery, the upstream core's or the SSE relay's, surfaces as itself); the
proxy serves the next request. Both front ends: the native server (real sockets on
127.0.0.1) and ``ProxyApp`` (called directly, its upstream a real socket).

The first test is the case that was reported: an upstream ``retry:`` field of thousands
of digits made the SSE tap raise ``ValueError`` (now the parser ignores it).

Real clock, no wall-clock upper bounds but the outer cap.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, MutableMapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Final

import h11
import pytest
import trio

import proxycore.proxy.asgi as asgi_module
from proxycore import Config, Route
from proxycore.config import SSESettings
from proxycore.http.sse import SSEParser
from proxycore.proxy.asgi import ProxyApp
from proxycore.proxy.relay import RawRequestBody
from proxycore.proxy.upstream import UpstreamCall
from tests.helpers import http_request, read_until, start_proxy, start_raw_server

REAL_CAP: Final = 10.0
SSE_HEAD: Final = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
)
LAST_CHUNK: Final = b"0\r\n\r\n"
OK: Final = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
SECRET: Final = "message-that-must-not-be-logged"


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def problems(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """Every record above INFO (access lines are INFO)."""
    return [r for r in caplog.records if r.levelno >= logging.WARNING]


def check_one_line(caplog: pytest.LogCaptureFixture, request_id: str, kind: str) -> None:
    (record,) = problems(caplog)
    line = record.getMessage()
    assert request_id in line
    assert kind in line
    assert "\n" not in line
    assert SECRET not in line
    assert record.exc_info is None, "a traceback was logged"
    assert "ExceptionGroup" not in caplog.text
    assert "Traceback" not in caplog.text


def access(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    """The access lines (the test sets ``proxycore.access`` to INFO first)."""
    return [json.loads(r.getMessage()) for r in caplog.records if r.name == "proxycore.access"]


async def serve_upstream(stream: trio.SocketStream) -> None:
    """Every request on the connection gets ``OK`` (keep-alive)."""
    while True:
        try:
            await read_until(stream, b"\r\n\r\n")
        except EOFError:
            return
        await stream.send_all(OK)


class Client:
    """A raw client connection parsed with h11 (a cut is told apart from a clean end)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream, self.h11, self.body = stream, h11.Connection(h11.CLIENT), b""

    async def send(self, request: h11.Request, body: bytes = b"") -> None:
        data = self.h11.send(request) or b""
        if body:
            data += self.h11.send(h11.Data(data=body)) or b""
        await self.stream.send_all(data + (self.h11.send(h11.EndOfMessage()) or b""))

    async def event(self) -> h11.Event:
        while True:
            event = self.h11.next_event()
            if event is not h11.NEED_DATA:
                assert not isinstance(event, type)
                return event
            try:
                data = await self.stream.receive_some(65536)
            except trio.BrokenResourceError:
                data = b""
            self.h11.receive_data(data)

    async def head(self) -> h11.Response:
        event = await self.event()
        assert isinstance(event, h11.Response), event
        return event

    async def read_to_end(self) -> bool:
        """The body: True on a clean end, False if the connection was cut."""
        while True:
            try:
                event = await self.event()
            except h11.RemoteProtocolError:
                return False
            if isinstance(event, h11.Data):
                self.body += bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                return True
            else:
                raise AssertionError(event)


@asynccontextmanager
async def open_client(host: str, port: int) -> AsyncIterator[Client]:
    async with await trio.open_tcp_stream(host, port) as stream:
        yield Client(stream)


def get(target: bytes = b"/x", *headers: tuple[bytes, bytes]) -> h11.Request:
    return h11.Request(method=b"GET", target=target, headers=[(b"host", b"p"), *headers])


def header(response: h11.Response, name: bytes) -> bytes:
    (value,) = [v for n, v in response.headers if n == name]
    return bytes(value)


async def next_request_is_served(host: str, port: int) -> None:
    status, _, body = await http_request(host, port, "GET", "/next")
    assert (status, body) == (200, b"ok")


# --------------------------------------------------------------------------- the reported case


async def test_a_retry_of_thousands_of_digits_is_relayed_unharmed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An SSE route with the tap on: an event with ``retry: 999...`` (5,000 digits) is
    relayed unchanged and the stream ends cleanly; the transcript has the event without a
    retry; nothing is logged above INFO. Before: ValueError in the tap, wrapped in two
    ExceptionGroups, a traceback, and a cut stream."""
    events = b"retry: " + b"9" * 5000 + b"\ndata: x\n\n", b"data: y\n\n"
    transcript = tmp_path / "t.jsonl"

    async def upstream(stream: trio.SocketStream) -> None:
        await read_until(stream, b"\r\n\r\n")
        await stream.send_all(SSE_HEAD + b"".join(chunk(e) for e in events) + LAST_CHUNK)
        await serve_upstream(stream)

    sse = SSESettings(errors=True, heartbeat=15, transcript=str(transcript))
    with trio.fail_after(REAL_CAP):
        async with trio.open_nursery() as nursery:
            port = await start_raw_server(nursery, upstream)
            route = Route(prefix="/", upstream=f"http://127.0.0.1:{port}/", sse=sse)
            host, pport = await start_proxy(nursery, [route])
            async with open_client(host, pport) as client:
                await client.send(get(b"/events", (b"accept", b"text/event-stream")))
                assert (await client.head()).status_code == 200
                assert await client.read_to_end()
            await next_request_is_served(host, pport)
            while True:  # the writer task appends in a worker thread
                if transcript.exists() and transcript.read_text().endswith("\n"):
                    break
                await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    assert client.body == b"".join(events)
    assert [(e.data, e.retry) for e in SSEParser().feed(client.body)] == [("x", None), ("y", None)]
    (line,) = [json.loads(t) for t in transcript.read_text().splitlines()]
    assert line["events"] == [{"type": "message", "data": "x"}, {"type": "message", "data": "y"}]
    assert not problems(caplog)


# --------------------------------------------------------------------------- native front end


def raise_runtime_error(*_args: object, **_kwargs: object) -> Awaitable[Any]:
    async def fail() -> Any:
        raise RuntimeError(SECRET)

    return fail()


@pytest.mark.parametrize(
    "where",
    [
        pytest.param("response-head", id="in-the-core-nursery-body"),
        pytest.param("body-side", id="in-a-core-nursery-child"),
    ],
)
async def test_an_unexpected_error_before_the_head_is_one_500_and_one_line(
    where: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A RuntimeError while waiting for the response head (the upstream core's nursery)
    or in the body side (a child task of it): the client gets a 500 JSON error with its
    request id and the connection closes; one log line; the next request is served."""
    caplog.set_level(logging.INFO, logger="proxycore.access")
    if where == "response-head":
        monkeypatch.setattr(UpstreamCall, "_response_head", raise_runtime_error)
    else:
        monkeypatch.setattr(RawRequestBody, "send_rest", raise_runtime_error)
    with trio.fail_after(REAL_CAP):
        async with trio.open_nursery() as nursery:
            port = await start_raw_server(nursery, serve_upstream)
            host, pport = await start_proxy(nursery, f"http://127.0.0.1:{port}/")
            async with open_client(host, pport) as client:
                if where == "body-side":  # the head alone: the rest of the body is pumped
                    request = h11.Request(
                        method=b"POST",
                        target=b"/up",
                        headers=[(b"host", b"p"), (b"content-length", b"10")],
                    )
                    await client.stream.send_all(client.h11.send(request) or b"")
                else:
                    await client.send(get())
                response = await client.head()
                assert await client.read_to_end()
                assert await client.stream.receive_some(1) == b"", "the connection stays open"
            monkeypatch.undo()
            await next_request_is_served(host, pport)
            nursery.cancel_scope.cancel()
    assert response.status_code == 500
    request_id = header(response, b"x-request-id").decode()
    error = json.loads(client.body)["error"]
    assert error == {
        "type": "internal_error",
        "message": "internal error",
        "request_id": request_id,
    }
    check_one_line(caplog, request_id, "RuntimeError")
    line = next(a for a in access(caplog) if a["request_id"] == request_id)
    assert (line["status"], line["outcome"]) == (500, "internal_error")


async def test_an_unexpected_error_after_the_head_cuts_and_is_one_line(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A RuntimeError inside the SSE relay (its nursery runs the heartbeat task) after the
    head and one event went out: the client connection is cut (no clean end), one log
    line, and the proxy serves the next request."""
    feed = SSEParser.feed

    def failing_feed(self: SSEParser, data: bytes | bytearray | memoryview) -> Any:
        if b"boom" in bytes(data):
            raise RuntimeError(SECRET)
        return feed(self, data)

    monkeypatch.setattr(SSEParser, "feed", failing_feed)
    caplog.set_level(logging.INFO, logger="proxycore.access")
    sent_first = trio.Event()

    async def upstream(stream: trio.SocketStream) -> None:
        if sent_first.is_set():  # a later connection: the next request
            await serve_upstream(stream)
            return
        await read_until(stream, b"\r\n\r\n")
        await stream.send_all(SSE_HEAD + chunk(b"data: one\n\n"))
        await sent_first.wait()
        await stream.send_all(chunk(b"data: boom\n\n"))
        await serve_upstream(stream)

    sse = SSESettings(errors=True, heartbeat=15)
    with trio.fail_after(REAL_CAP):
        async with trio.open_nursery() as nursery:
            port = await start_raw_server(nursery, upstream)
            route = Route(prefix="/", upstream=f"http://127.0.0.1:{port}/", sse=sse)
            host, pport = await start_proxy(nursery, [route])
            async with open_client(host, pport) as client:
                await client.send(get(b"/events", (b"accept", b"text/event-stream")))
                response = await client.head()
                assert response.status_code == 200
                event = await client.event()
                assert isinstance(event, h11.Data)
                assert bytes(event.data) == b"data: one\n\n"
                sent_first.set()
                assert not await client.read_to_end(), "a failed stream was passed off as complete"
            monkeypatch.undo()
            await next_request_is_served(host, pport)
            nursery.cancel_scope.cancel()
    request_id = header(response, b"x-request-id").decode()
    check_one_line(caplog, request_id, "RuntimeError")
    line = next(a for a in access(caplog) if a["request_id"] == request_id)
    assert (line["status"], line["outcome"]) == (200, "internal_error")


# --------------------------------------------------------------------------- ProxyApp


async def call_app(app: ProxyApp, messages: list[dict[str, Any]]) -> None:
    """One GET through ``app``; after the request, ``receive`` waits (a client that stays)."""
    scope = {
        "type": "http",
        "method": "GET",
        "path": "/x",
        "raw_path": b"/x",
        "query_string": b"",
        "headers": [(b"host", b"p")],
        "client": ("127.0.0.1", 1),
        "scheme": "http",
        "http_version": "1.1",
    }
    requests = [{"type": "http.request", "body": b"", "more_body": False}]

    async def receive() -> dict[str, Any]:
        if requests:
            return requests.pop()
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    async def send(message: MutableMapping[str, Any]) -> None:
        messages.append(dict(message))

    await app(scope, receive, send)


@pytest.mark.parametrize("when", ["before-head", "after-head"])
async def test_proxy_app_contains_an_unexpected_error(
    when: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """ProxyApp: before the head, a 500 JSON error with the request id; after it, no final
    body message (hypercorn cuts the response); the app returns normally either way, with
    one log line."""
    if when == "before-head":
        monkeypatch.setattr(UpstreamCall, "_response_head", raise_runtime_error)
        body = b""
    else:
        body = b"data: boom\n\n"

        class FailingScanner:
            def feed(self, *_args: object) -> int:
                raise RuntimeError(SECRET)

        monkeypatch.setattr(asgi_module, "ChunkedScanner", FailingScanner)

    async def upstream(stream: trio.SocketStream) -> None:
        await read_until(stream, b"\r\n\r\n")
        await stream.send_all(SSE_HEAD + chunk(body))
        await serve_upstream(stream)

    messages: list[dict[str, Any]] = []
    with trio.fail_after(REAL_CAP):
        async with trio.open_nursery() as nursery:
            port = await start_raw_server(nursery, upstream)
            app = ProxyApp(
                Config(routes=(Route(prefix="/", upstream=f"http://127.0.0.1:{port}/"),))
            )
            await call_app(app, messages)
            nursery.cancel_scope.cancel()
    start = messages[0]
    assert start["type"] == "http.response.start"
    request_id = dict(start["headers"])[b"x-request-id"].decode()
    if when == "before-head":
        assert start["status"] == 500
        (last,) = messages[1:]
        assert not last.get("more_body", False)
        assert json.loads(last["body"])["error"]["request_id"] == request_id
    else:
        assert start["status"] == 200
        assert all(m.get("more_body", False) for m in messages[1:]), "a clean end was sent"
    check_one_line(caplog, request_id, "RuntimeError")
