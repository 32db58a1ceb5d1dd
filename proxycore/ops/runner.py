"""Running one proxy process under signals: SIGHUP reloads, SIGTERM/SIGINT drain.

A second SIGTERM/SIGINT during the drain stops at once. The pid file, when asked
for, is written once the handlers are installed (see :mod:`proxycore.ops.process`:
a SIGHUP held since the process started is a reload now) and removed at exit.
"""

from __future__ import annotations

import logging
import signal
from typing import Final

import trio

from ..observe.accesslog import flush_logs
from ..ops.process import pid_file, signal_receiver
from ..ops.server import Server

__all__ = ["run_server"]

log: Final = logging.getLogger("proxycore.runner")


async def run_server(
    server: Server,
    source: str | None,
    pid_path: str | None = None,
    *,
    task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run ``server`` until it has shut down, handling SIGHUP, SIGTERM and SIGINT."""
    signums = (signal.SIGHUP, signal.SIGTERM, signal.SIGINT)
    with signal_receiver(*signums) as signals, pid_file(pid_path):
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
                flush_logs()  # held access lines, while a second signal is still caught
