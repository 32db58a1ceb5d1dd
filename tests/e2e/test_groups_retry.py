"""Upstream groups: retries on another upstream, their limits, passive ejection,
``Retry-After`` and the access log's attempts (issue 14).

Real sockets on 127.0.0.1. Most tests use two upstreams sharing a "first hit" rule:
whichever upstream sees a target first fails it (a 503, a reset, a cut), the other one
answers it. So the test does not depend on which upstream the balancer picks first:
a retried request is answered by the second upstream, a request that must not be
retried reaches exactly one.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from typing import Final

import h11
import pytest
import trio

from proxycore.config import Inject, Outlier, RetryPolicy, UpstreamEntry
from tests.e2e.groups_support import (
    Client,
    Reply,
    Req,
    Upstream,
    entry,
    eventually,
    group_config,
    group_route,
    readyz,
    reset,
    run_proxy,
    scrape_admin,
    tally,
    upstream_value,
)
from tests.e2e.test_bodies_security import AccessLog
from tests.e2e.test_lifecycle import reserved_port
from tests.e2e.test_streaming import chunk, open_client

RETRY_503: Final = RetryPolicy(attempts=2, on=("503",), budget_percent=100)


@pytest.fixture
def access_log() -> Iterator[AccessLog]:
    """The ``proxycore.access`` lines (a handler of our own: the ordinary logging path)."""
    logger = logging.getLogger("proxycore.access")
    handler, level = AccessLog(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


def digest(body: bytes) -> bytes:
    return hashlib.sha256(body).hexdigest().encode()


class FirstHit:
    """Two upstreams; the first to see a target fails it with ``fail``, the other answers
    ``200 <name>:<sha256 of the body>``."""

    def __init__(self, fail: str = "503") -> None:
        self.seen: set[bytes] = set()
        self.fail = fail
        self.a = Upstream("a", self.handle)
        self.b = Upstream("b", self.handle)

    async def handle(self, up: Upstream, req: Req, stream: trio.SocketStream) -> Reply | None:
        if req.target not in self.seen:
            self.seen.add(req.target)
            if self.fail == "503":
                return 503, [], b"overloaded"
            if self.fail == "reset":  # closed before any response byte
                reset(stream)
                return None
            if self.fail == "cut":  # a 200 head and part of the body, then a reset
                await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
                reset(stream)
                return None
            if self.fail == "silent":  # never answers (until the proxy closes)
                while await stream.receive_some(4096):
                    pass
                return None
        return 200, [], up.name.encode() + b":" + digest(req.body)

    async def start(self, nursery: trio.Nursery) -> None:
        await self.a.start(nursery)
        await self.b.start(nursery)

    def hits(self, target: bytes) -> int:
        return self.a.count(target) + self.b.count(target)

    def bodies(self, target: bytes) -> list[bytes]:
        return [r.body for up in (self.a, self.b) for r in up.requests if r.target == target]

    def first_name(self, target: bytes) -> str:
        """The upstream that saw ``target`` first (by arrival)."""
        reqs = [r for up in (self.a, self.b) for r in up.requests if r.target == target]
        return min(reqs, key=lambda r: r.at).upstream


# --------------------------------------------------------------------------- connect errors


@pytest.fixture
def dead() -> Iterator[str]:
    """The URL of a port bound but never listening: connecting to it is refused."""
    sock = reserved_port()
    with sock:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/"


async def good_upstream(nursery: trio.Nursery) -> Upstream:
    good = Upstream("good")
    await good.start(nursery)
    return good


async def test_connect_refused_upstream_every_request_200_with_defaults(dead: str) -> None:
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            good = await good_upstream(nursery)
            route = group_route([entry(good, name="good"), dead_entry(dead)])
            proxy = await run_proxy(nursery, group_config([route]))
            async with await Client.open(proxy) as client:
                statuses = [(await client.request(b"GET", b"/x"))[0] for _ in range(12)]
            assert statuses == [200] * 12
            nursery.cancel_scope.cancel()


def dead_entry(url: str) -> UpstreamEntry:
    return UpstreamEntry(url=url, name="dead")


async def test_connect_refused_upstream_is_retried_then_ejected(dead: str) -> None:
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            good = await good_upstream(nursery)
            # budget 100 %: the 5 connect errors before the ejection all fit the budget.
            route = group_route(
                [entry(good, name="good"), dead_entry(dead)],
                retry=RetryPolicy(attempts=2, budget_percent=100),
            )
            proxy = await run_proxy(nursery, group_config([route]))
            async with await Client.open(proxy) as client:
                statuses = [(await client.request(b"GET", b"/x"))[0] for _ in range(20)]
                assert statuses == [200] * 20  # the dead one is never the client's problem
                samples = await scrape_admin(proxy)
                name = route.name
                assert (
                    upstream_value(samples, "proxycore_upstream_ejections_total", name, "dead") == 1
                )
                failures = upstream_value(
                    samples, "proxycore_upstream_failures_total", name, "dead"
                )
                assert failures == 5  # consecutive_failures (default 5), then ejected
                assert (await readyz(proxy)) == {"good": "up", "dead": "ejected"}
                # Ejected (30 s): no more tries on it.
                for _ in range(10):
                    assert (await client.request(b"GET", b"/y"))[0] == 200
                after = await scrape_admin(proxy)
                assert upstream_value(after, "proxycore_upstream_requests_total", name, "dead") == 5
                assert good.count(b"/y") == 10
            nursery.cancel_scope.cancel()


# --------------------------------------------------------------------------- statuses


async def test_503_on_get_is_retried_on_another_upstream() -> None:
    pair = FirstHit("503")
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await pair.start(nursery)
            route = group_route([entry(pair.a, name="a"), entry(pair.b, name="b")], retry=RETRY_503)
            proxy = await run_proxy(nursery, group_config([route]))
            async with await Client.open(proxy) as client:
                for i in range(4):
                    target = b"/get-%d" % i
                    status, _, body = await client.request(b"GET", target)
                    assert status == 200, body
                    first = pair.first_name(target)
                    assert body.split(b":")[0].decode() != first  # the other upstream answered
                    assert (pair.a.count(target), pair.b.count(target)) == (1, 1)
            samples = await scrape_admin(proxy)
            retries = sum(
                upstream_value(samples, "proxycore_upstream_retries_total", route.name, n)
                for n in "ab"
            )
            assert retries == 4
            nursery.cancel_scope.cancel()


async def test_503_on_post_with_streamed_chunked_body_is_not_retried() -> None:
    pair = FirstHit("503")
    parts = [b"x" * 1000, b"y" * 1000, b"z" * 1000]
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await pair.start(nursery)
            route = group_route([entry(pair.a), entry(pair.b)], retry=RETRY_503)
            proxy = await run_proxy(nursery, group_config([route]))
            async with open_client(proxy.host, proxy.port) as client:
                head = (
                    b"POST /chunked HTTP/1.1\r\nHost: proxy\r\n"
                    b"Transfer-Encoding: chunked\r\n\r\n" + chunk(parts[0])
                )
                await client.stream.send_all(head)

                async def arrived() -> bool:
                    return pair.hits(b"/chunked") == 1

                # The body is still coming when the request goes upstream: not in hand.
                await eventually(arrived)
                await client.stream.send_all(chunk(parts[1]) + chunk(parts[2]) + b"0\r\n\r\n")
                client.h11.send(
                    h11.Request(
                        method=b"POST",
                        target=b"/chunked",
                        headers=[(b"host", b"proxy"), (b"transfer-encoding", b"chunked")],
                    )
                )
                client.h11.send(h11.EndOfMessage())
                response = await client.head()
                assert response.status_code == 503
                assert await client.read_to_end()
            assert pair.hits(b"/chunked") == 1
            assert pair.bodies(b"/chunked") == [b"".join(parts)]
            nursery.cancel_scope.cancel()


async def test_503_on_post_above_max_retry_body_bytes_is_not_retried() -> None:
    pair = FirstHit("503")
    big = bytes(range(256)) * 400  # 102,400 bytes > 65,536 (the default limit)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await pair.start(nursery)
            route = group_route([entry(pair.a), entry(pair.b)], retry=RETRY_503)
            assert route.max_retry_body_bytes == 65536
            proxy = await run_proxy(nursery, group_config([route]))
            async with await Client.open(proxy) as client:
                status, _, _ = await client.request(b"POST", b"/big", body=big)
                assert status == 503
                assert pair.hits(b"/big") == 1
                assert pair.bodies(b"/big") == [big]
                # Just within the limit: read whole first, so it is retried.
                within = big[:65536]
                status, _, body = await client.request(b"POST", b"/within", body=within)
                assert status == 200
                assert body.endswith(b":" + digest(within))
                assert pair.bodies(b"/within") == [within, within]
            nursery.cancel_scope.cancel()


async def test_small_post_is_retried_with_its_body_replayed_intact() -> None:
    pair = FirstHit("503")
    body = bytes(range(256)) * 8  # 2,048 bytes
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await pair.start(nursery)
            route = group_route([entry(pair.a), entry(pair.b)], retry=RETRY_503)
            proxy = await run_proxy(nursery, group_config([route]))
            async with open_client(proxy.host, proxy.port) as client:
                # The head and the start of the body first, the rest in a later write.
                head = b"POST /small HTTP/1.1\r\nHost: proxy\r\nContent-Length: %d\r\n\r\n" % len(
                    body
                )
                await client.stream.send_all(head + body[:100])
                await client.stream.send_all(body[100:])
                client.h11.send(
                    h11.Request(
                        method=b"POST",
                        target=b"/small",
                        headers=[(b"host", b"proxy"), (b"content-length", b"%d" % len(body))],
                    )
                )
                client.h11.send(h11.Data(data=body))
                client.h11.send(h11.EndOfMessage())
                response = await client.head()
                assert response.status_code == 200
                assert await client.read_to_end()
                assert bytes(client.body).endswith(b":" + digest(body))
            assert pair.bodies(b"/small") == [body, body]
            nursery.cancel_scope.cancel()


# --------------------------------------------------------------------------- resets, cuts


async def test_no_retry_once_a_byte_reached_the_client() -> None:
    pair = FirstHit("cut")
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await pair.start(nursery)
            route = group_route(
                [entry(pair.a), entry(pair.b)],
                retry=RetryPolicy(attempts=2, on=("reset", "502", "503")),
            )
            proxy = await run_proxy(nursery, group_config([route]))
            async with open_client(proxy.host, proxy.port) as client:
                await client.request(b"GET", b"/cut")
                assert (await client.head()).status_code == 200
                assert not await client.read_to_end()  # a cut, not a clean end
                assert bytes(client.body) == b"0123456789"
            assert pair.hits(b"/cut") == 1  # no second upstream contacted
            nursery.cancel_scope.cancel()


async def test_reset_before_any_byte_is_retried_for_get_not_for_post() -> None:
    pair = FirstHit("reset")
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await pair.start(nursery)
            route = group_route(
                [entry(pair.a), entry(pair.b)], retry=RetryPolicy(attempts=2, on=("reset",))
            )
            proxy = await run_proxy(nursery, group_config([route]))
            async with await Client.open(proxy) as client:
                status, _, body = await client.request(b"GET", b"/r")
                assert status == 200, body
                assert pair.hits(b"/r") == 2
            async with await Client.open(proxy) as client:
                # A POST may have been acted on before the reset: not retried.
                status, _, _ = await client.request(b"POST", b"/p", body=b"once")
                assert status == 502
                assert pair.hits(b"/p") == 1
            nursery.cancel_scope.cancel()


async def test_per_try_timeout_moves_a_get_to_another_upstream() -> None:
    pair = FirstHit("silent")
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await pair.start(nursery)
            route = group_route(
                [entry(pair.a), entry(pair.b)],
                retry=RetryPolicy(attempts=2, on=("timeout",), per_try_timeout=1.0),
            )
            proxy = await run_proxy(nursery, group_config([route]))
            async with await Client.open(proxy) as client:
                status, _, body = await client.request(b"GET", b"/t")
                assert status == 200, body
                assert pair.hits(b"/t") == 2
            nursery.cancel_scope.cancel()


# --------------------------------------------------------------------------- budget


async def test_retry_budget_caps_retries_when_every_upstream_fails() -> None:
    async def always_503(up: Upstream, req: Req, stream: trio.SocketStream) -> Reply | None:
        return 503, [], b"no"

    a, b = Upstream("a", always_503), Upstream("b", always_503)
    n = 40
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await a.start(nursery)
            await b.start(nursery)
            policy = RetryPolicy(attempts=2, on=("503",), budget_percent=20)
            route = group_route([entry(a, name="a"), entry(b, name="b")], retry=policy)
            proxy = await run_proxy(nursery, group_config([route]))
            async with await Client.open(proxy) as client:
                for _ in range(n):
                    assert (await client.request(b"GET", b"/x"))[0] == 503
            retries = a.count() + b.count() - n
            # Envoy-style budget: at most max(3, 20 % of the requests) in the window
            # (the test runs in well under the 10 s window). Without it: 40 retries.
            assert 3 <= retries <= max(3, 0.2 * n), retries
            samples = await scrape_admin(proxy)
            counted = sum(
                upstream_value(samples, "proxycore_upstream_retries_total", route.name, x)
                for x in "ab"
            )
            assert counted == retries
            nursery.cancel_scope.cancel()


# --------------------------------------------------------------------------- Retry-After


async def test_retry_after_on_429_marks_the_upstream_busy_until_it_passes() -> None:
    sent_429: list[float] = []

    async def limited(up: Upstream, req: Req, stream: trio.SocketStream) -> Reply | None:
        if not sent_429:
            sent_429.append(trio.current_time())
            return 429, [(b"retry-after", b"2")], b"slow down"
        return 200, [], up.name.encode()

    a, b = Upstream("a", limited), Upstream("b")
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await a.start(nursery)
            await b.start(nursery)
            route = group_route(
                [entry(a, name="a"), entry(b, name="b")],
                balance="round_robin",
                retry=RetryPolicy(attempts=2, on=("429",)),
            )
            proxy = await run_proxy(nursery, group_config([route]))
            async with await Client.open(proxy) as client:
                # Round robin starts with a: its 429 is retried on b.
                status, _, body = await client.request(b"GET", b"/first")
                assert (status, body) == (200, b"b")
                assert len(sent_429) == 1
                states = await readyz(proxy)
                if trio.current_time() < sent_429[0] + 2:
                    assert states["a"] == "busy"
                # Round robin alone would alternate; a is left alone until Retry-After passes.
                answered: list[tuple[float, bytes]] = []

                async def a_again() -> bool:
                    _, _, body = await client.request(b"GET", b"/next")
                    answered.append((trio.current_time(), body))
                    return a.count(b"/next") > 0

                await eventually(a_again, within=10, step=0.05)
                back = next(r for r in a.requests if r.target == b"/next")
                assert back.at >= sent_429[0] + 2.0
                busy = [body for t, body in answered if t < sent_429[0] + 2.0]
                assert set(busy) <= {b"b"}
                if answered[0][0] < sent_429[0] + 2.0:  # (always, unless the core stalled 2 s)
                    assert busy
            nursery.cancel_scope.cancel()


# --------------------------------------------------------------------------- access log


async def test_access_log_records_every_attempt(access_log: AccessLog, dead: str) -> None:
    pair = FirstHit("503")
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await pair.start(nursery)
            good = Upstream("good")
            await good.start(nursery)
            route = group_route([entry(pair.a, name="a"), entry(pair.b, name="b")], retry=RETRY_503)
            dead_route = group_route(
                [dead_entry(dead), entry(good)],
                prefix="/c/",
                balance="round_robin",  # starts with the first entry: the dead one
            )
            proxy = await run_proxy(nursery, group_config([dead_route, route]))
            async with await Client.open(proxy) as client:
                assert (await client.request(b"GET", b"/logged"))[0] == 200
                assert (await client.request(b"GET", b"/c/conn"))[0] == 200
            lines = await access_log.wait_for(2)
            by_path = {line["path"]: line for line in lines}
            first = pair.first_name(b"/logged")
            other = "b" if first == "a" else "a"
            assert by_path["/logged"]["attempts"] == [
                {"upstream": first, "outcome": "503"},
                {"upstream": other, "outcome": "200"},
            ]
            assert by_path["/logged"]["status"] == 200
            other_up = pair.a if other == "a" else pair.b
            assert by_path["/logged"]["upstream"] == f"http://{other_up.netloc}"
            assert by_path["/c/conn"]["attempts"] == [
                {"upstream": "dead", "outcome": "connect_error"},
                {"upstream": good.netloc, "outcome": "200"},
            ]
            nursery.cancel_scope.cancel()


async def test_one_try_has_no_attempts_field(access_log: AccessLog) -> None:
    up_a, up_b = Upstream("a"), Upstream("b")
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await up_a.start(nursery)
            await up_b.start(nursery)
            proxy = await run_proxy(
                nursery, group_config([group_route([entry(up_a), entry(up_b)])])
            )
            assert (await tally(proxy, 2)).counts() == {"a": 1, "b": 1}
            lines = await access_log.wait_for(2)
            assert all("attempts" not in line for line in lines)
            nursery.cancel_scope.cancel()


# --------------------------------------------------------------------------- per upstream


async def test_a_retry_uses_the_next_upstreams_own_path_host_and_credential(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("GROUP_KEY_A", "secret-of-a")
    monkeypatch.setenv("GROUP_KEY_B", "secret-of-b")

    async def always_503(up: Upstream, req: Req, stream: trio.SocketStream) -> Reply | None:
        return 503, [], b"no"

    a, b = Upstream("a", always_503), Upstream("b")
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await a.start(nursery)
            await b.start(nursery)
            route = group_route(
                [
                    UpstreamEntry(
                        url=a.url + "a-base/",
                        name="a",
                        inject=Inject(header="x-api-key", token_env="GROUP_KEY_A"),
                    ),
                    UpstreamEntry(
                        url=b.url + "b-base/",
                        name="b",
                        inject=Inject(header="x-api-key", token_env="GROUP_KEY_B"),
                    ),
                ],
                prefix="/api/",
                balance="round_robin",  # a first
                retry=RETRY_503,
            )
            proxy = await run_proxy(nursery, group_config([route]))
            async with await Client.open(proxy) as client:
                status, _, body = await client.request(
                    b"POST", b"/api/v1/chat?x=1", [(b"x-api-key", b"client-key")], b"{}"
                )
            assert (status, body) == (200, b"b")
            (to_a,), (to_b,) = a.requests, b.requests
            assert to_a.target == b"/a-base/v1/chat?x=1"
            assert to_b.target == b"/b-base/v1/chat?x=1"
            assert [v for n, v in to_a.headers if n == b"x-api-key"] == [b"secret-of-a"]
            assert [v for n, v in to_b.headers if n == b"x-api-key"] == [b"secret-of-b"]
            assert to_a.header(b"host") == a.netloc.encode()
            assert to_b.header(b"host") == b.netloc.encode()
            assert to_a.body == to_b.body == b"{}"
            nursery.cancel_scope.cancel()


async def test_an_ejection_ends_after_base_eject_seconds_and_doubles_next_time(dead: str) -> None:
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            good = await good_upstream(nursery)
            route = group_route(
                [entry(good, name="good"), dead_entry(dead)],
                retry=RetryPolicy(attempts=2, budget_percent=100),
                outlier=Outlier(consecutive_failures=2, base_eject_seconds=0.5),
            )
            proxy = await run_proxy(nursery, group_config([route]))
            async with await Client.open(proxy) as client:
                sent_at = [0.0]

                async def ejected() -> bool:
                    sent_at[0] = trio.current_time()  # the ejection comes after this
                    assert (await client.request(b"GET", b"/x"))[0] == 200
                    return (await readyz(proxy))["dead"] == "ejected"

                async def back() -> bool:
                    return (await readyz(proxy))["dead"] == "up"

                await eventually(ejected)
                await eventually(back)
                assert trio.current_time() - sent_at[0] >= 0.5  # base_eject_seconds
                await eventually(ejected)  # it fails again: ejected again, for 2 x 0.5 s
                await eventually(back)
                assert trio.current_time() - sent_at[0] >= 1.0
            samples = await scrape_admin(proxy)
            ejections = "proxycore_upstream_ejections_total"
            assert upstream_value(samples, ejections, route.name, "dead") == 2
            nursery.cancel_scope.cancel()


async def test_a_gathered_body_retried_keeps_the_pipelined_request_after_it() -> None:
    pair = FirstHit("503")
    body = bytes(range(256)) * 8
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await pair.start(nursery)
            route = group_route([entry(pair.a), entry(pair.b)], retry=RETRY_503)
            proxy = await run_proxy(nursery, group_config([route]))
            async with open_client(proxy.host, proxy.port) as client:
                post = b"POST /p HTTP/1.1\r\nHost: proxy\r\nContent-Length: %d\r\n\r\n" % len(body)
                get = b"GET /after HTTP/1.1\r\nHost: proxy\r\n\r\n"
                await client.stream.send_all(post + body[:100])
                await client.stream.send_all(body[100:] + get)  # the next request right after
                client.h11.send(
                    h11.Request(
                        method=b"POST",
                        target=b"/p",
                        headers=[(b"host", b"proxy"), (b"content-length", b"%d" % len(body))],
                    )
                )
                client.h11.send(h11.Data(data=body))
                client.h11.send(h11.EndOfMessage())
                assert (await client.head()).status_code == 200
                assert await client.read_to_end()
                assert bytes(client.body).endswith(b":" + digest(body))
                client.h11.start_next_cycle()
                client.body.clear()
                client.h11.send(
                    h11.Request(method=b"GET", target=b"/after", headers=[(b"host", b"x")])
                )
                client.h11.send(h11.EndOfMessage())
                assert (await client.head()).status_code == 200  # its 503 retried too
                assert await client.read_to_end()
            assert pair.bodies(b"/p") == [body, body]
            assert pair.hits(b"/after") == 2
            nursery.cancel_scope.cancel()


async def test_backups_take_a_request_every_primary_failed() -> None:
    async def always_503(up: Upstream, req: Req, stream: trio.SocketStream) -> Reply | None:
        return 503, [], b"no"

    a, b, c = Upstream("a", always_503), Upstream("b", always_503), Upstream("c")
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            for up in (a, b, c):
                await up.start(nursery)
            route = group_route(
                [entry(a, name="a"), entry(b, name="b"), entry(c, name="c", backup=True)],
                retry=RetryPolicy(attempts=3, on=("503",), budget_percent=100),
            )
            proxy = await run_proxy(nursery, group_config([route]))
            async with await Client.open(proxy) as client:
                status, _, body = await client.request(b"GET", b"/x")
            assert (status, body) == (200, b"c")
            assert (a.count(), b.count(), c.count()) == (1, 1, 1)
            order = sorted([*a.requests, *b.requests, *c.requests], key=lambda r: r.at)
            assert order[-1].upstream == "c"  # the backup only after both primaries
            nursery.cancel_scope.cancel()
