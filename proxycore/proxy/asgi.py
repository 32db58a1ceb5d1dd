"""``ProxyApp``: the proxy as an ASGI 3 app for a Trio ASGI server (hypercorn's trio
worker, which also brings HTTP/2 to the client side).

Per request, as ``exchange.py`` does with ASGI in place of the client socket: target check
on ``raw_path`` + ``query_string`` (400; routes match the full raw path, so a mounted app's
routes include the mount prefix), route (404), admission (401/403/405/429/503 with the
error's headers), upstream head, pooled connection (``connect`` timeout, 502). Then two
tasks: the request body from ``receive()`` upstream, each message written before the next
``receive()``, then a watch for ``http.disconnect`` that cancels the exchange at once; and
the response head (h11, client role; ``response`` timeout from the end of the request body,
504), sent as ``http.response.start``, then the body in reads of at most 4 KiB, each
``await send()``-ed before the next read (hypercorn's ``send`` returns once the bytes are
written: backpressure). Chunked upstream bodies are checked and decoded with
``ChunkedScanner``. The upstream connection is reused only if both messages completed and
nothing was left over; a stale pooled one is retried once, as in the native path.

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

Not supported (use the native server): WebSocket (refused: close 1003 before accept,
hypercorn answers 403), relaying 1xx responses, route SSE features (heartbeat, in-band
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
import math
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Final, TypeAlias

import h11
import trio

from .. import errors
from ..config import Config, Timeouts
from ..http.chunked import LAST_CHUNK, ChunkedError, ChunkedScanner, encode_chunk_header
from ..http.headers import (
    CHUNKED,
    NO_BODY,
    Framing,
    Headers,
    connection_tokens,
    downstream_response_headers,
    invalid_header_problem,
    request_framing,
    request_id_from,
    response_framing,
    serialize_head,
    upstream_request_headers,
)
from ..http.request_head import check_head, client_address
from ..http.router import Match
from ..http.target import parse_target
from ..net.pool import Origin, UpstreamConnection, open_connection
from ..net.stream import StreamBroken
from ..observe.accesslog import ExchangeRecord, log_exchange
from ..proxy.exchange import (
    IDEMPOTENT,
    MAX_INTERIM_RESPONSES,
    _add_sse_headers,
    _is_sse,
    _prime_request,
)
from ..proxy.hooks import ExchangeInfo, Hooks, Summary
from ..proxy.hooks import Request as HookRequest
from ..proxy.state import ProxyState
from ..security.admission import Admission

__all__ = ["ProxyApp"]

Scope: TypeAlias = MutableMapping[str, Any]
Message: TypeAlias = MutableMapping[str, Any]
Receive: TypeAlias = Callable[[], Awaitable[Message]]
Send: TypeAlias = Callable[[Message], Awaitable[None]]

log: Final = logging.getLogger("proxycore.asgi")
CHUNK: Final = 4096
_FRAMED: Final = frozenset({b"content-length", b"transfer-encoding"})


class _Stale(Exception):
    """A pooled upstream connection died before any response byte: retry once."""


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
                nursery.start_soon(state.pool.run_sweeper)
                await send({"type": "lifespan.startup.complete"})
                while (await receive())["type"] != "lifespan.shutdown":
                    pass
                nursery.cancel_scope.cancel()
        finally:
            state.pool.close_all()
        await send({"type": "lifespan.shutdown.complete"})


class _Exchange:
    def __init__(self, state: ProxyState, scope: Scope, receive: Receive, send: Send) -> None:
        self.state, self.snapshot = state, state.snapshot
        self.scope, self.receive, self.send = scope, receive, send
        self.method: bytes = scope["method"].encode("ascii")
        self.headers: Headers = [(n, v) for n, v in scope["headers"]]
        peer = scope.get("client")
        rec = self.record = ExchangeRecord(
            method=scope["method"], client=peer[0] if peer else "", started=trio.current_time()
        )
        self.info = ExchangeInfo("", "", rec.method, "", rec.client)
        self.request_id = b""
        self.forwarded_for = rec.client.encode()
        self.head_sent = self.done = self.request_done = False
        self.first: Message | None = None  # a request body message read ahead
        self.max_body: int | None = None
        self.side_error: errors.ProxyError | None = None
        self.nursery: trio.Nursery | None = None
        self.response_scope: trio.CancelScope | None = None
        self.response_wait = 0.0

    async def run(self) -> None:
        rec, release, state, hooks = self.record, None, self.state, self.state.hooks
        rec.request_id = self.info.request_id = request_id_from(self.headers)
        self.request_id = rec.request_id.encode("ascii")
        state.exchanges_in_flight += 1
        try:
            query = bytes(self.scope.get("query_string") or b"")
            raw = bytes(self.scope.get("raw_path") or self.scope["path"].encode("utf-8"))
            view = parse_target(raw + (b"?" + query if query else b""))
            path, query = view.path, view.query
            rec.path = self.info.path = path
            check_head(self.headers)
            address = client_address(
                rec.client, self.headers, self.snapshot.config.server.trusted_networks
            )
            rec.client = self.info.client = address.ip
            self.forwarded_for = address.forwarded_for
            framing = None
            if any(n.lower() in _FRAMED for n, _ in self.headers):
                version = b"1.0" if self.scope.get("http_version") == "1.0" else b"1.1"
                framing = request_framing(self.headers, version)
            expect = [v.strip().lower() for n, v in self.headers if n.lower() == b"expect"]
            if any(v != b"100-continue" for v in expect):  # hypercorn answers 100-continue
                raise errors.ExpectationFailed("only 'Expect: 100-continue' is supported")
            match = self.snapshot.router.match(view)
            if match is None:
                raise errors.NoRoute(f"no route for path {rec.path!r}")
            rec.route = self.info.route = match.route.name
            guard = self.snapshot.security.guard(match.route)
            admission = await guard.admit(self.method, view, self.headers, rec.client)
            release, self.info.identity = admission.release, admission.identity
            self.max_body = guard.max_body_bytes
            if framing and self.max_body is not None and framing.length > self.max_body:
                raise errors.PayloadTooLarge(f"request body larger than {self.max_body} bytes")
            if hooks.on_request is None or not await self._on_request(path, query):
                await self._forward(match, query, framing, admission)
        except errors.ProxyError as exc:
            await self._fail(exc)
        finally:
            if release is not None:
                release()
            rec.duration = trio.current_time() - rec.started
            state.exchanges_in_flight -= 1
            log_exchange(rec)
            state.metrics.observe(rec)
            if hooks.on_exchange_end is not None:
                summary = Summary(
                    rec.status, rec.outcome, rec.bytes_in, rec.bytes_out, rec.ttfb, rec.duration
                )
                try:
                    await hooks.on_exchange_end(self.info, summary)
                except Exception:
                    log.exception("hook on_exchange_end failed (request %s)", rec.request_id)

    def _check_hook_headers(self, name: str, headers: object) -> None:
        """Headers a hook set or changed must be safe to serialize; else a 500 (logged)."""
        problem = invalid_header_problem(headers)
        if problem is not None:
            log.error(
                "hook %s set an invalid header (request %s): %s",
                name,
                self.record.request_id,
                problem,
            )
            raise errors.InternalError(f"the {name} hook set an invalid header")

    async def _call_hook(self, name: str, call: Awaitable[Any]) -> Any:
        try:
            return await call
        except Exception:
            log.exception("hook %s failed (request %s)", name, self.record.request_id)
            raise errors.InternalError(f"the {name} hook failed") from None

    async def _on_request(self, path: str, query: bytes) -> bool:
        """Run ``on_request`` (the body is always streamed); True if it answered itself."""
        assert self.state.hooks.on_request is not None
        request = HookRequest(
            self.info,
            self.record.method,
            path,
            query.decode("latin-1"),
            self.headers,
            None,
        )
        answer = await self._call_hook("on_request", self.state.hooks.on_request(request))
        self._check_hook_headers("on_request", request.headers)
        self.headers = request.headers
        if answer is None:
            return False
        self._check_hook_headers("on_request", answer.headers)
        status: object = answer.status
        if not isinstance(status, int) or not 200 <= status <= 599:
            log.error(
                "hook on_request answered with an invalid status (request %s): %r",
                self.record.request_id,
                status,
            )
            raise errors.InternalError("the on_request hook answered with an invalid status")
        headers = [(n, v) for n, v in answer.headers if n.lower() not in _FRAMED]
        headers += [
            (b"Content-Length", b"%d" % len(answer.body)),
            (b"X-Request-ID", self.request_id),
        ]
        self.record.status, self.record.outcome = answer.status, "answered_by_hook"
        self.record.bytes_out = len(answer.body)
        await self._respond(answer.status, headers, answer.body)
        return True

    # -- upstream ------------------------------------------------------------

    async def _forward(
        self, match: Match, query: bytes, framing: Framing | None, admission: Admission
    ) -> None:
        route, up = match.route, match.route.target
        timeouts = self.snapshot.config.timeouts_for(route)
        self.record.upstream = f"{up.scheme}://{up.host_header}"
        first = b""
        if framing is None:  # no framing header: the first body message decides
            self.first = await self._receive_body(timeouts.idle)
            if self.first.get("more_body", False):
                framing = CHUNKED
            else:
                first, self.first = bytes(self.first.get("body", b"")), None
                framing = Framing("length", len(first)) if first else NO_BODY
                self.record.bytes_in = len(first)
        host = up.host_header.encode("ascii")
        if route.preserve_host:
            host = next((v for n, v in self.headers if n.lower() == b"host"), host)
        headers = upstream_request_headers(
            self.headers,
            host=host,
            forwarded_for=self.forwarded_for,
            request_id=self.request_id,
            framing=framing,
            identity_encoding=route.accept_encoding == "identity",
            drop=admission.drop,
            extra=admission.extra,
        )
        start = b"%s %s%s HTTP/1.1\r\n" % (self.method, match.upstream_path, query)
        head = serialize_head(start, headers) + first
        self.request_done = framing is NO_BODY or bool(first)
        origin: Origin = (up.scheme, up.host, up.port, route.ca_file)
        deadline = self.record.started + timeouts.total if timeouts.total else math.inf
        with trio.CancelScope(deadline=deadline) as total:
            for attempt in (1, 2):
                conn = await self._connect(origin, timeouts.connect)
                try:
                    await self._exchange(conn, head, framing, timeouts)
                    break
                except _Stale:
                    if attempt == 2 or framing is not NO_BODY or self.method not in IDEMPOTENT:
                        raise errors.UpstreamReset("upstream closed the connection") from None
        if total.cancelled_caught:
            raise errors.UpstreamTimeout(
                f"exchange exceeded the total timeout ({timeouts.total:g} s)"
            )

    async def _connect(self, origin: Origin, connect_s: float) -> UpstreamConnection:
        conn = self.state.pool.checkout(origin)
        if conn is not None:
            return conn
        # The client learns which route failed; the upstream's address is for the log.
        _, host, port, _ = origin
        where = f"the upstream of route {self.record.route!r}"
        with trio.move_on_after(connect_s):
            try:
                return await open_connection(origin)
            except OSError as exc:
                raise errors.UpstreamConnectError(
                    f"cannot connect to {where}: {errors.connect_reason(exc)}",
                    detail=f"{host}:{port}: {exc.strerror or exc}",
                ) from None
            except StreamBroken as exc:
                raise errors.UpstreamConnectError(
                    f"{where}: {errors.public_reason(str(exc))}", detail=f"{host}:{port}: {exc}"
                ) from None
        raise errors.UpstreamConnectTimeout(
            f"connecting to {where} timed out", detail=f"{host}:{port}: connect timed out"
        )

    async def _exchange(
        self, conn: UpstreamConnection, head: bytes, framing: Framing, timeouts: Timeouts
    ) -> None:
        pool, reusable = self.state.pool, False
        pool.mark_busy(conn.origin)
        try:
            try:
                await conn.stream.send_all(head)
            except StreamBroken:
                if conn.uses:
                    raise _Stale from None
                raise errors.UpstreamReset("upstream closed the connection") from None
            main_error: errors.ProxyError | _Stale | None = None
            async with trio.open_nursery() as nursery:
                self.nursery = nursery
                nursery.start_soon(self._client_side, conn, framing, timeouts.idle)
                try:
                    reusable = await self._upstream_side(conn, timeouts)
                except (errors.ProxyError, _Stale) as exc:  # kept out of the nursery's group
                    main_error = exc
                finally:
                    self.nursery = None
                    nursery.cancel_scope.cancel()
            if self.side_error is not None:
                raise self.side_error
            if main_error is not None:
                raise main_error
        finally:
            pool.mark_free(conn.origin)
            if reusable and self.request_done:
                pool.checkin(conn)
            else:
                conn.close()

    async def _receive_body(self, idle: float) -> Message:
        with trio.move_on_after(idle):
            message = await self.receive()
            if message["type"] == "http.disconnect":
                raise errors.ClientGone("client went away during the request body")
            return message
        raise errors.DownstreamTimeout(f"request body stalled for {idle:g} s")

    async def _client_side(self, conn: UpstreamConnection, framing: Framing, idle: float) -> None:
        """Pump the request body upstream, then cancel the exchange on ``http.disconnect``."""
        try:
            if not self.request_done and await self._pump_request(conn, framing, idle):
                self.request_done = True
                if self.response_scope is not None:
                    self.response_scope.deadline = trio.current_time() + self.response_wait
        except errors.ProxyError as exc:
            self.side_error = exc
        else:
            while (await self.receive())["type"] != "http.disconnect":
                pass
            if self.done:
                return
            self.side_error = errors.ClientGone("client went away")
        if self.nursery is not None:
            self.nursery.cancel_scope.cancel()

    async def _pump_request(self, conn: UpstreamConnection, framing: Framing, idle: float) -> bool:
        """True once the whole body went upstream; False if the upstream stopped reading."""
        chunked, remaining = framing.kind == "chunked", framing.length
        rec, limit = self.record, self.max_body
        while True:
            message = self.first or await self._receive_body(idle)
            self.first = None
            body, more = bytes(message.get("body", b"")), message.get("more_body", False)
            rec.bytes_in += len(body)
            if limit is not None and rec.bytes_in > limit:
                raise errors.PayloadTooLarge(f"request body larger than {limit} bytes")
            if chunked:
                data = encode_chunk_header(len(body)) + body + b"\r\n" if body else b""
                data += b"" if more else LAST_CHUNK
            else:
                remaining -= len(body)
                if remaining < 0 or (remaining and not more):
                    raise errors.BadRequest("request body does not match its Content-Length")
                data = body
            try:
                await conn.stream.send_all(data)
            except StreamBroken:
                return False  # its response (or failure) decides
            if not more:
                return True

    async def _read_head(
        self, conn: UpstreamConnection, wait_s: float, buf: bytearray
    ) -> tuple[h11.Response, bytes]:
        limit = self.snapshot.config.server.max_header_bytes
        h = h11.Connection(h11.CLIENT, max_incomplete_event_size=limit)
        h.send(_prime_request(self.method))  # h11 needs the method (HEAD changes framing)
        got = interim = 0
        self.response_wait = wait_s
        with trio.CancelScope() as self.response_scope:
            if self.request_done:  # else: started when the request body is complete
                self.response_scope.deadline = trio.current_time() + wait_s
            while True:
                try:
                    event = h.next_event()
                except h11.RemoteProtocolError:
                    raise errors.UpstreamProtocolError(
                        "malformed response head from upstream"
                    ) from None
                if event is h11.NEED_DATA:
                    try:
                        n = await conn.stream.recv_into(buf, CHUNK)
                    except StreamBroken:
                        n = 0
                    if not n:
                        if not got and conn.uses:
                            raise _Stale
                        raise errors.UpstreamReset(
                            "upstream closed the connection before responding"
                        )
                    if not got:
                        self.record.ttfb = trio.current_time() - self.record.started
                    got += n
                    h.receive_data(bytes(buf[:n]))
                elif isinstance(event, h11.InformationalResponse):  # ASGI can't relay them
                    interim += 1
                    if interim > MAX_INTERIM_RESPONSES or event.status_code == 101:
                        raise errors.UpstreamProtocolError("unexpected 1xx responses from upstream")
                else:
                    assert isinstance(event, h11.Response)
                    trailing = h.trailing_data[0]
                    if got - len(trailing) > limit:
                        raise errors.UpstreamProtocolError("upstream response head too large")
                    if len(event.headers) > self.snapshot.config.server.max_header_count:
                        raise errors.UpstreamProtocolError(
                            "upstream response has too many header fields"
                        )
                    self.response_scope = None
                    return event, trailing
        where = f"the upstream of route {self.record.route!r}"
        raise errors.UpstreamTimeout(f"no response head from {where} within {wait_s:g} s")

    async def _upstream_side(self, conn: UpstreamConnection, timeouts: Timeouts) -> bool:
        """Relay the response; True if the upstream connection may be reused."""
        buf = bytearray(CHUNK)
        response, data = await self._read_head(conn, timeouts.response, buf)
        status = self.record.status = response.status_code
        up_headers: Headers = list(response.headers.raw_items())
        if self.state.hooks.on_response_head is not None:
            hook = self.state.hooks.on_response_head(self.info, status, up_headers)
            await self._call_hook("on_response_head", hook)
            self._check_hook_headers("on_response_head", up_headers)
        framing = response_framing(self.method, status, up_headers)
        kind, remaining = framing.kind, framing.length
        reusable = response.http_version == b"1.1" and b"close" not in connection_tokens(up_headers)
        if kind == "chunked" and any(n.lower() == b"content-length" for n, _ in up_headers):
            reusable = False  # Transfer-Encoding wins, but never trust this connection again
        if kind != "none" and _is_sse(up_headers):
            _add_sse_headers(up_headers)
        keep_length = self.method == b"HEAD" or status == 304
        headers = downstream_response_headers(
            up_headers,
            request_id=self.request_id,
            framing=NO_BODY,
            keep_length=keep_length,
            close=False,
        )
        if kind == "length":  # else hypercorn frames the body
            headers.append((b"Content-Length", b"%d" % remaining))
        await self._start(status, headers)
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
                        raise errors.UpstreamProtocolError(
                            "malformed chunked body from upstream"
                        ) from None
                    piece = b"".join(data[s:e] for s, e in spans)
                    finished, leftover = scanner.done, end < len(data)
                else:  # until close
                    piece, finished, leftover = data, False, False
                self.record.bytes_out += len(piece)
                if finished:
                    self.done = True
                    await self.send({"type": "http.response.body", "body": piece})
                    return reusable and not leftover
                if piece:
                    await self.send(
                        {"type": "http.response.body", "body": piece, "more_body": True}
                    )
                idle_scope.deadline = trio.current_time() + timeouts.idle
                try:
                    n = await conn.stream.recv_into(buf, min(CHUNK, remaining or CHUNK))
                except StreamBroken as exc:
                    raise errors.UpstreamReset(f"upstream failed mid-body: {exc}") from None
                if not n and kind == "close":  # the clean end of a close-delimited body
                    self.done = True
                    await self.send({"type": "http.response.body", "body": b""})
                    return False
                if not n:
                    raise errors.UpstreamReset("upstream closed the connection mid-body")
                data = bytes(memoryview(buf)[:n])
        raise errors.UpstreamTimeout(f"response body idle for {timeouts.idle:g} s")

    # -- client --------------------------------------------------------------

    async def _start(self, status: int, headers: Headers) -> None:
        self.head_sent = True  # ASGI wants lower-case names
        headers = [(n.lower(), v) for n, v in headers]
        await self.send({"type": "http.response.start", "status": status, "headers": headers})

    async def _respond(self, status: int, headers: Headers, body: bytes) -> None:
        self.done = True
        await self._start(status, headers)
        await self.send({"type": "http.response.body", "body": body})

    async def _fail(self, exc: errors.ProxyError) -> None:
        rec = self.record
        rec.outcome = exc.outcome
        rec.detail = exc.detail
        if isinstance(exc, errors.UpstreamError):
            rec.error_kind = exc.kind
        if self.head_sent or isinstance(exc, errors.ClientGone):
            # No final body message: hypercorn cuts the response, never passes it off as complete.
            rec.status = rec.status or exc.status
            return
        rec.status = exc.status
        body = errors.error_body(exc.type, exc.message, rec.request_id)
        headers = [
            (b"Content-Type", b"application/json"),
            (b"Content-Length", b"%d" % len(body)),
            (b"Cache-Control", b"no-store"),
            (b"X-Request-ID", self.request_id),
            *exc.headers,
        ]
        await self._respond(exc.status, headers, body)
