"""One request/response exchange: client -> route -> upstream -> client.

The path of one request (see docs/architecture.md):

1. ``run`` checks the target, the request framing and ``Expect``, and finds
   the route (the config snapshot was taken when the exchange started).
2. ``_forward`` builds the upstream head, takes a pooled connection or opens
   one (``connect`` timeout) and writes head plus the body bytes in hand in
   one send.
3. Two tasks then run in one nursery: ``_client_side`` pumps the rest of the
   request body upstream and afterwards watches the client for EOF (a client
   that goes away cancels the exchange at once); ``_upstream_side`` reads the
   response head (``response`` timeout), writes the client head with the
   first body bytes, and pumps the body (``idle`` timeout between reads).
4. The upstream connection goes back to the pool only if both messages
   completed cleanly and nothing was left over; otherwise it is closed.

Every proxy-made error goes through ``_fail``: before the response head was
sent it becomes a JSON error response; after, the client connection is cut
without a clean end so the client sees a truncated body, never a falsely
complete one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Final, TypeVar

import h11
import trio

from ..config import Route, Timeouts
from ..errors import (
    BadRequest,
    ClientGone,
    DownstreamError,
    DownstreamTimeout,
    ExpectationFailed,
    InternalError,
    MethodNotAllowed,
    NoRoute,
    PayloadTooLarge,
    ProxyError,
    UpstreamConnectError,
    UpstreamConnectTimeout,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamReset,
    UpstreamStatus,
    UpstreamTimeout,
    connect_reason,
    public_reason,
)
from ..http.chunked import ChunkedError, ChunkedScanner, encode_chunk_header
from ..http.headers import (
    CHUNKED,
    NO_BODY,
    UNTIL_CLOSE,
    Framing,
    Headers,
    connection_tokens,
    downstream_response_headers,
    invalid_header_problem,
    reason_phrase,
    request_framing,
    request_id_from,
    response_framing,
    serialize_head,
    upstream_request_headers,
)
from ..http.request_head import check_head, client_address
from ..http.router import Match
from ..http.sse import SSEEvent, SSEParser, error_event, is_event_stream
from ..http.target import TargetView, parse_target
from ..net.pipe import (
    CHUNK,
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
from ..net.pool import Origin, UpstreamConnection, open_connection
from ..net.stream import StreamBroken, TLSStream
from ..observe.accesslog import ExchangeRecord, log_exchange
from ..proxy.hooks import ExchangeInfo, Hooks, Summary
from ..proxy.hooks import Request as HookRequest
from ..proxy.sse_relay import SSERelay

if TYPE_CHECKING:
    from collections.abc import Callable

    from ..proxy.connection import ClientConnection
    from ..proxy.state import Snapshot
    from ..security.admission import Admission

__all__ = ["Exchange"]

T = TypeVar("T")
log: Final = logging.getLogger("proxycore.exchange")

CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"
_FRAMING_NAMES: Final = frozenset({b"content-length", b"transfer-encoding", b"connection"})
_TRANSCRIPT_OUTCOMES: Final = {
    "complete": "complete",
    "client_gone": "client_gone",
    "upstream_timeout": "timeout",
}
MAX_INTERIM_RESPONSES: Final = 10
#: How long a response head may take before the client is watched for EOF by a task.
FAST_WAIT_S: Final = 0.005
IDEMPOTENT: Final = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})


def _is_sse(headers: Headers) -> bool:
    return is_event_stream(next((v for n, v in headers if n.lower() == b"content-type"), None))


def _add_sse_headers(headers: Headers) -> None:
    """Tell every cache and proxy in between not to buffer or transform the stream."""
    names = {n.lower() for n, _ in headers}
    if b"cache-control" not in names:
        headers.append((b"Cache-Control", b"no-cache, no-transform"))
    if b"x-accel-buffering" not in names:
        headers.append((b"X-Accel-Buffering", b"no"))


def _pipe_error(exc: Exception, idle: float) -> UpstreamError:
    if isinstance(exc, IdleTimeout):
        return UpstreamTimeout(f"response body idle for {idle:g} s")
    if isinstance(exc, FramingError):
        return UpstreamProtocolError("malformed chunked body from upstream")
    return UpstreamReset(f"upstream failed mid-body: {exc}")


_PRIMES: dict[bytes, h11.Request] = {}


def _prime_request(method: bytes) -> h11.Request:
    """A minimal request for h11 to see as sent (built once per method)."""
    request = _PRIMES.get(method)
    if request is None:
        request = h11.Request(method=method, target=b"/", headers=[(b"Host", b"upstream")])
        if len(_PRIMES) < 64:
            _PRIMES[method] = request
    return request


class _StaleConnection(Exception):
    """A reused upstream connection died before any response byte: retry once."""


class Exchange:
    """Proxies one request. ``run`` returns whether the client connection may be reused."""

    def __init__(
        self,
        client: ClientConnection,
        request: h11.Request,
        body_start: bytes,
        snapshot: Snapshot,
    ) -> None:
        self.client = client
        self.request = request
        self.headers: Headers = list(request.headers.raw_items())
        self.body_start = body_start
        self.snapshot = snapshot
        self.method = request.method
        self.client_11 = request.http_version == b"1.1"
        self.record = ExchangeRecord(
            method=request.method.decode("ascii", "replace"),
            client=client.peer_ip,
            started=trio.current_time(),
        )
        self.request_id = b""
        #: Set by ``_preflight``: the client address decisions use, and X-Forwarded-For.
        self.client_ip = client.peer_ip
        self.forwarded_for = client.peer_ip.encode()
        self.head_sent = False
        self.request_done = False
        self.close_client = not self.client_11
        self.side_error: ProxyError | None = None
        self.route: Route | None = None
        self.hooks: Hooks = client.state.hooks
        self.info = ExchangeInfo(
            request_id="",
            route="",
            method=self.record.method,
            path="",
            client=client.peer_ip,
        )
        self._wall_start = time.time()
        self._tap: SSEParser | None = None
        self._sse_errors = False
        self._remaining = 0
        self._scanner = ChunkedScanner()
        self._max_body: int | None = None
        self._chunked_in = False
        self._response_scope: trio.CancelScope | None = None
        self._response_wait = 0.0
        self._nursery: trio.Nursery | None = None
        self._client_task = False
        self._side_args: tuple[UpstreamConnection, Framing, float] | None = None

    # -- top level ---------------------------------------------------------

    async def run(self) -> bool:
        rec = self.record
        rid = request_id_from(self.headers)
        rec.request_id = self.info.request_id = rid
        self.request_id = rid.encode("ascii")
        state = self.client.state
        state.exchanges_in_flight += 1
        release: Callable[[], None] | None = None
        try:
            view = self._preflight()
            path, query = view.path, view.query
            framing = request_framing(self.headers, self.request.http_version)
            self._split_body_start(framing)
            tokens = connection_tokens(self.headers)
            if b"close" in tokens:
                self.close_client = True
            upgrade = b"upgrade" in tokens and self._has(b"upgrade")
            expect_continue = self._expect_continue(framing)
            match = self.snapshot.router.match(view)
            if match is None:
                raise NoRoute(f"no route for path {rec.path!r}")
            rec.route = match.route.name
            self.route = match.route
            self._sse_errors = match.route.sse.errors and self._accepts_event_stream()
            guard = self.snapshot.security.guard(match.route)
            admission = await guard.admit(self.method, view, self.headers, self.client_ip)
            release = admission.release
            self.info.route, self.info.identity = rec.route, admission.identity
            limit = guard.max_body_bytes
            if limit is not None:
                self._max_body = limit
                size = framing.length if framing.kind == "length" else self._scanner.declared_bytes
                if size > limit:
                    raise PayloadTooLarge(f"request body larger than {limit} bytes")
            if upgrade:
                if not match.route.websocket or not self._is_websocket_upgrade():
                    raise BadRequest("protocol upgrades are not enabled on this route")
                # An upgrade is done with the connection: after its session, or after
                # the hook's answer in its place.
                self.close_client = True
            # The hook runs for upgrades as for any request: its answer (the upgrade never
            # happens) or its headers (the upstream handshake's).
            if self.hooks.on_request is not None and await self._on_request(path, query):
                return not self.close_client
            if upgrade:
                from ..proxy.websocket import relay_websocket

                await relay_websocket(self, match, query, admission)
                return not self.close_client
            await self._forward(match, query, framing, expect_continue, admission)
        except ProxyError as exc:
            await self._fail(exc)
        finally:
            if release is not None:
                release()
            state.exchanges_in_flight -= 1
            rec.duration = trio.current_time() - rec.started
            log_exchange(rec)
            state.metrics.observe(rec)
            if self._tap is not None and self.route is not None and self.route.sse.transcript:
                self._write_transcript(self.route.sse.transcript)
            if self.hooks.on_exchange_end is not None:
                await self._on_exchange_end()
        return not self.close_client

    def _preflight(self) -> TargetView:
        """The one view of the request every decision uses: the normalized target, the
        checked head (singleton fields, Host) and the client address."""
        if self.method == b"CONNECT" and not self.request.target.startswith(b"/"):
            self.close_client = True  # an authority-form target: nothing after it is ours
            raise MethodNotAllowed(
                "CONNECT is not allowed: this is a reverse proxy",
                headers=[(b"Allow", b"GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS")],
            )
        view = parse_target(self.request.target)
        self.record.path = self.info.path = view.path
        check_head(self.headers)
        address = client_address(
            self.client.peer_ip, self.headers, self.snapshot.config.server.trusted_networks
        )
        self.client_ip = self.record.client = self.info.client = address.ip
        self.forwarded_for = address.forwarded_for
        return view

    # -- hooks, SSE tap ------------------------------------------------------

    def _accepts_event_stream(self) -> bool:
        return any(
            n.lower() == b"accept" and b"text/event-stream" in v.lower() for n, v in self.headers
        )

    async def _call_hook(self, name: str, call: Awaitable[T]) -> T:
        """Await a hook; its failure becomes a 500 (logged with the request id)."""
        try:
            return await call
        except Exception:
            log.exception("hook %s failed (request %s)", name, self.record.request_id)
            raise InternalError(f"the {name} hook failed") from None

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
            raise InternalError(f"the {name} hook set an invalid header")

    async def _on_request(self, path: str, query: bytes) -> bool:
        """Run ``on_request``; True if it answered the client itself."""
        assert self.hooks.on_request is not None
        request = HookRequest(
            exchange=self.info,
            method=self.record.method,
            path=path,
            query=query.decode("latin-1"),
            headers=self.headers,
            body=self._decoded_body() if self.request_done else None,
        )
        answer = await self._call_hook("on_request", self.hooks.on_request(request))
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
            raise InternalError("the on_request hook answered with an invalid status")
        self.record.outcome = "answered_by_hook"
        headers = [(n, v) for n, v in answer.headers if n.lower() not in _FRAMING_NAMES]
        headers += [
            (b"Content-Length", b"%d" % len(answer.body)),
            (b"X-Request-ID", self.request_id),
        ]
        if not self.request_done:
            self.close_client = True
        if self.close_client:
            headers.append((b"Connection", b"close"))
        start = b"HTTP/1.1 %d %s\r\n" % (answer.status, reason_phrase(answer.status))
        body = b"" if self.method == b"HEAD" else answer.body
        await self._send_head(serialize_head(start, headers) + body, answer.status)
        self.record.bytes_out = len(body)
        return True

    def _decoded_body(self) -> bytes:
        """The request body in hand, without chunked framing."""
        if not self._chunked_in:
            return self.body_start
        spans: list[tuple[int, int]] = []
        ChunkedScanner().feed(self.body_start, 0, None, spans)
        return b"".join(self.body_start[s:e] for s, e in spans)

    async def _on_exchange_end(self) -> None:
        assert self.hooks.on_exchange_end is not None
        rec, tap = self.record, self._tap
        summary = Summary(
            status=rec.status,
            outcome=rec.outcome,
            bytes_in=rec.bytes_in,
            bytes_out=rec.bytes_out,
            ttfb=rec.ttfb,
            duration=rec.duration,
            events=None if tap is None else list(tap.events),
            events_truncated=False if tap is None else tap.truncated,
        )
        try:
            await self.hooks.on_exchange_end(self.info, summary)
        except Exception:
            log.exception("hook on_exchange_end failed (request %s)", rec.request_id)

    def _write_transcript(self, path: str) -> None:
        tap, rec = self._tap, self.record
        assert tap is not None
        outcome = _TRANSCRIPT_OUTCOMES.get(rec.outcome, "upstream_failed")
        record: dict[str, object] = {
            "request_id": rec.request_id,
            "route": rec.route,
            "identity": self.info.identity,
            "method": rec.method,
            "path": rec.path,
            "started": self._wall_start,
            "ttfb_ms": None if rec.ttfb is None else round(rec.ttfb * 1000, 3),
            "duration_ms": round(rec.duration * 1000, 3),
            "status": rec.status,
            "events_count": tap.count,
            "events": [event.as_dict() for event in tap.events],
            "truncated": tap.truncated,
            "outcome": outcome,
        }
        self.client.state.transcripts.submit(path, record)

    def _is_websocket_upgrade(self) -> bool:
        return self.method == b"GET" and any(
            n.lower() == b"upgrade" and v.strip().lower() == b"websocket" for n, v in self.headers
        )

    def _has(self, name: bytes) -> bool:
        return any(n.lower() == name for n, _ in self.headers)

    def _expect_continue(self, framing: Framing) -> bool:
        values = [v.strip().lower() for n, v in self.headers if n.lower() == b"expect"]
        if not values:
            return False
        if any(v != b"100-continue" for v in values):
            raise ExpectationFailed("only 'Expect: 100-continue' is supported")
        return self.client_11 and not self.request_done

    def _split_body_start(self, framing: Framing) -> None:
        """Split the bytes read past the head into this body's start and what follows."""
        data = self.body_start
        if framing.kind == "length":
            self.body_start = data[: framing.length]
            self.client.pending = data[framing.length :]
            self._remaining = framing.length - len(self.body_start)
            self.request_done = self._remaining == 0
        elif framing.kind == "chunked":
            self._chunked_in = True
            self._scanner = ChunkedScanner()
            try:
                end = self._scanner.feed(data)
            except ChunkedError:
                raise BadRequest("malformed chunked request body") from None
            # Request trailers are dropped (validated, never forwarded): a trailer field
            # could carry a header the proxy strips or owns (identity, credentials, ...).
            keep = self._scanner.trailer_start
            self.request_done = self._scanner.done
            self.body_start = data[:keep] + b"\r\n" if self.request_done else data[:keep]
            self.client.pending = data[end:]
        else:
            self.body_start = b""
            self.client.pending = data
            self.request_done = True
        self.record.bytes_in = len(self.body_start)
        if not self.request_done:
            # Until the body is read to its end we don't know where the next request starts.
            self.client.pending = b""

    # -- upstream ----------------------------------------------------------

    async def _forward(
        self,
        match: Match,
        query: bytes,
        framing: Framing,
        expect_continue: bool,
        admission: Admission,
    ) -> None:
        route = match.route
        up = route.target
        timeouts = self.snapshot.config.timeouts_for(route)
        self.record.upstream = f"{up.scheme}://{up.host_header}"
        headers = upstream_request_headers(
            self.headers,
            host=self._host_header(route.preserve_host, up.host_header),
            forwarded_for=self.forwarded_for,
            request_id=self.request_id,
            framing=framing,
            identity_encoding=route.accept_encoding == "identity",
            drop=admission.drop,
            extra=admission.extra,
        )
        start = b"%s %s%s HTTP/1.1\r\n" % (self.method, match.upstream_path, query)
        head = serialize_head(start, headers) + self.body_start
        origin: Origin = (up.scheme, up.host, up.port, route.ca_file)
        if not timeouts.total:
            await self._attempts(origin, head, framing, expect_continue, timeouts)
            return
        with trio.CancelScope(deadline=self.record.started + timeouts.total) as total:
            await self._attempts(origin, head, framing, expect_continue, timeouts)
        if total.cancelled_caught:
            raise UpstreamTimeout(
                f"exchange exceeded the total timeout of route {route.name!r} "
                f"({timeouts.total:g} s)"
            )

    async def _attempts(
        self,
        origin: Origin,
        head: bytes,
        framing: Framing,
        expect_continue: bool,
        timeouts: Timeouts,
    ) -> None:
        """One exchange, retried once on a fresh connection if a pooled one was stale."""
        retried = False
        while True:
            conn = await self._connect(origin, timeouts.connect)
            try:
                await self._exchange(conn, head, framing, expect_continue, timeouts)
            except _StaleConnection:
                if retried or not self._may_retry(framing):
                    raise UpstreamReset("upstream closed the connection") from None
                retried = True
                continue
            return

    def _host_header(self, preserve: bool, upstream_host: str) -> bytes:
        if preserve:
            for name, value in self.headers:
                if name.lower() == b"host":
                    return value
        return upstream_host.encode("ascii")

    def _may_retry(self, framing: Framing) -> bool:
        return framing is NO_BODY and self.method in IDEMPOTENT

    async def _connect(self, origin: Origin, connect_s: float) -> UpstreamConnection:
        pool = self.client.state.pool
        conn = pool.checkout(origin)
        if conn is not None:
            return conn
        # The client learns which route failed; the upstream's address is for the log.
        _, host, port, _ = origin
        where = f"the upstream of route {self.record.route!r}"
        with trio.move_on_after(connect_s):
            try:
                return await open_connection(origin)
            except OSError as exc:
                raise UpstreamConnectError(
                    f"cannot connect to {where}: {connect_reason(exc)}",
                    detail=f"{host}:{port}: {exc.strerror or exc}",
                ) from None
            except StreamBroken as exc:
                raise UpstreamConnectError(
                    f"{where}: {public_reason(str(exc))}", detail=f"{host}:{port}: {exc}"
                ) from None
        raise UpstreamConnectTimeout(
            f"connecting to {where} timed out", detail=f"{host}:{port}: connect timed out"
        )

    async def _exchange(
        self,
        conn: UpstreamConnection,
        head: bytes,
        framing: Framing,
        expect_continue: bool,
        timeouts: Timeouts,
    ) -> None:
        reusable = False
        pool = self.client.state.pool
        pool.mark_busy(conn.origin)
        try:
            try:
                await conn.stream.send_all(head)
            except StreamBroken:
                if conn.uses:
                    raise _StaleConnection from None
                raise UpstreamReset("upstream closed the connection") from None
            if expect_continue:
                await self._send_client(CONTINUE)
            main_error: ProxyError | _StaleConnection | None = None
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self._side_args = (conn, framing, timeouts.idle)
                self._client_task = False
                if not self.request_done or isinstance(conn.stream, TLSStream):
                    self._watch_client()
                try:
                    reusable = await self._upstream_side(conn, timeouts)
                except (ProxyError, _StaleConnection) as exc:
                    # Kept out of the nursery: it would wrap it in an ExceptionGroup.
                    main_error = exc
                finally:
                    self._nursery = None
                    nursery.cancel_scope.cancel()
            if self.side_error is not None:
                raise self.side_error
            if main_error is not None:
                raise main_error
            if not self.request_done:
                # The response ended before the request body: we can't find the next request.
                self.close_client = True
                reusable = False
        finally:
            pool.mark_free(conn.origin)
            if reusable and self.request_done:
                pool.checkin(conn)
            else:
                conn.close()

    async def _client_side(self, conn: UpstreamConnection, framing: Framing, idle: float) -> None:
        """Pump the rest of the request body upstream, then watch the client for EOF."""
        client = self.client
        try:
            if not self.request_done:
                if framing.kind == "length":
                    buf = bulk_buffer(self._remaining, client.rbuf)
                    moved = await pump_length(
                        client.stream, conn.stream, buf, self._remaining, idle
                    )
                else:
                    moved, client.pending = await pump_chunked(
                        client.stream,
                        conn.stream,
                        client.rbuf,
                        self._scanner,
                        idle,
                        max_payload=self._max_body,
                        drop_trailers=True,
                    )
                self.record.bytes_in += moved
                self.request_done = True
                self._start_response_timer()
        except SourceFailed as exc:
            self.record.bytes_in += exc.moved
            self._abort(ClientGone("client went away during the request body"))
            return
        except FramingError as exc:
            self.record.bytes_in += exc.moved
            self._abort(BadRequest("malformed chunked request body"))
            return
        except BodyTooLarge as exc:
            self.record.bytes_in += exc.moved
            self._abort(PayloadTooLarge(f"request body larger than {self._max_body} bytes"))
            return
        except IdleTimeout as exc:
            self.record.bytes_in += exc.moved
            self._abort(DownstreamTimeout(f"request body stalled for {idle:g} s"))
            return
        except SinkFailed as exc:
            self.record.bytes_in += exc.moved
            # The upstream stopped reading; its response (or failure) decides.
            return
        if not client.pending and await client.wait_closed():
            self._abort(ClientGone("client went away"))

    async def _recv_soon(self, conn: UpstreamConnection, buf: bytearray) -> int:
        """Read, starting the client watch if nothing came within ``FAST_WAIT_S``."""
        with trio.move_on_after(FAST_WAIT_S):
            return await conn.stream.recv_into(buf, CHUNK)
        self._watch_client()
        return await conn.stream.recv_into(buf, CHUNK)

    def _start_response_timer(self) -> None:
        scope = self._response_scope
        if scope is not None and self.request_done:
            scope.deadline = trio.current_time() + self._response_wait

    def _watch_client(self) -> None:
        """Start the client side (request body pump, then EOF watch) if not yet running.

        Started at once when a request body is still coming; otherwise only when
        the exchange is about to wait a while (the response head is slow, or a
        body must be pumped): a task per small exchange costs more than the
        exchange itself (~110 us here).
        """
        nursery, args = self._nursery, self._side_args
        if nursery is not None and args is not None and not self._client_task:
            self._client_task = True
            nursery.start_soon(self._client_side, *args)

    def _abort(self, exc: ProxyError) -> None:
        self.side_error = exc
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    async def _read_response_head(
        self, conn: UpstreamConnection, wait_s: float
    ) -> tuple[h11.Response, bytes]:
        limit = self.snapshot.config.server.max_header_bytes
        h = h11.Connection(h11.CLIENT, max_incomplete_event_size=limit)
        # h11 parses a response as the answer to the request it saw sent: give it
        # the method (HEAD changes framing); the real head was serialized by us.
        h.send(_prime_request(self.method))
        buf = self.client.wbuf
        got = 0
        interim = 0
        # The wait for the head starts once the request is complete: a slow upload
        # is the client's (``idle`` bounds it), not the upstream's.
        self._response_wait = wait_s
        with trio.CancelScope() as self._response_scope:
            self._start_response_timer()
            while True:
                try:
                    event = h.next_event()
                except h11.RemoteProtocolError:
                    raise UpstreamProtocolError("malformed response head from upstream") from None
                if event is h11.NEED_DATA:
                    try:
                        if self._client_task:
                            n = await conn.stream.recv_into(buf, CHUNK)
                        else:
                            n = await self._recv_soon(conn, buf)
                    except StreamBroken:
                        n = 0
                    if not n:
                        if not got and conn.uses:
                            raise _StaleConnection
                        raise UpstreamReset("upstream closed the connection before responding")
                    if not got:
                        self.record.ttfb = trio.current_time() - self.record.started
                    got += n
                    h.receive_data(bytes(buf[:n]))
                    continue
                if isinstance(event, h11.InformationalResponse):
                    interim += 1
                    await self._interim(event, interim)
                    continue
                assert isinstance(event, h11.Response)
                trailing = h.trailing_data[0]
                if got - len(trailing) > limit:
                    raise UpstreamProtocolError("upstream response head too large")
                if len(event.headers) > self.snapshot.config.server.max_header_count:
                    raise UpstreamProtocolError("upstream response has too many header fields")
                self._response_scope = None
                return event, trailing
        where = f"the upstream of route {self.record.route!r}"
        raise UpstreamTimeout(f"no response head from {where} within {wait_s:g} s")

    async def _interim(self, event: h11.InformationalResponse, count: int) -> None:
        if count > MAX_INTERIM_RESPONSES:
            raise UpstreamProtocolError("too many 1xx responses from upstream")
        if event.status_code == 101:
            raise UpstreamProtocolError("upstream switched protocols without an upgrade request")
        if event.status_code == 100 or not self.client_11:
            return  # the proxy answers Expect itself; HTTP/1.0 clients get no 1xx
        headers = downstream_response_headers(
            list(event.headers.raw_items()),
            request_id=self.request_id,
            framing=NO_BODY,
            keep_length=False,
            close=False,
        )
        await self._send_client(
            serialize_head(b"HTTP/1.1 %d %s\r\n" % (event.status_code, event.reason), headers)
        )

    async def _upstream_side(self, conn: UpstreamConnection, timeouts: Timeouts) -> bool:
        """Relay the response; return True if the upstream connection may be reused."""
        response, trailing = await self._read_response_head(conn, timeouts.response)
        status = response.status_code  # recorded when the head goes to the client
        up_headers: Headers = list(response.headers.raw_items())
        if self.hooks.on_response_head is not None:
            hook = self.hooks.on_response_head(self.info, status, up_headers)
            await self._call_hook("on_response_head", hook)
            self._check_hook_headers("on_response_head", up_headers)
        up_framing = response_framing(self.method, status, up_headers)
        reusable = response.http_version == b"1.1" and b"close" not in connection_tokens(up_headers)
        kind = up_framing.kind
        if self.client.state.draining:
            self.close_client = True
        if kind == "none" or kind == "length":
            out = up_framing
        elif self.client_11:
            out = CHUNKED
        else:
            out = UNTIL_CLOSE
            self.close_client = True
        if kind == "close":
            reusable = False
        if self._sse_errors and not 200 <= status < 300:
            raise UpstreamStatus(f"upstream answered {status}", upstream_status=status)
        if kind != "none" and _is_sse(up_headers):
            _add_sse_headers(up_headers)
            route = self.route
            if route is not None and (route.sse.enabled or self.hooks.on_sse_event is not None):
                reason = response.reason or reason_phrase(status)
                start = b"HTTP/1.1 %d %s\r\n" % (status, reason)
                ok = await self._relay_sse(
                    conn, start, status, up_headers, up_framing, trailing, timeouts
                )
                return reusable and ok
        headers = downstream_response_headers(
            up_headers,
            request_id=self.request_id,
            framing=out,
            keep_length=self.method == b"HEAD" or status == 304,
            close=self.close_client,
        )
        reason = response.reason or reason_phrase(status)
        head = serialize_head(b"HTTP/1.1 %d %s\r\n" % (status, reason), headers)
        up, down, buf, idle = conn.stream, self.client.stream, self.client.wbuf, timeouts.idle
        # bytes_out: the body bytes written so far, also when a pump fails (exc.moved).
        try:
            if kind == "none":
                await self._send_head(head, status)
                return reusable and not trailing
            if kind == "length":
                first = trailing[: up_framing.length]
                await self._send_head(head + first, status)
                self.record.bytes_out = len(first)
                rest = up_framing.length - len(first)
                if rest:
                    self._watch_client()
                    moved = await pump_length(up, down, bulk_buffer(rest, buf), rest, idle)
                    self.record.bytes_out += moved
                return reusable and len(trailing) == len(first)
            if kind == "chunked":
                ok = await self._relay_chunked(head, status, trailing, conn, idle)
                return reusable and ok
            first = trailing
            if out is CHUNKED and first:
                first = encode_chunk_header(len(first)) + first + b"\r\n"
            await self._send_head(head + first, status)
            self.record.bytes_out = len(first)
            self._watch_client()
            moved = await pump_until_close(up, down, buf, idle, chunk_encode=out is CHUNKED)
            self.record.bytes_out += moved
            return False
        except SourceFailed as exc:
            self.record.bytes_out += exc.moved
            raise UpstreamReset(f"upstream failed mid-body: {exc}") from None
        except SinkFailed as exc:
            self.record.bytes_out += exc.moved
            raise ClientGone("client went away during the response") from None
        except FramingError as exc:
            self.record.bytes_out += exc.moved
            raise UpstreamProtocolError("malformed chunked body from upstream") from None
        except IdleTimeout as exc:
            self.record.bytes_out += exc.moved
            raise UpstreamTimeout(f"response body idle for {idle:g} s") from None

    async def _relay_chunked(
        self, head: bytes, status: int, trailing: bytes, conn: UpstreamConnection, idle: float
    ) -> bool:
        scanner = ChunkedScanner()
        spans: list[tuple[int, int]] = []
        try:
            end = scanner.feed(trailing, 0, None, spans)
        except ChunkedError:
            raise FramingError("bad chunk") from None
        first = trailing[:end] if self.client_11 else b"".join(trailing[s:e] for s, e in spans)
        await self._send_head(head + first, status)
        self.record.bytes_out = len(first)
        leftover = trailing[end:]
        if not scanner.done:
            self._watch_client()
            pump = pump_chunked if self.client_11 else pump_chunked_decoded
            moved, leftover = await pump(
                conn.stream, self.client.stream, self.client.wbuf, scanner, idle
            )
            self.record.bytes_out += moved
        return not leftover

    async def _relay_sse(
        self,
        conn: UpstreamConnection,
        start: bytes,
        status: int,
        up_headers: Headers,
        up_framing: Framing,
        trailing: bytes,
        timeouts: Timeouts,
    ) -> bool:
        """Relay an SSE body with the route's SSE features; True if the upstream
        connection ended cleanly (reusable as far as the body goes)."""
        assert self.route is not None
        sse = self.route.sse
        if not self.client_11:
            self.close_client = True
        headers = downstream_response_headers(
            up_headers,
            request_id=self.request_id,
            framing=CHUNKED if self.client_11 else UNTIL_CLOSE,
            keep_length=False,
            close=self.close_client,
        )
        await self._send_head(serialize_head(start, headers), status)
        self._watch_client()
        tap = self._tap = SSEParser(max_bytes=sse.transcript_max_bytes)
        relay = SSERelay(
            up=conn.stream,
            down=self.client.stream,
            buf=self.client.wbuf,
            idle=timeouts.idle,
            chunked_out=self.client_11,
            parser=tap,
            heartbeat=sse.heartbeat,
            on_event=self._on_sse_event if self.hooks.on_sse_event is not None else None,
        )
        kind, length = up_framing.kind, up_framing.length
        first = trailing[:length] if kind == "length" else trailing
        try:
            try:
                await relay.run(first, kind, length)
            except (SourceFailed, IdleTimeout, FramingError) as exc:
                error = _pipe_error(exc, timeouts.idle)
                if not self._sse_errors:
                    raise error from None
                self.record.outcome, self.record.error_kind = error.outcome, error.kind
                event = error_event(error.status, error.message, self.record.request_id)
                await relay.finish(event)
                return False
            await relay.finish()
        except SinkFailed:
            raise ClientGone("client went away during the response") from None
        finally:
            self.record.bytes_out = relay.moved
        if kind == "chunked":
            return not relay.leftover
        return kind == "length" and len(trailing) <= length

    async def _on_sse_event(self, event: SSEEvent) -> None:
        assert self.hooks.on_sse_event is not None
        try:
            await self.hooks.on_sse_event(self.info, event)
        except Exception:  # after the head: nothing to answer; log and go on
            log.exception("hook on_sse_event failed (request %s)", self.record.request_id)

    async def _send_sse_error(self, exc: ProxyError) -> None:
        """Before the head: a 200 event stream holding only an ``error`` event."""
        status = exc.upstream_status if isinstance(exc, UpstreamStatus) else exc.status
        body = error_event(status, exc.message, self.record.request_id)
        headers = [
            (b"Content-Type", b"text/event-stream"),
            (b"Content-Length", b"%d" % len(body)),
            (b"X-Request-ID", self.request_id),
        ]
        _add_sse_headers(headers)
        if not self.request_done:
            self.close_client = True
        if self.close_client:
            headers.append((b"Connection", b"close"))
        await self._send_head(serialize_head(b"HTTP/1.1 200 OK\r\n", headers) + body, 200)
        self.record.bytes_out = len(body)

    # -- client ------------------------------------------------------------

    async def _send_client(self, data: bytes) -> None:
        try:
            await self.client.stream.send_all(data)
        except StreamBroken:
            raise ClientGone("client went away") from None

    async def _send_head(self, data: bytes, status: int) -> None:
        """Write the response head (and any body bytes in hand); the access log's status
        is set here, so it is always the one the client was sent."""
        self.head_sent = True
        self.record.status = status
        await self._send_client(data)

    async def _fail(self, exc: ProxyError) -> None:
        rec = self.record
        rec.outcome = exc.outcome
        rec.detail = exc.detail
        if isinstance(exc, UpstreamError):
            rec.error_kind = exc.kind
        if self.head_sent or isinstance(exc, ClientGone):
            # Mid-body (or nobody to answer): cut the connection, no clean end.
            self.close_client = True
            if not self.head_sent:
                rec.status = exc.status
            self.client.stream.close()
            return
        if self._sse_errors and isinstance(exc, UpstreamError):
            try:
                await self._send_sse_error(exc)
            except ClientGone:
                self.close_client = True
                self.client.stream.close()
            return
        rec.status = exc.status
        if isinstance(exc, DownstreamError) or not self.request_done:
            self.close_client = True
        rec.bytes_out = await self.client.send_error(
            exc, self.request_id, self.close_client, self.method
        )
