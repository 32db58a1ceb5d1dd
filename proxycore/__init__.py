"""proxycore: a Trio + h11 streaming reverse proxy for LLM, SSE and agent traffic.

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

from .config import Config as Config
from .config import ConfigError as ConfigError
from .config import Inject as Inject
from .config import PoolSettings as PoolSettings
from .config import Route as Route
from .config import ServerSettings as ServerSettings
from .config import Timeouts as Timeouts
from .server import serve as serve

__all__ = [
    "Config",
    "ConfigError",
    "Inject",
    "PoolSettings",
    "Route",
    "ServerSettings",
    "Timeouts",
    "serve",
]
