"""A reload keeps the rate-limit state of routes whose limit settings did not change.

Each test runs a ``Server`` in the test's trio run on 127.0.0.1 (port 0) against a raw
upstream, exhausts a limit over real requests, reloads, and checks what the next
request gets. Token rates are one per thousand seconds, so no token comes back
while a test runs (no timing guess).
"""

from __future__ import annotations

import dataclasses

import trio

from proxycore import Config, RateLimit, Route, ServerSettings
from proxycore.ops.server import Server
from proxycore.security.ratelimit import ConcurrencyLimit
from tests.e2e.test_lifecycle import RawUpstream, get, start_server
from tests.e2e.test_streaming import open_client

SLOW: RateLimit = RateLimit(requests_per_second=0.001, burst=2)


def limited(upstream: str, limit: RateLimit) -> Config:
    return Config(
        routes=(Route(prefix="/", upstream=upstream, rate_limit=limit),),
        server=ServerSettings(listen=("127.0.0.1:0",)),
    )


def streams(server: Server) -> ConcurrencyLimit:
    """The concurrent-stream counts of route ``/`` in the snapshot in use."""
    snapshot = server.state.snapshot
    found = snapshot.security.guard(snapshot.config.routes[0]).streams
    assert found is not None
    return found


async def released(limit: ConcurrencyLimit, key: str) -> None:
    """Wait until ``key`` holds no stream (freed just after the client saw the end)."""
    while True:
        if not limit.active(key):
            return
        await trio.sleep(0.01)


async def test_same_limit_keeps_an_exhausted_bucket_and_a_new_rate_resets_it() -> None:
    a, b = RawUpstream(b"A"), RawUpstream(b"B")
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            a_url, b_url = await a.start(nursery), await b.start(nursery)
            server = Server(limited(a_url, SLOW))
            proxy = await start_server(nursery, server)
            host, port = proxy.host, proxy.port
            assert [await get(host, port) for _ in range(2)] == [(200, b"A")] * 2
            assert (await get(host, port))[0] == 429

            # The same config, read again: the caller's budget is still spent.
            assert server.reload(limited(a_url, SLOW))
            assert (await get(host, port))[0] == 429
            # Another upstream, the same limit: still spent (the limit is what counts).
            assert server.reload(limited(b_url, SLOW))
            assert server.state.snapshot.generation == 3
            assert (await get(host, port))[0] == 429

            # A changed rate is a new limit: a fresh bucket, burst 2 again.
            faster = dataclasses.replace(SLOW, requests_per_second=0.002)
            assert server.reload(limited(b_url, faster))
            answers = [await get(host, port) for _ in range(3)]
            assert [status for status, _ in answers] == [200, 200, 429]
            assert answers[0] == answers[1] == (200, b"B")
            nursery.cancel_scope.cancel()
    assert len(a.targets) == 2
    assert len(b.targets) == 2


async def test_stream_slot_held_across_reload_is_released_into_the_carried_limit() -> None:
    one_stream = dataclasses.replace(SLOW, burst=100, max_concurrent_streams=1)
    a = RawUpstream(b"A")
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            url = await a.start(nursery)
            server = Server(limited(url, one_stream))
            proxy = await start_server(nursery, server)
            host, port = proxy.host, proxy.port
            before = streams(server)
            async with open_client(host, port) as client:
                await client.request(b"GET", b"/stream")  # held open until a.release
                assert (await client.head()).status_code == 200
                assert before.active("127.0.0.1") == 1

                assert server.reload(limited(url, one_stream))
                assert (await get(host, port))[0] == 429  # the slot is still taken
                assert streams(server) is before

                a.release.set()  # the stream admitted before the reload ends now
                assert await client.read_to_end()
            await released(streams(server), "127.0.0.1")
            assert await get(host, port) == (200, b"A")

            # A changed limit starts afresh: a stream held now is not counted in the new one.
            async with open_client(host, port) as client:
                await client.request(b"GET", b"/forever")
                assert (await client.head()).status_code == 200
                two = dataclasses.replace(one_stream, max_concurrent_streams=2)
                assert server.reload(limited(url, two))
                assert streams(server) is not before
                assert streams(server).active("127.0.0.1") == 0
            nursery.cancel_scope.cancel()
