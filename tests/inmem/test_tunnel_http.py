"""The tunnel's HTTP side (``proxycore/tunnel/http_api.py``) over a ScriptedStream client
and a real :class:`Registry`/:class:`Session` whose socket is a scripted tunnelled server
(``Server``): each request frame sent down is answered synchronously with the messages
the test scripted (notifications, then the response), or not at all.

Every test runs on ``autojump_clock``: no real I/O, so timeouts are exact.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import trio
from trio.testing import MockClock

from proxycore.config import Tunnel
from proxycore.http.headers import Headers
from proxycore.tunnel.http_api import MCP_SESSIONS, ApiRequest, ApiResult, handle
from proxycore.tunnel.sessions import Caller, Registry, Session
from tests.inmem.scripted import EOF, ScriptedStream

PREFIX = "/reverse-proxy/sessions"
ALICE = Caller("alice", admin=False)
BOB = Caller("bob", admin=False)
ADMIN = Caller("root", admin=True)
BOTH = b"application/json, text/event-stream"

Json = dict[str, Any]
#: Given a request payload (with the session's id), the messages the server sends back.
Answer = Callable[[Json], list[Json]]


@dataclass
class Server:
    """The tunnelled server behind a session: records the payloads sent down and answers
    requests with ``answer`` (None: never answers)."""

    answer: Answer | None = None
    sent: list[Json] = field(default_factory=list)
    closed_with: list[tuple[int, str]] = field(default_factory=list)
    session: Session | None = None

    async def send_frame(self, frame: str) -> None:
        message = json.loads(frame)
        assert message["type"] == "request"
        payload = message["payload"]
        self.sent.append(payload)
        if self.answer is not None and "method" in payload and "id" in payload:
            assert self.session is not None
            for reply in self.answer(payload):
                self.session.deliver(reply)

    async def close_socket(self, code: int, reason: str) -> None:
        self.closed_with.append((code, reason))


def result(payload: Json, value: object) -> Json:
    return {"jsonrpc": "2.0", "id": payload["id"], "result": value}


def echo(payload: Json) -> list[Json]:
    return [result(payload, {"echo": payload.get("method")})]


def open_session(
    registry: Registry, owner: str = "alice", name: str = "files", answer: Answer | None = echo
) -> tuple[Session, Server]:
    server = Server(answer)
    session = registry.open(
        owner, name, send_frame=server.send_frame, close_socket=server.close_socket
    )
    server.session = session
    return session, server


def request(
    registry: Registry,
    method: bytes,
    path: str,
    *,
    body: bytes = b"",
    headers: Headers | None = None,
    caller: Caller = ALICE,
    stream: ScriptedStream | None = None,
) -> tuple[ApiRequest, ScriptedStream]:
    stream = stream if stream is not None else ScriptedStream()
    req = ApiRequest(
        method=method,
        path=path,
        query=b"",
        headers=headers if headers is not None else [],
        body=body,
        caller=caller,
        request_id=b"rid-1",
        stream=stream,
        registry=registry,
        settings=registry.settings,
    )
    return req, stream


@dataclass
class Reply:
    status: int
    headers: dict[bytes, bytes]
    body: bytes


def parse(written: bytes) -> Reply:
    head, _, body = written.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ")[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b": ")
        headers[name.lower()] = value
    return Reply(status, headers, body)


def events(body: bytes) -> list[tuple[str, Json]]:
    """The SSE events of a body (comments skipped)."""
    out = []
    for block in body.split(b"\n\n"):
        fields = dict(
            line.split(b": ", 1) for line in block.split(b"\n") if line and b": " in line[:7]
        )
        if b"event" in fields:
            out.append((fields[b"event"].decode(), json.loads(fields[b"data"])))
    return out


def rpc(method: str, id_: object = 1, **params: object) -> bytes:
    message: Json = {"jsonrpc": "2.0", "id": id_, "method": method}
    if params:
        message["params"] = params
    return json.dumps(message).encode()


async def call(registry: Registry, *args: Any, **kwargs: Any) -> tuple[ApiResult, Reply]:
    req, stream = request(registry, *args, **kwargs)
    res = await handle(req)
    return res, parse(stream.written)


# -- the session list, one session, delete, ownership ---------------------------------------


async def test_list_shows_the_callers_sessions_and_admins_see_all(
    autojump_clock: MockClock,
) -> None:
    registry = Registry(Tunnel())
    mine, _ = open_session(registry, "alice", "files")
    theirs, _ = open_session(registry, "bob", "db")
    res, reply = await call(registry, b"GET", PREFIX)
    assert res == ApiResult(200, len(reply.body), False)
    assert reply.headers[b"content-type"] == b"application/json"
    assert reply.headers[b"x-request-id"] == b"rid-1"
    listed = json.loads(reply.body)
    assert [s["id"] for s in listed] == [mine.id]
    assert set(listed[0]) == {
        "id",
        "server_name",
        "owner",
        "connected_at",
        "last_heartbeat",
        "pending",
    }
    _, reply = await call(registry, b"GET", PREFIX + "/", caller=ADMIN)
    assert {s["id"] for s in json.loads(reply.body)} == {mine.id, theirs.id}


async def test_others_sessions_and_unknown_ids_are_404_never_403(autojump_clock: MockClock) -> None:
    registry = Registry(Tunnel())
    session, server = open_session(registry, "alice", "files")
    for method, suffix in [
        (b"GET", ""),
        (b"DELETE", ""),
        (b"POST", "/mcp"),
        (b"GET", "/mcp"),
        (b"GET", "/events"),
    ]:
        for key in (session.id, "files", "nope"):
            caller = BOB if key != "nope" else ALICE
            res, reply = await call(
                registry, method, f"{PREFIX}/{key}{suffix}", body=rpc("ping"), caller=caller
            )
            assert (res.status, reply.status) == (404, 404), (method, suffix, key)
            assert json.loads(reply.body)["error"]["request_id"] == "rid-1"
    assert server.sent == [] and server.closed_with == [] and not session.closed


async def test_delete_closes_with_1000_for_owner_and_admin(autojump_clock: MockClock) -> None:
    registry = Registry(Tunnel())
    session, server = open_session(registry, "alice", "files")
    res, reply = await call(registry, b"DELETE", f"{PREFIX}/{session.id}")
    assert (res.status, reply.status, reply.body) == (204, 204, b"")
    assert b"content-length" not in reply.headers
    assert server.closed_with and server.closed_with[0][0] == 1000
    assert session.closed and registry.list(ADMIN) == []
    other, other_server = open_session(registry, "bob", "db")
    res, _ = await call(registry, b"DELETE", f"{PREFIX}/db", caller=ADMIN)  # by server name
    assert res.status == 204 and other.closed and other_server.closed_with[0][0] == 1000


async def test_get_one_session_and_method_not_allowed(autojump_clock: MockClock) -> None:
    registry = Registry(Tunnel())
    session, _ = open_session(registry)
    _, reply = await call(registry, b"GET", f"{PREFIX}/files")
    assert json.loads(reply.body)["id"] == session.id
    res, reply = await call(registry, b"POST", PREFIX)
    assert res.status == 405 and reply.headers[b"allow"] == b"GET"
    res, reply = await call(registry, b"PUT", f"{PREFIX}/files/mcp")
    assert res.status == 405 and reply.headers[b"allow"] == b"GET, POST, DELETE"
    res, _ = await call(registry, b"GET", f"{PREFIX}/files/other")
    assert res.status == 404


async def test_connection_close_is_honoured(autojump_clock: MockClock) -> None:
    registry = Registry(Tunnel())
    res, reply = await call(registry, b"GET", PREFIX, headers=[(b"Connection", b"close")])
    assert res.close and reply.headers[b"connection"] == b"close"


# -- POST .../mcp ---------------------------------------------------------------------------


async def test_request_answered_as_json_with_the_callers_id(autojump_clock: MockClock) -> None:
    registry = Registry(Tunnel())
    _, server = open_session(registry)
    res, reply = await call(
        registry,
        b"POST",
        f"{PREFIX}/files/mcp",
        body=rpc("tools/list", "caller-7"),
        headers=[(b"Accept", BOTH), (b"Content-Type", b"application/json")],
    )
    assert (res.status, res.close) == (200, False)
    assert reply.headers[b"content-type"] == b"application/json"
    assert json.loads(reply.body) == {
        "jsonrpc": "2.0",
        "id": "caller-7",
        "result": {"echo": "tools/list"},
    }
    assert b"mcp-session-id" not in reply.headers  # only initialize mints one
    assert server.sent[0]["id"] != "caller-7"  # rewritten on the way down


async def test_request_with_progress_token_streams_the_notification_then_the_response(
    autojump_clock: MockClock,
) -> None:
    registry = Registry(Tunnel())

    def progress(payload: Json) -> list[Json]:
        token = payload["params"]["_meta"]["progressToken"]
        note = {
            "jsonrpc": "2.0",
            "method": "notifications/progress",
            "params": {"progressToken": token, "progress": 1},
        }
        return [note, result(payload, {"done": True})]

    open_session(registry, answer=progress)
    body = rpc("tools/call", 3, name="slow", _meta={"progressToken": "p1"})
    res, reply = await call(
        registry, b"POST", f"{PREFIX}/files/mcp", body=body, headers=[(b"Accept", BOTH)]
    )
    assert (res.status, res.close) == (200, True)
    assert reply.headers[b"content-type"] == b"text/event-stream"
    assert reply.headers[b"connection"] == b"close"
    got = events(reply.body)
    assert [name for name, _ in got] == ["message", "message"]
    assert got[0][1]["method"] == "notifications/progress"
    assert got[1][1] == {"jsonrpc": "2.0", "id": 3, "result": {"done": True}}
    assert res.bytes_out == len(reply.body)


async def test_sse_only_accept_gets_a_stream_without_a_progress_token(
    autojump_clock: MockClock,
) -> None:
    registry = Registry(Tunnel())
    open_session(registry)
    res, reply = await call(
        registry,
        b"POST",
        f"{PREFIX}/files/mcp",
        body=rpc("ping"),
        headers=[(b"Accept", b"text/event-stream")],
    )
    assert res.status == 200 and reply.headers[b"content-type"] == b"text/event-stream"
    assert events(reply.body) == [
        ("message", {"jsonrpc": "2.0", "id": 1, "result": {"echo": "ping"}})
    ]
    res, reply = await call(
        registry,
        b"POST",
        f"{PREFIX}/files/mcp",
        body=rpc("ping"),
        headers=[(b"Accept", b"text/html")],
    )
    assert res.status == 406 and json.loads(reply.body)["id"] == 1


@pytest.mark.parametrize(
    "body",
    [
        b'{"jsonrpc":"2.0","method":"notifications/initialized"}',
        b'{"jsonrpc":"2.0","id":5,"result":{"roots":[]}}',
    ],
)
async def test_notifications_and_responses_are_sent_down_and_get_202(
    body: bytes, autojump_clock: MockClock
) -> None:
    registry = Registry(Tunnel())
    _, server = open_session(registry)
    res, reply = await call(registry, b"POST", f"{PREFIX}/files/mcp", body=body)
    assert (res.status, reply.status, reply.body) == (202, 202, b"")
    assert server.sent == [json.loads(body)]


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b'[{"jsonrpc":"2.0","id":1,"method":"ping"}]', -32600),
        (b'{"jsonrpc":"2.0", "id":', -32700),
        (b'{"id":1,"method":"ping"}', -32600),
    ],
)
async def test_batches_malformed_and_invalid_bodies_are_400(
    body: bytes, code: int, autojump_clock: MockClock
) -> None:
    registry = Registry(Tunnel())
    _, server = open_session(registry)
    res, reply = await call(registry, b"POST", f"{PREFIX}/files/mcp", body=body)
    assert res.status == 400
    answer = json.loads(reply.body)
    assert answer["id"] is None and answer["error"]["code"] == code
    assert answer["error"]["data"]["request_id"] == "rid-1"
    assert server.sent == []


async def test_timeout_is_504(autojump_clock: MockClock) -> None:
    registry = Registry(Tunnel(request_timeout=5))
    open_session(registry, answer=lambda payload: [])
    start = trio.current_time()
    res, reply = await call(registry, b"POST", f"{PREFIX}/files/mcp", body=rpc("ping", 9))
    assert res.status == 504 and trio.current_time() - start == pytest.approx(5)
    answer = json.loads(reply.body)
    assert answer["id"] == 9 and answer["error"]["data"]["type"] == "timeout"


async def test_session_dropping_mid_call_is_502(autojump_clock: MockClock) -> None:
    registry = Registry(Tunnel())

    def drop(payload: Json) -> list[Json]:
        assert server.session is not None
        server.session.end("socket dropped")
        return []

    _, server = open_session(registry, answer=drop)
    res, reply = await call(registry, b"POST", f"{PREFIX}/files/mcp", body=rpc("ping"))
    assert res.status == 502
    assert json.loads(reply.body)["error"]["data"]["type"] == "session_closed"


async def test_too_many_pending_is_429(autojump_clock: MockClock) -> None:
    registry = Registry(Tunnel(max_pending_requests=1, request_timeout=60))
    open_session(registry, answer=lambda payload: [])
    first, _ = request(registry, b"POST", f"{PREFIX}/files/mcp", body=rpc("slow"))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(handle, first)
        await trio.sleep(1)
        res, reply = await call(registry, b"POST", f"{PREFIX}/files/mcp", body=rpc("ping", 2))
        assert res.status == 429 and json.loads(reply.body)["id"] == 2
        nursery.cancel_scope.cancel()


async def test_error_after_the_stream_started_is_the_last_event(autojump_clock: MockClock) -> None:
    registry = Registry(Tunnel(request_timeout=5))

    def note_only(payload: Json) -> list[Json]:
        token = payload["params"]["_meta"]["progressToken"]
        return [
            {
                "jsonrpc": "2.0",
                "method": "notifications/progress",
                "params": {"progressToken": token, "progress": 1},
            }
        ]

    open_session(registry, answer=note_only)
    body = rpc("tools/call", 4, _meta={"progressToken": 1})
    res, reply = await call(
        registry, b"POST", f"{PREFIX}/files/mcp", body=body, headers=[(b"Accept", BOTH)]
    )
    assert res.status == 200 and res.close
    got = events(reply.body)
    assert got[0][1]["method"] == "notifications/progress"
    assert got[1][1]["id"] == 4 and got[1][1]["error"]["data"]["type"] == "timeout"


async def test_sse_call_failing_before_any_event_is_an_http_status(
    autojump_clock: MockClock,
) -> None:
    registry = Registry(Tunnel(request_timeout=5))
    open_session(registry, answer=lambda payload: [])
    body = rpc("tools/call", 6, _meta={"progressToken": 1})
    res, reply = await call(
        registry, b"POST", f"{PREFIX}/files/mcp", body=body, headers=[(b"Accept", BOTH)]
    )
    assert (res.status, reply.status) == (504, 504)
    assert reply.headers[b"content-type"] == b"application/json"
    assert json.loads(reply.body)["id"] == 6


async def test_client_leaving_an_sse_call_cancels_it(autojump_clock: MockClock) -> None:
    registry = Registry(Tunnel(request_timeout=60))
    session, _ = open_session(registry, answer=lambda payload: [])
    req, stream = request(
        registry,
        b"POST",
        f"{PREFIX}/files/mcp",
        body=rpc("x", _meta={"progressToken": 1}),
        headers=[(b"Accept", BOTH)],
        stream=ScriptedStream([EOF]),
    )
    res = await handle(req)
    assert stream.written == b""  # nothing was answered: the client is gone
    assert res.status == 499 and res.close and trio.current_time() < 1
    assert session.pending == 0


async def test_initialize_mints_a_session_id_that_later_requests_must_match(
    autojump_clock: MockClock,
) -> None:
    registry = Registry(Tunnel())
    session, server = open_session(registry)
    _, reply = await call(registry, b"POST", f"{PREFIX}/files/mcp", body=rpc("initialize"))
    minted = reply.headers[b"mcp-session-id"]
    assert MCP_SESSIONS.valid(minted, session.id)
    headers = [(b"Mcp-Session-Id", minted), (b"MCP-Protocol-Version", b"2025-06-18")]
    res, _ = await call(registry, b"POST", f"{PREFIX}/files/mcp", body=rpc("ping"), headers=headers)
    assert res.status == 200
    stale = [(b"Mcp-Session-Id", b"nope.0000")]
    res, reply = await call(
        registry, b"POST", f"{PREFIX}/files/mcp", body=rpc("ping", 8), headers=stale
    )
    assert res.status == 404 and json.loads(reply.body)["id"] == 8
    # Another tunnel session (the client reconnected) does not accept it.
    session.end("gone")
    open_session(registry)
    res, _ = await call(registry, b"POST", f"{PREFIX}/files/mcp", body=rpc("ping"), headers=headers)
    assert res.status == 404
    assert len(server.sent) == 2


async def test_bad_protocol_version_is_400(autojump_clock: MockClock) -> None:
    registry = Registry(Tunnel())
    _, server = open_session(registry)
    res, _ = await call(
        registry,
        b"POST",
        f"{PREFIX}/files/mcp",
        body=rpc("ping"),
        headers=[(b"MCP-Protocol-Version", b"2025 06 18\x01")],
    )
    assert res.status == 400 and server.sent == []


async def test_delete_of_the_mcp_session_ends_it(autojump_clock: MockClock) -> None:
    registry = Registry(Tunnel())
    session, _ = open_session(registry)
    _, reply = await call(registry, b"POST", f"{PREFIX}/files/mcp", body=rpc("initialize"))
    headers = [(b"Mcp-Session-Id", reply.headers[b"mcp-session-id"])]
    res, _ = await call(registry, b"DELETE", f"{PREFIX}/files/mcp", headers=headers)
    assert res.status == 204
    res, _ = await call(registry, b"POST", f"{PREFIX}/files/mcp", body=rpc("ping"), headers=headers)
    assert res.status == 404
    res, _ = await call(registry, b"DELETE", f"{PREFIX}/files/mcp", headers=headers)
    assert res.status == 404
    res, _ = await call(registry, b"DELETE", f"{PREFIX}/files/mcp")
    assert res.status == 400
    assert not session.closed  # the tunnel session outlives the MCP session


# -- GET streams ----------------------------------------------------------------------------


async def test_mcp_stream_relays_server_messages_with_heartbeats_until_close(
    autojump_clock: MockClock,
) -> None:
    registry = Registry(Tunnel(heartbeat_interval=10))
    session, _ = open_session(registry)
    req, stream = request(
        registry, b"GET", f"{PREFIX}/files/mcp", headers=[(b"Accept", b"text/event-stream")]
    )
    async with trio.open_nursery() as nursery:
        outcome: list[ApiResult] = []

        async def run() -> None:
            outcome.append(await handle(req))

        nursery.start_soon(run)
        await trio.sleep(1)
        ask = {"jsonrpc": "2.0", "id": 99, "method": "roots/list"}
        session.deliver(ask)
        await trio.sleep(24)
        session.end("bye")
    res = outcome[0]
    reply = parse(stream.written)
    assert (res.status, res.close) == (200, True)
    assert reply.headers[b"content-type"] == b"text/event-stream"
    assert events(reply.body) == [("message", ask)]  # no "closed" event on the MCP stream
    assert reply.body.count(b": keep-alive\n\n") == 2
    assert res.bytes_out == len(reply.body)


async def test_server_request_during_a_json_call_goes_to_the_mcp_stream(
    autojump_clock: MockClock,
) -> None:
    registry = Registry(Tunnel(heartbeat_interval=1000))
    ask = {"jsonrpc": "2.0", "id": 77, "method": "sampling/createMessage"}

    def asks_first(payload: Json) -> list[Json]:
        return [ask, result(payload, {"ok": True})] if payload["method"] == "tools/call" else []

    open_session(registry, answer=asks_first)
    get, get_stream = request(registry, b"GET", f"{PREFIX}/files/mcp")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(handle, get)
        await trio.sleep(1)
        res, reply = await call(registry, b"POST", f"{PREFIX}/files/mcp", body=rpc("tools/call"))
        assert res.status == 200 and json.loads(reply.body)["result"] == {"ok": True}
        await trio.sleep(1)
        nursery.cancel_scope.cancel()
    assert events(parse(get_stream.written).body) == [("message", ask)]


async def test_events_stream_has_lifecycle_and_ends_when_the_client_leaves(
    autojump_clock: MockClock,
) -> None:
    registry = Registry(Tunnel(heartbeat_interval=1000))
    session, _ = open_session(registry)
    stream = ScriptedStream()
    req, _ = request(registry, b"GET", f"{PREFIX}/files/events", stream=stream)
    async with trio.open_nursery() as nursery:
        outcome: list[ApiResult] = []

        async def run() -> None:
            outcome.append(await handle(req))

        nursery.start_soon(run)
        await trio.sleep(1)
        note = {"jsonrpc": "2.0", "method": "notifications/tools/list_changed"}
        session.deliver(note)
        await trio.sleep(1)
        stream.feed(EOF)
    assert outcome[0].close and trio.current_time() < 5
    assert events(parse(stream.written).body) == [("notification", note)]
    assert not session.closed


async def test_events_stream_gets_closed_event(autojump_clock: MockClock) -> None:
    registry = Registry(Tunnel())
    session, _ = open_session(registry)
    req, stream = request(registry, b"GET", f"{PREFIX}/files/events")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(handle, req)
        await trio.sleep(1)
        session.end("unregistered")
    got = events(parse(stream.written).body)
    assert got == [("closed", {"sessionId": session.id, "reason": "unregistered"})]


async def test_slow_subscriber_is_dropped_with_an_error_event(autojump_clock: MockClock) -> None:
    registry = Registry(Tunnel())
    session, _ = open_session(registry)
    req, stream = request(registry, b"GET", f"{PREFIX}/files/mcp")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(handle, req)
        await trio.sleep(1)
        stream.block_writes()
        for n in range(200):  # more than the subscription holds while writes are blocked
            session.deliver(
                {"jsonrpc": "2.0", "method": "notifications/message", "params": {"n": n}}
            )
        stream.unblock_writes()
        await trio.sleep(1)
    got = events(parse(stream.written).body)
    assert got[-1][0] == "error" and len(got) < 200
    assert not session.closed


async def test_mcp_stream_with_a_stale_mcp_session_id_is_404(autojump_clock: MockClock) -> None:
    registry = Registry(Tunnel())
    session, _ = open_session(registry)
    stale = MCP_SESSIONS.mint("another-tunnel-session").encode()
    with trio.fail_after(1):  # a stream would never end
        res, _ = await call(
            registry, b"GET", f"{PREFIX}/files/mcp", headers=[(b"Mcp-Session-Id", stale)]
        )
    assert res.status == 404 and not session.closed


async def test_stream_refuses_a_client_that_accepts_no_event_stream(
    autojump_clock: MockClock,
) -> None:
    registry = Registry(Tunnel())
    open_session(registry)
    res, reply = await call(
        registry, b"GET", f"{PREFIX}/files/events", headers=[(b"Accept", b"application/json")]
    )
    assert res.status == 406 and reply.headers[b"content-type"] == b"application/json"
