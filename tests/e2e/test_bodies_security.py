"""Bodies and trailers, byte for byte: raw client sockets and raw upstreams.

* Request trailers never reach the upstream: the last chunk goes up as ``0\\r\\n\\r\\n``, in
  the bytes in hand as in the streamed body (a trailer could carry an identity header,
  credentials or forwarding headers past the proxy's header rewriting).
* A chunked request whose start (in the bytes the proxy holds) is decidably bad is refused
  before anything is sent upstream: malformed chunk size, or a chunk size over
  ``max_body_bytes``.
* An upstream response with both Content-Length and Transfer-Encoding is a 502; a chunked
  response with ``Connection: close`` is relayed (both used to leave the client hanging).
* The access line says what the client got: status, outcome, body bytes.
"""

from __future__ import annotations

import json
import logging
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Final

import h11
import pytest
import trio

from proxycore import Config, Route, ServerSettings, serve
from proxycore.config import Inbound
from proxycore.tools.sim import Receive, Scope, Send
from tests.helpers import start_app, start_proxy, start_raw_server

CAP: Final = 10
OK: Final = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
ALICE: Final = b"alice@example.com"


# --------------------------------------------------------------------------- helpers


class AccessLog(logging.Handler):
    """The ``proxycore.access`` lines of one test (the proxy logs after the client is done,
    so tests wait for them)."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[dict[str, Any]] = []
        self._more = trio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(record.getMessage()))
        self._more.set()
        self._more = trio.Event()

    async def wait_for(self, count: int) -> list[dict[str, Any]]:
        while len(self.lines) < count:
            await self._more.wait()
        return self.lines


@pytest.fixture
def access_log() -> Iterator[AccessLog]:
    logger = logging.getLogger("proxycore.access")
    handler, level = AccessLog(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


@dataclass
class Seen:
    """One upstream connection: its raw bytes, and each request h11 read off them."""

    raw: bytearray = field(default_factory=bytearray)
    requests: list[h11.Request] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)
    trailers: list[list[tuple[bytes, bytes]]] = field(default_factory=list)


class ParsingUpstream:
    """Raw upstream that reads requests with h11 (server role), records every byte and every
    complete request (head, decoded body, trailers) and answers each with ``200 ok``."""

    def __init__(self) -> None:
        self.conns: list[Seen] = []
        self.port = 0
        self.got_head = trio.Event()
        self.closed = trio.Event()

    async def start(self, nursery: trio.Nursery) -> ParsingUpstream:
        self.port = await start_raw_server(nursery, self._handle)
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    async def _handle(self, stream: trio.SocketStream) -> None:
        seen = Seen()
        self.conns.append(seen)
        conn = h11.Connection(h11.SERVER)
        body = bytearray()
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await stream.receive_some(65536)
                    seen.raw += data
                    conn.receive_data(data)
                    if not data:
                        return
                elif isinstance(event, h11.Request):
                    seen.requests.append(event)
                    self.got_head.set()
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    seen.bodies.append(bytes(body))
                    seen.trailers.append(list(event.headers.raw_items()))
                    body.clear()
                    reply = h11.Response(status_code=200, headers=[(b"Content-Length", b"2")])
                    out = [conn.send(reply), conn.send(h11.Data(data=b"ok"))]
                    out.append(conn.send(h11.EndOfMessage()))
                    await stream.send_all(b"".join(x for x in out if x))
                    conn.start_next_cycle()
                else:
                    return
        finally:
            self.closed.set()


def chunked_post(body: bytes, *extra: bytes, target: bytes = b"/up") -> bytes:
    head = b"POST " + target + b" HTTP/1.1\r\nHost: client.example\r\n"
    head += b"".join(line + b"\r\n" for line in extra)
    return head + b"Transfer-Encoding: chunked\r\n\r\n" + body


async def read_to_eof(stream: trio.SocketStream) -> bytes:
    got = bytearray()
    try:
        while data := await stream.receive_some(65536):
            got += data
    except trio.BrokenResourceError:
        pass
    return bytes(got)


async def read_responses(stream: trio.SocketStream, count: int) -> list[bytes]:
    """``count`` responses with Content-Length bodies (what the proxy sends for this
    module's ``200 ok`` upstream and for its own errors), each as raw bytes."""
    got = bytearray()
    out: list[bytes] = []
    while len(out) < count:
        end = got.find(b"\r\n\r\n")
        if end >= 0 and len(got) >= (size := end + 4 + _length(got[:end])):
            out.append(bytes(got[:size]))
            del got[:size]
            continue
        data = await stream.receive_some(65536)
        assert data, (out, bytes(got))
        got += data
    assert not got
    return out


def _length(head: bytes | bytearray) -> int:
    for line in bytes(head).split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    raise AssertionError(f"no Content-Length in {bytes(head)!r}")


def split_response(data: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
    """(status, lower-cased header fields, every byte after the head) of raw bytes."""
    head, sep, rest = data.partition(b"\r\n\r\n")
    assert sep, data
    lines = head.split(b"\r\n")
    fields = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(b":") for ln in lines[1:])}
    return int(lines[0].split(b" ")[1]), fields, rest


# --------------------------------------------------------------------------- request trailers


async def auth_app(scope: Scope, receive: Receive, send: Send) -> None:
    """Forward-auth service: ``Authorization: Bearer good`` is alice; anything else 401."""
    if scope["type"] == "lifespan":
        while True:
            kind = (await receive())["type"].removeprefix("lifespan.")
            await send({"type": f"lifespan.{kind}.complete"})
            if kind == "shutdown":
                return
    good = (b"authorization", b"Bearer good") in [(bytes(n), bytes(v)) for n, v in scope["headers"]]
    headers = [(b"content-length", b"0")]
    if good:
        headers.append((b"x-user-email", ALICE))
    await send({"type": "http.response.start", "status": 200 if good else 401, "headers": headers})
    await send({"type": "http.response.body", "body": b""})


async def start_forward_auth_proxy(nursery: trio.Nursery, upstream: str) -> tuple[str, int]:
    auth_host, auth_port = await start_app(nursery, auth_app)
    config = Config(
        routes=(Route("/", upstream),),
        server=ServerSettings(listen=("127.0.0.1:0",)),
        inbound=Inbound(
            mode="forward_auth",
            url=f"http://{auth_host}:{auth_port}/verify",
            identity_headers=(("X-User-Email", "X-Authenticated-User"),),
        ),
    )
    addresses: list[tuple[str, int]] = await nursery.start(serve, config)
    return addresses[0]


#: Every kind of field the proxy strips or owns, as request trailers.
FORGED: Final = [
    b"X-Authenticated-User: root@evil",
    b"X_Authenticated_User: root@evil",
    b"Authorization: Bearer FORGED-TOKEN",
    b"Proxy-Authorization: Basic FORGED-TOKEN",
    b"X-Forwarded-For: 6.6.6.6",
    b"X-Forwarded-Host: evil.example",
    b"Host: evil.example",
    b"X-Request-ID: FORGED-ID",
    b"Connection: keep-alive",
    b"TE: trailers",
    b"X-Harmless: too",
]
TRAILER_SECTION: Final = b"".join(line + b"\r\n" for line in FORGED) + b"\r\n"
FORGED_VALUES: Final = (b"evil", b"FORGED", b"6.6.6.6", b"trailers", b"too")
SECOND: Final = b"GET /second HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer good\r\n\r\n"


@pytest.mark.parametrize(
    "split",
    ["in-hand", "streamed", "in-hand-to-mid-trailer", "streamed-byte-by-byte"],
)
async def test_request_trailers_never_reach_the_upstream(split: str, access_log: AccessLog) -> None:
    """On a forward-auth route; the bytes in hand end before, inside or after the trailers."""
    body = b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\n" + TRAILER_SECTION
    head = chunked_post(b"", b"Authorization: Bearer good", b"Trailer: X-Authenticated-User")
    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            up = await ParsingUpstream().start(nursery)
            host, port = await start_forward_auth_proxy(nursery, up.url)
            async with await trio.open_tcp_stream(host, port) as stream:
                if split == "in-hand":
                    await stream.send_all(head + body + SECOND)
                else:
                    cut = body.index(b"Host:") if split == "in-hand-to-mid-trailer" else 10
                    await stream.send_all(head + body[:cut])
                    await up.got_head.wait()  # the proxy has forwarded what it had in hand
                    if split == "streamed-byte-by-byte":
                        for i in range(cut, len(body)):
                            await stream.send_all(body[i : i + 1])
                    else:
                        await stream.send_all(body[cut:])
                    await stream.send_all(SECOND)
                first, second = await read_responses(stream, 2)
            nursery.cancel_scope.cancel()
    assert split_response(first)[0] == 200 and split_response(second)[0] == 200
    (seen,) = up.conns
    assert [r.target for r in seen.requests] == [b"/up", b"/second"]
    assert seen.bodies[0] == b"hello world"
    assert seen.trailers[0] == []
    raw = bytes(seen.raw)
    first_request = raw[: raw.index(b"GET /second")]
    assert first_request.endswith(b"\r\n\r\n5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\n\r\n")
    for value in FORGED_VALUES:
        assert value not in raw
    identity = [v for n, v in seen.requests[0].headers if n == b"x-authenticated-user"]
    assert identity == [ALICE]
    # forward_auth passes the caller's own credentials on (head only, never the trailer's)
    assert [v for n, v in seen.requests[0].headers if n == b"authorization"] == [b"Bearer good"]
    line = (await access_log.wait_for(2))[0]
    assert line["status"] == 200 and line["outcome"] == "complete"
    assert line["bytes_in"] == len(first_request) - first_request.index(b"\r\n\r\n") - 4


async def test_request_trailers_are_still_validated() -> None:
    """Dropped, not ignored: a framing field in the trailer section is still a 400."""
    body = b"5\r\nhello\r\n0\r\nContent-Length: 5\r\n\r\n"
    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            up = await ParsingUpstream().start(nursery)
            host, port = await start_proxy(nursery, up.url)
            async with await trio.open_tcp_stream(host, port) as stream:
                await stream.send_all(chunked_post(body[:10]))
                await up.got_head.wait()
                await stream.send_all(body[10:])
                reply = await read_to_eof(stream)
            await up.closed.wait()
            nursery.cancel_scope.cancel()
    status, fields, _ = split_response(reply)
    assert status == 400 and fields[b"connection"] == b"close"
    (seen,) = up.conns
    assert seen.bodies == []  # the upstream never saw a complete request
    assert b"Content-Length: 5" not in bytes(seen.raw)


# --------------------------------------------------------------------------- decidable starts


async def assert_upstream_untouched(host: str, port: int, up: ParsingUpstream) -> None:
    """No connection so far; then a good request is the upstream's first and only one."""
    assert up.conns == []
    async with await trio.open_tcp_stream(host, port) as stream:
        await stream.send_all(b"GET /check HTTP/1.1\r\nHost: x\r\n\r\n")
        (reply,) = await read_responses(stream, 1)
        assert split_response(reply)[0] == 200
    assert len(up.conns) == 1
    assert [r.target for r in up.conns[0].requests] == [b"/check"]


BAD_STARTS: Final = {
    "invalid-hex": b"zz\r\nhello\r\n0\r\n\r\n",
    "invalid-hex-line-incomplete": b"zz" + b"x" * 200,
    "junk-after-size-incomplete": b"5 x" + b"y" * 200,
    "ctl-in-extension-incomplete": b"5;a=\x01b" + b"c" * 200,
    "bare-lf": b"5\nhello\r\n0\r\n\r\n",
    "17-digits-incomplete": b"0" * 17,
    "second-chunk-bad": b"5\r\nhello\r\nzz",
    "data-overrun": b"5\r\nhello!",
}


@pytest.mark.parametrize("start", BAD_STARTS.values(), ids=BAD_STARTS.keys())
async def test_bad_chunked_start_in_hand_is_400_with_nothing_sent_upstream(
    start: bytes, access_log: AccessLog
) -> None:
    """The bytes in hand decide it: refused before the upstream is even connected. The
    client keeps its connection open (a line not yet complete must not be waited for)."""
    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            up = await ParsingUpstream().start(nursery)
            host, port = await start_proxy(nursery, up.url)
            async with await trio.open_tcp_stream(host, port) as stream:
                await stream.send_all(chunked_post(start))
                reply = await read_to_eof(stream)
            await assert_upstream_untouched(host, port, up)
            lines = await access_log.wait_for(2)
            nursery.cancel_scope.cancel()
    status, fields, body = split_response(reply)
    assert status == 400 and fields[b"connection"] == b"close"
    assert json.loads(body)["error"]["type"] == "bad_request"
    assert lines[0]["status"] == 400 and lines[0]["bytes_out"] == len(body)


async def test_overlong_chunk_size_line_never_completes_an_upstream_request() -> None:
    """The bytes in hand (at most one 4 KiB read, minus the head) never hold a whole 4 KiB
    size line, so the head may go up; the line is refused when it crosses the limit and
    nothing past it is sent."""
    body = b"5;" + b"a" * 5000 + b"\r\nhello\r\n0\r\n\r\n"
    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            up = await ParsingUpstream().start(nursery)
            host, port = await start_proxy(nursery, up.url)
            async with await trio.open_tcp_stream(host, port) as stream:
                await stream.send_all(chunked_post(body))
                reply = await read_to_eof(stream)
            if up.conns:
                await up.closed.wait()
            nursery.cancel_scope.cancel()
    assert split_response(reply)[0] == 400
    raw = b"".join(bytes(c.raw) for c in up.conns)
    assert b"hello" not in raw and all(c.bodies == [] for c in up.conns)
    assert raw.count(b"a") < 4096


async def test_chunk_size_over_max_body_in_hand_is_413_with_nothing_sent_upstream() -> None:
    """A size line promising more than max_body_bytes decides it before the data arrives."""
    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            up = await ParsingUpstream().start(nursery)
            host, port = await start_proxy(nursery, [Route("/", up.url, max_body_bytes=10)])
            async with await trio.open_tcp_stream(host, port) as stream:
                await stream.send_all(chunked_post(b"ff\r\nabc"))
                reply = await read_to_eof(stream)
            await assert_upstream_untouched(host, port, up)
            nursery.cancel_scope.cancel()
    status, fields, body = split_response(reply)
    assert status == 413 and fields[b"connection"] == b"close"
    assert json.loads(body)["error"]["type"] == "payload_too_large"


async def test_streamed_chunk_size_over_max_body_is_413_before_it_is_forwarded() -> None:
    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            up = await ParsingUpstream().start(nursery)
            host, port = await start_proxy(nursery, [Route("/", up.url, max_body_bytes=10)])
            async with await trio.open_tcp_stream(host, port) as stream:
                await stream.send_all(chunked_post(b"3\r\nabc\r\n"))
                await up.got_head.wait()
                await stream.send_all(b"ff\r\nxy")
                reply = await read_to_eof(stream)
            await up.closed.wait()
            nursery.cancel_scope.cancel()
    assert split_response(reply)[0] == 413
    (seen,) = up.conns
    assert bytes(seen.raw).endswith(b"\r\n\r\n3\r\nabc\r\n")
    assert seen.bodies == []


# --------------------------------------------------------------------------- upstream framing


class ScriptedUpstream:
    """Raw upstream: reads one request head, writes ``parts`` one write each (the second and
    later only once ``gate`` is set: the client has the response head), then ``end``:
    ``"keep"`` (wait for the proxy to close), ``"close"`` (FIN) or ``"rst"`` (reset)."""

    def __init__(self, parts: list[bytes], end: str) -> None:
        self.parts, self.end = parts, end
        self.port = 0
        self.gate = trio.Event()
        self.proxy_closed = trio.Event()

    async def start(self, nursery: trio.Nursery) -> ScriptedUpstream:
        self.port = await start_raw_server(nursery, self._handle)
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    async def _handle(self, stream: trio.SocketStream) -> None:
        got = b""
        while b"\r\n\r\n" not in got:
            data = await stream.receive_some(65536)
            if not data:
                return
            got += data
        for i, part in enumerate(self.parts):
            if i == 1:
                await self.gate.wait()
            await stream.send_all(part)
        if self.end == "keep":
            while await stream.receive_some(65536):
                pass
            self.proxy_closed.set()
        elif self.end == "rst":
            stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


CHUNKED_HEAD: Final = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n"
BIG: Final = 100_000
#: upstream parts, how it ends, status and outcome the client and the log must show.
CASES: Final[dict[str, tuple[list[bytes], str, int, str]]] = {
    "length-200": (
        [b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"],
        "keep",
        200,
        "complete",
    ),
    "chunked-200": (
        [CHUNKED_HEAD + b"\r\n5\r\nhello\r\n", b"6\r\n world\r\n0\r\nX-T: 1\r\n\r\n"],
        "keep",
        200,
        "complete",
    ),
    "chunked-connection-close-200": (
        [CHUNKED_HEAD + b"Connection: close\r\n\r\n5\r\nhello\r\n", b"0\r\n\r\n"],
        "keep",
        200,
        "complete",
    ),
    "until-close-200": ([b"HTTP/1.1 200 OK\r\n\r\nhello", b" world"], "close", 200, "complete"),
    "cl-te-502": (
        [
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n"
        ],
        "keep",
        502,
        "upstream_protocol_error",
    ),
    "te-cl-502": (
        [CHUNKED_HEAD + b"Content-Length: 16\r\n\r\n5\r\nhello\r\n0\r\n\r\n"],
        "keep",
        502,
        "upstream_protocol_error",
    ),
    "te-gzip-cl-502": (
        [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nContent-Length: 5\r\n\r\nhello"],
        "keep",
        502,
        "upstream_protocol_error",
    ),
    "bad-length-502": (
        [b"HTTP/1.1 200 OK\r\nContent-Length: five\r\n\r\nhello"],
        "keep",
        502,
        "upstream_protocol_error",
    ),
    "length-cut-fin": (
        [b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % BIG + b"x" * 3000, b"y" * 9000],
        "close",
        200,
        "upstream_reset",
    ),
    "length-cut-rst": (
        [b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % BIG + b"x" * 3000, b"y" * 9000],
        "rst",
        200,
        "upstream_reset",
    ),
    "chunked-cut-fin": (
        [CHUNKED_HEAD + b"\r\n5\r\nhello\r\n", b"1000\r\n" + b"z" * 100],
        "close",
        200,
        "upstream_reset",
    ),
    "until-close-rst": (
        [b"HTTP/1.1 200 OK\r\n\r\n" + b"x" * 3000, b"y" * 9000],
        "rst",
        200,
        "upstream_reset",
    ),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
async def test_access_log_records_what_the_client_got(
    case: tuple[list[bytes], str, int, str], access_log: AccessLog
) -> None:
    """Status and body bytes as the client read them; the upstream connection is closed
    when the response was refused (never reused)."""
    parts, end, status, outcome = case
    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            up = await ScriptedUpstream(parts, end).start(nursery)
            host, port = await start_proxy(nursery, up.url)
            async with await trio.open_tcp_stream(host, port) as stream:
                await stream.send_all(b"GET /x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                head = bytearray()
                while b"\r\n\r\n" not in head and (data := await stream.receive_some(65536)):
                    head += data
                up.gate.set()
                reply = bytes(head) + await read_to_eof(stream)
            (line,) = await access_log.wait_for(1)
            if status == 502:
                await up.proxy_closed.wait()
            nursery.cancel_scope.cancel()
    got_status, fields, body = split_response(reply)
    assert got_status == status == line["status"]
    assert line["outcome"] == outcome
    assert line["bytes_out"] == len(body)
    if status == 502:
        error = json.loads(body)["error"]
        assert error["type"] == "upstream_protocol_error"
        assert error["request_id"] == fields[b"x-request-id"].decode() == line["request_id"]
    elif outcome == "complete":
        assert b"hello" in body
        if b"Transfer-Encoding" in parts[0]:
            assert body.endswith(b"\r\n\r\n") and b"0\r\n" in body
    else:
        assert not body.endswith(b"0\r\n\r\n")  # never passed off as complete
        if fields.get(b"content-length"):
            assert len(body) < int(fields[b"content-length"])


async def test_refused_cl_te_response_leaves_the_client_connection_usable() -> None:
    """502 for the ambiguous response; the next request on the same client connection works
    (on a fresh upstream connection: the ambiguous one was closed)."""
    conns = 0

    async def handler(stream: trio.SocketStream) -> None:
        nonlocal conns
        conns += 1
        mine = conns
        got = b""
        while True:
            data = await stream.receive_some(65536)
            if not data:
                return
            got += data
            while b"\r\n\r\n" in got:
                _, _, got = got.partition(b"\r\n\r\n")
                if mine == 1:
                    await stream.send_all(
                        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n"
                        b"Transfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"
                    )
                else:
                    await stream.send_all(OK)

    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            port = await start_raw_server(nursery, handler)
            host, proxy_port = await start_proxy(nursery, f"http://127.0.0.1:{port}/")
            async with await trio.open_tcp_stream(host, proxy_port) as stream:
                await stream.send_all(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
                (first,) = await read_responses(stream, 1)
                await stream.send_all(b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n")
                (second,) = await read_responses(stream, 1)
            nursery.cancel_scope.cancel()
    assert split_response(first)[0] == 502
    assert split_response(second)[0] == 200 and second.endswith(b"\r\n\r\nok")
    assert conns == 2
