"""Upstream groups: active health checks over real sockets, backups, and reloads that
change a group (issue 14).

Health checks run every 0.1 s against :class:`~tests.e2e.groups_support.Upstream`,
whose ``/healthz`` status the test flips; every wait for a state change polls
``/readyz`` (or the traffic) with a bounded deadline.
"""

from __future__ import annotations

from typing import Final

import trio
import trio.testing

from proxycore.config import HealthCheck, UpstreamEntry
from tests.apps import sse_event
from tests.e2e.groups_support import (
    Client,
    Upstream,
    entry,
    eventually,
    group_config,
    group_route,
    readyz,
    run_proxy,
    scrape_admin,
    tally,
    upstream_value,
)
from tests.e2e.test_groups_balance import held_stream_upstream
from tests.e2e.test_lifecycle import RunningProxy, reserved_port
from tests.e2e.test_streaming import open_client

FAST: Final = HealthCheck(interval=0.1, timeout=1.0, healthy_threshold=2, unhealthy_threshold=2)


async def wait_state(proxy: RunningProxy, name: str, state: str) -> None:
    async def reached() -> bool:
        return (await readyz(proxy)).get(name) == state

    await eventually(reached)


async def test_health_checks_mark_an_upstream_down_and_up_again() -> None:
    a, b = Upstream("a"), Upstream("b")
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await a.start(nursery)
            await b.start(nursery)
            route = group_route([entry(a, name="a"), entry(b, name="b")], health_check=FAST)
            proxy = await run_proxy(nursery, group_config([route]))

            async def checked() -> bool:
                return a.health_hits >= 2 and b.health_hits >= 2

            await eventually(checked)  # started by Server.run
            assert await readyz(proxy) == {"a": "up", "b": "up"}

            a.health_status = 500
            await wait_state(proxy, "a", "down")
            samples = await scrape_admin(proxy)
            assert upstream_value(samples, "proxycore_upstream_healthy", route.name, "a") == 0
            assert upstream_value(samples, "proxycore_upstream_healthy", route.name, "b") == 1
            assert (await tally(proxy, 6)).counts() == {"b": 6}  # a is out
            assert (await readyz(proxy))["b"] == "up"

            a.health_status = 200
            await wait_state(proxy, "a", "up")
            assert (await tally(proxy, 6)).counts() == {"a": 3, "b": 3}
            samples = await scrape_admin(proxy)
            assert upstream_value(samples, "proxycore_upstream_healthy", route.name, "a") == 1
            nursery.cancel_scope.cancel()


async def test_backup_is_used_only_when_every_primary_is_out() -> None:
    a, b, c = Upstream("a"), Upstream("b"), Upstream("c")
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            for up in (a, b, c):
                await up.start(nursery)
            route = group_route(
                [entry(a, name="a"), entry(b, name="b"), entry(c, name="c", backup=True)],
                health_check=FAST,
            )
            proxy = await run_proxy(nursery, group_config([route]))
            assert (await tally(proxy, 10)).counts() == {"a": 5, "b": 5}

            a.health_status = 500
            await wait_state(proxy, "a", "down")
            assert (await tally(proxy, 4)).counts() == {"b": 4}  # one primary left: no backup

            b.health_status = 500
            await wait_state(proxy, "b", "down")
            assert (await tally(proxy, 4)).counts() == {"c": 4}  # every primary out

            a.health_status = 200
            await wait_state(proxy, "a", "up")
            assert (await tally(proxy, 4)).counts() == {"a": 4}
            assert c.count() == 4
            nursery.cancel_scope.cancel()


async def test_reload_without_health_checks_does_not_keep_an_upstream_down() -> None:
    a, b = Upstream("a"), Upstream("b")
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await a.start(nursery)
            await b.start(nursery)
            entries = [entry(a, name="a"), entry(b, name="b")]
            proxy = await run_proxy(
                nursery, group_config([group_route(entries, health_check=FAST)])
            )
            a.health_status = 500
            await wait_state(proxy, "a", "down")
            assert proxy.server.reload(group_config([group_route(entries)]))
            # No health check says so any more: a is up as far as the proxy can tell.
            assert await readyz(proxy) == {"a": "up", "b": "up"}
            nursery.cancel_scope.cancel()


async def test_reload_restarts_health_checks_with_the_new_settings() -> None:
    a, b = Upstream("a"), Upstream("b")
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await a.start(nursery)
            await b.start(nursery)
            entries = [entry(a, name="a"), entry(b, name="b")]
            proxy = await run_proxy(nursery, group_config([group_route(entries)]))
            a.health_status = 500
            assert await readyz(proxy) == {"a": "up", "b": "up"}  # no checks configured
            assert a.health_hits == 0
            assert proxy.server.reload(group_config([group_route(entries, health_check=FAST)]))
            await wait_state(proxy, "a", "down")
            assert (await readyz(proxy))["b"] == "up"
            nursery.cancel_scope.cancel()


async def test_reload_removing_an_upstream_lets_its_open_stream_finish() -> None:
    release = trio.Event()
    a, b = held_stream_upstream("a", release), held_stream_upstream("b", release)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await a.start(nursery)
            await b.start(nursery)
            both = group_route([entry(a, name="a"), entry(b, name="b")])
            proxy = await run_proxy(nursery, group_config([both]))
            async with open_client(proxy.host, proxy.port) as client:
                await client.request(b"GET", b"/hold")
                assert (await client.head()).status_code == 200
                await client.body_at_least(len(sse_event(0)))
                holder, other = (a, b) if a.count(b"/hold") else (b, a)
                assert holder.count(b"/hold") == 1

                # The upstream holding the stream leaves the group.
                only = group_route([entry(other, name=other.name)])
                assert proxy.server.reload(group_config([only]))
                assert (await tally(proxy, 4)).counts() == {other.name: 4}
                assert (await readyz(proxy)) == {}  # a group of one: no detail lines

                release.set()
                assert await client.read_to_end(), "the reload cut the stream"
                assert bytes(client.body) == sse_event(0) + sse_event(1)
            nursery.cancel_scope.cancel()


async def test_reload_applies_to_the_next_request_on_an_idle_keep_alive_connection() -> None:
    a, b, c = Upstream("a"), Upstream("b"), Upstream("c")
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            for up in (a, b, c):
                await up.start(nursery)
            old = group_route([entry(a, name="a"), entry(b, name="b")])
            proxy = await run_proxy(nursery, group_config([old]))
            async with await Client.open(proxy) as client:
                assert (await client.request(b"GET", b"/before"))[0] == 200
                await trio.testing.wait_all_tasks_blocked()  # the connection waits for a head
                assert proxy.server.reload(group_config([group_route([entry(c, name="c")])]))
                status, _, body = await client.request(b"GET", b"/after")
                # a and b left the group before this request started.
                assert (status, body) == (200, b"c")
            nursery.cancel_scope.cancel()


async def test_health_checks_send_get_path_and_mark_a_refused_upstream_down() -> None:
    a = Upstream("a")
    dead = reserved_port()
    with dead, trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await a.start(nursery)
            dead_url = f"http://127.0.0.1:{dead.getsockname()[1]}/"
            route = group_route(
                [entry(a, name="a"), UpstreamEntry(url=dead_url, name="dead")], health_check=FAST
            )
            proxy = await run_proxy(nursery, group_config([route]))
            await wait_state(proxy, "dead", "down")
            # Found by the checks, not by traffic: no request ever tried it.
            assert (await tally(proxy, 6)).counts() == {"a": 6}
            samples = await scrape_admin(proxy)
            failures = "proxycore_upstream_failures_total"
            assert upstream_value(samples, failures, route.name, "dead") == 0
            check = a.last_health
            assert check is not None
            assert (check.method, check.target) == (b"GET", b"/healthz")
            assert check.header(b"host") == a.netloc.encode()
            assert check.header(b"user-agent") == b"proxycore-health-check"
            nursery.cancel_scope.cancel()
