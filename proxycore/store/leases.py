"""This replica's concurrent-stream leases in the shared state: renewed while the streams
run, freed when they end (:mod:`proxycore.store.scripts` for the Redis side).

:meth:`Leases.run` renews every held lease each third of ``[state] lease`` (one script call
for all of them), and frees ended streams' leases in batches as soon as they end. When the
backend comes back after an outage (a new :attr:`StateBackend.epoch`: it may have restarted
empty) the first renewal re-adds the leases it lost, so streams still open keep counting.
A lease whose release could not reach the backend simply expires within the lease time, and
so do all the leases of a replica that died.
"""

from __future__ import annotations

import itertools
import logging
from typing import Final

import trio

from ..store.backend import StateBackend, Unavailable
from ..store.scripts import RELEASE, RENEW

__all__ = ["Leases"]

log: Final = logging.getLogger("proxycore.state")

#: Leases renewed or released per script call.
BATCH: Final = 500
#: Releases kept while the backend is away (more simply expire with their lease).
MAX_PENDING: Final = 10_000


class Leases:
    """The leases this process holds (see the module docstring)."""

    def __init__(self, backend: StateBackend) -> None:
        backend.before_up = self._flush_on_recovery
        self.backend = backend
        #: lease id -> its key (the sorted set).
        self.held: dict[str, str] = {}
        self._released: list[tuple[str, str]] = []
        self._seq = itertools.count(1)
        self._wake = trio.Event()
        self._epoch = 0

    def __len__(self) -> int:
        return len(self.held)

    @property
    def lease_ms(self) -> int:
        return max(1, round(self.backend.settings.lease * 1000))

    def new_id(self) -> str:
        return f"{self.backend.replica}:{next(self._seq)}"

    def hold(self, lease: str, key: str) -> None:
        """A lease the backend granted: renew it until :meth:`release`."""
        self.held[lease] = key
        self._epoch = self._epoch or self.backend.epoch

    def release(self, lease: str) -> None:
        """The stream ended: stop renewing, free the slot soon (never blocks)."""
        key = self.held.pop(lease, None)
        if key is not None:
            self._released.append((key, lease))
            self._wake.set()

    def abandon(self, lease: str, key: str) -> None:
        """A lease asked for in a call that did not answer in time: the backend may still
        have granted it, so release it like an ended stream (else it would hold a slot for
        the whole lease time)."""
        if len(self._released) < MAX_PENDING:
            self._released.append((key, lease))
            self._wake.set()

    async def _flush_on_recovery(self) -> None:
        if self._released:
            await self._flush(probing=True)

    async def run(self) -> None:
        """Renew and release until cancelled."""
        interval = self.backend.settings.lease / 3
        next_renewal = trio.current_time() + interval
        while True:
            with trio.move_on_at(next_renewal):
                await self._wake.wait()
            self._wake = trio.Event()
            if self._released:
                await self._flush()
            if trio.current_time() >= next_renewal:
                await self._renew()
                next_renewal = trio.current_time() + interval

    async def _flush(self, *, probing: bool = False) -> None:
        if not self.backend.up and not probing:  # kept for when it is back (bounded)
            del self._released[MAX_PENDING:]
            return
        released, self._released = self._released, []
        for start in range(0, len(released), BATCH):
            part = released[start : start + BATCH]
            try:
                await self.backend.script(
                    RELEASE, [k for k, _ in part], [i for _, i in part], probing=probing
                )
            except Unavailable:  # kept for the recovery (the backend is marked down)
                self._released[:0] = released[start:MAX_PENDING]
                return

    async def _renew(self) -> None:
        backend = self.backend
        if not self.held or not backend.up:
            return
        restore = backend.epoch != self._epoch
        mode = "" if restore else "XX"
        items = list(self.held.items())
        for start in range(0, len(items), BATCH):
            part = items[start : start + BATCH]
            try:
                await backend.script(
                    RENEW, [key for _, key in part], [self.lease_ms, mode, *(i for i, _ in part)]
                )
            except Unavailable:
                return
        if restore:
            log.info("re-asserted %d stream lease(s) after the backend came back", len(items))
            self._epoch = backend.epoch
