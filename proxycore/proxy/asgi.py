"""``ProxyApp``: the proxy as an ASGI 3 app for a Trio ASGI server (hypercorn's trio
worker, which also brings HTTP/2 to the client side).

The same exchange as the native server's, with ASGI in place of the client socket: the
same pre-flight (:mod:`~proxycore.proxy.preflight`: the one view of the request built from
``raw_path`` + ``query_string`` (400; routes match the full raw path, so a mounted app's
routes include the mount prefix), route (404), admission (401/403/405/429/503 with the
error's headers), ``max_body_bytes`` (413)), the same ledger (access log, metrics, hooks)
and the same upstream core (:class:`~proxycore.proxy.upstream.UpstreamCall`: connect
timeout, the stale-connection retry, the response head and its limits, the reuse
decision). This module only supplies the two ends: the request body from ``receive()``,
each message written upstream before the next ``receive()``, then a watch for
``http.disconnect`` that cancels the exchange at once; and the response as
``http.response.start`` plus the body in reads of at most 4 KiB, each ``await send()``-ed
before the next read (hypercorn's ``send`` returns once the bytes are written:
backpressure). Chunked upstream bodies are checked and decoded with ``ChunkedScanner``.
``X-Forwarded-Proto`` is the scope's ``scheme``.

Framing: ASGI hides the client's. A Content-Length or Transfer-Encoding header decides as
in the native server; else (HTTP/2, or no body) the first ``http.request`` message does:
complete -> Content-Length or no body, more to come -> chunked upstream. hypercorn frames
the response: Content-Length is kept for length bodies, the rest is chunked (HTTP/1.1) or
DATA frames. After the head, a failure ends the app without the final ``more_body=False``:
hypercorn closes an HTTP/1.1 connection (a truncated body, never a complete one); on
HTTP/2 it neither ends nor resets the stream, which stalls (still never complete).

Lifespan: startup builds the ``ProxyState`` (an unusable secret file fails startup) and
runs the pool sweeper in a nursery kept open until shutdown. Without lifespan the state is
built on the first request and idle upstream connections expire lazily at checkout.

1xx responses: ASGI has one interim message, ``http.response.early_hint``; an upstream 103
is relayed as one (its ``Link`` values) where the server offers the extension (hypercorn:
HTTP/2 and HTTP/3 only). Other 1xx responses are read and dropped.

Not supported (use the native server): WebSocket (refused: close 1003 before accept,
hypercorn answers 403), route SSE features (heartbeat, in-band
errors, transcripts), the ``on_sse_event`` hook, the client-connections gauge, the public
binding check, and an idle timeout on an HTTP/1.1 client that stops reading (hypercorn
shields those writes). hypercorn adds ``Date`` and ``Server`` next to the upstream's unless
its ``include_date_header`` / ``include_server_header`` are off.

Cost: each body piece is an ASGI message through hypercorn (event objects and dicts, its
own h11/h2 encoding, a lock and a shielded scope per write; a task per request), where the
native path moves bytes between two sockets. Rough, from one run on a loaded 2-core box
(upstream, proxy and load generator each one process): 2000 ``/small`` requests, 10
connections: ProxyApp used ~1.7x the native CPU per request (~1.9 vs ~1.15 ms) and made
~0.75x its requests/s; 8 x 16 MiB bodies: ~0.2x the native throughput at ~6x the CPU.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Final, TypeAlias

import h11
import trio

from ..config import Config
from ..errors import (
    BadRequest,
    ClientGone,
    DownstreamTimeout,
    PayloadTooLarge,
    ProxyError,
    UpstreamProtocolError,
    UpstreamReset,
    UpstreamTimeout,
    error_body,
)
from ..http.chunked import LAST_CHUNK, ChunkedError, ChunkedScanner, encode_chunk_header
from ..http.headers import (
    CHUNKED,
    NO_BODY,
    Framing,
    Headers,
    downstream_response_headers,
    may_retry,
    request_framing,
    request_id_from,
)
from ..http.router import Match
from ..net.pool import UpstreamConnection
from ..net.stream import CHUNK, Stream, StreamBroken
from ..proxy.hooks import Hooks
from ..proxy.ledger import Ledger
from ..proxy.preflight import (
    admit,
    answer_head,
    expect_continue,
    heads,
    plan_attempts,
    request_view,
)
from ..proxy.state import ProxyState
from ..proxy.upstream import ResponseHead, UpstreamCall
from ..security.admission import Admission

__all__ = ["ProxyApp"]

Scope: TypeAlias = MutableMapping[str, Any]
Message: TypeAlias = MutableMapping[str, Any]
Receive: TypeAlias = Callable[[], Awaitable[Message]]
Send: TypeAlias = Callable[[Message], Awaitable[None]]

log: Final = logging.getLogger("proxycore.asgi")
_FRAMED: Final = frozenset({b"content-length", b"transfer-encoding"})
EARLY_HINT: Final = "http.response.early_hint"


class ProxyApp:
    """proxycore as an ASGI 3 app (see the module docstring)."""

    def __init__(self, config: Config, *, hooks: Hooks | None = None) -> None:
        if hooks is not None and hooks.on_sse_event is not None:
            raise ValueError("ProxyApp does not support the on_sse_event hook")
        self.config, self.hooks = config, hooks
        self.state: ProxyState | None = None

    def get_state(self) -> ProxyState:
        """The shared state, built on first use (raises ``SecretError``)."""
        if self.state is None:
            self.state = ProxyState(self.config, self.hooks)
        return self.state

    def reload(self, config: Config) -> None:
        """New exchanges use ``config`` (exchanges in flight keep theirs); a bad one raises."""
        if self.state is not None:
            self.state.swap(config)
        self.config = config

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await _Exchange(self.get_state(), scope, receive, send).run()
        elif kind == "lifespan":
            await self._lifespan(receive, send)
        elif kind == "websocket":
            await receive()  # websocket.connect
            await send({"type": "websocket.close", "code": 1003})

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        await receive()  # lifespan.startup
        try:
            state = self.get_state()
        except Exception as exc:
            await send({"type": "lifespan.startup.failed", "message": str(exc)})
            return
        try:
            async with trio.open_nursery() as nursery:
                # The pool sweeper, [state]'s backend, the groups' health checks.
                await nursery.start(state.run)
                await send({"type": "lifespan.startup.complete"})
                while (await receive())["type"] != "lifespan.shutdown":
                    pass
                nursery.cancel_scope.cancel()
        finally:
            state.pool.close_all()
        await send({"type": "lifespan.shutdown.complete"})


class _Exchange:
    """One ASGI request: the front end around the shared core, both its
    :class:`~proxycore.proxy.upstream.RequestBody` (``receive()``) and its
    :class:`~proxycore.proxy.upstream.ResponseSink` (``send()``)."""

    def __init__(self, state: ProxyState, scope: Scope, receive: Receive, send: Send) -> None:
        self.state, self.snapshot = state, state.snapshot
        self.scope, self.receive, self.send = scope, receive, send
        self.method: bytes = scope["method"].encode("ascii")
        self.headers: Headers = [(n, v) for n, v in scope["headers"]]
        self.forwarded_for = b""
        self.framing = NO_BODY
        self.first: Message | None = None  # a request body message read ahead
        self.max_body: int | None = None
        #: RequestBody: the whole request body went upstream; the watch starts at once.
        self.done, self.eager = False, True
        #: ResponseSink: the head buffer; the head went out; the last body message went.
        self.buf = bytearray(CHUNK)
        self.head_sent = self.finished = False

    async def run(self) -> None:
        scope, state = self.scope, self.state
        peer = scope.get("client")
        request_id = request_id_from(self.headers)
        client = peer[0] if peer else ""
        ledger = self.ledger = Ledger(state, scope["method"], client, request_id, log)
        try:
            query = bytes(scope.get("query_string") or b"")
            raw = bytes(scope.get("raw_path") or scope["path"].encode("utf-8"))
            trusted = self.snapshot.config.server.trusted_networks
            view, self.forwarded_for = request_view(
                ledger, raw + (b"?" + query if query else b""), self.headers, client, trusted
            )
            framing = None
            if any(n.lower() in _FRAMED for n, _ in self.headers):
                version = b"1.0" if scope.get("http_version") == "1.0" else b"1.1"
                framing = request_framing(self.headers, version)
            expect_continue(self.headers)  # hypercorn answers 100-continue itself
            declared = framing.length if framing is not None else 0
            match, admission, self.max_body = await admit(
                ledger, self.snapshot, self.method, view, self.headers, declared
            )
            if state.hooks.on_request is None or not await self._on_request(view.path, view.query):
                await self._forward(match, view.query, framing, admission)
        except ProxyError as exc:
            await self._fail(exc)
        except Exception as exc:  # a bug or a surprise: one log line, a 500 or a cut
            await self._fail(ledger.unexpected(exc))
        finally:
            ledger.close()
            if ledger.hooks.on_exchange_end is not None:
                await ledger.on_exchange_end()

    async def _on_request(self, path: str, query: bytes) -> bool:
        """Run ``on_request`` (the body is always streamed); True if it answered itself."""
        ledger = self.ledger
        self.headers, answer = await ledger.on_request(path, query, self.headers, None)
        if answer is None:
            return False
        headers = answer_head(answer, ledger.request_id, close=False)
        ledger.record.bytes_out = len(answer.body)
        await self._respond(answer.status, headers, answer.body)
        return True

    async def _forward(
        self, match: Match, query: bytes, framing: Framing | None, admission: Admission
    ) -> None:
        ledger, snapshot = self.ledger, self.snapshot
        config = snapshot.config
        timeouts = config.timeouts_for(match.route)
        attempts = plan_attempts(ledger, snapshot, match, self.method, self.headers, admission)
        first = b""
        if framing is None:  # no framing header: the first body message decides
            message = await self._receive_body(timeouts.idle)
            if message.get("more_body", False):
                framing, self.first = CHUNKED, message
            else:
                first = bytes(message.get("body", b""))
                framing = Framing("length", len(first)) if first else NO_BODY
                ledger.record.bytes_in = len(first)
                if self.max_body is not None and len(first) > self.max_body:
                    raise PayloadTooLarge(f"request body larger than {self.max_body} bytes")
        elif framing.kind == "length" and framing.length and attempts.gathers(framing.length):
            first = await self._gather(framing.length, timeouts.client_body)
        self.framing = framing
        self.done = framing is NO_BODY or bool(first)
        attempts.set_body(len(first) if self.done else None)
        head_for = heads(
            ledger,
            match,
            query,
            self.method,
            self.headers,
            forwarded_for=self.forwarded_for,
            framing=framing,
            admission=admission,
            proto=b"https" if self.scope.get("scheme") == "https" else b"http",
            body=first,
        )

        call = UpstreamCall(
            ledger,
            self.state.pool,
            self,
            self,
            method=self.method,
            timeouts=timeouts,
            server=config.server,
        )
        await call.forward(attempts, head_for, retry=may_retry(self.method, framing))

    async def _gather(self, length: int, idle: float) -> bytes:
        """The whole ``Content-Length`` body (short: retries may replay it)."""
        data = bytearray()
        more = True
        while more and len(data) < length:
            message = await self._receive_body(idle)
            data += message.get("body", b"")
            more = bool(message.get("more_body", False))
        if len(data) != length:
            raise BadRequest("request body does not match its Content-Length")
        self.ledger.record.bytes_in = length
        return bytes(data)

    # -- RequestBody -----------------------------------------------------------

    async def _receive_body(self, idle: float) -> Message:
        with trio.move_on_after(idle):
            message = await self.receive()
            if message["type"] == "http.disconnect":
                raise ClientGone("client went away during the request body")
            return message
        raise DownstreamTimeout(f"request body stalled for {idle:g} s")

    async def send_rest(self, up: Stream, idle: float) -> bool:
        """Each ``http.request`` message is written upstream before the next ``receive()``."""
        chunked, remaining = self.framing.kind == "chunked", self.framing.length
        rec, limit = self.ledger.record, self.max_body
        while True:
            message = self.first or await self._receive_body(idle)
            self.first = None
            body, more = bytes(message.get("body", b"")), message.get("more_body", False)
            rec.bytes_in += len(body)
            if limit is not None and rec.bytes_in > limit:
                raise PayloadTooLarge(f"request body larger than {limit} bytes")
            if chunked:
                data = encode_chunk_header(len(body)) + body + b"\r\n" if body else b""
                data += b"" if more else LAST_CHUNK
            else:
                remaining -= len(body)
                if remaining < 0 or (remaining and not more):
                    raise BadRequest("request body does not match its Content-Length")
                data = body
            try:
                await up.send_all(data)
            except StreamBroken:
                return False  # its response (or failure) decides
            if not more:
                self.done = True
                return True

    async def wait_gone(self) -> bool:
        while (await self.receive())["type"] != "http.disconnect":
            pass
        return not self.finished

    # -- ResponseSink ----------------------------------------------------------

    async def send_continue(self) -> None:
        """Never asked: hypercorn answers ``Expect: 100-continue`` itself."""

    async def interim(self, event: h11.InformationalResponse) -> None:
        """ASGI has one 1xx message: a 103 becomes ``http.response.early_hint`` (its
        ``Link`` values) where the server offers the extension (hypercorn: HTTP/2 and 3).
        Other 1xx responses can't be relayed and are dropped."""
        if event.status_code != 103 or EARLY_HINT not in self.scope.get("extensions", {}):
            return
        links = [v for n, v in event.headers.raw_items() if n.lower() == b"link"]
        if links:
            await self.send({"type": EARLY_HINT, "links": links})

    async def respond(self, head: ResponseHead, up: UpstreamConnection, call: UpstreamCall) -> bool:
        """The head as ``http.response.start`` (hypercorn frames the body: Content-Length
        for length bodies, else chunked or DATA frames), then the body in reads of at most
        4 KiB, each ``send()``-ed before the next read."""
        status, kind, remaining = head.status, head.framing.kind, head.framing.length
        headers = downstream_response_headers(
            head.headers,
            request_id=self.ledger.request_id,
            framing=NO_BODY,
            keep_length=self.method == b"HEAD" or status == 304,
            close=False,
        )
        if kind == "length":
            headers.append((b"Content-Length", b"%d" % remaining))
        await self._start(status, headers)
        rec, buf, stream, idle = self.ledger.record, self.buf, up.stream, call.timeouts.idle
        data = head.trailing
        scanner, spans = ChunkedScanner(), list[tuple[int, int]]()
        with trio.CancelScope() as idle_scope:
            while True:
                if kind == "none":
                    piece, finished, leftover = b"", True, bool(data)
                elif kind == "length":
                    piece, remaining = data[:remaining], remaining - min(remaining, len(data))
                    finished, leftover = not remaining, len(data) > len(piece)
                elif kind == "chunked":
                    spans.clear()
                    try:
                        end = scanner.feed(data, 0, None, spans)
                    except ChunkedError:
                        raise UpstreamProtocolError(
                            "malformed chunked body from upstream"
                        ) from None
                    piece = b"".join(data[s:e] for s, e in spans)
                    finished, leftover = scanner.done, end < len(data)
                else:  # until close
                    piece, finished, leftover = data, False, False
                rec.bytes_out += len(piece)
                if finished:
                    self.finished = True
                    await self.send({"type": "http.response.body", "body": piece})
                    return not leftover
                if piece:
                    await self.send(
                        {"type": "http.response.body", "body": piece, "more_body": True}
                    )
                idle_scope.deadline = trio.current_time() + idle
                try:
                    n = await stream.recv_into(buf, min(CHUNK, remaining or CHUNK))
                except StreamBroken as exc:
                    raise UpstreamReset(f"upstream failed mid-body: {exc}") from None
                if not n and kind == "close":  # the clean end of a close-delimited body
                    self.finished = True
                    await self.send({"type": "http.response.body", "body": b""})
                    return False
                if not n:
                    raise UpstreamReset("upstream closed the connection mid-body")
                data = bytes(memoryview(buf)[:n])
        raise UpstreamTimeout(f"response body idle for {idle:g} s")

    async def _start(self, status: int, headers: Headers) -> None:
        self.head_sent = True
        self.ledger.record.status = status
        headers = [(n.lower(), v) for n, v in headers]  # ASGI wants lower-case names
        await self.send({"type": "http.response.start", "status": status, "headers": headers})

    async def _respond(self, status: int, headers: Headers, body: bytes) -> None:
        self.finished = True
        await self._start(status, headers)
        await self.send({"type": "http.response.body", "body": body})

    async def _fail(self, exc: ProxyError) -> None:
        rec = self.ledger.record
        self.ledger.failed(exc)
        if self.head_sent or isinstance(exc, ClientGone):
            # No final body message: hypercorn cuts the response, never passes it off as complete.
            rec.status = rec.status or exc.status
            return
        rec.status = exc.status
        body = error_body(exc.type, exc.message, rec.request_id)
        headers = [
            (b"Content-Type", b"application/json"),
            (b"Content-Length", b"%d" % len(body)),
            (b"Cache-Control", b"no-store"),
            (b"X-Request-ID", self.ledger.request_id),
            *exc.headers,
        ]
        await self._respond(exc.status, headers, body)
