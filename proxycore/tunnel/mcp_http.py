"""The pure pieces of the tunnel's HTTP side (``http_api``): which endpoint a path names,
``Accept`` negotiation, JSON-RPC classification of a POSTed body, ``Mcp-Session-Id``
values bound to tunnel sessions, and the JSON-RPC error and SSE event bytes. No I/O, no
event loop."""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Final, Literal

from ..http.headers import Headers
from ..tunnel.protocol import is_notification, is_request, is_response

__all__ = [
    "INVALID_REQUEST",
    "NOT_FOUND",
    "PARSE_ERROR",
    "SESSION_GONE",
    "TIMED_OUT",
    "TOO_MANY_PENDING",
    "Kind",
    "McpSessions",
    "Target",
    "classify",
    "dumps",
    "event",
    "header",
    "negotiate",
    "parse_path",
    "rpc_error",
    "wants_stream",
]

JsonObject = dict[str, Any]

#: JSON-RPC error codes: the standard ones, then the gateway's (server error range).
PARSE_ERROR: Final = -32700
INVALID_REQUEST: Final = -32600
TOO_MANY_PENDING: Final = -32000
SESSION_GONE: Final = -32001
TIMED_OUT: Final = -32002
NOT_FOUND: Final = -32003


@dataclass(frozen=True, slots=True)
class Target:
    """What a path under the prefix names: ``list`` (no key), ``session``, ``mcp``, ``events``."""

    kind: Literal["list", "session", "mcp", "events"]
    key: str = ""


def parse_path(path: str, prefix: str) -> Target | None:
    """The endpoint ``path`` names under ``prefix``; None: nothing (404)."""
    prefix = prefix.rstrip("/")
    if path in (prefix, prefix + "/"):
        return Target("list")
    if not path.startswith(prefix + "/"):
        return None
    parts = path[len(prefix) + 1 :].split("/")
    if parts and parts[-1] == "" and len(parts) > 1:
        parts.pop()  # one trailing slash
    if not parts[0] or len(parts) > 2:
        return None
    if len(parts) == 1:
        return Target("session", parts[0])
    if parts[1] in ("mcp", "events"):
        return Target("mcp" if parts[1] == "mcp" else "events", parts[0])
    return None


def header(headers: Headers, name: bytes) -> bytes | None:
    """All values of ``name`` joined with ``,`` (None: absent)."""
    values = [v for n, v in headers if n.lower() == name]
    return b",".join(values) if values else None


def _quality(ranges: dict[str, float], media: str) -> float:
    """The q of ``media`` under the most specific matching range (0: not acceptable)."""
    major = media.split("/", 1)[0]
    for key in (media, major + "/*", "*/*"):
        if key in ranges:
            return ranges[key]
    return 0.0


def negotiate(accept: bytes | None, streaming: bool) -> Literal["json", "sse"] | None:
    """The answer's form for a request: ``accept`` is the Accept value (None: absent, both
    forms acceptable); ``streaming``: the request wants its notifications (see the module
    docstring). None: neither form is acceptable (406)."""
    if accept is None:
        json_q = sse_q = 1.0
    else:
        ranges: dict[str, float] = {}
        for item in accept.decode("latin-1").split(","):
            media, *params = (p.strip() for p in item.split(";"))
            if not media:
                continue
            q = 1.0
            for param in params:
                name, _, value = param.partition("=")
                if name.strip().lower() == "q":
                    try:
                        q = float(value)
                    except ValueError:
                        q = 0.0
            ranges[media.lower()] = max(q, ranges.get(media.lower(), 0.0))
        json_q = _quality(ranges, "application/json")
        sse_q = _quality(ranges, "text/event-stream")
    if json_q > 0 and sse_q > 0:
        return "sse" if streaming else "json"
    if json_q > 0:
        return "json"
    return "sse" if sse_q > 0 else None


def wants_stream(payload: JsonObject) -> bool:
    """Does this request want its progress notifications (``params._meta.progressToken``)?"""
    params = payload.get("params")
    if not isinstance(params, dict):
        return False
    meta = params.get("_meta")
    return isinstance(meta, dict) and meta.get("progressToken") is not None


Kind = Literal["request", "notification", "response", "batch", "invalid", "parse_error"]


def classify(body: bytes) -> tuple[Kind, JsonObject]:
    """What a POSTed body is: one JSON-RPC request, notification or response, a batch (400
    per the spec), invalid JSON-RPC or not JSON at all."""
    try:
        message = json.loads(body)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return "parse_error", {}
    if isinstance(message, list):
        return "batch", {}
    if not isinstance(message, dict) or message.get("jsonrpc") != "2.0":
        return "invalid", {}
    request_id = message.get("id")
    if "id" in message and (isinstance(request_id, bool) or not isinstance(request_id, (str, int))):
        return "invalid", {}
    if "method" in message and not isinstance(message["method"], str):
        return "invalid", {}
    if is_request(message):
        return "request", message
    if is_notification(message):
        return "notification", message
    if is_response(message):
        return "response", message
    return "invalid", {}


class McpSessions:
    """``Mcp-Session-Id`` values bound to tunnel sessions: ``nonce.mac`` where the mac
    is an HMAC of the tunnel session id and the nonce under a per-process key, so a value
    is valid only on the tunnel session it was made for; deleted ones are remembered (the
    newest ``max_ended``) and refused."""

    def __init__(self, max_ended: int = 10_000) -> None:
        self._key = secrets.token_bytes(32)
        self._ended: OrderedDict[str, None] = OrderedDict()
        self._max_ended = max_ended

    def _mac(self, session_id: str, nonce: str) -> str:
        data = f"{session_id}\0{nonce}".encode()
        return hmac.new(self._key, data, hashlib.sha256).hexdigest()[:32]

    def mint(self, session_id: str) -> str:
        nonce = secrets.token_urlsafe(12)
        return f"{nonce}.{self._mac(session_id, nonce)}"

    def valid(self, value: bytes, session_id: str) -> bool:
        text = value.decode("ascii", "replace").strip()
        nonce, dot, mac = text.partition(".")
        if not dot or text in self._ended:
            return False
        return hmac.compare_digest(mac, self._mac(session_id, nonce))

    def end(self, value: bytes) -> None:
        self._ended[value.decode("ascii", "replace").strip()] = None
        while len(self._ended) > self._max_ended:
            self._ended.popitem(last=False)


def rpc_error(request_id: object, code: int, message: str, kind: str, rid: str) -> JsonObject:
    """A JSON-RPC error response; ``data`` names the error type and the request id."""
    error = {"code": code, "message": message, "data": {"type": kind, "request_id": rid}}
    return {"jsonrpc": "2.0", "id": request_id, "error": error}


def event(name: str, data: JsonObject) -> bytes:
    """One SSE event (compact JSON is one line: no newline can split the data field)."""
    return b"event: " + name.encode() + b"\ndata: " + dumps(data) + b"\n\n"


def dumps(data: object) -> bytes:
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode()
