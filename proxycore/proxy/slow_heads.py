"""The upstream calls waiting for a response head without their downstream watch.

The upstream core starts the downstream watch (the client going away cancels the
exchange: a task, or on the native front end a registration in the process's
:mod:`~proxycore.net.watch`) only when the exchange waits: even that costs more than
a small exchange. Rather than a timer per exchange (a cancel scope costs more than the
exchange too), each call waiting for its head is entered here with the time its
wait becomes slow; one system task per trio run, running only while some call
waits, starts the watch of those still waiting at ``FAST_WAIT_S``.
"""

from __future__ import annotations

import logging
from typing import Final, Protocol

import trio

__all__ = ["FAST_WAIT_S", "SlowHeads", "Watchable", "slow_heads"]

log: Final = logging.getLogger("proxycore.upstream")

#: How long a response head may take before the downstream is watched.
FAST_WAIT_S: Final = 0.005


class Watchable(Protocol):
    def watch_downstream(self) -> None:
        """Start the downstream watch (idempotent, never raises)."""
        ...


class SlowHeads:
    """The waiting calls of one trio run (see the module docstring)."""

    __slots__ = ("_running", "_waiting")

    def __init__(self) -> None:
        self._waiting: dict[Watchable, float] = {}
        self._running = False

    def __len__(self) -> int:
        return len(self._waiting)

    def add(self, call: Watchable) -> None:
        self._waiting[call] = trio.current_time() + FAST_WAIT_S
        if not self._running:
            self._running = True
            trio.lowlevel.spawn_system_task(self._run, name="proxycore slow-head watcher")

    def discard(self, call: Watchable) -> None:
        self._waiting.pop(call, None)

    async def _run(self) -> None:
        try:
            while self._waiting:
                await trio.sleep_until(min(self._waiting.values()))
                now = trio.current_time()
                for call in [c for c, at in self._waiting.items() if at <= now]:
                    del self._waiting[call]
                    try:  # a system task's exception would end the whole run
                        call.watch_downstream()
                    except Exception:
                        log.exception("starting a downstream watch failed")
        finally:
            self._running = False


_SLOW: Final = trio.lowlevel.RunVar[SlowHeads]("proxycore_slow_heads")


def slow_heads() -> SlowHeads:
    """This trio run's registry (made on first use)."""
    try:
        return _SLOW.get()
    except LookupError:
        slow = SlowHeads()
        _SLOW.set(slow)
        return slow
