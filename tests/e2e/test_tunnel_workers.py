"""Cross-worker tunnel calls: ``serve --workers 2`` (tunnel/relay.py, relay_server.py).

One tunnel client (trio-websocket speaking the wire protocol by hand) registers through
one connection, so its session lives on one worker; then many HTTP calls on fresh
connections (SO_REUSEPORT spreads them over both workers) reach it: ``tools/list`` as
JSON and as an event stream, the session list, lookups by name and by id. The access
log's ``pid`` field shows both workers answered. Another identity still gets 404, and a
forged relay-caller header from the network is not honoured. SIGTERM: exit 0.
"""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path
from typing import Any, Final

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

from proxycore.security.secrets import generate_secret
from tests.e2e.test_lifecycle import spawn_proxycore, wait_for_log
from tests.e2e.test_websocket import WsClient
from tests.e2e.test_workers import STARTING, access_pids, worker_pids
from tests.helpers import http_request

API: Final = "/reverse-proxy/sessions"
CALLS: Final = 24
BOTH_UP: Final = re.compile(r"worker \d+ up[\s\S]*worker \d+ up")
JsonObject = dict[str, Any]


async def answer(ws: WebSocketConnection, session_id: str) -> None:
    """The tunnelled server: answers every request (tools/list) until the socket ends."""
    try:
        while True:
            frame = json.loads(await ws.get_message())
            if frame.get("type") != "request":
                continue
            request = frame["payload"]
            result = {"tools": [{"name": "echo", "inputSchema": {"type": "object"}}]}
            reply = {"jsonrpc": "2.0", "id": request["id"], "result": result}
            msg = {"type": "response", "sessionId": session_id, "payload": reply}
            await ws.send_message(json.dumps(msg))
    except ConnectionClosed:
        pass


async def test_calls_reach_the_session_from_either_worker(tmp_path: Path) -> None:
    tokens = []
    for n in range(2):
        generate_secret(str(tmp_path / f"s{n}"))
        tokens.append((tmp_path / f"s{n}").read_text().strip())
    (tmp_path / "inbound.secret").write_text("\n".join(tokens) + "\n")
    config, log = tmp_path / "proxy.toml", tmp_path / "err.log"
    config.write_text(
        '[server]\nlisten = "127.0.0.1:0"\nshutdown_grace = 2\n\n'
        f'[inbound]\nmode = "bearer"\nsecret_file = "{tmp_path / "inbound.secret"}"\n\n'
        "[tunnel]\nenabled = true\n\n"
        '[[routes]]\nprefix = "/app/"\nupstream = "http://127.0.0.1:9/"\n',
        encoding="utf-8",
    )
    owner = [(b"Authorization", f"Bearer {tokens[0]}".encode())]
    other = [(b"Authorization", f"Bearer {tokens[1]}".encode())]
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            args = ["serve", "--config", str(config), "--workers", "2"]
            async with spawn_proxycore(args, log) as supervisor:
                port = int((await wait_for_log(log, STARTING, supervisor))[1])
                await wait_for_log(log, BOTH_UP, supervisor)
                async with WsClient(
                    nursery, ("127.0.0.1", port), "/reverse-proxy/ws", extra_headers=owner
                ) as ws:
                    register = {"type": "register", "server": {"name": "files"}}
                    await ws.send_message(json.dumps(register))
                    ack = json.loads(await ws.get_message())
                    assert ack["type"] == "register_ack", ack
                    sid = ack["sessionId"]
                    assert sid[:3] in ("w0-", "w1-"), sid
                    nursery.start_soon(answer, ws, sid)

                    statuses: list[int] = []
                    for i in range(CALLS):  # each a fresh connection
                        key = sid if i % 2 else "files"
                        body = json.dumps({"jsonrpc": "2.0", "id": i, "method": "tools/list"})
                        accept = b"text/event-stream" if i % 3 == 0 else b"application/json"
                        headers = [*owner, (b"Accept", accept)]
                        status, head, data = await http_request(
                            "127.0.0.1", port, "POST", f"{API}/{key}/mcp", headers, body.encode()
                        )
                        assert status == 200, (status, data)
                        if accept == b"text/event-stream":
                            assert dict(head)[b"content-type"] == b"text/event-stream"
                            assert data.startswith(b"event: message\ndata: "), data
                            payload = json.loads(data.split(b"data: ", 1)[1].split(b"\n")[0])
                        else:
                            payload = json.loads(data)
                        assert payload["id"] == i
                        assert payload["result"]["tools"][0]["name"] == "echo"
                        status, _, data = await http_request("127.0.0.1", port, "GET", API, owner)
                        assert status == 200
                        assert [s["id"] for s in json.loads(data)] == [sid]
                        status, _, data = await http_request("127.0.0.1", port, "GET", API, other)
                        assert (status, json.loads(data)) == (200, [])
                        # Another identity, even forging the relay's caller header: 404.
                        forged = [
                            *other,
                            (b"X-Proxycore-Relay-Caller", b'{"identity":"bearer:0","admin":true}'),
                        ]
                        status, _, _ = await http_request(
                            "127.0.0.1", port, "GET", f"{API}/{key}", forged
                        )
                        statuses.append(status)
                    assert set(statuses) == {404}
                    status, _, data = await http_request(
                        "127.0.0.1", port, "GET", f"{API}/{sid}", owner
                    )
                    assert status == 200 and json.loads(data)["id"] == sid
                    with trio.fail_after(5):
                        pids = await access_pids(log, 4 * CALLS + 1)
                    assert set(pids) == set(worker_pids(log)), "one worker served every call"
                supervisor.send_signal(signal.SIGTERM)  # the sessions close with 1001
                with trio.fail_after(10):
                    assert await supervisor.wait() == 0, log.read_text(encoding="utf-8")
            nursery.cancel_scope.cancel()
