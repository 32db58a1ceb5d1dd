"""The chat bridge example (``examples/chat_bridge.py``), end to end.

A fake chat backend (ASGI, served by hypercorn) streams ``session_id``, ``text_delta``
and ``done`` events; the bridge (the example's config and hooks on proxycore) stores
the user's turn before the request goes upstream and the assistant's answer when the
stream ends. The backend sends its deltas only when the test says so, so what is in the
store when the first event reaches the client is decided by the hooks alone.
"""

from __future__ import annotations

import functools
import json
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Final

import h11
import pytest
import trio

from examples.chat_bridge import ChatStore, Row, main, make_config, make_hooks
from proxycore import serve
from proxycore.http.sse import SSEEvent, SSEParser
from proxycore.tools.sim import ASGIApp, Receive, Scope, Send
from tests.helpers import read_http_response, start_app

CAP: Final = 10.0
DELTAS: Final = ("Hel", "lo, ", "wor", "ld!")


def event(payload: dict[str, object]) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


class Backend:
    """A chat backend: one turn per POST; records what it saw, including the store's
    rows at the moment the request arrived."""

    def __init__(self, store: ChatStore, *, die_after: int | None = None, status: int = 200):
        self.store = store
        self.die_after = die_after
        self.status = status
        self.requests: list[tuple[str, object, list[Row]]] = []
        self.go_send, self.go_recv = trio.open_memory_channel[None](1)
        self.sent = bytearray()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                kind = message["type"].rsplit(".", 1)[-1]
                await send({"type": f"{message['type']}.complete"})
                if kind == "shutdown":
                    return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        self.requests.append((scope["path"], json.loads(body), self.store.turns()))
        if self.status != 200:
            head = {"type": "http.response.start", "status": self.status}
            await send({**head, "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": b'{"error": "overloaded"}'})
            return
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream")],
            }
        )
        await self._send(send, event({"type": "session_id", "session_id": "s-1"}))
        await self.go_recv.receive()
        for n, text in enumerate(DELTAS):
            if n == self.die_after:
                raise RuntimeError("the chat backend died mid-stream (on purpose)")
            await self._send(send, event({"type": "text_delta", "text": text}))
        await self._send(send, event({"type": "done"}))
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _send(self, send: Send, data: bytes) -> None:
        self.sent += data
        await send({"type": "http.response.body", "body": data, "more_body": True})


class Client:
    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.h11 = h11.Connection(h11.CLIENT)
        self.body = bytearray()
        self.parser = SSEParser()
        self.events: list[SSEEvent] = []
        self.eof = False

    async def post(self, target: bytes, payload: object) -> None:
        body = json.dumps(payload).encode()
        headers = [
            (b"host", b"bridge"),
            (b"accept", b"text/event-stream"),
            (b"content-type", b"application/json"),
            (b"content-length", b"%d" % len(body)),
        ]
        out = self.h11.send(h11.Request(method=b"POST", target=target, headers=headers)) or b""
        out += (self.h11.send(h11.Data(data=body)) or b"") + (
            self.h11.send(h11.EndOfMessage()) or b""
        )
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
        self.events += self.parser.feed(data)

    async def first_event(self) -> SSEEvent:
        while not self.events:
            event = await self._event()
            assert isinstance(event, h11.Data), f"expected body data, got {event!r}"
            self._add(bytes(event.data))
        return self.events[0]

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


@asynccontextmanager
async def open_client(host: str, port: int) -> AsyncIterator[Client]:
    async with await trio.open_tcp_stream(host, port) as stream:
        yield Client(stream)


async def start_bridge(
    nursery: trio.Nursery, backend: ASGIApp, store: ChatStore
) -> tuple[str, int]:
    up_host, up_port = await start_app(nursery, backend)
    config = make_config(f"http://{up_host}:{up_port}/api/chat/", "127.0.0.1:0")
    start = functools.partial(serve, config, hooks=make_hooks(store))
    addresses: list[tuple[str, int]] = await nursery.start(start)
    return addresses[0]


async def wait_rows(store: ChatStore, count: int) -> list[Row]:
    while True:
        rows = await trio.to_thread.run_sync(store.turns)
        if len(rows) >= count:
            return rows
        await trio.sleep(0.01)


def data_of(events: Sequence[SSEEvent]) -> list[dict[str, object]]:
    return [json.loads(e.data) for e in events]


async def test_user_turn_stored_before_streaming_answer_stored_at_end(tmp_path: Path) -> None:
    store = ChatStore(str(tmp_path / "chat.sqlite"))
    backend = Backend(store)
    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            host, port = await start_bridge(nursery, backend, store)
            async with open_client(host, port) as client:
                await client.post(b"/chat/", {"message": "hi there"})
                response = await client.head()
                first = await client.first_event()
                # The first event reached the client: the user's turn is already stored,
                # the answer not yet (the backend holds its deltas back).
                at_first_event = await trio.to_thread.run_sync(store.turns)
                await backend.go_send.send(None)
                assert await client.read_to_end()
            rows = await wait_rows(store, 2)
            # A follow-up turn in the same session.
            async with open_client(host, port) as client2:
                await client2.post(b"/chat/", {"session_id": "s-1", "message": "again"})
                await backend.go_send.send(None)
                assert (await client2.head()).status_code == 200
                assert await client2.read_to_end()
            rows = await wait_rows(store, 4)
            nursery.cancel_scope.cancel()
    request_id = dict(response.headers)[b"x-request-id"].decode()
    assert response.status_code == 200
    assert dict(response.headers)[b"cache-control"] == b"no-cache, no-transform"
    assert json.loads(first.data) == {"type": "session_id", "session_id": "s-1"}
    assert at_first_event == [(request_id, None, "user", "hi there", "stored")]
    # The backend got the turn intact, and the store already had it when it did.
    path, payload, at_backend = backend.requests[0]
    assert path == "/api/chat/"
    assert payload == {"message": "hi there"}
    assert at_backend == at_first_event
    # Events were relayed verbatim.
    assert [d["type"] for d in data_of(client.events)] == [
        "session_id",
        *["text_delta"] * len(DELTAS),
        "done",
    ]
    assert rows[:2] == [
        (request_id, None, "user", "hi there", "stored"),
        (request_id, "s-1", "assistant", "Hello, world!", "complete"),
    ]
    assert [r[1:] for r in rows[2:]] == [
        ("s-1", "user", "again", "stored"),
        ("s-1", "assistant", "Hello, world!", "complete"),
    ]
    assert rows[2][0] == rows[3][0] != request_id


async def test_backend_dying_mid_stream(tmp_path: Path) -> None:
    """Two deltas, then the backend dies: the client gets an SSE ``error`` event and a
    clean end; the store keeps the partial answer, marked as an error."""
    store = ChatStore(str(tmp_path / "chat.sqlite"))
    backend = Backend(store, die_after=2)
    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            host, port = await start_bridge(nursery, backend, store)
            async with open_client(host, port) as client:
                await client.post(b"/chat/x", {"message": "tell me"})
                response = await client.head()
                await client.first_event()
                await backend.go_send.send(None)
                clean = await client.read_to_end()
            rows = await wait_rows(store, 2)
            nursery.cancel_scope.cancel()
    request_id = dict(response.headers)[b"x-request-id"].decode()
    assert bytes(client.body).startswith(bytes(backend.sent))
    assert clean, f"no clean end after the error event: {bytes(client.body)!r}"
    assert [e.type for e in client.events] == ["message"] * 3 + ["error"]
    error = json.loads(client.events[-1].data)
    assert error["type"] == "error"
    assert error["status"] == 502
    assert error["request_id"] == request_id
    assert rows == [
        (request_id, None, "user", "tell me", "stored"),
        (request_id, "s-1", "assistant", "Hello, ", "error"),
    ]


async def test_backend_error_status_becomes_an_sse_error_event(tmp_path: Path) -> None:
    store = ChatStore(str(tmp_path / "chat.sqlite"))
    backend = Backend(store, status=503)
    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            host, port = await start_bridge(nursery, backend, store)
            async with open_client(host, port) as client:
                await client.post(b"/chat/", {"message": "anyone?"})
                response = await client.head()
                assert await client.read_to_end()
            rows = await wait_rows(store, 2)
            nursery.cancel_scope.cancel()
    request_id = dict(response.headers)[b"x-request-id"].decode()
    assert response.status_code == 200
    assert dict(response.headers)[b"content-type"] == b"text/event-stream"
    (error,) = client.events
    assert error.type == "error"
    assert json.loads(error.data)["status"] == 503
    assert rows == [
        (request_id, None, "user", "anyone?", "stored"),
        (request_id, None, "assistant", "", "error"),
    ]


@pytest.mark.parametrize("body", [b"not json", b'{"text": "no message key"}', b"[1, 2]"])
async def test_malformed_turn_is_refused_and_nothing_is_stored(tmp_path: Path, body: bytes) -> None:
    store = ChatStore(str(tmp_path / "chat.sqlite"))
    backend = Backend(store)
    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            host, port = await start_bridge(nursery, backend, store)
            async with await trio.open_tcp_stream(host, port) as stream:
                await stream.send_all(
                    b"POST /chat/ HTTP/1.1\r\nHost: b\r\nContent-Length: %d\r\n\r\n%s"
                    % (len(body), body)
                )
                data = b""
                while b"}" not in data:
                    data += await stream.receive_some(65536)
            nursery.cancel_scope.cancel()
    assert data.startswith(b"HTTP/1.1 400 ")
    assert backend.requests == []
    assert store.turns() == []


async def test_message_too_long_for_the_first_read_is_refused(tmp_path: Path) -> None:
    """The hook sees the body only if it came whole with the head (one 4 KiB read): a
    longer message cannot be stored before going upstream, so the bridge refuses it."""
    store = ChatStore(str(tmp_path / "chat.sqlite"))
    backend = Backend(store)
    body = json.dumps({"message": "x" * 10_000}).encode()
    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            host, port = await start_bridge(nursery, backend, store)
            async with await trio.open_tcp_stream(host, port) as stream:
                await stream.send_all(
                    b"POST /chat/ HTTP/1.1\r\nHost: b\r\nContent-Length: %d\r\n\r\n%s"
                    % (len(body), body)
                )
                status, _, reply = await read_http_response(stream, b"POST")
            nursery.cancel_scope.cancel()
    assert status == 413
    assert reply == b"message too long"
    assert backend.requests == []
    assert store.turns() == []


def test_config_and_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    config = make_config("http://127.0.0.1:9/", "127.0.0.1:0")
    (route,) = config.routes
    assert route.prefix == "/chat/"
    assert route.sse.errors
    assert route.timeouts is not None
    assert (route.timeouts.connect, route.timeouts.idle) == (10, 3600)
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    assert "--upstream" in capsys.readouterr().out
