"""The server: listeners, lifecycle and the top-level ``serve``.

One nursery per listener holds that listener's client connections, one task
each. ``max_connections`` is enforced at accept time: at the limit the proxy
stops accepting and the kernel's backlog holds new clients. Binding and
accepting (skipping per-connection and resource errors: counted in
``proxycore_accept_errors_total{errno}`` and logged by :class:`AcceptErrors`) are
:mod:`proxycore.net.listener`.

Lifecycle (``Server``):

- ``reload(config)`` builds the new snapshot off to the side (router,
  security: secrets and tokens are read) and swaps it in with one assignment;
  exchanges in flight keep the snapshot they started with. Anything that fails
  keeps the old config. Listen-address changes need a restart (logged).
- ``shutdown()`` stops accepting at once, closes connections idling between
  requests, lets in-flight exchanges finish for ``server.shutdown_grace``
  seconds, then cancels what is left; ``run`` then returns. ``force()`` cancels
  everything now (a second signal).
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from typing import Final

import trio

from ..config import Config, ConfigError
from ..net.listener import accept, bind_listener, errno_name
from ..observe.metrics import Metrics
from ..ops.admin import AdminApp, serve_admin
from ..proxy.connection import ClientConnection
from ..proxy.hooks import Hooks
from ..proxy.state import ProxyState
from ..security.admission import exposure_problem
from ..security.secrets import SecretError
from ..tunnel.relay import PEERS
from ..tunnel.relay_server import serve_relay, serve_replica_relay

__all__ = ["AcceptErrors", "Server", "bind_listener", "serve"]

log: Final = logging.getLogger("proxycore.server")

Address = tuple[str, int]

#: Each errno's skipped accept() errors are logged at most once per this many seconds.
ACCEPT_LOG_INTERVAL_S: Final = 60.0


class AcceptErrors:
    """The listeners' ``on_error``: counts each skipped ``accept()`` error in
    ``proxycore_accept_errors_total{errno}`` and logs each errno at most once per
    ``interval`` seconds (with how many were not logged since)."""

    def __init__(self, metrics: Metrics, interval: float = ACCEPT_LOG_INTERVAL_S) -> None:
        self.metrics = metrics
        self.interval = interval
        #: errno -> (trio time it was last logged, errors since then not logged)
        self._logged: dict[int, tuple[float, int]] = {}

    def __call__(self, number: int) -> None:
        name = errno_name(number)
        self.metrics.accept_errors.labels(name).inc()
        now = trio.current_time()
        last = self._logged.get(number)
        if last is not None and now - last[0] < self.interval:
            self._logged[number] = (last[0], last[1] + 1)
            return
        self._logged[number] = (now, 0)
        more = f"; {last[1]} more since the last report" if last is not None and last[1] else ""
        log.warning(
            "accept() failed (%s): skipped, still listening%s (reported at most every %g s)",
            name,
            more,
            self.interval,
        )


#: Connections accepted in a row without a checkpoint before the accept loop yields.
_BURST: Final = 64


async def _handle(
    sock: socket.socket, peer_ip: str, state: ProxyState, limit: trio.Semaphore
) -> None:
    try:
        await ClientConnection(sock, peer_ip, state).serve()
    finally:
        limit.release()


class Server:
    """One proxy: listeners, admin endpoint, reload and graceful shutdown."""

    def __init__(
        self,
        config: Config,
        *,
        reuse_port: bool = False,
        adjust: Callable[[Config], Config] | None = None,
        hooks: Hooks | None = None,
    ) -> None:
        """Raises ``ConfigError`` (unsafe exposure) or ``SecretError`` (inbound secret).

        ``adjust`` is applied to every config given to :meth:`reload_from` (a
        worker keeps the supervisor's listen and admin overrides).
        """
        problem = exposure_problem(config)
        if problem:
            raise ConfigError(problem)
        self.config = config
        #: The config the listeners were bound with (address changes need a restart).
        self._bound = config
        self.state = ProxyState(config, hooks)
        self.reuse_port = reuse_port
        self.adjust = adjust
        self.ready = False
        self.admin_address: Address | None = None
        self._stop = trio.Event()
        self._accepting: list[trio.CancelScope] = []
        self._root: trio.CancelScope | None = None
        self.accept_errors = AcceptErrors(self.state.metrics)

    # -- control -----------------------------------------------------------

    def reload(self, config: Config) -> bool:
        """Swap ``config`` in for new exchanges; False (old config kept) if it can't be."""
        outcome = "error"
        try:
            problem = exposure_problem(config)
            if problem:
                raise ConfigError(problem)
            snapshot = self.state.swap(config)
            outcome = "ok"
        except (ConfigError, SecretError) as exc:
            log.error("reload refused, keeping the old config: %s", str(exc).replace("\n", "; "))
            return False
        finally:
            self.state.metrics.reloads.labels(outcome).inc()
        bound = self._bound
        if config.server.listen != bound.server.listen or config.admin != bound.admin:
            log.warning(
                "reload: listen/admin address changes need a restart; still on %s",
                ", ".join(bound.server.listen),
            )
        if config.state != bound.state:  # the backend is made once, at start
            log.warning("reload: [state] changes need a restart; the old settings stay")
        self.config = config
        log.info("reloaded config (generation %d)", snapshot.generation)
        return True

    def _upstreams_detail(self) -> bytes:
        """One line per upstream of each group for ``/readyz``: up, down, ejected, busy."""
        lines = []
        now = trio.current_time()
        snapshot = self.state.snapshot
        for route, group in zip(snapshot.config.routes, snapshot.groups, strict=True):
            if group.single is not None:
                continue
            for member in group.members:
                lines.append(f"upstream {route.prefix} {member.name} {member.status(now)}\n")
        return "".join(lines).encode()

    def reload_from(self, path: str) -> bool:
        """Re-read ``path`` (TOML or legacy JSON) and :meth:`reload` it."""
        try:
            config = Config.load(path)
        except ConfigError as exc:
            self.state.metrics.reloads.labels("error").inc()
            log.error("reload refused, keeping the old config: %s", str(exc).replace("\n", "; "))
            return False
        return self.reload(self.adjust(config) if self.adjust else config)

    def shutdown(self) -> None:
        """Begin a graceful shutdown (idempotent)."""
        self._stop.set()

    def force(self) -> None:
        """Stop now: cancel every exchange and close every socket."""
        self._stop.set()
        if self._root is not None:
            self._root.cancel()

    @property
    def shutting_down(self) -> bool:
        return self._stop.is_set()

    # -- running -----------------------------------------------------------

    async def run(
        self, *, task_status: trio.TaskStatus[list[Address]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve until :meth:`shutdown` has drained (or :meth:`force`), or until cancelled."""
        config, state = self.config, self.state
        listeners: list[socket.socket] = []
        try:
            for host, port in config.server.listen_addresses:
                listeners.append(bind_listener(host, port, reuse_port=self.reuse_port))
            bound = [(str(s.getsockname()[0]), int(s.getsockname()[1])) for s in listeners]
            limit = trio.Semaphore(config.server.max_connections)
            async with trio.open_nursery() as nursery:
                self._root = nursery.cancel_scope
                state.transcripts.nursery = nursery
                # The pool sweeper, [state]'s backend, the groups' health checks.
                await nursery.start(state.run)
                admin = config.admin.address
                if admin is not None:
                    app = AdminApp(self._is_ready, self._metrics, self._upstreams_detail)
                    self.admin_address = await nursery.start(serve_admin, app, *admin)
                if PEERS is not None:  # a worker of serve --workers N: the tunnel relay
                    await nursery.start(serve_relay, PEERS, lambda: state.tunnel)
                tunnel, shared = state.tunnel, state.shared
                if shared is not None and config.state.relay_listen and tunnel is not None:
                    args = (shared, tunnel, config.state)  # [state]: other replicas' callers
                    await nursery.start(serve_replica_relay, *args)
                for listener in listeners:
                    nursery.start_soon(self._listen, listener, limit)
                for host, port in bound:
                    log.info("listening on %s:%d", host, port)
                self.ready = True
                task_status.started(bound)
                await self._stop.wait()
                await self._drain(listeners)
                nursery.cancel_scope.cancel()
        finally:
            self.ready = False
            for listener in listeners:
                if listener.fileno() != -1:
                    trio.lowlevel.notify_closing(listener)
                    listener.close()
            state.pool.close_all()

    async def _metrics(self) -> bytes:
        return self.state.metrics.exposition()

    def _is_ready(self) -> bool:
        return self.ready and not self.shutting_down

    async def _listen(self, listener: socket.socket, limit: trio.Semaphore) -> None:
        async with trio.open_nursery() as connections:
            with trio.CancelScope() as accepting:
                self._accepting.append(accepting)
                burst = 0
                while True:
                    # A free slot is taken without a checkpoint (a scheduler round per
                    # accept shows on fresh connections); ``accept`` yields when it waits,
                    # and a long burst of ready connections yields every ``_BURST``.
                    try:
                        limit.acquire_nowait()
                    except trio.WouldBlock:
                        await limit.acquire()
                        burst = 0
                    try:
                        sock, addr = await accept(listener, self.accept_errors)
                    except BaseException:
                        limit.release()
                        raise
                    connections.start_soon(_handle, sock, addr[0], self.state, limit)
                    burst += 1
                    if burst >= _BURST:
                        burst = 0
                        await trio.lowlevel.checkpoint()

    async def _drain(self, listeners: list[socket.socket]) -> None:
        grace = self.config.server.shutdown_grace
        log.info("shutting down: no new connections; draining for up to %g s", grace)
        for scope in self._accepting:
            scope.cancel()
        for listener in listeners:
            trio.lowlevel.notify_closing(listener)
            listener.close()
        self.state.start_draining()
        with trio.move_on_after(grace) as waited:
            await self.state.all_closed.wait()
        if waited.cancelled_caught:
            log.warning(
                "shutdown grace (%g s) over: cutting %d connection(s)",
                grace,
                self.state.open_connections,
            )


async def serve(
    config: Config,
    *,
    hooks: Hooks | None = None,
    task_status: trio.TaskStatus[list[Address]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the proxy until cancelled.

    Binds every ``config.server.listen`` address, then calls
    ``task_status.started(addresses)`` with the bound ``(host, port)`` pairs
    (so ``await nursery.start(serve, config)`` works with port 0). Cancelling
    the surrounding scope closes the listeners, every client connection and
    the upstream pool.

    ``hooks`` (see :mod:`proxycore.hooks`) look at or change exchanges.

    Raises ``ConfigError`` for an unauthenticated non-loopback listener (unless
    ``server.allow_public``) and ``SecretError`` for an unusable inbound secret
    file, before anything is bound.
    """
    await Server(config, hooks=hooks).run(task_status=task_status)
