"""Active health checks over scripted connections, on trio's mock clock (no socket).

The timing (interval, jitter, thresholds, the timeout) runs on the autojump clock;
the wire (a real ``GET`` to a real server) is covered by the end-to-end tests.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import trio
import trio.testing

from proxycore.config import HealthCheck, RetryPolicy, Upstream, UpstreamSpec
from proxycore.net.pool import Origin, UpstreamConnection
from proxycore.upstreams.group import Member, UpstreamGroup
from proxycore.upstreams.health import check_once, run_health_checks
from tests.inmem.scripted import EOF, Pause, ScriptedStream, ScriptItem

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
FAIL = b"HTTP/1.1 500 Oops\r\nContent-Length: 0\r\n\r\n"


def member() -> Member:
    return Member(UpstreamSpec("a:80", Upstream("http", "a", 80, "/")))


class ScriptedUpstream:
    """A scripted upstream: each connection answers with ``self.answer`` (None: refused)."""

    def __init__(self) -> None:
        self.answer: list[ScriptItem] | None = [OK, EOF]
        self.streams: list[ScriptedStream] = []
        self.times: list[float] = []

    async def connect(self, origin: Origin) -> UpstreamConnection:
        self.times.append(trio.current_time())
        if self.answer is None:
            raise ConnectionRefusedError(111, "refused")
        stream = ScriptedStream(list(self.answer))
        self.streams.append(stream)
        return UpstreamConnection(origin, stream)


async def until(condition: Callable[[], bool]) -> None:
    """Poll ``condition`` once a (mock) second."""
    for _ in range(1000):
        if condition():
            return
        await trio.sleep(1)
    raise AssertionError("condition never held")


async def test_a_check_sends_get_path_and_reads_the_status(
    autojump_clock: trio.testing.MockClock,
) -> None:
    up = ScriptedUpstream()
    settings = HealthCheck(path="/healthz", timeout=1)
    m = member()
    assert await check_once(m, settings, up.connect)
    request = up.streams[0].written
    assert request.startswith(b"GET /healthz HTTP/1.1\r\nHost: a\r\n")
    assert b"Connection: close" in request and up.streams[0].closed
    up.answer = [b"HTTP/1.1 302 Found\r\nContent-Length: 0\r\n\r\n"]
    assert await check_once(m, settings, up.connect)
    answers: list[list[ScriptItem] | None] = [
        [FAIL],
        [b"garbage\r\n\r\n"],
        [EOF],
        [Pause(5), OK],
        None,
    ]
    for answer in answers:
        up.answer = answer
        assert not await check_once(m, settings, up.connect), answer


async def test_thresholds_mark_down_then_up_on_the_interval(
    autojump_clock: trio.testing.MockClock,
) -> None:
    up = ScriptedUpstream()
    settings = HealthCheck(interval=10, timeout=1, healthy_threshold=2, unhealthy_threshold=3)
    group = UpstreamGroup(
        "/v1/", [UpstreamSpec("a:80", Upstream("http", "a", 80, "/"))], retry=RetryPolicy()
    )
    m = group.members[0]
    async with trio.open_nursery() as nursery:
        await nursery.start(
            lambda task_status=trio.TASK_STATUS_IGNORED: run_health_checks(
                [(group, settings)],
                connect=up.connect,
                rng=random.Random(3),
                task_status=task_status,
            )
        )
        await trio.sleep(25)
        assert m.healthy and len(up.times) >= 2
        up.answer = [FAIL]
        down_from = trio.current_time()
        await until(lambda: not m.healthy)
        # three failed checks in a row, each ~10 s apart (+/- 10 % jitter)
        assert 18 <= trio.current_time() - down_from <= 36
        up.answer = [OK]
        up_from = trio.current_time()
        await until(lambda: m.healthy)
        assert 9 <= trio.current_time() - up_from <= 24  # two successes
        gaps = [b - a for a, b in zip(up.times, up.times[1:], strict=False)]
        assert all(8.9 <= gap <= 11.2 for gap in gaps)  # interval +/- 10 % (+ the check)
        nursery.cancel_scope.cancel()


async def test_first_checks_are_spread_over_the_interval(
    autojump_clock: trio.testing.MockClock,
) -> None:
    up = ScriptedUpstream()
    specs = [UpstreamSpec(f"u{i}:80", Upstream("http", f"u{i}", 80, "/")) for i in range(20)]
    group = UpstreamGroup("/v1/", specs, retry=RetryPolicy())
    settings = HealthCheck(interval=10, timeout=1)
    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            lambda: run_health_checks([(group, settings)], connect=up.connect, rng=random.Random(5))
        )
        await trio.sleep(10)
        nursery.cancel_scope.cancel()
    first = sorted(t - start for t in up.times)[:20]
    assert len(first) == 20 and max(first) - min(first) > 5  # not all at once
