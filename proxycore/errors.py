"""The proxy's error tree and how an error becomes a client response.

Every error the proxy answers on its own (as opposed to relaying the upstream's
answer) is a :class:`ProxyError` carrying the status to send, a short machine
``type`` for the JSON body, and a message that is safe to show to the client:
it never quotes request bytes, headers or secrets.

Pure module: no trio, no sockets.
"""

from __future__ import annotations

import json
import os
import re
from typing import ClassVar

__all__ = [
    "AuthUnavailable",
    "BadRequest",
    "ClientGone",
    "DownstreamError",
    "DownstreamTimeout",
    "ExpectationFailed",
    "Forbidden",
    "HeadTooLarge",
    "InternalError",
    "LoginRedirect",
    "MethodNotAllowed",
    "NoRoute",
    "PayloadTooLarge",
    "ProxyError",
    "SessionNotFound",
    "TooManyRequests",
    "Unauthorized",
    "UnsupportedVersion",
    "UpstreamConnectError",
    "UpstreamConnectTimeout",
    "UpstreamError",
    "UpstreamProtocolError",
    "UpstreamReset",
    "UpstreamStatus",
    "UpstreamTimeout",
    "connect_reason",
    "error_body",
    "public_reason",
]


class ProxyError(Exception):
    """Base of every error the proxy turns into a response of its own."""

    status: ClassVar[int] = 502
    type: ClassVar[str] = "proxy_error"
    #: Short word for logs and the access log's ``outcome`` field.
    outcome: ClassVar[str] = "error"

    def __init__(
        self,
        message: str,
        *,
        headers: list[tuple[bytes, bytes]] | None = None,
        detail: str = "",
    ) -> None:
        super().__init__(message)
        self.message = message
        #: Extra response headers (``Allow``, ``Retry-After``, ``WWW-Authenticate``...).
        self.headers: list[tuple[bytes, bytes]] = headers or []
        #: For the access log only, never the client: where it failed (upstream host and
        #: port) and the full reason.
        self.detail = detail


class DownstreamError(ProxyError):
    """The client sent something we refuse; answered 400 and the connection closed."""

    status = 400
    type = "bad_request"
    outcome = "bad_request"


class BadRequest(DownstreamError):
    """A request the proxy refuses (400): target, framing, head or body."""


class HeadTooLarge(DownstreamError):
    status = 431
    type = "request_header_fields_too_large"


class UnsupportedVersion(DownstreamError):
    status = 505
    type = "http_version_not_supported"


class DownstreamTimeout(DownstreamError):
    status = 408
    type = "request_timeout"
    outcome = "client_timeout"


class ClientGone(DownstreamError):
    """The client closed or reset its connection; nothing can be answered."""

    status = 499
    type = "client_closed_request"
    outcome = "client_gone"


class NoRoute(ProxyError):
    status = 404
    type = "no_route"
    outcome = "no_route"


class SessionNotFound(ProxyError):
    """An MCP session id that no upstream of the route holds (forged, or its upstream is
    gone): 404, so the client re-initializes, as the MCP specification says."""

    status = 404
    type = "session_not_found"
    outcome = "session_not_found"


class UpstreamError(ProxyError):
    status = 502
    type = "bad_gateway"
    outcome = "upstream_error"
    #: Metric label: connect, timeout, reset, protocol.
    kind: ClassVar[str] = "protocol"


class UpstreamConnectError(UpstreamError):
    type = "upstream_unreachable"
    outcome = "upstream_connect_error"
    kind = "connect"


class UpstreamReset(UpstreamError):
    type = "upstream_reset"
    outcome = "upstream_reset"
    kind = "reset"


class UpstreamProtocolError(UpstreamError):
    type = "upstream_protocol_error"
    outcome = "upstream_protocol_error"
    kind = "protocol"


class UpstreamStatus(UpstreamError):
    """The upstream answered with an error status (reported in-band on SSE routes)."""

    type = "upstream_error_status"
    outcome = "upstream_error_status"
    kind = "status"

    def __init__(self, message: str, *, upstream_status: int) -> None:
        super().__init__(message)
        self.upstream_status = upstream_status


class UpstreamTimeout(UpstreamError):
    status = 504
    type = "upstream_timeout"
    outcome = "upstream_timeout"
    kind = "timeout"


def connect_reason(exc: OSError) -> str:
    """Why a connect failed, fit for a client: the errno's text, never ``strerror``
    (which may name the host, as in "no address for <host>")."""
    if exc.errno is not None and exc.errno > 0:
        return os.strerror(exc.errno)
    if exc.errno is not None and exc.strerror:  # getaddrinfo (EAI_*): fixed texts
        return exc.strerror
    return "connection failed"


_QUOTED = re.compile(r"(?:\s+for)?\s*(?:'[^']*'|\"[^\"]*\")")


def public_reason(reason: str) -> str:
    """``reason`` without the names it quotes (host names, addresses), for a client:
    "Hostname mismatch, certificate is not valid for 'h'." -> "..., certificate is not valid."
    """
    return _QUOTED.sub("", reason)


def error_body(status_type: str, message: str, request_id: str) -> bytes:
    """The JSON body of every proxy-made error response."""
    return json.dumps(
        {"error": {"type": status_type, "message": message, "request_id": request_id}},
        separators=(",", ":"),
    ).encode()


class UpstreamConnectTimeout(UpstreamConnectError):
    outcome = "upstream_connect_timeout"
    kind = "timeout"


class ExpectationFailed(DownstreamError):
    status = 417
    type = "expectation_failed"


class Unauthorized(ProxyError):
    status = 401
    type = "unauthorized"
    outcome = "unauthorized"


class Forbidden(ProxyError):
    status = 403
    type = "forbidden"
    outcome = "forbidden"


class LoginRedirect(ProxyError):
    """Forward auth refused a browser GET: send it to the login page."""

    status = 302
    type = "login_required"
    outcome = "unauthorized"


class MethodNotAllowed(ProxyError):
    status = 405
    type = "method_not_allowed"
    outcome = "forbidden"


class PayloadTooLarge(DownstreamError):
    status = 413
    type = "payload_too_large"
    outcome = "payload_too_large"


class TooManyRequests(ProxyError):
    status = 429
    type = "too_many_requests"
    outcome = "rate_limited"


class AuthUnavailable(ProxyError):
    """The forward-auth service can't decide: fail closed."""

    status = 503
    type = "auth_unavailable"
    outcome = "auth_unavailable"


class InternalError(ProxyError):
    status = 500
    type = "internal_error"
    outcome = "internal_error"
