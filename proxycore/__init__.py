"""proxycore: a Trio + h11 streaming reverse proxy for LLM, SSE and agent traffic.

The public API is what ``__all__`` lists: build a :class:`Config` (in code or
from a file), run it with :func:`serve` inside your own nursery, and look at or
change exchanges with :class:`Hooks`. Everything else is internal.

Embedding::

    import trio, proxycore

    config = proxycore.Config(
        routes=(proxycore.Route(prefix="/", upstream="http://127.0.0.1:8000/"),),
        server=proxycore.ServerSettings(listen=("127.0.0.1:0",)),
    )

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            addrs = await nursery.start(proxycore.serve, config)
            print("proxy on", addrs)
"""

from __future__ import annotations

from .config import AdminSettings as AdminSettings
from .config import Config as Config
from .config import ConfigError as ConfigError
from .config import Inbound as Inbound
from .config import Inject as Inject
from .config import PoolSettings as PoolSettings
from .config import RateLimit as RateLimit
from .config import Route as Route
from .config import ServerSettings as ServerSettings
from .config import SSESettings as SSESettings
from .config import Timeouts as Timeouts
from .config import WebSocketSettings as WebSocketSettings
from .http.sse import SSEEvent as SSEEvent
from .ops.server import serve as serve
from .proxy.hooks import ExchangeInfo as ExchangeInfo
from .proxy.hooks import Hooks as Hooks
from .proxy.hooks import Request as Request
from .proxy.hooks import Response as Response
from .proxy.hooks import Summary as Summary

__all__ = [
    "AdminSettings",
    "Config",
    "ConfigError",
    "ExchangeInfo",
    "Hooks",
    "Inbound",
    "Inject",
    "PoolSettings",
    "RateLimit",
    "Request",
    "Response",
    "Route",
    "SSEEvent",
    "SSESettings",
    "ServerSettings",
    "Summary",
    "Timeouts",
    "WebSocketSettings",
    "serve",
]
