"""One ``serve`` process and the OS: SIGHUP held until it is handled, and the pid file.

SIGHUP's default action ends a process, and a reload request must never do that. So
``serve`` holds SIGHUP from its first line (:func:`sighup_held`: blocked, so one that
arrives stays pending instead of acting), and :func:`signal_receiver` lets it through
only once trio's handler is installed: a SIGHUP sent while the process starts is a
reload as soon as it is ready. Several are one reload (the kernel keeps one pending
signal of each kind). The pid file is written once the handler is installed
(:func:`pid_file` inside :func:`signal_receiver`), so ``proxycore reload`` never
signals a process that would die of it; the supervisor signals only workers that
reported ready, and passes a SIGHUP that came earlier on when they do.

What is left: a SIGHUP sent to the pid before ``serve`` runs its first line (while
the interpreter starts and imports, a fraction of a second) still ends the process;
only a sender that took the pid from somewhere else than the pid file can do that.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import AsyncIterator, Iterator

import trio

__all__ = ["pid_file", "read_pid_file", "sighup_held", "signal_receiver"]

_SIGHUP = frozenset({signal.SIGHUP})


@contextlib.contextmanager
def sighup_held() -> Iterator[None]:
    """Hold SIGHUP (blocked in this thread: one that arrives stays pending) for the block.

    On exit, a SIGHUP still pending came after the handler was gone, with nothing left to
    reload: it is dropped, and the thread's signal mask is restored.
    """
    before = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGHUP)
    try:
        yield
    finally:
        if signal.SIGHUP not in before:
            while signal.sigtimedwait(_SIGHUP, 0) is not None:
                pass
            signal.pthread_sigmask(signal.SIG_SETMASK, before)


@contextlib.contextmanager
def signal_receiver(*signums: int) -> Iterator[AsyncIterator[int]]:
    """``trio.open_signal_receiver(*signums)``, then SIGHUP let through (a held one now).

    On exit the mask is restored before the handlers are: a held process holds SIGHUP
    again, so one that comes after the handler is gone stays pending (never fatal).
    """
    with trio.open_signal_receiver(*signums) as signals:
        before = signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGHUP)
        try:
            yield signals
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, before)


@contextlib.contextmanager
def pid_file(path: str | None) -> Iterator[None]:
    """Write this process's pid to ``path`` (atomically) for the duration of the block."""
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
