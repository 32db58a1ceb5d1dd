"""One concurrency slot's connection (raw non-blocking socket, or TLS over it; one receive
buffer) and the response-head parser: only the status line and the framing fields are read."""

from __future__ import annotations

import re
import socket
from typing import Final

import trio

__all__ = [
    "CHUNKED",
    "RECV_BYTES",
    "UNTIL_CLOSE",
    "YIELD_EVERY",
    "Malformed",
    "Slot",
    "Stale",
    "parse_head",
]

#: Largest read; also the most a response head (1xx heads included) may take.
RECV_BYTES: Final = 64 * 1024
#: Reads in a row that did not wait before a slot yields to the other tasks.
YIELD_EVERY: Final = 16
# Response body framing, besides a Content-Length (>= 0).
CHUNKED: Final = -1
UNTIL_CLOSE: Final = -2

_STATUS_LINE: Final = re.compile(rb"HTTP/1\.([01]) ([1-9][0-9]{2})(?: [^\r\n]*)?\r\n")
_OWS: Final = b" \t"
#: The only header fields the client reads: the ones that frame the body or end the connection.
_FRAMING_FIELD: Final = re.compile(
    rb"\r\n(content-length|transfer-encoding|connection):([^\r\n]*)", re.IGNORECASE
)


class Malformed(Exception):
    """The response is not valid HTTP/1.1 (counted as "protocol")."""


class Stale(Exception):
    """A reused connection died before any response byte: retry on a fresh one."""


def parse_head(head: bytes, head_request: bool) -> tuple[int, int, bool]:
    """Parse a response head (status line to the blank line, CRLFs included).

    Returns ``(status, framing, reusable)``: framing is the Content-Length,
    ``CHUNKED`` or ``UNTIL_CLOSE`` (RFC 9112 section 6.3); reusable says whether
    the connection may carry another request (HTTP/1.1, no ``Connection: close``,
    a self-delimited body). Only the status line and the framing fields are
    parsed (a load generator is no gatekeeper); an HTTP/1.0 keep-alive connection
    is not reused. Raises ``Malformed``.
    """
    m = _STATUS_LINE.match(head)
    if m is None:
        raise Malformed("bad status line")
    status = int(m[2])
    lengths: set[int] = set()
    codings: list[bytes] = []
    close = m[1] == b"0"
    for found in _FRAMING_FIELD.finditer(head, m.end() - 2):
        name, value = found[1].lower(), found[2].strip(_OWS)
        if name == b"content-length":
            if not value.isdigit():
                raise Malformed("bad Content-Length")
            lengths.add(int(value))
        elif name == b"transfer-encoding":
            codings.extend(c.strip(_OWS).lower() for c in value.split(b","))
        elif b"close" in value.lower():  # a cheap test first: this is on every response
            close = close or b"close" in [t.strip(_OWS).lower() for t in value.split(b",")]
    if len(lengths) > 1:
        raise Malformed("conflicting Content-Length")
    if head_request or status < 200 or status in (204, 304):
        framing = 0
    elif codings:
        framing = CHUNKED if codings[-1] == b"chunked" else UNTIL_CLOSE
        close = close or bool(lengths)  # both framings: never reuse (smuggling shape)
    elif lengths:
        framing = lengths.pop()
    else:
        framing = UNTIL_CLOSE
    return status, framing, not close and framing != UNTIL_CLOSE


class Slot:
    """One concurrency slot: its connection (if open) and its receive buffer.

    Unparsed bytes are ``buf[lo:hi]``; reads append at ``hi``.
    """

    __slots__ = ("buf", "drained", "hi", "lo", "run", "sock", "tls", "view")

    def __init__(self) -> None:
        self.buf = bytearray(RECV_BYTES)
        self.view = memoryview(self.buf)
        self.lo = 0
        self.hi = 0
        self.sock: socket.socket | None = None
        #: HTTPS: the TLS stream over ``sock`` (reads and writes go through it).
        self.tls: trio.SSLStream[trio.SocketStream] | None = None
        self.drained = True
        self.run = 0

    def close(self) -> None:
        sock = self.sock
        self.tls = None
        if sock is not None:
            self.sock = None
            trio.lowlevel.notify_closing(sock)
            sock.close()
        self.lo = self.hi = 0

    async def send_all(self, data: bytes) -> None:
        sock = self.sock
        assert sock is not None
        if self.tls is not None:
            try:
                await self.tls.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise OSError(f"TLS stream broken: {exc}") from None
            return
        view = memoryview(data)
        sent = 0
        while sent < len(view):
            try:
                sent += sock.send(view[sent:])
            except BlockingIOError:
                await trio.lowlevel.wait_writable(sock)

    async def fill(self, nbytes: int) -> int:
        """Read at most ``nbytes`` more into ``buf[hi:]``; 0 means end of stream.

        Raises OSError, or ``Malformed`` if unparsed bytes fill the whole buffer.
        """
        sock = self.sock
        assert sock is not None
        if self.lo == self.hi:
            self.lo = self.hi = 0
        elif self.hi == len(self.buf):
            if not self.lo:
                raise Malformed("response head too large")
            size = self.hi - self.lo
            self.buf[:size] = self.buf[self.lo : self.hi]
            self.lo, self.hi = 0, size
        nbytes = min(nbytes, len(self.buf) - self.hi)
        if self.tls is not None:
            return await self._fill_tls(nbytes)
        if self.drained:  # a short read emptied the socket: wait instead of a failing recv
            await trio.lowlevel.wait_readable(sock)
            self.run = 0
        while True:
            try:
                n = sock.recv_into(self.view[self.hi : self.hi + nbytes])
            except BlockingIOError:
                await trio.lowlevel.wait_readable(sock)
                self.run = 0
                continue
            break
        self.drained = n < nbytes
        self.hi += n
        self.run += 1
        if self.run >= YIELD_EVERY:  # fairness: reads that never waited never yielded
            self.run = 0
            await trio.lowlevel.checkpoint()
        return n

    async def _fill_tls(self, nbytes: int) -> int:
        assert self.tls is not None
        try:
            data = await self.tls.receive_some(nbytes)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise OSError(f"TLS stream broken: {exc}") from None
        n = len(data)
        self.buf[self.hi : self.hi + n] = data
        self.hi += n
        return n
