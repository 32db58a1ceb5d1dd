"""The HTTP side of the tunnel gateway, answered by the proxy itself (docs/tunnel.md).

The exchange admits the request like any other (auth, policy, rate limits, hooks), reads
its body (at most :func:`body_limit` bytes) and hands requests under ``[tunnel]
api_prefix`` to :func:`handle` as an :class:`ApiRequest`; :func:`handle` writes the whole
response on the client stream and returns an :class:`ApiResult` for the access log.

Endpoints (``{key}``: a session id, or the registered server name, unique per owner):

- ``GET {prefix}``: the caller's sessions (admins: all), JSON list.
- ``GET {prefix}/{key}``: one session; ``DELETE {prefix}/{key}``: close it (1000), 204.
- ``POST {prefix}/{key}/mcp``: MCP Streamable HTTP (spec 2025-06-18). A request goes
  down the tunnel (:meth:`Session.call`); the answer is ``application/json``, or
  ``text/event-stream`` (the server's messages for that request, then the response)
  when the caller's ``Accept`` asks for it. With both in ``Accept`` (what the MCP SDKs
  send) the answer is JSON unless the request carries a progress token
  (``params._meta.progressToken``): then the caller wants the progress notifications, and
  only a stream can carry them (a JSON answer's server messages, such as a server request
  made while the call waits, go to the ``GET`` stream instead). Notifications and
  responses: 202. A batch: 400.
  Errors before the head are HTTP statuses with a JSON-RPC error body (429 too many
  pending, 502 session gone, 504 timeout); once an event stream started, the error is
  the stream's last ``message`` event (a JSON-RPC error with the caller's id).
- ``GET {prefix}/{key}/mcp``: the server-to-client stream; ``GET {prefix}/{key}/events``:
  lifecycle and notifications. Both ``text/event-stream`` with ``: keep-alive`` every
  ``heartbeat_interval``, ending when the session closes, the subscriber falls behind
  (an ``error`` event) or the client goes away.
- ``DELETE {prefix}/{key}/mcp``: ends the MCP session named by ``Mcp-Session-Id`` (204).

MCP sessions: the tunnelled server speaks stdio and has no ``Mcp-Session-Id``, so the
gateway is the stateful Streamable HTTP server. An ``initialize`` answer carries a fresh
``Mcp-Session-Id`` bound to the tunnel session (a MAC over the tunnel session id, see
:class:`McpSessions`); a later request carrying one that is not bound to this tunnel
session (the tunnel reconnected: a new session) or that was deleted gets 404, so the
client starts over with ``initialize``. A request without the header is served (the
tunnel session is the state). ``MCP-Protocol-Version`` is passed over: only its syntax is
checked (400), the tunnelled server decides what it speaks.

Anyone who may not see a session gets 404, never 403. Error bodies name the request id,
never an address.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final

import trio

from ..config import Tunnel
from ..errors import error_body
from ..http.headers import Headers, connection_tokens, reason_phrase, serialize_head
from ..http.sse import HEARTBEAT
from ..net.stream import CHUNK, Stream, StreamBroken
from ..tunnel.hop import Hop
from ..tunnel.mcp_http import (
    INVALID_REQUEST,
    NOT_FOUND,
    PARSE_ERROR,
    SESSION_GONE,
    TIMED_OUT,
    TOO_MANY_PENDING,
    McpSessions,
    classify,
    dumps,
    event,
    header,
    negotiate,
    parse_path,
    rpc_error,
    wants_stream,
)
from ..tunnel.relay import Peers, forward, listed_elsewhere, named_elsewhere
from ..tunnel.sessions import (
    Caller,
    CallTimeout,
    Registry,
    Session,
    SessionClosed,
    TooManyPending,
)

__all__ = ["MCP_SESSIONS", "ApiRequest", "ApiResult", "body_limit", "handle"]

JsonObject = dict[str, Any]

#: The process's MCP sessions (one per process, like the tunnel registry).
MCP_SESSIONS: Final = McpSessions()

_VERSION_OK: Final = re.compile(r"[A-Za-z0-9._-]{1,64}")
_SSE_HEADERS: Final[Headers] = [
    (b"Content-Type", b"text/event-stream"),
    (b"Cache-Control", b"no-cache, no-store"),
    (b"X-Accel-Buffering", b"no"),
    (b"Connection", b"close"),
]


@dataclass(frozen=True, slots=True)
class ApiRequest:
    """One request under ``api_prefix``, admitted, its body read whole."""

    method: bytes
    path: str  # the decision path (TargetView.path)
    query: bytes
    headers: Headers
    body: bytes
    caller: Caller
    request_id: bytes
    stream: Stream  # the client stream: the response is written here
    registry: Registry
    settings: Tunnel
    #: The sibling workers (``serve --workers N``); None: answer from this registry only.
    peers: Peers | None = None
    #: Came over a relay (a worker's socket, a replica's listener): never forwarded again.
    relayed: bool = False


@dataclass(frozen=True, slots=True)
class ApiResult:
    """What was answered: for the access log, and whether the connection must close."""

    status: int
    bytes_out: int
    close: bool


def body_limit(settings: Tunnel) -> int:
    """The largest request body the exchange reads for :func:`handle` (else 413)."""
    return settings.max_message_bytes


# -- the exchange ----------------------------------------------------------------------------


class _Reply:
    """Writes one response on the client stream and keeps the access-log numbers."""

    def __init__(self, req: ApiRequest) -> None:
        self.req = req
        self.rid = req.request_id.decode("ascii", "replace")
        self.close = b"close" in connection_tokens(req.headers)
        self.status = 0
        self.bytes_out = 0

    def result(self) -> ApiResult:
        return ApiResult(self.status, self.bytes_out, self.close)

    async def send(self, status: int, body: bytes = b"", headers: Headers | None = None) -> None:
        """A whole response (JSON unless ``headers`` say otherwise)."""
        fields: Headers = list(headers or [])
        if body and not any(n.lower() == b"content-type" for n, _ in fields):
            fields.append((b"Content-Type", b"application/json"))
        if status not in (204, 304):
            fields.append((b"Content-Length", b"%d" % len(body)))
        fields += [(b"Cache-Control", b"no-store"), (b"X-Request-ID", self.req.request_id)]
        if self.close:
            fields.append((b"Connection", b"close"))
        await self._write(self._head(status, fields) + body, status, len(body))

    async def error(
        self, status: int, kind: str, message: str, extra: Headers | None = None
    ) -> None:
        await self.send(status, error_body(kind, message, self.rid), extra)

    async def rpc_fail(
        self, status: int, request_id: object, code: int, message: str, kind: str
    ) -> None:
        await self.send(status, dumps(rpc_error(request_id, code, message, kind, self.rid)))

    async def start_stream(self, extra: Headers | None = None) -> None:
        """The head of an event stream (close-delimited: the connection ends with it)."""
        self.close = True
        fields = [*_SSE_HEADERS, *(extra or []), (b"X-Request-ID", self.req.request_id)]
        await self._write(self._head(200, fields), 200, 0)

    async def chunk(self, data: bytes) -> None:
        await self.req.stream.send_all(data)
        self.bytes_out += len(data)

    def _head(self, status: int, fields: Headers) -> bytes:
        return serialize_head(b"HTTP/1.1 %d %s\r\n" % (status, reason_phrase(status)), fields)

    async def _write(self, data: bytes, status: int, body: int) -> None:
        self.status = status
        await self.req.stream.send_all(data)
        self.bytes_out += body


async def handle(req: ApiRequest) -> ApiResult:
    """Answer one request under ``api_prefix`` (see the module docstring). Never raises for
    a client that went away: the result says ``close`` (status 499 if nothing was
    answered). Anything else it raises is a bug: if ``req.stream.bytes_sent`` moved, part
    of a response left and the caller must cut the connection, not answer 500."""
    reply = _Reply(req)
    try:
        await _dispatch(req, reply)
    except StreamBroken:
        reply.close = True
        if not reply.status:
            reply.status = 499
    return reply.result()


async def _dispatch(req: ApiRequest, reply: _Reply) -> None:
    shared = None if req.relayed else req.registry.shared  # [state]: the other replicas
    target = parse_path(req.path, req.settings.api_prefix)
    if target is None:
        return await reply.error(404, "not_found", "no such tunnel endpoint")
    if target.kind == "list":
        if req.method != b"GET":
            return await _not_allowed(reply, b"GET")
        mine = req.registry.list(req.caller)
        sessions: list[object] = [s.as_dict() for s in mine]
        remote = await shared.listed(req.caller, {s.id for s in mine}) if shared else None
        if remote is not None:  # every replica's (and worker's) sessions
            sessions += remote
        elif req.peers is not None:
            sessions += await listed_elsewhere(req.peers, req.settings.api_prefix, req.caller)
        return await reply.send(200, dumps(sessions))
    elsewhere = _elsewhere(req, target.key) if req.peers is not None else None
    if elsewhere is not None and shared is not None:
        # An id naming worker i: worker i of this replica, or of another one ([state]).
        elsewhere = await shared.locate(target.key, req.caller) or elsewhere
    session = None if elsewhere is not None else req.registry.find(target.key, req.caller)
    if session is None and elsewhere is None and shared is not None:
        elsewhere = await shared.locate(target.key, req.caller)  # another replica's
    if session is None and elsewhere is None and req.peers is not None:
        index = await named_elsewhere(req.peers, req.settings.api_prefix, target.key, req.caller)
        elsewhere = req.peers.hop(index) if index is not None else None
    if elsewhere is not None:
        return await _forward(req, reply, elsewhere)
    if session is None:  # unknown, or someone else's: the same answer
        return await reply.error(404, "not_found", "no such tunnel session")
    if target.kind == "session":
        if req.method == b"GET":
            return await reply.send(200, dumps(session.as_dict()))
        if req.method == b"DELETE":
            await session.close(1000, "closed over the HTTP API")
            return await reply.send(204)
        return await _not_allowed(reply, b"GET, DELETE")
    if target.kind == "events":
        if req.method != b"GET":
            return await _not_allowed(reply, b"GET")
        return await _stream(req, reply, session, "events")
    return await _mcp(req, reply, session)


# -- other workers (serve --workers N: proxycore.tunnel.relay) ---------------------------


def _elsewhere(req: ApiRequest, key: str) -> Hop | None:
    """The other worker a session id names (an out-of-range one: this worker, 404)."""
    assert req.peers is not None
    owner = req.peers.owner_of(key)
    if owner is None or owner == req.peers.index or owner >= req.peers.count:
        return None
    return req.peers.hop(owner)


def _target(req: ApiRequest) -> bytes:
    path = req.path.encode()
    return path + b"?" + req.query if req.query else path


async def _forward(req: ApiRequest, reply: _Reply, hop: Hop) -> None:
    """The whole exchange relayed through ``hop`` (a worker, another replica), its answer
    copied byte for byte (it ends with ``Connection: close``, so does this connection).
    The holder gone (unreachable, or it died before answering): 502."""
    reply.close = True
    sent = req.stream.bytes_sent

    async def relay() -> None:
        reply.status, reply.bytes_out = await forward(
            hop,
            req.method,
            _target(req),
            req.headers,
            req.body,
            req.caller,
            req.request_id,
            req.stream,
        )

    try:  # the client going away cancels the relay (and closes the worker's socket)
        if await _while_connected(req.stream, relay):
            reply.status = reply.status or 499
            return
    except (OSError, trio.TooSlowError, trio.BrokenResourceError):
        pass
    if req.stream.bytes_sent == sent:
        await reply.error(502, "worker_unreachable", "the session's holder did not answer")


async def _not_allowed(reply: _Reply, allow: bytes) -> None:
    await reply.error(405, "method_not_allowed", "method not allowed here", [(b"Allow", allow)])


async def _mcp(req: ApiRequest, reply: _Reply, session: Session) -> None:
    """The Streamable HTTP endpoint of one tunnelled server."""
    if req.method not in (b"POST", b"GET", b"DELETE"):
        return await _not_allowed(reply, b"GET, POST, DELETE")
    version = header(req.headers, b"mcp-protocol-version")
    if version is not None and not _VERSION_OK.fullmatch(version.decode("latin-1").strip()):
        return await reply.rpc_fail(
            400, None, INVALID_REQUEST, "bad MCP-Protocol-Version", "bad_request"
        )
    mcp_id = header(req.headers, b"mcp-session-id")
    if req.method == b"DELETE":
        if mcp_id is None:
            return await reply.error(400, "bad_request", "Mcp-Session-Id is required")
        if not MCP_SESSIONS.valid(mcp_id, session.id):
            return await reply.error(404, "not_found", "no such MCP session")
        MCP_SESSIONS.end(mcp_id)
        return await reply.send(204)
    if req.method == b"GET":
        if mcp_id is not None and not MCP_SESSIONS.valid(mcp_id, session.id):
            return await reply.error(404, "not_found", "no such MCP session")
        return await _stream(req, reply, session, "mcp")
    kind, message = classify(req.body)
    if kind == "parse_error":
        return await reply.rpc_fail(400, None, PARSE_ERROR, "Parse error", "bad_request")
    if kind == "batch":
        return await reply.rpc_fail(
            400, None, INVALID_REQUEST, "batches are not supported", "bad_request"
        )
    if kind == "invalid":
        return await reply.rpc_fail(400, None, INVALID_REQUEST, "Invalid Request", "bad_request")
    initialize = kind == "request" and message.get("method") == "initialize"
    if mcp_id is not None and not initialize and not MCP_SESSIONS.valid(mcp_id, session.id):
        return await reply.rpc_fail(
            404, message.get("id"), NOT_FOUND, "no such MCP session", "not_found"
        )
    if kind != "request":
        try:
            await session.send(message)
        except SessionClosed:
            return await reply.error(502, "session_closed", "the tunnel session ended")
        return await reply.send(202)
    form = negotiate(header(req.headers, b"accept"), wants_stream(message))
    if form is None:
        return await reply.rpc_fail(
            406, message["id"], INVALID_REQUEST, "Accept neither JSON nor SSE", "not_acceptable"
        )
    extra: Headers = []
    if initialize:
        extra.append((b"Mcp-Session-Id", MCP_SESSIONS.mint(session.id).encode()))
    if form == "json":
        return await _call_json(req, reply, session, message, extra)
    return await _call_sse(req, reply, session, message, extra)


#: How each session failure is answered: HTTP status, JSON-RPC code, message, error type.
_FAILURES: Final[dict[type[Exception], tuple[int, int, str, str]]] = {
    TooManyPending: (429, TOO_MANY_PENDING, "too many pending requests", "too_many_requests"),
    CallTimeout: (504, TIMED_OUT, "the tunnelled server did not answer in time", "timeout"),
    SessionClosed: (502, SESSION_GONE, "the tunnel session ended", "session_closed"),
}


async def _call_json(
    req: ApiRequest, reply: _Reply, session: Session, message: JsonObject, extra: Headers
) -> None:
    async def to_stream(payload: JsonObject) -> None:
        # The server's request (or a progress notification) while this call waits: a JSON
        # answer can't carry it, the server-to-client stream (GET .../mcp) can.
        session.publish("mcp", "message", payload)

    try:
        answer = await session.call(
            message, timeout=req.settings.request_timeout, on_message=to_stream
        )
    except (TooManyPending, CallTimeout, SessionClosed) as exc:
        status, code, text, kind = _FAILURES[type(exc)]
        return await reply.rpc_fail(status, message["id"], code, text, kind)
    await reply.send(200, dumps(answer), extra)


async def _call_sse(
    req: ApiRequest, reply: _Reply, session: Session, message: JsonObject, extra: Headers
) -> None:
    """The server's messages for this request as ``message`` events, then the response.
    The head goes out with the first event, so a failure before it is an HTTP status."""
    reply.close = True  # the client stream is watched: a pipelined request would be lost

    async def on_message(payload: JsonObject) -> None:
        if not reply.status:
            await reply.start_stream(extra)
        await reply.chunk(event("message", payload))

    async def exchange() -> None:
        try:
            answer = await session.call(
                message, timeout=req.settings.request_timeout, on_message=on_message
            )
        except (TooManyPending, CallTimeout, SessionClosed) as exc:
            status, code, text, kind = _FAILURES[type(exc)]
            if not reply.status:
                return await reply.rpc_fail(status, message["id"], code, text, kind)
            answer = rpc_error(message["id"], code, text, kind, reply.rid)
        if not reply.status:
            await reply.start_stream(extra)
        await reply.chunk(event("message", answer))

    if await _while_connected(req.stream, exchange):
        reply.status = reply.status or 499


async def _while_connected(
    stream: Stream, body: Callable[[], Awaitable[None]], *background: Callable[[], Awaitable[None]]
) -> bool:
    """Run ``body`` (and ``background`` tasks, cancelled when it returns) while watching
    the client; True if the client went away first (``body`` cancelled). An exception of
    ``body`` or a ``StreamBroken`` of a background task is raised here, as itself."""
    failure: Exception | None = None

    async def guarded(task: Callable[[], Awaitable[None]]) -> None:
        nonlocal failure
        try:
            await task()
        except StreamBroken as exc:
            failure = failure or exc
            scope.cancel()

    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_watch_client, stream, scope)
            for task in background:
                nursery.start_soon(guarded, task)
            try:
                await body()
            except Exception as exc:
                failure = exc
            nursery.cancel_scope.cancel()
    if failure is not None:
        raise failure
    return scope.cancelled_caught


async def _watch_client(stream: Stream, scope: trio.CancelScope) -> None:
    """Cancel ``scope`` when the client closes (bytes it sends are dropped: the
    connection ends with this response)."""
    buf = bytearray(CHUNK)
    try:
        while await stream.recv_into(buf, CHUNK):
            pass
    except StreamBroken:
        pass
    scope.cancel()


async def _stream(req: ApiRequest, reply: _Reply, session: Session, kind: str) -> None:
    """A subscription as an event stream, with heartbeats, until it ends or the client
    goes away."""
    if negotiate(header(req.headers, b"accept"), True) != "sse":
        return await reply.error(406, "not_acceptable", "this endpoint is text/event-stream")
    try:
        sub = session.subscribe(kind)
    except SessionClosed:
        return await reply.error(502, "session_closed", "the tunnel session ended")
    lock = trio.Lock()

    async def write(data: bytes) -> None:
        async with lock:
            await reply.chunk(data)

    async def heartbeat() -> None:
        while True:
            await trio.sleep(req.settings.heartbeat_interval)
            await write(HEARTBEAT)

    async def relay() -> None:
        async for name, data in sub:
            if kind == "mcp" and name == "closed":
                continue  # the MCP stream carries messages only: it just ends
            await write(event(name, data))

    try:
        await reply.start_stream()
        await _while_connected(req.stream, relay, heartbeat)
    finally:
        sub.close()
