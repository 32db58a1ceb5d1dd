"""Tunnel sessions across two replicas sharing one real Redis (``[state]`` with a relay
listener): a session held by A answers callers of B (by id and by server name), B lists it
for its owner only, a caller waiting on B gets 502 when A is SIGKILLed, and A's session
leaves the shared directory within ``session_ttl``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Final

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

from tests.e2e.test_websocket import WsClient
from tests.helpers import http_request
from tests.redis.support import (
    OTHER_TOKEN,
    OWNER_TOKEN,
    Proxy,
    RedisServer,
    eventually,
    free_port,
    run_proxy,
    write_config,
)

API: Final = "/reverse-proxy/sessions"
TTL: Final = 1.0
OWNER: Final = [(b"Authorization", f"Bearer {OWNER_TOKEN}".encode())]
OTHER: Final = [(b"Authorization", f"Bearer {OTHER_TOKEN}".encode())]
JSON: Final = [(b"Accept", b"application/json"), (b"Content-Type", b"application/json")]


async def serve_tools(ws: WebSocketConnection, session_id: str, held: trio.Event) -> None:
    """The tunnelled server: answers ``tools/list``; a ``hang`` request is never answered
    (``held`` is set when it arrived)."""
    try:
        while True:
            frame = json.loads(await ws.get_message())
            if frame.get("type") != "request":
                continue
            request = frame["payload"]
            if request.get("method") == "hang":
                held.set()
                continue
            result = {"tools": [{"name": "echo", "inputSchema": {"type": "object"}}]}
            reply = {"jsonrpc": "2.0", "id": request["id"], "result": result}
            msg = {"type": "response", "sessionId": session_id, "payload": reply}
            await ws.send_message(json.dumps(msg))
    except ConnectionClosed:
        pass


async def listed(proxy: Proxy, who: list[tuple[bytes, bytes]]) -> list[Any]:
    status, _, body = await http_request("127.0.0.1", proxy.port, "GET", API, who)
    assert status == 200, (status, body)
    found: list[Any] = json.loads(body)
    return found


async def call(proxy: Proxy, key: str, method: str, rid: int) -> tuple[int, Any]:
    body = json.dumps({"jsonrpc": "2.0", "id": rid, "method": method}).encode()
    status, _, data = await http_request(
        "127.0.0.1", proxy.port, "POST", f"{API}/{key}/mcp", [*OWNER, *JSON], body
    )
    return status, json.loads(data) if data else None


async def test_a_session_held_by_one_replica_answers_callers_of_the_other(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    configs = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        config = tmp_path / name / "proxy.toml"
        write_config(
            config, redis_server.url, admin=free_port(), tunnel=True, state=f"session_ttl = {TTL}"
        )
        configs.append((config, int(config.read_text().split("127.0.0.1:")[2].split('"')[0])))
    with trio.fail_after(40):
        async with (
            trio.open_nursery() as nursery,
            run_proxy(configs[0][0], tmp_path / "a.log", configs[0][1]) as a,
            run_proxy(configs[1][0], tmp_path / "b.log", configs[1][1]) as b,
        ):
            async with WsClient(
                nursery, ("127.0.0.1", a.port), "/reverse-proxy/ws", extra_headers=OWNER
            ) as ws:
                await ws.send_message(json.dumps({"type": "register", "server": {"name": "files"}}))
                ack = json.loads(await ws.get_message())
                assert ack["type"] == "register_ack", ack
                sid = ack["sessionId"]
                held = trio.Event()
                nursery.start_soon(serve_tools, ws, sid, held)

                # B sees A's session once its record is published (poll, bounded).
                async def b_lists_it() -> bool:
                    return [s["id"] for s in await listed(b, OWNER)] == [sid]

                await eventually(b_lists_it, 5)
                assert [s["id"] for s in await listed(a, OWNER)] == [sid]  # no duplicate
                assert [s["id"] for s in await listed(b, OWNER)] == [sid]
                assert await listed(b, OTHER) == []
                # Calls on B, by id and by server name, answered by the session on A.
                for rid, key in enumerate((sid, "files")):
                    status, answer = await call(b, key, "tools/list", rid)
                    assert status == 200, answer
                    assert answer["id"] == rid and answer["result"]["tools"][0]["name"] == "echo"
                # Another identity: 404 on B as on A, by id and by name.
                for proxy in (a, b):
                    for key in (sid, "files"):
                        status, _, _ = await http_request(
                            "127.0.0.1", proxy.port, "GET", f"{API}/{key}", OTHER
                        )
                        assert status == 404
                status, _, data = await http_request(
                    "127.0.0.1", b.port, "GET", f"{API}/{sid}", OWNER
                )
                assert status == 200 and json.loads(data)["id"] == sid
                assert b"127.0.0.1" not in data  # no internal address in an answer

                # A caller on B waits on the session; A dies: the caller gets 502.
                outcome: list[tuple[int, Any]] = []
                answered = trio.Event()

                async def waiting() -> None:
                    outcome.append(await call(b, sid, "hang", 99))
                    answered.set()

                nursery.start_soon(waiting)
                with trio.fail_after(5):
                    await held.wait()
                a.kill()
                with trio.fail_after(5):
                    await answered.wait()
                assert outcome[0][0] == 502, outcome

                # A's session leaves the shared directory within the TTL.
                async def b_lists_none() -> bool:
                    return await listed(b, OWNER) == []

                await eventually(b_lists_none, TTL + 3)
                status, _ = await call(b, sid, "tools/list", 100)
                assert status == 404
            nursery.cancel_scope.cancel()
