"""The shared state of one process, as the server runs it: the backend connection, the
stream leases and the tunnel-session directory, started and stopped together."""

from __future__ import annotations

from collections.abc import Callable

import trio

from ..config.state import StateSettings
from ..store.backend import StateBackend
from ..store.leases import Leases
from ..store.sessions import Directory, Record

__all__ = ["SharedState"]


class SharedState:
    """Made by ``ProxyState`` when ``[state] redis`` is set; :meth:`run` in the server's
    nursery. ``directory`` exists once the tunnel's relay listener has an address."""

    def __init__(self, settings: StateSettings) -> None:
        self.backend = StateBackend(settings)
        self.leases = Leases(self.backend)
        self.directory: Directory | None = None
        self._publish: Callable[[], list[Record]] | None = None
        self._nursery: trio.Nursery | None = None

    @property
    def up(self) -> bool:
        return self.backend.up

    def publish_sessions(self, address: str, local: Callable[[], list[Record]]) -> Directory:
        """Share this process's tunnel sessions (``local()`` lists them), reachable through
        the relay listener at ``address``; returns the directory lookups go through."""
        self.directory = Directory(self.backend, address)
        self._publish = local
        if self._nursery is not None:
            self._nursery.start_soon(self.directory.run, local)
        return self.directory

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect (first attempt before ``started``), then keep everything going until
        cancelled."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self.backend.run)
            nursery.start_soon(self.leases.run)
            if self.directory is not None and self._publish is not None:
                nursery.start_soon(self.directory.run, self._publish)
            self._nursery = nursery
            task_status.started()
