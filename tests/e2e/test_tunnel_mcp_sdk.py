"""An unmodified MCP client (the official Python SDK, Streamable HTTP transport) uses a stdio
MCP server (tests/mcp_stdio_server.py) through ``proxycore tunnel`` and the gateway: initialize,
tools/list and tools/call. The SDK is anyio-based; under pytest-trio anyio runs on trio."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx2  # the MCP SDK's HTTP client (installed with mcp, the `test` extra)
import pytest
import trio
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client

from proxycore import Config, ServerSettings, serve
from proxycore.config import Inbound, Tunnel
from proxycore.security.secrets import generate_secret
from proxycore.tunnel.client import ClientOptions, TunnelClient
from tests.e2e.test_tunnel_client import eventually

ROOT = Path(__file__).resolve().parents[2]
SERVER = str(ROOT / "tests" / "mcp_stdio_server.py")


@asynccontextmanager
async def tunnelled_gateway(tmp_path: Path) -> AsyncIterator[tuple[str, str, TunnelClient]]:
    """proxycore serving the tunnel (bearer auth) and our client registered on it, running the
    test stdio server as ``sdk-test``. Yields (base URL, token, client)."""
    secret_file = tmp_path / "secret"
    generate_secret(str(secret_file))
    token = secret_file.read_text().split()[0]
    config = Config(
        routes=(),
        server=ServerSettings(listen=("127.0.0.1:0",)),
        inbound=Inbound(mode="bearer", secret_file=str(secret_file)),
        tunnel=Tunnel(enabled=True),
    )
    async with trio.open_nursery() as nursery:
        addresses: list[tuple[str, int]] = await nursery.start(serve, config)
        host, port = addresses[0]
        base = f"http://{host}:{port}"
        client = TunnelClient(
            ClientOptions(
                gateway=f"ws://{host}:{port}/reverse-proxy/ws",
                command=(sys.executable, SERVER),
                name="sdk-test",
                token=token,
                reconnect_delay=0.05,
                keepalive=1.0,
                ack_timeout=5.0,
            )
        )
        nursery.start_soon(lambda: client.run(signals=False))
        await eventually(lambda: client.session_id is not None)
        try:
            yield base, token, client
        finally:
            client.stop()
            child = client.child
            await eventually(lambda: child is None or child.returncode is not None)
            nursery.cancel_scope.cancel()


# The SDK (httpx2) leaves its SSE response iterators to the garbage collector when a call is
# answered as text/event-stream; under trio that is reported as an unraisable ResourceWarning.
@pytest.mark.filterwarnings(
    "ignore:Exception ignored in. <async_generator object:pytest.PytestUnraisableExceptionWarning"
)
async def test_mcp_sdk_client_through_the_tunnel(tmp_path: Path) -> None:
    async with tunnelled_gateway(tmp_path) as (base, token, _client):
        url = f"{base}/reverse-proxy/sessions/sdk-test/mcp"
        http = httpx2.AsyncClient(
            headers={"Authorization": f"Bearer {token}"}, timeout=httpx2.Timeout(30.0)
        )
        with trio.fail_after(30):
            async with (
                http,
                streamable_http_client(url, http_client=http) as streams,
                ClientSession(streams[0], streams[1]) as session,
            ):
                init = await session.initialize()
                assert init.server_info.name == "test-stdio"
                tools = await session.list_tools()
                assert {tool.name for tool in tools.tools} >= {"echo", "pid"}
                result = await session.call_tool("echo", {"text": "through the tunnel"})
                assert not result.is_error
                assert result.content[0].text == "through the tunnel"  # type: ignore[union-attr]

                # the server notifies progress and pings the client (a server->client request,
                # classified as such by the tunnel client) while the call is pending
                seen: list[float] = []

                async def on_progress(
                    progress: float, total: float | None, message: str | None
                ) -> None:
                    seen.append(progress)

                notified = await session.call_tool("notify", {}, progress_callback=on_progress)
                assert notified.content[0].text == "notified"  # type: ignore[union-attr]
                assert seen == [1]
