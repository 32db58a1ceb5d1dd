"""Listeners and the top-level ``serve``: one nursery per listener, one task per client.

``serve`` binds every listen address first (so a bad address fails before
anything is served), reports the bound addresses through ``task_status``, and
runs until cancelled. ``max_connections`` is enforced at accept time: at the
limit the proxy stops accepting and the kernel's backlog holds new clients.
"""

from __future__ import annotations

import errno
import logging
import socket
from typing import Final

import trio

from .config import Config, ConfigError
from .downstream import ClientConnection
from .security import exposure_problem
from .state import ProxyState

__all__ = ["bind_listener", "serve"]

log: Final = logging.getLogger("proxycore.server")

BACKLOG: Final = 1024
_ACCEPT_RETRY: Final = frozenset(
    {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.ECONNABORTED, errno.EPROTO}
)

Address = tuple[str, int]


def bind_listener(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """A non-blocking listening TCP socket bound to ``host:port`` (port 0 works)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror}") from None
    return sock


async def _accept_loop(listener: socket.socket, state: ProxyState, limit: trio.Semaphore) -> None:
    async with trio.open_nursery() as nursery:
        while True:
            await limit.acquire()
            try:
                sock, addr = await _accept(listener)
            except BaseException:
                limit.release()
                raise
            nursery.start_soon(_handle, sock, addr[0], state, limit)


async def _accept(listener: socket.socket) -> tuple[socket.socket, tuple[str, int]]:
    while True:
        try:
            sock, addr = listener.accept()
        except BlockingIOError:
            await trio.lowlevel.wait_readable(listener)
            continue
        except OSError as exc:
            if exc.errno not in _ACCEPT_RETRY:
                raise
            log.warning("accept failed (%s); retrying", errno.errorcode.get(exc.errno or 0))
            await trio.sleep(0.05)
            continue
        return sock, addr


async def _handle(
    sock: socket.socket, peer_ip: str, state: ProxyState, limit: trio.Semaphore
) -> None:
    try:
        await ClientConnection(sock, peer_ip, state).serve()
    finally:
        limit.release()


async def serve(
    config: Config,
    *,
    task_status: trio.TaskStatus[list[Address]] = trio.TASK_STATUS_IGNORED,
    state: ProxyState | None = None,
) -> None:
    """Run the proxy until cancelled.

    Binds every ``config.server.listen`` address, then calls
    ``task_status.started(addresses)`` with the bound ``(host, port)`` pairs
    (so ``await nursery.start(serve, config)`` works with port 0). Cancelling
    the surrounding scope closes the listeners, every client connection and
    the upstream pool.

    Raises ``ConfigError`` for an unauthenticated non-loopback listener (unless
    ``server.allow_public``) and ``SecretError`` for an unusable inbound secret
    file, before anything is bound.
    """
    problem = exposure_problem(config)
    if problem:
        raise ConfigError(problem)
    state = state or ProxyState(config)
    listeners: list[socket.socket] = []
    try:
        for host, port in config.server.listen_addresses:
            listeners.append(bind_listener(host, port))
        bound = [(str(s.getsockname()[0]), int(s.getsockname()[1])) for s in listeners]
        limit = trio.Semaphore(config.server.max_connections)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(state.pool.run_sweeper)
            for listener in listeners:
                nursery.start_soon(_accept_loop, listener, state, limit)
            for host, port in bound:
                log.info("listening on %s:%d", host, port)
            task_status.started(bound)
    finally:
        for listener in listeners:
            trio.lowlevel.notify_closing(listener)
            listener.close()
        state.pool.close_all()
