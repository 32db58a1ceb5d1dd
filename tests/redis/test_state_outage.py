"""Redis stopped under two running replicas, then started again: ``on_unavailable = "local"``
falls back to per-process limits (one log line each way, the ``proxycore_state_backend_up``
gauge, an open stream is not cut) and shares again once Redis is back; ``"closed"`` refuses
with a JSON 503 naming the request id, and admits again once Redis is back.

The route's upstream for the rate checks is a closed port: admitted is 502, refused 429.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Final

import trio

from tests.apps import make_silent_stream_app
from tests.helpers import http_request, read_until, start_app
from tests.redis.support import (
    Proxy,
    RedisServer,
    eventually,
    free_port,
    metric,
    run_proxy,
    write_config,
)

DOWN: Final = "shared state backend unavailable"
UP: Final = "shared state backend is up"
BURST: Final = 4
#: Practically no refill during a test: only the burst counts.
RATE: Final = f"{{ requests_per_second = 0.001, burst = {BURST}, max_concurrent_streams = 5 }}"


def configs(tmp_path: Path, redis: RedisServer, mode: str, upstream: str) -> list[Path]:
    out = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        config = tmp_path / name / "proxy.toml"
        write_config(
            config,
            redis.url,
            admin=free_port(),
            rate=RATE,
            upstream=upstream,
            state=f'on_unavailable = "{mode}"\nreconnect_max = 0.2',
        )
        out.append(config)
    return out


def admin_of(config: Path) -> int:
    return int(config.read_text(encoding="utf-8").split("127.0.0.1:")[2].split('"')[0])


async def get(proxy: Proxy, target: str = "/app/x") -> tuple[int, dict[bytes, bytes], bytes]:
    status, head, body = await http_request("127.0.0.1", proxy.port, "GET", target)
    return status, dict(head), body


async def gauge_becomes(proxies: tuple[Proxy, Proxy], value: float) -> None:
    for proxy in proxies:

        async def reached(proxy: Proxy = proxy) -> bool:
            return await metric(proxy, "proxycore_state_backend_up") == value

        await eventually(reached, 10)


def count(proxy: Proxy, text: str) -> int:
    return proxy.log.read_text(encoding="utf-8").count(text)


async def admitted(proxies: tuple[Proxy, Proxy], requests: int) -> int:
    total = 0
    for i in range(requests):
        status, _, _ = await get(proxies[i % 2])
        assert status in (429, 502), status
        total += status == 502
    return total


async def test_local_mode_falls_back_and_shares_again_when_redis_returns(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    with trio.fail_after(50):
        async with trio.open_nursery() as nursery:
            host, port = await start_app(nursery, make_silent_stream_app(b"first", 1.5, b"end"))
            a_conf, b_conf = configs(tmp_path, redis_server, "local", "http://127.0.0.1:9/")
            (tmp_path / "s").mkdir()
            s_conf = tmp_path / "s" / "proxy.toml"
            write_config(
                s_conf,
                redis_server.url,
                admin=free_port(),
                rate=RATE,
                upstream=f"http://{host}:{port}/",
                state='reconnect_max = 0.2\nkey_prefix = "s:"',  # a bucket of its own
            )
            async with (
                run_proxy(a_conf, tmp_path / "a.log", admin_of(a_conf)) as a,
                run_proxy(b_conf, tmp_path / "b.log", admin_of(b_conf)) as b,
                run_proxy(s_conf, tmp_path / "s.log", admin_of(s_conf)) as s,
            ):
                both = (a, b)
                await gauge_becomes(both, 1)
                assert await admitted(both, 3 * BURST) == BURST  # one shared bucket
                # A stream through s is open when Redis goes away: it is not cut.
                stream = await trio.open_tcp_stream("127.0.0.1", s.port)
                await stream.send_all(b"GET /app/s HTTP/1.1\r\nHost: t\r\n\r\n")
                head = await read_until(stream, b"first")
                assert head.startswith(b"HTTP/1.1 200")

                redis_server.stop()
                # Per-process buckets (full: they were not used) admit, nothing is 503.
                assert await admitted(both, 2) == 2
                await gauge_becomes(both, 0)
                rest = await read_until(stream, b"0\r\n\r\n")
                assert b"end" in rest
                await stream.aclose()
                for proxy in both:
                    assert count(proxy, DOWN) == 1
                    assert "using per-process state meanwhile" in proxy.log.read_text()

                redis_server.start()  # back, and empty
                await gauge_becomes(both, 1)
                # Shared again: one fresh bucket for both (the local ones still hold
                # 2 * (BURST - 1) tokens, more than BURST).
                assert await admitted(both, 3 * BURST) == BURST
                for proxy in both:
                    assert count(proxy, DOWN) == 1
                    assert count(proxy, UP) == 2  # at start, and when it came back
            nursery.cancel_scope.cancel()


async def test_closed_mode_refuses_with_503_and_admits_again_when_redis_returns(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    a_conf, b_conf = configs(tmp_path, redis_server, "closed", "http://127.0.0.1:9/")
    with trio.fail_after(40):
        async with (
            run_proxy(a_conf, tmp_path / "a.log", admin_of(a_conf)) as a,
            run_proxy(b_conf, tmp_path / "b.log", admin_of(b_conf)) as b,
        ):
            both = (a, b)
            await gauge_becomes(both, 1)
            for proxy in both:
                assert (await get(proxy))[0] == 502
            redis_server.stop()
            for proxy in both:
                with trio.fail_after(10):
                    while (answer := await get(proxy))[0] != 503:
                        assert answer[0] == 502
                        await trio.sleep(0.05)
                _, head, body = answer
                error = json.loads(body)["error"]
                assert error["type"] == "state_unavailable"
                assert error["request_id"] == head[b"x-request-id"].decode()
                assert str(redis_server.port) not in body.decode()
                assert count(proxy, "refusing requests that need it (503)") == 1
            redis_server.start()
            await gauge_becomes(both, 1)
            for proxy in both:
                assert (await get(proxy))[0] == 502


async def test_a_frozen_redis_holds_no_request_longer_than_the_timeout(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """SIGSTOP: connections stay open, nothing answers. The client's own socket timeout is
    ten times ``[state] timeout`` (3 s here): the request is answered by the 0.3 s cancel
    scope, long before it (the 2 s bound is a hang detector, not a speed check)."""
    (tmp_path / "a").mkdir()
    config = tmp_path / "a" / "proxy.toml"
    write_config(
        config,
        redis_server.url,
        admin=free_port(),
        rate=RATE,
        timeout=0.3,
        state='on_unavailable = "closed"\nreconnect_max = 0.2',
    )
    assert redis_server.process is not None
    with trio.fail_after(30):
        async with run_proxy(config, tmp_path / "a.log", admin_of(config)) as proxy:
            await gauge_becomes((proxy, proxy), 1)
            assert (await get(proxy))[0] == 502
            redis_server.process.send_signal(signal.SIGSTOP)
            try:
                with trio.fail_after(2):
                    assert (await get(proxy))[0] == 503
            finally:
                redis_server.process.send_signal(signal.SIGCONT)
            await gauge_becomes((proxy, proxy), 1)
            assert (await get(proxy))[0] == 502


async def test_the_redis_password_never_reaches_the_log(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """This Redis has no password: AUTH fails, the backend is reported unavailable, and the
    log line names the server with ``***`` in place of the credentials."""
    (tmp_path / "a").mkdir()
    config = tmp_path / "a" / "proxy.toml"
    url = f"redis://user:pa55-s3cret@127.0.0.1:{redis_server.port}/0"
    write_config(config, url, admin=free_port(), rate=RATE, state='on_unavailable = "closed"')
    with trio.fail_after(20):
        async with run_proxy(config, tmp_path / "a.log", admin_of(config)) as proxy:
            status, _, body = await get(proxy)
            assert status == 503 and b"pa55" not in body
            text = proxy.log.read_text(encoding="utf-8")
            assert DOWN in text and "redis://***@127.0.0.1" in text
            assert "pa55-s3cret" not in text
