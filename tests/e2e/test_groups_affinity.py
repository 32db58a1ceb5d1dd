"""MCP session affinity (``affinity = "mcp_session"``) over real sockets (issue 14).

Two upstream MCP servers speak enough Streamable HTTP: ``initialize`` (a JSON-RPC POST)
mints ``Mcp-Session-Id``; every later POST, GET stream and DELETE must carry an id that
server minted, else 404 (400 without one). The proxy wraps each minted id into one the
client sees (``pc1.<payload>.<mac>``) and must route it back to the minting server.
"""

from __future__ import annotations

import base64
import json
import secrets
from pathlib import Path
from typing import Any, Final

import pytest
import trio

from proxycore.config import RetryPolicy
from tests.e2e.groups_support import (
    Client,
    Headers,
    Reply,
    Req,
    Upstream,
    entry,
    group_config,
    group_route,
    header,
    run_proxy,
)

SESSION: Final = b"mcp-session-id"
JSON: Final = [(b"content-type", b"application/json"), (b"accept", b"application/json")]


class McpServer(Upstream):
    """An MCP Streamable HTTP server that mints its own session ids."""

    def __init__(self, name: str) -> None:
        super().__init__(name, self.answer)
        self.sessions: set[bytes] = set()
        self.minted = 0
        self.rate_limit_next = False
        self.fail_initialize = False

    async def answer(self, up: Upstream, req: Req, stream: trio.SocketStream) -> Reply | None:
        sid = req.header(SESSION)
        if req.method == b"POST":
            message = json.loads(req.body)
            if message["method"] == "initialize" and self.fail_initialize:
                self.fail_initialize = False
                return 503, [(SESSION, b"half-made")], b"overloaded"
            if message["method"] == "initialize":
                self.minted += 1
                new = f"{self.name}-session-{self.minted}".encode()
                self.sessions.add(new)
                result = {"protocolVersion": "2025-06-18", "serverInfo": {"name": self.name}}
                return 200, [*JSON, (SESSION, new)], rpc(message["id"], result)
        if sid is None:
            return 400, [], b"missing session"
        if sid not in self.sessions:
            return 404, [], b"unknown session"
        if req.method == b"DELETE":
            self.sessions.discard(sid)
            return 200, [], b""
        if req.method == b"GET":
            event = b"data: " + self.name.encode() + b"\n\n"
            return 200, [(b"content-type", b"text/event-stream")], event
        if self.rate_limit_next:
            self.rate_limit_next = False
            return 429, [(b"retry-after", b"5")], b"slow down"
        message = json.loads(req.body)
        return 200, JSON, rpc(message["id"], {"server": self.name, "session": sid.decode()})


def rpc(rid: int, result: dict[str, Any]) -> bytes:
    return json.dumps({"jsonrpc": "2.0", "id": rid, "result": result}).encode()


def call(method: str, rid: int) -> bytes:
    return json.dumps({"jsonrpc": "2.0", "id": rid, "method": method, "params": {}}).encode()


@pytest.fixture
def key_file(tmp_path: Path) -> str:
    path = tmp_path / "session.key"
    path.write_text(secrets.token_hex(32))
    return str(path)


async def start_pair(nursery: trio.Nursery) -> tuple[McpServer, McpServer]:
    a, b = McpServer("a"), McpServer("b")
    await a.start(nursery)
    await b.start(nursery)
    return a, b


def mcp_config(key_file: str, *servers: McpServer) -> Any:
    route = group_route(
        [entry(s) for s in servers], prefix="/mcp/", balance="round_robin", affinity="mcp_session"
    )
    return group_config([route], session_key_file=key_file)


async def initialize(client: Client) -> tuple[bytes, str]:
    """The session id the client sees, and the server that minted it."""
    status, headers, body = await client.request(b"POST", b"/mcp/", JSON, call("initialize", 1))
    assert status == 200, body
    sid = header(headers, SESSION)
    assert sid is not None
    return sid, json.loads(body)["result"]["serverInfo"]["name"]


async def tools_list(client: Client, sid: bytes, rid: int = 2) -> tuple[int, Headers, bytes]:
    return await client.request(b"POST", b"/mcp/", [*JSON, (SESSION, sid)], call("tools/list", rid))


async def test_requests_with_a_session_go_to_the_server_that_minted_it(key_file: str) -> None:
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            a, b = await start_pair(nursery)
            proxy = await run_proxy(nursery, mcp_config(key_file, a, b))
            async with await Client.open(proxy) as client:
                sessions = [await initialize(client) for _ in range(4)]
                assert sorted(name for _, name in sessions) == ["a", "a", "b", "b"]
                own_ids = a.sessions | b.sessions
                for sid, minter in sessions:
                    # The id the client sees is not the upstream's and shows no address.
                    assert sid.startswith(b"pc1.")
                    assert sid not in own_ids
                    assert not any(own in sid for own in own_ids)
                    payload = base64.urlsafe_b64decode(sid.split(b".")[1] + b"==")
                    for text in (sid, payload):
                        assert b"127.0.0.1" not in text
                        assert str(a.port).encode() not in text
                        assert str(b.port).encode() not in text
                    # tools/list with it: the minting server, every time (round robin would
                    # alternate).
                    for rid in range(2, 7):
                        status, headers, body = await tools_list(client, sid, rid)
                        assert status == 200, body
                        result = json.loads(body)["result"]
                        assert result["server"] == minter
                        assert result["session"].startswith(f"{minter}-session-")
                        assert header(headers, SESSION) in (None, sid)
                    # The GET stream and the DELETE too.
                    status, _, body = await client.request(b"GET", b"/mcp/", [(SESSION, sid)])
                    assert (status, body) == (200, b"data: " + minter.encode() + b"\n\n")
                    status, _, _ = await client.request(b"DELETE", b"/mcp/", [(SESSION, sid)])
                    assert status == 200
                assert not a.sessions and not b.sessions  # every DELETE reached its minter
            nursery.cancel_scope.cancel()


def tamper(sid: bytes) -> list[bytes]:
    """Ids a client could forge from a real one."""
    prefix, payload, mac = sid.split(b".")
    flipped_mac = mac[:-2] + (b"A" if mac[-2:-1] != b"A" else b"B") + mac[-1:]
    flipped_payload = payload[:3] + (b"A" if payload[3:4] != b"A" else b"B") + payload[4:]
    return [
        prefix + b"." + payload + b"." + flipped_mac,
        prefix + b"." + flipped_payload + b"." + mac,
        prefix + b"." + payload,
        prefix
        + b"."
        + base64.urlsafe_b64encode(b"\0" * 8 + b"a-session-1").rstrip(b"=")
        + b"."
        + mac,
    ]


async def test_forged_or_tampered_session_ids_get_404_with_a_json_error(key_file: str) -> None:
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            a, b = await start_pair(nursery)
            proxy = await run_proxy(nursery, mcp_config(key_file, a, b))
            async with await Client.open(proxy) as client:
                sid, _ = await initialize(client)
                before = a.count() + b.count()
                forged = [
                    b"pc1.AAAAAAAAAAAAAAAA.AAAAAAAAAAAAAAAAAAAAAA",
                    b"a-session-1",  # an upstream's own id: not one the proxy issued
                    b"garbage",
                    *tamper(sid),
                ]
                for bad in forged:
                    status, headers, body = await tools_list(client, bad, 9)
                    assert status == 404, (bad, body)
                    error = json.loads(body)["error"]
                    assert error["type"] == "session_not_found"
                    assert error["request_id"] == header(headers, b"x-request-id").decode()  # type: ignore[union-attr]
                    assert "127.0.0.1" not in body.decode()
                assert a.count() + b.count() == before  # none reached an upstream
            nursery.cancel_scope.cancel()


async def test_a_second_proxy_with_the_same_key_routes_the_same_id_the_same_way(
    key_file: str, tmp_path: Path
) -> None:
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            a, b = await start_pair(nursery)
            first = await run_proxy(nursery, mcp_config(key_file, a, b))
            second = await run_proxy(nursery, mcp_config(key_file, a, b))
            other_key = tmp_path / "other.key"
            other_key.write_text(secrets.token_hex(32))
            stranger = await run_proxy(nursery, mcp_config(str(other_key), a, b))
            async with (
                await Client.open(first) as c1,
                await Client.open(second) as c2,
                await Client.open(stranger) as c3,
            ):
                sessions = [await initialize(c1) for _ in range(2)]
                sessions += [await initialize(c2) for _ in range(2)]
                for sid, minter in sessions:
                    for client in (c1, c2):
                        status, _, body = await tools_list(client, sid)
                        assert status == 200, body
                        assert json.loads(body)["result"]["server"] == minter
                    # A proxy with another key does not know the id.
                    assert (await tools_list(c3, sid))[0] == 404
            nursery.cancel_scope.cancel()


async def test_an_upstream_removed_by_reload_means_404_for_its_sessions(key_file: str) -> None:
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            a, b = await start_pair(nursery)
            proxy = await run_proxy(nursery, mcp_config(key_file, a, b))
            async with await Client.open(proxy) as client:
                pairs = [await initialize(client) for _ in range(2)]
                sessions = {name: sid for sid, name in pairs}
                assert set(sessions) == {"a", "b"}
                assert proxy.server.reload(mcp_config(key_file, b))
            async with await Client.open(
                proxy
            ) as client:  # (an idle kept-alive one: test_groups_health)
                status, _, body = await tools_list(client, sessions["a"])
                assert status == 404
                assert json.loads(body)["error"]["type"] == "session_not_found"
                status, _, body = await tools_list(client, sessions["b"])
                assert status == 200
                assert json.loads(body)["result"]["server"] == "b"
                # The client re-initializes: the group left (b) mints it.
                assert (await initialize(client))[1] == "b"
            nursery.cancel_scope.cancel()


async def test_a_busy_upstream_keeps_its_sessions(key_file: str) -> None:
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            a, b = await start_pair(nursery)
            proxy = await run_proxy(nursery, mcp_config(key_file, a, b))
            async with await Client.open(proxy) as client:
                sid, minter = await initialize(client)
                server = a if minter == "a" else b
                server.rate_limit_next = True
                status, headers, _ = await tools_list(client, sid)
                assert status == 429
                assert header(headers, b"retry-after") == b"5"
                # The session still exists upstream: the client may retry it (after
                # Retry-After), not be told to start over.
                status, _, body = await tools_list(client, sid)
                assert status != 404, body
            nursery.cancel_scope.cancel()


async def test_an_initialize_retried_on_another_upstream_is_pinned_to_the_one_that_answered(
    key_file: str,
) -> None:
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            a, b = await start_pair(nursery)
            a.fail_initialize = True
            route = group_route(
                [entry(a), entry(b)],
                prefix="/mcp/",
                balance="round_robin",  # a first
                affinity="mcp_session",
                retry=RetryPolicy(attempts=2, on=("503",)),
            )
            proxy = await run_proxy(nursery, group_config([route], session_key_file=key_file))
            async with await Client.open(proxy) as client:
                sid, minter = await initialize(client)
                assert minter == "b"
                assert a.count() == 1  # the 503
                for rid in range(2, 5):
                    status, _, body = await tools_list(client, sid, rid)
                    assert status == 200, body
                    assert json.loads(body)["result"]["server"] == "b"
            nursery.cancel_scope.cancel()
