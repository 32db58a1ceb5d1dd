"""What one running proxy shares between its connections.

``ProxyState.snapshot`` is replaced as a whole (one attribute assignment) when
a new config is swapped in. An exchange reads it once when it starts and keeps
that snapshot to its end, so requests in flight finish with the config they
started with.
"""

from __future__ import annotations

from dataclasses import dataclass

import trio

from ..config import Config
from ..http.router import Router
from ..net.pool import Pool
from ..observe.metrics import Gauges, Metrics
from ..observe.transcript import TranscriptWriters
from ..proxy.hooks import Hooks
from ..security.admission import Security
from ..tunnel.relay import PEERS
from ..tunnel.sessions import Registry

__all__ = ["ProxyState", "Snapshot"]


@dataclass(frozen=True, slots=True)
class Snapshot:
    config: Config
    router: Router
    security: Security
    generation: int


class ProxyState:
    def __init__(self, config: Config, hooks: Hooks | None = None) -> None:
        """Raises ``SecretError`` when the inbound secret file is unusable."""
        self.hooks = hooks or Hooks()
        self.transcripts = TranscriptWriters()
        self.pool = Pool(config.pool)
        self.snapshot = self.prepare(config, 1)
        self.open_connections = 0
        self.exchanges_in_flight = 0
        #: Set once a graceful shutdown began: no new requests on kept-alive connections.
        self.draining = False
        #: Cancel scopes of connections idling between requests (cancelled on drain).
        self.idle_waits: set[trio.CancelScope] = set()
        #: Set whenever the last client connection closes.
        self.all_closed = trio.Event()
        self.all_closed.set()
        #: The tunnel sessions of this process (made when ``[tunnel]`` is first enabled).
        self.tunnel: Registry | None = None
        self.metrics = Metrics(self.gauges)
        self.enable_tunnel(config)

    def gauges(self) -> Gauges:
        """The current state for the metrics collector (called once per scrape)."""
        pool = self.pool
        return Gauges(
            exchanges_in_flight=self.exchanges_in_flight,
            client_connections=self.open_connections,
            config_generation=self.snapshot.generation,
            pool_idle=pool.counts(),
            pool_busy=dict(pool.busy),
            tunnel_sessions=len(self.tunnel) if self.tunnel is not None else 0,
        )

    def connection_opened(self) -> None:
        self.open_connections += 1
        if self.all_closed.is_set():
            self.all_closed = trio.Event()

    def connection_closed(self) -> None:
        self.open_connections -= 1
        if not self.open_connections:
            self.all_closed.set()

    def start_draining(self) -> None:
        """Stop taking new requests; close connections that idle between requests."""
        self.draining = True
        for scope in list(self.idle_waits):
            scope.cancel()

    def prepare(
        self, config: Config, generation: int, previous: Snapshot | None = None
    ) -> Snapshot:
        """Build a snapshot (reads secrets and tokens) without installing it; the rate-limit
        state of ``previous``'s unchanged routes is carried over (see ``Security``)."""
        security = Security(config, self.pool, previous.security if previous else None)
        return Snapshot(config, Router(config.routes), security, generation)

    def swap(self, config: Config) -> Snapshot:
        """Install ``config`` for every exchange that starts from now on.

        Everything is built first; if that fails (``SecretError``) nothing changes.
        """
        snapshot = self.prepare(config, self.snapshot.generation + 1, self.snapshot)
        self.snapshot = snapshot
        self.pool.settings = config.pool
        self.enable_tunnel(config)
        return snapshot

    def enable_tunnel(self, config: Config) -> None:
        """Make the tunnel registry on the first config that enables it; later configs
        change its limits and timeouts (sessions live on when it is turned off: their
        route is gone, so they can only end)."""
        if self.tunnel is not None:
            self.tunnel.settings = config.tunnel
        elif config.tunnel.enabled:
            prefix = PEERS.prefix if PEERS is not None else ""
            observe = self.metrics.observe_tunnel_call
            self.tunnel = Registry(config.tunnel, observe=observe, id_prefix=prefix)
