"""The fault soak's clients (raw trio sockets) and its cases: what each client sends, how it
misbehaves, what it should see, and an :class:`Observation` of exactly what it saw.

See :mod:`bench.soak` for the rules that compare observations with the proxy's log.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import errno
import json
import os
import re
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    RejectConnection,
    RejectData,
    TextMessage,
)
from wsproto.events import Request as WsRequest

from bench.soak_upstream import PATTERN

__all__ = [
    "CANARY",
    "CASES",
    "CASE_BY_NAME",
    "DEADLINE_S",
    "HOST",
    "KIB",
    "MIB",
    "STALL_S",
    "Case",
    "ClientConn",
    "HttpClient",
    "Observation",
    "WsClient",
]

HOST: Final = "127.0.0.1"
#: Long stalls: the client reads nothing for this long.
STALL_S: Final = 6.0
#: The longest a client waits for its answer (or a cut) before it counts as stuck.
DEADLINE_S: Final = 20.0
RECV: Final = 65536
KIB: Final = 1024
MIB: Final = 1024 * 1024
_STATUS_LINE: Final = re.compile(rb"HTTP/1\.[01] ([0-9]{3})")

End = Literal["", "clean", "close", "cut", "left", "no-head", "deadline", "closed", "eof"]

# --------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    """One kind of exchange: what the client sends, how it behaves, what it should see."""

    name: str
    weight: float
    target: str
    method: str = "GET"
    kind: Literal["http", "ws"] = "http"
    version: str = "1.1"
    accept_sse: bool = False
    upgrade: bool = False
    #: Request body bytes; chunked in ``piece``-byte chunks or with a Content-Length.
    upload: int = 0
    chunked: bool = False
    #: concurrent: read while uploading; sequential: upload (until an error), then read;
    #: expect: ``Expect: 100-continue``, the body after the 100.
    mode: Literal["concurrent", "sequential", "expect"] = "concurrent"
    piece: int = 64 * KIB
    every: float = 0.0
    #: Leave after sending this many body bytes (no read).
    send_only: int | None = None
    #: Leave if no response head came within this many seconds.
    leave_after: float | None = None
    #: Leave once this many body bytes arrived.
    leave_at: int | None = None
    rst: bool = False
    #: Stop reading for ``stall_s`` once this many body bytes arrived.
    stall_at: int | None = None
    stall_s: float = 0.0
    rcvbuf: int | None = None
    #: Requests on one keep-alive connection.
    repeat: int = 1
    ws: Literal["", "echo", "die", "vanish"] = ""
    expect_status: frozenset[int | None] = frozenset({200})
    expect_end: frozenset[str] = frozenset({"clean"})
    #: Upstream events a clean, error-free stream must deliver.
    sse_events: int | None = None
    #: A complete upload's bytes_in must equal ``upload``.
    check_bytes_in: bool = False

    @property
    def route(self) -> str:
        return "/" + self.target.strip("/").split("/")[0] + "/"

    @property
    def bounded_stall(self) -> bool:
        return self.stall_s >= STALL_S

    @property
    def blame(self) -> Literal["", "client", "upstream"]:
        """Whose fault a failed exchange of this case is (the log must not blame the other)."""
        if self.name in UPSTREAM_FAULTS:
            return "upstream"
        if self.name in CLIENT_FAULTS:
            return "client"
        return ""


def _s(*values: int | None) -> frozenset[int | None]:
    return frozenset(values)


def _e(*values: str) -> frozenset[str]:
    return frozenset(values)


CASES: Final[tuple[Case, ...]] = (
    # well behaved
    Case("small", 10, "/ok/small"),
    Case("small-keepalive", 4, "/ok/small", repeat=3),
    Case("chunked", 4, "/ok/chunked?chunks=20&size=1000"),
    Case("closed-body", 2, "/ok/closed?size=50000"),
    Case("http10", 1, "/ok/chunked?chunks=5&size=3000", version="1.0", expect_end=_e("close")),
    Case("big", 1, f"/ok/big?size={4 * MIB}"),
    Case("slowhead", 1, "/ok/slowhead?delay=300"),
    Case("upload", 4, "/ok/upload", "POST", upload=256 * KIB, check_bytes_in=True),
    Case("upload-chunked", 2, "/ok/upload", "POST", upload=128 * KIB, chunked=True, piece=8192),
    Case(
        "upload-trickle",
        2,
        "/ok/upload",
        "POST",
        upload=2000,
        piece=100,
        every=0.15,
        check_bytes_in=True,
    ),
    Case("upload-expect", 1, "/ok/upload", "POST", upload=64 * KIB, mode="expect"),
    Case("trickle", 2, "/trickle/body?size=2000&piece=100&every=100"),
    Case("sse", 6, "/sse/stream?events=30&interval=20", accept_sse=True, sse_events=30),
    Case("sse-plain", 2, "/sse-plain/stream?events=30&interval=10", sse_events=30),
    Case("sse-length", 1, "/sse/stream?events=20&framing=length", accept_sse=True, sse_events=20),
    Case("sse-close", 1, "/sse/stream?events=20&framing=close", accept_sse=True, sse_events=20),
    Case("sse-retry", 1, "/sse/retry?events=6&digits=5000", accept_sse=True, sse_events=6),
    Case("sse-bigid", 1, "/sse/bigid?events=100&idsize=8192", accept_sse=True, sse_events=100),
    Case(
        "ws-echo",
        4,
        "/ws/echo",
        kind="ws",
        ws="echo",
        expect_status=_s(101),
        expect_end=_e("closed"),
    ),
    Case("ws-refuse", 1, "/ws/refuse?size=1000", upgrade=True, expect_status=_s(403)),
    Case(
        "ws-refuse-big",
        1,
        "/ws/refuse?size=204800",
        upgrade=True,
        # Over proxycore's 64 KiB refusal cap: a 502 (its documented answer), or the 403
        # relayed whole or cut.
        expect_status=_s(403, 502),
        expect_end=_e("clean", "cut"),
    ),
    # misbehaving upstreams
    Case("reset-body", 3, "/reset/body?size=200000&after=50000", expect_end=_e("cut")),
    Case("reset-head", 2, "/reset/head", expect_status=_s(502)),
    Case("reset-midhead", 1, "/reset/midhead", expect_status=_s(502)),
    Case("stall-head", 1, "/stall/head", expect_status=_s(504)),
    Case("stall-body", 2, "/stall/body?size=100000&after=20000", expect_end=_e("cut")),
    Case("bad-status", 1, "/bad/status", expect_status=_s(502)),
    Case("bad-header", 1, "/bad/header", expect_status=_s(502)),
    Case("bad-huge", 1, "/bad/huge", expect_status=_s(502)),
    Case("bad-clte", 1, "/bad/clte", expect_status=_s(502)),
    Case("bad-length", 1, "/bad/length", expect_status=_s(502)),
    Case("bad-chunk", 2, "/bad/chunk", expect_end=_e("cut")),
    Case("close-body", 2, "/close/body?size=100000&after=30000", expect_end=_e("cut")),
    Case("close-head", 2, "/close/head", expect_status=_s(502)),
    Case("close-chunked", 1, "/close/chunked", expect_end=_e("cut")),
    Case("early-413", 2, "/early/413", "POST", upload=2 * MIB, expect_status=_s(413)),
    Case(
        "early-413-seq",
        2,
        "/early/413",
        "POST",
        upload=2 * MIB,
        mode="sequential",
        expect_status=_s(413),
    ),
    Case(
        "early-413-rst",
        1,
        "/early/413?mode=rst",
        "POST",
        upload=2 * MIB,
        expect_status=_s(413, 502),
    ),
    Case("early-200", 1, "/early/200", "POST", upload=2 * MIB, mode="sequential"),
    Case(
        "limit-413",
        1,
        "/limit/upload",
        "POST",
        upload=512 * KIB,
        chunked=True,
        piece=16 * KIB,
        mode="sequential",
        expect_status=_s(413),
    ),
    Case(
        "limit-413-declared",
        1,
        "/limit/upload",
        "POST",
        upload=768 * KIB,
        mode="sequential",
        expect_status=_s(413),
    ),
    Case("sse-die", 3, "/sse/die?events=10&how=rst", accept_sse=True),
    Case("sse-die-fin", 1, "/sse/die?events=10&how=fin", accept_sse=True),
    Case("sse-stall", 2, "/sse/stall?events=5", accept_sse=True),
    Case("sse-badchunk", 1, "/sse/badchunk?events=5", accept_sse=True),
    Case("sse-status", 1, "/sse/status?code=500", accept_sse=True),
    Case("sse-die-noaccept", 1, "/sse/die?events=10&how=rst", expect_end=_e("cut")),
    Case("sse-cut-die", 1, "/sse-cut/die?events=10&how=rst", accept_sse=True, expect_end=_e("cut")),
    Case("sse-plain-die", 1, "/sse-plain/die?events=10&how=fin", expect_end=_e("cut")),
    Case(
        "ws-die",
        1,
        "/ws/die",
        kind="ws",
        ws="die",
        expect_status=_s(101),
        expect_end=_e("closed"),
    ),
    # misbehaving clients
    Case(
        "vanish-before-head",
        2,
        "/ok/slowhead?delay=1000",
        leave_after=0.2,
        expect_status=_s(None),
        expect_end=_e("left"),
    ),
    Case(
        "vanish-mid-body",
        3,
        f"/ok/big?size={32 * MIB}",
        leave_at=64 * KIB,
        expect_end=_e("left"),
    ),
    Case(
        "vanish-mid-body-rst",
        1,
        f"/ok/big?size={32 * MIB}",
        leave_at=64 * KIB,
        rst=True,
        expect_end=_e("left"),
    ),
    Case(
        "vanish-sse",
        2,
        "/sse/forever?interval=20",
        accept_sse=True,
        leave_at=400,
        expect_end=_e("left"),
    ),
    Case(
        "vanish-mid-upload",
        2,
        "/ok/upload",
        "POST",
        upload=MIB,
        send_only=128 * KIB,
        mode="sequential",
        expect_status=_s(None),
        expect_end=_e("left"),
    ),
    Case(
        "vanish-ws",
        1,
        "/ws/echo",
        kind="ws",
        ws="vanish",
        rst=True,
        expect_status=_s(101),
        expect_end=_e("left"),
    ),
    Case("stall-read-short", 2, f"/ok/big?size={MIB}", stall_at=0, stall_s=0.4),
    Case(
        "stall-read-long",
        2,
        f"/ok/big?size={32 * MIB}",
        stall_at=0,
        stall_s=STALL_S,
        rcvbuf=4096,
        expect_end=_e("cut"),
    ),
    Case(
        "stall-read-sse",
        2,
        "/sse/forever?interval=5&size=16384",
        accept_sse=True,
        stall_at=0,
        stall_s=STALL_S,
        rcvbuf=4096,
        expect_end=_e("cut"),
    ),
    Case(
        # Stalls a little longer than it takes to fill the buffers (~1 s) plus idle/send
        # (1 s): the proxy's write is cut mid-chunk while the client will read again soon,
        # so whatever the proxy sends after the cut (an error event, a last chunk) reaches
        # it; if nothing was cut it reads 8 MiB and leaves.
        "stall-read-sse-short",
        2,
        "/sse/forever?interval=5&size=16384",
        accept_sse=True,
        stall_at=0,
        stall_s=2.5,
        rcvbuf=4096,
        leave_at=8 * MIB,
        expect_end=_e("cut", "left"),
    ),
    Case(
        "stall-read-sse-plain",
        1,
        "/sse-plain/forever?interval=5&size=16384",
        stall_at=0,
        stall_s=STALL_S,
        rcvbuf=4096,
        expect_end=_e("cut"),
    ),
    Case(
        "upload-too-slow",
        1,
        "/ok/upload",
        "POST",
        upload=100,
        piece=1,
        every=2.0,
        expect_status=_s(408),
    ),
)
CANARY: Final = Case("canary", 0, "/ok/small")
#: Cases where only the upstream misbehaves, and where only the client does.
UPSTREAM_FAULTS: Final = frozenset(
    {
        "reset-body",
        "reset-head",
        "reset-midhead",
        "stall-head",
        "stall-body",
        "bad-status",
        "bad-header",
        "bad-huge",
        "bad-clte",
        "bad-length",
        "bad-chunk",
        "close-body",
        "close-head",
        "close-chunked",
        "sse-die",
        "sse-die-fin",
        "sse-stall",
        "sse-badchunk",
        "sse-die-noaccept",
        "sse-cut-die",
        "sse-plain-die",
        "ws-die",
    }
)
CLIENT_FAULTS: Final = frozenset(
    {
        "vanish-before-head",
        "vanish-mid-body",
        "vanish-mid-body-rst",
        "vanish-sse",
        "vanish-mid-upload",
        "vanish-ws",
        "stall-read-long",
        "stall-read-sse",
        "stall-read-sse-short",
        "stall-read-sse-plain",
        "upload-too-slow",
    }
)
CASE_BY_NAME: Final = {case.name: case for case in (*CASES, CANARY)}


# --------------------------------------------------------------------------- observations


@dataclass
class Observation:
    """What one client saw of one request (see the module docstring)."""

    rid: str
    case: str
    phase: str
    kind: str = "http"
    started: float = 0.0
    ended: float = 0.0
    head_sent: bool = False
    sent_body: int = 0
    upload_done: bool = False
    upload_error: str = ""
    interim: list[int] = field(default_factory=list)
    status: int | None = None
    content_type: str = ""
    framing: str = ""
    declared: int | None = None
    body_bytes: int = 0
    data_bytes: int = 0
    end: End = ""
    #: How the connection ended when it was cut (eof, reset, framing, head).
    how: str = ""
    #: "" or where the client left: before-head, mid-body.
    left: str = ""
    stalled_at: float | None = None
    resumed_at: float | None = None
    response_rid: str = ""
    error_type: str = ""
    error_rid: str = ""
    events: int = 0
    error_events: int = 0
    error_event_rids: list[str] = field(default_factory=list)
    partial_events: list[str] = field(default_factory=list)
    heartbeats: int = 0
    ws_close: int | None = None
    ws_sent: int = 0
    ws_recv: int = 0
    notes: list[str] = field(default_factory=list)
    _body_head: bytearray = field(default_factory=bytearray, repr=False)

    @property
    def in_band_error(self) -> bool:
        """The response is an error the proxy made: a JSON error body or an SSE error event
        (carrying this request's id)."""
        return bool(self.error_type) or self.error_events > 0

    def drop_body(self) -> None:
        """Forget the body's first bytes (kept only to parse a proxy-made error)."""
        self._body_head = bytearray()

    def as_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in dataclasses.asdict(self).items() if not k.startswith("_")}
        out["duration_s"] = round(self.ended - self.started, 3)
        return out


class Vanish(Exception):
    """The client leaves now (its case says so)."""


class SSEReader:
    """A WHATWG-style event-stream reader: counts events, checks each event's data."""

    def __init__(self, obs: Observation) -> None:
        self.obs = obs
        self.buf = bytearray()
        self.data: list[bytes] = []
        self.type = b""

    def feed(self, data: bytes) -> None:
        self.buf += data
        while True:
            i = self.buf.find(b"\n")
            if i < 0:
                return
            line = bytes(self.buf[:i]).rstrip(b"\r")
            del self.buf[: i + 1]
            self._line(line)

    def _line(self, line: bytes) -> None:
        if not line:
            if self.data:
                self._dispatch(b"\n".join(self.data), self.type or b"message")
            self.data, self.type = [], b""
        elif line.startswith(b":"):
            self.obs.heartbeats += 1
        else:
            name, _, value = line.partition(b":")
            value = value[1:] if value.startswith(b" ") else value
            if name == b"data":
                self.data.append(value)
            elif name == b"event":
                self.type = value

    def _dispatch(self, data: bytes, etype: bytes) -> None:
        obs = self.obs
        try:
            payload = json.loads(data)
        except ValueError:
            payload = None
        if etype == b"error":
            obs.error_events += 1
            if isinstance(payload, dict):
                obs.error_event_rids.append(str(payload.get("request_id", "")))
            return
        obs.events += 1
        whole = isinstance(payload, dict) and "n" in payload
        whole = whole and set(str(payload.get("pad", ""))) <= {"a"}
        if not whole and len(obs.partial_events) < 3:
            obs.partial_events.append(data[:120].decode("utf-8", "replace"))


# --------------------------------------------------------------------------- the client


class ClientConn:
    """A client socket with a read buffer; ``on_body`` runs after each read of the body."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.received = 0
        self.closed_how = ""
        self.body_start: int | None = None
        self.on_body: Callable[[int], Awaitable[None]] | None = None

    @classmethod
    async def open(cls, port: int, rcvbuf: int | None = None) -> ClientConn:
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            if rcvbuf is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await sock.connect((HOST, port))
        except BaseException:
            sock.close()
            raise
        return cls(sock)

    async def fill(self) -> bool:
        """Read more; False once the connection ended (``closed_how`` says how)."""
        if self.closed_how:
            return False
        try:
            data = await self.sock.recv(RECV)
        except OSError as exc:
            self.closed_how = _errname(exc)
            return False
        if not data:
            self.closed_how = "eof"
            return False
        self.buf += data
        self.received += len(data)
        if self.on_body is not None and self.body_start is not None:
            await self.on_body(self.received - self.body_start)
        return True

    async def send_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            sent = await self.sock.send(view)
            view = view[sent:]

    def close(self, rst: bool = False) -> None:
        if rst:
            with contextlib.suppress(OSError):
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()


def _errname(exc: OSError) -> str:
    if exc.errno == errno.ECONNRESET:
        return "reset"
    return errno.errorcode.get(exc.errno or 0, str(exc.errno)).lower()


def _request_head(case: Case, rid: str, port: int) -> bytes:
    lines = [
        f"{case.method} {case.target} HTTP/{case.version}",
        f"Host: {HOST}:{port}",
        f"X-Request-ID: {rid}",
        "User-Agent: proxycore-soak",
    ]
    if case.accept_sse:
        lines.append("Accept: text/event-stream")
    if case.upgrade:
        key = base64.b64encode(os.urandom(16)).decode()
        lines += [
            "Connection: Upgrade",
            "Upgrade: websocket",
            "Sec-WebSocket-Version: 13",
            f"Sec-WebSocket-Key: {key}",
        ]
    if case.upload:
        if case.chunked:
            lines.append("Transfer-Encoding: chunked")
        else:
            lines.append(f"Content-Length: {case.upload}")
        if case.mode == "expect":
            lines.append("Expect: 100-continue")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")


def _parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    lines = head.split(b"\r\n")
    m = _STATUS_LINE.match(lines[0])
    if m is None:
        raise ValueError("bad status line")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(b":")
        if not sep:
            raise ValueError("bad header line")
        key = name.strip().lower().decode("latin-1")
        text = value.strip().decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    return int(m[1]), headers


class HttpClient:
    """Runs one HTTP case on one connection (``repeat`` requests) and records each."""

    def __init__(self, case: Case, port: int, rids: list[str], phase: str) -> None:
        self.case, self.port, self.phase = case, port, phase
        self.observations = [Observation(rid, case.name, phase) for rid in rids]

    async def run(self) -> list[Observation]:
        case = self.case
        conn = await ClientConn.open(self.port, case.rcvbuf)
        rst = case.rst
        try:
            for obs in self.observations:
                await self._one(conn, obs)
                if obs.end != "clean" or obs.status is None:
                    break
        finally:
            conn.close(rst=rst and any(o.end == "left" for o in self.observations))
        return [o for o in self.observations if o.started]

    async def _one(self, conn: ClientConn, obs: Observation) -> None:
        case = self.case
        obs.started = time.time()
        try:
            with trio.move_on_after(DEADLINE_S) as deadline:
                try:
                    await self._exchange(conn, obs)
                except Vanish:
                    obs.end = "left"
                    obs.left = "before-head" if obs.status is None else "mid-body"
            if deadline.cancelled_caught:
                obs.end = "deadline"
        finally:
            obs.ended = time.time()
            if obs.end != "clean" and conn.body_start is not None:
                obs.body_bytes = conn.received - conn.body_start
            conn.on_body, conn.body_start = None, None
            obs.drop_body()
            if case.leave_at is not None and obs.end == "left":
                obs.notes.append(f"left after {obs.body_bytes} body bytes")

    async def _exchange(self, conn: ClientConn, obs: Observation) -> None:
        case = self.case
        head = _request_head(case, obs.rid, self.port)
        if not case.upload:
            if not await self._send(conn, obs, head):
                return
            obs.head_sent = True
            await self._read(conn, obs)
            return
        if case.mode == "sequential":
            if not await self._send(conn, obs, head):
                return
            obs.head_sent = True
            await self._upload(conn, obs)
            if case.send_only is not None:
                raise Vanish
            await self._read(conn, obs)
            return
        if not await self._send(conn, obs, head):
            return
        obs.head_sent = True
        vanish = False
        async with trio.open_nursery() as nursery:
            started = False

            def on_interim(status: int) -> None:
                nonlocal started
                if status == 100 and not started:
                    started = True
                    nursery.start_soon(self._upload, conn, obs)

            if case.mode == "concurrent":
                on_interim(100)
            try:
                await self._read(conn, obs, on_interim)
            except Vanish:
                vanish = True
            nursery.cancel_scope.cancel()
        if vanish:
            raise Vanish

    async def _send(self, conn: ClientConn, obs: Observation, data: bytes) -> bool:
        try:
            await conn.send_all(data)
        except OSError as exc:
            obs.upload_error = f"head: {_errname(exc)}"
            obs.end, obs.how = "cut", _errname(exc)
            return False
        return True

    async def _upload(self, conn: ClientConn, obs: Observation) -> None:
        case = self.case
        total = case.upload
        limit = min(total, case.send_only) if case.send_only is not None else total
        sent = 0
        try:
            while sent < limit:
                n = min(case.piece, limit - sent)
                data = (PATTERN * (n // len(PATTERN) + 1))[:n] if n > len(PATTERN) else PATTERN[:n]
                if case.chunked:
                    data = b"%x\r\n%s\r\n" % (n, data)
                await conn.send_all(data)
                sent += n
                obs.sent_body = sent
                if case.every:
                    await trio.sleep(case.every)
            if case.chunked and limit == total:
                await conn.send_all(b"0\r\n\r\n")
            obs.upload_done = limit == total
        except OSError as exc:
            obs.upload_error = _errname(exc)

    async def _read(
        self,
        conn: ClientConn,
        obs: Observation,
        on_interim: Callable[[int], None] | None = None,
    ) -> None:
        case = self.case
        if case.leave_after is not None:
            with trio.move_on_after(case.leave_after) as waited:
                head = await self._head(conn, obs, on_interim)
            if waited.cancelled_caught:
                raise Vanish
        else:
            head = await self._head(conn, obs, on_interim)
        if head is None:
            return
        try:
            status, headers = _parse_head(head)
        except ValueError as exc:
            obs.end, obs.how = "cut", f"head: {exc}"
            return
        obs.status = status
        obs.content_type = headers.get("content-type", "")
        obs.response_rid = headers.get("x-request-id", "")
        te = headers.get("transfer-encoding", "").lower()
        if case.method == "HEAD" or status in (204, 304):
            obs.framing = "none"
        elif "chunked" in te:
            obs.framing = "chunked"
        elif "content-length" in headers:
            obs.framing = "length"
            try:
                obs.declared = int(headers["content-length"])
            except ValueError:
                obs.end, obs.how = "cut", "head: bad content-length"
                return
        else:
            obs.framing = "close"
        conn.body_start = conn.received - len(conn.buf)
        conn.on_body = self._policy(obs)
        await conn.on_body(len(conn.buf))
        sse = SSEReader(obs) if obs.content_type.startswith("text/event-stream") else None
        await self._body(conn, obs, sse)
        if obs.end == "clean":
            obs.body_bytes = conn.received - conn.body_start - len(conn.buf)
            self._error_body(obs)

    async def _head(
        self, conn: ClientConn, obs: Observation, on_interim: Callable[[int], None] | None
    ) -> bytes | None:
        while True:
            end = conn.buf.find(b"\r\n\r\n")
            if end >= 0:
                head = bytes(conn.buf[: end + 4])
                del conn.buf[: end + 4]
                m = _STATUS_LINE.match(head)
                if m is not None and m[1].startswith(b"1") and m[1] != b"101":
                    obs.interim.append(int(m[1]))
                    if on_interim is not None:
                        on_interim(int(m[1]))
                    continue
                return head
            if len(conn.buf) > 128 * KIB:
                obs.end, obs.how = "cut", "head: too large"
                return None
            if not await conn.fill():
                obs.end, obs.how = "no-head", conn.closed_how
                if conn.buf:
                    obs.notes.append(f"{len(conn.buf)} bytes of a head, then {conn.closed_how}")
                return None

    def _policy(self, obs: Observation) -> Callable[[int], Awaitable[None]]:
        case = self.case

        async def policy(received: int) -> None:
            if case.leave_at is not None and received >= case.leave_at:
                raise Vanish
            if case.stall_at is not None and obs.stalled_at is None and received >= case.stall_at:
                obs.stalled_at = time.time()
                await trio.sleep(case.stall_s)
                obs.resumed_at = time.time()

        return policy

    async def _body(self, conn: ClientConn, obs: Observation, sse: SSEReader | None) -> None:
        def deliver(data: bytes) -> None:
            obs.data_bytes += len(data)
            if len(obs._body_head) < 4096:
                obs._body_head += data[: 4096 - len(obs._body_head)]
            if sse is not None:
                sse.feed(data)

        if obs.framing == "none":
            obs.end = "clean"
            return
        if obs.framing == "length":
            remaining = obs.declared or 0
            while remaining:
                if not conn.buf and not await conn.fill():
                    obs.end, obs.how = "cut", conn.closed_how
                    return
                take = min(remaining, len(conn.buf))
                data = bytes(conn.buf[:take])
                del conn.buf[:take]
                remaining -= take
                deliver(data)
            obs.end = "clean"
            return
        if obs.framing == "close":
            while True:
                if conn.buf:
                    deliver(bytes(conn.buf))
                    conn.buf.clear()
                if not await conn.fill():
                    break
            obs.end = "close" if conn.closed_how == "eof" else "cut"
            obs.how = conn.closed_how
            return
        problem = await self._chunked(conn, deliver)
        if problem is None:
            obs.end = "clean"
            return
        obs.end, obs.how = "cut", problem
        if problem == "framing":
            while await conn.fill():  # count what still comes, up to the end
                conn.buf.clear()

    async def _chunked(self, conn: ClientConn, deliver: Callable[[bytes], None]) -> str | None:
        """Read a chunked body; None when it ended cleanly, else how it was cut."""

        async def line() -> bytes | None:
            while True:
                i = conn.buf.find(b"\r\n")
                if i >= 0:
                    out = bytes(conn.buf[:i])
                    del conn.buf[: i + 2]
                    return out
                if len(conn.buf) > 4096:
                    raise ValueError("chunk line too long")
                if not await conn.fill():
                    return None

        async def exact(n: int) -> bytes | None:
            while len(conn.buf) < n:
                if not await conn.fill():
                    return None
            out = bytes(conn.buf[:n])
            del conn.buf[:n]
            return out

        try:
            while True:
                size_line = await line()
                if size_line is None:
                    return conn.closed_how
                size_text = size_line.split(b";")[0].strip()
                if not size_text or not all(c in b"0123456789abcdefABCDEF" for c in size_text):
                    return "framing"
                size = int(size_text, 16)
                if size == 0:
                    while True:
                        trailer = await line()
                        if trailer is None:
                            return conn.closed_how
                        if not trailer:
                            return None
                data = await exact(size)
                if data is None:
                    return conn.closed_how
                deliver(data)
                crlf = await exact(2)
                if crlf is None:
                    return conn.closed_how
                if crlf != b"\r\n":
                    return "framing"
        except ValueError:
            return "framing"

    def _error_body(self, obs: Observation) -> None:
        """A proxy-made error: JSON ``{"error": {"type", "message", "request_id"}}``."""
        if not obs.content_type.startswith("application/json") or (obs.status or 0) < 400:
            return
        try:
            doc = json.loads(bytes(obs._body_head))
        except ValueError:
            return
        error = doc.get("error") if isinstance(doc, dict) else None
        if isinstance(error, dict) and "type" in error:
            obs.error_type = str(error["type"])
            obs.error_rid = str(error.get("request_id", ""))


class WsClient:
    """A WebSocket client (wsproto over a raw socket): echo, die or vanish."""

    SIZES: Final = (10, 200, 1000, 5000, 50)

    def __init__(self, case: Case, port: int, rid: str, phase: str) -> None:
        self.case, self.port = case, port
        self.obs = Observation(rid, case.name, phase, kind="ws")
        self.ws = WSConnection(ConnectionType.CLIENT)

    async def run(self) -> list[Observation]:
        obs, case = self.obs, self.case
        obs.started = time.time()
        conn = await ClientConn.open(self.port)
        try:
            with trio.move_on_after(DEADLINE_S) as deadline:
                try:
                    await self._session(conn)
                except Vanish:
                    obs.end, obs.left = "left", "mid-body"
                except OSError as exc:
                    obs.end, obs.how = "cut", _errname(exc)
            if deadline.cancelled_caught:
                obs.end = "deadline"
        finally:
            obs.ended = time.time()
            conn.close(rst=case.rst and obs.end == "left")
        return [obs]

    async def _events(self, conn: ClientConn) -> list[Any] | None:
        if not await conn.fill():
            return None
        data = bytes(conn.buf)
        conn.buf.clear()
        self.ws.receive_data(data)
        return list(self.ws.events())

    async def _session(self, conn: ClientConn) -> None:
        obs, ws = self.obs, self.ws
        request = WsRequest(
            host=f"{HOST}:{self.port}",
            target=self.case.target,
            extra_headers=[(b"X-Request-ID", obs.rid.encode())],
        )
        await conn.send_all(ws.send(request))
        obs.head_sent = True
        while obs.status is None or obs.end == "":
            events = await self._events(conn)
            if events is None:
                obs.end = "no-head" if obs.status is None else "cut"
                obs.how = conn.closed_how
                return
            for event in events:
                if isinstance(event, AcceptConnection):
                    obs.status = 101
                    obs.end = ""
                    await self._accepted(conn)
                    return
                if isinstance(event, RejectConnection):
                    obs.status = event.status_code
                    if not event.has_body:
                        obs.end = "clean"
                elif isinstance(event, RejectData):
                    obs.body_bytes += len(event.data)
                    if event.body_finished:
                        obs.end = "clean"

    async def _accepted(self, conn: ClientConn) -> None:
        obs, ws = self.obs, self.ws
        pending: list[str] = []
        if self.case.ws == "die":
            await self._until_close(conn, pending)
            return
        sizes = self.SIZES if self.case.ws == "echo" else self.SIZES[:1]
        for size in sizes:
            message = "m" * size
            await conn.send_all(ws.send(TextMessage(data=message)))
            obs.ws_sent += size
            got = await self._until_message(conn, pending)
            if got is None:
                return
            obs.ws_recv += len(got)
        if self.case.ws == "vanish":
            raise Vanish
        await conn.send_all(ws.send(CloseConnection(code=1000, reason="bye")))
        await self._until_close(conn, pending)

    async def _until_message(self, conn: ClientConn, pending: list[str]) -> str | None:
        """The next whole text message; None if the session ended first (recorded)."""
        while True:
            events = await self._events(conn)
            if events is None:
                self.obs.end, self.obs.how = "eof", self.obs.how or conn.closed_how
                return None
            for event in events:
                done = await self._control(conn, event)
                if done:
                    return None
                if isinstance(event, TextMessage):
                    pending.append(event.data)
                    if event.message_finished:
                        text = "".join(pending)
                        pending.clear()
                        return text
                elif isinstance(event, BytesMessage):
                    self.obs.ws_recv += len(event.data)

    async def _until_close(self, conn: ClientConn, pending: list[str]) -> None:
        while self.obs.end == "":
            events = await self._events(conn)
            if events is None:
                self.obs.end, self.obs.how = "eof", conn.closed_how
                return
            for event in events:
                await self._control(conn, event)
                if isinstance(event, TextMessage):
                    self.obs.ws_recv += len(event.data)
        # The proxy closes the TCP connection after the closing handshake.
        with trio.move_on_after(2.0):
            while await conn.fill():
                conn.buf.clear()

    async def _control(self, conn: ClientConn, event: Any) -> bool:
        """Pings and close frames; True once the session is closed."""
        ws = self.ws
        if isinstance(event, Ping):
            await conn.send_all(ws.send(event.response()))
        elif isinstance(event, CloseConnection):
            self.obs.ws_close = event.code
            if ws.state.name == "REMOTE_CLOSING":
                await conn.send_all(ws.send(event.response()))
            self.obs.end = "closed"
            return True
        return False
