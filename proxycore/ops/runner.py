"""Running one proxy process under signals: SIGHUP reloads, SIGTERM/SIGINT drain.

A second SIGTERM/SIGINT during the drain stops at once. The pid file, when
asked for, is written at start (atomically) and removed at exit.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from collections.abc import Iterator
from typing import Final

import trio

from ..ops.server import Server

__all__ = ["pid_file", "read_pid_file", "run_server"]

log: Final = logging.getLogger("proxycore.runner")


async def run_server(
    server: Server,
    source: str | None,
    *,
    task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run ``server`` until it has shut down, handling SIGHUP, SIGTERM and SIGINT."""
    with trio.open_signal_receiver(signal.SIGHUP, signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                async for signum in signals:
                    if signum == signal.SIGHUP:
                        if source is None:
                            log.warning("SIGHUP: no config file to reload (started without one)")
                        else:
                            server.reload_from(source)
                    elif server.shutting_down:
                        log.warning("second %s: stopping now", signal.Signals(signum).name)
                        server.force()
                    else:
                        log.info("%s: graceful shutdown", signal.Signals(signum).name)
                        server.shutdown()

            nursery.start_soon(watch)
            try:
                await server.run(task_status=task_status)
            finally:
                nursery.cancel_scope.cancel()  # drained (or forced): stop watching signals


@contextlib.contextmanager
def pid_file(path: str | None) -> Iterator[None]:
    """Write this process's pid to ``path`` for the duration of the block."""
    if path is None:
        yield
        return
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="ascii") as file:
        file.write(f"{os.getpid()}\n")
    os.replace(tmp, path)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            if read_pid_file(path) == os.getpid():
                os.unlink(path)


def read_pid_file(path: str) -> int:
    """The pid in ``path``. Raises ``OSError`` or ``ValueError``."""
    with open(path, encoding="ascii") as file:
        return int(file.read().strip())
