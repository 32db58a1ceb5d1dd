"""MCP over Streamable HTTP, the client side a virtual user needs: JSON-RPC bodies, the
session id, and reading a reply sent as JSON or as an SSE stream.

A virtual user (:class:`McpUser`, one per slot) sends ``initialize`` once, keeps the
``Mcp-Session-Id`` the server gave, sends ``notifications/initialized``, then calls the
method in a loop, every call carrying the session id and ``MCP-Protocol-Version``.
Pure: no trio, no I/O.
"""

from __future__ import annotations

import json
import re
from typing import Final

from ..loadgen.llm import SSESplitter

__all__ = [
    "PROTOCOL_VERSION",
    "REQUEST_HEADERS",
    "McpUser",
    "Outcome",
    "content_type",
    "read_reply",
    "session_id",
]

PROTOCOL_VERSION: Final = "2025-06-18"
#: Added to every MCP request unless the user gave them.
REQUEST_HEADERS: Final = (
    ("Content-Type", "application/json"),
    ("Accept", "application/json, text/event-stream"),
)
_SESSION: Final = re.compile(rb"\r\nmcp-session-id:[ \t]*([^\r\n]*?)[ \t]*\r\n", re.IGNORECASE)
_CONTENT_TYPE: Final = re.compile(rb"\r\ncontent-type:[ \t]*([^\r\n;]*)", re.IGNORECASE)
#: A reply body larger than this is not parsed (counted as a protocol error).
MAX_REPLY_BYTES: Final = 4 * 1024 * 1024

#: ``(ok, error code)``: ``(True, None)`` a result; ``(False, code)`` a JSON-RPC error;
#: ``(False, None)`` no reply with the call's id (a protocol error).
Outcome = tuple[bool, int | None]


def session_id(head: bytes) -> bytes | None:
    """The ``Mcp-Session-Id`` of a response head (None if absent or empty)."""
    m = _SESSION.search(head)
    return m[1] if m is not None and m[1] else None


def content_type(head: bytes) -> bytes:
    """The media type of a response head, lowercased (b"" if absent)."""
    m = _CONTENT_TYPE.search(head)
    return m[1].strip().lower() if m is not None else b""


def _match(message: object, want: int) -> Outcome | None:
    if isinstance(message, list):
        for item in message:
            found = _match(item, want)
            if found is not None:
                return found
        return None
    if not isinstance(message, dict) or message.get("id") != want:
        return None
    if "result" in message:
        return True, None
    error = message.get("error")
    code = error.get("code") if isinstance(error, dict) else None
    return False, code if isinstance(code, int) and not isinstance(code, bool) else 0


def read_reply(head: bytes, body: bytes, want: int) -> Outcome:
    """The reply to request ``want`` in a response: a JSON body, or the first matching
    message of an SSE stream (notifications and requests before it are skipped)."""
    if content_type(head) == b"text/event-stream":
        for _, data in SSESplitter().feed(body + b"\n\n"):
            try:
                found = _match(json.loads(data), want)
            except ValueError:
                continue
            if found is not None:
                return found
        return False, None
    try:
        found = _match(json.loads(body), want)
    except ValueError:
        return False, None
    return found if found is not None else (False, None)


class McpUser:
    """One virtual user's session: its id (None: initialize first) and request ids."""

    __slots__ = ("last_id", "method", "params", "ready", "session")

    def __init__(self, method: str, params: str | None) -> None:
        self.method = method
        self.params: object = json.loads(params) if params is not None else None
        self.session: bytes | None = None
        #: initialize and notifications/initialized went through.
        self.ready = False
        self.last_id = 0

    def _request(self, method: str, params: object) -> tuple[int, bytes]:
        self.last_id += 1
        message: dict[str, object] = {"jsonrpc": "2.0", "id": self.last_id, "method": method}
        if params is not None:
            message["params"] = params
        return self.last_id, json.dumps(message).encode("utf-8")

    def initialize(self) -> tuple[int, bytes]:
        return self._request(
            "initialize",
            {
                "protocolVersion": PROTOCOL_VERSION,
                "capabilities": {},
                "clientInfo": {"name": "proxycore-loadtest", "version": "1"},
            },
        )

    def initialized(self) -> bytes:
        message = {"jsonrpc": "2.0", "method": "notifications/initialized"}
        return json.dumps(message).encode("utf-8")

    def call(self) -> tuple[int, bytes]:
        return self._request(self.method, self.params)

    def headers(self) -> tuple[tuple[bytes, bytes], ...]:
        """The per-session fields of a request after ``initialize``."""
        if self.session is None:
            return ()
        return (
            (b"Mcp-Session-Id", self.session),
            (b"MCP-Protocol-Version", PROTOCOL_VERSION.encode()),
        )
