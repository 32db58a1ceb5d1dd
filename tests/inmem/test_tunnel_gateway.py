"""The tunnel gateway (``tunnel/gateway.py``, ``tunnel/sessions.py``) over trio memory
streams: no sockets.

:func:`serve_session` gets one end of a memory stream pair; the test's end runs
trio-websocket's client side and speaks the wire protocol by hand, while "HTTP callers"
are tasks using :class:`Session` directly. Every test runs on ``autojump_clock`` (no real
I/O, so the heartbeat timers are exact and a "prompt" failure is measurable).
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Final, cast

import pytest
import trio
import trio.testing
from trio.testing import MockClock
from trio_websocket import ConnectionClosed, WebSocketConnection, wrap_client_stream

from proxycore.config import Tunnel
from proxycore.observe.accesslog import ExchangeRecord
from proxycore.tunnel.gateway import serve_session
from proxycore.tunnel.sessions import (
    Caller,
    CallTimeout,
    Registry,
    Session,
    SessionClosed,
    TooManyPending,
)

ALICE: Final = Caller("bearer:0", admin=False)
JsonObject = dict[str, Any]


@dataclass
class Peer:
    """The test's end: a tunnel client's WebSocket, plus what the gateway reported."""

    ws: WebSocketConnection
    record: ExchangeRecord
    registry: Registry
    served: list[bool] = field(default_factory=list)

    async def send(self, message: JsonObject | str) -> None:
        await self.ws.send_message(message if isinstance(message, str) else json.dumps(message))

    async def receive(self) -> JsonObject:
        with trio.fail_after(1000):
            data = json.loads(await self.ws.get_message())
        assert isinstance(data, dict)
        return data

    async def register(self, name: str = "files") -> str:
        await self.send(
            {"type": "register", "sessionId": "client-chosen", "server": {"name": name}}
        )
        ack = await self.receive()
        assert ack["type"] == "register_ack" and ack["status"] == "success"
        session_id = ack["sessionId"]
        assert isinstance(session_id, str)
        return session_id

    async def closed_with(self) -> int:
        """Read until the gateway closes; its close code."""
        with trio.fail_after(1000):
            while True:
                try:
                    await self.ws.get_message()
                except ConnectionClosed as exc:
                    assert exc.reason is not None
                    return int(exc.reason.code)


@dataclass
class Drain:
    draining: bool = False
    idle_waits: set[trio.CancelScope] = field(default_factory=set)

    def start(self) -> None:
        self.draining = True
        for scope in list(self.idle_waits):
            scope.cancel()


@asynccontextmanager
async def gateway(
    settings: Tunnel | None = None,
    caller: Caller = ALICE,
    registry: Registry | None = None,
    drain: Drain | None = None,
) -> AsyncIterator[Peer]:
    if registry is None:  # (an empty Registry is falsy: it has a length)
        registry = Registry(settings or Tunnel(enabled=True))
    server, client = trio.testing.memory_stream_pair()
    record = ExchangeRecord()
    async with trio.open_nursery() as nursery:
        peer_box: list[Peer] = []

        async def serve() -> None:
            accepted = await serve_session(server, registry, caller, record=record, drain=drain)
            if peer_box:
                peer_box[0].served.append(accepted)

        nursery.start_soon(serve)
        ws = await wrap_client_stream(
            nursery, cast("trio.SocketStream", client), "gateway.test", "/reverse-proxy/ws"
        )
        peer = Peer(ws, record, registry)
        peer_box.append(peer)
        yield peer
        await ws.aclose()
        nursery.cancel_scope.deadline = trio.current_time() + 30


def only_session(registry: Registry) -> Session:
    sessions = registry.list(Caller("", admin=True))
    assert len(sessions) == 1
    return sessions[0]


# -- register, heartbeat, unregister --------------------------------------------------


async def test_register_gets_a_gateway_made_id_never_the_clients(autojump_clock: MockClock) -> None:
    async with gateway() as peer:
        session_id = await peer.register("files")
        assert session_id != "client-chosen" and len(session_id) >= 16
        session = only_session(peer.registry)
        assert (session.id, session.owner, session.server_name) == (session_id, "bearer:0", "files")
        assert peer.registry.find("client-chosen", ALICE) is None
        assert peer.registry.find("files", ALICE) is session
        # Messages naming another sessionId still belong to this socket's session.
        await peer.send({"type": "heartbeat", "sessionId": "someone-else"})
        beat = await peer.receive()
        assert beat["sessionId"] == session_id
    assert peer.record.status == 101


async def test_heartbeat_is_answered_with_id_and_timestamp(autojump_clock: MockClock) -> None:
    async with gateway() as peer:
        session_id = await peer.register()
        session = only_session(peer.registry)
        before = session.last_heartbeat
        await trio.sleep(1)
        await peer.send({"type": "heartbeat", "sessionId": session_id})
        beat = await peer.receive()
        assert beat["type"] == "heartbeat" and beat["sessionId"] == session_id
        assert isinstance(beat["timestamp"], str) and beat["timestamp"].endswith("Z")
        assert session.last_heartbeat >= before


async def test_gateway_sends_its_own_heartbeat_every_interval(autojump_clock: MockClock) -> None:
    settings = Tunnel(enabled=True, heartbeat_interval=10, heartbeat_timeout=1000)
    async with gateway(settings) as peer:
        session_id = await peer.register()
        start = trio.current_time()
        for n in (1, 2):
            beat = await peer.receive()
            assert beat["type"] == "heartbeat" and beat["sessionId"] == session_id
            assert trio.current_time() - start == pytest.approx(10 * n, abs=0.1)


async def test_silence_past_heartbeat_timeout_closes_the_session(autojump_clock: MockClock) -> None:
    settings = Tunnel(enabled=True, heartbeat_interval=1000, heartbeat_timeout=30)
    async with gateway(settings) as peer:
        await peer.register()
        session = only_session(peer.registry)
        await trio.sleep(20)
        await peer.send({"type": "heartbeat"})  # resets the silence deadline
        await peer.receive()
        start = trio.current_time()
        assert await peer.closed_with() == 1001
        assert trio.current_time() - start == pytest.approx(30, abs=0.1)
        assert session.closed and len(peer.registry) == 0
    assert peer.record.outcome == "tunnel_heartbeat_timeout"


async def test_unregister_closes_1000_and_fails_pending_callers_at_once(
    autojump_clock: MockClock,
) -> None:
    async with gateway() as peer, trio.open_nursery() as nursery:
        await peer.register()
        session = only_session(peer.registry)
        events = session.subscribe("events")
        failures: list[float] = []

        async def caller() -> None:
            with pytest.raises(SessionClosed):
                await session.call({"jsonrpc": "2.0", "id": 1, "method": "x"}, timeout=90)
            failures.append(trio.current_time())

        nursery.start_soon(caller)
        assert (await peer.receive())["type"] == "request"
        start = trio.current_time()
        await peer.send({"type": "unregister", "sessionId": "x"})
        assert await peer.closed_with() == 1000
        await trio.sleep(0.001)
        assert failures and failures[0] - start < 1
        seen = [name async for name, _ in events]
        assert seen[-1] == "closed"
        assert len(peer.registry) == 0
    assert peer.record.outcome == "tunnel_unregistered"


async def test_socket_drop_fails_pending_callers_at_once(autojump_clock: MockClock) -> None:
    async with gateway() as peer, trio.open_nursery() as nursery:
        await peer.register()
        session = only_session(peer.registry)
        mcp = session.subscribe("mcp")
        failed_at: list[float] = []

        async def caller(n: int) -> None:
            with pytest.raises(SessionClosed):
                await session.call({"jsonrpc": "2.0", "id": n, "method": "slow"}, timeout=90)
            failed_at.append(trio.current_time())

        nursery.start_soon(caller, 1)
        nursery.start_soon(caller, 2)
        await peer.receive()
        await peer.receive()
        start = trio.current_time()
        await peer.ws._stream.aclose()  # gone without a closing handshake
        await trio.sleep(0.5)
        assert len(failed_at) == 2
        assert max(failed_at) - start < 1  # not the 90 s request timeout
        assert [name async for name, _ in mcp] == ["closed"]
        assert session.closed and len(peer.registry) == 0
    assert peer.record.outcome == "tunnel_client_gone"


async def test_shutdown_closes_sessions_1001_at_once(autojump_clock: MockClock) -> None:
    drain = Drain()
    async with gateway(drain=drain) as peer:
        await peer.register()
        assert len(drain.idle_waits) == 1
        start = trio.current_time()
        drain.start()
        assert await peer.closed_with() == 1001
        assert trio.current_time() - start < 1 and len(peer.registry) == 0
    assert peer.record.outcome == "tunnel_shutdown" and peer.served == [True]


async def test_api_close_sends_1000_to_the_client(autojump_clock: MockClock) -> None:
    async with gateway() as peer:
        await peer.register()
        await only_session(peer.registry).close(1000, "closed by admin")
        assert await peer.closed_with() == 1000
        assert len(peer.registry) == 0


async def test_second_register_on_one_socket_is_an_error(autojump_clock: MockClock) -> None:
    async with gateway() as peer:
        first = await peer.register()
        await peer.send({"type": "register", "server": {"name": "other"}})
        error = await peer.receive()
        assert error["type"] == "error" and "already registered" in error["message"]
        assert only_session(peer.registry).id == first


# -- malformed input -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("frame", "says"),
    [
        ("not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        ('{"sessionId": "x"}', "no 'type'"),
        ('{"type": "launch"}', "unknown message type"),
        ('{"type": "register"}', "'server'"),
        ('{"type": "register", "server": {"description": "d"}}', "'name'"),
        ('{"type": "response", "payload": "text"}', "'payload'"),
        ('{"type": "notification"}', "'payload'"),
    ],
)
async def test_malformed_input_gets_an_error_and_the_session_stays_up(
    autojump_clock: MockClock, frame: str, says: str
) -> None:
    async with gateway() as peer:
        session_id = await peer.register()
        await peer.send(frame)
        error = await peer.receive()
        assert error["type"] == "error" and says in error["message"]
        await peer.send({"type": "heartbeat"})
        assert (await peer.receive())["sessionId"] == session_id
        assert only_session(peer.registry).id == session_id


async def test_frame_over_max_message_bytes_gets_an_error_and_the_session_stays_up(
    autojump_clock: MockClock,
) -> None:
    settings = Tunnel(enabled=True, max_message_bytes=2048)
    async with gateway(settings) as peer:
        session_id = await peer.register()
        big = json.dumps({"type": "notification", "payload": {"x": "a" * 3000}})
        await peer.send(big)
        error = await peer.receive()
        assert error["type"] == "error" and "too large" in error["message"]
        await peer.ws.send_message(b"\x00binary")
        assert "binary" in (await peer.receive())["message"]
        await peer.send({"type": "heartbeat"})
        assert (await peer.receive())["sessionId"] == session_id


async def test_messages_before_register_are_refused_but_heartbeat_answered(
    autojump_clock: MockClock,
) -> None:
    async with gateway() as peer:
        await peer.send({"type": "response", "payload": {"jsonrpc": "2.0", "id": 1, "result": 1}})
        assert "not registered" in (await peer.receive())["message"]
        await peer.send({"type": "heartbeat"})
        assert (await peer.receive())["type"] == "heartbeat"
        await peer.register()


# -- routing ---------------------------------------------------------------------------


async def test_two_callers_using_id_1_get_their_own_answers(autojump_clock: MockClock) -> None:
    async with gateway() as peer, trio.open_nursery() as nursery:
        await peer.register()
        session = only_session(peer.registry)
        results: dict[str, JsonObject] = {}

        async def caller(name: str) -> None:
            payload = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"n": name}}
            results[name] = await session.call(payload, timeout=90)

        nursery.start_soon(caller, "a")
        nursery.start_soon(caller, "b")
        down = [await peer.receive(), await peer.receive()]
        assert all(m["type"] == "request" and m["sessionId"] == session.id for m in down)
        ids = [m["payload"]["id"] for m in down]
        assert len(set(ids)) == 2  # unique per session, whatever the callers used
        assert session.pending == 2
        for message in reversed(down):  # answered in the other order
            who = message["payload"]["params"]["n"]
            reply = {"jsonrpc": "2.0", "id": message["payload"]["id"], "result": {"for": who}}
            await peer.send({"type": "response", "sessionId": "x", "payload": reply})
        await trio.sleep(0.5)
        assert results["a"] == {"jsonrpc": "2.0", "id": 1, "result": {"for": "a"}}
        assert results["b"] == {"jsonrpc": "2.0", "id": 1, "result": {"for": "b"}}
        assert session.pending == 0


async def test_progress_notifications_go_to_their_caller_others_to_subscribers(
    autojump_clock: MockClock,
) -> None:
    async with gateway() as peer, trio.open_nursery() as nursery:
        await peer.register()
        session = only_session(peer.registry)
        mcp, events = session.subscribe("mcp"), session.subscribe("events")
        seen: list[JsonObject] = []

        async def on_message(message: JsonObject) -> None:
            seen.append(message)

        async def caller() -> None:
            meta: JsonObject = {"_meta": {"progressToken": "tok"}}
            payload: JsonObject = {"jsonrpc": "2.0", "id": "c1", "method": "long", "params": meta}
            answer = await session.call(payload, timeout=90, on_message=on_message)
            assert answer["id"] == "c1"

        nursery.start_soon(caller)
        request = (await peer.receive())["payload"]
        params: JsonObject = {"progressToken": "tok", "progress": 1}
        progress: JsonObject = {"jsonrpc": "2.0", "method": "notifications/progress"}
        progress["params"] = params
        other = {"jsonrpc": "2.0", "method": "notifications/tools/list_changed"}
        await peer.send({"type": "notification", "payload": progress})
        await peer.send({"type": "notification", "payload": other})
        reply = {"jsonrpc": "2.0", "id": request["id"], "result": {}}
        await peer.send({"type": "response", "payload": reply})
        await trio.sleep(1)
        assert seen == [progress]
        await session.close()
        assert [item async for item in mcp] == [
            ("message", other),
            ("closed", {"sessionId": session.id, "reason": "closed"}),
        ]
        names = [name async for name, _ in events]
        assert names == ["notification", "notification", "closed"]


async def test_server_request_during_a_single_call_goes_to_that_caller(
    autojump_clock: MockClock,
) -> None:
    async with gateway() as peer, trio.open_nursery() as nursery:
        await peer.register()
        session = only_session(peer.registry)
        seen: list[JsonObject] = []

        async def on_message(message: JsonObject) -> None:
            seen.append(message)

        async def caller() -> None:
            await session.call(
                {"jsonrpc": "2.0", "id": 7, "method": "x"}, timeout=90, on_message=on_message
            )

        nursery.start_soon(caller)
        request = (await peer.receive())["payload"]
        sampling = {"jsonrpc": "2.0", "id": 99, "method": "sampling/createMessage"}
        await peer.send({"type": "notification", "payload": sampling})
        await peer.send(
            {"type": "response", "payload": {"jsonrpc": "2.0", "id": request["id"], "result": 1}}
        )
        await trio.sleep(1)
        assert seen == [sampling]


async def test_send_passes_a_callers_response_down_unchanged(autojump_clock: MockClock) -> None:
    async with gateway() as peer:
        await peer.register()
        session = only_session(peer.registry)
        answer = {"jsonrpc": "2.0", "id": 99, "result": {"ok": True}}
        await session.send(answer)
        assert await peer.receive() == {
            "type": "request",
            "sessionId": session.id,
            "payload": answer,
        }


async def test_call_timeout_and_too_many_pending(autojump_clock: MockClock) -> None:
    settings = Tunnel(enabled=True, max_pending_requests=1, heartbeat_timeout=1000)
    async with gateway(settings) as peer, trio.open_nursery() as nursery:
        await peer.register()
        session = only_session(peer.registry)

        async def slow() -> None:
            with pytest.raises(CallTimeout):
                await session.call({"jsonrpc": "2.0", "id": 1, "method": "x"}, timeout=5)

        nursery.start_soon(slow)
        await peer.receive()
        with pytest.raises(TooManyPending):
            await session.call({"jsonrpc": "2.0", "id": 2, "method": "x"}, timeout=5)
        await trio.sleep(6)
        assert session.pending == 0
        # A late answer to the timed-out call is dropped, the session stays up.
        await peer.send({"type": "response", "payload": {"jsonrpc": "2.0", "id": 1, "result": 1}})
        await peer.send({"type": "heartbeat"})
        assert (await peer.receive())["type"] == "heartbeat"


async def test_slow_subscriber_is_dropped_with_an_error(autojump_clock: MockClock) -> None:
    async with gateway() as peer:
        await peer.register()
        session = only_session(peer.registry)
        mcp = session.subscribe("mcp", max_queued=2)
        for n in range(3):
            note = {"jsonrpc": "2.0", "method": "n", "params": {"n": n}}
            await peer.send({"type": "notification", "payload": note})
        await trio.sleep(1)
        items = [item async for item in mcp]
        assert items == [("error", {"message": "subscriber too slow: dropped"})]
        await peer.send({"type": "heartbeat"})
        assert (await peer.receive())["type"] == "heartbeat"


# -- admission and limits -------------------------------------------------------------


async def test_identity_not_in_allowed_is_closed_1008(autojump_clock: MockClock) -> None:
    settings = Tunnel(enabled=True, allowed=("bearer:1",))
    async with gateway(settings, caller=ALICE) as peer:
        assert await peer.closed_with() == 1008
        assert len(peer.registry) == 0
    assert peer.record.outcome == "tunnel_not_allowed"
    async with gateway(settings, caller=Caller("bearer:1", admin=False)) as peer:
        await peer.register()


async def test_limits_send_an_error_then_close_1013(autojump_clock: MockClock) -> None:
    registry = Registry(Tunnel(enabled=True, max_sessions=2, max_sessions_per_owner=1))
    async with gateway(registry=registry) as first:
        await first.register("a")
        async with gateway(registry=registry) as second:
            await second.send({"type": "register", "server": {"name": "b"}})
            assert "for this identity" in (await second.receive())["message"]
            assert await second.closed_with() == 1013
        async with gateway(registry=registry, caller=Caller("bearer:1", admin=False)) as third:
            await third.register("c")
            async with gateway(registry=registry, caller=Caller("bearer:2", False)) as fourth:
                await fourth.send({"type": "register", "server": {"name": "d"}})
                assert "on this gateway" in (await fourth.receive())["message"]
                assert await fourth.closed_with() == 1013
        assert len(registry) == 1


async def test_same_owner_and_name_replaces_the_older_session(autojump_clock: MockClock) -> None:
    registry = Registry(Tunnel(enabled=True))
    async with gateway(registry=registry) as old:
        old_id = await old.register("files")
        async with gateway(registry=registry) as new:
            new_id = await new.register("files")
            assert await old.closed_with() == 1000
            assert [s.id for s in registry.list(ALICE)] == [new_id] != [old_id]


async def test_ownership_and_visibility(autojump_clock: MockClock) -> None:
    registry = Registry(Tunnel(enabled=True))
    async with (
        gateway(registry=registry) as alices,
        gateway(registry=registry, caller=Caller("", admin=False)) as anonymous,
    ):
        alice_id = await alices.register("files")
        anon_id = await anonymous.register("files")
        bob, admin = Caller("bearer:1", admin=False), Caller("bearer:9", admin=True)
        assert registry.list(bob) == [] and registry.find(alice_id, bob) is None
        assert registry.find("files", bob) is None
        assert [s.id for s in registry.list(ALICE)] == [alice_id]
        assert registry.find(anon_id, ALICE) is None  # no owner: admins only
        assert {s.id for s in registry.list(admin)} == {alice_id, anon_id}
        assert registry.find(anon_id, admin) is not None
        assert registry.find(anon_id, Caller("", admin=False)) is None
        row = registry.list(ALICE)[0].as_dict()
        assert set(row) == {
            "id",
            "server_name",
            "owner",
            "connected_at",
            "last_heartbeat",
            "pending",
        }


async def test_one_access_log_line_per_session(
    autojump_clock: MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "proxycore.access")
    async with gateway() as peer:
        session_id = await peer.register("files")
        await peer.send({"type": "unregister"})
        await peer.closed_with()
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "proxycore.access"]
    assert len(lines) == 1
    line = lines[0]
    assert line["type"] == "tunnel_session" and line["session_id"] == session_id
    assert line["outcome"] == "tunnel_unregistered" and line["close_code"] == 1000
    assert line["owner"] == "bearer:0" and line["messages_in"] == 2
