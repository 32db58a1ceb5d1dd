"""Relaying an SSE response with the route's SSE features on (heartbeats, in-band
errors, the transcript tap, the ``on_sse_event`` hook).

Bytes still leave as soon as they arrive and are never changed: each upstream
read (at most 4 KiB) is decoded from its framing (chunked, Content-Length or
close-delimited) and written to the client at once as one chunk (HTTP/1.1) or
raw (HTTP/1.0, close-delimited). Owning the client framing is what lets the
proxy insert a heartbeat or an error event between two upstream reads; it
costs a chunk header per read compared with the passthrough pump.

Two tasks write to the client (the pump and the heartbeat task), so every
client write holds ``_lock``. A heartbeat (``: keep-alive``) goes out only
when nothing was written for ``heartbeat`` seconds *and* the parser is at an
event boundary. Heartbeats are not upstream activity: the idle timeout counts
upstream reads only.

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
from ..net.stream import Stream, StreamBroken
from ..proxy.ledger import Ledger

__all__ = ["SSERelay", "relay_sse", "sse_error_reply"]

_END_EVENT: Final = b"\n\n"


class SSERelay:
    def __init__(
        self,
        *,
        up: Stream,
        down: Stream,
        buf: bytearray,
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
        self._beat_failure: SinkFailed | None = None
        self.moved = 0
        self.leftover = b""

    async def write(self, data: bytes, *, body: bool = False) -> list[SSEEvent]:
        """Write bytes to the client, framed; one write at a time.

        ``body`` bytes (the upstream's) are fed to the parser under the same lock,
        so the heartbeat task never sees a boundary that the client hasn't got yet.
        Returns the events they completed.
        """
        if not data:
            return []
        async with self._lock:
            if body and not self._body_seen:
                self._body_seen = True
                if self._beats and data.startswith(BOM):
                    data = data[len(BOM) :]  # a BOM only means something first; we sent first
            frame = encode_chunk_header(len(data)) + data + b"\r\n" if self._chunked_out else data
            try:
                await self._down.send_all(frame)
            except StreamBroken as exc:
                raise SinkFailed(str(exc)) from None
            self.moved += len(frame)
            self._last_write = trio.current_time()
            return self.parser.feed(data) if body else []

    async def finish(self, error_event: bytes = b"") -> None:
        """End the stream cleanly, after an error event if given (at an event boundary)."""
        if error_event:
            prefix = b"" if self.parser.at_boundary else _END_EVENT
            await self.write(prefix + error_event)
        if self._chunked_out:
            async with self._lock:
                try:
                    await self._down.send_all(LAST_CHUNK)
                except StreamBroken as exc:
                    raise SinkFailed(str(exc)) from None
                self.moved += len(LAST_CHUNK)

    async def run(self, first: bytes, kind: str, length: int) -> None:
        """Relay the body: ``kind`` is the upstream framing (chunked, length, close);
        ``first`` the body bytes already read with the head."""
        failure: Exception | None = None
        async with trio.open_nursery() as nursery:
            if self._heartbeat:
                nursery.start_soon(self._beat)
            try:
                await self._pump(first, kind, length)
            except (SourceFailed, SinkFailed, IdleTimeout, FramingError) as exc:
                failure = exc  # raised after the nursery: it would wrap it in an ExceptionGroup
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
                    if due and self.parser.at_boundary:
                        frame = HEARTBEAT
                        if self._chunked_out:
                            frame = encode_chunk_header(len(HEARTBEAT)) + HEARTBEAT + b"\r\n"
                        await self._down.send_all(frame)
                        self.moved += len(frame)
                        self._beats += 1
                        self._last_write = trio.current_time()
                    elif due:
                        # Mid-event: the upstream is still sending one; retry in a beat.
                        self._last_write = trio.current_time()
        except StreamBroken as exc:
            self._beat_failure = SinkFailed(str(exc))

    async def _deliver(self, data: bytes | memoryview) -> None:
        events = await self.write(bytes(data), body=True)
        if self._on_event is not None:
            for event in events:
                await self._on_event(event)

    async def _pump(self, first: bytes, kind: str, length: int) -> None:
        scanner = ChunkedScanner() if kind == "chunked" else None
        remaining = length - len(first) if kind == "length" else -1
        pending: bytes | memoryview = first
        view = memoryview(self._buf)
        spans: list[tuple[int, int]] = []
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
                    await self._deliver(data)
                    if scanner.done:
                        return
                elif pending:
                    await self._deliver(pending)
                if remaining == 0:
                    return
                want = CHUNK if remaining < 0 else min(CHUNK, remaining)
                try:
                    n = await self._up.recv_into(self._buf, want)
                except StreamBroken as exc:
                    raise SourceFailed(str(exc)) from None
                if not n:
                    if kind == "close":
                        return
                    raise SourceFailed("upstream closed mid-body")
                if remaining > 0:
                    remaining -= n
                pending = view[:n]
                scope.deadline = trio.current_time() + self._idle
        if scope.cancelled_caught:
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
    buf: bytearray,
    trailing: bytes,
    kind: str,
    length: int,
    idle: float,
    chunked_out: bool,
    errors: bool,
) -> bool:
    """Relay an SSE body (its head already sent) with the route's SSE features.

    ``kind``/``length``: the upstream framing; ``trailing``: the body bytes read with
    the head. With ``errors``, an upstream failure ends the stream with an ``error``
    event (recorded as that failure) instead of cutting it. True if the upstream
    body ended cleanly with nothing read past it. Raises
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
    try:
        try:
            await relay.run(first, kind, length)
        except (SourceFailed, IdleTimeout, FramingError) as exc:
            error = _upstream_error(exc, idle)
            if not errors:
                raise error from None
            rec.outcome, rec.error_kind = error.outcome, error.kind
            await relay.finish(error_event(error.status, error.message, rec.request_id))
            return False
        await relay.finish()
    except SinkFailed:
        raise ClientGone("client went away during the response") from None
    finally:
        rec.bytes_out = relay.moved
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
