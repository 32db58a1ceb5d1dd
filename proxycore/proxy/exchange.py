"""One request/response exchange on a client connection: the native front end.

The path of one request (see docs/architecture.md):

1. ``run`` builds the one view of the request (:mod:`~proxycore.proxy.preflight`:
   target, head checks, client address), checks the request framing and
   ``Expect``, splits the bytes read past the head into this body's start and
   what follows (:class:`~proxycore.proxy.relay.RawRequestBody`), then routes
   and admits it (the config snapshot was taken when the exchange started).
2. The ``on_request`` hook may answer instead; an upgrade goes to
   :func:`~proxycore.proxy.websocket.relay_websocket`.
3. Otherwise the shared core (:class:`~proxycore.proxy.upstream.UpstreamCall`)
   sends the upstream head with the body bytes in hand, pumps the rest of the
   body, reads the response head and relays the response through
   :class:`~proxycore.proxy.relay.RawResponseSink`; it puts the upstream
   connection back in the pool only if both messages completed cleanly.

The exchange never writes its connection's fields: it talks to it through the
:class:`Downstream` protocol and returns an
:class:`ExchangeOutcome` (may the connection be reused, the bytes of the next
request already read, close lingering).

Every proxy-made error goes through ``_fail``: before the response head was
sent it becomes a JSON error response (or an SSE ``error`` event); after, the
client connection is cut without a clean end so the client sees a truncated
body, never a falsely complete one.
"""

from __future__ import annotations

import logging
from collections.abc import Coroutine
from typing import Final, NamedTuple, Protocol

import h11

from ..errors import (
    BadRequest,
    ClientGone,
    DownstreamError,
    MethodNotAllowed,
    NoRoute,
    ProxyError,
    UpstreamError,
)
from ..http.headers import (
    Framing,
    Headers,
    may_retry,
    reason_phrase,
    scan_request,
    serialize_head,
    without_h2c_offer,
)
from ..http.router import Match
from ..http.target import TargetView
from ..net.stream import RawStream
from ..proxy.attempts import Attempts
from ..proxy.ledger import Ledger
from ..proxy.preflight import (
    admit,
    answer_head,
    expect_continue,
    heads,
    plan_attempts,
    request_view,
)
from ..proxy.relay import ClientSide, RawRequestBody, RawResponseSink
from ..proxy.sse_relay import sse_error_reply
from ..proxy.state import ProxyState, Snapshot
from ..proxy.upstream import UpstreamCall
from ..proxy.websocket import relay_websocket
from ..proxy.ws_handshake import ClientStream, UpgradeRequest, check_client
from ..security.admission import Admission
from ..tunnel import http_api
from ..tunnel.gateway import serve_session
from ..tunnel.relay import PEERS
from ..tunnel.sessions import Caller
from ..upstreams.group import Member

__all__ = ["Downstream", "Exchange", "ExchangeOutcome"]

log: Final = logging.getLogger("proxycore.exchange")

#: Native listeners are plain TCP: the scheme the client used (``X-Forwarded-Proto``).
SCHEME: Final = b"http"


class Downstream(ClientSide, Protocol):
    """What the exchange needs of its client connection
    (:class:`~proxycore.proxy.connection.ClientConnection` is one)."""

    @property
    def stream(self) -> RawStream: ...
    @property
    def peer_ip(self) -> str: ...
    @property
    def raw_head(self) -> bytes:
        """The current request's head exactly as received (replayed to an upgrade)."""
        ...

    def release_head(self) -> None:
        """The current request will not be upgraded: :attr:`raw_head` is not needed."""
        ...

    async def send_error(
        self, exc: ProxyError, request_id: bytes, close: bool, method: bytes = b""
    ) -> int:
        """Write a proxy-made error response; the body bytes written."""
        ...


class ExchangeOutcome(NamedTuple):
    """What the connection does after an exchange."""

    #: The client connection may carry the next request.
    reuse: bool
    #: Bytes read past this request (the start of the next, pipelined, one).
    leftover: bytes
    #: Close lingering (unread client bytes may be left: don't let a reset eat the reply).
    linger: bool = False


class Exchange:
    """Proxies one request; :meth:`run` says what the connection does next."""

    __slots__ = (
        "_linger",
        "body",
        "client",
        "client_11",
        "data",
        "forwarded_for",
        "headers",
        "ledger",
        "method",
        "sink",
        "snapshot",
        "state",
        "target",
        "version",
    )

    def __init__(
        self,
        client: Downstream,
        state: ProxyState,
        request: h11.Request,
        data: bytes,
        snapshot: Snapshot,
    ) -> None:
        """``data``: the bytes read past the request head."""
        # What is kept of the h11 request (not the request itself: a held stream would
        # keep its header table).
        self.client, self.state, self.target = client, state, request.target
        self.data, self.snapshot = data, snapshot
        self.method, self.version = request.method, request.http_version
        self.client_11 = self.version == b"1.1"
        self.headers: Headers = list(request.headers.raw_items())
        #: The X-Forwarded-For value (set with the view).
        self.forwarded_for = b""
        self.body: RawRequestBody | None = None
        self._linger = False

    async def run(self) -> ExchangeOutcome:
        """Never raises (but ``trio.Cancelled``): errors are answered (or cut) here; an
        unexpected exception is one log line and a 500 (or a cut), and closes."""
        client = self.client
        method = self.method.decode("ascii", "replace")
        scan = scan_request(self.headers)  # one walk: id, tokens, upgrade, Accept, framing
        request_id = scan.request_id
        ledger = self.ledger = Ledger(self.state, method, client.peer_ip, request_id, log)
        sink = self.sink = RawResponseSink(client, ledger, self.method, self.client_11)
        try:
            view = self._preflight()
            framing = scan.framing(self.version)
            body = self.body = RawRequestBody(client, ledger.record, self.data, framing)
            tokens = scan.tokens
            if b"close" in tokens:
                sink.close = True
            upgrade = b"upgrade" in tokens and scan.upgrade
            if upgrade and (plain := without_h2c_offer(self.headers)) is not None:
                # A cleartext HTTP/2 offer (curl --http2): declined, served as HTTP/1.1.
                self.headers, upgrade = plain, False
            expect = expect_continue(self.headers) and self.client_11 and not body.done
            match, admission, body.max_body = await admit(
                ledger, self.snapshot, self.method, view, self.headers, body.declared
            )
            client.stream.send_timeout = self.snapshot.config.timeouts_for(match.route).send
            sink.sse_errors = match.route.sse.errors and scan.accepts_event_stream
            if upgrade:
                if not match.route.websocket or not self._is_websocket_upgrade():
                    raise BadRequest("protocol upgrades are not enabled on this route")
                # An upgrade is done with the connection: after its session, or after
                # the hook's answer in its place.
                sink.close = True
            # The hook runs for upgrades as for any request: its answer (the upgrade never
            # happens) or its headers (the upstream handshake's).
            if ledger.hooks.on_request is not None and await self._on_request(view, body):
                return self._outcome()
            if self.snapshot.config.is_tunnel_route(match.route):
                await self._tunnel(match, view, admission, upgrade, expect)
            elif upgrade:
                await self._upgrade(match, view, admission)
            else:
                attempts = plan_attempts(
                    ledger, self.snapshot, match, self.method, self.headers, admission
                )
                await self._gather(match, framing, expect, attempts)
                forwarding = self._forward(match, view.query, framing, expect, admission, attempts)
                # A held stream keeps nothing of the request's head in this frame.
                del view, scan, tokens, match, admission, attempts
                await forwarding
                if not body.done:
                    # The response ended before the request body: we can't find the next
                    # request. The client may still be sending it: close lingering, so that
                    # a reset doesn't destroy the answer before the client reads it.
                    sink.close = True
                    self._linger = True
        except ProxyError as exc:
            await self._fail(exc)
        except Exception as exc:  # a bug or a surprise: this exchange ends, nothing else
            sink.close = True  # the connection's state is unknown: never reuse it
            await self._fail(ledger.unexpected(exc))
        finally:
            ledger.close()
            if ledger.hooks.on_exchange_end is not None:
                await ledger.on_exchange_end()
        return self._outcome()

    def _outcome(self) -> ExchangeOutcome:
        if self.sink.close:
            return ExchangeOutcome(False, b"", self._linger)
        body = self.body
        return ExchangeOutcome(True, body.leftover if body is not None else b"", self._linger)

    def _preflight(self) -> TargetView:
        """The one view of the request every decision uses: the normalized target, the
        checked head (singleton fields, Host) and the client address."""
        if self.method == b"CONNECT" and not self.target.startswith(b"/"):
            self.sink.close = True  # an authority-form target: nothing after it is ours
            raise MethodNotAllowed(
                "CONNECT is not allowed: this is a reverse proxy",
                headers=[(b"Allow", b"GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS")],
            )
        trusted = self.snapshot.config.server.trusted_networks
        view, self.forwarded_for = request_view(
            self.ledger, self.target, self.headers, self.client.peer_ip, trusted
        )
        return view

    # -- the head's questions ------------------------------------------------

    def _is_websocket_upgrade(self) -> bool:
        return self.method == b"GET" and any(
            n.lower() == b"upgrade" and v.strip().lower() == b"websocket" for n, v in self.headers
        )

    # -- the three ways on ---------------------------------------------------

    async def _on_request(self, view: TargetView, body: RawRequestBody) -> bool:
        """Run ``on_request``; True if it answered the client itself."""
        ledger, sink = self.ledger, self.sink
        self.headers, answer = await ledger.on_request(
            view.path, view.query, self.headers, body.decoded() if body.done else None
        )
        if answer is None:
            return False
        if not body.done:
            sink.close = True
        headers = answer_head(answer, ledger.request_id, close=sink.close)
        start = b"HTTP/1.1 %d %s\r\n" % (answer.status, reason_phrase(answer.status))
        payload = b"" if self.method == b"HEAD" else answer.body
        await sink.send_head(serialize_head(start, headers) + payload, answer.status)
        ledger.record.bytes_out = len(payload)
        return True

    async def _tunnel(
        self, match: Match, view: TargetView, admission: Admission, upgrade: bool, expect: bool
    ) -> None:
        """A request on the ``[tunnel]`` route, admitted: the gateway's WebSocket, or the
        sessions API (docs/tunnel.md). The caller is the admitted identity."""
        settings, registry, ledger = self.snapshot.config.tunnel, self.state.tunnel, self.ledger
        assert self.body is not None and registry is not None  # enabled: ProxyState made one
        identity = admission.identity
        caller = Caller(identity, bool(identity) and identity in settings.admins)
        ledger.record.upstream = "tunnel"
        api = view.path == settings.api_prefix or view.path.startswith(settings.api_prefix + "/")
        if upgrade and view.path == settings.path:
            up = self._upgrade_request(match, view, admission)
            check_client(up)
            stream = ClientStream(up.client, up.replay)
            accepted = await serve_session(
                stream, registry, caller, record=ledger.record, drain=self.state
            )
            self.sink.head_sent, self._linger = accepted, accepted and not stream.closed
        elif api and not upgrade:
            if expect:
                await self.sink.send_continue()
            idle = self.snapshot.config.timeouts_for(match.route).client_body
            body = await self.body.read_all(http_api.body_limit(settings), idle)
            request = http_api.ApiRequest(
                method=self.method,
                path=view.path,
                query=view.query,
                headers=self.headers,
                body=body,
                caller=caller,
                request_id=ledger.request_id,
                stream=self.client.stream,
                registry=registry,
                settings=settings,
                peers=PEERS,
            )
            self.sink.head_sent = True  # handle() answers; it never raises after the head
            result = await http_api.handle(request)
            ledger.record.status, ledger.record.bytes_out = result.status, result.bytes_out
            self.sink.close = self.sink.close or result.close
        else:
            raise NoRoute("no tunnel endpoint at this path")

    def _upgrade_request(
        self,
        match: Match,
        view: TargetView,
        admission: Admission,
        member: Member | None = None,
    ) -> UpgradeRequest:
        ledger, body = self.ledger, self.body
        assert body is not None
        hook = ledger.on_response_head if ledger.hooks.on_response_head is not None else None
        return UpgradeRequest(
            target=self.target,
            headers=self.headers,
            http_11=self.client_11,
            has_body=bool(body.start) or not body.done,
            request_id=ledger.request_id,
            forwarded_for=self.forwarded_for,
            match=match,
            query=view.query,
            admission=admission,
            timeouts=self.snapshot.config.timeouts_for(match.route),
            client=self.client.stream,
            replay=self.client.raw_head + self.data,
            drain=self.state,
            response_head=hook,
            upstream=member.spec if member is not None else None,
            credential=_credential(admission, member),
        )

    async def _upgrade(self, match: Match, view: TargetView, admission: Admission) -> None:
        """Hand the connection to the WebSocket relay (it answers, or raises before any
        byte went to the client)."""
        ledger = self.ledger
        attempts = plan_attempts(ledger, self.snapshot, match, self.method, self.headers, admission)
        member = attempts.first()  # one try: a handshake is not retried on another upstream
        up = self._upgrade_request(match, view, admission, member)
        member.active += 1
        try:
            result = await relay_websocket(up, ledger.record)
        finally:
            member.active -= 1
        self.sink.head_sent = result.head_sent
        self._linger = result.linger

    async def _gather(
        self, match: Match, framing: Framing, expect: bool, attempts: Attempts
    ) -> None:
        """Read a small body whole first when the route may retry it on another upstream."""
        body = self.body
        assert body is not None
        length = framing.length if framing.kind == "length" else None
        if not body.done and not expect and attempts.gathers(length):
            idle = self.snapshot.config.timeouts_for(match.route).client_body
            await body.read_all(match.route.max_retry_body_bytes, idle)
        attempts.set_body(len(body.start) if body.done else None)

    def _forward(
        self,
        match: Match,
        query: bytes,
        framing: Framing,
        expect: bool,
        admission: Admission,
        attempts: Attempts,
    ) -> Coroutine[object, object, None]:
        """The upstream call, to be awaited by :meth:`run` (this frame is gone by then: a
        held stream's await chain is memory)."""
        ledger, body, sink, config = self.ledger, self.body, self.sink, self.snapshot.config
        assert body is not None
        call = UpstreamCall(
            ledger,
            self.state.pool,
            body,
            sink,
            method=self.method,
            timeouts=config.timeouts_for(match.route),
            server=config.server,
            client=body if type(self.client.stream) is RawStream else None,
        )
        return call.forward(
            attempts,
            heads(
                ledger,
                match,
                query,
                self.method,
                self._hand_over_headers(),
                forwarded_for=self.forwarded_for,
                framing=framing,
                admission=admission,
                proto=SCHEME,
                body=body.start,  # all of it when gathered
            ),
            retry=may_retry(self.method, framing),
            expect_continue=expect,
        )

    def _hand_over_headers(self) -> Headers:
        """The request's headers for the heads' closure, their only holder from here: the
        call drops it once the response starts (a held stream keeps none of them)."""
        headers, self.headers, self.data = self.headers, [], b""
        self.client.release_head()
        return headers

    # -- errors ----------------------------------------------------------------

    async def _fail(self, exc: ProxyError) -> None:
        ledger, sink = self.ledger, self.sink
        rec = ledger.record
        ledger.failed(exc)
        if sink.head_sent or isinstance(exc, ClientGone):
            # Mid-body (or nobody to answer): cut the connection, no clean end.
            sink.close = True
            if not sink.head_sent:
                rec.status = exc.status
            self.client.stream.close()
            return
        done = self.body is not None and self.body.done
        if sink.sse_errors and isinstance(exc, UpstreamError):
            # Before the head: a 200 event stream holding only an ``error`` event.
            if not done:
                sink.close = True
            data, size = sse_error_reply(exc, rec.request_id, close=sink.close)
            try:
                await sink.send_head(data, 200)
                rec.bytes_out = size
            except ClientGone:
                sink.close = True
                self.client.stream.close()
            return
        rec.status = exc.status
        if isinstance(exc, DownstreamError) or not done:
            sink.close = True
        rec.bytes_out = await self.client.send_error(
            exc, ledger.request_id, sink.close, self.method
        )


def _credential(admission: Admission, member: Member | None) -> tuple[bytes, bytes] | None:
    """The injected credential field of ``member`` (a WebSocket upgrade's upstream)."""
    credential = admission.credentials.get(member.name) if member is not None else None
    return credential.field() if credential is not None else None
