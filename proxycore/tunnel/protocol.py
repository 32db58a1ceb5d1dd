"""The tunnel's wire protocol: pure (no I/O, no event loop).

JSON text frames, one object each, on ``[tunnel] path``:

- client -> gateway: ``register {type, sessionId, server: {name, description, protocol}}``,
  ``heartbeat {type, sessionId}``, ``unregister {type, sessionId}``,
  ``response {type, sessionId, payload}``, ``notification {type, sessionId, payload}``;
- gateway -> client: ``register_ack {type, sessionId, status: "success"}``,
  ``heartbeat {type, sessionId, timestamp}``, ``request {type, sessionId, payload}``,
  ``error {type, message}``.

A client may put its own ``sessionId`` in any message: it is parsed (``client_session``)
and never used for identity or routing; the gateway makes the session id.

:func:`parse_client` / :func:`parse_gateway` turn a frame into a message or raise
:class:`ProtocolError` (its text goes into an ``error`` frame); the ``*_frame`` functions
build frames. Also here: JSON-RPC classification (:func:`is_request`,
:func:`is_notification`, :func:`is_response`) and :class:`IdRewriter`, which maps callers'
JSON-RPC ids to ids unique per session and back.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

__all__ = [
    "ClientMessage",
    "GatewayHeartbeat",
    "GatewayMessage",
    "Heartbeat",
    "IdRewriter",
    "Notification",
    "ProtocolError",
    "Register",
    "RegisterAck",
    "Request",
    "Response",
    "ServerError",
    "Unregister",
    "encode",
    "error_frame",
    "heartbeat_frame",
    "is_notification",
    "is_request",
    "is_response",
    "parse_client",
    "parse_gateway",
    "register_ack_frame",
    "request_frame",
    "timestamp",
]

#: The most characters of a client-chosen string (names, ids) kept.
MAX_NAME: Final = 256

JsonObject = dict[str, Any]


class ProtocolError(ValueError):
    """A frame that is not a valid message; ``str(exc)`` is safe to send back."""


# -- client -> gateway -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Register:
    server_name: str
    description: str = ""
    protocol: str = ""
    #: The client's own ``sessionId`` if it sent one: informational only.
    client_session: str = ""


@dataclass(frozen=True, slots=True)
class Heartbeat:
    client_session: str = ""


@dataclass(frozen=True, slots=True)
class Unregister:
    client_session: str = ""


@dataclass(frozen=True, slots=True)
class Response:
    """A JSON-RPC message from the tunnelled server (``type: response``)."""

    payload: JsonObject
    client_session: str = ""


@dataclass(frozen=True, slots=True)
class Notification:
    """A JSON-RPC message from the tunnelled server (``type: notification``)."""

    payload: JsonObject
    client_session: str = ""


ClientMessage = Register | Heartbeat | Unregister | Response | Notification


# -- gateway -> client -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RegisterAck:
    session_id: str
    status: str


@dataclass(frozen=True, slots=True)
class GatewayHeartbeat:
    session_id: str
    timestamp: str


@dataclass(frozen=True, slots=True)
class Request:
    session_id: str
    payload: JsonObject


@dataclass(frozen=True, slots=True)
class ServerError:
    """An ``error`` frame from the gateway."""

    message: str


GatewayMessage = RegisterAck | GatewayHeartbeat | Request | ServerError


def _load(frame: str | bytes, max_bytes: int) -> JsonObject:
    size = len(frame) if isinstance(frame, bytes) or frame.isascii() else len(frame.encode())
    if max_bytes and size > max_bytes:
        raise ProtocolError(f"message too large ({size} bytes, limit {max_bytes})")
    if isinstance(frame, bytes):
        raise ProtocolError("binary frames are not supported: send JSON text frames")
    try:
        data = json.loads(frame)
    except ValueError:  # JSONDecodeError, and RecursionError's cousins via ValueError
        raise ProtocolError("message is not valid JSON") from None
    except RecursionError:
        raise ProtocolError("message is nested too deeply") from None
    if not isinstance(data, dict):
        raise ProtocolError("message must be a JSON object")
    kind = data.get("type")
    if not isinstance(kind, str):
        raise ProtocolError("message has no 'type'")
    return data


def _text(data: JsonObject, key: str, *, required: bool = False, where: str = "") -> str:
    value = data.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value):
        raise ProtocolError(f"'{where or data.get('type')}' needs a string '{key}'")
    return value[:MAX_NAME]


def _payload(data: JsonObject) -> JsonObject:
    payload = data.get("payload")
    if not isinstance(payload, dict):
        raise ProtocolError(f"'{data['type']}' needs a JSON object 'payload'")
    return payload


def parse_client(frame: str | bytes, max_bytes: int = 0) -> ClientMessage:
    """A client's frame as a message. Raises :class:`ProtocolError` (not JSON, not an
    object, unknown type, missing or mistyped fields, larger than ``max_bytes``)."""
    data = _load(frame, max_bytes)
    kind = data["type"]
    session = data.get("sessionId")
    client_session = session[:MAX_NAME] if isinstance(session, str) else ""
    if kind == "register":
        server = data.get("server")
        if not isinstance(server, dict):
            raise ProtocolError("'register' needs a 'server' object")
        return Register(
            server_name=_text(server, "name", required=True, where="server"),
            description=_text(server, "description", where="server"),
            protocol=_text(server, "protocol", where="server"),
            client_session=client_session,
        )
    if kind == "heartbeat":
        return Heartbeat(client_session)
    if kind == "unregister":
        return Unregister(client_session)
    if kind == "response":
        return Response(_payload(data), client_session)
    if kind == "notification":
        return Notification(_payload(data), client_session)
    raise ProtocolError(f"unknown message type {kind[:MAX_NAME]!r}")


def parse_gateway(frame: str | bytes, max_bytes: int = 0) -> GatewayMessage:
    """A gateway's frame as a message (the client side). Raises :class:`ProtocolError`."""
    data = _load(frame, max_bytes)
    kind = data["type"]
    if kind == "register_ack":
        return RegisterAck(_text(data, "sessionId", required=True), _text(data, "status"))
    if kind == "heartbeat":
        stamp = data.get("timestamp")
        return GatewayHeartbeat(_text(data, "sessionId"), "" if stamp is None else str(stamp))
    if kind == "request":
        return Request(_text(data, "sessionId"), _payload(data))
    if kind == "error":
        message = data.get("message")
        return ServerError(message if isinstance(message, str) else "")
    raise ProtocolError(f"unknown message type {kind[:MAX_NAME]!r}")


# -- frames ----------------------------------------------------------------------


def encode(message: JsonObject) -> str:
    """One frame's text (compact JSON)."""
    return json.dumps(message, separators=(",", ":"), ensure_ascii=False)


def timestamp() -> str:
    """Now, as the ``timestamp`` of a gateway heartbeat (ISO 8601, UTC)."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def register_ack_frame(session_id: str) -> str:
    return encode({"type": "register_ack", "sessionId": session_id, "status": "success"})


def heartbeat_frame(session_id: str, stamp: str | None = None) -> str:
    return encode({"type": "heartbeat", "sessionId": session_id, "timestamp": stamp or timestamp()})


def request_frame(session_id: str, payload: JsonObject) -> str:
    return encode({"type": "request", "sessionId": session_id, "payload": payload})


def error_frame(message: str) -> str:
    return encode({"type": "error", "message": message})


# -- JSON-RPC --------------------------------------------------------------------


def is_request(message: JsonObject) -> bool:
    """A JSON-RPC request: ``method`` and ``id``."""
    return "method" in message and "id" in message


def is_notification(message: JsonObject) -> bool:
    """A JSON-RPC notification: ``method``, no ``id``."""
    return "method" in message and "id" not in message


def is_response(message: JsonObject) -> bool:
    """A JSON-RPC response: ``id`` and ``result`` or ``error``, no ``method``."""
    return (
        "method" not in message and "id" in message and ("result" in message or "error" in message)
    )


class IdRewriter:
    """Callers' JSON-RPC ids <-> ids unique within one session.

    Every request sent down a session gets a fresh integer id (never reused while the
    session lives); :meth:`restore` gives the caller's id back for a response.
    """

    def __init__(self) -> None:
        self._next = 1
        self._original: dict[int, object] = {}

    def __len__(self) -> int:
        return len(self._original)

    def assign(self, original: object) -> int:
        """A new session-unique id standing for ``original``."""
        new = self._next
        self._next += 1
        self._original[new] = original
        return new

    def restore(self, new: object) -> object:
        """The caller's id for ``new``; raises ``KeyError`` if it is not (any longer) one
        of ours. The mapping stays until :meth:`release`."""
        if not isinstance(new, int) or isinstance(new, bool):
            raise KeyError(new)
        return self._original[new]

    def release(self, new: int) -> None:
        self._original.pop(new, None)

    def rewrite(self, message: JsonObject, new: int) -> JsonObject:
        """``message`` (a copy) with ``id`` set to ``new``."""
        return {**message, "id": new}
