"""A tiny stdio MCP server for the tunnel tests: hand-written JSON-RPC over stdin/stdout.

- ``initialize`` -> server info and the tools capability;
- ``notifications/initialized`` -> sends one notification (``notifications/message``) and
  one server->client request (``ping``, id ``"srv-1"``);
- ``tools/list`` -> ``echo``, ``pid``, ``exit``;
- ``tools/call``: ``echo`` returns its ``text``, ``pid`` this process's id, ``exit`` ends the
  process (after answering), ``notify`` sends a progress notification and a ``ping`` first;
- ``ping`` -> ``{}``; a response from the client (to our ``ping``) is recorded on stderr.

``--ignore-sigterm`` makes it ignore SIGTERM (to test the kill after the grace period).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from typing import Any

PROTOCOL = "2025-06-18"
TOOLS = [
    {
        "name": "echo",
        "description": "Echo the text back",
        "inputSchema": {
            "type": "object",
            "properties": {"text": {"type": "string"}},
            "required": ["text"],
        },
    },
    {"name": "pid", "description": "The server's pid", "inputSchema": {"type": "object"}},
    {"name": "exit", "description": "Exit the server", "inputSchema": {"type": "object"}},
    {"name": "notify", "description": "Notify, ask, answer", "inputSchema": {"type": "object"}},
]


def send(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def text_result(request_id: Any, text: str) -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "id": request_id,
        "result": {"content": [{"type": "text", "text": text}], "isError": False},
    }


def handle(message: dict[str, Any]) -> bool:
    """Answer one message; False to exit."""
    method = message.get("method")
    request_id = message.get("id")
    if method is None:
        print(f"mcp_stdio_server: client answered {request_id!r}", file=sys.stderr, flush=True)
        return True
    if method == "initialize":
        version = message.get("params", {}).get("protocolVersion", PROTOCOL)
        result = {
            "protocolVersion": version,
            "capabilities": {"tools": {"listChanged": False}, "logging": {}},
            "serverInfo": {"name": "test-stdio", "version": "1.0"},
        }
        send({"jsonrpc": "2.0", "id": request_id, "result": result})
    elif method == "notifications/initialized":
        send(
            {
                "jsonrpc": "2.0",
                "method": "notifications/message",
                "params": {"level": "info", "data": "hello from the stdio server"},
            }
        )
        send({"jsonrpc": "2.0", "id": "srv-1", "method": "ping"})
    elif method == "tools/list":
        send({"jsonrpc": "2.0", "id": request_id, "result": {"tools": TOOLS}})
    elif method == "tools/call":
        params = message.get("params", {})
        name = params.get("name")
        arguments = params.get("arguments") or {}
        if name == "echo":
            send(text_result(request_id, str(arguments.get("text", ""))))
        elif name == "pid":
            send(text_result(request_id, str(os.getpid())))
        elif name == "exit":
            send(text_result(request_id, "bye"))
            return False
        elif name == "notify":
            token = params.get("_meta", {}).get("progressToken")
            send(
                {
                    "jsonrpc": "2.0",
                    "method": "notifications/progress",
                    "params": {"progressToken": token, "progress": 1, "total": 1},
                }
            )
            send({"jsonrpc": "2.0", "id": "srv-2", "method": "ping"})
            send(text_result(request_id, "notified"))
        else:
            send(
                {
                    "jsonrpc": "2.0",
                    "id": request_id,
                    "error": {"code": -32602, "message": f"unknown tool {name!r}"},
                }
            )
    elif method == "ping":
        send({"jsonrpc": "2.0", "id": request_id, "result": {}})
    elif request_id is not None:
        send(
            {
                "jsonrpc": "2.0",
                "id": request_id,
                "error": {"code": -32601, "message": f"method not found: {method}"},
            }
        )
    return True


def main() -> int:
    if "--ignore-sigterm" in sys.argv:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    print("this line is not JSON-RPC and must be skipped", flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            message = json.loads(line)
        except ValueError:
            continue
        if isinstance(message, dict) and not handle(message):
            return 0
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
