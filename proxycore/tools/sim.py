"""An LLM-like SSE upstream simulator (pure ASGI 3), plus a hypercorn/trio runner.

Used by ``proxycore demo``, the bench and the test-suite as a realistic upstream.

Endpoints (see :func:`make_app`):

* ``GET|POST .../stream`` -- SSE token stream. Query overrides: ``ttft_ms``,
  ``interval_ms``, ``events``, ``size`` (bytes per event).
* ``POST /v1/chat/completions`` (OpenAI) and ``POST /v1/messages`` (Anthropic) -- a chat
  answer of real text (:mod:`proxycore.tools.sim_llm`), streamed one word per delta
  (``"stream": true``) with usage at the end, ``max_tokens`` words (default 16). Query
  overrides: ``ttft_ms``, ``interval_ms`` (the token rate), ``tokens`` (words, whatever
  ``max_tokens`` says), ``usage=0`` (no usage), ``cut=1`` (end without the terminator).
* ``POST|DELETE /mcp`` -- an MCP server over Streamable HTTP (:mod:`proxycore.tools.sim_mcp`):
  JSON answers, or an SSE stream with ``?sse=1``; ``?expire_after=N`` ends sessions after
  N calls.
* ``/small`` -- 100-byte ``text/plain`` body.
* ``/big?mib=N`` -- N MiB (default 1, max 1024) streamed in 64 KiB messages.
* ``POST|PUT /upload`` -- reads the body, answers ``{"bytes": n, "sha256": hex}``.
* ``/healthz`` -- ``ok``.
* anything else -- 404 JSON.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable, MutableMapping
from functools import partial
from typing import Any, Literal, TypeAlias
from urllib.parse import parse_qsl

import trio
from hypercorn.config import Config
from hypercorn.trio import serve

from ..tools.sim_llm import ChatRequest, ChatStream, words
from ..tools.sim_mcp import McpServer

__all__ = [
    "ASGIApp",
    "Message",
    "Receive",
    "Scope",
    "Send",
    "make_app",
    "parse_event_data",
    "serve_app",
]

Scope: TypeAlias = MutableMapping[str, Any]
Message: TypeAlias = MutableMapping[str, Any]
Receive: TypeAlias = Callable[[], Awaitable[Message]]
Send: TypeAlias = Callable[[Message], Awaitable[None]]
ASGIApp: TypeAlias = Callable[[Scope, Receive, Send], Awaitable[None]]

MiB = 1024 * 1024
MAX_EVENTS = 1_000_000
MAX_EVENT_BYTES = MiB
MAX_DELAY_MS = 3_600_000.0  # one hour; anything longer is a typo
MAX_BIG_MIB = 1024
SMALL_BODY = b"x" * 99 + b"\n"
BIG_CHUNK = 64 * 1024

_BIG_BLOCK = b"x" * BIG_CHUNK
_LOREM = b"lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor "
_DELTA_PREFIX = b'data: {"type": "text_delta", "seq": '
_DELTA_SUFFIX = b'"}\n\n'

#: hypercorn's error log goes here; quiet (WARNING) unless the user configures it.
server_log = logging.getLogger("proxycore.sim.server")
server_log.setLevel(logging.WARNING)


class _BadRequest(Exception):
    """A query parameter out of range: answered 400."""


# --------------------------------------------------------------------------- helpers


def _header_list(
    content_type: bytes, extra: list[tuple[bytes, bytes]] | None = None
) -> list[tuple[bytes, bytes]]:
    headers = [(b"content-type", content_type)]
    if extra:
        headers.extend(extra)
    return headers


async def _respond(
    send: Send,
    status: int,
    body: bytes,
    content_type: bytes = b"text/plain; charset=utf-8",
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": _header_list(
                content_type, [(b"content-length", str(len(body)).encode("ascii"))]
            ),
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _respond_json(send: Send, status: int, obj: object) -> None:
    body = json.dumps(obj).encode("utf-8")
    await _respond(send, status, body, b"application/json")


async def _drain_body(receive: Receive, sink: Callable[[bytes], object] | None = None) -> bool:
    """Read the request body to the end. Returns False if the client went away."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return False
        if message["type"] == "http.request":
            if sink is not None:
                chunk = message.get("body", b"")
                if chunk:
                    sink(chunk)
            if not message.get("more_body", False):
                return True


async def _until_disconnect(receive: Receive, body: Callable[[], Awaitable[None]]) -> None:
    """Run ``body`` but stop it as soon as the client disconnects.

    hypercorn silently drops sends after the client has gone, so without this a long
    stream would keep running (and sleeping) for nothing.
    """
    async with trio.open_nursery() as nursery:

        async def watch() -> None:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    nursery.cancel_scope.cancel()
                    return

        nursery.start_soon(watch)
        await body()
        nursery.cancel_scope.cancel()


def _query(scope: Scope) -> dict[str, str]:
    raw: bytes = scope.get("query_string", b"")
    return dict(parse_qsl(raw.decode("latin-1"), keep_blank_values=True))


def _int_param(query: dict[str, str], name: str, default: int, lo: int, hi: int) -> int:
    if name not in query:
        return default
    try:
        value = int(query[name])
    except ValueError:
        raise _BadRequest(f"{name} must be an integer") from None
    if not lo <= value <= hi:
        raise _BadRequest(f"{name} must be between {lo} and {hi}")
    return value


def _ms_param(query: dict[str, str], name: str, default: float) -> float:
    """A millisecond query value, returned in seconds."""
    if name not in query:
        return default
    try:
        value = float(query[name])
    except ValueError:
        raise _BadRequest(f"{name} must be a number") from None
    if not math.isfinite(value) or not 0 <= value <= MAX_DELAY_MS:
        raise _BadRequest(f"{name} must be between 0 and {MAX_DELAY_MS:g}")
    return value / 1000.0


def _filler(n: int) -> bytes:
    return (_LOREM * (n // len(_LOREM) + 1))[:n]


def _delta_event(seq: int, t_ns: int, size: int, filler: bytes) -> bytes:
    head = b'%s%d, "t_ns": %d, "text": "' % (_DELTA_PREFIX, seq, t_ns)
    pad = max(0, size - len(head) - len(_DELTA_SUFFIX))
    return head + filler[:pad] + _DELTA_SUFFIX


def _done_event(seq: int) -> bytes:
    return b'data: {"type": "done", "seq": %d}\n\n' % seq


def parse_event_data(line: bytes) -> dict[str, object] | None:
    """Parse one ``data: {json}`` SSE line (trailing newlines allowed).

    Returns None for anything else (comments, other fields, ``[DONE]``, bad JSON).
    """
    line = line.strip()
    if not line.startswith(b"data:"):
        return None
    try:
        value = json.loads(line[5:])
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


# --------------------------------------------------------------------------- app


def make_app(
    *,
    ttft: float = 0.05,
    interval: float = 0.02,
    events: int = 20,
    event_bytes: int = 64,
    mcp_expire_after: int | None = None,
) -> ASGIApp:
    """Build the simulator ASGI app. ``ttft`` and ``interval`` are the ``/stream`` and
    chat defaults, ``events`` and ``event_bytes`` the ``/stream`` ones;
    ``mcp_expire_after`` ends MCP sessions after that many calls."""
    for name, delay in (("ttft", ttft), ("interval", interval)):
        if not math.isfinite(delay) or delay < 0:
            raise ValueError(f"{name} must be a finite number >= 0")
    if not 0 <= events <= MAX_EVENTS:
        raise ValueError(f"events must be between 0 and {MAX_EVENTS}")
    if not 0 <= event_bytes <= MAX_EVENT_BYTES:
        raise ValueError(f"event_bytes must be between 0 and {MAX_EVENT_BYTES}")
    if mcp_expire_after is not None and mcp_expire_after < 1:
        raise ValueError("mcp_expire_after must be at least 1")
    mcp_server = McpServer(mcp_expire_after)

    async def stream(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] not in ("GET", "POST"):
            await _respond_json(send, 405, {"error": "method not allowed"})
            return
        query = _query(scope)
        try:
            s_ttft = _ms_param(query, "ttft_ms", ttft)
            s_interval = _ms_param(query, "interval_ms", interval)
            s_events = _int_param(query, "events", events, 0, MAX_EVENTS)
            s_size = _int_param(query, "size", event_bytes, 0, MAX_EVENT_BYTES)
        except _BadRequest as exc:
            await _respond_json(send, 400, {"error": str(exc)})
            return
        if not await _drain_body(receive):
            return
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": _header_list(b"text/event-stream", [(b"cache-control", b"no-cache")]),
            }
        )
        filler = _filler(s_size)

        async def body() -> None:
            start = trio.current_time() + s_ttft
            for seq in range(s_events):
                await trio.sleep_until(start + seq * s_interval)
                chunk = _delta_event(seq, time.time_ns(), s_size, filler)
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            if s_events == 0:
                await trio.sleep_until(start)
            await send(
                {"type": "http.response.body", "body": _done_event(s_events), "more_body": True}
            )
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        await _until_disconnect(receive, body)

    async def chat(
        scope: Scope, receive: Receive, send: Send, fmt: Literal["openai", "anthropic"]
    ) -> None:
        if scope["method"] != "POST":
            await _respond_json(send, 405, {"error": "method not allowed"})
            return
        body = bytearray()
        if not await _drain_body(receive, body.extend):
            return
        query = _query(scope)
        try:
            request = ChatRequest(bytes(body))
            s_ttft = _ms_param(query, "ttft_ms", ttft)
            s_interval = _ms_param(query, "interval_ms", interval)
            tokens = _int_param(query, "tokens", request.max_tokens, 0, MAX_EVENTS)
        except (_BadRequest, ValueError) as exc:
            await _respond_json(send, 400, {"error": str(exc)})
            return
        answer = ChatStream(fmt, request, tokens, usage=query.get("usage") != "0")
        if not request.stream:
            await trio.sleep(s_ttft + s_interval * max(0, tokens - 1))
            await _respond_json(send, 200, answer.whole())
            return
        headers = _header_list(b"text/event-stream", [(b"cache-control", b"no-cache")])
        await send({"type": "http.response.start", "status": 200, "headers": headers})

        async def stream_body() -> None:
            await send({"type": "http.response.body", "body": answer.start(), "more_body": True})
            start = trio.current_time() + s_ttft
            for i, word in enumerate(words(tokens)):
                await trio.sleep_until(start + i * s_interval)
                chunk = answer.delta(word)
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            end = b"" if query.get("cut") == "1" else answer.end()
            await send({"type": "http.response.body", "body": end, "more_body": False})

        await _until_disconnect(receive, stream_body)

    async def mcp(scope: Scope, receive: Receive, send: Send) -> None:
        session = next((v.decode() for n, v in scope["headers"] if n == b"mcp-session-id"), None)
        if scope["method"] == "DELETE":
            await _respond(send, mcp_server.end(session), b"")
            return
        if scope["method"] != "POST":
            await _respond_json(send, 405, {"error": "method not allowed"})
            return
        body = bytearray()
        if not await _drain_body(receive, body.extend):
            return
        query = _query(scope)
        try:
            expire = _int_param(query, "expire_after", -1, 1, MAX_EVENTS)
        except _BadRequest as exc:
            await _respond_json(send, 400, {"error": str(exc)})
            return
        reply = mcp_server.handle(session, bytes(body), None if expire < 0 else expire)
        status, headers, data = reply.http(sse=query.get("sse") == "1")
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": data, "more_body": False})

    async def big(scope: Scope, receive: Receive, send: Send) -> None:
        try:
            mib = _int_param(_query(scope), "mib", 1, 0, MAX_BIG_MIB)
        except _BadRequest as exc:
            await _respond_json(send, 400, {"error": str(exc)})
            return
        total = mib * MiB
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": _header_list(
                    b"application/octet-stream",
                    [(b"content-length", str(total).encode("ascii"))],
                ),
            }
        )

        async def body() -> None:
            for _ in range(total // BIG_CHUNK):
                await send({"type": "http.response.body", "body": _BIG_BLOCK, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        await _until_disconnect(receive, body)

    async def upload(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] not in ("POST", "PUT"):
            await _respond_json(send, 405, {"error": "method not allowed"})
            return
        digest = hashlib.sha256()
        count = 0

        def sink(chunk: bytes) -> None:
            nonlocal count
            count += len(chunk)
            digest.update(chunk)

        if await _drain_body(receive, sink):
            await _respond_json(send, 200, {"bytes": count, "sha256": digest.hexdigest()})

    async def http(scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        if path.endswith("/stream"):
            await stream(scope, receive, send)
        elif path == "/v1/chat/completions":
            await chat(scope, receive, send, "openai")
        elif path == "/v1/messages":
            await chat(scope, receive, send, "anthropic")
        elif path == "/mcp":
            await mcp(scope, receive, send)
        elif path == "/small":
            await _respond(send, 200, SMALL_BODY)
        elif path == "/big":
            await big(scope, receive, send)
        elif path == "/upload":
            await upload(scope, receive, send)
        elif path == "/healthz":
            await _respond(send, 200, b"ok")
        else:
            await _respond_json(send, 404, {"error": "not found", "path": path})

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await http(scope, receive, send)
        elif kind == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        elif kind == "websocket":
            await receive()  # websocket.connect
            await send({"type": "websocket.close", "code": 1000})

    return app


# --------------------------------------------------------------------------- server


def _bind_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _port_of(url: str) -> int:
    # hypercorn reports "http://127.0.0.1:54321" or "http://[::1]:54321"
    return int(url.rsplit(":", 1)[1])


async def serve_app(
    app: ASGIApp,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` with hypercorn's trio worker until cancelled.

    Use with ``nursery.start``: it reports ``(host, bound_port)`` once listening (so
    ``port=0`` picks a free port). Cancelling the surrounding scope stops the server,
    including connections that are mid-response.
    """
    config = Config()
    config.bind = [_bind_address(host, port)]
    config.accesslog = None
    config.errorlog = server_log
    config.keep_alive_timeout = 75.0
    # hypercorn closes a keep-alive connection after 1000 requests by default; that
    # would show up as noise in benchmarks that reuse upstream connections.
    config.keep_alive_max_requests = 1_000_000
    config.backlog = 1024

    async with trio.open_nursery() as nursery:
        # ASGIApp is structurally an ASGI 3 app; hypercorn's TypedDict-based signature
        # is stricter than our MutableMapping aliases, hence the Any.
        hyper_app: Any = app
        urls: list[str] = await nursery.start(partial(serve, hyper_app, config, mode="asgi"))
        task_status.started((host, _port_of(urls[0])))


def main(argv: list[str] | None = None) -> int:
    """``python -m proxycore.tools.sim``: serve the simulator until Ctrl-C."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m proxycore.tools.sim", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000, help="0: any free port")
    parser.add_argument("--ttft-ms", type=float, default=200.0, help="time to first token")
    parser.add_argument("--interval-ms", type=float, default=20.0, help="time between tokens")
    parser.add_argument("--mcp-expire-after", type=int, help="end MCP sessions after N calls")
    args = parser.parse_args(argv)
    try:
        app = make_app(
            ttft=args.ttft_ms / 1000, interval=args.interval_ms / 1000,
            mcp_expire_after=args.mcp_expire_after,
        )  # fmt: skip
    except ValueError as exc:
        parser.error(str(exc))

    async def serve_forever() -> None:
        async with trio.open_nursery() as nursery:
            host, port = await nursery.start(
                partial(serve_app, app, host=args.host, port=args.port)
            )
            print(f"simulator on http://{_bind_address(host, port)}  (Ctrl-C to stop)", flush=True)

    with contextlib.suppress(KeyboardInterrupt):
        trio.run(serve_forever)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
