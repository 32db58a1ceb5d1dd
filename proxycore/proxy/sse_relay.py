"""Relaying an SSE response with the route's SSE features on (heartbeats, in-band
errors, the transcript tap, the ``on_sse_event`` hook).

Bytes are never changed, and every complete event leaves as soon as its blank
line arrived: each upstream read (at most 4 KiB) is decoded from its framing
(chunked, Content-Length or close-delimited), fed to the parser, and
everything up to the last event boundary is written to the client at once as
one chunk (HTTP/1.1) or raw (HTTP/1.0, close-delimited). Owning the client
framing is what lets the proxy insert a heartbeat or an error event; it costs
a chunk header per write compared with the passthrough pump.

**Partial events are held back.** The bytes of an event not finished yet (no
blank line yet) wait in the relay, at most :data:`HOLD_MAX` (64 KiB) per
stream. So the client is always between events, and when the upstream dies
mid-event the held start is dropped and the ``error`` event follows the last
complete event: a client never dispatches a partial event. An event larger
than the hold goes out as it comes once it outgrew it (memory stays bounded);
if the upstream then dies inside it, the client connection is cut without a
clean end (as the passthrough pump does). On a clean upstream end the held
bytes are sent as they are (the upstream's own stream ended mid-event).

Cut writes: once a client write was interrupted after some of its bytes left
(``Stream.write_cut``: a cancelled or failed ``send_all``), the relay writes
nothing more, no error event, no last chunk: the exchange cuts the connection.

Two tasks write to the client (the pump and the heartbeat task), so every
client write holds ``_lock``. A heartbeat (``: keep-alive``) goes out only
when nothing was written for ``heartbeat`` seconds *and* the client is between
events (with the hold, also while the upstream is mid-event). Heartbeats are
not upstream activity: the idle timeout counts upstream reads only.

:func:`relay_sse` is the native front end's use of it (after the response head
went out): the tap for the transcript, the ``on_sse_event`` hook, and an upstream
failure turned into an ``error`` event plus a clean end when the client accepts
``text/event-stream`` and the route has ``sse.errors`` on.
:func:`sse_error_reply` is the same error before any head: a 200 event stream
holding only the ``error`` event.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Final

import trio

from ..errors import (
    ClientGone,
    ProxyError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamReset,
    UpstreamStatus,
    UpstreamTimeout,
)
from ..http.chunked import LAST_CHUNK, ChunkedError, ChunkedScanner, encode_chunk_header
from ..http.headers import add_sse_headers, serialize_head
from ..http.sse import BOM, HEARTBEAT, SSEEvent, SSEParser, error_event
from ..net.pipe import CHUNK, FramingError, IdleTimeout, SinkFailed, SourceFailed
from ..net.stream import RawStream, Stream, StreamBroken, TLSStream
from ..proxy.ledger import Ledger

__all__ = ["HOLD_MAX", "SSERelay", "relay_sse", "sse_error_reply"]

#: The most bytes of one unfinished event held back from the client (per stream).
HOLD_MAX: Final = 64 * 1024


class SSERelay:
    def __init__(
        self,
        *,
        up: Stream,
        down: Stream,
        buf: bytearray | None,
        idle: float,
        chunked_out: bool,
        parser: SSEParser,
        heartbeat: float,
        on_event: Callable[[SSEEvent], Awaitable[None]] | None = None,
    ) -> None:
        self._up = up
        self._down = down
        self._buf = buf
        self._idle = idle
        self._chunked_out = chunked_out
        self.parser = parser
        self._heartbeat = heartbeat
        self._on_event = on_event
        self._lock = trio.StrictFIFOLock()
        self._last_write = trio.current_time()
        self._beats = 0
        self._body_seen = False
        self._beat_failure: Exception | None = None
        #: The start of an unfinished event, not sent yet (at most ``HOLD_MAX``).
        self._held = bytearray()
        #: Part of an unfinished event went out (it outgrew ``HOLD_MAX``): the client is
        #: mid-event until its end is sent.
        self._open = False
        self.moved = 0
        self.leftover = b""

    @property
    def can_end(self) -> bool:
        """The client is between events and may be sent more (an error event, the end):
        no write was cut and no part of an unfinished event went out."""
        return not self._open and not self._down.write_cut

    async def _send(self, data: bytes | bytearray | memoryview) -> None:
        """One framed write; the caller holds ``_lock``."""
        if self._down.write_cut:  # never a byte after a partial write (misframed)
            raise SinkFailed("an earlier write to the client was cut")
        if self._chunked_out:
            data = b"%s%s\r\n" % (encode_chunk_header(len(data)), data)
        try:
            await self._down.send_all(data)
        except StreamBroken as exc:
            raise SinkFailed(str(exc)) from None
        self.moved += len(data)
        self._last_write = trio.current_time()

    async def _body(self, data: bytes | memoryview) -> list[SSEEvent]:
        """Relay upstream body bytes: everything up to the last complete event goes out
        at once; the start of an unfinished event is held back (up to ``HOLD_MAX``, then
        it goes out as it comes). Fed to the parser under the same lock as the writes, so
        the heartbeat task sees the client's state. Returns the events completed."""
        if not data:
            return []
        async with self._lock:
            events = self.parser.feed(data)
            tail, held = self.parser.tail, self._held
            pending: bytes | bytearray | memoryview = data
            if held:
                held += data
                pending = held
            size = len(pending)
            if tail >= size and not self._open and tail <= HOLD_MAX:
                if not held:
                    self._held = bytearray(data)
                return events  # no event end in sight: hold (nothing completed)
            if tail >= size or tail > HOLD_MAX:
                out, self._held = pending, bytearray()
                self._open = tail > 0
            else:
                out, self._held = pending[: size - tail], bytearray(pending[size - tail :])
                self._open = False
            if not self._body_seen:
                self._body_seen = True
                if self._beats and bytes(out[: len(BOM)]) == BOM:
                    out = out[len(BOM) :]  # a BOM only means something first; we sent first
            if out:
                await self._send(out)
        return events

    async def finish(self, error_event: bytes = b"") -> None:
        """End the stream cleanly: after an error event if given, else after the bytes
        still held (the stream ended inside an event: the client discards it as the
        upstream's stream would have it). Raises ``SinkFailed`` if the client can't be
        sent more (:attr:`can_end`); the caller then cuts the connection."""
        async with self._lock:
            if error_event:
                if not self.can_end:
                    raise SinkFailed("the client is mid-write or mid-event")
                self._held = bytearray()  # an unfinished event is never sent
                await self._send(error_event)
            elif self._held:
                held, self._held = self._held, bytearray()
                await self._send(held)
            if self._chunked_out:
                if self._down.write_cut:
                    raise SinkFailed("an earlier write to the client was cut")
                try:
                    await self._down.send_all(LAST_CHUNK)
                except StreamBroken as exc:
                    raise SinkFailed(str(exc)) from None
                self.moved += len(LAST_CHUNK)

    async def run(self, first: bytes, kind: str, length: int) -> None:
        """Relay the body: ``kind`` is the upstream framing (chunked, length, close);
        ``first`` the body bytes already read with the head.

        Any exception of the pump or the heartbeat task is raised as itself, after the
        nursery (which would wrap it in an ExceptionGroup)."""
        failure: Exception | None = None
        async with trio.open_nursery() as nursery:
            if self._heartbeat:
                nursery.start_soon(self._beat)
            try:
                await self._pump(first, kind, length)
            except Exception as exc:
                failure = exc
            # Stop the heartbeat task only between two of its writes (never mid-frame).
            with trio.move_on_after(self._idle) as waited:
                async with self._lock:
                    nursery.cancel_scope.cancel()
            if waited.cancelled_caught:
                nursery.cancel_scope.cancel()
                failure = failure or SinkFailed("client stopped reading")
        failure = failure or self._beat_failure
        if failure is not None:
            raise failure

    async def _beat(self) -> None:
        try:
            while True:
                await trio.sleep_until(self._last_write + self._heartbeat)
                async with self._lock:
                    due = trio.current_time() >= self._last_write + self._heartbeat
                    if due and not self._open:
                        await self._send(HEARTBEAT)
                        self._beats += 1
                    elif due:
                        # Mid-event on the client: the upstream is still sending one that
                        # outgrew the hold; retry in a beat.
                        self._last_write = trio.current_time()
        except Exception as exc:  # kept for run(): raised in the nursery, it would be wrapped
            self._beat_failure = exc

    async def _deliver(self, data: bytes | memoryview) -> None:
        events = await self._body(data)
        if self._on_event is not None:
            for event in events:
                await self._on_event(event)

    async def _pump(self, first: bytes, kind: str, length: int) -> None:
        scanner = ChunkedScanner() if kind == "chunked" else None
        remaining = length - len(first) if kind == "length" else -1
        pending: bytes | memoryview = first
        # ``buf`` None: a fresh ``bytes`` per read where the upstream stream can (no
        # buffer held while the stream waits for its next event), as the pumps do.
        up, buf = self._up, self._buf
        recv = up.recv if buf is None and isinstance(up, RawStream | TLSStream) else None
        if buf is None:
            buf = bytearray(CHUNK if recv is None else 0)
        view = memoryview(buf)
        spans: list[tuple[int, int]] = []
        # True while the pump waits on the client (a write, or the lock a stalled
        # heartbeat write holds): the idle scope firing then is the client's failure.
        writing = False
        with trio.CancelScope(deadline=trio.current_time() + self._idle) as scope:
            while True:
                if scanner is not None and pending:
                    spans.clear()
                    try:
                        end = scanner.feed(pending, 0, None, spans)
                    except ChunkedError as exc:
                        raise FramingError(str(exc)) from None
                    data = b"".join(bytes(pending[s:e]) for s, e in spans)
                    if scanner.done:
                        self.leftover = bytes(pending[end:])
                    writing = True
                    await self._deliver(data)
                    writing = False
                    if scanner.done:
                        return
                elif pending:
                    writing = True
                    await self._deliver(pending)
                    writing = False
                if remaining == 0:
                    return
                want = CHUNK if remaining < 0 else min(CHUNK, remaining)
                try:
                    if recv is None:
                        n = await up.recv_into(buf, want)
                        pending = view[:n]
                    else:
                        pending = await recv(want)
                        n = len(pending)
                except StreamBroken as exc:
                    raise SourceFailed(str(exc)) from None
                if not n:
                    if kind == "close":
                        return
                    raise SourceFailed("upstream closed mid-body")
                if remaining > 0:
                    remaining -= n
                scope.deadline = trio.current_time() + self._idle
        if scope.cancelled_caught:
            if writing:
                raise SinkFailed(f"write to the client stalled for {self._idle:g} s")
            raise IdleTimeout(f"no body bytes for {self._idle:g} s")


def _upstream_error(exc: Exception, idle: float) -> UpstreamError:
    if isinstance(exc, IdleTimeout):
        return UpstreamTimeout(f"response body idle for {idle:g} s")
    if isinstance(exc, FramingError):
        return UpstreamProtocolError("malformed chunked body from upstream")
    return UpstreamReset(f"upstream failed mid-body: {exc}")


async def relay_sse(
    ledger: Ledger,
    *,
    up: Stream,
    down: Stream,
    buf: bytearray | None,
    trailing: bytes,
    kind: str,
    length: int,
    idle: float,
    chunked_out: bool,
    errors: bool,
) -> bool:
    """Relay an SSE body (its head already sent) with the route's SSE features.

    ``kind``/``length``: the upstream framing; ``trailing``: the body bytes read with
    the head; ``buf``: the 4 KiB read buffer, or None for a fresh ``bytes`` per read.
    With ``errors``, an upstream failure ends the stream with an ``error`` event
    (recorded as that failure) instead of cutting it. True if the upstream body ended
    cleanly with nothing read past it. Raises
    :class:`~proxycore.errors.ClientGone` or the upstream failure.
    """
    route, rec = ledger.route, ledger.record
    assert route is not None
    sse = route.sse
    tap = ledger.tap = SSEParser(max_bytes=sse.transcript_max_bytes)
    relay = SSERelay(
        up=up,
        down=down,
        buf=buf,
        idle=idle,
        chunked_out=chunked_out,
        parser=tap,
        heartbeat=sse.heartbeat,
        on_event=ledger.sse_event if ledger.hooks.on_sse_event is not None else None,
    )
    first = trailing[:length] if kind == "length" else trailing
    # What left for the client, a cut write's part included (the relay counts whole writes).
    sent_before = down.bytes_sent
    try:
        try:
            await relay.run(first, kind, length)
        except (SourceFailed, IdleTimeout, FramingError) as exc:
            error = _upstream_error(exc, idle)
            if not errors or not relay.can_end:
                # A cut: errors off, a client write was cut (the client may hold half a
                # chunk), or the client holds part of an event (it outgrew the hold).
                raise error from None
            rec.outcome, rec.error_kind = error.outcome, error.kind
            await relay.finish(error_event(error.status, error.message, rec.request_id))
            return False
        await relay.finish()
    except SinkFailed:
        raise ClientGone("client went away during the response") from None
    finally:
        rec.bytes_out = down.bytes_sent - sent_before
    if kind == "chunked":
        return not relay.leftover
    return kind == "length" and len(trailing) <= length


def sse_error_reply(exc: ProxyError, request_id: str, *, close: bool) -> tuple[bytes, int]:
    """Before the head: a 200 event stream holding only an ``error`` event for ``exc``.
    Returns the whole response and its body size."""
    status = exc.upstream_status if isinstance(exc, UpstreamStatus) else exc.status
    body = error_event(status, exc.message, request_id)
    headers = [
        (b"Content-Type", b"text/event-stream"),
        (b"Content-Length", b"%d" % len(body)),
        (b"X-Request-ID", request_id.encode("ascii")),
    ]
    add_sse_headers(headers)
    if close:
        headers.append((b"Connection", b"close"))
    return serialize_head(b"HTTP/1.1 200 OK\r\n", headers) + body, len(body)
