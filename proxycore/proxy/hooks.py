"""Hooks for the embedded library: look at or change exchanges as they pass.

All hooks are optional and async. They run inside the exchange's task, so a
slow hook slows only its own exchange. A hook that raises is logged (with the
request id) and the client gets a 500 JSON error if nothing was sent yet;
the connection survives, no traceback is shown to the client.

- ``on_request(request) -> Response | None``: before the upstream is asked
  (WebSocket upgrades included: an answer replaces the upgrade).
  Change ``request.headers`` (sent upstream), or return a :class:`Response` (status
  200-599) to answer the client directly (a policy hook).
- ``on_response_head(exchange, status, headers)``: the upstream's head (for an
  upgrade its 101 or refusal), before it is sent on; ``headers`` may be changed
  in place.

Headers a hook sets must be ``(bytes, bytes)`` pairs with RFC 9110 token names and
values without control characters (HTAB allowed); anything else is a 500 and one
log line, never sent on.
- ``on_sse_event(exchange, event)``: every parsed SSE event, after its bytes
  were forwarded (needs the route's SSE tap, which a set hook turns on).
- ``on_exchange_end(exchange, summary)``: once per exchange, after the last
  byte: status, bytes, timing, outcome, and the SSE events if the tap was on.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from ..http.headers import Headers as Headers
from ..http.sse import SSEEvent

__all__ = ["ExchangeInfo", "Hooks", "Request", "Response", "Summary"]


@dataclass(slots=True)
class ExchangeInfo:
    """What a hook may know about an exchange (never a credential)."""

    request_id: str
    route: str
    method: str
    path: str
    client: str
    identity: str = ""
    #: Free space for the embedding program (e.g. a chat session key).
    extra: dict[str, object] = field(default_factory=dict)


@dataclass(slots=True)
class Request:
    """The request about to go upstream. ``headers`` are the client's (filtered later
    like any client header: hop-by-hop and identity headers never pass)."""

    exchange: ExchangeInfo
    method: str
    path: str
    query: str
    headers: Headers
    #: The request body when it was complete in the first read (else None: streamed).
    body: bytes | None


@dataclass(slots=True)
class Response:
    """A direct answer from ``on_request``."""

    status: int = 200
    headers: Headers = field(default_factory=list)
    body: bytes = b""


@dataclass(slots=True)
class Summary:
    status: int
    outcome: str
    bytes_in: int
    bytes_out: int
    ttfb: float | None
    duration: float
    events: list[SSEEvent] | None = None
    events_truncated: bool = False


@dataclass(slots=True)
class Hooks:
    on_request: Callable[[Request], Awaitable[Response | None]] | None = None
    on_response_head: Callable[[ExchangeInfo, int, Headers], Awaitable[None]] | None = None
    on_sse_event: Callable[[ExchangeInfo, SSEEvent], Awaitable[None]] | None = None
    on_exchange_end: Callable[[ExchangeInfo, Summary], Awaitable[None]] | None = None
