"""Two ``proxycore serve`` processes sharing one real Redis (``[state]``): the rate limit and
the concurrent-stream limit hold across both, and a killed replica's stream leases are freed
within the lease time.

The route's upstream for rate tests is a closed port: an admitted request is a 502, a refused
one a 429, so admission is counted without an upstream.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Final

import trio

from tests.apps import make_silent_stream_app
from tests.helpers import http_request, read_until, start_app
from tests.redis.support import Proxy, RedisServer, free_port, run_proxy, write_config

RATE: Final = 1.0
BURST: Final = 10
#: Tokens the shared bucket may give beyond ``BURST + RATE * elapsed``: none in theory; one
#: for the rounding of the microsecond clock at a refill boundary.
TOLERANCE: Final = 1


async def two_proxies(
    tmp_path: Path,
    redis: RedisServer,
    rate: str,
    upstream: str = "http://127.0.0.1:9/",
    state: str = "",
) -> tuple[Path, Path]:
    configs = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        config = tmp_path / name / "proxy.toml"
        write_config(
            config, redis.url, admin=free_port(), rate=rate, upstream=upstream, state=state
        )
        configs.append(config)
    return configs[0], configs[1]


def admin_of(config: Path) -> int:
    text = config.read_text(encoding="utf-8")
    return int(text.split('[admin]\nlisten = "127.0.0.1:')[1].split('"')[0])


async def status(proxy: Proxy, target: str = "/app/x") -> int:
    code, _, _ = await http_request("127.0.0.1", proxy.port, "GET", target)
    return code


async def test_two_replicas_together_admit_the_configured_rate(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    rate = f"{{ requests_per_second = {RATE}, burst = {BURST} }}"
    a_conf, b_conf = await two_proxies(tmp_path, redis_server, rate)
    with trio.fail_after(30):
        async with (
            run_proxy(a_conf, tmp_path / "a.log", admin_of(a_conf)) as a,
            run_proxy(b_conf, tmp_path / "b.log", admin_of(b_conf)) as b,
        ):
            started = time.monotonic()
            admitted = {a.port: 0, b.port: 0}
            for i in range(4 * BURST):
                proxy = (a, b)[i % 2]
                code = await status(proxy)
                assert code in (429, 502), code
                admitted[proxy.port] += code == 502
            elapsed = time.monotonic() - started
    total = sum(admitted.values())
    # Per-process buckets would admit BURST on each replica (2 * BURST at least).
    assert BURST <= total <= BURST + math.ceil(RATE * elapsed) + TOLERANCE, (total, elapsed)
    assert all(admitted.values()), admitted  # both replicas admitted from the one bucket
    assert "proxycore:rl:/app/:" in redis_server.command("KEYS", "proxycore:rl:*")


async def open_stream(proxy: Proxy) -> trio.SocketStream | int:
    """A streaming GET held open (the upstream sends its first bytes, then waits): the open
    connection, or the status when it was refused."""
    stream = await trio.open_tcp_stream("127.0.0.1", proxy.port)
    await stream.send_all(b"GET /app/s HTTP/1.1\r\nHost: t\r\n\r\n")
    data = await read_until(stream, b"\r\n\r\n")
    code = int(data.split(b" ", 2)[1])
    if code != 200:
        await stream.aclose()
        return code
    if b"first" not in data:
        await read_until(stream, b"first")
    return stream


async def admitted_within(proxy: Proxy, seconds: float) -> trio.SocketStream:
    """Poll until a stream is admitted (bounded by ``seconds``)."""
    with trio.fail_after(seconds):
        while True:
            got = await open_stream(proxy)
            if not isinstance(got, int):
                return got
            assert got == 429, got
            await trio.sleep(0.05)


async def test_concurrency_limit_holds_across_replicas_and_a_killed_one_releases(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    lease = 1.0
    rate = "{ requests_per_second = 1000, burst = 1000, max_concurrent_streams = 2 }"
    with trio.fail_after(40):
        async with trio.open_nursery() as nursery:
            host, port = await start_app(nursery, make_silent_stream_app(b"first", 60, b"end"))
            a_conf, b_conf = await two_proxies(
                tmp_path, redis_server, rate, f"http://{host}:{port}/", f"lease = {lease}"
            )
            async with (
                run_proxy(a_conf, tmp_path / "a.log", admin_of(a_conf)) as a,
                run_proxy(b_conf, tmp_path / "b.log", admin_of(b_conf)) as b,
            ):
                first = await open_stream(a)
                second = await open_stream(b)
                assert not isinstance(first, int) and not isinstance(second, int)
                # The key holds two streams, one on each replica: both refuse a third.
                assert await open_stream(a) == 429
                assert await open_stream(b) == 429
                # A stream that ends frees its slot at once (released, not expired).
                await first.aclose()
                third = await admitted_within(b, lease / 2 + 2)
                assert await open_stream(a) == 429
                # SIGKILL the replica holding "second": nothing releases it, the lease expires.
                b.kill()
                await second.aclose()
                await third.aclose()
                fourth = await admitted_within(a, lease + 2)
                fifth = await admitted_within(a, lease + 2)
                assert await open_stream(a) == 429  # back to the limit, all on A
                await fourth.aclose()
                await fifth.aclose()
            nursery.cancel_scope.cancel()
