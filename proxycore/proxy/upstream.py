"""The upstream half of one exchange: the core both front ends share.

The native server (:mod:`proxycore.proxy.exchange`, raw sockets) and the ASGI
app (:mod:`proxycore.proxy.asgi`, ``receive``/``send``) differ only in how the
request body arrives and how the response leaves. They hand those two jobs to
:class:`UpstreamCall` as a :class:`RequestBody` and a :class:`ResponseSink`;
everything else happens here, once:

0. The tries: :class:`~proxycore.proxy.attempts.Attempts` names the upstream of
   each (the route's group); a connect error, or a response head it says to retry,
   before any byte reached the client, closes that connection and starts the next
   try on another upstream (the front end serializes the head for each).
1. Connect: a pooled connection, or a new one within the ``connect`` timeout
   (errors name the route, never the address). A pooled connection that turns
   out dead before any response byte is retried once on a *new* connection,
   for idempotent requests without a body
   (:func:`~proxycore.net.pool.with_stale_retry`).
2. The whole exchange runs under the route's ``total`` deadline (no scope at
   all when there is none).
3. The head (with the body bytes in hand) goes in one write; then one nursery
   holds the response side (this task) and, started lazily, the body side:
   the rest of the request body, then a watch that cancels the exchange when
   the downstream goes away. The body side starts at once only when it has
   work (a body still coming), when the front end can't watch cheaply
   (``RequestBody.eager``) or over TLS (a TLS read must not be cancelled); else
   when the response head is slower than :data:`FAST_WAIT_S`, or when a body
   is pumped. A task costs more than a small exchange (~110 us). Where the front
   end hands a :class:`WatchedClient` (native, plain sockets) and nothing is left
   to send, there is no nursery and no task: the client socket joins the
   process's :mod:`~proxycore.net.watch`, which cancels the try's scope.
4. The response head (:class:`~proxycore.http.response_head.ResponseHeadReader`,
   ``response`` timeout from the end of the request body), the
   ``on_response_head`` hook, the framing, the SSE headers; then the sink
   relays the response.
5. **The reuse decision**: the connection goes back to the pool only if the
   head allows it (HTTP/1.1, no ``Connection: close``, not close-delimited), the
   sink ended the body cleanly with nothing left over, and the whole request
   body went upstream. Anything else closes it.

A failure of the body side is recorded and cancels the nursery; it wins over
the response side's error. Only :class:`~proxycore.errors.ProxyError` leaves
:meth:`UpstreamCall.forward`, or an unexpected exception (a bug) as itself, never
wrapped in an ExceptionGroup (the front end contains it).
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from contextlib import nullcontext
from typing import Final, Protocol

import h11
import trio

from ..config import ServerSettings, Timeouts
from ..errors import (
    ClientGone,
    UpstreamConnectError,
    UpstreamConnectTimeout,
    UpstreamError,
    UpstreamReset,
    UpstreamTimeout,
    connect_reason,
    public_reason,
)
from ..http.headers import (
    FRAMING_FIELDS,
    Headers,
    add_sse_headers,
    is_sse,
    response_framing,
    upstream_reusable,
)
from ..http.response_head import ResponseHeadReader
from ..net.pool import (
    Origin,
    Pool,
    StaleConnection,
    UpstreamConnection,
    open_connection,
    with_stale_retry,
)
from ..net.stream import CHUNK, RawStream, SendTimeout, Stream, StreamBroken, TLSStream
from ..net.watch import AVAILABLE, downstream_watch
from ..proxy.attempts import Attempts, HeadFor
from ..proxy.ledger import Ledger
from ..proxy.slow_heads import FAST_WAIT_S, slow_heads
from ..proxy.upstream_types import RequestBody, ResponseHead, WatchedClient
from ..upstreams.group import Member

__all__ = [
    "FAST_WAIT_S",
    "HeadFor",
    "RequestBody",
    "ResponseHead",
    "ResponseSink",
    "UpstreamCall",
    "WatchedClient",
]


_NO_SCOPE: Final = nullcontext()


class _Retry(Exception):
    """A response head that is retried on ``member`` (never leaves this module)."""

    def __init__(self, member: Member) -> None:
        super().__init__()
        self.member = member


def _kind(exc: UpstreamError) -> str:
    """The retry condition an upstream failure before any response byte matches."""
    if isinstance(exc, UpstreamConnectError):
        return "connect_error"
    if isinstance(exc, UpstreamReset):
        return "reset"
    if isinstance(exc, UpstreamTimeout):
        return "timeout"
    return "other"


class ResponseSink(Protocol):
    """Where the response goes (native: the client socket; ASGI: ``send()``)."""

    #: The buffer the response head is read into (then reused by the body relay).
    buf: bytearray

    async def send_continue(self) -> None:
        """The request head went upstream: answer the client's ``Expect: 100-continue``."""
        ...

    async def interim(self, event: h11.InformationalResponse) -> None:
        """Relay a 1xx response (not 101) where the downstream can take one."""
        ...

    async def respond(self, head: ResponseHead, up: UpstreamConnection, call: UpstreamCall) -> bool:
        """Send the head and relay the body. True if the body ended cleanly with nothing
        read past it (the connection may be reused as far as the body goes).

        Calls ``call.watch_downstream()`` before waiting on a body. Raises
        :class:`~proxycore.errors.ProxyError`.
        """
        ...


class UpstreamCall:
    """One request sent upstream and its response relayed (see the module docstring).

    Made once per exchange by the front end; :meth:`forward` may run the exchange
    twice (a stale pooled connection), each time with a fresh nursery.
    """

    __slots__ = (
        "_attempts",
        "_client",
        "_client_bytes",
        "_conn",
        "_expect",
        "_head",
        "_head_for",
        "_member",
        "_nursery",
        "_open",
        "_response_scope",
        "_reusable",
        "_scope",
        "_try_deadline",
        "_watched",
        "_watching",
        "body",
        "ledger",
        "method",
        "pool",
        "server",
        "side_error",
        "sink",
        "timeouts",
    )

    def __init__(
        self,
        ledger: Ledger,
        pool: Pool,
        body: RequestBody,
        sink: ResponseSink,
        *,
        method: bytes,
        timeouts: Timeouts,
        server: ServerSettings,
        connect: Callable[[Origin], Awaitable[UpstreamConnection]] = open_connection,
        client: WatchedClient | None = None,
    ) -> None:
        """``connect`` opens a new upstream connection (tests script one); ``client``: the
        body's downstream can be watched without a task (see the module docstring)."""
        self.ledger, self.pool, self.body, self.sink = ledger, pool, body, sink
        self._open = connect
        self.method, self.timeouts, self.server = method, timeouts, server
        #: A failure of the body side (it cancelled the exchange); raised as itself.
        self.side_error: Exception | None = None
        self._head = b""
        #: Each try's head (dropped once the response starts: no try after it).
        self._head_for: HeadFor | None = None
        self._expect = False
        self._conn: UpstreamConnection | None = None
        self._nursery: trio.Nursery | None = None
        self._client = client
        #: The try's scope when it runs without a nursery (the watch cancels it).
        self._scope: trio.CancelScope | None = None
        #: The client stream registered in the process's downstream watch.
        self._watched: RawStream | None = None
        self._watching = False
        self._reusable = False
        self._response_scope: trio.CancelScope | None = None
        self._attempts: Attempts | None = None
        self._member: Member | None = None
        #: A byte went to the client (100 Continue, a 1xx, the head): no retry from here.
        self._client_bytes = False
        self._try_deadline = math.inf

    async def forward(
        self,
        attempts: Attempts,
        head_for: HeadFor,
        *,
        retry: bool,
        expect_continue: bool = False,
    ) -> None:
        """Send the request to the upstream ``attempts`` chooses (``head_for(member)``: its
        origin and the serialized head plus the body bytes in hand) and relay the response;
        try another upstream while ``attempts`` says so. ``retry``: the request may go
        again on a new connection if a pooled one was stale. Raises
        :class:`~proxycore.errors.ProxyError`."""
        self._expect, self._attempts, self._head_for = expect_continue, attempts, head_for
        del head_for  # held by the call alone: dropped once the response starts
        total = self.timeouts.total
        # No scope at all without a total (~17 us each): most routes have none.
        scope = trio.CancelScope(deadline=self.ledger.record.started + total) if total else None
        with scope or _NO_SCOPE:  # the tries, in this frame (a held stream's await chain)
            member = attempts.first()
            per_try = attempts.policy.per_try_timeout
            while True:
                assert self._head_for is not None  # dropped only once no other try follows
                origin, self._head = self._head_for(member)
                self._member = member
                self._try_deadline = trio.current_time() + per_try if per_try else math.inf
                member.active += 1
                try:
                    await with_stale_retry(
                        self.pool, origin, self._attempt, connect=self._connect, retry=retry
                    )
                    break
                except _Retry as again:
                    nxt = again.member
                except StaleConnection:
                    raise UpstreamReset("upstream closed the connection") from None
                except UpstreamError as exc:
                    if exc is self.side_error:
                        raise
                    other = attempts.errored(member, _kind(exc), retry_ok=not self._client_bytes)
                    if other is None:
                        raise
                    nxt = other
                finally:
                    member.active -= 1
                member = nxt
        if scope is not None and scope.cancelled_caught:
            raise UpstreamTimeout(
                f"exchange exceeded the total timeout of route {self.ledger.record.route!r} "
                f"({total:g} s)"
            )

    @property
    def _where(self) -> str:
        """The upstream as errors name it to the client: by route, never by address."""
        return f"the upstream of route {self.ledger.record.route!r}"

    async def _connect(self, origin: Origin) -> UpstreamConnection:
        """A new connection within the ``connect`` timeout (502 on failure)."""
        host, port = origin.host, origin.port
        with trio.move_on_after(self.timeouts.connect):
            try:
                return await self._open(origin)
            except OSError as exc:
                raise UpstreamConnectError(
                    f"cannot connect to {self._where}: {connect_reason(exc)}",
                    detail=f"{host}:{port}: {exc.strerror or exc}",
                ) from None
            except StreamBroken as exc:
                raise UpstreamConnectError(
                    f"{self._where}: {public_reason(str(exc))}", detail=f"{host}:{port}: {exc}"
                ) from None
        raise UpstreamConnectTimeout(
            f"connecting to {self._where} timed out", detail=f"{host}:{port}: connect timed out"
        )

    async def _attempt(self, conn: UpstreamConnection) -> None:
        """One exchange on ``conn``; raises StaleConnection (only if ``conn.uses``) before
        any response byte. Checks ``conn`` back in or closes it."""
        pool, body = self.pool, self.body
        reusable = False
        pool.mark_busy(conn.origin)
        try:
            conn.stream.send_timeout = self.timeouts.send
            try:
                await conn.stream.send_all(self._head)
            except SendTimeout:
                raise UpstreamTimeout(
                    f"{self._where} accepted no request bytes for {self.timeouts.send:g} s"
                ) from None
            except StreamBroken:
                if conn.uses:
                    raise StaleConnection from None
                raise UpstreamReset("upstream closed the connection") from None
            if self._expect:
                self._client_bytes = True
                await self.sink.send_continue()
            main_error: Exception | None = None
            fast = AVAILABLE and self._client is not None and not body.eager
            if fast and body.done and type(conn.stream) is RawStream:
                # Nothing to send: no nursery, no task; the process's downstream watch
                # (started when the exchange waits) cancels this scope.
                with trio.CancelScope() as self._scope:
                    self._conn, self._watching = conn, False
                    try:
                        # The head's only reference is the sink's frame (freed by it).
                        ok = await self.sink.respond(await self._response_head(conn), conn, self)
                        reusable = ok and self._reusable
                    except Exception as exc:
                        main_error = exc
                    finally:
                        self._scope = None
                        self._unwatch()
            else:
                async with trio.open_nursery() as nursery:
                    self._nursery, self._conn, self._watching = nursery, conn, False
                    if not body.done or body.eager or isinstance(conn.stream, TLSStream):
                        self.watch_downstream()
                    try:
                        ok = await self.sink.respond(await self._response_head(conn), conn, self)
                        reusable = ok and self._reusable
                    except Exception as exc:
                        # Kept out of the nursery (any exception): it would wrap it in an
                        # ExceptionGroup; raised as itself below.
                        main_error = exc
                    finally:
                        self._nursery = None
                        if self._watching:  # else no child: cancel() is not free (task reprs)
                            nursery.cancel_scope.cancel()
            if self.side_error is not None:
                raise self.side_error
            if main_error is not None:
                raise main_error
        finally:
            pool.mark_free(conn.origin)
            if reusable and body.done:
                pool.checkin(conn)
            else:
                conn.close()

    # -- the body side -------------------------------------------------------

    def watch_downstream(self) -> None:
        """Start the body side (rest of the request body, then the downstream watch)
        if it is not running yet. Idempotent; a no-op outside an attempt."""
        if self._watching:
            return
        nursery = self._nursery
        if nursery is not None:
            self._watching = True
            nursery.start_soon(self._body_side)
        elif self._scope is not None and self._client is not None:
            self._watching = True
            stream = self._client.watch_stream()
            if stream is not None and downstream_watch().add(stream, self._downstream_ready):
                self._watched = stream

    def _downstream_ready(self, closed: bool) -> None:
        """The process's watch saw the client socket: closed, or bytes came (the watch
        ends, as :meth:`RequestBody.wait_gone` returning False)."""
        self._watched = None
        if closed:
            self.abort(ClientGone("client went away"))

    def _unwatch(self) -> None:
        stream = self._watched
        if stream is not None:
            self._watched = None
            downstream_watch().discard(stream)

    async def _body_side(self) -> None:
        body = self.body
        try:
            if not body.done:
                assert self._conn is not None
                await body.send_rest(self._conn.stream, self.timeouts.client_body)
                # Complete, or the upstream stopped taking it: either way the wait for
                # its answer is the upstream's now.
                self._start_response_timer(force=True)
            gone = await body.wait_gone()
        except Exception as exc:  # any: raised in the nursery it would become a group
            self.abort(exc)
            return
        if gone:
            self.abort(ClientGone("client went away"))

    def abort(self, exc: Exception) -> None:
        """Fail the exchange with ``exc`` from outside the response side."""
        self.side_error = exc
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()
        elif self._scope is not None:
            self._scope.cancel()

    # -- the response head ---------------------------------------------------

    def _start_response_timer(self, *, force: bool = False) -> None:
        """The wait for the head starts once the request is complete (or, ``force``, the
        body side stopped sending it): a slow upload is the downstream's (``client_body``
        bounds it), not the upstream's."""
        scope = self._response_scope
        if scope is not None and (force or self.body.done):
            scope.deadline = min(trio.current_time() + self.timeouts.response, self._try_deadline)

    async def _recv_soon(self, stream: Stream, buf: bytearray) -> int:
        """Read; if nothing came within ``FAST_WAIT_S`` the process's slow-head watcher
        starts the downstream watch (no timer of this exchange's own: most heads come
        well before, and a cancel scope per exchange costs more than the exchange)."""
        slow = slow_heads()
        slow.add(self)
        try:
            return await stream.recv_into(buf, CHUNK)
        finally:
            slow.discard(self)

    async def _response_head(self, conn: UpstreamConnection) -> ResponseHead:
        """Read the final response head (relaying 1xx on the way, ``response`` timeout),
        run ``on_response_head``, then decide framing, reuse and the SSE headers."""
        server, rec, buf = self.server, self.ledger.record, self.sink.buf
        reader = ResponseHeadReader(self.method, server.max_header_bytes, server.max_header_count)
        response: h11.Response | None = None
        with trio.CancelScope(deadline=self._try_deadline) as self._response_scope:
            self._start_response_timer()
            while response is None:
                event = reader.next_event()
                if event is None:
                    try:
                        if self._watching:
                            n = await conn.stream.recv_into(buf, CHUNK)
                        else:
                            n = await self._recv_soon(conn.stream, buf)
                    except StreamBroken:
                        n = 0
                    if not n:
                        if not reader.received and conn.uses:
                            raise StaleConnection
                        raise UpstreamReset("upstream closed the connection before responding")
                    if not reader.received:
                        rec.ttfb = trio.current_time() - rec.started
                    reader.feed(bytes(buf[:n]))
                elif isinstance(event, h11.InformationalResponse):
                    self._client_bytes = True
                    await self.sink.interim(event)
                else:
                    response = event
        self._response_scope = None
        if response is None:
            wait_s = self.timeouts.response
            if trio.current_time() >= self._try_deadline and self._attempts is not None:
                wait_s = self._attempts.policy.per_try_timeout
            raise UpstreamTimeout(f"no response head from {self._where} within {wait_s:g} s")
        status = response.status_code
        headers: Headers = list(response.headers.raw_items())
        attempts, member = self._attempts, self._member
        assert attempts is not None and member is not None  # set by forward, per try
        nxt = attempts.responded(member, status, headers, retry_ok=not self._client_bytes)
        if nxt is not None:
            raise _Retry(nxt)
        # Framing and reuse are the upstream's: decided before the hook, and the hook's
        # changes to the framing fields are undone (else a hook editing Content-Length
        # would put a half-read connection back in the pool for the next client).
        framing = response_framing(self.method, status, headers)
        reusable = upstream_reusable(response.http_version, headers, framing)
        if self.ledger.hooks.on_response_head is not None:
            kept = [(n, v) for n, v in headers if n.lower() in FRAMING_FIELDS]
            await self.ledger.on_response_head(status, headers)
            headers[:] = [(n, v) for n, v in headers if n.lower() not in FRAMING_FIELDS] + kept
        sse = framing.kind != "none" and is_sse(headers)
        if sse:
            add_sse_headers(headers)
        # From here a byte goes to the client: no other try, no need of the request head.
        self._client_bytes, self._head, self._reusable = True, b"", reusable
        self._head_for = None
        return ResponseHead(
            status, response.reason, headers, framing, reusable, reader.trailing, sse
        )
