"""One request on one slot: connect (TCP, TLS), send, read the response (framing, a
watcher fed every body byte), the one retry of a stale keep-alive connection."""

from __future__ import annotations

import re
import socket
import ssl
import time
from typing import Final, Protocol

import trio

from ...http.chunked import ChunkedError, ChunkedScanner
from ...net.stream import connect_tcp
from ..hdr import Histogram
from ..loadgen.spec import LoadSpec
from ..loadgen.wire import CHUNKED, RECV_BYTES, UNTIL_CLOSE, Malformed, Slot, Stale, parse_head

__all__ = ["MAX_SSE_EVENT_BYTES", "Client", "Reply", "SSECounter", "Watcher", "tls_context"]

#: An SSE event larger than this (no blank line in sight) is dropped unparsed.
MAX_SSE_EVENT_BYTES: Final = 1024 * 1024

_T_NS: Final = re.compile(rb'"t_ns"\s*:\s*(\d+)')
_perf = time.perf_counter
_time_ns = time.time_ns


class Watcher(Protocol):
    """Sees every body byte of a response as it arrives (``now``: ``perf_counter``)."""

    def feed(self, data: memoryview, now: float) -> None: ...


class Reply:
    """What one exchange gave: status, head, and (``perf_counter``) when the request was
    handed to the kernel, when the first response byte and the end arrived."""

    __slots__ = ("end", "first_byte", "head", "sent", "status")

    def __init__(self) -> None:
        self.status = 0
        self.head = b""
        self.sent = 0.0
        self.first_byte = 0.0
        self.end = 0.0


def tls_context(spec: LoadSpec) -> ssl.SSLContext:
    """The client context of a run: verified (system store or ``ca_file``) unless
    ``insecure``; ALPN http/1.1."""
    ctx = ssl.create_default_context(cafile=spec.ca_file)
    if spec.insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


class SSECounter:
    """``--sse``: counts events with a data field; ``event_delay`` from a ``"t_ns"``."""

    __slots__ = ("client", "first", "pending")

    def __init__(self, client: Client) -> None:
        self.client = client
        self.pending = bytearray()
        self.first = -1.0

    def feed(self, data: memoryview, now: float) -> None:
        pending = self.pending
        now_ns = _time_ns()
        pending += data
        if b"\r" in pending:  # CRLF (or CR) line endings: normalise to LF
            tail = pending.endswith(b"\r")  # maybe half a CRLF split across reads: keep it
            lines = pending[:-1] if tail else pending
            pending[:] = lines.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
            if tail:
                pending += b"\r"
        start = 0
        completed = 0
        while (end := pending.find(b"\n\n", start)) != -1:
            if pending.startswith(b"data:", start) or pending.find(b"\ndata:", start, end) != -1:
                completed += 1
                match = _T_NS.search(pending, start, end)
                if match is not None:
                    self.client.event_delay.record((now_ns - int(match[1])) / 1e9)
            start = end + 2
        if start:
            del pending[:start]
        if len(pending) > MAX_SSE_EVENT_BYTES:
            pending.clear()
        if completed and self.first < 0:
            self.first = now
        self.client.events += completed


class Client:
    """A run's connections: address resolution, TLS, and the counters they feed."""

    def __init__(self, spec: LoadSpec) -> None:
        self.spec = spec
        self.head_request = spec.method.upper() == "HEAD"
        self.recv_bytes = RECV_BYTES
        if spec.read_rate is not None:
            # Small reads, so the throttle keeps the average rate without bursts.
            self.recv_bytes = max(1, min(4096, spec.read_rate // 10))
        self.ssl = tls_context(spec) if spec.tls else None
        self.addresses: list[str] | None = None
        self.connections = 0
        self.body_bytes = 0
        self.events = 0
        self.connect_time = Histogram()
        self.event_delay = Histogram()

    async def attempt(
        self, slot: Slot, wire: bytes, watcher: Watcher | None
    ) -> tuple[str | None, Reply]:
        """One request on ``slot`` (connecting if needed): the error kind or None, and
        the reply. A reused connection found dead before any byte is retried once."""
        reused = slot.sock is not None
        if not reused:
            kind = await self.connect(slot)
            if kind is not None:
                return kind, Reply()
        try:
            return await self._exchange(slot, reused, wire, watcher)
        except Stale:
            slot.close()
        kind = await self.connect(slot)
        if kind is not None:
            return kind, Reply()
        return await self._exchange(slot, False, wire, watcher)

    async def connect(self, slot: Slot) -> str | None:
        """Open the slot's connection: None, or "connect" / "tls"."""
        spec = self.spec
        t0 = _perf()
        try:
            if self.addresses is None:  # resolved once per run
                infos = await trio.socket.getaddrinfo(
                    spec.host, spec.port, type=trio.socket.SOCK_STREAM
                )
                self.addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
            sock = None
            for address in self.addresses:
                try:
                    sock = await connect_tcp(address, spec.port)  # numeric: no resolver call
                    break
                except OSError:
                    continue
            if sock is None:
                return "connect"
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            return "connect"
        slot.sock = sock
        slot.drained = True
        slot.run = 0
        if self.ssl is not None:
            tls = trio.SSLStream(
                trio.SocketStream(trio.socket.from_stdlib_socket(sock)),
                self.ssl,
                server_hostname=spec.sni or spec.host,
                https_compatible=True,
            )
            try:
                await tls.do_handshake()
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                slot.close()
                return "tls"
            slot.tls = tls
        self.connect_time.record(_perf() - t0)
        self.connections += 1
        return None

    async def _exchange(
        self, slot: Slot, reused: bool, wire: bytes, watcher: Watcher | None
    ) -> tuple[str | None, Reply]:
        """Send the request and read the whole response; close the connection unless it
        can be reused. Raises ``Stale`` if ``reused`` and it died before any byte."""
        reply = Reply()
        reply.sent = _perf()
        try:
            await slot.send_all(wire)
        except OSError:
            slot.close()
            if reused:
                raise Stale from None
            return "reset", reply
        try:
            return await self._response(slot, reused, reply, watcher), reply
        except (Malformed, ChunkedError):
            slot.close()
            return "protocol", reply
        except OSError:
            slot.close()
            return "reset", reply

    async def _response(
        self, slot: Slot, reused: bool, reply: Reply, watcher: Watcher | None
    ) -> str | None:
        spec = self.spec
        read_rate = spec.read_rate
        nbytes = self.recv_bytes
        buf = slot.buf
        slot.drained = True  # the response cannot be there yet: wait for it
        got = 0  # response bytes received
        throttle_start = 0.0
        now = 0.0

        async def fill() -> int:
            nonlocal got, now, throttle_start
            try:
                n = await slot.fill(nbytes)
            except OSError:
                if reused and not got:
                    raise Stale from None
                raise
            now = _perf()
            if not n:
                if reused and not got:
                    raise Stale
                return 0
            if not got:
                reply.first_byte = now
                if read_rate is not None:
                    throttle_start = trio.current_time()
            got += n
            if read_rate is not None:
                due = throttle_start + got / read_rate
                if due > trio.current_time():
                    await trio.sleep_until(due)
            return n

        # The head (skipping 1xx heads).
        while True:
            k = buf.find(b"\r\n\r\n", slot.lo, slot.hi)
            if k >= 0:
                head = bytes(buf[slot.lo : k + 4])
                slot.lo = k + 4
                status, framing, reusable = parse_head(head, self.head_request)
                if status >= 200:
                    break
                if status == 101:
                    raise Malformed("unexpected protocol switch")
                continue
            if not await fill():
                slot.close()
                return "reset"
        reply.status = status
        reply.head = head

        # The body.
        scanner = ChunkedScanner() if framing == CHUNKED else None
        spans: list[tuple[int, int]] = []
        remaining = framing
        while True:
            lo, hi = slot.lo, slot.hi
            if hi > lo:
                if scanner is not None:
                    spans.clear()
                    slot.lo = scanner.feed(buf, lo, hi, spans)
                    done = scanner.done
                elif remaining >= 0:
                    take = min(remaining, hi - lo)
                    spans = [(lo, lo + take)]
                    slot.lo = lo + take
                    remaining -= take
                    done = not remaining
                else:
                    spans = [(lo, hi)]
                    slot.lo = hi
                    done = False
                for s, e in spans:
                    self.body_bytes += e - s
                    if watcher is not None:
                        watcher.feed(slot.view[s:e], now)
            else:
                done = remaining == 0
            if done:
                break
            if not await fill():
                if framing != UNTIL_CLOSE:
                    slot.close()
                    return "reset"
                break

        reply.end = _perf()
        if reusable and spec.keepalive and slot.lo == slot.hi:
            slot.lo = slot.hi = 0
        else:  # Connection: close, close-delimited, or bytes after the response
            slot.close()
        if status >= 500:
            return "status_5xx"
        if status >= 400:
            return "status_4xx"
        return None
