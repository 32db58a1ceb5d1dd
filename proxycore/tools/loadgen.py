"""The load generator engine: HTTP/1.1 over raw non-blocking sockets, driven by trio.

:func:`run_load` drives a :class:`LoadSpec` against any HTTP/1.1 server and returns
a :class:`LoadResult` of counters and :class:`~proxycore.hdr.Histogram` timings.

Models:

* **closed** (``rate`` is None): ``concurrency`` slots each send a request, wait for
  the whole response, and send the next, until ``requests`` have been started or
  ``duration`` has passed.
* **open** (``rate`` set): requests are started at ``rate`` per second (uniform or
  Poisson arrivals) by one dispatcher; ``concurrency`` is the most in flight. An
  arrival that finds every slot busy is not queued but counted in ``dropped``, so
  a slow server shows up as drops instead of silently lowering the offered rate.

Each slot owns one connection (reused when ``keepalive``; with ``keepalive=False``
every request opens a fresh one and sends ``Connection: close``). A reused
connection that turns out dead before any response byte (the server's keep-alive
timeout raced us) is retried once on a fresh connection, as a browser would.

HTTP: the request is built, validated and serialized once by h11 (so it is always
well-formed) and those bytes are sent for every request. Responses are read by a
small parser here, not by h11: the status line, the framing fields
(Content-Length, Transfer-Encoding, Connection) and the body framing (length;
chunked, through the project's strict :class:`~proxycore.chunked.ChunkedScanner`;
until close; none for HEAD, 1xx, 204 and 304). Other fields are skipped: a load
generator is no gatekeeper. Measured against nginx on one core, h11 response
parsing made ~256 us of CPU per keep-alive request (about 3.8k requests/s, below
the proxy it is meant to measure); this reader makes ~95 us, mostly syscalls and
trio's wake-ups.

What is measured (all from the moment the request bytes were handed to the kernel):

* ``ttfb``: to the first response byte (taken before anything is parsed);
* ``latency``: to the end of the response body;
* ``first_event`` (``sse``): to the receipt of the chunk completing the first SSE
  event that has a ``data:`` field;
* ``event_delay`` (``sse``): per SSE event whose data carries ``"t_ns": <int>``
  (``time.time_ns()`` at the sender), ``time.time_ns()`` when the chunk holding
  it was received minus ``t_ns``. Same clock only when sender and generator share
  a host. Events without ``t_ns`` (such as ``proxycore.sim``'s final ``done``) are
  counted in ``events`` but give no delay sample.
* ``connect``: TCP connect time of every connection opened.

``ttfb``, ``latency`` and ``first_event`` are recorded only for successful
(non-4xx/5xx, complete) responses, so fast error replies never flatter them.
``event_delay``, ``events`` and ``body_bytes`` count everything received.

Errors never escape :func:`run_load` (only cancellation does): each failed request
is counted under one kind of :data:`ERROR_KINDS`. Everything is bounded: a run
ends after ``requests`` starts or ``duration`` seconds, and every request
(connect included) is cut after ``timeout`` seconds, so a run lasts at most about
``duration + timeout`` (or ``ceil(requests / concurrency) * timeout``).
"""

from __future__ import annotations

import math
import random
import re
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Final, Literal

import h11
import trio

from ..http.chunked import ChunkedError, ChunkedScanner
from ..net.stream import connect_tcp
from ..tools.hdr import Histogram

__all__ = ["ERROR_KINDS", "LoadProgress", "LoadResult", "LoadSpec", "run_load"]

#: Every kind a failed request is counted under in ``LoadResult.error_kinds``.
ERROR_KINDS: Final = ("connect", "timeout", "status_5xx", "status_4xx", "reset", "protocol")

#: Largest read; also the most a response head (1xx heads included) may take.
RECV_BYTES: Final = 64 * 1024
#: Reads in a row that did not wait before a slot yields to the other tasks.
YIELD_EVERY: Final = 16
#: An SSE event larger than this (no blank line in sight) is dropped unparsed.
MAX_SSE_EVENT_BYTES: Final = 1024 * 1024
#: A slot pauses this long after a failed connect, so a closed port is not hammered.
CONNECT_BACKOFF: Final = 0.01
#: Headers whose values are replaced by "<redacted>" in ``LoadResult.to_json``.
_SECRET_HINTS: Final = ("auth", "cookie", "token", "key", "secret", "password")
_BODY_METHODS: Final = frozenset({"POST", "PUT", "PATCH"})

_T_NS: Final = re.compile(rb'"t_ns"\s*:\s*(\d+)')
_STATUS_LINE: Final = re.compile(rb"HTTP/1\.([01]) ([1-9][0-9]{2})(?: [^\r\n]*)?\r\n")
_OWS: Final = b" \t"
#: The only header fields the client reads: the ones that frame the body or end the connection.
_FRAMING_FIELD: Final = re.compile(
    rb"\r\n(content-length|transfer-encoding|connection):([^\r\n]*)", re.IGNORECASE
)
# Response body framing, besides a Content-Length (>= 0).
_CHUNKED: Final = -1
_UNTIL_CLOSE: Final = -2
_perf = time.perf_counter
_time_ns = time.time_ns


@dataclass(frozen=True)
class LoadSpec:
    """What to send, how much, and how. Validated on construction (ValueError)."""

    host: str
    port: int
    path: str = "/"
    method: str = "GET"
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""
    #: Connections (closed model) or most requests in flight (open model).
    concurrency: int = 10
    #: Stop after starting this many requests (open model: arrivals, dropped included).
    requests: int | None = None
    #: ... or stop starting new ones after this many seconds (in-flight ones finish).
    duration: float | None = None
    #: Open model: start this many requests per second.
    rate: float | None = None
    #: Open-model arrival process: evenly spaced, or Poisson (exponential gaps).
    arrivals: Literal["uniform", "poisson"] = "uniform"
    keepalive: bool = True
    #: Parse the body as Server-Sent Events (first_event, event_delay, events).
    sse: bool = False
    #: Read each response at most this many bytes per second (a slow reader).
    read_rate: int | None = None
    #: Seconds allowed per request, connect included.
    timeout: float = 60.0

    def __post_init__(self) -> None:
        problems: list[str] = []
        if not self.host:
            problems.append("host is empty")
        if not 0 < self.port < 65536:
            problems.append("port must be within 1..65535")
        if not self.path.startswith("/"):
            problems.append("path must start with '/'")
        if self.concurrency < 1:
            problems.append("concurrency must be at least 1")
        if self.requests is None and self.duration is None:
            problems.append("give requests or duration (or both): a run must be bounded")
        if self.requests is not None and self.requests < 1:
            problems.append("requests must be at least 1")
        for name in ("duration", "rate", "timeout"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                problems.append(f"{name} must be a finite number > 0")
        if self.read_rate is not None and self.read_rate < 1:
            problems.append("read_rate must be at least 1 byte/s")
        if self.arrivals not in ("uniform", "poisson"):
            problems.append("arrivals must be 'uniform' or 'poisson'")
        if not problems:
            try:
                _build_request(self)
            except ValueError as exc:
                problems.append(str(exc))
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def authority(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True)
class LoadProgress:
    """A snapshot of a run, given to the ``progress`` callback. Times in seconds."""

    elapsed: float
    started: int
    ok: int
    errors: int
    dropped: int
    in_flight: int
    ttfb_p50: float
    ttfb_p99: float

    @property
    def done(self) -> int:
        return self.ok + self.errors

    @property
    def rps(self) -> float:
        return self.ok / self.elapsed if self.elapsed > 0 else 0.0


@dataclass
class LoadResult:
    """What a run measured. Histograms hold seconds; ``to_json`` reports milliseconds."""

    spec: LoadSpec
    ok: int
    errors: int
    dropped: int
    #: Failed requests by kind (only kinds that occurred), see ERROR_KINDS.
    error_kinds: dict[str, int]
    elapsed: float
    ttfb: Histogram
    latency: Histogram
    first_event: Histogram
    event_delay: Histogram
    body_bytes: int
    #: SSE events received that had a data field (with or without t_ns).
    events: int
    #: Requests started (ok + errors); open-model arrivals that were dropped are not.
    started: int = 0
    #: TCP connections opened successfully.
    connections: int = 0
    connect: Histogram = field(default_factory=Histogram)

    @property
    def rps(self) -> float:
        """Successful responses per second of the run."""
        return self.ok / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def throughput(self) -> float:
        """Response body bytes per second of the run."""
        return self.body_bytes / self.elapsed if self.elapsed > 0 else 0.0

    def to_json(self) -> dict[str, object]:
        """Everything, JSON-ready: timings as ``summary_ms`` dicts (milliseconds).

        Header values that look like credentials are redacted; the request body is
        reported by its length only.
        """
        spec = self.spec
        return {
            "spec": {
                "host": spec.host,
                "port": spec.port,
                "path": spec.path,
                "method": spec.method,
                "headers": [[name, _redact(name, value)] for name, value in spec.headers],
                "body_bytes": len(spec.body),
                "concurrency": spec.concurrency,
                "requests": spec.requests,
                "duration": spec.duration,
                "rate": spec.rate,
                "arrivals": spec.arrivals,
                "keepalive": spec.keepalive,
                "sse": spec.sse,
                "read_rate": spec.read_rate,
                "timeout": spec.timeout,
            },
            "ok": self.ok,
            "errors": self.errors,
            "dropped": self.dropped,
            "started": self.started,
            "connections": self.connections,
            "error_kinds": dict(self.error_kinds),
            "elapsed": self.elapsed,
            "rps": self.rps,
            "throughput": self.throughput,
            "body_bytes": self.body_bytes,
            "events": self.events,
            "ttfb": self.ttfb.summary_ms(),
            "latency": self.latency.summary_ms(),
            "first_event": self.first_event.summary_ms(),
            "event_delay": self.event_delay.summary_ms(),
            "connect": self.connect.summary_ms(),
        }


def _redact(name: str, value: str) -> str:
    lowered = name.lower()
    return "<redacted>" if any(hint in lowered for hint in _SECRET_HINTS) else value


def _build_request(spec: LoadSpec) -> bytes:
    """The request bytes sent on every cycle: built, validated and serialized once by h11."""
    names = {name.lower() for name, _ in spec.headers}
    if "transfer-encoding" in names:
        raise ValueError("Transfer-Encoding is not supported: the body is sent with Content-Length")
    for name, value in spec.headers:
        if name.lower() == "content-length" and value.strip() != str(len(spec.body)):
            raise ValueError(f"Content-Length {value!r} does not match the body ({len(spec.body)})")
    headers: list[tuple[str, str]] = []
    if "host" not in names:
        headers.append(("Host", spec.authority))
    if "user-agent" not in names:
        headers.append(("User-Agent", "proxycore-loadtest"))
    headers.extend(spec.headers)
    if "content-length" not in names and (spec.body or spec.method.upper() in _BODY_METHODS):
        headers.append(("Content-Length", str(len(spec.body))))
    if not spec.keepalive and "connection" not in names:
        headers.append(("Connection", "close"))
    conn = h11.Connection(h11.CLIENT)
    try:
        wire = conn.send(h11.Request(method=spec.method, target=spec.path, headers=headers)) or b""
        if spec.body:
            wire += conn.send(h11.Data(data=spec.body)) or b""
        return wire + (conn.send(h11.EndOfMessage()) or b"")
    except h11.LocalProtocolError as exc:
        raise ValueError(f"invalid request: {exc}") from None


class _Malformed(Exception):
    """The response is not valid HTTP/1.1 (counted as "protocol")."""


class _Stale(Exception):
    """A reused connection died before any response byte: retry on a fresh one."""


def _parse_head(head: bytes, head_request: bool) -> tuple[int, int, bool]:
    """Parse a response head (status line to the blank line, CRLFs included).

    Returns ``(status, framing, reusable)``: framing is the Content-Length,
    ``_CHUNKED`` or ``_UNTIL_CLOSE`` (RFC 9112 section 6.3); reusable says whether
    the connection may carry another request (HTTP/1.1, no ``Connection: close``,
    a self-delimited body). Only the status line and the framing fields are
    parsed (a load generator is no gatekeeper); an HTTP/1.0 keep-alive connection
    is not reused. Raises ``_Malformed``.
    """
    m = _STATUS_LINE.match(head)
    if m is None:
        raise _Malformed("bad status line")
    status = int(m[2])
    lengths: set[int] = set()
    codings: list[bytes] = []
    close = m[1] == b"0"
    for found in _FRAMING_FIELD.finditer(head, m.end() - 2):
        name, value = found[1].lower(), found[2].strip(_OWS)
        if name == b"content-length":
            if not value.isdigit():
                raise _Malformed("bad Content-Length")
            lengths.add(int(value))
        elif name == b"transfer-encoding":
            codings.extend(c.strip(_OWS).lower() for c in value.split(b","))
        elif b"close" in value.lower():  # a cheap test first: this is on every response
            close = close or b"close" in [t.strip(_OWS).lower() for t in value.split(b",")]
    if len(lengths) > 1:
        raise _Malformed("conflicting Content-Length")
    if head_request or status < 200 or status in (204, 304):
        framing = 0
    elif codings:
        framing = _CHUNKED if codings[-1] == b"chunked" else _UNTIL_CLOSE
        close = close or bool(lengths)  # both framings: never reuse (smuggling shape)
    elif lengths:
        framing = lengths.pop()
    else:
        framing = _UNTIL_CLOSE
    return status, framing, not close and framing != _UNTIL_CLOSE


class _Slot:
    """One concurrency slot: its connection (if open) and its receive buffer.

    Unparsed bytes are ``buf[lo:hi]``; reads append at ``hi``.
    """

    __slots__ = ("buf", "drained", "hi", "lo", "run", "sock", "view")

    def __init__(self) -> None:
        self.buf = bytearray(RECV_BYTES)
        self.view = memoryview(self.buf)
        self.lo = 0
        self.hi = 0
        self.sock: socket.socket | None = None
        self.drained = True
        self.run = 0

    def close(self) -> None:
        sock = self.sock
        if sock is not None:
            self.sock = None
            trio.lowlevel.notify_closing(sock)
            sock.close()
        self.lo = self.hi = 0

    async def send_all(self, data: bytes) -> None:
        sock = self.sock
        assert sock is not None
        view = memoryview(data)
        sent = 0
        while sent < len(view):
            try:
                sent += sock.send(view[sent:])
            except BlockingIOError:
                await trio.lowlevel.wait_writable(sock)

    async def fill(self, nbytes: int) -> int:
        """Read at most ``nbytes`` more into ``buf[hi:]``; 0 means end of stream.

        Raises OSError, or ``_Malformed`` if unparsed bytes fill the whole buffer.
        """
        sock = self.sock
        assert sock is not None
        if self.lo == self.hi:
            self.lo = self.hi = 0
        elif self.hi == len(self.buf):
            if not self.lo:
                raise _Malformed("response head too large")
            size = self.hi - self.lo
            self.buf[:size] = self.buf[self.lo : self.hi]
            self.lo, self.hi = 0, size
        nbytes = min(nbytes, len(self.buf) - self.hi)
        if self.drained:  # a short read emptied the socket: wait instead of a failing recv
            await trio.lowlevel.wait_readable(sock)
            self.run = 0
        while True:
            try:
                n = sock.recv_into(self.view[self.hi : self.hi + nbytes])
            except BlockingIOError:
                await trio.lowlevel.wait_readable(sock)
                self.run = 0
                continue
            break
        self.drained = n < nbytes
        self.hi += n
        self.run += 1
        if self.run >= YIELD_EVERY:  # fairness: reads that never waited never yielded
            self.run = 0
            await trio.lowlevel.checkpoint()
        return n


class _Run:
    """The state of one run: the spec, counters and histograms, shared by its tasks."""

    def __init__(self, spec: LoadSpec) -> None:
        self.spec = spec
        self.wire = _build_request(spec)
        self.head_request = spec.method.upper() == "HEAD"
        self.recv_bytes = RECV_BYTES
        if spec.read_rate is not None:
            # Small reads, so the throttle keeps the average rate without bursts.
            self.recv_bytes = max(1, min(4096, spec.read_rate // 10))
        self.addresses: list[str] | None = None
        self.started = 0
        self.ok = 0
        self.dropped = 0
        self.in_flight = 0
        self.connections = 0
        self.body_bytes = 0
        self.events = 0
        self.error_kinds: dict[str, int] = {}
        self.ttfb = Histogram()
        self.latency = Histogram()
        self.first_event = Histogram()
        self.event_delay = Histogram()
        self.connect_time = Histogram()
        self.deadline = math.inf
        self.t_start = 0.0

    @property
    def errors(self) -> int:
        return sum(self.error_kinds.values())

    # ------------------------------------------------------------------ models

    async def closed_turn(self) -> bool:
        """Closed model: may this slot start one more request?"""
        spec = self.spec
        if spec.requests is not None and self.started >= spec.requests:
            return False
        return trio.current_time() < self.deadline

    async def open_slot(self, arrivals: trio.MemoryReceiveChannel[None]) -> None:
        """Open model: one slot, serving the arrivals it receives until the channel closes."""

        async def turn() -> bool:
            try:
                await arrivals.receive()
            except trio.EndOfChannel:
                return False
            return True

        async with arrivals:
            await self.slot(turn, turn_waits=True)

    async def slot(self, turn: Callable[[], Awaitable[bool]], turn_waits: bool = False) -> None:
        """Run requests one after another on one slot while ``turn()`` says so.

        ``turn_waits``: ``turn()`` may block (open model), so no deadline may run then.

        Each request runs under the slot's cancel scope with its deadline moved to
        now + timeout (cheaper than a scope per request); when it fires, the request
        in flight is counted as a timeout and the slot goes on with a fresh scope.
        """
        slot = _Slot()
        timeout = self.spec.timeout
        more = True
        try:
            while more:
                with trio.CancelScope() as scope:
                    while more := await turn():
                        scope.deadline = trio.current_time() + timeout
                        self.started += 1
                        self.in_flight += 1
                        kind = await self._attempt(slot)
                        self._done(kind)
                        if kind == "connect":
                            scope.deadline = math.inf
                            await trio.sleep(CONNECT_BACKOFF)
                        if turn_waits:
                            scope.deadline = math.inf
                if scope.cancelled_caught:
                    slot.close()
                    self._done("timeout")
        finally:
            slot.close()

    def _done(self, kind: str | None) -> None:
        self.in_flight -= 1
        if kind is None:
            self.ok += 1
        else:
            self.error_kinds[kind] = self.error_kinds.get(kind, 0) + 1

    async def dispatch(self, arrivals: trio.MemorySendChannel[None]) -> None:
        """Open model: hand arrivals to idle slots on schedule; count the rest as dropped."""
        spec = self.spec
        assert spec.rate is not None
        rate = spec.rate
        rng = random.Random()
        async with arrivals:
            t0 = trio.current_time()
            at = t0
            n = 0
            while (spec.requests is None or n < spec.requests) and at < self.deadline:
                await trio.sleep_until(at)
                n += 1
                try:
                    arrivals.send_nowait(None)
                except trio.WouldBlock:
                    self.dropped += 1
                if spec.arrivals == "poisson":
                    at += rng.expovariate(rate)
                else:
                    at = t0 + n / rate

    async def report(self, callback: Callable[[LoadProgress], None], interval: float) -> None:
        while True:
            await trio.sleep(interval)
            callback(self.progress())

    def progress(self) -> LoadProgress:
        p50, p99 = self.ttfb.percentiles((50.0, 99.0))
        return LoadProgress(
            elapsed=_perf() - self.t_start,
            started=self.started,
            ok=self.ok,
            errors=self.errors,
            dropped=self.dropped,
            in_flight=self.in_flight,
            ttfb_p50=p50,
            ttfb_p99=p99,
        )

    # ------------------------------------------------------------------ one request

    async def _attempt(self, slot: _Slot) -> str | None:
        """One request on ``slot``: None on success, else the error kind."""
        reused = slot.sock is not None
        if not reused and not await self._connect(slot):
            return "connect"
        try:
            return await self._exchange(slot, reused)
        except _Stale:
            slot.close()
        if not await self._connect(slot):
            return "connect"
        return await self._exchange(slot, False)

    async def _connect(self, slot: _Slot) -> bool:
        spec = self.spec
        t0 = _perf()
        try:
            if self.addresses is None:  # resolved once per run
                infos = await trio.socket.getaddrinfo(
                    spec.host, spec.port, type=trio.socket.SOCK_STREAM
                )
                self.addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
            sock = None
            for address in self.addresses:
                try:
                    sock = await connect_tcp(address, spec.port)  # numeric: no resolver call
                    break
                except OSError:
                    continue
            if sock is None:
                return False
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            return False
        self.connect_time.record(_perf() - t0)
        self.connections += 1
        slot.sock = sock
        slot.drained = True
        slot.run = 0
        return True

    async def _exchange(self, slot: _Slot, reused: bool) -> str | None:
        """Send the request on the slot's connection and read the whole response.

        Returns None on success or the error kind; closes the connection unless it
        can be reused. Raises ``_Stale`` if ``reused`` and the connection died before
        any response byte.
        """
        t0 = _perf()
        try:
            await slot.send_all(self.wire)
        except OSError:
            slot.close()
            if reused:
                raise _Stale from None
            return "reset"
        try:
            return await self._response(slot, reused, t0)
        except _Malformed:
            slot.close()
            return "protocol"
        except ChunkedError:
            slot.close()
            return "protocol"
        except OSError:
            slot.close()
            return "reset"

    async def _response(self, slot: _Slot, reused: bool, t0: float) -> str | None:
        spec = self.spec
        sse = spec.sse
        read_rate = spec.read_rate
        nbytes = self.recv_bytes
        buf = slot.buf
        slot.drained = True  # the response cannot be there yet: wait for it
        got = 0  # response bytes received
        ttfb = 0.0
        throttle_start = 0.0
        now = t0
        now_ns = 0

        async def fill() -> int:
            nonlocal got, ttfb, now, now_ns, throttle_start
            try:
                n = await slot.fill(nbytes)
            except OSError:
                if reused and not got:
                    raise _Stale from None
                raise
            now = _perf()
            if sse:
                now_ns = _time_ns()
            if not n:
                if reused and not got:
                    raise _Stale
                return 0
            if not got:
                ttfb = now - t0
                if read_rate is not None:
                    throttle_start = trio.current_time()
            got += n
            if read_rate is not None:
                due = throttle_start + got / read_rate
                if due > trio.current_time():
                    await trio.sleep_until(due)
            return n

        # The head (skipping 1xx heads).
        while True:
            k = buf.find(b"\r\n\r\n", slot.lo, slot.hi)
            if k >= 0:
                head = bytes(buf[slot.lo : k + 4])
                slot.lo = k + 4
                status, framing, reusable = _parse_head(head, self.head_request)
                if status >= 200:
                    break
                if status == 101:
                    raise _Malformed("unexpected protocol switch")
                continue
            if not await fill():
                slot.close()
                return "reset"

        # The body.
        scanner = ChunkedScanner() if framing == _CHUNKED else None
        pending = bytearray()
        first_event = -1.0
        spans: list[tuple[int, int]] = []
        remaining = framing
        while True:
            lo, hi = slot.lo, slot.hi
            if hi > lo:
                if scanner is not None:
                    spans.clear()
                    slot.lo = scanner.feed(buf, lo, hi, spans)
                    done = scanner.done
                elif remaining >= 0:
                    take = min(remaining, hi - lo)
                    spans = [(lo, lo + take)]
                    slot.lo = lo + take
                    remaining -= take
                    done = not remaining
                else:
                    spans = [(lo, hi)]
                    slot.lo = hi
                    done = False
                for s, e in spans:
                    self.body_bytes += e - s
                    if sse and self._sse(pending, slot.view[s:e], now_ns) and first_event < 0:
                        first_event = now - t0
            else:
                done = remaining == 0
            if done:
                break
            if not await fill():
                if framing != _UNTIL_CLOSE:
                    slot.close()
                    return "reset"
                break

        end = _perf()
        if reusable and spec.keepalive and slot.lo == slot.hi:
            slot.lo = slot.hi = 0
        else:  # Connection: close, close-delimited, or bytes after the response
            slot.close()
        if status >= 500:
            return "status_5xx"
        if status >= 400:
            return "status_4xx"
        self.ttfb.record(ttfb)
        self.latency.record(end - t0)
        if first_event >= 0:
            self.first_event.record(first_event)
        return None

    def _sse(self, pending: bytearray, data: memoryview, now_ns: int) -> int:
        """Feed body bytes to the SSE splitter; count and time the events completed.

        Returns how many events with a data field were completed by ``data``.
        """
        pending += data
        if b"\r" in pending:  # CRLF (or CR) line endings: normalise to LF
            # A trailing CR may be the first half of a CRLF split across reads: keep it.
            tail = pending.endswith(b"\r")
            lines = pending[:-1] if tail else pending
            pending[:] = lines.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
            if tail:
                pending += b"\r"
        start = 0
        completed = 0
        while (end := pending.find(b"\n\n", start)) != -1:
            if pending.startswith(b"data:", start) or pending.find(b"\ndata:", start, end) != -1:
                completed += 1
                match = _T_NS.search(pending, start, end)
                if match is not None:
                    self.event_delay.record((now_ns - int(match[1])) / 1e9)
            start = end + 2
        if start:
            del pending[:start]
        if len(pending) > MAX_SSE_EVENT_BYTES:
            pending.clear()
        self.events += completed
        return completed

    def result(self, elapsed: float) -> LoadResult:
        return LoadResult(
            spec=self.spec,
            ok=self.ok,
            errors=self.errors,
            dropped=self.dropped,
            error_kinds=dict(self.error_kinds),
            elapsed=elapsed,
            ttfb=self.ttfb,
            latency=self.latency,
            first_event=self.first_event,
            event_delay=self.event_delay,
            body_bytes=self.body_bytes,
            events=self.events,
            started=self.started,
            connections=self.connections,
            connect=self.connect_time,
        )


async def run_load(
    spec: LoadSpec,
    *,
    progress: Callable[[LoadProgress], None] | None = None,
    progress_interval: float = 0.5,
) -> LoadResult:
    """Run ``spec`` and return what was measured.

    Request failures are counted, never raised. ``progress`` (if given) is called
    every ``progress_interval`` seconds with a :class:`LoadProgress`; exceptions
    it raises propagate. On cancellation every connection is closed.

    Raises:
        ValueError: ``progress_interval`` is not > 0.
    """
    if not (math.isfinite(progress_interval) and progress_interval > 0):
        raise ValueError("progress_interval must be a finite number > 0")
    run = _Run(spec)
    run.t_start = _perf()
    if spec.duration is not None:
        run.deadline = trio.current_time() + spec.duration
    async with trio.open_nursery() as outer:
        if progress is not None:
            outer.start_soon(run.report, progress, progress_interval)
        async with trio.open_nursery() as slots:
            if spec.rate is None:
                for _ in range(spec.concurrency):
                    slots.start_soon(run.slot, run.closed_turn)
            else:
                send, receive = trio.open_memory_channel[None](0)
                for _ in range(spec.concurrency):
                    slots.start_soon(run.open_slot, receive.clone())
                receive.close()
                slots.start_soon(run.dispatch, send)
        outer.cancel_scope.cancel()
    return run.result(_perf() - run.t_start)
