"""Every wait has a bound (issue 12), over scripted streams: no socket, so the timing
tests run on ``autojump_clock`` (the waits are minutes of trio time, milliseconds of real).

- ``[timeouts] send``: the upstream stream of an exchange gets the route's ``send``; a head
  write the upstream never takes is a 504 at ``send``; a request body write it never takes
  ends the body side (the upstream's failure, not the client's 408), then the upstream has
  ``response`` to answer;
- ``[timeouts] client_body``: the longest silence between two reads of a request body is
  ``client_body`` (408), not ``idle``;
- a write cut mid-way marks its stream (``write_cut``): nothing more is written on it;
- the WebSocket refusal body is capped (:class:`~proxycore.proxy.ws_streams.RefusalCap`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Final

import pytest
import trio
import trio.testing
from trio.testing import MockClock

from proxycore import Config, Route
from proxycore.config import Timeouts
from proxycore.errors import DownstreamTimeout, ProxyError, UpstreamTimeout
from proxycore.http.headers import Headers, request_framing
from proxycore.net.pipe import SinkFailed, pump_until_close
from proxycore.net.pool import Origin, UpstreamConnection
from proxycore.net.stream import CHUNK, StreamBroken
from proxycore.proxy.ledger import Ledger
from proxycore.proxy.relay import RawRequestBody, RawResponseSink
from proxycore.proxy.state import ProxyState
from proxycore.proxy.upstream import UpstreamCall
from proxycore.proxy.ws_streams import MAX_REFUSAL_BODY, RefusalCap
from tests.inmem.scripted import Pause, ScriptedStream, ScriptItem
from tests.inmem.single import one_upstream

ORIGIN: Final = Origin("http", "upstream.test", 80)
POST_HEAD: Final = b"POST / HTTP/1.1\r\nHost: upstream.test\r\nContent-Length: %d\r\n\r\n"
#: Trio-clock cap per exchange: far below the 3600 s defaults a missing bound would wait.
CAP: Final = 1000.0


class Client:
    """The client connection as the relays see it (``ClientSide``)."""

    def __init__(self, script: Sequence[ScriptItem] = ()) -> None:
        self.stream = ScriptedStream(script)
        self.rbuf = bytearray(CHUNK)
        self.wbuf = bytearray(CHUNK)

    async def wait_closed(self) -> bool:
        await trio.sleep_forever()
        raise AssertionError("unreachable")


class Call:
    """One exchange through the shared upstream core, with one scripted upstream connection."""

    def __init__(
        self,
        upstream: Sequence[ScriptItem],
        *,
        timeouts: Timeouts,
        method: bytes = b"GET",
        headers: Headers | None = None,
        data: bytes = b"",
        client_script: Sequence[ScriptItem] = (),
    ) -> None:
        self.method, self.timeouts = method, timeouts
        self.state = ProxyState(
            Config(routes=(Route(prefix="/", upstream="http://upstream.test/"),))
        )
        self.ledger = Ledger(self.state, method.decode(), "127.0.0.1", "r1", logging.getLogger("t"))
        self.client = Client(client_script)
        self.body = RawRequestBody(
            self.client, self.ledger.record, data, request_framing(headers or [], b"1.1")
        )
        self.sink = RawResponseSink(self.client, self.ledger, method, True)
        self.up = ScriptedStream(upstream)

    async def connect(self, origin: Origin) -> UpstreamConnection:
        return UpstreamConnection(origin, self.up)

    async def forward(self, head: bytes) -> float:
        """Run the exchange; the trio time it took (raises what the exchange raised)."""
        call = UpstreamCall(
            self.ledger,
            self.state.pool,
            self.body,
            self.sink,
            method=self.method,
            timeouts=self.timeouts,
            server=self.state.snapshot.config.server,
            connect=self.connect,
        )
        start = trio.current_time()
        with trio.fail_after(CAP):
            attempts, head_for = one_upstream(ORIGIN, head + self.body.start, self.ledger.record)
            await call.forward(attempts, head_for, retry=False)
        return trio.current_time() - start


async def failure(call: Call, head: bytes) -> tuple[ProxyError, float]:
    start = trio.current_time()
    with pytest.raises(ProxyError) as info:
        await call.forward(head)
    return info.value, trio.current_time() - start


# --------------------------------------------------------------------------- send


async def test_head_write_to_an_upstream_that_takes_nothing_is_a_504_at_send(
    autojump_clock: MockClock,
) -> None:
    call = Call([], timeouts=Timeouts(send=7))
    call.up.block_writes()
    exc, took = await failure(call, b"GET / HTTP/1.1\r\nHost: upstream.test\r\n\r\n")
    assert isinstance(exc, UpstreamTimeout), exc
    assert "accepted no request bytes for 7 s" in exc.message
    assert took == 7
    assert call.up.send_timeout == 7  # the route's bound is set on the upstream stream
    assert call.up.closed and call.up.write_cut


@pytest.mark.parametrize(
    ("send", "client_body", "gave_up_at"),
    [
        pytest.param(5.0, 60.0, 1 + 5, id="send-timeout-first"),
        pytest.param(60.0, 5.0, 5, id="client-body-scope-first"),
    ],
)
async def test_request_body_write_stall_is_the_upstream_s_then_response_bounds_it(
    autojump_clock: MockClock, send: float, client_body: float, gave_up_at: float
) -> None:
    """An upstream that takes the head, then no more of the request body: the body side
    gives up at ``send`` after the write blocked (t=1), or when ``client_body`` expires
    during that write: never a 408 to a client that kept sending. Then the wait for the
    upstream's answer is ``response`` (a 504), not unbounded."""
    call = Call(
        [],
        timeouts=Timeouts(send=send, client_body=client_body, response=3, idle=3600),
        method=b"POST",
        headers=[(b"Content-Length", b"100")],
        data=b"a" * 10,
        client_script=[Pause(1), *[b"b" * 10] * 9],
    )
    errors: list[ProxyError] = []
    start = trio.current_time()

    async def run() -> None:
        try:
            await call.forward(POST_HEAD % 100)
        except ProxyError as exc:
            errors.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        await trio.sleep(0.5)  # the head and the body start went at t=0
        assert call.up.written == POST_HEAD % 100 + b"a" * 10
        call.up.block_writes()
    took = trio.current_time() - start
    (exc,) = errors
    assert isinstance(exc, UpstreamTimeout), exc
    assert "no response head" in exc.message
    assert took == gave_up_at + 3


async def test_request_body_silence_is_bounded_by_client_body_not_idle(
    autojump_clock: MockClock,
) -> None:
    """A trickled upload: ``client_body`` (5 s) between two reads, under a 3600 s ``idle``;
    408, and the upstream connection is closed."""
    call = Call(
        [],
        timeouts=Timeouts(client_body=5, idle=3600, response=3600),
        method=b"POST",
        headers=[(b"Content-Length", b"10")],
        data=b"a",
        client_script=[Pause(4), b"b", Pause(4.5), b"c", Pause(6), b"d"],
    )
    exc, took = await failure(call, POST_HEAD % 10)
    assert isinstance(exc, DownstreamTimeout), exc
    assert exc.status == 408
    assert took == 4 + 4.5 + 5
    assert call.up.written.endswith(b"\r\n\r\nabc")  # each byte went on at once
    assert call.up.closed


# --------------------------------------------------------------------------- cut writes


async def test_a_write_cut_mid_way_marks_the_stream_and_refuses_more(
    autojump_clock: MockClock,
) -> None:
    """The pump's ``idle`` cancels a write after part of it left: the sink is cut, and no
    later write (an error event, a last chunk) can follow the partial one."""
    src = ScriptedStream([b"x" * 100])
    dst = ScriptedStream()
    dst.block_writes(partial_on_block=30)
    with pytest.raises(SinkFailed) as info:
        await pump_until_close(src, dst, bytearray(CHUNK), 5, chunk_encode=True)
    assert dst.write_cut
    assert info.value.moved == 0 and dst.bytes_sent == 30  # the part that left
    dst.unblock_writes()
    with pytest.raises(StreamBroken):
        await dst.send_all(b"0\r\n\r\n")
    assert len(dst.written) == 30  # the partial write only


async def test_a_write_cancelled_before_any_byte_does_not_cut(autojump_clock: MockClock) -> None:
    dst = ScriptedStream()
    dst.block_writes()
    with trio.move_on_after(1):
        await dst.send_all(b"never")
    assert not dst.write_cut
    dst.unblock_writes()
    await dst.send_all(b"fine")
    assert dst.written == b"fine"


# --------------------------------------------------------------------------- WebSocket refusal


def refusal(body_size: int, *, status: bytes = b"403 Forbidden") -> bytes:
    return b"HTTP/1.1 %s\r\nContent-Length: %d\r\n\r\n" % (status, body_size) + b"r" * body_size


async def read_all(cap: RefusalCap) -> bytes:
    out = bytearray()
    while data := await cap.receive_some(4096):
        out += data
    return bytes(out)


async def upstream_sends(*parts: bytes) -> RefusalCap:
    """A RefusalCap over a memory stream whose peer sent ``parts`` and closed."""
    ours, theirs = trio.testing.memory_stream_pair()
    for part in parts:
        await theirs.send_all(part)
    await theirs.aclose()
    return RefusalCap(ours)


@pytest.mark.parametrize("split", [1, 7, 4096])
async def test_refusal_body_up_to_the_cap_passes(split: int) -> None:
    data = refusal(MAX_REFUSAL_BODY)
    cap = await upstream_sends(*(data[i : i + split] for i in range(0, len(data), split)))
    assert await read_all(cap) == data
    assert not cap.too_large


@pytest.mark.parametrize("split", [1000, 65536])
async def test_refusal_body_over_the_cap_fails_the_read(split: int) -> None:
    data = refusal(MAX_REFUSAL_BODY + 1)
    cap = await upstream_sends(*(data[i : i + split] for i in range(0, len(data), split)))
    with pytest.raises(trio.BrokenResourceError):
        await read_all(cap)
    assert cap.too_large


async def test_after_a_101_nothing_is_counted() -> None:
    """Frames after the upstream's 101 (even past 64 KiB) are the session's, not capped;
    an interim 1xx before a refusal is skipped, the refusal after it still counted."""
    switch = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n"
    cap = await upstream_sends(switch + b"f" * 10, b"f" * (4 * MAX_REFUSAL_BODY))
    assert len(await read_all(cap)) == len(switch) + 10 + 4 * MAX_REFUSAL_BODY
    interim = b"HTTP/1.1 100 Continue\r\n\r\n"
    cap = await upstream_sends(interim + refusal(MAX_REFUSAL_BODY + 1))
    with pytest.raises(trio.BrokenResourceError):
        await read_all(cap)


async def test_a_head_that_never_ends_is_capped_too() -> None:
    cap = await upstream_sends(b"HTTP/1.1 403 Forbidden\r\nX: " + b"h" * (2 * MAX_REFUSAL_BODY))
    with pytest.raises(trio.BrokenResourceError):
        await read_all(cap)
    assert cap.too_large
