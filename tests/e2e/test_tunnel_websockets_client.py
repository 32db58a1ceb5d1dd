"""A third-party client (the ``websockets`` library, asyncio, in a thread) speaks the tunnel
wire protocol by hand against the gateway: every client message type, malformed input, and
a request answered through the session."""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path
from typing import Any

import trio
from websockets.asyncio.client import connect

from proxycore.config import Tunnel
from proxycore.tunnel.sessions import Caller
from tests.e2e.test_tunnel_gateway import CAP, PATH, secrets, start

__all__ = ["secrets"]  # the fixture, re-used

REGISTER = {
    "type": "register",
    "sessionId": "chosen-by-client",
    "server": {"name": "notes", "description": "d", "protocol": "stdio"},
}


async def _client(url: str, token: str, seen: list[dict[str, Any]]) -> None:
    headers = {"Authorization": f"Bearer {token}", "X-Session-ID": "chosen-by-client"}
    async with connect(url, additional_headers=headers) as ws:

        async def receive() -> dict[str, Any]:
            while True:
                data: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), 5))
                if data.get("type") != "heartbeat":  # the gateway's own beats, if any
                    return data

        await ws.send(json.dumps(REGISTER))
        ack = await receive()
        seen.append(ack)
        sid = ack["sessionId"]
        for bad in ("not json", json.dumps({"type": "nope"}), json.dumps({"type": "response"})):
            await ws.send(bad)
            seen.append(await receive())  # an error each, and the session stays up
        await ws.send(json.dumps({"type": "heartbeat", "sessionId": sid}))
        beat = json.loads(await asyncio.wait_for(ws.recv(), 5))
        seen.append(beat)
        request = await receive()  # the gateway's request for the trio-side caller
        seen.append(request)
        payload = request["payload"]
        note = {"jsonrpc": "2.0", "method": "notifications/message", "params": {"level": "info"}}
        await ws.send(json.dumps({"type": "notification", "sessionId": sid, "payload": note}))
        answer = {"jsonrpc": "2.0", "id": payload["id"], "result": {"tools": []}}
        await ws.send(json.dumps({"type": "response", "sessionId": sid, "payload": answer}))
        await asyncio.sleep(0.2)
        await ws.send(json.dumps({"type": "unregister", "sessionId": sid}))
        with contextlib.suppress(Exception):  # the gateway closes the socket after unregister
            await asyncio.wait_for(ws.recv(), 5)


async def test_websockets_library_client_speaks_the_wire_protocol(
    tmp_path: Path, secrets: list[str]
) -> None:
    seen: list[dict[str, Any]] = []
    result: list[dict[str, Any]] = []
    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            port, registry = await start(nursery, tmp_path, Tunnel(enabled=True))
            owner = Caller("bearer:0", admin=False)

            async def caller() -> None:
                # The registry has no "registered" event to wait on: poll it briefly.
                while (session := registry.find("notes", owner)) is None:  # noqa: ASYNC110
                    await trio.sleep(0.01)
                request = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
                result.append(await session.call(request, timeout=5))

            nursery.start_soon(caller)
            url = f"ws://127.0.0.1:{port}{PATH}"
            await trio.to_thread.run_sync(asyncio.run, _client(url, secrets[0], seen))
            with trio.fail_after(5):
                while registry.find("notes", owner) is not None:  # noqa: ASYNC110
                    await trio.sleep(0.01)  # unregistered: gone from the registry
            nursery.cancel_scope.cancel()
    ack, *errors, beat, request = seen
    assert ack["type"] == "register_ack" and ack["status"] == "success"
    assert ack["sessionId"] != "chosen-by-client"  # the gateway makes the id
    assert [e["type"] for e in errors] == ["error", "error", "error"]
    assert all(e["message"] for e in errors)
    assert beat["type"] == "heartbeat" and beat["sessionId"] == ack["sessionId"]
    assert request["type"] == "request" and request["payload"]["method"] == "tools/list"
    assert result == [{"jsonrpc": "2.0", "id": 1, "result": {"tools": []}}]
