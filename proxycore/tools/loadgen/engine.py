"""The engine: the closed and open models, one request cycle per mode (plain, SSE, token
stream, MCP call) and :func:`run_load`."""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
import time
from collections.abc import Awaitable, Callable
from typing import Final

import trio

from ..hdr import Histogram
from ..loadgen.bodies import RequestMaker
from ..loadgen.exchange import Client, Reply, SSECounter
from ..loadgen.llm import TokenStream
from ..loadgen.mcp import MAX_REPLY_BYTES, REQUEST_HEADERS, McpUser, read_reply, session_id
from ..loadgen.spec import LoadProgress, LoadResult, LoadSpec
from ..loadgen.wire import Slot

__all__ = ["run_load"]

#: A slot pauses this long after a failed connect, so a closed port is not hammered.
CONNECT_BACKOFF: Final = 0.01

_perf = time.perf_counter


class _Body:
    """MCP: keeps a reply body (at most ``MAX_REPLY_BYTES``)."""

    __slots__ = ("data", "over")

    def __init__(self) -> None:
        self.data = bytearray()
        self.over = False

    def feed(self, data: memoryview, now: float) -> None:
        if len(self.data) + len(data) > MAX_REPLY_BYTES:
            self.over = True
        else:
            self.data += data


class _Run:
    """The state of one run: the spec, counters and histograms, shared by its tasks."""

    def __init__(self, spec: LoadSpec) -> None:
        if spec.mcp_method is not None:
            names = {name.lower() for name, _ in spec.headers}
            extra = tuple(h for h in REQUEST_HEADERS if h[0].lower() not in names)
            spec_for_wire = dataclasses.replace(spec, headers=spec.headers + extra, method="POST")
        else:
            spec_for_wire = spec
        self.spec = spec
        self.maker = RequestMaker(spec_for_wire)
        self.client = Client(spec)
        self.started = 0
        self.ok = 0
        self.dropped = 0
        self.in_flight = 0
        self.error_kinds: dict[str, int] = {}
        self.ttfb = Histogram()
        self.latency = Histogram()
        self.first_event = Histogram()
        self.ttft = Histogram()
        self.itl = Histogram()
        self.queue = Histogram()
        self.stream_tps: list[float] = []
        self.output_tokens = 0
        self.usage_streams = 0
        self.counted_streams = 0
        self.initializations = 0
        self.reinitializations = 0
        self.rpc_errors: dict[str, int] = {}
        self.deadline = math.inf
        self.t_start = 0.0

    @property
    def errors(self) -> int:
        return sum(self.error_kinds.values())

    # ------------------------------------------------------------------ models

    async def closed_turn(self) -> float | None:
        """Closed model: may this slot start one more request? (its start: now)"""
        spec = self.spec
        if spec.requests is not None and self.started >= spec.requests:
            return None
        return trio.current_time() if trio.current_time() < self.deadline else None

    async def open_slot(self, arrivals: trio.MemoryReceiveChannel[float]) -> None:
        """Open model: one slot, serving the arrivals (intended start times) it receives
        until the channel closes. An arrival that waited past the timeout is dropped."""

        async def turn() -> float | None:
            while True:
                try:
                    at = await arrivals.receive()
                except trio.EndOfChannel:
                    return None
                if trio.current_time() - at < self.spec.timeout:
                    return at
                self.dropped += 1

        async with arrivals:
            await self.slot(turn, turn_waits=True)

    async def slot(
        self, turn: Callable[[], Awaitable[float | None]], turn_waits: bool = False
    ) -> None:
        """Run requests one after another on one slot while ``turn()`` gives a start.

        ``turn()`` returns the request's intended start (trio clock), or None to stop;
        ``turn_waits``: it may block (open model), so no deadline may run then. Each
        request runs under the slot's cancel scope with its deadline at its start +
        timeout (cheaper than a scope per request); when it fires, the request in flight
        is counted as a timeout and the slot goes on with a fresh scope.
        """
        slot = Slot()
        user = McpUser(self.spec.mcp_method, self.spec.mcp_params) if self.spec.mcp_method else None
        timeout = self.spec.timeout
        more = True
        try:
            while more:
                with trio.CancelScope() as scope:
                    while (at := await turn()) is not None:
                        now = trio.current_time()
                        scope.deadline = at + timeout
                        self.started += 1
                        self.in_flight += 1
                        if turn_waits:
                            self.queue.record(max(now - at, 0.0))
                        # Open model: timings from the intended start (perf clock), so
                        # waiting for a slot counts; closed: from the send (None).
                        origin = _perf() - (now - at) if turn_waits else None
                        if user is not None:
                            kind = await self._mcp(slot, user, origin)
                        else:
                            kind = await self._request(slot, self.started, origin)
                        self._done(kind)
                        if kind in ("connect", "tls"):
                            scope.deadline = math.inf
                            await trio.sleep(CONNECT_BACKOFF)
                        if turn_waits:
                            scope.deadline = math.inf
                    more = False
                if scope.cancelled_caught:
                    more = True
                    slot.close()
                    if user is not None:
                        user.ready = False
                    self._done("timeout")
        finally:
            slot.close()

    def _done(self, kind: str | None) -> None:
        self.in_flight -= 1
        if kind is None:
            self.ok += 1
        else:
            self.error_kinds[kind] = self.error_kinds.get(kind, 0) + 1

    async def dispatch(self, arrivals: trio.MemorySendChannel[float]) -> None:
        """Open model: queue arrivals (their intended start) on schedule for the slots."""
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
                arrivals.send_nowait(at)
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

    # ------------------------------------------------------------------ one cycle

    async def _request(self, slot: Slot, n: int, origin: float | None) -> str | None:
        """A plain, ``sse`` or token-stream request; timings from ``origin``."""
        spec = self.spec
        wire = self.maker.request(n)
        if spec.stream is not None:
            tokens = TokenStream(spec.stream)
            kind, reply = await self.client.attempt(slot, wire, tokens)
            if kind is None:
                kind = self._tokens(tokens, reply, origin)
            return kind
        counter = SSECounter(self.client) if spec.sse else None
        kind, reply = await self.client.attempt(slot, wire, counter)
        if kind is None:
            self._timed(reply, origin)
            if counter is not None and counter.first >= 0:
                start = reply.sent if origin is None else origin
                self.first_event.record(counter.first - start)
        return kind

    def _timed(self, reply: Reply, origin: float | None) -> float:
        """Record ttfb and latency; return the origin used."""
        start = reply.sent if origin is None else origin
        self.ttfb.record(reply.first_byte - start)
        self.latency.record(reply.end - start)
        return start

    def _tokens(self, tokens: TokenStream, reply: Reply, origin: float | None) -> str | None:
        if tokens.failed:
            return "stream_error"
        if not tokens.terminated:
            return "incomplete"
        start = self._timed(reply, origin)
        deltas = tokens.deltas
        if deltas:
            self.ttft.record(deltas[0] - start)
            for a, b in itertools.pairwise(deltas):
                self.itl.record(b - a)
        count = tokens.tokens
        self.output_tokens += count
        if tokens.usage_tokens is not None:
            self.usage_streams += 1
        else:
            self.counted_streams += 1
        span = reply.end - start
        if span > 0:
            self.stream_tps.append(count / span)
        return None

    async def _post(
        self, slot: Slot, user: McpUser, body: bytes
    ) -> tuple[str | None, Reply, _Body]:
        kept = _Body()
        try:
            wire = self.maker.with_body(body, user.headers())
        except ValueError:  # a session id that is no header value
            user.session = None
            return "protocol", Reply(), kept
        kind, reply = await self.client.attempt(slot, wire, kept)
        if kind is None and kept.over:
            kind = "protocol"
        return kind, reply, kept

    async def _initialize(self, slot: Slot, user: McpUser) -> str | None:
        user.session = None
        user.ready = False
        self.initializations += 1
        want, body = user.initialize()
        kind, reply, kept = await self._post(slot, user, body)
        if kind is not None:
            return kind
        ok, code = read_reply(reply.head, bytes(kept.data), want)
        if not ok:
            return self._rpc_error(code)
        user.session = session_id(reply.head)
        kind, reply, _ = await self._post(slot, user, user.initialized())
        user.ready = kind is None
        return kind

    def _rpc_error(self, code: int | None) -> str:
        if code is None:
            return "protocol"
        self.rpc_errors[str(code)] = self.rpc_errors.get(str(code), 0) + 1
        return "jsonrpc"

    async def _mcp(self, slot: Slot, user: McpUser, origin: float | None) -> str | None:
        """One MCP call (initializing first if the user has no session yet; once more
        after a 404 for its session). Latency from ``origin``."""
        if not user.ready:
            kind = await self._initialize(slot, user)
            if kind is not None:
                return kind
        want, body = user.call()
        kind, reply, kept = await self._post(slot, user, body)
        if reply.status == 404 and user.session is not None:
            self.reinitializations += 1
            kind = await self._initialize(slot, user)
            if kind is not None:
                return kind
            want, body = user.call()
            kind, reply, kept = await self._post(slot, user, body)
        if kind is not None:
            return kind
        ok, code = read_reply(reply.head, bytes(kept.data), want)
        if not ok:
            return self._rpc_error(code)
        self._timed(reply, origin)
        return None

    def result(self, elapsed: float, cpu: float) -> LoadResult:
        client = self.client
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
            event_delay=client.event_delay,
            body_bytes=client.body_bytes,
            events=client.events,
            started=self.started,
            connections=client.connections,
            connect=client.connect_time,
            ttft=self.ttft,
            itl=self.itl,
            stream_tps=self.stream_tps,
            output_tokens=self.output_tokens,
            usage_streams=self.usage_streams,
            counted_streams=self.counted_streams,
            queue=self.queue,
            mcp_initializations=self.initializations,
            mcp_reinitializations=self.reinitializations,
            rpc_errors=dict(self.rpc_errors),
            cpu_seconds=cpu,
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
    cpu0 = time.process_time()
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
                send, receive = trio.open_memory_channel[float](math.inf)
                for _ in range(spec.concurrency):
                    slots.start_soon(run.open_slot, receive.clone())
                receive.close()
                slots.start_soon(run.dispatch, send)
        outer.cancel_scope.cancel()
    return run.result(_perf() - run.t_start, time.process_time() - cpu0)
