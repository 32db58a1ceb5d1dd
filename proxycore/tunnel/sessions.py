"""Tunnel sessions and their registry (one per process, on ``ProxyState.tunnel``).

A :class:`Session` is one registered client socket: the gateway (``gateway.py``) owns the
socket and feeds the session what the client sends (:meth:`Session.deliver`); HTTP callers
(``http_api.py``) use :meth:`Session.call`, :meth:`Session.send`, :meth:`Session.subscribe`
and :meth:`Session.close`. The :class:`Registry` holds the open sessions, enforces the
session limits and answers lookups for a :class:`Caller` (owner or admin; anyone else sees
nothing, so ids cannot be probed).

Nothing here touches a socket: a session writes through the ``send_frame`` coroutine and
closes through the ``close_socket`` coroutine the gateway gives it.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final, Protocol

import trio

from ..config import Tunnel
from ..tunnel.hop import Hop
from ..tunnel.protocol import IdRewriter, is_request, request_frame

__all__ = [
    "CallTimeout",
    "Caller",
    "LimitReached",
    "Registry",
    "Session",
    "SessionClosed",
    "SharedSessions",
    "Subscription",
    "TooManyPending",
]

log: Final = logging.getLogger("proxycore.tunnel")

JsonObject = dict[str, Any]
SendFrame = Callable[[str], Awaitable[None]]
CloseSocket = Callable[[int, str], Awaitable[None]]
#: ``observe(outcome, seconds)`` once per :meth:`Session.call` (metrics).
CallObserver = Callable[[str, float], None]


@dataclass(frozen=True, slots=True)
class Caller:
    """Who asks: the authenticated identity ("" on a route without auth) and admin rights."""

    identity: str
    admin: bool


class SharedSessions(Protocol):
    """The sessions of the other replicas (``[state]``: :mod:`proxycore.tunnel.replicas`)."""

    def changed(self, session_id: str, *, ended: bool = False) -> None:
        """A session of this process opened or ended."""

    async def listed(self, caller: Caller, local: set[str]) -> list[object] | None:
        """``caller``'s sessions held elsewhere (None: the shared state is away)."""

    async def locate(self, key: str, caller: Caller) -> Hop | None:
        """Where the session ``caller`` calls ``key`` is held elsewhere (a relay hop)."""


class SessionClosed(Exception):
    """The session ended (socket dropped, unregistered, closed): HTTP 502."""


class CallTimeout(Exception):
    """No response within the call's timeout: HTTP 504."""


class TooManyPending(Exception):
    """``max_pending_requests`` calls already wait on this session: HTTP 429."""


class LimitReached(Exception):
    """``max_sessions`` or ``max_sessions_per_owner`` reached at register."""


class Subscription:
    """A bounded feed of ``(event name, data)`` from one session.

    Iterate it; it ends after the session's ``("closed", ...)`` event, after :meth:`close`,
    or when the subscriber fell behind by more than ``max_queued`` events: then it yields
    ``("error", {"message": ...})`` and ends (the session never waits for a subscriber).
    """

    def __init__(self, kind: str, max_queued: int, drop: Callable[[Subscription], None]) -> None:
        self.kind = kind
        self._queue: deque[tuple[str, JsonObject]] = deque()
        self._max = max_queued
        self._ended = False
        self._wakeup = trio.Event()
        self._drop = drop

    def push(self, event: str, data: JsonObject) -> None:
        """Queue an event (never blocks); a full queue drops the subscriber."""
        if self._ended:
            return
        if len(self._queue) >= self._max:
            self._queue.clear()
            self._queue.append(("error", {"message": "subscriber too slow: dropped"}))
            self._end()
            return
        self._queue.append((event, data))
        self._wakeup.set()

    def finish(self, event: str, data: JsonObject) -> None:
        """Queue a last event (past the bound) and end."""
        if not self._ended:
            self._queue.append((event, data))
            self._end()

    def _end(self) -> None:
        self._ended = True
        self._wakeup.set()
        self._drop(self)

    def close(self) -> None:
        """Stop the feed (the subscriber left); pending events are discarded."""
        self._queue.clear()
        if not self._ended:
            self._end()

    @property
    def ended(self) -> bool:
        return self._ended

    def __aiter__(self) -> AsyncIterator[tuple[str, JsonObject]]:
        return self._events()

    async def _events(self) -> AsyncIterator[tuple[str, JsonObject]]:
        while True:
            if self._queue:
                await trio.lowlevel.checkpoint()
                yield self._queue.popleft()
                continue
            if self._ended:
                return
            self._wakeup = trio.Event()
            await self._wakeup.wait()


class _Pending:
    """One caller waiting on :meth:`Session.call`."""

    __slots__ = ("on_message", "original_id", "progress", "receive", "send")

    def __init__(self, original_id: object, progress: object) -> None:
        self.original_id, self.progress = original_id, progress
        # Unbounded: the gateway never waits; notifications past _MAX_QUEUED are dropped.
        self.send, self.receive = trio.open_memory_channel[tuple[str, JsonObject]](math.inf)


_MAX_QUEUED: Final = 256


def _progress_token(payload: JsonObject) -> object:
    params = payload.get("params")
    if not isinstance(params, dict):
        return None
    meta = params.get("_meta")
    if isinstance(meta, dict) and meta.get("progressToken") is not None:
        return meta["progressToken"]
    return params.get("progressToken")


class Session:
    """One registered tunnel client (see the module docstring).

    Attributes: ``id`` (gateway-made), ``owner``, ``server_name``, ``description``,
    ``protocol``, ``connected_at`` and ``last_heartbeat`` (``time.time()``)."""

    def __init__(
        self,
        registry: Registry,
        owner: str,
        server_name: str,
        *,
        description: str = "",
        protocol: str = "",
        send_frame: SendFrame,
        close_socket: CloseSocket,
    ) -> None:
        self.id = registry.id_prefix + secrets.token_urlsafe(16)
        self.owner, self.server_name = owner, server_name
        self.description, self.protocol = description, protocol
        self.connected_at = self.last_heartbeat = time.time()
        self._registry = registry
        self._send_frame, self._close_socket = send_frame, close_socket
        self._ids = IdRewriter()
        self._pending: dict[int, _Pending] = {}
        self._subscribers: set[Subscription] = set()
        self._lock = trio.Lock()  # one frame at a time down the socket
        self.closed = False

    # -- for HTTP callers --------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Calls waiting for a response."""
        return len(self._pending)

    def visible_to(self, caller: Caller) -> bool:
        """The owner or an admin; a session without an owner ("") is admins' only."""
        return caller.admin or (bool(self.owner) and caller.identity == self.owner)

    def as_dict(self) -> dict[str, object]:
        return {
            "id": self.id,
            "server_name": self.server_name,
            "owner": self.owner,
            "connected_at": self.connected_at,
            "last_heartbeat": self.last_heartbeat,
            "pending": self.pending,
        }

    async def call(
        self,
        payload: JsonObject,
        *,
        timeout: float,  # noqa: ASYNC109 (the shared API: per-call request_timeout)
        on_message: Callable[[JsonObject], Awaitable[None]] | None = None,
    ) -> JsonObject:
        """Send a caller's JSON-RPC request down and return the response (with the caller's
        id back). Its id is rewritten to one unique in this session, so callers using the
        same id never see each other's answers.

        While waiting, the server's notifications carrying this request's progress token
        (``params._meta.progressToken`` or ``params.progressToken``) and the server's own
        requests arriving while this is the only pending call go to ``on_message``.

        Raises :class:`TooManyPending`, :class:`CallTimeout`, or :class:`SessionClosed`
        (at once when the socket drops)."""
        if self.closed:
            raise SessionClosed(f"session {self.id} is closed")
        if len(self._pending) >= self._registry.settings.max_pending_requests:
            self._registry.observe("too_many_pending", 0.0)
            raise TooManyPending(f"session {self.id} has too many pending requests")
        started = trio.current_time()
        new_id = self._ids.assign(payload.get("id"))
        entry = self._pending[new_id] = _Pending(payload.get("id"), _progress_token(payload))
        outcome = "closed"
        try:
            await self._write(request_frame(self.id, self._ids.rewrite(payload, new_id)))
            with trio.move_on_after(timeout):
                async for kind, message in entry.receive:
                    if kind == "response":
                        outcome = "ok"
                        return {**message, "id": entry.original_id}
                    if on_message is not None:
                        await on_message(message)
                raise SessionClosed(f"session {self.id} closed")
            outcome = "timeout"
            raise CallTimeout(f"no response from session {self.id} within {timeout:g} s")
        finally:
            del self._pending[new_id]
            self._ids.release(new_id)
            self._registry.observe(outcome, trio.current_time() - started)

    async def send(self, payload: JsonObject) -> None:
        """Send a caller's JSON-RPC notification or response down (as a ``request`` frame,
        unchanged). Raises :class:`SessionClosed`."""
        await self._write(request_frame(self.id, payload))

    def subscribe(self, kind: str, max_queued: int = 64) -> Subscription:
        """A feed of this session's events. ``"mcp"``: ``("message", payload)`` for the
        server's requests and notifications not tied to a caller's request; ``"events"``:
        ``("connected" | "registered" | "notification" | "closed", {...})``. Both get
        ``("closed", {...})`` last. Raises :class:`SessionClosed` if the session ended."""
        if kind not in ("mcp", "events"):
            raise ValueError(f"unknown subscription kind {kind!r}")
        if self.closed:
            raise SessionClosed(f"session {self.id} is closed")
        sub = Subscription(kind, max_queued, self._subscribers.discard)
        self._subscribers.add(sub)
        return sub

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Close the client's socket with ``code``; the session ends at once (pending calls
        fail with :class:`SessionClosed`)."""
        self.end(reason or "closed")
        await self._close_socket(code, reason)

    # -- for the gateway ---------------------------------------------------------------

    async def _write(self, frame: str) -> None:
        if self.closed:
            raise SessionClosed(f"session {self.id} is closed")
        async with self._lock:
            try:
                await self._send_frame(frame)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise SessionClosed(f"session {self.id}: socket gone") from exc

    def heartbeat(self) -> None:
        self.last_heartbeat = time.time()

    def publish(self, kind: str, event: str, data: JsonObject) -> None:
        for sub in list(self._subscribers):
            if sub.kind == kind:
                sub.push(event, data)

    def deliver(self, payload: JsonObject) -> None:
        """A JSON-RPC message from the tunnelled server (``response`` or ``notification``
        frame alike: the payload says what it is). Never blocks."""
        if "method" not in payload and "id" in payload:
            try:
                new_id = payload["id"]
                self._ids.restore(new_id)
                entry = self._pending[new_id]
            except (KeyError, TypeError):
                log.debug("session %s: response to unknown id dropped", self.id)
                return
            entry.send.send_nowait(("response", payload))
            return
        token = _progress_token(payload)
        if not is_request(payload) and token is not None:
            for entry in self._pending.values():
                if entry.progress == token:
                    self._to_caller(entry, payload)
                    self.publish("events", "notification", payload)
                    return
        if is_request(payload) and len(self._pending) == 1:
            self._to_caller(next(iter(self._pending.values())), payload)
            return
        self.publish("mcp", "message", payload)
        if not is_request(payload):
            self.publish("events", "notification", payload)

    @staticmethod
    def _to_caller(entry: _Pending, payload: JsonObject) -> None:
        if entry.send.statistics().current_buffer_used < _MAX_QUEUED:
            entry.send.send_nowait(("message", payload))

    def end(self, reason: str) -> None:
        """The session is over (idempotent): removed from the registry, every pending call
        fails at once, every subscriber gets ``closed``."""
        if self.closed:
            return
        self.closed = True
        self._registry.remove(self)
        for entry in self._pending.values():
            entry.send.close()
        data = {"sessionId": self.id, "reason": reason}
        for sub in list(self._subscribers):
            sub.finish("closed", data)


class Registry:
    """The open sessions of this process (``ProxyState.tunnel``)."""

    def __init__(
        self, settings: Tunnel, *, observe: CallObserver | None = None, id_prefix: str = ""
    ) -> None:
        #: Starts every session id (``w<index>-`` under ``serve --workers N``).
        self.id_prefix = id_prefix
        self.settings = settings
        self._sessions: dict[str, Session] = {}
        self._observe = observe
        #: The other replicas' sessions (``[state]`` with a relay listener), or None.
        self.shared: SharedSessions | None = None

    def __len__(self) -> int:
        return len(self._sessions)

    def observe(self, outcome: str, seconds: float) -> None:
        if self._observe is not None:
            self._observe(outcome, seconds)

    def open(
        self,
        owner: str,
        server_name: str,
        *,
        description: str = "",
        protocol: str = "",
        send_frame: SendFrame,
        close_socket: CloseSocket,
    ) -> Session:
        """Register a session. Raises :class:`LimitReached`. The caller (the gateway)
        closes an older session of the same owner and server name (:meth:`same_name`)."""
        settings = self.settings
        if len(self._sessions) >= settings.max_sessions:
            raise LimitReached("too many tunnel sessions on this gateway")
        mine = sum(1 for s in self._sessions.values() if s.owner == owner)
        if mine >= settings.max_sessions_per_owner:
            raise LimitReached("too many tunnel sessions for this identity")
        session = Session(
            self,
            owner,
            server_name,
            description=description,
            protocol=protocol,
            send_frame=send_frame,
            close_socket=close_socket,
        )
        self._sessions[session.id] = session
        if self.shared is not None:
            self.shared.changed(session.id)
        return session

    def same_name(self, owner: str, server_name: str) -> list[Session]:
        """The open sessions of ``owner`` registered as ``server_name``."""
        return [
            s for s in self._sessions.values() if s.owner == owner and s.server_name == server_name
        ]

    def remove(self, session: Session) -> None:
        if self._sessions.pop(session.id, None) is not None and self.shared is not None:
            self.shared.changed(session.id, ended=True)

    def all(self) -> list[Session]:
        """Every open session of this process (internal use: no visibility check)."""
        return list(self._sessions.values())

    def get(self, session_id: str) -> Session | None:
        """By id, whoever asks (internal use: no visibility check)."""
        return self._sessions.get(session_id)

    def find(self, key: str, caller: Caller) -> Session | None:
        """The session with id ``key``, or else registered as server name ``key`` among the
        sessions ``caller`` may see (the caller's own first; the newest wins); None: 404."""
        session = self._sessions.get(key)
        if session is not None:
            return session if session.visible_to(caller) else None
        named = [
            s for s in self._sessions.values() if s.server_name == key and s.visible_to(caller)
        ]
        if not named:
            return None
        own = [s for s in named if s.owner == caller.identity and s.owner]
        pool = own or named
        return max(pool, key=lambda s: s.connected_at)

    def list(self, caller: Caller) -> list[Session]:
        """The sessions ``caller`` may see (admins: all), oldest first."""
        return [s for s in self._sessions.values() if s.visible_to(caller)]
