"""The accept loop: ``max_connections`` on real sockets, and bursts of connections.

At the limit the proxy stops accepting (the kernel's backlog holds new clients); a slot
freed by a closing client lets the next one in. A burst of ready connections larger than
the loop's run without a checkpoint (``_BURST``) is served whole. 127.0.0.1, port 0, the
real clock; the only bounded wait asserts that nothing arrives (a regression can only
make it fail, never make a correct proxy flaky); the rest are generous caps.
"""

from __future__ import annotations

from typing import Final

import trio

from proxycore.ops import server as server_module
from tests.helpers import read_until, start_proxy, start_raw_server

CAP: Final = 20.0
REQUEST: Final = b"GET /x HTTP/1.1\r\nHost: t\r\n\r\n"
ANSWER: Final = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


async def _upstream(stream: trio.SocketStream) -> None:
    buf = b""
    while True:
        data = await stream.receive_some(65536)
        if not data:
            return
        buf += data
        while b"\r\n\r\n" in buf:
            _, _, buf = buf.partition(b"\r\n\r\n")
            await stream.send_all(ANSWER)


async def _get(port: int) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(REQUEST)
        return await read_until(stream, b"\r\n\r\nok")


async def test_at_max_connections_the_next_client_waits_for_a_free_slot() -> None:
    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            up = await start_raw_server(nursery, _upstream)
            _, port = await start_proxy(
                nursery, f"http://127.0.0.1:{up}/", server={"max_connections": 2}
            )
            first = await trio.open_tcp_stream("127.0.0.1", port)
            second = await trio.open_tcp_stream("127.0.0.1", port)
            for held in (first, second):  # both accepted and served: they hold the slots
                await held.send_all(REQUEST)
                assert (await read_until(held, b"\r\n\r\nok")).startswith(b"HTTP/1.1 200")
            third = await trio.open_tcp_stream("127.0.0.1", port)  # the backlog takes it
            await third.send_all(REQUEST)
            with trio.move_on_after(0.5):
                data = await third.receive_some(65536)
                raise AssertionError(f"answered beyond max_connections: {data!r}")
            await first.aclose()  # frees a slot: the third is accepted and answered
            got = await read_until(third, b"\r\n\r\nok")
            assert got.startswith(b"HTTP/1.1 200")
            await second.aclose()
            await third.aclose()
            nursery.cancel_scope.cancel()


async def test_a_burst_longer_than_the_accept_run_is_served_whole() -> None:
    count = 3 * server_module._BURST
    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            up = await start_raw_server(nursery, _upstream)
            _, port = await start_proxy(nursery, f"http://127.0.0.1:{up}/")
            answers: list[bytes] = []

            async def one() -> None:
                answers.append(await _get(port))

            async with trio.open_nursery() as clients:
                for _ in range(count):
                    clients.start_soon(one)
            assert len(answers) == count
            assert all(a.startswith(b"HTTP/1.1 200") for a in answers)
            nursery.cancel_scope.cancel()
