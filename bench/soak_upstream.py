"""The fault soak's upstream: one raw-socket trio server whose endpoints misbehave on purpose.

Every request is dispatched on the first two path segments (``/<group>/<name>``) with its
parameters in the query string; the soak's routes strip their prefix onto these paths
(``/reset/`` -> ``http://UP/reset/``). Well-behaved endpoints keep the connection alive;
every misbehaving one ends it the way its name says.

==================  ===========================================================================
endpoint            what it does
==================  ===========================================================================
``ok/small``        200, Content-Length 100
``ok/big``          200, Content-Length ``size`` (written in 64 KiB pieces)
``ok/chunked``      200, ``chunks`` chunks of ``size`` bytes
``ok/closed``       200, close-delimited body of ``size`` bytes, then FIN
``ok/slowhead``     the ``ok/small`` answer after ``delay`` ms
``ok/upload``       reads the whole request body (Content-Length or chunked), answers its size
``trickle/body``    200, Content-Length ``size``, ``piece`` bytes every ``every`` ms
``reset/body``      head (Content-Length ``size``) and ``after`` body bytes, then RST
``reset/head``      reads the request, then RST without a byte of answer
``reset/midhead``   half a response head, then RST
``stall/head``      reads the request, never answers (waits for the proxy to give up)
``stall/body``      head and ``after`` body bytes, then nothing (waits for the proxy)
``bad/status``      a malformed status line
``bad/header``      a header line without a colon
``bad/huge``        a response head of 80 KiB (over the proxy's 64 KiB limit)
``bad/clte``        Content-Length and Transfer-Encoding together
``bad/length``      ``Content-Length: 12a``
``bad/chunk``       five good chunks, then a chunk-size line of garbage
``close/body``      head (Content-Length ``size``) and ``after`` body bytes, then FIN
``close/head``      reads the request, then FIN without an answer
``close/chunked``   a few chunks, then FIN before the last chunk
``early/413``       answers 413 as soon as the head arrived, without reading the body;
                    ``mode=linger`` (shut down writing, read and drop the body for up to 2 s,
                    as servers should) or ``mode=rst`` (close at once: the unread body makes
                    the kernel send RST)
``early/200``       answers 200 (100 bytes) before reading the body, then lingers
``sse/stream``      ``events`` events every ``interval`` ms (``size`` bytes of padding) framed
                    ``framing=chunked|length|close``
``sse/die``         ``events`` events, then half an event, then ``how=rst|fin``
``sse/stall``       ``events`` events, then nothing (waits for the proxy)
``sse/badchunk``    ``events`` events, then a chunk-size line of garbage
``sse/retry``       events around one whose ``retry:`` field has ``digits`` digits
``sse/bigid``       ``events`` events, each with an ``id:`` of ``idsize`` bytes
``sse/status``      500 with a JSON body (an event-stream request answered with an error)
``sse/forever``     events of ``size`` bytes every ``interval`` ms until the peer goes away
``ws/echo``         WebSocket (wsproto): echoes every message until the close handshake
``ws/die``          WebSocket: accepts, sends one message, then RST
``ws/refuse``       answers the upgrade with 403 and ``size`` bytes of body
==================  ===========================================================================

Every SSE event's data is JSON (``{"n": i, "pad": "..."}``), so a client that dispatches a
truncated event sees invalid JSON. Errors of the peer (resets, EOF) end a connection quietly;
anything else is a bug of the harness and is kept in :attr:`SoakUpstream.errors`.

``python -m bench.soak_upstream --port N`` serves it alone (to reproduce a soak finding by
hand with curl or a few lines of Python).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import struct
import traceback
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Final
from urllib.parse import parse_qs, urlsplit

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    TextMessage,
)
from wsproto.events import Request as WsRequest

__all__ = ["PATTERN", "SoakUpstream", "event_bytes", "main"]

#: 64 KiB of body pattern (all bodies are slices of it).
PATTERN: Final = bytes(range(256)) * 256
_HEAD_LIMIT: Final = 64 * 1024
#: The longest a misbehaving endpoint waits for its peer to go away.
_WAIT_CAP_S: Final = 60.0
_FOREVER_CAP_S: Final = 120.0
_GONE: Final = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


class PeerGone(Exception):
    """The proxy closed or reset the connection: end it quietly."""


class Request:
    """One parsed request head."""

    def __init__(self, head: bytes) -> None:
        lines = head.decode("latin-1").split("\r\n")
        self.method, self.target, self.version = lines[0].split(" ", 2)
        self.headers: dict[str, str] = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                self.headers[name.strip().lower()] = value.strip()
        parts = urlsplit(self.target)
        self.path = parts.path
        self.query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        self.raw = head

    def num(self, name: str, default: int) -> int:
        try:
            return int(self.query.get(name, default))
        except ValueError:
            return default

    def text(self, name: str, default: str) -> str:
        return self.query.get(name, default)

    @property
    def chunked(self) -> bool:
        return "chunked" in self.headers.get("transfer-encoding", "").lower()

    @property
    def length(self) -> int:
        try:
            return int(self.headers.get("content-length", "0"))
        except ValueError:
            return 0


class Conn:
    """A server-side connection: a read buffer over a trio socket stream."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buf = bytearray()

    async def recv(self) -> bytes:
        try:
            return await self.stream.receive_some(65536)
        except _GONE as exc:
            raise PeerGone(str(exc)) from None

    async def send(self, data: bytes) -> None:
        try:
            await self.stream.send_all(data)
        except _GONE as exc:
            raise PeerGone(str(exc)) from None

    async def read_head(self) -> bytes | None:
        """The next request head; None if the peer closed between requests."""
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end >= 0:
                head = bytes(self.buf[: end + 4])
                del self.buf[: end + 4]
                return head
            if len(self.buf) > _HEAD_LIMIT:
                raise PeerGone("request head too large")
            data = await self.recv()
            if not data:
                if self.buf:
                    raise PeerGone("closed mid-head")
                return None
            self.buf += data

    async def read_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            data = await self.recv()
            if not data:
                raise PeerGone("closed mid-body")
            self.buf += data
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    async def read_line(self) -> bytes:
        while True:
            end = self.buf.find(b"\r\n")
            if end >= 0:
                line = bytes(self.buf[:end])
                del self.buf[: end + 2]
                return line
            if len(self.buf) > 8192:
                raise PeerGone("line too long")
            data = await self.recv()
            if not data:
                raise PeerGone("closed mid-line")
            self.buf += data

    async def read_body(self, req: Request) -> int:
        """Read the request body (Content-Length or chunked); its data size."""
        if req.chunked:
            total = 0
            while True:
                size = int((await self.read_line()).split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while await self.read_line():
                        pass  # trailers
                    return total
                await self.read_exact(size + 2)
                total += size
        n = req.length
        while n:
            take = min(n, len(self.buf))
            del self.buf[:take]
            n -= take
            if n:
                data = await self.recv()
                if not data:
                    raise PeerGone("closed mid-body")
                self.buf += data
        return req.length

    async def wait_closed(self, cap: float = _WAIT_CAP_S) -> None:
        """Read and drop until the peer closes (or ``cap`` seconds pass)."""
        with trio.move_on_after(cap):
            while True:
                self.buf.clear()
                if not await self.recv():
                    return

    async def linger_close(self, seconds: float = 2.0, limit: int = 8 << 20) -> None:
        """Stop writing, read and drop what the peer still sends (bounded), then close."""
        try:
            self.stream.socket.shutdown(socket.SHUT_WR)
        except OSError:
            return
        dropped = 0
        with trio.move_on_after(seconds):
            while dropped < limit:
                data = await self.recv()
                if not data:
                    return
                dropped += len(data)

    def rst(self) -> None:
        """Close with a reset (SO_LINGER 0)."""
        sock = self.stream.socket
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()


def _head(status: int, fields: list[tuple[str, str]], reason: str = "") -> bytes:
    lines = [f"HTTP/1.1 {status} {reason or _REASONS.get(status, 'Status')}"]
    lines += [f"{n}: {v}" for n, v in fields]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


_REASONS: Final = {
    101: "Switching Protocols",
    200: "OK",
    403: "Forbidden",
    404: "Not Found",
    413: "Payload Too Large",
    500: "Internal Server Error",
}


def _body(size: int) -> bytes:
    if size <= len(PATTERN):
        return PATTERN[:size]
    return (PATTERN * (size // len(PATTERN) + 1))[:size]


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def event_bytes(n: int, pad: int = 16, event_id: str | None = None) -> bytes:
    """One SSE event: an optional id, and JSON data ``{"n": n, "pad": "aaa..."}``."""
    data = json.dumps({"n": n, "pad": "a" * pad})
    ident = f"id: {event_id if event_id is not None else n}\n"
    return f"{ident}data: {data}\n\n".encode()


async def _send_big(conn: Conn, size: int) -> None:
    while size:
        piece = min(size, len(PATTERN))
        await conn.send(PATTERN[:piece])
        size -= piece


Handler = Callable[[Conn, Request], Awaitable[bool]]


class SoakUpstream:
    """The server (see the module docstring). Handlers return True to keep the connection."""

    def __init__(self) -> None:
        #: Requests served per endpoint.
        self.requests: Counter[str] = Counter()
        #: Unexpected exceptions (harness bugs), with their tracebacks.
        self.errors: list[str] = []
        self.port = 0
        self._handlers: dict[str, Handler] = {
            name.removeprefix("h_").replace("__", "/"): getattr(self, name)
            for name in dir(self)
            if name.startswith("h_")
        }

    async def serve(
        self, host: str = "127.0.0.1", port: int = 0, *, task_status: trio.TaskStatus[int]
    ) -> None:
        """Listen on ``host:port`` (0: a free one); ``task_status.started(port)``."""
        listeners = await trio.open_tcp_listeners(port, host=host, backlog=1024)
        self.port = int(listeners[0].socket.getsockname()[1])
        task_status.started(self.port)
        await trio.serve_listeners(self.connection, listeners)

    async def connection(self, stream: trio.SocketStream) -> None:
        conn = Conn(stream)
        try:
            while True:
                head = await conn.read_head()
                if head is None:
                    break
                req = Request(head)
                parts = req.path.strip("/").split("/")
                key = "/".join(parts[:2])
                handler = self._handlers.get(key)
                self.requests[key if handler is not None else "unknown"] += 1
                if handler is None:
                    body = b"no such endpoint"
                    await conn.send(_head(404, [("Content-Length", str(len(body)))]) + body)
                    break
                if not await handler(conn, req):
                    break
        except PeerGone:
            pass
        except Exception:
            self.errors.append(traceback.format_exc())
        finally:
            if stream.socket.fileno() != -1:
                with trio.CancelScope(shield=True), contextlib.suppress(*_GONE):
                    await stream.aclose()

    # -- well behaved ----------------------------------------------------------

    async def h_ok__small(self, conn: Conn, req: Request) -> bool:
        await conn.read_body(req)
        body = _body(100)
        await conn.send(_head(200, [("Content-Length", "100")]) + body)
        return True

    async def h_ok__big(self, conn: Conn, req: Request) -> bool:
        size = req.num("size", 1 << 20)
        await conn.send(_head(200, [("Content-Length", str(size))]))
        await _send_big(conn, size)
        return True

    async def h_ok__chunked(self, conn: Conn, req: Request) -> bool:
        chunks, size = req.num("chunks", 10), req.num("size", 1000)
        out = [_head(200, [("Transfer-Encoding", "chunked")])]
        out += [_chunk(_body(size)) for _ in range(chunks)]
        out.append(b"0\r\n\r\n")
        await conn.send(b"".join(out))
        return True

    async def h_ok__closed(self, conn: Conn, req: Request) -> bool:
        size = req.num("size", 50000)
        await conn.send(_head(200, [("Connection", "close")]))
        await _send_big(conn, size)
        return False

    async def h_ok__slowhead(self, conn: Conn, req: Request) -> bool:
        await trio.sleep(req.num("delay", 500) / 1000)
        return await self.h_ok__small(conn, req)

    async def h_ok__upload(self, conn: Conn, req: Request) -> bool:
        if req.headers.get("expect", "").lower() == "100-continue":
            pass  # the proxy answers Expect itself; the body follows the head
        received = await conn.read_body(req)
        body = json.dumps({"received": received}).encode()
        fields = [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
        await conn.send(_head(200, fields) + body)
        return True

    async def h_trickle__body(self, conn: Conn, req: Request) -> bool:
        size, piece, every = req.num("size", 2000), req.num("piece", 100), req.num("every", 100)
        await conn.send(_head(200, [("Content-Length", str(size))]))
        body = _body(size)
        for start in range(0, size, piece):
            await trio.sleep(every / 1000)
            await conn.send(body[start : start + piece])
        return True

    # -- resets, stalls, early closes ------------------------------------------

    async def h_reset__body(self, conn: Conn, req: Request) -> bool:
        size, after = req.num("size", 200000), req.num("after", 50000)
        await conn.send(_head(200, [("Content-Length", str(size))]))
        await _send_big(conn, after)
        await trio.sleep(0.02)
        conn.rst()
        return False

    async def h_reset__head(self, conn: Conn, req: Request) -> bool:
        await conn.read_body(req)
        conn.rst()
        return False

    async def h_reset__midhead(self, conn: Conn, req: Request) -> bool:
        await conn.read_body(req)
        await conn.send(b"HTTP/1.1 200 OK\r\nContent-Le")
        await trio.sleep(0.02)
        conn.rst()
        return False

    async def h_stall__head(self, conn: Conn, req: Request) -> bool:
        await conn.read_body(req)
        await conn.wait_closed()
        return False

    async def h_stall__body(self, conn: Conn, req: Request) -> bool:
        size, after = req.num("size", 100000), req.num("after", 20000)
        await conn.send(_head(200, [("Content-Length", str(size))]) + _body(after))
        await conn.wait_closed()
        return False

    async def h_close__body(self, conn: Conn, req: Request) -> bool:
        size, after = req.num("size", 100000), req.num("after", 30000)
        await conn.send(_head(200, [("Content-Length", str(size))]))
        await _send_big(conn, after)
        return False

    async def h_close__head(self, conn: Conn, req: Request) -> bool:
        await conn.read_body(req)
        return False

    async def h_close__chunked(self, conn: Conn, req: Request) -> bool:
        out = [_head(200, [("Transfer-Encoding", "chunked")])]
        out += [_chunk(_body(2000)) for _ in range(5)]
        await conn.send(b"".join(out))
        return False

    # -- malformed answers -----------------------------------------------------

    async def _bad(self, conn: Conn, req: Request, data: bytes) -> bool:
        await conn.read_body(req)
        await conn.send(data)
        await trio.sleep(0.05)
        return False

    async def h_bad__status(self, conn: Conn, req: Request) -> bool:
        return await self._bad(conn, req, b"HTTP/1.1 2OO OK\r\nContent-Length: 2\r\n\r\nok")

    async def h_bad__header(self, conn: Conn, req: Request) -> bool:
        data = b"HTTP/1.1 200 OK\r\nthis is not a header\r\nContent-Length: 2\r\n\r\nok"
        return await self._bad(conn, req, data)

    async def h_bad__huge(self, conn: Conn, req: Request) -> bool:
        fields = [(f"X-Filler-{i}", "f" * 1000) for i in range(80)] + [("Content-Length", "2")]
        return await self._bad(conn, req, _head(200, fields) + b"ok")

    async def h_bad__clte(self, conn: Conn, req: Request) -> bool:
        fields = [("Content-Length", "5"), ("Transfer-Encoding", "chunked")]
        return await self._bad(conn, req, _head(200, fields) + b"5\r\nhello\r\n0\r\n\r\n")

    async def h_bad__length(self, conn: Conn, req: Request) -> bool:
        return await self._bad(conn, req, _head(200, [("Content-Length", "12a")]) + b"x" * 12)

    async def h_bad__chunk(self, conn: Conn, req: Request) -> bool:
        await conn.read_body(req)
        out = [_head(200, [("Transfer-Encoding", "chunked")])]
        out += [_chunk(_body(1024)) for _ in range(5)]
        await conn.send(b"".join(out))
        await trio.sleep(0.02)
        await conn.send(b"zz\r\nnot a chunk\r\n")
        await conn.wait_closed()
        return False

    # -- answers before the request body ---------------------------------------

    async def h_early__413(self, conn: Conn, req: Request) -> bool:
        body = b"upload refused: too large"
        fields = [
            ("Content-Type", "text/plain"),
            ("Content-Length", str(len(body))),
            ("Connection", "close"),
        ]
        await conn.send(_head(413, fields) + body)
        if req.text("mode", "linger") == "rst":
            conn.rst()
        else:
            await conn.linger_close()
        return False

    async def h_early__200(self, conn: Conn, req: Request) -> bool:
        await conn.send(_head(200, [("Content-Length", "100"), ("Connection", "close")]))
        await conn.send(_body(100))
        await conn.linger_close()
        return False

    # -- event streams ---------------------------------------------------------

    @staticmethod
    def _sse_head(framing: str = "chunked", length: int = 0) -> bytes:
        fields = [("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache")]
        if framing == "chunked":
            fields.append(("Transfer-Encoding", "chunked"))
        elif framing == "length":
            fields.append(("Content-Length", str(length)))
        else:
            fields.append(("Connection", "close"))
        return _head(200, fields)

    async def _events(
        self, conn: Conn, events: list[bytes], interval: float, framing: str = "chunked"
    ) -> None:
        for event in events:
            if interval:
                await trio.sleep(interval)
            await conn.send(_chunk(event) if framing == "chunked" else event)

    async def h_sse__stream(self, conn: Conn, req: Request) -> bool:
        count, pad = req.num("events", 20), req.num("size", 32)
        interval, framing = req.num("interval", 10) / 1000, req.text("framing", "chunked")
        events = [event_bytes(i, pad) for i in range(count)]
        await conn.send(self._sse_head(framing, sum(map(len, events))))
        await self._events(conn, events, interval, framing)
        if framing == "chunked":
            await conn.send(b"0\r\n\r\n")
        return framing != "close"

    async def h_sse__die(self, conn: Conn, req: Request) -> bool:
        count = req.num("events", 10)
        await conn.send(self._sse_head())
        await self._events(conn, [event_bytes(i) for i in range(count)], 0.01)
        partial = event_bytes(count, 64)[:-20]  # "id: N\ndata: {"n": N, "pad": "aaa...
        await conn.send(_chunk(partial))
        await trio.sleep(0.05)
        if req.text("how", "rst") == "rst":
            conn.rst()
        return False

    async def h_sse__stall(self, conn: Conn, req: Request) -> bool:
        count = req.num("events", 5)
        await conn.send(self._sse_head())
        await self._events(conn, [event_bytes(i) for i in range(count)], 0.01)
        await conn.wait_closed()
        return False

    async def h_sse__badchunk(self, conn: Conn, req: Request) -> bool:
        count = req.num("events", 5)
        await conn.send(self._sse_head())
        await self._events(conn, [event_bytes(i) for i in range(count)], 0.01)
        await conn.send(b"zz\r\ngarbage\r\n")
        await conn.wait_closed()
        return False

    async def h_sse__retry(self, conn: Conn, req: Request) -> bool:
        count, digits = req.num("events", 6), req.num("digits", 5000)
        events = [event_bytes(i) for i in range(count)]
        events.insert(count // 2, b"retry: " + b"9" * digits + b"\n\n")
        await conn.send(self._sse_head())
        await self._events(conn, events, 0.005)
        await conn.send(b"0\r\n\r\n")
        return True

    async def h_sse__bigid(self, conn: Conn, req: Request) -> bool:
        count, idsize = req.num("events", 100), req.num("idsize", 8192)
        await conn.send(self._sse_head())
        events = [event_bytes(i, 16, event_id=f"{i}-" + "i" * idsize) for i in range(count)]
        await self._events(conn, events, 0)
        await conn.send(b"0\r\n\r\n")
        return True

    async def h_sse__status(self, conn: Conn, req: Request) -> bool:
        code = req.num("code", 500)
        body = json.dumps({"error": "upstream refused"}).encode()
        fields = [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
        await conn.send(_head(code, fields) + body)
        return True

    async def h_sse__forever(self, conn: Conn, req: Request) -> bool:
        interval, pad = req.num("interval", 20) / 1000, req.num("size", 64)
        await conn.send(self._sse_head())
        with trio.move_on_after(_FOREVER_CAP_S):
            n = 0
            while True:
                await conn.send(_chunk(event_bytes(n, pad)))
                n += 1
                await trio.sleep(interval)
        return False

    # -- WebSocket -------------------------------------------------------------

    async def _ws_accept(self, conn: Conn, req: Request) -> WSConnection:
        ws = WSConnection(ConnectionType.SERVER)
        ws.receive_data(req.raw + bytes(conn.buf))
        conn.buf.clear()
        for event in ws.events():
            if isinstance(event, WsRequest):
                await conn.send(ws.send(AcceptConnection()))
                return ws
        raise PeerGone("not a WebSocket handshake")

    async def h_ws__echo(self, conn: Conn, req: Request) -> bool:
        ws = await self._ws_accept(conn, req)
        text: list[str] = []
        data: list[bytes] = []
        while True:
            chunk = await conn.recv()
            if not chunk:
                return False  # the proxy dropped the session without a close frame
            ws.receive_data(chunk)
            for event in ws.events():
                if isinstance(event, TextMessage):
                    text.append(event.data)
                    if event.message_finished:
                        await conn.send(ws.send(TextMessage(data="".join(text))))
                        text.clear()
                elif isinstance(event, BytesMessage):
                    data.append(bytes(event.data))
                    if event.message_finished:
                        await conn.send(ws.send(BytesMessage(data=b"".join(data))))
                        data.clear()
                elif isinstance(event, Ping):
                    await conn.send(ws.send(event.response()))
                elif isinstance(event, CloseConnection):
                    await conn.send(ws.send(event.response()))
                    return False

    async def h_ws__die(self, conn: Conn, req: Request) -> bool:
        ws = await self._ws_accept(conn, req)
        await conn.send(ws.send(TextMessage(data="hello")))
        await trio.sleep(0.05)
        conn.rst()
        return False

    async def h_ws__refuse(self, conn: Conn, req: Request) -> bool:
        body = _body(req.num("size", 1000))
        fields = [("Content-Type", "application/octet-stream"), ("Content-Length", str(len(body)))]
        await conn.send(_head(403, fields) + body)
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.soak_upstream", description="The fault soak's upstream, alone."
    )
    parser.add_argument("--port", type=int, default=8081)
    args = parser.parse_args(argv)
    upstream = SoakUpstream()

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(upstream.serve, "127.0.0.1", args.port)
            print(f"soak upstream on http://127.0.0.1:{port}/", flush=True)

    with contextlib.suppress(KeyboardInterrupt):
        trio.run(run)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
