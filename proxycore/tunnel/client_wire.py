"""The pure core of ``proxycore tunnel`` (:mod:`proxycore.tunnel.client`): no I/O.

Gateway URL normalization, classification of the local server's stdout lines, the reconnect /
restart backoff schedule (jitter from an injectable ``rand``) and the client's wire messages.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Literal
from urllib.parse import urlsplit, urlunsplit

__all__ = [
    "DEFAULT_PATH",
    "NOT_RUNNING",
    "Outbound",
    "backoff_delay",
    "classify_line",
    "heartbeat_message",
    "normalize_gateway_url",
    "not_running_error",
    "register_message",
    "unregister_message",
    "uplink_message",
]

DEFAULT_PATH: Final = "/reverse-proxy/ws"
NOT_RUNNING: Final = -32000

WireType = Literal["response", "notification"]


def normalize_gateway_url(url: str, path: str = DEFAULT_PATH) -> str:
    """The WebSocket URL for ``url``: http -> ws, https -> wss; ``path`` when it has none.

    Raises ValueError for another scheme or no host.
    """
    parts = urlsplit(url.strip())
    scheme = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}.get(parts.scheme.lower())
    if scheme is None or not parts.netloc:
        raise ValueError(f"gateway URL must be http(s):// or ws(s)://HOST...: {url!r}")
    new_path = parts.path if parts.path not in ("", "/") else path
    return urlunsplit((scheme, parts.netloc, new_path, parts.query, ""))


@dataclass(frozen=True, slots=True)
class Outbound:
    """A classified stdout line: what it is and the wire type it goes up as."""

    kind: Literal["request", "response", "notification"]
    payload: dict[str, Any]

    @property
    def wire_type(self) -> WireType:
        # A server->client request travels as "notification": the wire has no other type.
        return "response" if self.kind == "response" else "notification"


def classify_line(line: str | bytes) -> Outbound | None:
    """Classify one line of the child's stdout; None for a line to skip (logged by the caller)."""
    try:
        message = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(message, dict):
        return None
    has_method = isinstance(message.get("method"), str)
    has_id = "id" in message and message["id"] is not None
    if has_method and has_id:
        return Outbound("request", message)
    if has_method:
        return Outbound("notification", message)
    if has_id and ("result" in message or "error" in message):
        return Outbound("response", message)
    return None


def backoff_delay(
    attempt: int,
    base: float = 1.0,
    cap: float = 60.0,
    rand: Callable[[], float] = random.random,
) -> float:
    """Delay before retry ``attempt`` (0-based): ``base * 2**attempt`` capped at ``cap``,
    with jitter: uniform in [half, all] of it (``rand`` returns a float in [0, 1))."""
    delay = min(cap, base * math.pow(2, min(attempt, 62)))
    return delay * (0.5 + 0.5 * rand())


def register_message(session_id: str, name: str, description: str) -> dict[str, Any]:
    return {
        "type": "register",
        "sessionId": session_id,
        "server": {"name": name, "description": description, "protocol": "stdio"},
    }


def heartbeat_message(session_id: str) -> dict[str, Any]:
    return {"type": "heartbeat", "sessionId": session_id}


def unregister_message(session_id: str) -> dict[str, Any]:
    return {"type": "unregister", "sessionId": session_id}


def uplink_message(out: Outbound, session_id: str) -> dict[str, Any]:
    return {"type": out.wire_type, "sessionId": session_id, "payload": out.payload}


def not_running_error(request: dict[str, Any]) -> dict[str, Any]:
    """The JSON-RPC error answering ``request`` while the local server is down."""
    return {
        "jsonrpc": "2.0",
        "id": request.get("id"),
        "error": {"code": NOT_RUNNING, "message": "the local MCP server is not running"},
    }
