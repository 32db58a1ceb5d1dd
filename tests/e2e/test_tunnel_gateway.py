"""The tunnel gateway end to end (``tunnel/gateway.py`` behind the proxy's listener).

Real sockets on 127.0.0.1: ``proxycore.serve`` in process with ``[tunnel] enabled`` and
bearer inbound auth (two secrets: ``bearer:0`` and ``bearer:1``); the client is
trio-websocket speaking the wire protocol by hand, as a third-party tunnel client would.
Calls go through the registry on the server's state (the HTTP side has its own tests).

Clock: the real one (``autojump_clock`` with real sockets jumps while bytes are in flight).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Final

import pytest
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

from proxycore import Config, Route, ServerSettings
from proxycore.config import Inbound, Tunnel
from proxycore.ops.server import Server
from proxycore.security.secrets import generate_secret
from proxycore.tunnel.sessions import Caller, Registry
from tests.e2e.test_websocket import WsClient, http_handshake

CAP: Final = 10.0
PATH: Final = "/reverse-proxy/ws"
JsonObject = dict[str, Any]


@pytest.fixture
def secrets(tmp_path: Path) -> list[str]:
    """Two bearer secrets in one file (``bearer:0``, ``bearer:1``)."""
    lines = []
    for n in range(2):
        generate_secret(str(tmp_path / f"s{n}"))
        lines.append((tmp_path / f"s{n}").read_text().strip())
    (tmp_path / "inbound.secret").write_text("\n".join(lines) + "\n")
    return lines


async def start(nursery: trio.Nursery, tmp_path: Path, tunnel: Tunnel) -> tuple[int, Registry]:
    config = Config(
        routes=(Route("/app/", "http://127.0.0.1:9/"),),
        server=ServerSettings(listen=("127.0.0.1:0",)),
        inbound=Inbound(mode="bearer", secret_file=str(tmp_path / "inbound.secret")),
        tunnel=tunnel,
    )
    server = Server(config)
    addresses: list[tuple[str, int]] = await nursery.start(server.run)
    assert server.state.tunnel is not None
    return addresses[0][1], server.state.tunnel


def auth(secret: str) -> list[tuple[bytes, bytes]]:
    return [(b"Authorization", f"Bearer {secret}".encode()), (b"X-Session-ID", b"client-made-id")]


async def receive(ws: WebSocketConnection) -> JsonObject:
    data = json.loads(await ws.get_message())
    assert isinstance(data, dict)
    return data


async def test_handshake_without_a_token_is_401_before_the_upgrade(
    tmp_path: Path, secrets: list[str]
) -> None:
    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            port, registry = await start(nursery, tmp_path, Tunnel(enabled=True))
            for extra in (b"", b"Authorization: Bearer not-a-valid-secret-at-all-000\r\n"):
                status, _, body = await http_handshake(("127.0.0.1", port), PATH.encode(), extra)
                assert status == 401 and json.loads(body)["error"]["type"] == "unauthorized"
            assert len(registry) == 0
            nursery.cancel_scope.cancel()


async def test_identity_not_allowed_is_closed_1008(tmp_path: Path, secrets: list[str]) -> None:
    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            tunnel = Tunnel(enabled=True, allowed=("bearer:1",))
            port, registry = await start(nursery, tmp_path, tunnel)
            async with WsClient(
                nursery, ("127.0.0.1", port), PATH, extra_headers=auth(secrets[0])
            ) as ws:
                with pytest.raises(ConnectionClosed) as closed:
                    await ws.get_message()
                assert closed.value.reason is not None and closed.value.reason.code == 1008
            assert len(registry) == 0
            async with WsClient(
                nursery, ("127.0.0.1", port), PATH, extra_headers=auth(secrets[1])
            ) as ws:
                await ws.send_message(json.dumps({"type": "register", "server": {"name": "x"}}))
                assert (await receive(ws))["type"] == "register_ack"
            nursery.cancel_scope.cancel()


async def test_register_heartbeat_request_round_trip(tmp_path: Path, secrets: list[str]) -> None:
    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            port, registry = await start(nursery, tmp_path, Tunnel(enabled=True))
            async with WsClient(
                nursery, ("127.0.0.1", port), PATH, extra_headers=auth(secrets[0])
            ) as ws:
                register = {
                    "type": "register",
                    "sessionId": "client-made-id",
                    "server": {"name": "files", "description": "d", "protocol": "stdio"},
                }
                await ws.send_message(json.dumps(register))
                ack = await receive(ws)
                assert ack["type"] == "register_ack" and ack["status"] == "success"
                session_id = ack["sessionId"]
                assert session_id != "client-made-id"

                await ws.send_message(json.dumps({"type": "heartbeat", "sessionId": session_id}))
                beat = await receive(ws)
                assert beat["type"] == "heartbeat" and beat["sessionId"] == session_id
                assert beat["timestamp"]

                await ws.send_message("{not json")
                assert (await receive(ws))["type"] == "error"

                owner = Caller("bearer:0", admin=False)
                session = registry.find("files", owner)
                assert session is not None and session.id == session_id
                assert registry.find(session_id, Caller("bearer:1", admin=False)) is None
                result: list[JsonObject] = []
                answered = trio.Event()

                async def call() -> None:
                    payload = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
                    result.append(await session.call(payload, timeout=5))
                    answered.set()

                nursery.start_soon(call)
                request = await receive(ws)
                assert request["type"] == "request" and request["sessionId"] == session_id
                assert request["payload"]["method"] == "tools/list"
                answer = {"jsonrpc": "2.0", "id": request["payload"]["id"], "result": {"t": []}}
                await ws.send_message(
                    json.dumps({"type": "response", "sessionId": session_id, "payload": answer})
                )
                await answered.wait()
                assert result == [{"jsonrpc": "2.0", "id": 1, "result": {"t": []}}]

                await ws.send_message(json.dumps({"type": "unregister", "sessionId": session_id}))
                with pytest.raises(ConnectionClosed) as closed:
                    await ws.get_message()
                assert closed.value.reason is not None and closed.value.reason.code == 1000
            assert len(registry) == 0
            nursery.cancel_scope.cancel()


async def test_other_paths_on_the_tunnel_route_are_404(tmp_path: Path, secrets: list[str]) -> None:
    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            port, _ = await start(nursery, tmp_path, Tunnel(enabled=True))
            async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
                await stream.send_all(
                    b"GET /reverse-proxy/elsewhere HTTP/1.1\r\nHost: x\r\n"
                    b"Authorization: Bearer %s\r\nConnection: close\r\n\r\n" % secrets[0].encode()
                )
                data = b""
                while chunk := await stream.receive_some(65536):
                    data += chunk
            assert data.startswith(b"HTTP/1.1 404 ")
            nursery.cancel_scope.cancel()
