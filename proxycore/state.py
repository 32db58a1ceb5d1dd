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
from .security import Security

__all__ = ["ProxyState", "Snapshot"]


@dataclass(frozen=True, slots=True)
class Snapshot:
    config: Config
    router: Router
    security: Security
    generation: int


class ProxyState:
    def __init__(self, config: Config) -> None:
        """Raises ``SecretError`` when the inbound secret file is unusable."""
        self.pool = Pool(config.pool)
        self.snapshot = self.prepare(config, 1)
        self.open_connections = 0
        self.exchanges_in_flight = 0

    def prepare(self, config: Config, generation: int) -> Snapshot:
        """Build a snapshot (reads secrets and tokens) without installing it."""
        return Snapshot(config, Router(config.routes), Security(config, self.pool), generation)

    def swap(self, config: Config) -> Snapshot:
        """Install ``config`` for every exchange that starts from now on.

        Everything is built first; if that fails (``SecretError``) nothing changes.
        """
        snapshot = self.prepare(config, self.snapshot.generation + 1)
        self.snapshot = snapshot
        self.pool.settings = config.pool
        return snapshot
