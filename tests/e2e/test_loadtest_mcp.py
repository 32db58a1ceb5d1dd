"""``--mcp``: virtual users against the simulator's MCP Streamable HTTP endpoint
(hypercorn on 127.0.0.1): one session per user reused across calls, re-initialization
after a 404, JSON-RPC errors by code, replies as JSON or as an SSE stream."""

from __future__ import annotations

import pytest
import trio

from proxycore.tools.loadgen import LoadSpec, run_load
from proxycore.tools.sim import Receive, Scope, Send, make_app
from tests.helpers import start_app

ECHO = '{"name": "echo", "arguments": {"text": "hi"}}'


async def start_sim(
    nursery: trio.Nursery, seen: list[tuple[str, str | None]], expire: int | None = None
) -> int:
    """The simulator, recording ``(method, Mcp-Session-Id)`` of every request."""
    inner = make_app(mcp_expire_after=expire)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = dict(scope["headers"])
            session = headers.get(b"mcp-session-id")
            seen.append((scope["method"], session.decode() if session else None))
        await inner(scope, receive, send)

    _, port = await start_app(nursery, app)
    return port


def mcp_spec(port: int, method: str = "tools/call", path: str = "/mcp", **kw: object) -> LoadSpec:
    fields: dict[str, object] = {"requests": 20, "concurrency": 2, "timeout": 10.0}
    fields["mcp_params"] = ECHO if method == "tools/call" else None
    return LoadSpec("127.0.0.1", port, path=path, mcp_method=method, **(fields | kw))  # type: ignore[arg-type]


@pytest.mark.parametrize("path", ["/mcp", "/mcp?sse=1"])
async def test_each_user_initializes_once_and_reuses_its_session(
    nursery: trio.Nursery, path: str
) -> None:
    seen: list[tuple[str, str | None]] = []
    port = await start_sim(nursery, seen)
    with trio.fail_after(10):
        result = await run_load(mcp_spec(port, path=path))
    assert (result.ok, result.errors) == (20, 0)
    assert (result.mcp_initializations, result.mcp_reinitializations) == (2, 0)
    assert result.connections == 2
    assert result.latency.count == result.ttfb.count == 20  # one sample per call
    # 2 initialize (no session yet) + 2 notifications/initialized + 20 calls, every
    # request after initialize carrying one of the two sessions.
    assert len(seen) == 24
    assert sum(1 for _, session in seen if session is None) == 2
    assert len({session for _, session in seen if session is not None}) == 2


async def test_a_404_for_the_session_re_initializes(nursery: trio.Nursery) -> None:
    # Sessions end after 5 calls: one user making 20 calls gets the 404 on calls 6, 11
    # and 16, initializes again each time, and the call is made again (not an error).
    seen: list[tuple[str, str | None]] = []
    port = await start_sim(nursery, seen, expire=5)
    with trio.fail_after(10):
        result = await run_load(mcp_spec(port, concurrency=1))
    assert (result.ok, result.errors) == (20, 0)
    assert (result.mcp_initializations, result.mcp_reinitializations) == (4, 3)
    assert len({session for _, session in seen if session is not None}) == 4
    assert result.to_json()["mcp"] == {
        "initializations": 4,
        "reinitializations": 3,
        "rpc_errors": {},
    }


async def test_json_rpc_errors_are_counted_by_code(nursery: trio.Nursery) -> None:
    port = await start_sim(nursery, [])
    with trio.fail_after(10):
        unknown = await run_load(mcp_spec(port, "no/such/method", requests=4))
        bad_args = await run_load(
            mcp_spec(port, requests=3, mcp_params='{"name": "echo", "arguments": {}}')
        )
    assert unknown.error_kinds == {"jsonrpc": 4}
    assert unknown.rpc_errors == {"-32601": 4}
    assert bad_args.rpc_errors == {"-32602": 3}
    assert unknown.latency.count == 0  # failed calls give no latency sample


async def test_a_server_that_is_no_mcp_server(nursery: trio.Nursery) -> None:
    port = await start_sim(nursery, [])
    with trio.fail_after(10):
        result = await run_load(mcp_spec(port, path="/small", requests=3, concurrency=1))
    # /small answers 200 text/plain to initialize: no JSON-RPC reply, a protocol error.
    assert result.ok == 0
    assert result.error_kinds == {"protocol": 3}
    assert result.mcp_initializations == 3
