"""One process-wide watch of held client sockets: a closed client is noticed at once,
without a task per stream.

While a response streams (an SSE stream held open for an hour), the proxy must still see
the client go away: the exchange is then cancelled and its upstream connection closed.
A task per stream waiting on the client socket costs ~5 KiB each (task, context, the
await chain, a nursery and its scopes, trio's waiters). Here, one ``select.epoll`` per
trio run holds every watched client socket (``EPOLLIN | EPOLLRDHUP``, level-triggered)
and one system task waits on that epoll's own fd (trio's ``wait_readable``): when it is
readable, ``poll(0)`` names the ready sockets, each is peeked (``MSG_PEEK``: EOF or
bytes, left in place) and its registration ends with a call of its callback:
``on_ready(True)`` the client closed (or reset), ``on_ready(False)`` bytes came (a
pipelined request: the next cycle reads them; the watch ends, as the per-stream watcher
did).

Rules for the owner of a registration:

- :meth:`DownstreamWatch.discard` it *before* the socket is closed (else the fd may be
  reused by another connection while still named here); the stream must be open to add.
- A callback runs inside the system task: it must not block, and whatever it raises is
  logged, never raised (a system task's exception would end the whole trio run).

A stream the epoll set can't take (the set can't be made: out of descriptors; the kernel
refuses the registration: ``max_user_watches``, memory), and every stream watched when
the watch itself failed, is watched by a system task of its own instead, as before
this module existed: a watch is never silently dropped.

The task is spawned on the first registration and ends once nothing was registered for
``linger`` seconds (so a run of short streams doesn't spawn a task each).
"""

from __future__ import annotations

import contextlib
import logging
import math
import select
from collections.abc import Callable
from typing import Final

import trio

from ..net.stream import RawStream

__all__ = ["AVAILABLE", "LINGER_S", "DownstreamWatch", "downstream_watch", "unwatch"]

log: Final = logging.getLogger("proxycore.downstream")

#: How long the system task outlives its last registration.
LINGER_S: Final = 1.0

#: The watch works on this platform (Linux: epoll); elsewhere callers keep a task each.
AVAILABLE: Final = hasattr(select, "epoll")
_MASK: Final = (select.EPOLLIN | select.EPOLLRDHUP) if AVAILABLE else 0

OnReady = Callable[[bool], None]


class DownstreamWatch:
    """The watched client sockets of one trio run (see the module docstring)."""

    __slots__ = ("_epoll", "_regs", "_running", "_scope", "_tasks", "linger", "starts")

    def __init__(self) -> None:
        self._epoll: select.epoll | None = None
        #: fd -> (stream, callback).
        self._regs: dict[int, tuple[RawStream, OnReady]] = {}
        #: Streams the epoll set could not take, each watched by a task of its own.
        self._tasks: dict[RawStream, trio.CancelScope] = {}
        self._running = False
        #: The system task's wait (its deadline is the linger once nothing is watched).
        self._scope: trio.CancelScope | None = None
        self.linger = LINGER_S
        #: System tasks started so far (tests).
        self.starts = 0

    def __len__(self) -> int:
        return len(self._regs) + len(self._tasks)

    @property
    def running(self) -> bool:
        return self._running

    def add(self, stream: RawStream, on_ready: OnReady) -> bool:
        """Watch ``stream`` until it is readable, then ``on_ready(closed)`` once. False if
        it can't be watched (no epoll on this platform, a closed socket, no task can be
        started); a stream the epoll set refuses gets a task of its own (see module)."""
        fd = stream.sock.fileno()
        if not AVAILABLE or fd < 0:
            return False
        epoll = self._epoll
        if epoll is None:
            try:
                epoll = self._epoll = select.epoll()
            except OSError:  # out of descriptors or memory: a task of its own
                return self._fallback(stream, on_ready)
        try:
            if fd in self._regs:  # a stale entry (its socket closed unannounced): replaced
                epoll.modify(fd, _MASK)
            else:
                epoll.register(fd, _MASK)
        except FileExistsError:
            epoll.modify(fd, _MASK)
        except OSError:
            try:  # the kernel forgot a stale entry's fd (closed): register it anew
                epoll.register(fd, _MASK)
            except OSError:  # the set is full (max_user_watches) or no memory
                self._regs.pop(fd, None)
                return self._fallback(stream, on_ready)
        self._regs[fd] = (stream, on_ready)
        if not self._running:
            self._running = True
            self.starts += 1
            trio.lowlevel.spawn_system_task(self._run, name="proxycore downstream watch")
        elif self._scope is not None and self._scope.deadline != math.inf:
            self._scope.deadline = math.inf
        return True

    def discard(self, stream: RawStream) -> None:
        """Stop watching ``stream`` (if it is watched). Call before closing it."""
        task = self._tasks.pop(stream, None)
        if task is not None:
            task.cancel()
            return
        fd = stream.sock.fileno()
        reg = self._regs.get(fd)
        if reg is None or reg[0] is not stream:
            return
        del self._regs[fd]
        self._forget(fd)
        if not self._regs and self._scope is not None:
            self._scope.deadline = trio.current_time() + self.linger

    def _forget(self, fd: int) -> None:
        assert self._epoll is not None
        with contextlib.suppress(OSError):  # the kernel dropped it already (closed)
            self._epoll.unregister(fd)

    async def _run(self) -> None:
        epoll = self._epoll
        assert epoll is not None
        try:
            while True:
                with trio.CancelScope() as scope:
                    self._scope = scope
                    if not self._regs:
                        scope.deadline = trio.current_time() + self.linger
                    await trio.lowlevel.wait_readable(epoll)
                    self._dispatch(epoll)
                self._scope = None
                if scope.cancelled_caught and not self._regs:
                    return  # nothing watched for ``linger`` seconds
        except Exception:  # a system task's exception would end the whole run
            log.exception("the downstream watch failed; its watches end")
            self._abandon()
        finally:
            self._scope = None
            self._running = False

    def _dispatch(self, epoll: select.epoll) -> None:
        regs = self._regs
        for fd, _ in epoll.poll(0):
            reg = regs.get(fd)
            if reg is None:  # discarded since: never ours to report
                self._forget(fd)
                continue
            stream, on_ready = reg
            closed = stream.peek_closed()
            if closed is None:
                continue  # nothing after all: still watched
            del regs[fd]
            self._forget(fd)
            try:
                on_ready(closed)
            except Exception:
                log.exception("a downstream watch callback failed")

    def _abandon(self) -> None:
        """After a failure of the watch itself: each watched stream gets a task of its own
        (the set is closed; the next registration makes a new one)."""
        regs, self._regs = self._regs, {}
        epoll, self._epoll = self._epoll, None
        if epoll is not None:
            epoll.close()
        for stream, on_ready in regs.values():
            self._fallback(stream, on_ready)

    def _fallback(self, stream: RawStream, on_ready: OnReady) -> bool:
        """Watch ``stream`` with a system task of its own (what the epoll set saves)."""
        scope = trio.CancelScope()
        self._tasks[stream] = scope
        try:
            trio.lowlevel.spawn_system_task(
                self._watch_one, stream, on_ready, scope, name="proxycore downstream watch (one)"
            )
        except Exception:  # nothing left to watch with: the exchange goes on unwatched
            log.exception("a downstream watch could not start")
            del self._tasks[stream]
            return False
        return True

    async def _watch_one(
        self, stream: RawStream, on_ready: OnReady, scope: trio.CancelScope
    ) -> None:
        try:
            closed: bool | None = None
            with scope:
                while closed is None:
                    await trio.lowlevel.wait_readable(stream.sock)
                    closed = stream.peek_closed()
            if closed is None or self._tasks.get(stream) is not scope:
                return  # discarded
            del self._tasks[stream]
            on_ready(closed)
        except (trio.ClosedResourceError, OSError):
            self._drop_task(stream, scope)  # closed under it: its owner is done with it
        except Exception:  # a system task's exception would end the whole run
            log.exception("a downstream watch callback failed")
            self._drop_task(stream, scope)

    def _drop_task(self, stream: RawStream, scope: trio.CancelScope) -> None:
        if self._tasks.get(stream) is scope:
            del self._tasks[stream]


_WATCH: Final = trio.lowlevel.RunVar[DownstreamWatch]("proxycore_downstream_watch")


def downstream_watch() -> DownstreamWatch:
    """This trio run's watch (made on first use)."""
    try:
        return _WATCH.get()
    except LookupError:
        watch = DownstreamWatch()
        _WATCH.set(watch)
        return watch


def unwatch(stream: RawStream) -> None:
    """Stop watching ``stream`` if this run's watch has it (the close path of a connection:
    call before closing the socket). Cheap when nothing was ever watched."""
    try:
        watch = _WATCH.get()
    except LookupError:
        return
    if watch:
        watch.discard(stream)
