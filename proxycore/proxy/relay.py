"""The native front end's two body directions over raw sockets.

:class:`RawRequestBody` and :class:`RawResponseSink` are what the native
exchange hands the shared core (:class:`~proxycore.proxy.upstream.UpstreamCall`)
as its :class:`~proxycore.proxy.upstream.RequestBody` and
:class:`~proxycore.proxy.upstream.ResponseSink`. Both move bytes between the
client socket and the upstream one with :mod:`proxycore.net.pipe` pumps: one
4 KiB buffer per direction per client connection, no read ahead.

The framing choice for the client (:meth:`RawResponseSink.respond`):

====================  ===================  ====================================
upstream body         HTTP/1.1 client      HTTP/1.0 client
====================  ===================  ====================================
none / Content-Length  passed through       passed through
chunked                passed through       decoded (close-delimited)
close-delimited        re-chunked           passed through (close-delimited)
====================  ===================  ====================================

An event stream with the route's SSE features on (or an ``on_sse_event`` hook)
goes through :func:`~proxycore.proxy.sse_relay.relay_sse` instead.
"""

from __future__ import annotations

from typing import Final, Protocol

import h11

from ..errors import (
    BadRequest,
    ClientGone,
    DownstreamTimeout,
    PayloadTooLarge,
    UpstreamProtocolError,
    UpstreamReset,
    UpstreamStatus,
    UpstreamTimeout,
)
from ..http.chunked import ChunkedError, ChunkedScanner, encode_chunk_header
from ..http.headers import (
    CHUNKED,
    NO_BODY,
    UNTIL_CLOSE,
    Framing,
    Headers,
    downstream_response_headers,
    reason_phrase,
    serialize_head,
)
from ..net.pipe import (
    BodyTooLarge,
    FramingError,
    IdleTimeout,
    SinkFailed,
    SourceFailed,
    bulk_buffer,
    pump_chunked,
    pump_chunked_decoded,
    pump_length,
    pump_until_close,
)
from ..net.pool import UpstreamConnection
from ..net.stream import NO_SEND_TIMEOUT, Buffer, RawStream, Stream, StreamBroken
from ..observe.accesslog import ExchangeRecord
from ..proxy.ledger import Ledger
from ..proxy.sse_relay import relay_sse
from ..proxy.upstream import ResponseHead, UpstreamCall

__all__ = ["CONTINUE", "ClientSide", "RawRequestBody", "RawResponseSink"]

CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"
#: What the sink's ``buf`` becomes once the response head is read (see ``respond``).
_NO_BUF: Final = bytearray()


class ClientSide(Protocol):
    """What the relays need of the client connection: its stream and its two buffers
    (:class:`~proxycore.proxy.connection.ClientConnection` is one)."""

    @property
    def stream(self) -> Stream: ...
    @property
    def rbuf(self) -> bytearray:
        """Read buffer (client -> upstream body)."""
        ...

    @property
    def wbuf(self) -> bytearray:
        """Write buffer (upstream -> client body, and the response head)."""
        ...

    async def wait_closed(self) -> bool:
        """Wait until the client closes (True) or sends more bytes (False)."""
        ...


class RawRequestBody:
    """The request body: the bytes read with the head, then the client socket.

    Made from the bytes read past the head, split into this body's start
    (:attr:`start`, sent with the upstream head) and what follows it
    (:attr:`leftover`: the next pipelined request), per the request framing.
    Request trailers are validated, never forwarded (a trailer field could carry
    a header the proxy strips or owns). Raises :class:`BadRequest` for malformed
    chunked framing.
    """

    __slots__ = (
        "_down",
        "_record",
        "_remaining",
        "_scanner",
        "done",
        "eager",
        "leftover",
        "max_body",
        "start",
    )

    def __init__(
        self, down: ClientSide, record: ExchangeRecord, data: bytes, framing: Framing
    ) -> None:
        self._down, self._record = down, record
        self.eager = False
        #: ``max_body_bytes`` of the route, once admitted (checked while pumping).
        self.max_body: int | None = None
        self._scanner: ChunkedScanner | None = None
        self._remaining = 0
        if framing.kind == "length":
            self.start = data[: framing.length]
            self.leftover = data[framing.length :]
            self._remaining = framing.length - len(self.start)
            self.done = self._remaining == 0
        elif framing.kind == "chunked":
            scanner = self._scanner = ChunkedScanner()
            try:
                end = scanner.feed(data)
            except ChunkedError:
                raise BadRequest("malformed chunked request body") from None
            keep = scanner.trailer_start
            self.done = scanner.done
            self.start = data[:keep] + b"\r\n" if self.done else data[:keep]
            self.leftover = data[end:]
        else:
            self.start, self.leftover, self.done = b"", data, True
        record.bytes_in = len(self.start)
        if not self.done:
            # Until the body is read to its end we don't know where the next request starts.
            self.leftover = b""

    @property
    def declared(self) -> int:
        """The body size announced so far (Content-Length, or chunk sizes read)."""
        if self._scanner is not None:
            return self._scanner.declared_bytes
        return len(self.start) + self._remaining

    def decoded(self) -> bytes:
        """The body in hand without chunked framing (for the ``on_request`` hook)."""
        if self._scanner is None:
            return self.start
        spans: list[tuple[int, int]] = []
        ChunkedScanner().feed(self.start, 0, None, spans)
        return b"".join(self.start[s:e] for s, e in spans)

    async def send_rest(self, up: Stream, idle: float) -> bool:
        down, rec = self._down, self._record
        try:
            if self._scanner is None:
                buf = bulk_buffer(self._remaining, down.rbuf)
                moved = await pump_length(down.stream, up, buf, self._remaining, idle)
            else:
                moved, self.leftover = await pump_chunked(
                    down.stream,
                    up,
                    down.rbuf,
                    self._scanner,
                    idle,
                    max_payload=self.max_body,
                    drop_trailers=True,
                )
        except SourceFailed as exc:
            rec.bytes_in += exc.moved
            raise ClientGone("client went away during the request body") from None
        except FramingError as exc:
            rec.bytes_in += exc.moved
            raise BadRequest("malformed chunked request body") from None
        except BodyTooLarge as exc:
            rec.bytes_in += exc.moved
            raise PayloadTooLarge(f"request body larger than {self.max_body} bytes") from None
        except IdleTimeout as exc:
            rec.bytes_in += exc.moved
            raise DownstreamTimeout(f"request body stalled for {idle:g} s") from None
        except SinkFailed as exc:
            rec.bytes_in += exc.moved
            return False  # the upstream stopped reading; its response (or failure) decides
        rec.bytes_in += moved
        self.done = True
        return True

    async def read_all(self, limit: int, idle: float) -> bytes:
        """The whole body, without chunked framing, for a request the proxy answers itself
        (the tunnel's API). Over ``limit`` bytes: :class:`PayloadTooLarge`."""
        if self.declared > limit:
            raise PayloadTooLarge(f"request body larger than {limit} bytes")
        if not self.done:
            sink = _Collector()
            self.max_body = limit if self.max_body is None else min(self.max_body, limit)
            await self.send_rest(sink, idle)  # never stops early: the collector takes all
            self.start += bytes(sink.data)
        return self.decoded()

    def watch_stream(self) -> RawStream | None:
        """The client socket for the process's downstream watch: as :meth:`wait_gone`, none
        once bytes of a next request are in hand (EOF can't be seen behind them)."""
        stream = self._down.stream
        if self.done and not self.leftover and isinstance(stream, RawStream):
            return stream
        return None

    async def wait_gone(self) -> bool:
        # Bytes of a next request (or a body the upstream stopped reading) wait in the
        # socket: EOF can't be seen behind them, and the next cycle reads them anyway.
        return self.done and not self.leftover and await self._down.wait_closed()


class _Collector:
    """A :class:`Stream` that keeps what is written to it (a body read whole)."""

    send_timeout = NO_SEND_TIMEOUT

    def __init__(self) -> None:
        self.data = bytearray()

    async def recv_into(self, buf: bytearray, nbytes: int) -> int:
        return 0

    async def send_all(self, data: Buffer) -> None:
        self.data += data

    @property
    def write_cut(self) -> bool:
        return False

    @property
    def bytes_sent(self) -> int:
        return len(self.data)

    def has_pending_input(self) -> bool:
        return False

    def close(self) -> None:
        """Nothing to release: the collected bytes stay readable in ``data``."""


class RawResponseSink:
    """The response: head and body to the client socket (see the module's table)."""

    __slots__ = (
        "_down",
        "_ledger",
        "_method",
        "buf",
        "client_11",
        "close",
        "head_sent",
        "sse_errors",
    )

    def __init__(self, down: ClientSide, ledger: Ledger, method: bytes, client_11: bool) -> None:
        self._down, self._ledger, self._method = down, ledger, method
        self.buf = down.wbuf
        self.client_11 = client_11
        #: The client connection ends after this response.
        self.close = not client_11
        #: The response head went out (an error after it can only cut the connection).
        self.head_sent = False
        #: Upstream failures become an SSE ``error`` event (route ``sse.errors`` and the
        #: client accepts ``text/event-stream``).
        self.sse_errors = False

    async def send(self, data: bytes) -> None:
        try:
            await self._down.stream.send_all(data)
        except StreamBroken:
            raise ClientGone("client went away") from None

    async def send_head(self, data: bytes, status: int) -> None:
        """Write the response head (and any body bytes in hand); the access log's status
        is set here, so it is always the one the client was sent."""
        self.head_sent = True
        self._ledger.record.status = status
        await self.send(data)

    async def send_continue(self) -> None:
        await self.send(CONTINUE)

    async def interim(self, event: h11.InformationalResponse) -> None:
        if event.status_code == 100 or not self.client_11:
            return  # the proxy answers Expect itself; HTTP/1.0 clients get no 1xx
        headers = downstream_response_headers(
            list(event.headers.raw_items()),
            request_id=self._ledger.request_id,
            framing=NO_BODY,
            keep_length=False,
            close=False,
        )
        await self.send(
            serialize_head(b"HTTP/1.1 %d %s\r\n" % (event.status_code, event.reason), headers)
        )

    async def respond(self, head: ResponseHead, up: UpstreamConnection, call: UpstreamCall) -> bool:
        # A stream may be held for hours: nothing of the head (its headers, the first
        # body bytes, the client head) stays referenced by these frames while it pumps.
        status, framing, ledger, trailing = head.status, head.framing, self._ledger, head.trailing
        kind = framing.kind
        if ledger.state.draining or not call.body.done:
            # An answer before the whole request body: the connection can't carry another
            # request (where would it start?), so the client is told it closes.
            self.close = True
        if kind == "none" or kind == "length":
            out = framing
        elif self.client_11:
            out = CHUNKED
        else:
            out = UNTIL_CLOSE
            self.close = True
        if self.sse_errors and not 200 <= status < 300:
            raise UpstreamStatus(f"upstream answered {status}", upstream_status=status)
        start = b"HTTP/1.1 %d %s\r\n" % (status, head.reason or reason_phrase(status))
        idle = call.timeouts.idle
        route = ledger.route
        if (
            head.sse
            and route is not None
            and (route.sse.enabled or ledger.hooks.on_sse_event is not None)
        ):
            out = CHUNKED if self.client_11 else UNTIL_CLOSE
            data = serialize_head(start, self._headers(head, out, False))
            del head
            self.buf = _NO_BUF  # read in fresh bytes: a held stream holds no buffer
            await self.send_head(data, status)
            del data
            call.watch_downstream()
            return await relay_sse(
                ledger,
                up=up.stream,
                down=self._down.stream,
                buf=None,
                trailing=trailing,
                kind=kind,
                length=framing.length,
                idle=idle,
                chunked_out=self.client_11,
                errors=self.sse_errors,
            )
        data = serialize_head(
            start, self._headers(head, out, self._method == b"HEAD" or status == 304)
        )
        del head
        rec = ledger.record
        # The head is read: a body streamed in fresh bytes (chunked, until close) needs no
        # buffer, so none is held while a stream waits; a Content-Length body's pump keeps
        # this one (or a bulk one).
        down, buf, self.buf = self._down.stream, self.buf, _NO_BUF
        # bytes_out: the body bytes that left, counted by the stream (so a pump that
        # failed, was cut part-way or was cancelled from outside still counts right).
        body_from = down.bytes_sent + len(data)
        try:
            if kind == "none":
                await self.send_head(data, status)
                return not trailing
            if kind == "length":
                first = trailing[: framing.length]
                await self.send_head(data + first, status)
                rest = framing.length - len(first)
                clean = len(trailing) == len(first)
                if rest:
                    data = first = trailing = b""
                    call.watch_downstream()
                    await pump_length(up.stream, down, bulk_buffer(rest, buf), rest, idle)
                return clean
            if kind == "chunked":
                # Passed through to HTTP/1.1, decoded for HTTP/1.0.
                scanner = ChunkedScanner()
                spans: list[tuple[int, int]] = []
                try:
                    end = scanner.feed(trailing, 0, None, spans)
                except ChunkedError:
                    raise FramingError("bad chunk") from None
                if self.client_11:
                    first = trailing[:end]
                else:
                    first = b"".join(trailing[s:e] for s, e in spans)
                await self.send_head(data + first, status)
                leftover = trailing[end:]
                if not scanner.done:
                    data = first = trailing = b""
                    spans.clear()
                    call.watch_downstream()
                    pump = pump_chunked if self.client_11 else pump_chunked_decoded
                    del buf
                    _, leftover = await pump(up.stream, down, None, scanner, idle)
                return not leftover
            first = trailing
            if out is CHUNKED and first:
                first = encode_chunk_header(len(first)) + first + b"\r\n"
            await self.send_head(data + first, status)
            data = first = trailing = b""
            del buf
            call.watch_downstream()
            await pump_until_close(up.stream, down, None, idle, chunk_encode=out is CHUNKED)
            return False
        except SourceFailed as exc:
            raise UpstreamReset(f"upstream failed mid-body: {exc}") from None
        except SinkFailed:
            raise ClientGone("client went away during the response") from None
        except FramingError:
            raise UpstreamProtocolError("malformed chunked body from upstream") from None
        except IdleTimeout:
            raise UpstreamTimeout(f"response body idle for {idle:g} s") from None
        finally:
            if kind != "none":
                rec.bytes_out = max(0, down.bytes_sent - body_from)

    def _headers(self, head: ResponseHead, out: Framing, keep_length: bool) -> Headers:
        """The response head's fields as the client gets them."""
        return downstream_response_headers(
            head.headers,
            request_id=self._ledger.request_id,
            framing=out,
            keep_length=keep_length,
            close=self.close,
        )
