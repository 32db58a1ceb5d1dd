"""Test helpers: start upstream servers, and a minimal raw HTTP/1.1 client (h11)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence

import h11
import trio

from proxycore import Config, PoolSettings, Route, ServerSettings, Timeouts, serve
from proxycore.tools.sim import ASGIApp, serve_app

__all__ = [
    "CountedUpstream",
    "http_request",
    "read_http_response",
    "read_until",
    "start_app",
    "start_proxy",
    "start_raw_server",
]

Headers = list[tuple[bytes, bytes]]
HeaderInput = Iterable[tuple[bytes | str, bytes | str]]

_RECV = 65536


async def start_app(nursery: trio.Nursery, app: ASGIApp) -> tuple[str, int]:
    """Serve ``app`` with hypercorn (trio worker) on 127.0.0.1, a free port.

    Returns ``(host, port)``. The server stops when ``nursery`` is cancelled.
    """
    address: tuple[str, int] = await nursery.start(serve_app, app)
    return address


async def start_raw_server(
    nursery: trio.Nursery, handler: Callable[[trio.SocketStream], Awaitable[None]]
) -> int:
    """A raw TCP server on 127.0.0.1 (free port) running ``handler`` per connection.

    The stream is closed after the handler returns. ``trio.BrokenResourceError`` and
    ``trio.ClosedResourceError`` from the handler (peer went away) are swallowed; any
    other exception propagates into ``nursery`` and fails the test. Returns the port.
    """
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")

    async def run(stream: trio.SocketStream) -> None:
        try:
            await handler(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await stream.aclose()

    await nursery.start(trio.serve_listeners, run, listeners)
    port: int = listeners[0].socket.getsockname()[1]
    return port


async def read_until(stream: trio.SocketStream, marker: bytes, limit: int = 1 << 20) -> bytes:
    """Receive until ``marker`` has been seen; return everything received.

    The result ends with the marker unless the peer sent more in the same segment
    (streams have no push-back, so nothing is dropped). Raises ``EOFError`` if the
    stream ends first and ``ValueError`` if ``limit`` bytes pass without the marker.
    """
    buf = bytearray()
    while True:
        start = max(0, len(buf) - len(marker) + 1)
        data = await stream.receive_some(_RECV)
        if not data:
            raise EOFError(f"EOF before {marker!r}; got {bytes(buf)!r}")
        buf += data
        if buf.find(marker, start) != -1:
            return bytes(buf)
        if len(buf) > limit:
            raise ValueError(f"{marker!r} not found in the first {limit} bytes")


async def _receive_response(
    stream: trio.SocketStream, conn: h11.Connection
) -> tuple[int, Headers, bytes]:
    status: int | None = None
    headers: Headers = []
    body = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(_RECV))
        elif isinstance(event, h11.InformationalResponse):
            continue
        elif isinstance(event, h11.Response):
            status = event.status_code
            headers = list(event.headers)
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
            break
        else:  # PAUSED can't happen: we never read past EndOfMessage
            raise AssertionError(f"unexpected h11 event {event!r}")
    if status is None:
        raise h11.RemoteProtocolError("connection closed before a response head")
    return status, headers, bytes(body)


async def read_http_response(
    stream: trio.SocketStream, method: bytes = b"GET"
) -> tuple[int, Headers, bytes]:
    """Parse one HTTP/1.1 response off ``stream`` (sends nothing).

    Reads until EndOfMessage (or EOF for close-delimited bodies). ``method`` is the
    request method the response answers (HEAD responses have no body). 1xx responses
    are skipped. A truncated body raises ``h11.RemoteProtocolError``. Returns
    ``(status, headers, body)`` with lowercased header names.
    """
    conn = h11.Connection(our_role=h11.CLIENT)
    # Put h11 in the "response expected" state without writing anything.
    conn.send(h11.Request(method=method, target="/", headers=[("host", "x")]))
    conn.send(h11.EndOfMessage())
    return await _receive_response(stream, conn)


def _has(headers: Headers, name: bytes) -> bool:
    return any(n.lower() == name for n, _ in headers)


def _b(value: bytes | str) -> bytes:
    return value.encode("latin-1") if isinstance(value, str) else value


async def http_request(
    host: str,
    port: int,
    method: bytes | str,
    target: bytes | str,
    headers: HeaderInput = (),
    body: bytes = b"",
) -> tuple[int, Headers, bytes]:
    """Send one HTTP/1.1 request on a fresh connection and return the response.

    Adds ``Host`` if absent, and ``Content-Length`` when there is a body (or the method
    is POST/PUT/PATCH) unless the caller set Content-Length or Transfer-Encoding.
    Returns ``(status, headers, body)``; header names are lowercased by h11.
    """
    req_headers: Headers = [(_b(n), _b(v)) for n, v in headers]
    method_b = _b(method)
    if not _has(req_headers, b"host"):
        req_headers.insert(0, (b"host", f"{host}:{port}".encode("ascii")))
    framed = _has(req_headers, b"content-length") or _has(req_headers, b"transfer-encoding")
    if not framed and (body or method_b.upper() in (b"POST", b"PUT", b"PATCH")):
        req_headers.append((b"content-length", str(len(body)).encode("ascii")))

    conn = h11.Connection(our_role=h11.CLIENT)
    stream = await trio.open_tcp_stream(host, port)
    async with stream:
        out = conn.send(h11.Request(method=method_b, target=_b(target), headers=req_headers))
        if body:
            out = (out or b"") + (conn.send(h11.Data(data=body)) or b"")
        out = (out or b"") + (conn.send(h11.EndOfMessage()) or b"")
        await stream.send_all(out)
        return await _receive_response(stream, conn)


async def start_proxy(
    nursery: trio.Nursery,
    upstream: str | Sequence[Route],
    *,
    timeouts: Timeouts | None = None,
    server: Mapping[str, object] | None = None,
    pool: PoolSettings | None = None,
) -> tuple[str, int]:
    """Run proxycore in ``nursery`` on 127.0.0.1 (free port); return ``(host, port)``.

    ``upstream`` is either one URL (a catch-all route ``/``) or a list of routes.
    ``server`` overrides ServerSettings fields (e.g. ``{"header_timeout": 5.0}``).
    """
    routes = (Route(prefix="/", upstream=upstream),) if isinstance(upstream, str) else upstream
    settings = ServerSettings(listen=("127.0.0.1:0",), **dict(server or {}))  # type: ignore[arg-type]
    config = Config(
        routes=tuple(routes),
        server=settings,
        timeouts=timeouts or Timeouts(),
        pool=pool or PoolSettings(),
    )
    addresses: list[tuple[str, int]] = await nursery.start(serve, config)
    return addresses[0]


class CountedUpstream:
    """A raw upstream (``start_raw_server(nursery, up.handler)``) that counts the
    connections it opened and saw closed, and lets a test wait for those counts.
    Subclasses answer in :meth:`serve`; a peer that goes away ends it quietly."""

    def __init__(self) -> None:
        self.opened = 0
        self.closed = 0
        self.changed = trio.Event()

    def _note(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    async def serve(self, stream: trio.SocketStream) -> None:
        raise NotImplementedError

    async def handler(self, stream: trio.SocketStream) -> None:
        self.opened += 1
        self._note()
        try:
            await self.serve(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the proxy closed or reset the connection: what the tests count
        finally:
            self.closed += 1
            self._note()

    async def until(self, *, opened: int = 0, closed: int = 0) -> None:
        while self.opened < opened or self.closed < closed:
            await self.changed.wait()
