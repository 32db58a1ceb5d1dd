"""Client-facing listeners: bind a listening socket, accept connections.

:func:`bind_listener` returns a non-blocking stdlib socket (``SO_REUSEADDR``; ``SO_REUSEPORT``
for worker processes sharing a port; IPv6 sockets are v6-only). :func:`accept` waits for the
next connection. Only an error that means the listening socket itself is unusable (``EBADF``,
``ENOTSOCK``, ``EINVAL``, ``EFAULT``) ends it; every other ``accept()`` error is skipped and
reported to the caller's ``on_error`` (the server counts and logs them):

- errors of that one connection (a firewall's ``EPERM``, ``ECONNABORTED``, ``ETIMEDOUT``, the
  network errors Linux passes on from the new socket: trio's list) are skipped at once;
- "out of resources for now" (file descriptors, buffers, memory) and any errno not known here
  are skipped after a short pause, so that a lasting condition can't spin the loop.
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Callable
from typing import Any, Final, Protocol

import trio

__all__ = ["ACCEPT_RETRY_S", "BACKLOG", "Acceptor", "accept", "bind_listener", "errno_name"]

#: Logged under the server's name: operators filter on "proxycore.server" for listener trouble.
log: Final = logging.getLogger("proxycore.server")

BACKLOG: Final = 1024
#: Seconds to wait after a resource error (out of descriptors, buffers or memory) or an unknown one.
ACCEPT_RETRY_S: Final = 0.05


def _errnos(*names: str) -> frozenset[int]:
    return frozenset(getattr(errno, name) for name in names if hasattr(errno, name))


#: The listening socket is unusable (closed, not a socket, not listening): nothing to retry.
_ACCEPT_FATAL: Final = _errnos("EBADF", "ENOTSOCK", "EINVAL", "EFAULT")
#: That one connection failed (or a firewall refused it): skip it, accept the next at once.
_ACCEPT_SKIP: Final = _errnos(
    "EPERM",
    "ECONNABORTED",
    "ECONNRESET",
    "EPROTO",
    "ENETDOWN",
    "ENOPROTOOPT",
    "EHOSTDOWN",
    "ENONET",
    "EHOSTUNREACH",
    "EOPNOTSUPP",
    "ENETUNREACH",
    "ENOSR",
    "ESOCKTNOSUPPORT",
    "EPROTONOSUPPORT",
    "ETIMEDOUT",
)


class Acceptor(Protocol):
    """What :func:`accept` needs of a listening socket (a ``socket.socket``; a fake in tests)."""

    def accept(self) -> tuple[socket.socket, Any]: ...

    def fileno(self) -> int: ...


def errno_name(number: int | None) -> str:
    """``"EPERM"`` for ``errno.EPERM``; the number as text when unknown."""
    return errno.errorcode.get(number or 0, str(number))


def bind_listener(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """A non-blocking listening TCP socket bound to ``host:port`` (port 0 works).

    Raises ``OSError`` whose message names the address.
    """
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


async def accept(
    listener: Acceptor, on_error: Callable[[int], None] | None = None
) -> tuple[socket.socket, tuple[str, int]]:
    """The next connection on ``listener`` and the peer address.

    A checkpoint only when it has to wait. A skipped error (see the module docstring) is passed
    to ``on_error`` (its errno; 0 when it has none), or logged when there is no ``on_error``;
    an error that means the listener is unusable is raised.
    """
    while True:
        try:
            sock, addr = listener.accept()
        except BlockingIOError:
            await trio.lowlevel.wait_readable(listener)
            continue
        except OSError as exc:
            number = exc.errno or 0
            if number in _ACCEPT_FATAL:
                raise
            if on_error is None:
                log.warning("accept failed (%s); skipped", errno_name(number))
            else:
                on_error(number)
            if number in _ACCEPT_SKIP:
                await trio.lowlevel.checkpoint()
            else:
                await trio.sleep(ACCEPT_RETRY_S)
            continue
        return sock, addr
