"""Small ASGI upstream apps for the proxy's end-to-end tests.

Serve them with ``tests.helpers.start_app`` (hypercorn, trio worker). hypercorn writes
every ``http.response.body`` message to the socket as soon as it is sent (one chunk per
message when there is no content-length), so each app's message boundaries are what
the proxy sees on the wire.
"""

from __future__ import annotations

import hashlib
import json

import trio

from proxycore.tools.sim import ASGIApp, Receive, Scope, Send

__all__ = [
    "echo_app",
    "make_huge_app",
    "make_silent_stream_app",
    "make_slow_head_app",
    "make_sse_app",
    "sse_event",
]


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def _not_http(scope: Scope, receive: Receive, send: Send) -> bool:
    """Handle lifespan (and refuse websockets). True if the scope was not HTTP."""
    if scope["type"] == "lifespan":
        await _lifespan(receive, send)
        return True
    if scope["type"] == "websocket":
        await receive()
        await send({"type": "websocket.close", "code": 1000})
        return True
    return False


async def _start(
    send: Send,
    status: int,
    content_type: bytes,
    *,
    length: int | None = None,
    extra: list[tuple[bytes, bytes]] | None = None,
) -> None:
    headers = [(b"content-type", content_type)]
    if length is not None:
        headers.append((b"content-length", str(length).encode("ascii")))
    if extra:
        headers.extend(extra)
    await send({"type": "http.response.start", "status": status, "headers": headers})


async def _body(send: Send, data: bytes, *, more: bool) -> None:
    await send({"type": "http.response.body", "body": data, "more_body": more})


# --------------------------------------------------------------------------- echo


async def echo_app(scope: Scope, receive: Receive, send: Send) -> None:
    """Describe the request as JSON.

    Answers 200 ``application/json``::

        {"method", "path", "query", "headers": [[name, value], ...],
         "body_len", "body_sha256"}

    ``path`` is ``raw_path`` and ``query`` is ``query_string``, both latin-1 decoded;
    header names are lowercased, in the order received. The whole body is read first.

    Request headers that change behaviour:

    * ``x-echo-status: NNN`` -- answer with that status instead of 200.
    * ``x-echo-stream-body: 1`` -- instead of JSON, stream the request body back
      (``application/octet-stream``, no content-length) sending each received chunk
      immediately as its own body message.
    """
    if await _not_http(scope, receive, send):
        return
    raw_headers: list[tuple[bytes, bytes]] = [(bytes(n), bytes(v)) for n, v in scope["headers"]]
    headers = [[n.decode("latin-1").lower(), v.decode("latin-1")] for n, v in raw_headers]
    lookup = {n: v for n, v in headers}
    status = int(lookup.get("x-echo-status", "200"))

    if lookup.get("x-echo-stream-body") == "1":
        await _start(send, status, b"application/octet-stream")
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk: bytes = message.get("body", b"")
            more: bool = message.get("more_body", False)
            if chunk or not more:
                await _body(send, chunk, more=more)
            if not more:
                return

    digest = hashlib.sha256()
    length = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        chunk = message.get("body", b"")
        length += len(chunk)
        digest.update(chunk)
        if not message.get("more_body", False):
            break

    raw_path: bytes = scope.get("raw_path") or scope["path"].encode("latin-1")
    query: bytes = scope.get("query_string", b"")
    payload = {
        "method": scope["method"],
        "path": raw_path.decode("latin-1"),
        "query": query.decode("latin-1"),
        "headers": headers,
        "body_len": length,
        "body_sha256": digest.hexdigest(),
    }
    data = json.dumps(payload).encode("utf-8")
    await _start(send, status, b"application/json", length=len(data))
    await _body(send, data, more=False)


# --------------------------------------------------------------------------- sse


def sse_event(n: int, payload: bytes | None = None) -> bytes:
    """The exact bytes of event ``n`` from :func:`make_sse_app`."""
    if payload is None:
        return b"data: %d\n\n" % n
    return b"data: %d %s\n\n" % (n, payload)


def make_sse_app(events: int, interval: float, payload: bytes | None = None) -> ASGIApp:
    """SSE emitter: ``events`` events, one per body message (one chunk each).

    Event ``n`` (0-based) is ``sse_event(n, payload)``: ``data: <n>\\n\\n``, or
    ``data: <n> <payload>\\n\\n`` when a payload is given. Event 0 is sent right after
    the head, then one every ``interval`` seconds; then the body ends. No content-length
    (chunked). Stops early if the client disconnects.
    """

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if await _not_http(scope, receive, send):
            return
        await _start(send, 200, b"text/event-stream", extra=[(b"cache-control", b"no-cache")])
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch)
            start = trio.current_time()
            for n in range(events):
                await trio.sleep_until(start + n * interval)
                await _body(send, sse_event(n, payload), more=True)
            await _body(send, b"", more=False)
            nursery.cancel_scope.cancel()

    return app


# --------------------------------------------------------------------------- slow head


def make_slow_head_app(delay: float) -> ASGIApp:
    """Sleep ``delay`` seconds before sending anything, then answer 200 ``late``."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if await _not_http(scope, receive, send):
            return
        await trio.sleep(delay)
        await _start(send, 200, b"text/plain", length=4)
        await _body(send, b"late", more=False)

    return app


# --------------------------------------------------------------------------- huge


def make_huge_app(total_bytes: int, chunk: int = 65536, *, chunked: bool = False) -> ASGIApp:
    """Stream ``total_bytes`` of ``b"x"`` in ``chunk``-sized body messages.

    With content-length by default; ``chunked=True`` omits it, so hypercorn uses
    chunked transfer-encoding. Stops early if the client disconnects.
    """
    if chunk <= 0:
        raise ValueError("chunk must be > 0")
    block = b"x" * chunk

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if await _not_http(scope, receive, send):
            return
        await _start(
            send,
            200,
            b"application/octet-stream",
            length=None if chunked else total_bytes,
        )
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch)
            remaining = total_bytes
            while remaining > 0:
                piece = block if remaining >= chunk else block[:remaining]
                remaining -= len(piece)
                await _body(send, piece, more=True)
            await _body(send, b"", more=False)
            nursery.cancel_scope.cancel()

    return app


# --------------------------------------------------------------------------- silence


def make_silent_stream_app(first: bytes, silence: float, second: bytes) -> ASGIApp:
    """Send the head and ``first``, go quiet for ``silence`` seconds, send ``second``, end.

    ``application/octet-stream`` without content-length (chunked).
    """

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if await _not_http(scope, receive, send):
            return
        await _start(send, 200, b"application/octet-stream")
        await _body(send, first, more=True)
        await trio.sleep(silence)
        await _body(send, second, more=False)

    return app
