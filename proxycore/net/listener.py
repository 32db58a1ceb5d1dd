"""Client-facing listeners: bind a listening socket, accept connections.

:func:`bind_listener` returns a non-blocking stdlib socket (``SO_REUSEADDR``; ``SO_REUSEPORT``
for worker processes sharing a port; IPv6 sockets are v6-only). :func:`accept` waits for the
next connection; errors that mean "out of resources for now" (file descriptors, buffers,
memory) or "that client is already gone" are logged and retried after a short pause instead of
ending the listener.
"""

from __future__ import annotations

import errno
import logging
import socket
from typing import Final

import trio

__all__ = ["BACKLOG", "accept", "bind_listener"]

#: Logged under the server's name: operators filter on "proxycore.server" for listener trouble.
log: Final = logging.getLogger("proxycore.server")

BACKLOG: Final = 1024
#: Seconds to wait after a retryable accept error (out of descriptors, buffers or memory).
ACCEPT_RETRY_S: Final = 0.05
_ACCEPT_RETRY: Final = frozenset(
    {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.ECONNABORTED, errno.EPROTO}
)


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


async def accept(listener: socket.socket) -> tuple[socket.socket, tuple[str, int]]:
    """The next connection on ``listener`` and the peer address.

    A checkpoint only when it has to wait. Retryable errors (see the module docstring) are
    logged and retried; any other ``OSError`` is raised.
    """
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
            await trio.sleep(ACCEPT_RETRY_S)
            continue
        return sock, addr
