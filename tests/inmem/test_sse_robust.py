"""Robust ends of an SSE stream (issue 12) over scripted streams, no sockets.

- **Cut writes**: once a client write was interrupted after some of its bytes left
  (``Stream.write_cut``), the relay never writes another byte (no error event inside
  an unfinished chunk, no last chunk): the exchange cuts the connection.
- **Partial events**: the start of an event whose blank line has not arrived is held
  back (at most ``HOLD_MAX``), so when the upstream dies mid-event the ``error`` event
  follows the last complete event and the client never dispatches a partial one;
  complete events are never delayed by it. An event larger than the hold goes out as
  it comes, and a death inside it cuts the client.
- **No ExceptionGroup**: an unexpected error in a nursery (the SSE relay's heartbeat
  task, the upstream core's body side) leaves as itself, for the front end to contain.
- **The transcript queue** is bounded in bytes as well as in lines.

The relay runs as the native front end runs it (:func:`relay_sse` with a ledger), the
upstream a :class:`ScriptedStream`, the client one that records every write.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Final

import pytest
import trio
from trio.testing import MockClock

from proxycore import Config, Route
from proxycore.config import SSESettings, Timeouts
from proxycore.errors import ClientGone, UpstreamError, UpstreamReset
from proxycore.http.headers import request_framing
from proxycore.http.sse import SSEEvent, SSEParser
from proxycore.net.pool import Origin, UpstreamConnection
from proxycore.net.stream import CHUNK, Buffer, StreamBroken
from proxycore.observe.transcript import QUEUE_BYTES, TranscriptWriters
from proxycore.proxy.ledger import Ledger
from proxycore.proxy.relay import RawRequestBody, RawResponseSink
from proxycore.proxy.sse_relay import HOLD_MAX, SSERelay, relay_sse
from proxycore.proxy.state import ProxyState
from proxycore.proxy.upstream import UpstreamCall
from tests.inmem.scripted import EOF, Pause, ScriptedStream, ScriptItem
from tests.inmem.single import one_upstream

LAST_CHUNK: Final = b"0\r\n\r\n"
RID: Final = "rid-12"
EVENTS: Final = (b"id: 1\ndata: zero\n\n", b"event: delta\ndata: one\n\n")


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def unchunk(wire: bytes) -> tuple[bytes, bool]:
    """The payload of a chunked body as written, and whether it ended with the last chunk.
    Asserts the framing is intact (every chunk's size line where a chunk starts)."""
    out, pos = bytearray(), 0
    while pos < len(wire):
        line_end = wire.index(b"\r\n", pos)
        size = int(wire[pos:line_end], 16)
        if size == 0:
            assert wire[line_end:] == b"\r\n\r\n", wire[pos:]
            return bytes(out), True
        start = line_end + 2
        if start + size + 2 > len(wire):
            return bytes(out + wire[start:]), False  # cut inside a chunk
        assert wire[start + size : start + size + 2] == b"\r\n", "misframed chunk"
        out += wire[start : start + size]
        pos = start + size + 2
    return bytes(out), False


def make_ledger(*, errors: bool = True, heartbeat: float | None = None) -> Ledger:
    beat = heartbeat if heartbeat is not None else 0.0 if errors else 15.0
    sse = SSESettings(errors=errors, heartbeat=beat)
    state = ProxyState(Config(routes=(Route(prefix="/", upstream="http://up.test/", sse=sse),)))
    ledger = Ledger(state, "GET", "127.0.0.1", RID, logging.getLogger("test"))
    ledger.route = state.snapshot.config.routes[0]
    return ledger


async def relay(
    up: ScriptedStream,
    down: ScriptedStream,
    *,
    ledger: Ledger | None = None,
    idle: float = 30,
    kind: str = "chunked",
    length: int = 0,
) -> bool:
    ledger = ledger or make_ledger()
    route = ledger.route
    assert route is not None
    return await relay_sse(
        ledger,
        up=up,
        down=down,
        buf=bytearray(CHUNK),
        trailing=b"",
        kind=kind,
        length=length,
        idle=idle,
        chunked_out=True,
        errors=route.sse.errors,
    )


def client_events(down: ScriptedStream) -> tuple[list[SSEEvent], bool]:
    """What an EventSource would dispatch from what the client got, and a clean end."""
    payload, clean = unchunk(down.written)
    return SSEParser().feed(payload), clean


# --------------------------------------------------------------------------- cut writes


class CutClient(ScriptedStream):
    """A client whose ``stall_at``-th write takes ``accept`` bytes, then blocks (a full
    kernel buffer); cancelled there, the write is cut (``write_cut``).

    ``enforce``: later writes raise ``StreamBroken`` (the streams since issue 12); off, they
    are recorded (the streams before it: what reached the wire).
    """

    def __init__(self, *, stall_at: int, accept: int, enforce: bool) -> None:
        super().__init__()
        self.stall_at, self.accept, self.enforce = stall_at, accept, enforce
        self.calls = 0
        self._was_cut = False

    @property
    def write_cut(self) -> bool:
        return self._was_cut

    async def send_all(self, data: Buffer) -> None:
        self.calls += 1
        await trio.lowlevel.checkpoint()
        if self._was_cut and self.enforce:
            raise StreamBroken("write cut")
        frame = bytes(data)
        if self.calls == self.stall_at:
            self.writes.append(frame[: self.accept])
            self.write_times.append(trio.current_time())
            try:
                await trio.sleep_forever()
            finally:
                self._was_cut = True
        self.writes.append(frame)
        self.write_times.append(trio.current_time())


@pytest.mark.parametrize("enforce", [False, True], ids=["stream-reports", "stream-enforces"])
async def test_no_byte_after_a_write_cut_by_the_idle_timeout(
    enforce: bool, autojump_clock: MockClock
) -> None:
    """A slow client: the second event's write takes 100 bytes and stalls; the idle timeout
    (30 s) cancels it mid-chunk. The relay must not write the error event (nor a last
    chunk) after it: on the wire that was "...xxxx8a\\r\\n\\n\\nevent: error" inside the
    unfinished chunk. It ends as the client's failure instead (the stall was the
    client's, whichever timer saw it: ``client_gone``), and the exchange cuts."""
    big = b"data: " + b"x" * 2000 + b"\n\n"
    up = ScriptedStream([chunk(EVENTS[0]), chunk(big)])  # then silence
    down = CutClient(stall_at=2, accept=100, enforce=enforce)
    start = trio.current_time()
    with pytest.raises(ClientGone):
        await relay(up, down)
    assert trio.current_time() - start == 30
    assert down.writes == [chunk(EVENTS[0]), chunk(big)[:100]]
    assert down.calls == 2, "a write was attempted after the cut"
    assert b"event: error" not in down.written


async def test_a_failed_client_write_ends_without_more_bytes() -> None:
    """``break_after``: the client resets in the middle of the second event: the relay
    raises ``ClientGone`` and writes nothing after the failed write."""
    up = ScriptedStream([chunk(EVENTS[0]), chunk(EVENTS[1]), StreamBroken("ECONNRESET")])
    down = ScriptedStream(break_after=len(chunk(EVENTS[0])) + 5)
    with pytest.raises(ClientGone):
        await relay(up, down)
    assert down.written == chunk(EVENTS[0]) + chunk(EVENTS[1])[:5]


# --------------------------------------------------------------------------- partial events

STREAM: Final = (
    b"id: 1\ndata: zero\n\n"
    b": a comment\n"
    b'event: delta\r\ndata: {"token": "hel\r\ndata: lo"}\r\n\r\n'
    b"retry: 1000\ndata: two\rdata: lines\r\r"
    b'data: {"token": "wor'
)


def complete_events(data: bytes) -> list[SSEEvent]:
    return SSEParser().feed(data)


@pytest.mark.parametrize("cut", range(1, len(STREAM) + 1, 3))
async def test_upstream_death_mid_event_never_dispatches_a_partial_event(cut: int) -> None:
    """The upstream sends ``STREAM[:cut]`` and resets, at every cut: the client dispatches
    exactly the events complete in what was sent, then the ``error`` event, then a clean
    end. Without the hold, the relay's "\\n\\n" before the error event completed the
    partial one (``data: {"token": "hel`` dispatched as if whole)."""
    sent = STREAM[:cut]
    parts = [chunk(p) for p in (sent[: cut // 2], sent[cut // 2 :]) if p]
    up = ScriptedStream([*parts, StreamBroken("ECONNRESET")])
    down = ScriptedStream()
    assert not await relay(up, down)
    events, clean = client_events(down)
    assert clean
    expected = complete_events(sent)
    assert [(e.type, e.data) for e in events[:-1]] == [(e.type, e.data) for e in expected]
    assert events[-1].type == "error"
    error = json.loads(events[-1].data)
    assert (error["status"], error["request_id"]) == (502, RID)


async def test_complete_events_are_never_delayed_by_a_held_tail(
    autojump_clock: MockClock,
) -> None:
    """An event and the start of the next in one read, 10 s of silence, the rest: the first
    event goes out at 0 s (only the unfinished start is held), the second at 10 s, as soon
    as its blank line arrived, with the start of a third still held."""
    up = ScriptedStream(
        [
            chunk(EVENTS[0] + b"data: sec"),
            Pause(10),
            chunk(b"ond\n\ndata: thi"),
            Pause(10),
            chunk(b"rd\n\n") + LAST_CHUNK,
        ]
    )
    down = ScriptedStream()
    start = trio.current_time()
    assert await relay(up, down)
    payloads = [
        (t - start, unchunk(w + LAST_CHUNK)[0])
        for t, w in zip(down.write_times[:-1], down.writes[:-1], strict=True)
    ]
    assert payloads == [
        (0, EVENTS[0]),
        (10, b"data: second\n\n"),
        (20, b"data: third\n\n"),
    ]


async def test_a_clean_end_mid_event_sends_the_held_bytes_unchanged() -> None:
    """The upstream's own stream ends inside an event (a clean last chunk): the held bytes
    go out as they are, then the last chunk (the client discards them, as the WHATWG
    rules say; the proxy changes no byte of a clean stream)."""
    up = ScriptedStream([chunk(EVENTS[0] + b"data: par"), chunk(b"tial") + LAST_CHUNK])
    down = ScriptedStream()
    assert await relay(up, down)
    payload, clean = unchunk(down.written)
    assert clean
    assert payload == EVENTS[0] + b"data: partial"


@pytest.mark.parametrize("errors", [True, False])
async def test_an_event_larger_than_the_hold_goes_out_and_a_death_inside_it_cuts(
    errors: bool,
) -> None:
    """An event of 3 x HOLD_MAX: the relay never holds more than ``HOLD_MAX`` + one read
    (each write is at most that), so the event's bytes go out before its end; when the
    upstream dies inside it, no error event can follow (the client is mid-event): the
    client is cut (no last chunk), errors on or off."""
    body = b"data: " + b"y" * (3 * HOLD_MAX)
    up = ScriptedStream([*(chunk(body[i : i + 10_000]) for i in range(0, len(body), 10_000))])
    up.feed(StreamBroken("ECONNRESET"))
    down = ScriptedStream()
    with pytest.raises(UpstreamReset):
        await relay(up, down, ledger=make_ledger(errors=errors))
    payload, clean = unchunk(down.written)
    assert not clean
    assert payload == body
    assert max(len(w) for w in down.writes) <= HOLD_MAX + CHUNK + 16
    assert b"event: error" not in down.written


async def test_after_a_big_event_the_hold_works_again() -> None:
    """Once the big event ended, the client is between events again: a later death
    mid-event gets its error event after the last complete one."""
    big = b"data: " + b"z" * (2 * HOLD_MAX) + b"\n\n"
    up = ScriptedStream(
        [chunk(big[: HOLD_MAX + 10]), chunk(big[HOLD_MAX + 10 :] + b"data: par"), EOF]
    )
    down = ScriptedStream()
    assert not await relay(up, down)
    events, clean = client_events(down)
    assert clean
    assert [e.type for e in events] == ["message", "error"]
    assert len(events[0].data) == 2 * HOLD_MAX
    assert b"data: par" not in down.written


async def test_error_event_without_errors_feature_is_a_cut() -> None:
    """Errors off: a death mid-event is a cut, and the held start is never sent."""
    up = ScriptedStream([chunk(EVENTS[0] + b"data: par"), StreamBroken("ECONNRESET")])
    down = ScriptedStream()
    with pytest.raises(UpstreamError):
        await relay(up, down, ledger=make_ledger(errors=False))
    payload, clean = unchunk(down.written)
    assert not clean
    assert payload == EVENTS[0]


# --------------------------------------------------------------------------- no ExceptionGroup

ORIGIN: Final = Origin("http", "up.test", 80)
GET: Final = b"GET / HTTP/1.1\r\nHost: up.test\r\n\r\n"


class ClientEnd:
    """The client connection as the relays see it (``ClientSide``), never closing."""

    def __init__(self) -> None:
        self.stream = ScriptedStream()
        self.rbuf, self.wbuf = bytearray(CHUNK), bytearray(CHUNK)

    async def wait_closed(self) -> bool:
        await trio.sleep_forever()
        raise AssertionError("unreachable")


async def forward(script: list[ScriptItem], *, content_length: int = 0) -> ClientEnd:
    """One exchange through the upstream core (native ends, SSE route with heartbeats)."""
    ledger = make_ledger(heartbeat=15)
    client = ClientEnd()
    headers = [(b"content-length", b"%d" % content_length)] if content_length else []
    body = RawRequestBody(client, ledger.record, b"", request_framing(headers, b"1.1"))
    sink = RawResponseSink(client, ledger, b"GET", True)
    sink.sse_errors = True

    async def connect(origin: Origin) -> UpstreamConnection:
        return UpstreamConnection(origin, ScriptedStream(script))

    call = UpstreamCall(
        ledger,
        ledger.state.pool,
        body,
        sink,
        method=b"GET",
        timeouts=Timeouts(),
        server=ledger.state.snapshot.config.server,
        connect=connect,
    )
    attempts, head_for = one_upstream(ORIGIN, GET, ledger.record)
    await call.forward(attempts, head_for, retry=False)
    return client


async def test_an_error_in_the_sse_relay_leaves_the_core_as_itself(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A RuntimeError in the tap (inside the SSE relay's nursery, itself inside the upstream
    core's) leaves ``UpstreamCall.forward`` as that RuntimeError, not an ExceptionGroup
    (the front end then answers it as one error)."""
    feed = SSEParser.feed

    def failing_feed(self: SSEParser, data: bytes | bytearray | memoryview) -> list[SSEEvent]:
        if b"boom" in bytes(data):
            raise RuntimeError("boom")
        return feed(self, data)

    monkeypatch.setattr(SSEParser, "feed", failing_feed)
    head = (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    with pytest.raises(RuntimeError, match="boom"):
        await forward([head + chunk(EVENTS[0]), chunk(b"data: boom\n\n")])


async def test_an_error_in_the_body_side_task_leaves_the_core_as_itself(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A RuntimeError in the body side (a child task of the core's nursery) cancels the
    exchange and leaves ``forward`` as itself."""

    async def failing_send_rest(*_args: object) -> bool:
        raise RuntimeError("body side")

    monkeypatch.setattr(RawRequestBody, "send_rest", failing_send_rest)
    with pytest.raises(RuntimeError, match="body side"):
        await forward([], content_length=10)


class FailingClient(ScriptedStream):
    """A client stream whose second write raises an unexpected error."""

    async def send_all(self, data: Buffer) -> None:
        if self.writes:
            raise RuntimeError("heartbeat write")
        await super().send_all(data)


async def test_an_error_in_the_heartbeat_task_leaves_the_relay_as_itself(
    autojump_clock: MockClock,
) -> None:
    """The heartbeat task (a child of the relay's nursery) fails unexpectedly: ``run``
    raises that error itself once the body ended, not an ExceptionGroup."""
    up = ScriptedStream([chunk(EVENTS[0]), Pause(20), LAST_CHUNK])
    relay = SSERelay(
        up=up,
        down=FailingClient(),
        buf=bytearray(CHUNK),
        idle=60,
        chunked_out=False,
        parser=SSEParser(),
        heartbeat=15,
    )
    with pytest.raises(RuntimeError, match="heartbeat write"):
        await relay.run(b"", "chunked", 0)


# --------------------------------------------------------------------------- transcript queue


async def test_the_transcript_queue_is_bounded_in_bytes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Lines are queued while the writer can't run: with a 1 MiB byte bound, 64 KiB lines
    stop being accepted at 1 MiB (far below the 256-line bound), each drop counted and
    logged; once the writer caught up, lines are accepted again."""
    assert TranscriptWriters().max_bytes == QUEUE_BYTES
    path = str(tmp_path / "t.jsonl")
    record: dict[str, object] = {"events": ["e" * (64 * 1024)]}
    writers = TranscriptWriters(max_bytes=1024 * 1024)
    async with trio.open_nursery() as nursery:
        writers.nursery = nursery
        accepted = [writers.submit(path, record) for _ in range(40)]  # no checkpoint: queued
        assert accepted.count(True) == 15  # 15 lines of 64 KiB + a few bytes fit in 1 MiB
        assert writers.queued_bytes <= 1024 * 1024
        drops = [r for r in caplog.records if "line dropped" in r.getMessage()]
        assert len(drops) == 25
        assert "(25 so far)" in drops[-1].getMessage()
        await drained(writers)
        assert writers.submit(path, record)
        await drained(writers)
        nursery.cancel_scope.cancel()
    assert (await trio.Path(path).read_text()).count("\n") == 16


async def drained(writers: TranscriptWriters) -> None:
    """Wait until the writer task wrote every queued line (a worker thread does)."""
    while True:
        if not writers.queued_bytes:
            return
        await trio.sleep(0.01)
