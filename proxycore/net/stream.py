"""Byte streams: one small interface, two implementations.

``RawStream`` drives a non-blocking stdlib socket with
``trio.lowlevel.wait_readable``/``wait_writable``. It skips trio's
``SocketStream`` layers (per-call checkpoints, conflict detectors), which the
profile showed to be most of the CPU per SSE event (see
``../shared/PERFORMANCE.md``). It reads into a caller-owned buffer that is
reused: that is safe because every chunk is written before the next read.

``TLSStream`` wraps ``trio.SSLStream`` behind the same interface for https
upstreams.

Fairness: a run of reads that never blocks would never yield to trio, so a
stream checkpoints explicitly after ``_YIELD_EVERY`` reads in a row that did
not wait. A short read means the kernel buffer is drained, so the next read
waits for readability first instead of paying for a failing ``recv``.

Errors: every transport failure is raised as :class:`StreamBroken`, so the
callers map one exception per side to the right proxy error.
"""

from __future__ import annotations

import errno
import select
import socket
import ssl
from typing import Final, Protocol

import trio

__all__ = ["CHUNK", "RawStream", "Stream", "StreamBroken", "TLSStream", "connect_tcp"]

#: The read size: one read takes at most this many bytes into a caller-owned buffer
#: (connection buffers, body pumps, head readers). The only definition in the package.
CHUNK: Final = 4 * 1024

_YIELD_EVERY: Final = 16
_POLL_IN: Final = select.POLLIN | select.POLLPRI | select.POLLERR | select.POLLHUP

Buffer = bytes | bytearray | memoryview


class StreamBroken(Exception):
    """The peer reset the connection, or a read or write failed."""


class Stream(Protocol):
    async def recv_into(self, buf: bytearray, nbytes: int) -> int:
        """Read at most ``nbytes`` into ``buf[:nbytes]``; 0 means end of stream."""
        ...

    async def send_all(self, data: Buffer) -> None: ...

    def has_pending_input(self) -> bool:
        """True if the peer sent data or closed (an idle connection that did is dead)."""
        ...

    def close(self) -> None:
        """Close at once, without a graceful TLS shutdown. Never blocks."""
        ...


class RawStream:
    """A plain TCP stream over a non-blocking stdlib socket."""

    __slots__ = ("_drained", "_run", "sock")

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self._drained = False
        self._run = 0

    async def recv_into(self, buf: bytearray, nbytes: int) -> int:
        sock = self.sock
        if self._drained:
            await trio.lowlevel.wait_readable(sock)
            self._run = 0
        while True:
            try:
                n = sock.recv_into(buf, nbytes)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(sock)
                self._run = 0
                continue
            except OSError as exc:
                raise StreamBroken(_describe(exc)) from None
            break
        self._drained = n < nbytes
        self._run += 1
        if self._run >= _YIELD_EVERY:
            self._run = 0
            await trio.lowlevel.checkpoint()
        return n

    async def send_all(self, data: Buffer) -> None:
        sock = self.sock
        view = memoryview(data)
        total = len(view)
        sent = 0
        while sent < total:
            try:
                sent += sock.send(view[sent:] if sent else view)
            except BlockingIOError:
                await trio.lowlevel.wait_writable(sock)
            except OSError as exc:
                raise StreamBroken(_describe(exc)) from None

    def has_pending_input(self) -> bool:
        return _poll_readable(self.sock)

    def peek_closed(self) -> bool | None:
        """After readability: True if the peer closed (or reset), False if data waits.

        ``None`` if nothing is there yet. The data, if any, is left in place.
        """
        try:
            data = self.sock.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            return None
        except OSError:
            return True
        return not data

    def close(self) -> None:
        if self.sock.fileno() != -1:
            trio.lowlevel.notify_closing(self.sock)
            self.sock.close()


class TLSStream:
    """A TLS client stream (``trio.SSLStream``) behind the :class:`Stream` interface."""

    __slots__ = ("_raw", "_ssl")

    def __init__(self, ssl_stream: trio.SSLStream[trio.SocketStream], raw: socket.socket) -> None:
        self._ssl = ssl_stream
        self._raw = raw

    async def recv_into(self, buf: bytearray, nbytes: int) -> int:
        try:
            data = await self._ssl.receive_some(nbytes)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise StreamBroken(_describe(exc)) from None
        n = len(data)
        buf[:n] = data
        return n

    async def send_all(self, data: Buffer) -> None:
        try:
            await self._ssl.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise StreamBroken(_describe(exc)) from None

    def has_pending_input(self) -> bool:
        return _poll_readable(self._raw)

    def close(self) -> None:
        if self._raw.fileno() != -1:
            trio.lowlevel.notify_closing(self._raw)
            self._raw.close()


def _poll_readable(sock: socket.socket) -> bool:
    if sock.fileno() == -1:
        return True
    poller = select.poll()
    poller.register(sock, _POLL_IN)
    return bool(poller.poll(0))


def _describe(exc: BaseException) -> str:
    cause = exc.__cause__ if isinstance(exc, trio.BrokenResourceError) else exc
    if isinstance(cause, OSError) and cause.errno is not None:
        return errno.errorcode.get(cause.errno, str(cause.errno))
    if isinstance(cause, ssl.SSLError):
        return f"TLS error: {cause.reason or type(cause).__name__}"
    return type(cause).__name__ if cause is not None else type(exc).__name__


async def connect_tcp(host: str, port: int) -> socket.socket:
    """Resolve ``host`` and connect to the first address that answers.

    A checkpoint. On cancellation the half-open socket is closed. Raises
    ``OSError`` (with the last address's error) when no address connects.
    """
    infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    if not infos:
        raise OSError(errno.EHOSTUNREACH, f"no address for {host}")
    last: OSError | None = None
    for family, type_, proto, _, addr in infos:
        sock = socket.socket(family, type_, proto)
        try:
            sock.setblocking(False)
            err = sock.connect_ex(addr)
            if err in (errno.EINPROGRESS, errno.EAGAIN):
                await trio.lowlevel.wait_writable(sock)
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                raise OSError(err, f"connect to {host}:{port}: {errno.errorcode.get(err, err)}")
        except OSError as exc:
            sock.close()
            last = exc
            continue
        except BaseException:
            sock.close()
            raise
        return sock
    assert last is not None
    raise last
