"""``proxycore tunnel`` against a small fake gateway (trio-websocket's server) and the test
stdio MCP server (tests/mcp_stdio_server.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from trio_websocket import (
    ConnectionClosed,
    WebSocketConnection,
    WebSocketRequest,
    serve_websocket,
)

from proxycore.tunnel.client import ClientOptions, TunnelClient

ROOT = Path(__file__).resolve().parents[2]
SERVER = str(ROOT / "tests" / "mcp_stdio_server.py")
TOKEN = "tunnel-test-token"


class FakeGateway:
    """Accepts tunnels with ``TOKEN``, acks registers with ``gw-<n>``, answers heartbeats, and
    hands every client message to the test as ``(connection number, message)``."""

    def __init__(self) -> None:
        self.port = 0
        self.conns: list[WebSocketConnection] = []
        self.headers: list[dict[str, str]] = []
        self.reject_status: int | None = None
        self.mute = False  # stop answering heartbeats
        self._send, self.received = trio.open_memory_channel[tuple[int, dict[str, Any]]](1000)

    async def handler(self, request: WebSocketRequest) -> None:
        headers = {k.decode().lower(): v.decode() for k, v in request.headers}
        self.headers.append(headers)
        if self.reject_status is not None:
            await request.reject(self.reject_status)
            return
        if headers.get("authorization") != f"Bearer {TOKEN}":
            await request.reject(401)
            return
        ws = await request.accept()
        self.conns.append(ws)
        n = len(self.conns)
        try:
            while True:
                message = json.loads(await ws.get_message())
                if message["type"] == "register":
                    ack = {"type": "register_ack", "sessionId": f"gw-{n}", "status": "success"}
                    await ws.send_message(json.dumps(ack))
                elif message["type"] == "heartbeat" and not self.mute:
                    await ws.send_message(json.dumps({"type": "heartbeat", "sessionId": f"gw-{n}"}))
                await self._send.send((n, message))
        except ConnectionClosed:
            pass

    async def request(self, payload: dict[str, Any], conn: int = -1) -> None:
        ws = self.conns[conn]
        message = {"type": "request", "sessionId": f"gw-{len(self.conns)}", "payload": payload}
        await ws.send_message(json.dumps(message))

    async def expect(self, kind: str, *, within: float = 10) -> tuple[int, dict[str, Any]]:
        """The next client message of type ``kind`` (others but this one are skipped)."""
        with trio.fail_after(within):
            while True:
                n, message = await self.received.receive()
                if message["type"] == kind:
                    return n, message

    async def expect_payload(self, key: str, value: Any) -> dict[str, Any]:
        """The next response/notification whose payload has ``key == value``."""
        with trio.fail_after(10):
            while True:
                _, message = await self.received.receive()
                payload = message.get("payload")
                if isinstance(payload, dict) and payload.get(key) == value:
                    return message

    async def call(self, request_id: int, name: str, **arguments: Any) -> dict[str, Any]:
        params = {"name": name, "arguments": arguments}
        await self.request(
            {"jsonrpc": "2.0", "id": request_id, "method": "tools/call", "params": params}
        )
        message = await self.expect_payload("id", request_id)
        assert message["type"] == "response"
        result: dict[str, Any] = message["payload"]["result"]
        return result


@asynccontextmanager
async def fake_gateway() -> AsyncIterator[FakeGateway]:
    gateway = FakeGateway()
    async with trio.open_nursery() as nursery:
        server = await nursery.start(serve_websocket, gateway.handler, "127.0.0.1", 0, None)
        gateway.port = server.port
        yield gateway
        nursery.cancel_scope.cancel()


def options(gateway: FakeGateway, *extra: str, **changes: Any) -> ClientOptions:
    fields: dict[str, Any] = {
        "gateway": f"ws://127.0.0.1:{gateway.port}/reverse-proxy/ws",
        "command": (sys.executable, SERVER, *extra),
        "name": "test-stdio",
        "token": TOKEN,
        "reconnect_delay": 0.05,
        "keepalive": 0.2,
        "kill_timeout": 5.0,
        "ack_timeout": 5.0,
    }
    fields.update(changes)
    return ClientOptions(**fields)


@asynccontextmanager
async def running(client: TunnelClient) -> AsyncIterator[list[int]]:
    """Run ``client`` in the background; on exit, stop it; yields [exit code] once done."""
    code: list[int] = []
    async with trio.open_nursery() as nursery:

        async def run() -> None:
            code.append(await client.run(signals=False))

        nursery.start_soon(run)
        try:
            yield code
        finally:
            client.stop()


async def eventually(predicate: Callable[[], bool], seconds: float = 10) -> None:
    """Wait (polling) until ``predicate()`` holds; fail after ``seconds``."""
    for _ in range(int(seconds / 0.01)):
        if predicate():
            return
        await trio.sleep(0.01)
    raise AssertionError("condition not reached in time")


def _pid_of(result: dict[str, Any]) -> int:
    return int(result["content"][0]["text"])


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


async def test_register_heartbeat_and_relay_both_ways(caplog: pytest.LogCaptureFixture) -> None:
    async with fake_gateway() as gw:
        client = TunnelClient(options(gw))
        async with running(client):
            n, register = await gw.expect("register")
            assert register["server"] == {
                "name": "test-stdio",
                "description": "",
                "protocol": "stdio",
            }
            assert register["sessionId"] == client.client_id
            assert gw.headers[0]["x-session-id"] == client.client_id
            _, heartbeat = await gw.expect("heartbeat")
            assert heartbeat == {"type": "heartbeat", "sessionId": "gw-1"}  # the gateway's id

            init = {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {}}
            await gw.request({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": init})
            response = await gw.expect_payload("id", 1)
            assert response["type"] == "response" and response["sessionId"] == "gw-1"
            assert response["payload"]["result"]["serverInfo"]["name"] == "test-stdio"

            # notifications/initialized -> a notification and a server->client request (ping)
            await gw.request({"jsonrpc": "2.0", "method": "notifications/initialized"})
            note = await gw.expect_payload("method", "notifications/message")
            assert note["type"] == "notification" and "id" not in note["payload"]
            ping = await gw.expect_payload("method", "ping")
            assert ping["type"] == "notification"  # a server request goes up as "notification"
            assert ping["payload"]["id"] == "srv-1"
            await gw.request({"jsonrpc": "2.0", "id": "srv-1", "result": {}})  # answer it

            await gw.request({"jsonrpc": "2.0", "id": 2, "method": "tools/list"})
            tools = (await gw.expect_payload("id", 2))["payload"]["result"]["tools"]
            assert {t["name"] for t in tools} >= {"echo", "pid"}
            result = await gw.call(3, "echo", text="hello through the tunnel")
            assert result["content"][0]["text"] == "hello through the tunnel"
        _, bye = await gw.expect("unregister")
        assert bye == {"type": "unregister", "sessionId": "gw-1"}
        assert n == 1
        assert "skipping a stdout line that is not JSON-RPC" in caplog.text


async def test_a_silent_gateway_is_left_for_a_new_connection() -> None:
    async with fake_gateway() as gw:
        client = TunnelClient(options(gw))  # keepalive 0.2: silence after 1 s
        async with running(client):
            await gw.expect("register")
            pid = _pid_of(await gw.call(1, "pid"))
            gw.mute = True
            n, _ = await gw.expect("register")
            assert n == 2
            gw.mute = False
            assert _pid_of(await gw.call(2, "pid")) == pid


async def test_reconnect_keeps_one_child() -> None:
    async with fake_gateway() as gw:
        client = TunnelClient(options(gw))
        async with running(client):
            await gw.expect("register")
            pid = _pid_of(await gw.call(1, "pid"))
            await gw.conns[0].aclose()  # the gateway drops the socket
            n, _ = await gw.expect("register")
            assert n == 2
            assert _pid_of(await gw.call(2, "pid")) == pid
            assert client.child_starts == 1
            _, heartbeat = await gw.expect("heartbeat")
            assert heartbeat["sessionId"] == "gw-2"
        assert _gone(pid)


async def test_dead_child_is_restarted_with_backoff() -> None:
    async with fake_gateway() as gw:
        sleeps: list[float] = []
        client = TunnelClient(options(gw, reconnect_delay=0.2), rand=lambda: 0.0)
        async with running(client):
            await gw.expect("register")
            first = _pid_of(await gw.call(1, "pid"))
            before = trio.current_time()
            await gw.call(2, "exit")
            await eventually(lambda: client.child_starts >= 2)
            sleeps.append(trio.current_time() - before)
            second = _pid_of(await gw.call(3, "pid"))
            assert second != first and _gone(first)
            assert len(gw.conns) == 1  # the socket stayed up
            # a second quick death waits twice as long (0.2 * 2 * jitter 0.5)
            before = trio.current_time()
            await gw.call(4, "exit")
            await eventually(lambda: client.child_starts >= 3)
            sleeps.append(trio.current_time() - before)
        assert sleeps[0] >= 0.1 and sleeps[1] >= 0.2


async def test_request_while_the_child_is_down_gets_an_error() -> None:
    async with fake_gateway() as gw:
        client = TunnelClient(options(gw, reconnect_delay=5.0), rand=lambda: 0.0)
        async with running(client):
            await gw.expect("register")
            await gw.call(1, "exit")
            child = client.child
            await eventually(lambda: child is not None and child.returncode is not None)
            await gw.request({"jsonrpc": "2.0", "id": 2, "method": "tools/list"})
            response = await gw.expect_payload("id", 2)
            assert response["payload"]["error"]["code"] == -32000


async def test_child_ignoring_sigterm_is_killed() -> None:
    async with fake_gateway() as gw:
        client = TunnelClient(options(gw, "--ignore-sigterm", kill_timeout=0.3))
        async with running(client) as code:
            await gw.expect("register")
            pid = _pid_of(await gw.call(1, "pid"))
        assert code == [0]
        assert client.child is not None and client.child.returncode == -signal.SIGKILL
        assert _gone(pid)


async def test_refused_and_unreachable_gateways_exit_1() -> None:
    async with fake_gateway() as gw:
        refused = TunnelClient(options(gw, token="wrong"))
        with trio.fail_after(10):
            assert await refused.run(signals=False) == 1
        gw.reject_status = 503
        flaky = TunnelClient(options(gw, max_retries=2))
        with trio.fail_after(10):
            assert await flaky.run(signals=False) == 1
        assert len(gw.headers) == 1 + 3  # one try and two retries


async def test_sigterm_unregisters_and_exits_0() -> None:
    async with fake_gateway() as gw:
        command = [
            sys.executable,
            "-m",
            "proxycore",
            "tunnel",
            "--gateway",
            f"http://127.0.0.1:{gw.port}",
            "--token",
            TOKEN,
            "--local-stdio",
            f"{sys.executable} {SERVER}",
            "--keepalive",
            "1",
            "--log-level",
            "warning",
        ]
        proc = await trio.lowlevel.open_process(command, cwd=str(ROOT))
        try:
            _, register = await gw.expect("register", within=30)
            assert register["server"]["name"] == Path(sys.executable).name
            pid = _pid_of(await gw.call(1, "pid"))
            proc.send_signal(signal.SIGTERM)
            _, bye = await gw.expect("unregister")
            assert bye["sessionId"] == "gw-1"
            with trio.fail_after(15):
                assert await proc.wait() == 0
            await eventually(lambda: _gone(pid), 5)
        finally:
            if proc.returncode is None:
                proc.kill()
                with trio.move_on_after(5):
                    await proc.wait()


def test_bad_arguments_exit_2() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REVERSE_PROXY_")}
    result = subprocess.run(
        [sys.executable, "-m", "proxycore", "tunnel", "--local-stdio", "x"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "--gateway" in result.stderr
