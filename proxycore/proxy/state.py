"""What one running proxy shares between its connections.

``ProxyState.snapshot`` is replaced as a whole (one attribute assignment) when
a new config is swapped in. An exchange reads it once when it starts and keeps
that snapshot to its end, so requests in flight finish with the config they
started with.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import trio

from ..config import Config, HealthCheck
from ..http.router import Router
from ..net.pool import Pool
from ..observe.metrics import Gauges, Metrics, UpstreamStats
from ..observe.transcript import TranscriptWriters
from ..proxy.attempts import Affinity
from ..proxy.hooks import Hooks
from ..security.admission import Security
from ..security.secrets import SecretError
from ..store.runtime import SharedState
from ..tunnel.relay import PEERS
from ..tunnel.sessions import Registry
from ..upstreams.affinity import SessionIds, load_key
from ..upstreams.group import UpstreamGroup
from ..upstreams.health import run_health_checks

__all__ = ["ProxyState", "Snapshot"]


@dataclass(frozen=True, slots=True)
class Snapshot:
    config: Config
    router: Router
    security: Security
    generation: int
    #: The upstream group of each route (``config.routes`` order; ``Match.index``).
    groups: tuple[UpstreamGroup, ...] = ()
    #: MCP session affinity of each route (None where it is off).
    affinities: tuple[Affinity | None, ...] = ()

    def health_checks(self) -> list[tuple[UpstreamGroup, HealthCheck]]:
        """The groups with active health checks, and their settings."""
        return [
            (group, route.health_check)
            for group, route in zip(self.groups, self.config.routes, strict=True)
            if route.health_check is not None
        ]


class ProxyState:
    def __init__(self, config: Config, hooks: Hooks | None = None) -> None:
        """Raises ``SecretError`` when the inbound secret file is unusable."""
        self.hooks = hooks or Hooks()
        self.transcripts = TranscriptWriters()
        self.pool = Pool(config.pool)
        #: ``[state]``: what replicas share (fixed at start; the server runs it).
        self.shared = SharedState(config.state) if config.state.enabled else None
        #: While :meth:`run` runs: its nursery, and the health checks' scope.
        self._nursery: trio.Nursery | None = None
        self._health: trio.CancelScope | None = None
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
            upstreams=self.upstream_stats(),
            state_backend_up=None if self.shared is None else self.shared.up,
        )

    def upstream_stats(self) -> tuple[UpstreamStats, ...]:
        """Every upstream of the current snapshot's groups (single upstreams too)."""
        try:
            now = trio.current_time()
        except RuntimeError:  # outside trio (a test reading the gauges): nothing is ejected
            now = math.inf
        return tuple(
            UpstreamStats(
                group.route,
                m.name,
                m.requests,
                m.failures,
                m.retries,
                m.ejections,
                m.active,
                m.healthy,
                m.ejected(now),
            )
            for group in self.snapshot.groups
            for m in group.members
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The state's own background work, until cancelled (both front ends run it): the
        pool sweeper, ``[state]``'s backend, and the health checks of the current
        snapshot's groups (restarted by :meth:`swap`)."""
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.pool.run_sweeper)
                if self.shared is not None:
                    await nursery.start(self.shared.run)
                self._nursery = nursery
                self._restart_health_checks()
                task_status.started()
        finally:
            self._nursery = self._health = None

    def _restart_health_checks(self) -> None:
        """Cancel the running checks and start the current snapshot's (members carried
        over by a reload keep their state)."""
        if self._health is not None:
            self._health.cancel()
            self._health = None
        checks = self.snapshot.health_checks()
        if checks and self._nursery is not None:
            scope = self._health = trio.CancelScope()
            self._nursery.start_soon(self._health_checks, scope, checks)

    @staticmethod
    async def _health_checks(
        scope: trio.CancelScope, checks: list[tuple[UpstreamGroup, HealthCheck]]
    ) -> None:
        with scope:
            await run_health_checks(checks)

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
        before = previous.security if previous else None
        security = Security(config, self.pool, before, shared=self.shared)
        groups = _groups(config, previous)
        ids = _session_ids(config)
        affinities = tuple(
            Affinity(ids, group, route.prefix) if ids is not None and route.affinity else None
            for route, group in zip(config.routes, groups, strict=True)
        )
        return Snapshot(config, Router(config.routes), security, generation, groups, affinities)

    def swap(self, config: Config) -> Snapshot:
        """Install ``config`` for every exchange that starts from now on.

        Everything is built first; if that fails (``SecretError``) nothing changes.
        """
        snapshot = self.prepare(config, self.snapshot.generation + 1, self.snapshot)
        self.snapshot = snapshot
        self.pool.settings = config.pool
        self.enable_tunnel(config)
        self._restart_health_checks()
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


def _groups(config: Config, previous: Snapshot | None) -> tuple[UpstreamGroup, ...]:
    """Each route's group; a route whose prefix was there before keeps its members' state
    (those with the same name, URL and TLS settings) and its retry budget."""
    before = (
        {
            route.prefix: group
            for route, group in zip(previous.config.routes, previous.groups, strict=True)
        }
        if previous is not None
        else {}
    )
    return tuple(
        UpstreamGroup(
            route.name,
            route.group,
            balance=route.balance,
            retry=route.retry_policy,
            outlier=route.outlier_policy,
            checked=route.health_check is not None,
            previous=before.get(route.prefix),
        )
        for route in config.routes
    )


def _session_ids(config: Config) -> SessionIds | None:
    """The MCP session-id key, when a route uses affinity. Raises ``SecretError``."""
    path = config.server.session_key_file
    if path is None or not any(route.affinity for route in config.routes):
        return None
    try:
        return SessionIds(load_key(path))
    except OSError as exc:
        raise SecretError(
            f"server.session_key_file: cannot read {path!r}: {exc.strerror or exc}"
        ) from None
    except ValueError as exc:
        raise SecretError(f"server.session_key_file: {path!r} {exc}") from None
