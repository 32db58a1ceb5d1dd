"""What one running proxy shares between its connections.

``ProxyState.snapshot`` is replaced as a whole (one attribute assignment) when
a new config is swapped in. An exchange reads it once when it starts and keeps
that snapshot to its end, so requests in flight finish with the config they
started with.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import Config
from .pool import Pool
from .router import Router

__all__ = ["ProxyState", "Snapshot"]


@dataclass(frozen=True, slots=True)
class Snapshot:
    config: Config
    router: Router
    generation: int


class ProxyState:
    def __init__(self, config: Config) -> None:
        self.snapshot = Snapshot(config, Router(config.routes), 1)
        self.pool = Pool(config.pool)
        self.open_connections = 0
        self.exchanges_in_flight = 0

    def swap(self, config: Config) -> Snapshot:
        """Install ``config`` for every exchange that starts from now on."""
        self.snapshot = Snapshot(config, Router(config.routes), self.snapshot.generation + 1)
        self.pool.settings = config.pool
        return self.snapshot
