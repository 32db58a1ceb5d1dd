"""Byte streams: one small interface, two implementations.

``RawStream`` drives a non-blocking stdlib socket with
``trio.lowlevel.wait_readable``/``wait_writable``. It skips trio's
``SocketStream`` layers (per-call checkpoints, conflict detectors), which the
profile showed to be most of the CPU per SSE event (see
``../shared/PERFORMANCE.md``). It reads into a caller-owned buffer that is
reused: that is safe because every chunk is written before the next read.

``TLSStream`` wraps ``trio.SSLStream`` behind the same interface for https
upstreams; the ``SSLStream`` runs over a :class:`RawTransport` (a ``RawStream``).

Fairness: a run of reads that never blocks would never yield to trio, so a
stream checkpoints explicitly after ``_YIELD_EVERY`` reads in a row that did
not wait. The checkpoint is taken at the start of the next read, before any byte
is taken from the socket: a read is a cancel point only where it has consumed
nothing (a cancelled read loses no bytes, so a caller may retry it). A short read
means the kernel buffer is drained, so the next read waits for readability first
instead of paying for a failing ``recv``.

Errors: every transport failure is raised as :class:`StreamBroken`, so the
callers map one exception per side to the right proxy error.

Cut writes: a ``send_all`` that failed, timed out, or was cancelled after some of
its bytes left marks the stream :attr:`~Stream.write_cut`: the peer may hold a
partial write (half a chunk, half a head), so any later byte would be misframed.
Every later ``send_all`` on a cut stream raises :class:`StreamBroken` at once;
its owner closes the connection and never reuses it.

Send timeout: :attr:`RawStream.send_timeout` (``[timeouts] send``) bounds how long
one write may wait without the peer accepting a byte. The timer is armed only
when the socket would block (inside the ``wait_writable`` loop), so a write that
completes at once costs nothing extra. On expiry :class:`SendTimeout` (a
:class:`StreamBroken`) is raised and the stream is cut.

Would-block hook: :attr:`RawStream.on_block`, if set, is called each time a
``send_all`` is about to wait for the socket to take bytes (never when the write
completes at once). A body pump uses it to make its idle deadline exact before the
write can be cancelled part-way (``net/pipe.py``: its deadline is otherwise moved
lazily).
"""

from __future__ import annotations

import errno
import select
import socket
import ssl
from collections.abc import Callable
from typing import Final, Protocol

import trio

__all__ = [
    "CHUNK",
    "NO_SEND_TIMEOUT",
    "RawStream",
    "RawTransport",
    "SendTimeout",
    "Stream",
    "StreamBroken",
    "TLSStream",
    "connect_tcp",
]

#: The read size: one read takes at most this many bytes into a caller-owned buffer
#: (connection buffers, body pumps, head readers). The only definition in the package.
CHUNK: Final = 4 * 1024

#: ``send_timeout`` value for "no bound" (the default of a bare stream).
NO_SEND_TIMEOUT: Final = float("inf")

_YIELD_EVERY: Final = 16
_POLL_IN: Final = select.POLLIN | select.POLLPRI | select.POLLERR | select.POLLHUP

Buffer = bytes | bytearray | memoryview


class StreamBroken(Exception):
    """The peer reset the connection, or a read or write failed."""


class SendTimeout(StreamBroken):
    """A write could not proceed for the stream's ``send_timeout`` (the peer stopped
    reading); the stream is cut."""


_CUT: Final = "write cut: an earlier write was interrupted"


class Stream(Protocol):
    #: Longest one ``send_all`` may wait without the peer accepting a byte, in seconds
    #: (:data:`NO_SEND_TIMEOUT`: no bound); then :class:`SendTimeout`, and the stream is cut.
    send_timeout: float

    async def recv_into(self, buf: bytearray, nbytes: int) -> int:
        """Read at most ``nbytes`` into ``buf[:nbytes]``; 0 means end of stream."""
        ...

    async def send_all(self, data: Buffer) -> None:
        """Write all of ``data``. Raises :class:`StreamBroken` (at once if
        :attr:`write_cut`); a failure or cancellation after some bytes left cuts."""
        ...

    @property
    def write_cut(self) -> bool:
        """An earlier write was interrupted after some of its bytes left (or failed): no
        further byte may follow on this connection; close it."""
        ...

    @property
    def bytes_sent(self) -> int:
        """Bytes written so far, the part of a failed or cancelled write that left
        included (the access line's count holds whatever ends an exchange)."""
        ...

    def has_pending_input(self) -> bool:
        """True if the peer sent data or closed (an idle connection that did is dead)."""
        ...

    def close(self) -> None:
        """Close at once, without a graceful TLS shutdown. Never blocks."""
        ...


class RawStream:
    """A plain TCP stream over a non-blocking stdlib socket."""

    __slots__ = ("_cut", "_drained", "_run", "bytes_sent", "on_block", "send_timeout", "sock")

    def __init__(self, sock: socket.socket, send_timeout: float = NO_SEND_TIMEOUT) -> None:
        sock.setblocking(False)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        #: Longest a write may wait for the peer to accept a byte (seconds; see module).
        self.send_timeout = send_timeout
        self._cut = False
        #: See :attr:`Stream.bytes_sent`.
        self.bytes_sent = 0
        self._drained = False
        self._run = 0
        #: Called before each wait for the socket to take bytes (see module).
        self.on_block: Callable[[], object] | None = None

    @property
    def write_cut(self) -> bool:
        return self._cut

    async def recv_into(self, buf: bytearray, nbytes: int) -> int:
        sock = self.sock
        if self._drained:
            await trio.lowlevel.wait_readable(sock)
            self._run = 0
        elif self._run >= _YIELD_EVERY:
            # Fairness, before the read: a cancellation here has consumed nothing.
            self._run = 0
            await trio.lowlevel.checkpoint()
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
        return n

    async def recv(self, nbytes: int) -> bytes:
        """:meth:`recv_into` returning a fresh ``bytes`` (b"" at the end): for a caller that
        holds no buffer between reads (same fairness, same cancel point)."""
        sock = self.sock
        if self._drained:
            await trio.lowlevel.wait_readable(sock)
            self._run = 0
        elif self._run >= _YIELD_EVERY:
            self._run = 0
            await trio.lowlevel.checkpoint()
        while True:
            try:
                data = sock.recv(nbytes)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(sock)
                self._run = 0
                continue
            except OSError as exc:
                raise StreamBroken(_describe(exc)) from None
            break
        self._drained = len(data) < nbytes
        self._run += 1
        return data

    async def send_all(self, data: Buffer) -> None:
        if self._cut:
            raise StreamBroken(_CUT)
        sock = self.sock
        total = len(data)  # bytes: every caller writes flat byte buffers
        if not total:
            return
        # The common case first: the socket takes it all at once (no wait, no loop).
        try:
            sent = sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self._cut = True
            raise StreamBroken(_describe(exc)) from None
        if sent == total:
            self.bytes_sent += total
            return
        view = memoryview(data)
        try:
            while sent < total:
                try:
                    sent += sock.send(view[sent:] if sent else view)
                except BlockingIOError:
                    if self.on_block is not None:
                        self.on_block()
                    await self._wait_writable()
                except OSError as exc:
                    self._cut = True
                    raise StreamBroken(_describe(exc)) from None
        except BaseException:
            # Cancelled (or failed) with part of ``data`` on the wire: the peer holds a
            # partial write; nothing may follow it.
            if sent:
                self._cut = True
                self.bytes_sent += sent
            raise
        self.bytes_sent += total

    async def _wait_writable(self) -> None:
        """Wait until the socket takes bytes, at most ``send_timeout`` (only now is a
        timer armed: a write that never blocks pays nothing for the bound)."""
        timeout = self.send_timeout
        if timeout == NO_SEND_TIMEOUT:
            await trio.lowlevel.wait_writable(self.sock)
            return
        with trio.move_on_after(timeout) as scope:
            await trio.lowlevel.wait_writable(self.sock)
        if scope.cancelled_caught:
            self._cut = True
            raise SendTimeout(f"peer accepted no bytes for {timeout:g} s")

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


class RawTransport(trio.abc.Stream):
    """A trio stream over a :class:`RawStream`: the transport under ``trio.SSLStream``.

    So TLS writes go through ``RawStream.send_all`` (its send timeout, armed only when the
    socket would block) and reads skip trio's ``SocketStream`` layers. Errors are
    :class:`StreamBroken` (``SSLStream`` passes a transport's exceptions through).
    """

    __slots__ = ("raw",)

    def __init__(self, raw: RawStream) -> None:
        self.raw = raw

    async def send_all(self, data: Buffer) -> None:
        await self.raw.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.wait_writable(self.raw.sock)

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        raw = self.raw
        sock = raw.sock
        if raw._run >= _YIELD_EVERY:
            # Fairness, before the read (see module): a cancellation consumed nothing.
            raw._run = 0
            await trio.lowlevel.checkpoint()
        while True:
            try:
                data = sock.recv(max_bytes or _TLS_READ)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(sock)
                raw._run = 0
                continue
            except OSError as exc:
                raise StreamBroken(_describe(exc)) from None
            break
        raw._run += 1
        return data

    async def aclose(self) -> None:
        self.raw.close()
        await trio.lowlevel.checkpoint()


#: What the TLS transport reads when ``SSLStream`` names no size.
_TLS_READ: Final = 16 * 1024


class TLSStream:
    """A TLS client stream (``trio.SSLStream`` over a :class:`RawTransport`) behind the
    :class:`Stream` interface.

    The ``SSLStream`` is made with ``https_compatible=False``: an upstream that closes
    without ``close_notify`` makes the read that sees it raise :class:`StreamBroken`
    (a truncation, not an end). Only a close-delimited body ends on a read of EOF; every
    other framing knows its end before it (keep-alive framing is unaffected). Any failed
    or cancelled write cuts the stream (what left is unknown).
    """

    __slots__ = ("_cut", "_raw", "_ssl", "bytes_sent")

    def __init__(self, ssl_stream: trio.SSLStream[RawTransport], raw: RawStream) -> None:
        self._ssl = ssl_stream
        self._raw = raw
        self._cut = False
        #: Plaintext bytes of the writes that completed (what left of a cut one is unknown).
        self.bytes_sent = 0

    @property
    def send_timeout(self) -> float:
        """The transport's send timeout (see :attr:`RawStream.send_timeout`)."""
        return self._raw.send_timeout

    @send_timeout.setter
    def send_timeout(self, value: float) -> None:
        self._raw.send_timeout = value

    @property
    def write_cut(self) -> bool:
        return self._cut

    async def recv_into(self, buf: bytearray, nbytes: int) -> int:
        data = await self.recv(nbytes)
        n = len(data)
        buf[:n] = data
        return n

    async def recv(self, nbytes: int) -> bytes:
        """At most ``nbytes`` as a fresh ``bytes`` (b"" at the end)."""
        try:
            return bytes(await self._ssl.receive_some(nbytes))
        except trio.BrokenResourceError as exc:
            if isinstance(exc.__cause__, ssl.SSLEOFError):
                raise StreamBroken("TLS: closed without close_notify (truncated)") from None
            raise StreamBroken(_describe(exc)) from None
        except (trio.ClosedResourceError, OSError) as exc:
            raise StreamBroken(_describe(exc)) from None

    async def send_all(self, data: Buffer) -> None:
        if self._cut:
            raise StreamBroken(_CUT)
        try:
            await self._ssl.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self._cut = True
            raise StreamBroken(_describe(exc)) from None
        except BaseException:
            self._cut = True
            raise
        self.bytes_sent += len(data)

    def has_pending_input(self) -> bool:
        return _poll_readable(self._raw.sock)

    def close(self) -> None:
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
