"""The simulator's MCP server (Streamable HTTP, JSON-RPC over POST): sessions, ``ping``,
``tools/list``, ``tools/call`` of an ``echo`` tool. Pure: :mod:`proxycore.tools.sim`
sends the answers as JSON or as an SSE stream.

Sessions: ``initialize`` creates one (``Mcp-Session-Id``); a request with an unknown
session id is answered 404 (the client must initialize again), one without a session
400. ``expire_after`` ends each session after that many calls (the next call gets the
404), which is how a test or a demo shows re-initialization.
"""

from __future__ import annotations

import json
import secrets
from collections import OrderedDict
from typing import Final

__all__ = ["MAX_SESSIONS", "McpReply", "McpServer"]

#: Sessions kept; the oldest is forgotten past this (its next request gets a 404).
MAX_SESSIONS: Final = 10_000
_ECHO_TOOL: Final = {
    "name": "echo",
    "description": "Returns its text argument.",
    "inputSchema": {
        "type": "object",
        "properties": {"text": {"type": "string"}},
        "required": ["text"],
    },
}


class McpReply:
    """An HTTP answer: status, the session id to send (if any), the JSON-RPC message."""

    __slots__ = ("message", "session", "status")

    def __init__(self, status: int, message: object = None, session: str | None = None) -> None:
        self.status = status
        self.message = message
        self.session = session

    @property
    def body(self) -> bytes:
        return b"" if self.message is None else json.dumps(self.message).encode("utf-8")

    def http(self, *, sse: bool) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        """Status, headers and body: JSON, or (``sse``, a 200) one SSE ``message`` event."""
        headers = [] if self.session is None else [(b"mcp-session-id", self.session.encode())]
        if sse and self.status == 200:
            headers.append((b"content-type", b"text/event-stream"))
            return 200, headers, b"event: message\ndata: " + self.body + b"\n\n"
        body = self.body
        headers.append((b"content-type", b"application/json" if body else b"text/plain"))
        headers.append((b"content-length", str(len(body)).encode()))
        return self.status, headers, body


def _error(ident: object, code: int, message: str) -> dict[str, object]:
    return {"jsonrpc": "2.0", "id": ident, "error": {"code": code, "message": message}}


class McpServer:
    """The sessions of one simulator and the answer to each POST."""

    def __init__(self, expire_after: int | None = None) -> None:
        self.sessions: OrderedDict[str, int] = OrderedDict()  # id -> calls answered
        self.expire_after = expire_after

    def handle(self, session: str | None, body: bytes, expire_after: int | None) -> McpReply:
        try:
            message = json.loads(body)
        except ValueError:
            return McpReply(400, _error(None, -32700, "parse error"))
        if not isinstance(message, dict) or message.get("jsonrpc") != "2.0":
            return McpReply(400, _error(None, -32600, "invalid request"))
        method = message.get("method")
        ident = message.get("id")
        if method == "initialize":
            sid = secrets.token_hex(16)
            self.sessions[sid] = 0
            while len(self.sessions) > MAX_SESSIONS:
                self.sessions.popitem(last=False)
            result = {
                "protocolVersion": "2025-06-18",
                "capabilities": {"tools": {}},
                "serverInfo": {"name": "proxycore-sim", "version": "1"},
            }
            return McpReply(200, {"jsonrpc": "2.0", "id": ident, "result": result}, sid)
        if session is None:
            return McpReply(400, _error(ident, -32600, "Mcp-Session-Id required"))
        calls = self.sessions.get(session)
        limit = expire_after if expire_after is not None else self.expire_after
        if calls is None or (limit is not None and calls >= limit):
            self.sessions.pop(session, None)
            return McpReply(404, _error(ident, -32001, "session not found"))
        if ident is None:  # a notification
            return McpReply(202)
        self.sessions[session] = calls + 1
        return McpReply(200, self._answer(ident, method, message.get("params")))

    def end(self, session: str | None) -> int:
        """DELETE: forget a session (200), or 404."""
        return 200 if session is not None and self.sessions.pop(session, None) is not None else 404

    def _answer(self, ident: object, method: object, params: object) -> dict[str, object]:
        if method == "ping":
            return {"jsonrpc": "2.0", "id": ident, "result": {}}
        if method == "tools/list":
            return {"jsonrpc": "2.0", "id": ident, "result": {"tools": [_ECHO_TOOL]}}
        if method == "tools/call":
            args = params.get("arguments") if isinstance(params, dict) else None
            name = params.get("name") if isinstance(params, dict) else None
            text = args.get("text") if isinstance(args, dict) else None
            if name != "echo":
                return _error(ident, -32602, "unknown tool")
            if not isinstance(text, str):
                return _error(ident, -32602, "echo needs a text argument")
            content = [{"type": "text", "text": text}]
            return {"jsonrpc": "2.0", "id": ident, "result": {"content": content}}
        return _error(ident, -32601, "method not found")
