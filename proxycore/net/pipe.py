"""Body pumps: move one message body from a source stream to a sink stream.

Invariants (the reason this module exists):

- Every read is at most ``CHUNK`` (4 KiB) and goes into one buffer owned by
  the caller, reused for the whole body: the next read starts only after the
  previous bytes were fully written, so a slow sink throttles a fast source
  through TCP flow control and a body in flight holds O(4 KiB). The chunked and
  until-close pumps also take ``buf=None``: each read is then a fresh ``bytes``
  (``RawStream.recv``/``TLSStream.recv``), dropped once written, so a stream
  waiting for its next event holds no buffer (callgrind: no more instructions
  per event than reading into a buffer and slicing a view of it).
- No read ahead, no batching: bytes are written as soon as they are read.
- Framing that can be passed through is (Content-Length bodies, chunked to a
  chunked sink); the chunked scanner validates it on the way.
- ``idle`` bounds the silence between two reads (or a write that cannot
  proceed): the body fails once ``idle`` seconds passed since the last chunk was
  written, through a cancel scope (:class:`_Idle`). Expiring during a write is the
  sink's failure (:class:`SinkFailed`), not the source's silence. Each write is
  also bounded by the sink stream's own ``send_timeout`` (a
  :class:`~proxycore.net.stream.SendTimeout` is a :class:`SinkFailed`).
- The idle deadline moves lazily when both streams are ``RawStream``s (the SSE
  path: a deadline move per event was ~5 us of ~44): each chunk only notes the
  time; when the scope fires and the body was not idle ``idle`` seconds, a new
  scope is armed at ``last chunk + idle``. That is safe because the scope can then
  fire only where nothing was consumed or written: in a read's wait (a ``RawStream``
  read is a cancel point only before it takes bytes), or in a write that blocks,
  and a blocking write first makes the deadline exact (``RawStream.on_block``), so
  a write is cancelled part-way (a cut) exactly when it was before. A read can
  complete in the scheduler pass in which the stale deadline passes (the scope is
  then marked cancelled without raising): its bytes are held, the scope is left and
  they are written under a fresh one (a write in the marked scope would be cancelled
  at once, cutting a live stream). Other streams (TLS, in-memory) move the deadline
  after every chunk.

Each pump raises :class:`SourceFailed` (read error, or the source ended
before the body did), :class:`SinkFailed` (write error), :class:`FramingError`
(malformed chunked framing) or :class:`IdleTimeout`. The exchange maps those
to the side-specific proxy errors. They return the number of bytes written; a
failure carries the number written before it in ``moved`` (the part of a failed
write that left is in the sink's ``Stream.bytes_sent``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Final, NoReturn

import trio

from ..http.chunked import LAST_CHUNK, ChunkedError, ChunkedScanner, encode_chunk_header
from ..net.stream import CHUNK, RawStream, Stream, StreamBroken, TLSStream

__all__ = [
    "BULK_CHUNK",
    "CHUNK",
    "BodyTooLarge",
    "FramingError",
    "IdleTimeout",
    "SinkFailed",
    "SourceFailed",
    "bulk_buffer",
    "pump_chunked",
    "pump_chunked_decoded",
    "pump_length",
    "pump_until_close",
]

#: Read size for large Content-Length bodies: bulk transfers are bound by reads per
#: byte (bench: 64 MiB download 0.57x nginx at 4 KiB reads). Still fixed and bounded:
#: one such buffer per exchange in flight, only while it pumps a large body.
BULK_CHUNK: Final = 64 * 1024
BULK_THRESHOLD: Final = 256 * 1024


def bulk_buffer(remaining: int, default: bytearray) -> bytearray:
    """``default`` (the connection's 4 KiB buffer), or a 64 KiB one for a body
    still larger than ``BULK_THRESHOLD``. SSE and chunked bodies never get one."""
    return bytearray(BULK_CHUNK) if remaining > BULK_THRESHOLD else default


class PipeError(Exception):
    """Base of the pump failures; the exchange maps each to a side-specific proxy error."""

    #: Bytes the pump had written to the sink before it failed (for the access log).
    moved: int = 0


class SourceFailed(PipeError):
    """The source failed to read, or ended before the body did."""


class SinkFailed(PipeError):
    """Writing to the sink failed."""


class FramingError(PipeError):
    """Malformed chunked framing in the body."""


class IdleTimeout(PipeError):
    """No body bytes moved for the idle timeout."""


class BodyTooLarge(PipeError):
    """The body's data grew past its limit (max_body_bytes)."""


async def _send(dst: Stream, data: bytes | memoryview) -> None:
    try:
        await dst.send_all(data)
    except StreamBroken as exc:
        raise SinkFailed(str(exc)) from None


def _expired(idle: float, writing: bool) -> NoReturn:
    """The pump's ``idle`` scope expired: a silent source, or a sink that stopped taking
    bytes (a write stall is the sink's failure, whichever timer saw it first)."""
    if writing:
        raise SinkFailed(f"write stalled for {idle:g} s")
    raise IdleTimeout(f"no body bytes for {idle:g} s")


_NO_BUF: Final = bytearray()


def _reader(
    src: Stream, buf: bytearray | None
) -> tuple[Callable[[int], Awaitable[bytes]] | None, bytearray]:
    """How a pump reads: with ``buf`` None, a fresh ``bytes`` per read where the source
    can (``RawStream``/``TLSStream.recv``: no buffer held between reads), else into
    ``buf`` (a new 4 KiB one if none was given). Returns ``(recv or None, buffer)``."""
    if buf is None and isinstance(src, RawStream | TLSStream):
        return src.recv, _NO_BUF
    return None, bytearray(CHUNK) if buf is None else buf


class _Idle:
    """One pump's idle bound: the scopes that carry it and the time of the last chunk.

    A pump runs its loop inside ``with idle.arm() as scope``; after each chunk it sets
    ``last`` (and, unless ``lazy``, moves ``scope.deadline`` to ``last + idle``). When a
    scope caught its cancellation, :meth:`expired` raises the pump's failure, or returns
    if the body was not idle that long (lazy mode only): the pump arms a new scope and
    goes on (its loop is re-entered at a read that consumed nothing). See the module.
    """

    __slots__ = ("idle", "last", "lazy", "now", "scope", "sink")

    def __init__(self, src: Stream, dst: Stream, idle: float) -> None:
        self.now = trio.lowlevel.current_clock().current_time
        self.idle = idle
        self.last = self.now()
        self.scope = trio.CancelScope()
        self.sink: RawStream | None = None
        self.lazy = type(src) is RawStream and type(dst) is RawStream
        if self.lazy and isinstance(dst, RawStream):
            self.sink = dst
            dst.on_block = self.exact

    def arm(self) -> trio.CancelScope:
        """A new scope with the deadline ``last + idle``."""
        self.scope = trio.CancelScope(deadline=self.last + self.idle)
        return self.scope

    def exact(self) -> None:
        """Before a write blocks: the deadline exactly ``idle`` after the last chunk."""
        self.scope.deadline = self.last + self.idle

    def expired(self, writing: bool) -> None:
        """The scope fired: raise the pump's failure unless the body moved within ``idle``
        (then return: the caller arms a new scope)."""
        if writing or not self.lazy or self.now() >= self.last + self.idle:
            _expired(self.idle, writing)

    def close(self) -> None:
        if self.sink is not None:
            self.sink.on_block = None


async def pump_length(src: Stream, dst: Stream, buf: bytearray, remaining: int, idle: float) -> int:
    """Copy exactly ``remaining`` bytes (a Content-Length body's rest), in reads of
    at most ``len(buf)`` bytes (see :func:`bulk_buffer`)."""
    view = memoryview(buf)
    size = len(buf)
    moved = n = 0
    writing = held = False
    t = _Idle(src, dst, idle)
    now, exact = t.now, not t.lazy
    try:
        while remaining:
            with t.arm() as scope:
                while remaining:
                    if held:
                        held = False
                    else:
                        try:
                            n = await src.recv_into(buf, size if remaining > size else remaining)
                        except StreamBroken as exc:
                            raise SourceFailed(str(exc)) from None
                        if not exact and scope.cancel_called:
                            # The stale lazy deadline passed as these bytes came (one
                            # scheduler pass): handle them under a fresh scope, never
                            # this one (a write in it would be cancelled at once).
                            held, t.last = True, now()
                            break
                    if not n:
                        raise SourceFailed(f"body ended {remaining} bytes early")
                    writing = True
                    try:
                        await dst.send_all(view[:n])
                    except StreamBroken as exc:
                        raise SinkFailed(str(exc)) from None
                    writing = False
                    remaining -= n
                    moved += n
                    t.last = now()
                    if exact:
                        scope.deadline = t.last + idle
            if scope.cancelled_caught:
                t.expired(writing)
    except PipeError as exc:
        exc.moved = moved
        raise
    finally:
        t.close()
    return moved


async def pump_chunked(
    src: Stream,
    dst: Stream,
    buf: bytearray | None,
    scanner: ChunkedScanner,
    idle: float,
    *,
    max_payload: int | None = None,
    drop_trailers: bool = False,
) -> tuple[int, bytes]:
    """Pass a chunked body through unchanged, validated by ``scanner``.

    Returns ``(bytes written, bytes read past the body's end)``. With
    ``max_payload``, a body whose data grows past it (or a chunk size line that
    promises more) raises :class:`BodyTooLarge` before that read is written.
    With ``drop_trailers`` the trailer section is validated but not written: the
    body ends ``0\r\n\r\n`` (request bodies: a trailer field could carry a
    header the proxy strips or owns).

    ``buf`` None: each read is a fresh ``bytes`` (no buffer held between reads; see
    :func:`_reader`); else reads go into ``buf`` (the caller's 4 KiB buffer).
    """
    recv, rbuf = _reader(src, buf)
    view = memoryview(rbuf)
    data: bytes | memoryview = view
    moved = 0
    leftover = b""
    writing = False
    held = False  # bytes read under a scope whose stale deadline passed
    n = 0
    t = _Idle(src, dst, idle)
    now, exact, feed = t.now, not t.lazy, scanner.feed
    try:
        while not scanner.done:
            with t.arm() as scope:
                while not scanner.done:
                    # The read and the write inline (not through wrappers): this loop
                    # runs once per SSE event, and a coroutine call per step costs.
                    if held:
                        held = False
                    else:
                        try:
                            if recv is None:
                                n = await src.recv_into(rbuf, CHUNK)
                            else:
                                data = await recv(CHUNK)
                                n = len(data)
                        except StreamBroken as exc:
                            raise SourceFailed(str(exc)) from None
                        if not exact and scope.cancel_called:
                            # The stale lazy deadline passed as these bytes came (one
                            # scheduler pass): handle them under a fresh scope, never
                            # this one (a write in it would be cancelled at once).
                            held, t.last = True, now()
                            break
                    if not n:
                        raise SourceFailed("chunked body ended before its last chunk")
                    try:
                        end = feed(data, 0, n)
                    except ChunkedError as exc:
                        raise FramingError(str(exc)) from None
                    if max_payload is not None and scanner.declared_bytes > max_payload:
                        raise BodyTooLarge(f"body larger than {max_payload} bytes")
                    if not drop_trailers:
                        writing = True
                        try:
                            await dst.send_all(data if end == len(data) else data[:end])
                        except StreamBroken as exc:
                            raise SinkFailed(str(exc)) from None
                        writing = False
                        moved += end
                    else:
                        keep = scanner.trailer_start
                        out = b"".join((data[:keep], b"\r\n")) if scanner.done else data[:keep]
                        if out:
                            writing = True
                            await _send(dst, out)
                            writing = False
                            moved += len(out)
                    if end < n:
                        leftover = bytes(data[end:n])
                    t.last = now()
                    if exact:
                        scope.deadline = t.last + idle
            if scope.cancelled_caught:
                t.expired(writing)
    except PipeError as exc:
        exc.moved = moved
        raise
    finally:
        t.close()
    return moved, leftover


async def pump_chunked_decoded(
    src: Stream, dst: Stream, buf: bytearray | None, scanner: ChunkedScanner, idle: float
) -> tuple[int, bytes]:
    """Decode a chunked body and write only its data (for HTTP/1.0 clients). ``buf`` as
    in :func:`pump_chunked`."""
    recv, rbuf = _reader(src, buf)
    view = memoryview(rbuf)
    moved = 0
    leftover = b""
    spans: list[tuple[int, int]] = []
    writing = False
    held = False  # bytes read under a scope whose stale deadline passed
    n = 0
    t = _Idle(src, dst, idle)
    now, exact = t.now, not t.lazy
    try:
        while not scanner.done:
            with t.arm() as scope:
                while not scanner.done:
                    if held:
                        held = False
                    else:
                        try:
                            if recv is None:
                                n = await src.recv_into(rbuf, CHUNK)
                            else:
                                view = memoryview(await recv(CHUNK))
                                n = len(view)
                        except StreamBroken as exc:
                            raise SourceFailed(str(exc)) from None
                        if not exact and scope.cancel_called:
                            # The stale lazy deadline passed as these bytes came (one
                            # scheduler pass): handle them under a fresh scope, never
                            # this one (a write in it would be cancelled at once).
                            held, t.last = True, now()
                            break
                    if not n:
                        raise SourceFailed("chunked body ended before its last chunk")
                    spans.clear()
                    try:
                        end = scanner.feed(view, 0, n, spans)
                    except ChunkedError as exc:
                        raise FramingError(str(exc)) from None
                    for s, e in spans:
                        writing = True
                        await _send(dst, view[s:e])
                        writing = False
                        moved += e - s
                    if end < n:
                        leftover = bytes(view[end:n])
                    t.last = now()
                    if exact:
                        scope.deadline = t.last + idle
            if scope.cancelled_caught:
                t.expired(writing)
    except PipeError as exc:
        exc.moved = moved
        raise
    finally:
        t.close()
    return moved, leftover


async def pump_until_close(
    src: Stream, dst: Stream, buf: bytearray | None, idle: float, *, chunk_encode: bool
) -> int:
    """Copy until the source closes; with ``chunk_encode`` frame each read as a chunk.

    A clean end of the source ends the body (a last chunk is written when
    chunk-encoding); a reset is a :class:`SourceFailed` and writes nothing more.
    ``buf`` as in :func:`pump_chunked`.
    """
    recv, rbuf = _reader(src, buf)
    view = memoryview(rbuf)
    data: bytes | memoryview = view
    moved = 0
    writing = False
    held = False  # bytes read under a scope whose stale deadline passed
    n = 0
    ended = False
    t = _Idle(src, dst, idle)
    now, exact = t.now, not t.lazy
    try:
        while not ended:
            with t.arm() as scope:
                while True:
                    if held:
                        held = False
                    else:
                        try:
                            if recv is None:
                                n = await src.recv_into(rbuf, CHUNK)
                                data = view[:n]
                            else:
                                data = await recv(CHUNK)
                                n = len(data)
                        except StreamBroken as exc:
                            raise SourceFailed(str(exc)) from None
                        if not exact and scope.cancel_called:
                            # The stale lazy deadline passed as these bytes came (one
                            # scheduler pass): handle them under a fresh scope, never
                            # this one (a write in it would be cancelled at once).
                            held, t.last = True, now()
                            break
                    if not n:
                        ended = True
                        break
                    out = (
                        b"".join((encode_chunk_header(n), data, b"\r\n")) if chunk_encode else data
                    )
                    writing = True
                    await _send(dst, out)
                    writing = False
                    moved += len(out)
                    t.last = now()
                    if exact:
                        scope.deadline = t.last + idle
            if scope.cancelled_caught:
                t.expired(writing)
        if chunk_encode:
            await _send(dst, LAST_CHUNK)
            moved += len(LAST_CHUNK)
    except PipeError as exc:
        exc.moved = moved
        raise
    finally:
        t.close()
    return moved
