"""The engine: the closed and open models, one request cycle (connect, send, read the
response, stale retry) and :func:`run_load`."""

from __future__ import annotations

import math
import random
import re
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Final

import trio

from ...http.chunked import ChunkedError, ChunkedScanner
from ...net.stream import connect_tcp
from ..hdr import Histogram
from ..loadgen.spec import LoadProgress, LoadResult, LoadSpec, build_request
from ..loadgen.wire import CHUNKED, RECV_BYTES, UNTIL_CLOSE, Malformed, Slot, Stale, parse_head

__all__ = ["run_load"]

#: An SSE event larger than this (no blank line in sight) is dropped unparsed.
MAX_SSE_EVENT_BYTES: Final = 1024 * 1024
#: A slot pauses this long after a failed connect, so a closed port is not hammered.
CONNECT_BACKOFF: Final = 0.01

_T_NS: Final = re.compile(rb'"t_ns"\s*:\s*(\d+)')
_perf = time.perf_counter
_time_ns = time.time_ns


class _Run:
    """The state of one run: the spec, counters and histograms, shared by its tasks."""

    def __init__(self, spec: LoadSpec) -> None:
        self.spec = spec
        self.wire = build_request(spec)
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
        slot = Slot()
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

    async def _attempt(self, slot: Slot) -> str | None:
        """One request on ``slot``: None on success, else the error kind."""
        reused = slot.sock is not None
        if not reused and not await self._connect(slot):
            return "connect"
        try:
            return await self._exchange(slot, reused)
        except Stale:
            slot.close()
        if not await self._connect(slot):
            return "connect"
        return await self._exchange(slot, False)

    async def _connect(self, slot: Slot) -> bool:
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

    async def _exchange(self, slot: Slot, reused: bool) -> str | None:
        """Send the request on the slot's connection and read the whole response.

        Returns None on success or the error kind; closes the connection unless it
        can be reused. Raises ``Stale`` if ``reused`` and the connection died before
        any response byte.
        """
        t0 = _perf()
        try:
            await slot.send_all(self.wire)
        except OSError:
            slot.close()
            if reused:
                raise Stale from None
            return "reset"
        try:
            return await self._response(slot, reused, t0)
        except Malformed:
            slot.close()
            return "protocol"
        except ChunkedError:
            slot.close()
            return "protocol"
        except OSError:
            slot.close()
            return "reset"

    async def _response(self, slot: Slot, reused: bool, t0: float) -> str | None:
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
                    raise Stale from None
                raise
            now = _perf()
            if sse:
                now_ns = _time_ns()
            if not n:
                if reused and not got:
                    raise Stale
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
                status, framing, reusable = parse_head(head, self.head_request)
                if status >= 200:
                    break
                if status == 101:
                    raise Malformed("unexpected protocol switch")
                continue
            if not await fill():
                slot.close()
                return "reset"

        # The body.
        scanner = ChunkedScanner() if framing == CHUNKED else None
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
                if framing != UNTIL_CLOSE:
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
