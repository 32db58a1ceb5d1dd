"""Shared pieces of the upstream-group end-to-end tests (issue 14).

- :class:`Upstream`: an HTTP/1.1 keep-alive upstream on a real 127.0.0.1 socket (h11,
  server role) that records every request it read and answers through a handler the
  test gives (default: 200 with its name as the body). ``GET /healthz`` is answered
  apart (status :attr:`Upstream.health_status`, counted in :attr:`Upstream.health_hits`)
  so active health checks never count as traffic.
- :func:`group_route` / :func:`group_config`: a route with ``upstreams = [...]`` and a
  config listening on 127.0.0.1 port 0 (admin listener too).
- :class:`Client`: one keep-alive client connection (h11) for many requests in a row.
- :func:`eventually`: poll a condition with a bounded deadline (never a fixed sleep).
- :func:`readyz` / :func:`scrape_admin`: the admin listener's views.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import h11
import trio

from proxycore import Config, Route, ServerSettings
from proxycore.config import AdminSettings, UpstreamEntry
from proxycore.ops.server import Server
from tests.e2e.test_lifecycle import RunningProxy, start_server
from tests.e2e.test_metrics import Samples, scrape
from tests.helpers import http_request, start_raw_server

Headers = list[tuple[bytes, bytes]]
#: What a handler answers: status, headers, body (Content-Length is added).
Reply = tuple[int, Headers, bytes]

HEALTH_PATH: Final = b"/healthz"
RECV: Final = 65536


@dataclass
class Req:
    """One request an upstream read (whole body)."""

    upstream: str
    method: bytes
    target: bytes
    headers: Headers  # names lowercased (h11)
    body: bytes = b""
    at: float = 0.0  # trio clock when the head arrived

    def header(self, name: bytes) -> bytes | None:
        return next((v for n, v in self.headers if n == name), None)


#: ``handler(upstream, request, stream)``: a reply, or None when the handler wrote to
#: (or cut) the stream itself; the connection is closed then.
Handler = Callable[["Upstream", Req, trio.SocketStream], Awaitable[Reply | None]]


async def answer_name(up: Upstream, req: Req, stream: trio.SocketStream) -> Reply | None:
    return 200, [(b"content-type", b"text/plain")], up.name.encode()


def reset(stream: trio.SocketStream) -> None:
    """Make the coming close of ``stream`` a TCP reset (SO_LINGER 0)."""
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


class Upstream:
    """See the module docstring. ``requests``: every non-health request, in order."""

    def __init__(self, name: str, handler: Handler = answer_name) -> None:
        self.name = name
        self.handler = handler
        self.requests: list[Req] = []
        self.health_status = 200
        self.health_hits = 0
        self.last_health: Req | None = None
        self.port = 0
        self._changed = trio.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    @property
    def netloc(self) -> str:
        """The default upstream name in a group: ``host:port``."""
        return f"127.0.0.1:{self.port}"

    async def start(self, nursery: trio.Nursery) -> str:
        self.port = await start_raw_server(nursery, self._serve)
        return self.url

    def count(self, target: bytes | None = None) -> int:
        return sum(1 for r in self.requests if target is None or r.target == target)

    async def wait_requests(self, n: int) -> None:
        """Until ``n`` requests (heads) arrived (bounded by the caller's deadline)."""
        while len(self.requests) < n:
            await self._changed.wait()

    def _note(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def _serve(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        while True:
            req: Req | None = None
            body = bytearray()
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await stream.receive_some(RECV)
                    conn.receive_data(data)
                    if not data and conn.their_state is not h11.DONE:
                        return
                    continue
                if isinstance(event, h11.ConnectionClosed):
                    return
                if isinstance(event, h11.Request):
                    req = Req(
                        self.name,
                        event.method,
                        event.target,
                        list(event.headers),
                        at=trio.current_time(),
                    )
                    if event.target != HEALTH_PATH:
                        self.requests.append(req)
                        self._note()
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    break
            assert req is not None
            req.body = bytes(body)
            if req.target == HEALTH_PATH:
                self.health_hits += 1
                self.last_health = req
                reply: Reply | None = (self.health_status, [], b"health")
            else:
                reply = await self.handler(self, req, stream)
                self._note()
            if reply is None:
                return
            status, headers, payload = reply
            out = [*headers, (b"content-length", b"%d" % len(payload))]
            data = conn.send(h11.Response(status_code=status, headers=out)) or b""
            data += conn.send(h11.Data(data=payload)) or b""
            data += conn.send(h11.EndOfMessage()) or b""
            await stream.send_all(data)
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return
            conn.start_next_cycle()


def entry(up: Upstream, **kw: Any) -> UpstreamEntry:
    return UpstreamEntry(url=up.url, **kw)


def group_route(entries: Sequence[UpstreamEntry], prefix: str = "/", **kw: Any) -> Route:
    return Route(prefix=prefix, upstreams=tuple(entries), **kw)


def group_config(
    routes: Sequence[Route], *, session_key_file: str | None = None, grace: float = 5.0
) -> Config:
    return Config(
        routes=tuple(routes),
        server=ServerSettings(
            listen=("127.0.0.1:0",), shutdown_grace=grace, session_key_file=session_key_file
        ),
        admin=AdminSettings(listen="127.0.0.1:0"),
    )


async def run_proxy(nursery: trio.Nursery, config: Config) -> RunningProxy:
    """A ``Server`` for ``config`` running in ``nursery`` (admin listener included)."""
    return await start_server(nursery, Server(config))


class Client:
    """One keep-alive client connection: requests one after another (h11, client role)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.h11 = h11.Connection(h11.CLIENT)

    @classmethod
    async def open(cls, proxy: RunningProxy) -> Client:
        return cls(await trio.open_tcp_stream(proxy.host, proxy.port))

    async def aclose(self) -> None:
        await self.stream.aclose()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def request(
        self,
        method: bytes,
        target: bytes,
        headers: Iterable[tuple[bytes, bytes]] = (),
        body: bytes = b"",
    ) -> tuple[int, Headers, bytes]:
        h = self.h11
        if h.our_state is h11.DONE and h.their_state is h11.DONE:
            h.start_next_cycle()
        hdrs: Headers = [(b"host", b"proxy"), *headers]
        if body or method in (b"POST", b"PUT"):
            hdrs.append((b"content-length", b"%d" % len(body)))
        data = h.send(h11.Request(method=method, target=target, headers=hdrs)) or b""
        if body:
            data += h.send(h11.Data(data=body)) or b""
        data += h.send(h11.EndOfMessage()) or b""
        await self.stream.send_all(data)
        status = 0
        resp_headers: Headers = []
        out = bytearray()
        while True:
            event = h.next_event()
            if event is h11.NEED_DATA:
                h.receive_data(await self.stream.receive_some(RECV))
            elif isinstance(event, h11.Response):
                status, resp_headers = event.status_code, list(event.headers)
            elif isinstance(event, h11.Data):
                out += event.data
            elif isinstance(event, h11.EndOfMessage):
                return status, resp_headers, bytes(out)
            elif isinstance(event, h11.InformationalResponse):
                continue
            else:
                raise AssertionError(f"unexpected {event!r}")


def header(headers: Headers, name: bytes) -> bytes | None:
    return next((v for n, v in headers if n.lower() == name), None)


async def eventually(
    check: Callable[[], Awaitable[bool]], *, within: float = 10.0, step: float = 0.02
) -> None:
    """Poll ``check`` until it is true; fail after ``within`` seconds. (Polling is the
    point: the state polled, e.g. ``/readyz``, has no event to wait on.)"""
    with trio.fail_after(within):
        while not await check():  # noqa: ASYNC110
            await trio.sleep(step)


async def readyz(proxy: RunningProxy) -> dict[str, str]:
    """``/readyz`` detail lines: ``{upstream name: state}`` (every route)."""
    host, port = proxy.admin
    status, _, body = await http_request(host, port, "GET", "/readyz")
    assert status in (200, 503)
    states: dict[str, str] = {}
    for line in body.decode().splitlines():
        parts = line.split()
        if parts and parts[0] == "upstream":
            _, _prefix, name, state = parts
            states[name] = state
    return states


async def scrape_admin(proxy: RunningProxy) -> Samples:
    host, port = proxy.admin
    return await scrape(host, port)


def upstream_value(samples: Samples, name: str, route: str, upstream: str) -> float:
    """A per-upstream sample (0 when absent)."""
    key = (name, frozenset({("route", route), ("upstream", upstream)}))
    return samples.get(key, 0.0)


@dataclass
class Tally:
    """Which upstream answered each of a series of requests (bodies are names)."""

    order: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for name in self.order:
            out[name] = out.get(name, 0) + 1
        return out


async def tally(
    proxy: RunningProxy,
    n: int,
    target: bytes = b"/x",
    headers: Callable[[int], Iterable[tuple[bytes, bytes]]] = lambda i: (),
) -> Tally:
    """``n`` GETs in a row on one connection; each must be a 200."""
    result = Tally()
    async with await Client.open(proxy) as client:
        for i in range(n):
            status, _, body = await client.request(b"GET", target, headers(i))
            assert status == 200, (i, status, body)
            result.order.append(body.decode())
    return result
