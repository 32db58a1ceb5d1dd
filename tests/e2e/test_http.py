"""End-to-end HTTP/1.1 behaviour of the proxy: routing, headers, framing, pooling, errors.

Real sockets on 127.0.0.1 only. The upstream is either ``echo_app`` served by hypercorn
(it reports what it received) or a raw-socket upstream (:class:`ScriptedUpstream`) where
the exact bytes on the wire matter or where the number of upstream connections is counted.
Streaming, backpressure, client disconnects and timeouts are covered elsewhere.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import h11
import pytest
import trio

from proxycore import PoolSettings, Route, Timeouts
from tests.apps import echo_app
from tests.helpers import (
    http_request,
    read_http_response,
    read_until,
    start_app,
    start_proxy,
    start_raw_server,
)

Headers = list[tuple[bytes, bytes]]

RID_OK = re.compile(rb"[A-Za-z0-9._:\-]{1,128}")
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


# --------------------------------------------------------------------------- client side


def request_bytes(
    method: bytes,
    target: bytes,
    headers: Sequence[tuple[bytes, bytes]] = (),
    body: bytes = b"",
    *,
    version: bytes = b"1.1",
) -> bytes:
    """A raw request; ``Host: x`` is added for HTTP/1.1 unless given."""
    lines = [b"%s %s HTTP/%s\r\n" % (method, target, version)]
    if version == b"1.1" and not any(n.lower() == b"host" for n, _ in headers):
        lines.append(b"Host: x\r\n")
    lines.extend(b"%s: %s\r\n" % (n, v) for n, v in headers)
    lines.append(b"\r\n")
    return b"".join(lines) + body


async def read_to_eof(stream: trio.SocketStream) -> bytes:
    chunks: list[bytes] = []
    while True:
        data = await stream.receive_some(65536)
        if not data:
            return b"".join(chunks)
        chunks.append(data)


async def send_raw(host: str, port: int, data: bytes) -> bytes:
    """Send ``data`` on a fresh connection and return everything until the proxy closes."""
    stream = await trio.open_tcp_stream(host, port)
    async with stream:
        await stream.send_all(data)
        return await read_to_eof(stream)


@dataclass
class RawResponse:
    """One response split by hand: the head parsed, the rest kept as raw bytes."""

    version: bytes
    status: int
    headers: Headers  # names lowercased
    rest: bytes

    def get(self, name: bytes) -> bytes | None:
        values = self.all(name)
        return values[0] if values else None

    def all(self, name: bytes) -> list[bytes]:
        return [v for n, v in self.headers if n == name]


def split_response(data: bytes) -> RawResponse:
    head, sep, rest = data.partition(b"\r\n\r\n")
    assert sep, f"no complete response head in {data[:200]!r}"
    start, *lines = head.split(b"\r\n")
    version, status = start.split(b" ")[:2]
    headers: Headers = []
    for line in lines:
        name, _, value = line.partition(b":")
        headers.append((name.strip().lower(), value.strip()))
    return RawResponse(version, int(status), headers, rest)


@dataclass
class Resp:
    status: int
    headers: Headers  # names lowercased (h11)
    body: bytes
    interim: list[int] = field(default_factory=list)

    def get(self, name: bytes) -> bytes | None:
        values = [v for n, v in self.headers if n == name]
        return values[0] if values else None


class ResponseReader:
    """Parses successive responses off one client connection (keep-alive, pipelining).

    One h11 connection for the whole stream, so bytes of the next response that arrive
    with the current one are kept for the next call.
    """

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.h = h11.Connection(h11.CLIENT)

    async def next(self, method: bytes = b"GET") -> Resp:
        h = self.h
        if h.our_state is h11.DONE and h.their_state is h11.DONE:
            h.start_next_cycle()
        # Put h11 in the "response expected" state; the real request was sent raw.
        h.send(h11.Request(method=method, target=b"/", headers=[(b"host", b"x")]))
        h.send(h11.EndOfMessage())
        resp = Resp(0, [], b"")
        body = bytearray()
        while True:
            event = h.next_event()
            if event is h11.NEED_DATA:
                h.receive_data(await self.stream.receive_some(65536))
            elif isinstance(event, h11.InformationalResponse):
                resp.interim.append(event.status_code)
            elif isinstance(event, h11.Response):
                resp.status = event.status_code
                resp.headers = list(event.headers)
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                resp.body = bytes(body)
                return resp
            else:
                raise AssertionError(f"unexpected h11 event {event!r}")


def header(headers: Headers, name: bytes) -> bytes | None:
    for n, v in headers:
        if n.lower() == name:
            return v
    return None


def assert_proxy_error(
    status: int, headers: Headers, body: bytes, expected: int, error_type: str | None = None
) -> dict[str, str]:
    """A proxy-made error: the status, a JSON body of the documented shape, and an
    X-Request-ID header equal to the body's request_id. Returns the ``error`` object."""
    assert status == expected, (status, body)
    assert header(headers, b"content-type") == b"application/json"
    payload = json.loads(body)
    assert set(payload) == {"error"}
    error: dict[str, str] = payload["error"]
    assert set(error) == {"type", "message", "request_id"}
    assert isinstance(error["message"], str) and error["message"]
    if error_type is not None:
        assert error["type"] == error_type, error
    rid = header(headers, b"x-request-id")
    assert rid is not None and RID_OK.fullmatch(rid)
    assert error["request_id"] == rid.decode()
    return error


def assert_raw_error(data: bytes, expected: int, error_type: str | None = None) -> dict[str, str]:
    """Like :func:`assert_proxy_error` for a raw response read to EOF (must close)."""
    resp = split_response(data)
    assert resp.version == b"HTTP/1.1"
    length = resp.get(b"content-length")
    assert length is not None and int(length) == len(resp.rest), data
    assert resp.get(b"connection") == b"close"
    return assert_proxy_error(resp.status, resp.headers, resp.rest, expected, error_type)


# --------------------------------------------------------------------------- echo upstream


def echoed(body: bytes) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(body)
    return data


def echo_values(echo: dict[str, Any], name: str) -> list[str]:
    return [v for n, v in echo["headers"] if n == name]


def echo_names(echo: dict[str, Any]) -> set[str]:
    return {n for n, _ in echo["headers"]}


async def echo_proxy(nursery: trio.Nursery, **route: Any) -> tuple[str, int, str]:
    """echo_app behind a proxy with one route (``prefix`` defaults to ``/``).

    Returns ``(proxy_host, proxy_port, upstream_hostport)``.
    """
    up_host, up_port = await start_app(nursery, echo_app)
    route.setdefault("prefix", "/")
    base = route.pop("base", "/")
    routes = [Route(upstream=f"http://{up_host}:{up_port}{base}", **route)]
    host, port = await start_proxy(nursery, routes)
    return host, port, f"{up_host}:{up_port}"


# --------------------------------------------------------------------------- raw upstream

#: (connection number, request number on that connection, request head) ->
#: (bytes to send, keep the connection open afterwards).
ReplyFn = Callable[[int, int, bytes], tuple[bytes, bool]]


async def _read_request(stream: trio.SocketStream, buf: bytearray) -> bytes | None:
    """Read one request head (and its Content-Length body) off ``stream``; None at EOF."""
    while b"\r\n\r\n" not in buf:
        data = await stream.receive_some(65536)
        if not data:
            return None
        buf += data
    end = buf.index(b"\r\n\r\n") + 4
    head = bytes(buf[:end])
    del buf[:end]
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(buf) < length:
        data = await stream.receive_some(65536)
        if not data:
            return None
        buf += data
    del buf[:length]
    return head


class ScriptedUpstream:
    """A raw HTTP/1.1 upstream that counts connections and answers from a script."""

    def __init__(self, reply: ReplyFn) -> None:
        self.reply = reply
        self.connections = 0
        self.heads: list[bytes] = []
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    async def start(self, nursery: trio.Nursery) -> ScriptedUpstream:
        self.port = await start_raw_server(nursery, self._handle)
        return self

    async def _handle(self, stream: trio.SocketStream) -> None:
        conn_no = self.connections
        self.connections += 1
        buf = bytearray()
        req_no = 0
        while True:
            head = await _read_request(stream, buf)
            if head is None:
                return
            self.heads.append(head)
            data, keep = self.reply(conn_no, req_no, head)
            req_no += 1
            if data:
                await stream.send_all(data)
            if not keep:
                return


def always(data: bytes, keep: bool = True) -> ReplyFn:
    def reply(conn: int, req: int, head: bytes) -> tuple[bytes, bool]:
        return data, keep

    return reply


async def scripted_proxy(
    nursery: trio.Nursery, reply: ReplyFn, **proxy: Any
) -> tuple[str, int, ScriptedUpstream]:
    up = await ScriptedUpstream(reply).start(nursery)
    host, port = await start_proxy(nursery, up.url, **proxy)
    return host, port, up


async def assert_upstream_untouched(host: str, port: int, up: ScriptedUpstream) -> None:
    """The upstream saw no connection so far: prove it by counting one good request."""
    assert up.connections == 0
    status, _, body = await http_request(host, port, "GET", "/check")
    assert (status, body) == (200, b"ok")
    assert up.connections == 1


# =========================================================================== routing


async def test_longest_prefix_wins_whatever_the_route_order() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            up_host, up_port = await start_app(nursery, echo_app)
            up = f"http://{up_host}:{up_port}"
            routes = [
                Route("/", f"{up}/root/", name="root"),
                Route("/api/v2", f"{up}/v2-base/", name="v2"),
                Route("/api/", f"{up}/api-base/", name="api"),
            ]
            host, port = await start_proxy(nursery, routes)
            got = {}
            for target in ["/api/v2/x", "/api/v2", "/api/v2x", "/api/x", "/api", "/apix", "/o"]:
                status, _, body = await http_request(host, port, "GET", target)
                assert status == 200, target
                got[target] = echoed(body)["path"]
            nursery.cancel_scope.cancel()
    assert got == {
        "/api/v2/x": "/v2-base/x",
        "/api/v2": "/v2-base",
        "/api/v2x": "/api-base/v2x",
        "/api/x": "/api-base/x",
        "/api": "/api-base",
        "/apix": "/root/apix",
        "/o": "/root/o",
    }


@pytest.mark.parametrize("prefix", ["/api/", "/api"])
async def test_prefix_matches_at_segment_boundary_only(prefix: str) -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            host, port, _ = await echo_proxy(nursery, prefix=prefix, base="/base/")
            results = {}
            for target in ["/api/x", "/api", "/api/"]:
                status, _, body = await http_request(host, port, "GET", target)
                assert status == 200, target
                results[target] = echoed(body)["path"]
            status, headers, body = await http_request(host, port, "GET", "/apix")
            nursery.cancel_scope.cancel()
    assert results == {"/api/x": "/base/x", "/api": "/base", "/api/": "/base/"}
    assert_proxy_error(status, headers, body, 404, "no_route")


@pytest.mark.parametrize(("strip", "expected"), [(True, "/api/x"), (False, "/api/v1/x")])
async def test_strip_prefix(strip: bool, expected: str) -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            host, port, _ = await echo_proxy(
                nursery, prefix="/v1/", base="/api/", strip_prefix=strip
            )
            status, _, body = await http_request(host, port, "GET", "/v1/x")
            nursery.cancel_scope.cancel()
    assert status == 200
    assert echoed(body)["path"] == expected


async def test_path_and_query_are_carried_byte_for_byte() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            host, port, _ = await echo_proxy(nursery)
            target = "/q/a%7eb/c%20d%3a?a=%2F&b=&&c&d=%zz&e=?/x"
            status, _, body = await http_request(host, port, "GET", target)
            nursery.cancel_scope.cancel()
    assert status == 200
    echo = echoed(body)
    # The path is normalized (unreserved decoded, hex upper-cased); the query is not touched.
    assert echo["path"] == "/q/a~b/c%20d%3A"
    assert echo["query"] == "a=%2F&b=&&c&d=%zz&e=?/x"


async def test_no_route_is_404_json_with_request_id() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            host, port, _ = await echo_proxy(nursery, prefix="/only/")
            status, headers, body = await http_request(host, port, "GET", "/elsewhere?x=1")
            nursery.cancel_scope.cancel()
    error = assert_proxy_error(status, headers, body, 404, "no_route")
    assert RID_OK.fullmatch(error["request_id"].encode())


@pytest.mark.parametrize(
    ("method", "target"),
    [
        (b"GET", b"/a/../b"),
        (b"GET", b"/a/%2e%2E/b"),
        (b"GET", b"/a/.%2e/"),
        (b"GET", b"/./x"),
        (b"GET", b"/a/..\\b"),
        (b"GET", b"/.."),
        (b"GET", b"http://x/y"),
        (b"OPTIONS", b"*"),
    ],
)
async def test_unsafe_targets_are_refused_before_routing(method: bytes, target: bytes) -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            host, port, up = await scripted_proxy(nursery, always(OK))
            data = await send_raw(host, port, request_bytes(method, target))
            assert up.connections == 0
            await assert_upstream_untouched(host, port, up)
            nursery.cancel_scope.cancel()
    assert_raw_error(data, 400, "bad_request")


# =========================================================================== headers


async def test_hop_by_hop_and_connection_named_headers_are_not_forwarded() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            host, port, _ = await echo_proxy(nursery)
            status, _, body = await http_request(
                host,
                port,
                "GET",
                "/h",
                [
                    ("Connection", "keep-alive, X-Drop-Me"),
                    ("Connection", "x-drop-too"),
                    ("Keep-Alive", "timeout=5"),
                    ("Proxy-Connection", "keep-alive"),
                    ("Proxy-Authorization", "Basic c2VjcmV0"),
                    ("TE", "trailers"),
                    ("Trailer", "X-Checksum"),
                    ("X-Drop-Me", "1"),
                    ("X-Drop-Too", "2"),
                    ("X-Keep", "yes"),
                ],
            )
            nursery.cancel_scope.cancel()
    assert status == 200
    echo = echoed(body)
    names = echo_names(echo)
    for dropped in [
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authorization",
        "te",
        "trailer",
        "x-drop-me",
        "x-drop-too",
    ]:
        assert dropped not in names, dropped
    assert echo_values(echo, "x-keep") == ["yes"]


async def test_connection_header_cannot_remove_proxy_owned_headers() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            host, port, up_hostport = await echo_proxy(nursery)
            status, headers, body = await http_request(
                host,
                port,
                "GET",
                "/c",
                [
                    ("Host", "client.example"),
                    ("Connection", "X-Forwarded-For, X-Request-ID, Host"),
                    ("X-Forwarded-For", "10.9.9.9"),
                    ("X-Request-ID", "client-id-1"),
                ],
            )
            nursery.cancel_scope.cancel()
    assert status == 200
    echo = echoed(body)
    assert echo_values(echo, "host") == [up_hostport]
    xff = echo_values(echo, "x-forwarded-for")
    assert len(xff) == 1 and xff[0].endswith("127.0.0.1")
    rid = echo_values(echo, "x-request-id")
    assert len(rid) == 1 and RID_OK.fullmatch(rid[0].encode())
    assert header(headers, b"x-request-id") == rid[0].encode()


async def test_x_forwarded_for_from_an_untrusted_client_is_replaced() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            host, port, _ = await echo_proxy(nursery)
            status, _, body = await http_request(
                host, port, "GET", "/", [("X-Forwarded-For", "203.0.113.7, 198.51.100.2")]
            )
            nursery.cancel_scope.cancel()
    assert status == 200
    echo = echoed(body)
    # No trusted_proxies: the client's own chain is never believed (test_request_view.py
    # covers a trusted peer).
    assert echo_values(echo, "x-forwarded-for") == ["127.0.0.1"]
    assert echo_values(echo, "x-forwarded-proto") == ["http"]


@pytest.mark.parametrize("preserve", [False, True])
async def test_host_and_x_forwarded_host(preserve: bool) -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            host, port, up_hostport = await echo_proxy(nursery, preserve_host=preserve)
            status, _, body = await http_request(
                host, port, "GET", "/", [("Host", "client.example:8443")]
            )
            nursery.cancel_scope.cancel()
    assert status == 200
    echo = echoed(body)
    assert echo_values(echo, "host") == ["client.example:8443" if preserve else up_hostport]
    assert echo_values(echo, "x-forwarded-host") == ["client.example:8443"]


async def test_sane_client_request_id_is_propagated_and_returned() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            host, port, _ = await echo_proxy(nursery)
            status, headers, body = await http_request(
                host, port, "GET", "/", [("X-Request-ID", "req-42.abc:DEF_9")]
            )
            nursery.cancel_scope.cancel()
    assert status == 200
    assert echo_values(echoed(body), "x-request-id") == ["req-42.abc:DEF_9"]
    assert header(headers, b"x-request-id") == b"req-42.abc:DEF_9"


@pytest.mark.parametrize("bad", ["has spaces in it", "a" * 300, "semi;colon"])
async def test_insane_client_request_id_is_replaced(bad: str) -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            host, port, _ = await echo_proxy(nursery)
            status, headers, body = await http_request(
                host, port, "GET", "/", [("X-Request-ID", bad)]
            )
            nursery.cancel_scope.cancel()
    assert status == 200
    sent = echo_values(echoed(body), "x-request-id")
    assert len(sent) == 1 and sent[0] != bad
    assert RID_OK.fullmatch(sent[0].encode())
    assert header(headers, b"x-request-id") == sent[0].encode()


@pytest.mark.parametrize(
    ("mode", "expected"), [("identity", ["identity"]), ("passthrough", ["gzip, br"])]
)
async def test_accept_encoding_modes(mode: str, expected: list[str]) -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            host, port, _ = await echo_proxy(nursery, accept_encoding=mode)
            status, _, body = await http_request(
                host, port, "GET", "/", [("Accept-Encoding", "gzip, br")]
            )
            nursery.cancel_scope.cancel()
    assert status == 200
    assert echo_values(echoed(body), "accept-encoding") == expected


async def test_response_hop_by_hop_headers_are_not_forwarded() -> None:
    reply = (
        b"HTTP/1.1 200 OK\r\n"
        b"Connection: close, X-Secret-Hop\r\n"
        b"X-Secret-Hop: 1\r\n"
        b"Keep-Alive: timeout=5, max=100\r\n"
        b"Proxy-Authenticate: Basic\r\n"
        b"Trailer: X-Checksum\r\n"
        b"X-Visible: yes\r\n"
        b"Content-Length: 2\r\n\r\nok"
    )
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            host, port, _ = await scripted_proxy(nursery, always(reply, keep=False))
            stream = await trio.open_tcp_stream(host, port)
            async with stream:
                await stream.send_all(request_bytes(b"GET", b"/"))
                resp = await ResponseReader(stream).next()
            nursery.cancel_scope.cancel()
    assert (resp.status, resp.body) == (200, b"ok")
    names = {n for n, _ in resp.headers}
    for dropped in [b"x-secret-hop", b"keep-alive", b"proxy-authenticate", b"trailer"]:
        assert dropped not in names, dropped
    # The upstream's "Connection: close" is about the upstream hop, not the client's.
    assert b"connection" not in names
    assert resp.get(b"x-visible") == b"yes"


# =========================================================================== keep-alive


async def test_sequential_requests_on_one_client_connection() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            host, port, _ = await echo_proxy(nursery)
            stream = await trio.open_tcp_stream(host, port)
            paths = []
            async with stream:
                reader = ResponseReader(stream)
                for i in range(5):
                    await stream.send_all(request_bytes(b"GET", b"/k/%d" % i))
                    resp = await reader.next()
                    assert resp.status == 200
                    paths.append(echoed(resp.body)["path"])
            nursery.cancel_scope.cancel()
    assert paths == [f"/k/{i}" for i in range(5)]


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_pipelined_requests_are_answered_in_order(chunked: bool) -> None:
    body = b"pipelined body"
    if chunked:
        post = request_bytes(
            b"POST",
            b"/p/2",
            [(b"Transfer-Encoding", b"chunked")],
            b"4\r\npipe\r\na\r\nlined body\r\n0\r\n\r\n",
        )
    else:
        post = request_bytes(b"POST", b"/p/2", [(b"Content-Length", b"%d" % len(body))], body)
    data = request_bytes(b"GET", b"/p/1") + post + request_bytes(b"GET", b"/p/3")
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            host, port, _ = await echo_proxy(nursery)
            stream = await trio.open_tcp_stream(host, port)
            async with stream:
                await stream.send_all(data)
                reader = ResponseReader(stream)
                responses = [await reader.next(m) for m in (b"GET", b"POST", b"GET")]
            nursery.cancel_scope.cancel()
    assert [r.status for r in responses] == [200, 200, 200]
    echoes = [echoed(r.body) for r in responses]
    assert [(e["method"], e["path"], e["body_len"]) for e in echoes] == [
        ("GET", "/p/1", 0),
        ("POST", "/p/2", len(body)),
        ("GET", "/p/3", 0),
    ]
    assert echoes[1]["body_sha256"] == hashlib.sha256(body).hexdigest()


# =========================================================================== upstream pool


async def test_upstream_connection_is_reused() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            host, port, up = await scripted_proxy(nursery, always(OK))
            first = await http_request(host, port, "GET", "/1")
            second = await http_request(host, port, "GET", "/2")
            nursery.cancel_scope.cancel()
    assert first[0] == second[0] == 200
    assert first[2] == second[2] == b"ok"
    assert up.connections == 1
    assert [h.split(b" ")[1] for h in up.heads] == [b"/1", b"/2"]


async def test_pooled_connection_closed_by_upstream_while_idle() -> None:
    def reply(conn: int, req: int, head: bytes) -> tuple[bytes, bool]:
        return OK, conn > 0  # keep-alive response, then the first connection is closed

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            host, port, up = await scripted_proxy(nursery, reply)
            first = await http_request(host, port, "GET", "/1")
            second = await http_request(host, port, "GET", "/2")
            nursery.cancel_scope.cancel()
    assert (first[0], first[2]) == (200, b"ok")
    assert (second[0], second[2]) == (200, b"ok")
    assert up.connections == 2


async def test_stale_pooled_connection_is_retried_for_idempotent_request() -> None:
    # The upstream reads request 2 on the pooled connection and closes without answering
    # (the keep-alive race): a GET without body must be retried on a fresh connection.
    def reply(conn: int, req: int, head: bytes) -> tuple[bytes, bool]:
        if conn == 0 and req == 1:
            return b"", False
        return OK, True

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            host, port, up = await scripted_proxy(nursery, reply)
            first = await http_request(host, port, "GET", "/1")
            second = await http_request(host, port, "GET", "/2")
            nursery.cancel_scope.cancel()
    assert (first[0], first[2]) == (200, b"ok")
    assert (second[0], second[2]) == (200, b"ok")
    assert up.connections == 2
    assert [h.split(b" ")[1] for h in up.heads] == [b"/1", b"/2", b"/2"]


async def test_stale_pooled_connection_is_not_retried_for_request_with_body() -> None:
    def reply(conn: int, req: int, head: bytes) -> tuple[bytes, bool]:
        if conn == 0 and req == 1:
            return b"", False
        return OK, True

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            host, port, up = await scripted_proxy(nursery, reply)
            first = await http_request(host, port, "GET", "/1")
            status, headers, body = await http_request(host, port, "POST", "/2", body=b"data")
            nursery.cancel_scope.cancel()
    assert first[0] == 200
    assert_proxy_error(status, headers, body, 502, "upstream_reset")
    assert up.connections == 1


async def test_response_with_connection_close_is_not_reused() -> None:
    reply = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            # The upstream keeps serving on the socket anyway: only the proxy can avoid reuse.
            host, port, up = await scripted_proxy(nursery, always(reply, keep=True))
            first = await http_request(host, port, "GET", "/1")
            second = await http_request(host, port, "GET", "/2")
            nursery.cancel_scope.cancel()
    assert first[0] == second[0] == 200
    assert up.connections == 2


async def test_http10_upstream_response_is_not_reused() -> None:
    reply = b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok"
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            host, port, up = await scripted_proxy(nursery, always(reply, keep=True))
            first = await http_request(host, port, "GET", "/1")
            second = await http_request(host, port, "GET", "/2")
            nursery.cancel_scope.cancel()
    assert (first[0], first[2]) == (200, b"ok")
    assert (second[0], second[2]) == (200, b"ok")
    assert up.connections == 2


async def test_response_with_bytes_after_its_body_is_not_reused() -> None:
    def reply(conn: int, req: int, head: bytes) -> tuple[bytes, bool]:
        return (OK + b"EXTRA" if conn == 0 else OK), True

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            host, port, up = await scripted_proxy(nursery, reply)
            first = await http_request(host, port, "GET", "/1")
            second = await http_request(host, port, "GET", "/2")
            nursery.cancel_scope.cancel()
    assert (first[0], first[2]) == (200, b"ok")
    assert (second[0], second[2]) == (200, b"ok")
    assert up.connections == 2


async def test_upstream_request_head_shape() -> None:
    data = request_bytes(
        b"GET",
        b"/a/b?x=1",
        [(b"Host", b"client.example"), (b"x-MiXeD-Case", b"v"), (b"Accept", b"*/*"), *CLOSE],
        version=b"1.1",
    )
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            host, port, up = await scripted_proxy(nursery, always(OK))
            raw = await send_raw(host, port, data)
            nursery.cancel_scope.cancel()
    assert split_response(raw).status == 200
    (head,) = up.heads
    lines = head.split(b"\r\n")
    assert lines[0] == b"GET /a/b?x=1 HTTP/1.1"
    assert b"x-MiXeD-Case: v" in lines  # the client's name casing is kept
    assert b"Accept: */*" in lines
    assert f"Host: 127.0.0.1:{up.port}".encode() in lines
    assert not any(line.lower().startswith(b"connection:") for line in lines)


async def test_http10_client_request_goes_upstream_as_http11() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            host, port, up = await scripted_proxy(nursery, always(OK))
            raw = await send_raw(host, port, request_bytes(b"GET", b"/old", version=b"1.0"))
            nursery.cancel_scope.cancel()
    resp = split_response(raw)
    assert (resp.status, resp.rest) == (200, b"ok")
    assert resp.get(b"connection") == b"close"
    assert up.heads[0].startswith(b"GET /old HTTP/1.1\r\n")
    assert f"\r\nHost: 127.0.0.1:{up.port}\r\n".encode() in up.heads[0]


async def test_large_head_under_the_limit_is_forwarded_intact() -> None:
    big = bytes(i % 26 + 97 for i in range(60000))
    data = request_bytes(b"GET", b"/big", [(b"X-Big", big), *CLOSE])
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            host, port, up = await scripted_proxy(nursery, always(OK))
            raw = await send_raw(host, port, data)
            nursery.cancel_scope.cancel()
    assert split_response(raw).status == 200
    assert b"\r\nX-Big: " + big + b"\r\n" in up.heads[0]


# =========================================================================== request bodies


async def test_content_length_post_body_arrives_intact() -> None:
    body = bytes(range(256)) * 100
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            host, port, _ = await echo_proxy(nursery)
            status, _, resp = await http_request(host, port, "POST", "/up", body=body)
            nursery.cancel_scope.cancel()
    assert status == 200
    echo = echoed(resp)
    assert (echo["method"], echo["body_len"]) == ("POST", len(body))
    assert echo["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert echo_values(echo, "content-length") == [str(len(body))]


async def test_chunked_upload_in_several_sends_arrives_intact() -> None:
    pieces = [b"a", b"b" * 5000, bytes(range(256)) * 50, b"end"]
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            host, port, _ = await echo_proxy(nursery)
            stream = await trio.open_tcp_stream(host, port)
            async with stream:
                await stream.send_all(
                    request_bytes(b"POST", b"/up", [(b"Transfer-Encoding", b"chunked")])
                )
                for piece in pieces:
                    await stream.send_all(b"%x\r\n%s\r\n" % (len(piece), piece))
                await stream.send_all(b"0\r\n\r\n")
                status, _, resp = await read_http_response(stream, b"POST")
            nursery.cancel_scope.cancel()
    assert status == 200
    whole = b"".join(pieces)
    echo = echoed(resp)
    assert echo["body_len"] == len(whole)
    assert echo["body_sha256"] == hashlib.sha256(whole).hexdigest()


async def test_malformed_chunk_size_with_the_head_is_400_without_upstream() -> None:
    data = request_bytes(b"POST", b"/up", [(b"Transfer-Encoding", b"chunked")], b"zz\r\nhi\r\n")
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            host, port, up = await scripted_proxy(nursery, always(OK))
            raw = await send_raw(host, port, data)
            await assert_upstream_untouched(host, port, up)
            nursery.cancel_scope.cancel()
    assert_raw_error(raw, 400, "bad_request")


async def test_malformed_chunk_size_mid_body_is_400() -> None:
    head_seen = trio.Event()

    async def upstream(stream: trio.SocketStream) -> None:
        await read_until(stream, b"\r\n\r\n")
        head_seen.set()
        while await stream.receive_some(65536):
            pass

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            up_port = await start_raw_server(nursery, upstream)
            host, port = await start_proxy(nursery, f"http://127.0.0.1:{up_port}/")
            stream = await trio.open_tcp_stream(host, port)
            async with stream:
                await stream.send_all(
                    request_bytes(b"POST", b"/up", [(b"Transfer-Encoding", b"chunked")])
                    + b"3\r\nabc\r\n"
                )
                await head_seen.wait()
                await stream.send_all(b"zz\r\n")
                raw = await read_to_eof(stream)
            nursery.cancel_scope.cancel()
    assert_raw_error(raw, 400, "bad_request")


@pytest.mark.parametrize(
    "framing",
    [
        [(b"Content-Length", b"5"), (b"Transfer-Encoding", b"chunked")],
        [(b"Transfer-Encoding", b"chunked"), (b"Content-Length", b"5")],
        [(b"Content-Length", b"5"), (b"Content-Length", b"6")],
        [(b"Content-Length", b"5, 6")],
        [(b"Content-Length", b"-5")],
    ],
    ids=["cl-te", "te-cl", "cl-cl", "cl-list", "cl-negative"],
)
async def test_ambiguous_request_framing_is_400_without_upstream(
    framing: list[tuple[bytes, bytes]],
) -> None:
    data = request_bytes(b"POST", b"/up", framing, b"0\r\n\r\n")
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            host, port, up = await scripted_proxy(nursery, always(OK))
            raw = await send_raw(host, port, data)
            await assert_upstream_untouched(host, port, up)
            nursery.cancel_scope.cancel()
    assert_raw_error(raw, 400)


@pytest.mark.parametrize("te", [b"gzip, chunked", b"chunked, chunked", b"identity"])
async def test_transfer_encoding_other_than_chunked_is_refused(te: bytes) -> None:
    data = request_bytes(b"POST", b"/up", [(b"Transfer-Encoding", te)], b"0\r\n\r\n")
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            host, port, up = await scripted_proxy(nursery, always(OK))
            raw = await send_raw(host, port, data)
            await assert_upstream_untouched(host, port, up)
            nursery.cancel_scope.cancel()
    # h11 refuses these itself (its hint is 501); the proxy answers its own 400.
    assert split_response(raw).status in (400, 501)
    assert_raw_error(raw, split_response(raw).status)


async def test_transfer_encoding_on_http10_is_refused() -> None:
    data = request_bytes(
        b"POST", b"/up", [(b"Transfer-Encoding", b"chunked")], b"0\r\n\r\n", version=b"1.0"
    )
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            host, port, up = await scripted_proxy(nursery, always(OK))
            raw = await send_raw(host, port, data)
            await assert_upstream_untouched(host, port, up)
            nursery.cancel_scope.cancel()
    assert_raw_error(raw, 400)


async def test_expect_100_continue() -> None:
    body = b"the body after 100"
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            host, port, _ = await echo_proxy(nursery)
            stream = await trio.open_tcp_stream(host, port)
            async with stream:
                await stream.send_all(
                    request_bytes(
                        b"POST",
                        b"/e",
                        [(b"Expect", b"100-continue"), (b"Content-Length", b"%d" % len(body))],
                    )
                )
                interim = await read_until(stream, b"\r\n\r\n")
                await stream.send_all(body)
                status, _, resp = await read_http_response(stream, b"POST")
            nursery.cancel_scope.cancel()
    assert interim == CONTINUE
    assert status == 200
    echo = echoed(resp)
    assert echo["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert "expect" not in echo_names(echo)


async def test_other_expectation_is_417() -> None:
    data = request_bytes(
        b"POST", b"/e", [(b"Expect", b"something-else"), (b"Content-Length", b"3")], b"abc"
    )
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            host, port, up = await scripted_proxy(nursery, always(OK))
            raw = await send_raw(host, port, data)
            await assert_upstream_untouched(host, port, up)
            nursery.cancel_scope.cancel()
    assert_raw_error(raw, 417, "expectation_failed")


# =========================================================================== response framing


async def proxied_raw(reply: bytes, request: bytes, *, keep: bool = False) -> bytes:
    """One raw request through the proxy to an upstream answering ``reply``; read to EOF."""
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            host, port, _ = await scripted_proxy(nursery, always(reply, keep=keep))
            raw = await send_raw(host, port, request)
            nursery.cancel_scope.cancel()
    return raw


CLOSE = [(b"Connection", b"close")]


async def test_head_response_keeps_content_length_and_has_no_body() -> None:
    reply = b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\nContent-Type: text/plain\r\n\r\n"
    raw = await proxied_raw(reply, request_bytes(b"HEAD", b"/", CLOSE), keep=True)
    resp = split_response(raw)
    assert resp.status == 200
    assert resp.all(b"content-length") == [b"1234"]
    assert resp.get(b"transfer-encoding") is None
    assert resp.rest == b""


@pytest.mark.parametrize(
    "reply",
    [
        b"HTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n",
        b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\nContent-Length: 1234\r\n\r\n',
    ],
    ids=["204", "304"],
)
async def test_204_and_304_have_no_body(reply: bytes) -> None:
    raw = await proxied_raw(reply, request_bytes(b"GET", b"/", CLOSE), keep=True)
    resp = split_response(raw)
    assert resp.status in (204, 304)
    assert resp.get(b"transfer-encoding") is None
    assert resp.rest == b""
    if resp.status == 304:
        assert resp.get(b"content-length") == b"1234"  # describes the representation


async def test_close_delimited_body_is_chunked_for_http11_client() -> None:
    reply = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nhello close-delimited world"
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            host, port, _ = await scripted_proxy(nursery, always(reply, keep=False))
            stream = await trio.open_tcp_stream(host, port)
            async with stream:
                reader = ResponseReader(stream)
                await stream.send_all(request_bytes(b"GET", b"/1"))
                first = await reader.next()
                # The client connection stays usable: the body had a clean chunked end.
                await stream.send_all(request_bytes(b"GET", b"/2"))
                second = await reader.next()
            nursery.cancel_scope.cancel()
    for resp in (first, second):
        assert resp.status == 200
        assert resp.get(b"transfer-encoding") == b"chunked"
        assert resp.get(b"content-length") is None
        assert resp.body == b"hello close-delimited world"


async def test_close_delimited_body_to_http10_client() -> None:
    reply = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nhello close-delimited world"
    raw = await proxied_raw(reply, request_bytes(b"GET", b"/", version=b"1.0"))
    resp = split_response(raw)
    assert resp.status == 200
    assert resp.get(b"transfer-encoding") is None
    assert resp.get(b"content-length") is None
    assert resp.get(b"connection") == b"close"
    assert resp.rest == b"hello close-delimited world"


CHUNKED_BODY = b"5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\n\r\n"
CHUNKED_REPLY = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + CHUNKED_BODY


async def test_chunked_body_passes_through_to_http11_client() -> None:
    raw = await proxied_raw(CHUNKED_REPLY, request_bytes(b"GET", b"/", CLOSE), keep=True)
    resp = split_response(raw)
    assert resp.status == 200
    assert resp.all(b"transfer-encoding") == [b"chunked"]
    assert resp.rest == CHUNKED_BODY


async def test_chunked_body_is_decoded_for_http10_client() -> None:
    raw = await proxied_raw(CHUNKED_REPLY, request_bytes(b"GET", b"/", version=b"1.0"), keep=True)
    resp = split_response(raw)
    assert resp.status == 200
    assert resp.get(b"transfer-encoding") is None
    assert resp.get(b"connection") == b"close"
    assert resp.rest == b"hello, world"


async def test_103_early_hints_is_forwarded_before_the_final_response() -> None:
    reply = (
        b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    )
    raw = await proxied_raw(reply, request_bytes(b"GET", b"/", CLOSE), keep=True)
    assert raw.startswith(b"HTTP/1.1 103 ")
    early, _, final = raw.partition(b"\r\n\r\n")
    assert b"\r\nLink: </style.css>; rel=preload" in early
    resp = split_response(final)
    assert (resp.status, resp.rest) == (200, b"ok")


async def test_103_is_not_sent_to_http10_client() -> None:
    reply = (
        b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    )
    raw = await proxied_raw(reply, request_bytes(b"GET", b"/", version=b"1.0"), keep=True)
    resp = split_response(raw)
    assert (resp.status, resp.rest) == (200, b"ok")


async def test_upstream_100_continue_is_not_forwarded() -> None:
    reply = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    raw = await proxied_raw(reply, request_bytes(b"GET", b"/", CLOSE), keep=True)
    assert b" 100 " not in raw
    resp = split_response(raw)
    assert (resp.status, resp.rest) == (200, b"ok")


async def test_101_to_a_normal_request_is_502() -> None:
    reply = b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: x\r\n\r\n"
    raw = await proxied_raw(reply, request_bytes(b"GET", b"/", CLOSE), keep=True)
    assert b" 101 " not in raw
    assert_raw_error(raw, 502)


# =========================================================================== errors


def closed_port() -> int:
    """A port on 127.0.0.1 with nothing listening (bound, then closed)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port: int = sock.getsockname()[1]
    sock.close()
    return port


async def test_upstream_refused_is_502() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            host, port = await start_proxy(nursery, f"http://127.0.0.1:{closed_port()}/")
            status, headers, body = await http_request(host, port, "GET", "/")
            nursery.cancel_scope.cancel()
    assert_proxy_error(status, headers, body, 502, "upstream_unreachable")


async def test_unresolvable_upstream_is_502() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            host, port = await start_proxy(
                nursery, "http://nonexistent.invalid/", timeouts=Timeouts(connect=5.0)
            )
            status, headers, body = await http_request(host, port, "GET", "/")
            nursery.cancel_scope.cancel()
    assert_proxy_error(status, headers, body, 502)


@pytest.mark.parametrize(
    "reply",
    [b"garbage\r\n\r\n", b"HTTP/1.1 abc OK\r\n\r\n", b"HTTP/1.1 200 OK\r\nbad header\r\n\r\n"],
    ids=["garbage", "bad-status", "bad-header"],
)
async def test_malformed_upstream_response_is_502(reply: bytes) -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            host, port, _ = await scripted_proxy(nursery, always(reply, keep=True))
            status, headers, body = await http_request(host, port, "GET", "/")
            nursery.cancel_scope.cancel()
    assert_proxy_error(status, headers, body, 502, "upstream_protocol_error")


async def test_upstream_closing_without_response_is_502() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            host, port, _ = await scripted_proxy(nursery, always(b"", keep=False))
            status, headers, body = await http_request(host, port, "GET", "/")
            nursery.cancel_scope.cancel()
    assert_proxy_error(status, headers, body, 502, "upstream_reset")


async def test_truncated_content_length_body_is_cut_not_completed() -> None:
    reply = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789"
    # The client asks for keep-alive: only the proxy closing can signal the truncation.
    raw = await proxied_raw(reply, request_bytes(b"GET", b"/"), keep=False)
    resp = split_response(raw)
    assert resp.status == 200
    assert resp.get(b"content-length") == b"100"
    assert resp.rest == b"0123456789"


async def test_chunked_body_dying_mid_way_never_gets_a_last_chunk() -> None:
    reply = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
    raw = await proxied_raw(reply, request_bytes(b"GET", b"/"), keep=False)
    resp = split_response(raw)
    assert resp.status == 200
    assert resp.get(b"transfer-encoding") == b"chunked"
    assert resp.rest.startswith(b"5\r\nhello\r\n")
    assert b"0\r\n\r\n" not in resp.rest


async def test_malformed_request_line_is_400_and_closed() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            host, port, up = await scripted_proxy(nursery, always(OK))
            raw = await send_raw(host, port, b"GARBAGE\r\n\r\n")
            await assert_upstream_untouched(host, port, up)
            nursery.cancel_scope.cancel()
    assert_raw_error(raw, 400, "bad_request")


async def test_oversized_request_head_is_431() -> None:
    data = request_bytes(b"GET", b"/", [(b"X-Big", b"a" * 70000)])
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            host, port, up = await scripted_proxy(nursery, always(OK))
            raw = await send_raw(host, port, data)
            await assert_upstream_untouched(host, port, up)
            nursery.cancel_scope.cancel()
    assert_raw_error(raw, 431, "request_header_fields_too_large")


async def test_too_many_header_fields_is_431() -> None:
    # Host plus 100 more: 101 fields, over the default max_header_count of 100.
    data = request_bytes(b"GET", b"/", [(b"X-H%d" % i, b"v") for i in range(100)])
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            host, port, up = await scripted_proxy(nursery, always(OK))
            raw = await send_raw(host, port, data)
            await assert_upstream_untouched(host, port, up)
            nursery.cancel_scope.cancel()
    assert_raw_error(raw, 431, "request_header_fields_too_large")


async def test_exactly_max_header_count_is_accepted() -> None:
    # Host + 98 + Connection: exactly 100 fields.
    data = request_bytes(b"GET", b"/", [(b"X-H%d" % i, b"v") for i in range(98)] + CLOSE)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            host, port, _ = await scripted_proxy(nursery, always(OK))
            raw = await send_raw(host, port, data)
            nursery.cancel_scope.cancel()
    assert split_response(raw).status == 200


async def test_http2_request_line_is_505() -> None:
    # h11 parses any HTTP/d.d; the proxy itself refuses the version.
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            host, port, up = await scripted_proxy(nursery, always(OK))
            raw = await send_raw(host, port, b"GET / HTTP/2.0\r\nHost: x\r\n\r\n")
            await assert_upstream_untouched(host, port, up)
            nursery.cancel_scope.cancel()
    assert_raw_error(raw, 505, "http_version_not_supported")


async def test_websocket_upgrade_request_is_400() -> None:
    data = request_bytes(
        b"GET",
        b"/ws",
        [
            (b"Connection", b"Upgrade"),
            (b"Upgrade", b"websocket"),
            (b"Sec-WebSocket-Key", b"dGhlIHNhbXBsZSBub25jZQ=="),
            (b"Sec-WebSocket-Version", b"13"),
        ],
    )
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            host, port, up = await scripted_proxy(nursery, always(OK))
            raw = await send_raw(host, port, data)
            await assert_upstream_untouched(host, port, up)
            nursery.cancel_scope.cancel()
    assert_raw_error(raw, 400, "bad_request")


# =========================================================================== access log


async def test_access_log_has_one_json_line_per_exchange_without_query(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="proxycore.access")
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            up_host, up_port = await start_app(nursery, echo_app)
            upstream = f"http://{up_host}:{up_port}/"
            host, port = await start_proxy(nursery, [Route("/api/", upstream, name="api")])
            ok = await http_request(
                host,
                port,
                "POST",
                "/api/items?api_key=SECRET",
                [("X-Request-ID", "log-test-1")],
                b"hello",
            )
            missing = await http_request(host, port, "GET", "/nowhere?api_key=SECRET2")
            nursery.cancel_scope.cancel()
        # The nursery has exited: every exchange has finished and logged.
    assert ok[0] == 200 and missing[0] == 404
    lines = [r.getMessage() for r in caplog.records if r.name == "proxycore.access"]
    assert len(lines) == 2
    records = [json.loads(line) for line in lines]
    first, second = records
    assert first["request_id"] == "log-test-1"
    assert first["method"] == "POST"
    assert first["path"] == "/api/items"
    assert first["route"] == "api"
    assert first["status"] == 200
    assert first["bytes_in"] == 5
    assert first["bytes_out"] == len(ok[2])
    assert first["upstream"] == f"http://{up_host}:{up_port}"
    assert first["outcome"] == "complete"
    assert first["client"] == "127.0.0.1"
    assert isinstance(first["ttfb_ms"], int | float) and first["ttfb_ms"] >= 0
    assert first["duration_ms"] >= first["ttfb_ms"]
    assert second["path"] == "/nowhere"
    assert second["status"] == 404
    assert second["outcome"] == "no_route"
    assert second["request_id"].encode() == header(missing[1], b"x-request-id")
    assert "SECRET" not in caplog.text
    assert "api_key" not in caplog.text


# =========================================================================== misc config


async def test_pooling_disabled_opens_a_connection_per_request() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            host, port, up = await scripted_proxy(
                nursery, always(OK), pool=PoolSettings(max_idle_per_origin=0)
            )
            for _ in range(2):
                status, _, _ = await http_request(host, port, "GET", "/")
                assert status == 200
            nursery.cancel_scope.cancel()
    assert up.connections == 2
