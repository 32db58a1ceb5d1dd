"""One client connection: read request heads with h11, run exchanges in order.

h11 (server role) parses each request head; a fresh ``h11.Connection`` is made
per cycle because the body is forwarded raw by the exchange, which h11 cannot
follow. Bytes read past a body's end (pipelined requests) are carried over in
``pending`` to the next cycle, so pipelined requests are answered in order.

h11 checks its size limit only on incomplete data, counts no headers and
accepts any ``HTTP/d.d``: the head size, header count and version limits are
enforced here. h11's error messages quote raw header lines, so they are never
passed on; the client gets a generic reason.
"""

from __future__ import annotations

import logging
import math
import re
import socket
from typing import Final

import h11
import trio

from ..config import ServerSettings
from ..errors import (
    BadRequest,
    DownstreamError,
    DownstreamTimeout,
    HeadTooLarge,
    ProxyError,
    UnsupportedVersion,
    error_body,
)
from ..http.headers import reason_phrase, request_id_from, serialize_head
from ..net.stream import CHUNK, RawStream, StreamBroken
from ..net.watch import unwatch
from ..observe.accesslog import ExchangeRecord, log_exchange
from ..proxy.exchange import Exchange
from ..proxy.state import ProxyState

__all__ = ["ClientConnection"]

log: Final = logging.getLogger("proxycore.downstream")

#: What h11 lets through but trusted proxies refuse: obs-fold (a line starting
#: with SP/HTAB, which h11 silently unfolds) and control characters other than
#: HTAB/CR/LF (bare CR and NUL h11 refuses itself).
_SUSPICIOUS_HEAD: Final = re.compile(rb"\n[ \t]|[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")

LINGER_S: Final = 2.0
LINGER_BYTES: Final = 1 << 20


class ClientConnection:
    """Drives one accepted client socket until it closes. Never raises."""

    __slots__ = (
        "_head_len",
        "_idle",
        "_raw_head",
        "linger",
        "peer_ip",
        "pending",
        "state",
        "stream",
    )

    def __init__(self, sock: socket.socket, peer_ip: str, state: ProxyState) -> None:
        self.stream = RawStream(sock)
        self.peer_ip = peer_ip
        self.state = state
        #: Bytes received past the current request (the start of the next one).
        self.pending = b""
        #: Set when a reply was sent with unread client bytes possibly left: close gently.
        self.linger = False
        self._raw_head = b""
        self._head_len = 0
        #: The scope of the waits between requests (made by :meth:`serve`).
        self._idle = trio.CancelScope()

    async def serve(self) -> None:
        """Answer requests until the client closes, errs or idles out.

        Resource handling: the socket is closed when this returns or is cancelled.
        """
        state, stream, first = self.state, self.stream, True
        state.connection_opened()
        try:
            # One scope for the connection's waits between requests: its deadline moves
            # (a scope per request costs more than a small exchange); it ends the loop.
            # The loop is in this frame: a held stream's await chain is memory.
            with trio.CancelScope() as self._idle:
                while True:
                    snapshot = state.snapshot
                    # Until a route is matched (its own ``send``), writes have the default.
                    stream.send_timeout = snapshot.config.timeouts.send
                    request = await self._read_head(snapshot.config.server, first)
                    if request is None:
                        break
                    first = False
                    # The config of the exchange is the one in force when its head arrived
                    # (a reload while this connection idled applies to this request).
                    exchange = Exchange(self, state, request, self.pending, state.snapshot)
                    # The exchange keeps what it needs of these (a held stream: no more).
                    request, self.pending = None, b""
                    outcome = await exchange.run()
                    del exchange
                    self.pending = outcome.leftover
                    self.linger |= outcome.linger
                    # A cut write (part of a write left, then it failed or was cancelled):
                    # the client may hold half a message; nothing may follow it.
                    if not outcome.reuse or state.draining or stream.write_cut:
                        break
            if self.linger and not stream.write_cut:
                await self._linger()
        except Exception:
            log.exception("unexpected error on a client connection")
        finally:
            state.connection_closed()
            unwatch(stream)  # before the fd can be reused
            stream.close()

    async def _read_head(self, server: ServerSettings, first: bool) -> h11.Request | None:
        limit = server.max_header_bytes
        h = h11.Connection(h11.SERVER, max_incomplete_event_size=limit)
        data, self.pending = self.pending, b""
        # The first head must be complete header_timeout after the connection opened;
        # later ones header_timeout after their first byte (keepalive_timeout until then).
        now = trio.current_time()
        deadline = now + server.header_timeout
        if not data:
            if self.state.draining:
                return None
            idle, idle_waits = self._idle, self.state.idle_waits
            idle.deadline = deadline if first else now + server.keepalive_timeout
            idle_waits.add(idle)
            try:
                data = await self._recv()  # expiry (or a drain) cancels the whole loop
            finally:
                idle_waits.discard(idle)
                idle.deadline = math.inf
            if not data or idle.cancel_called:
                # Closed, or idle past the keep-alive timeout (or draining): close quietly.
                # Bytes that came just as the deadline passed (one scheduler pass) are
                # not read on: the scope stays cancelled and would cut the exchange after
                # its request went upstream. Nothing was forwarded, so a retry is safe.
                return None
            if not first:
                deadline = trio.current_time() + server.header_timeout
        received: list[bytes] = []
        try:
            event = self._feed(h, data, received, limit)
            if event is None:  # the head spans reads: only then is a timer needed
                with trio.fail_at(deadline):
                    while event is None:
                        data = await self._recv()
                        if not data:
                            return None  # closed mid-head
                        event = self._feed(h, data, received, limit)
        except trio.TooSlowError:
            await self._refuse(DownstreamTimeout("request head not received in time"))
            return None
        except DownstreamError as exc:
            await self._refuse(exc)
            return None
        fed = sum(map(len, received))
        trailing = h.trailing_data[0]
        try:
            if fed - len(trailing) > limit:
                raise HeadTooLarge("request head too large")
            if len(event.headers) > server.max_header_count:
                raise HeadTooLarge(f"more than {server.max_header_count} header fields")
            if event.http_version not in (b"1.1", b"1.0"):
                raise UnsupportedVersion("only HTTP/1.0 and HTTP/1.1 are supported")
            raw = received[0] if len(received) == 1 else b"".join(received)
            if _SUSPICIOUS_HEAD.search(raw, 0, fed - len(trailing)):
                raise BadRequest("obsolete line folding or control characters in the request head")
        except DownstreamError as exc:
            await self._refuse(exc, event.method)
            return None
        self.pending = trailing
        self._raw_head, self._head_len = raw, fed - len(trailing)
        return event

    @staticmethod
    def _feed(
        h: h11.Connection, data: bytes, received: list[bytes], limit: int
    ) -> h11.Request | None:
        """Give ``data`` to h11: the request if its head is complete, else None."""
        h.receive_data(data)
        received.append(data)
        try:
            event = h.next_event()
        except h11.RemoteProtocolError as exc:
            if exc.error_status_hint == 431:
                raise HeadTooLarge("request head too large") from None
            raise BadRequest("malformed request head") from None
        if isinstance(event, h11.Request):
            return event
        if sum(map(len, received)) > limit:
            raise HeadTooLarge("request head too large")
        return None

    async def _linger(self) -> None:
        """Close in two steps after an error reply (RFC 9112 section 9.6).

        Closing with unread client bytes in the socket makes the kernel send a
        reset, which can destroy the reply before the client reads it. So: stop
        writing, then read and discard for a bounded time and amount.
        """
        try:
            self.stream.sock.shutdown(socket.SHUT_WR)
        except OSError:
            return
        with trio.move_on_after(LINGER_S):
            discarded, buf = 0, self.rbuf
            while discarded < LINGER_BYTES:
                try:
                    n = await self.stream.recv_into(buf, CHUNK)
                except StreamBroken:
                    return
                if not n:
                    return
                discarded += n

    @property
    def wbuf(self) -> bytearray:
        """The buffer of one response (its head's reads, a Content-Length body's pump): made
        per exchange and dropped by the sink before a streamed body, so a connection
        holding a stream open holds no buffer."""
        return bytearray(CHUNK)

    @property
    def rbuf(self) -> bytearray:
        """A buffer for one read loop (a request body pump, a head): made when one starts,
        so a connection holding a stream open for an hour holds no read buffer."""
        return bytearray(CHUNK)

    async def _recv(self) -> bytes:
        try:
            return await self.stream.recv(CHUNK)  # a fresh bytes: no buffer, no copy
        except StreamBroken:
            return b""

    async def _refuse(self, exc: DownstreamError, method: bytes = b"") -> None:
        """Answer a request whose head was refused, log it, and (always) close."""
        rid = request_id_from([])
        record = ExchangeRecord(
            request_id=rid,
            method=method.decode("ascii", "replace"),
            client=self.peer_ip,
            status=exc.status,
            outcome=exc.outcome,
            started=trio.current_time(),
        )
        try:
            record.bytes_out = await self.send_error(exc, rid.encode(), True, method)
        finally:
            log_exchange(record)
            self.state.metrics.observe(record)

    async def send_error(
        self, exc: ProxyError, request_id: bytes, close: bool, method: bytes = b""
    ) -> int:
        """Write a proxy-made JSON error response. Errors while writing are ignored.

        Returns the body bytes written (0 for HEAD or a failed write), for the access log."""
        body = error_body(exc.type, exc.message, request_id.decode("ascii"))
        headers = [
            (b"Content-Type", b"application/json"),
            (b"Content-Length", b"%d" % len(body)),
            (b"Cache-Control", b"no-store"),
            (b"X-Request-ID", request_id),
        ]
        headers.extend(exc.headers)
        if close:
            headers.append((b"Connection", b"close"))
        self.linger = close
        reason = reason_phrase(exc.status)
        head = serialize_head(b"HTTP/1.1 %d %s\r\n" % (exc.status, reason), headers)
        if method == b"HEAD":
            body = b""
        try:
            await self.stream.send_all(head + body)
        except StreamBroken:
            return 0
        return len(body)

    @property
    def raw_head(self) -> bytes:
        """The current request's head exactly as received (for protocol upgrades)."""
        return self._raw_head[: self._head_len]

    def release_head(self) -> None:
        self._raw_head = b""

    async def wait_closed(self) -> bool:
        """Wait until the client closes (True) or sends more bytes (False).

        The bytes, if any, stay in the socket for the next cycle.
        """
        while True:
            await trio.lowlevel.wait_readable(self.stream.sock)
            closed = self.stream.peek_closed()
            if closed is not None:
                return closed
