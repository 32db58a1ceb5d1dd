"""``SSERelay`` (``proxycore/proxy/sse_relay.py``) over scripted streams, no sockets.

The upstream is a :class:`ScriptedStream` replaying the body bytes that follow the
response head (``Pause`` items are the upstream's silences); the client is a
:class:`ScriptedStream` that records each write with its time. The timing tests that
used to run end to end on ``autojump_clock`` with real sockets (heartbeat cadence, no
heartbeat mid-event, heartbeats are not upstream activity, the slow client) live here:
no real I/O can race the mock clock, so times are asserted exactly.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Final

import pytest
import trio
from trio.testing import MockClock

from proxycore.http.sse import BOM, HEARTBEAT, SSEEvent, SSEParser, error_event
from proxycore.net.pipe import CHUNK, FramingError, IdleTimeout, SinkFailed, SourceFailed
from proxycore.net.stream import StreamBroken
from proxycore.proxy.sse_relay import HOLD_MAX, SSERelay
from tests.inmem.scripted import EOF, Pause, ScriptedStream, ScriptItem

LAST_CHUNK: Final = b"0\r\n\r\n"
EVENTS: Final = (b"id: 1\ndata: zero\n\n", b"event: delta\ndata: one\n\n")
ERROR: Final = error_event(502, "upstream failed", "rid-1")


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def make_relay(
    up: ScriptedStream,
    down: ScriptedStream,
    *,
    heartbeat: float = 15,
    idle: float = 3600,
    chunked_out: bool = False,
    parser: SSEParser | None = None,
    on_event: Callable[[SSEEvent], Awaitable[None]] | None = None,
) -> SSERelay:
    return SSERelay(
        up=up,
        down=down,
        buf=bytearray(CHUNK),
        idle=idle,
        chunked_out=chunked_out,
        parser=parser or SSEParser(),
        heartbeat=heartbeat,
        on_event=on_event,
    )


def timeline(down: ScriptedStream, start: float) -> list[tuple[float, bytes]]:
    return [(t - start, w) for t, w in zip(down.write_times, down.writes, strict=True)]


def unchunk(frames: list[bytes]) -> list[bytes]:
    """The payload of each write of a chunked client (each write is exactly one chunk)."""
    out = []
    for frame in frames:
        size, _, rest = frame.partition(b"\r\n")
        assert rest.endswith(b"\r\n") and len(rest) == int(size, 16) + 2, frame
        out.append(rest[:-2])
    return out


# --------------------------------------------------------------------------- heartbeats


async def test_heartbeat_cadence_during_silence(autojump_clock: MockClock) -> None:
    """heartbeat=15: an event, 50 s of silence, an event: keep-alives at exactly 15, 30 and
    45 s (the beat is due ``heartbeat`` after the last client write, and re-armed by it)."""
    first, second = b"data: one\n\n", b"data: two\n\n"
    up = ScriptedStream([chunk(first), Pause(50), chunk(second) + LAST_CHUNK])
    down = ScriptedStream()
    start = trio.current_time()
    await make_relay(up, down).run(b"", "chunked", 0)
    assert timeline(down, start) == [
        (0, first),
        (15, HEARTBEAT),
        (30, HEARTBEAT),
        (45, HEARTBEAT),
        (50, second),
    ]


async def test_a_partial_event_is_held_and_heartbeats_go_on_around_it(
    autojump_clock: MockClock,
) -> None:
    """Half an event, 40 s of silence, the rest: the half is held back (the client stays
    between events), so keep-alives go on at 15 and 30 s, and the whole event goes out
    at 40 s in one write; the cadence resumes 15 s after it."""
    halves = (b"data: par", b"tial\n\n")
    up = ScriptedStream(
        [chunk(halves[0]), Pause(40), chunk(halves[1]), Pause(20), LAST_CHUNK, b"never"]
    )
    down = ScriptedStream()
    start = trio.current_time()
    await make_relay(up, down).run(b"", "chunked", 0)
    assert timeline(down, start) == [
        (15, HEARTBEAT),
        (30, HEARTBEAT),
        (40, b"data: partial\n\n"),
        (55, HEARTBEAT),
    ]
    assert up.script_left == [b"never"]  # the relay stops reading at the last chunk


async def test_heartbeat_before_a_leading_bom_keeps_the_first_event(
    autojump_clock: MockClock,
) -> None:
    """The upstream thinks for 20 s (a heartbeat goes out at 15 s), then starts its stream
    with a UTF-8 BOM. The BOM is only skipped first in a stream, so after a heartbeat the
    relay drops that one leading BOM; the client still sees the first event."""
    stream = BOM + b"data: first\n\ndata: second\n\n"
    up = ScriptedStream([Pause(20), chunk(stream) + LAST_CHUNK])
    down = ScriptedStream()
    start = trio.current_time()
    await make_relay(up, down).run(b"", "chunked", 0)
    assert timeline(down, start) == [(15, HEARTBEAT), (20, stream[len(BOM) :])]
    assert [e.data for e in SSEParser().feed(down.written)] == ["first", "second"]


async def test_a_leading_bom_without_a_heartbeat_first_is_forwarded() -> None:
    """The BOM is dropped only after a heartbeat: otherwise the bytes are never altered."""
    stream = BOM + b"data: first\n\n"
    up = ScriptedStream([chunk(stream) + LAST_CHUNK])
    down = ScriptedStream()
    await make_relay(up, down).run(b"", "chunked", 0)
    assert down.written == stream


async def test_heartbeats_are_not_upstream_activity(autojump_clock: MockClock) -> None:
    """idle=40, heartbeat=15: keep-alives at 15 and 30 s, yet the silent upstream is cut
    at exactly 40 s: the idle deadline moves on upstream reads only."""
    first = b"data: one\n\n"
    up = ScriptedStream([chunk(first)])  # then silence
    down = ScriptedStream()
    start = trio.current_time()
    with pytest.raises(IdleTimeout):
        await make_relay(up, down, idle=40).run(b"", "chunked", 0)
    assert trio.current_time() - start == 40
    assert timeline(down, start) == [(0, first), (15, HEARTBEAT), (30, HEARTBEAT)]


async def test_idle_is_per_gap_between_upstream_reads(autojump_clock: MockClock) -> None:
    """idle=40 bounds each silence, not the stream: two 30 s gaps pass (the deadline moves
    on every upstream read), heartbeats off."""
    up = ScriptedStream(
        [chunk(EVENTS[0]), Pause(30), chunk(EVENTS[1]), Pause(30), chunk(EVENTS[0]) + LAST_CHUNK]
    )
    down = ScriptedStream()
    start = trio.current_time()
    await make_relay(up, down, idle=40, heartbeat=0).run(b"", "chunked", 0)
    assert timeline(down, start) == [(0, EVENTS[0]), (30, EVENTS[1]), (60, EVENTS[0])]


async def test_heartbeat_never_lands_inside_an_event_written_to_a_slow_client(
    autojump_clock: MockClock,
) -> None:
    """An event larger than the hold: once it outgrew ``HOLD_MAX`` its start goes out
    (here to a client that does not read: the write blocks 10 -> 20 s while the heartbeat
    falls due at 15 s). From then on the client is mid-event: no keep-alive may go out
    (due at 35 and 50 s) until the rest of the event arrived at 60 s."""
    big = b"data: " + b"p" * (HOLD_MAX - 5)  # HOLD_MAX + 1 bytes, no line end
    rest = b"tial\n\n"
    up = ScriptedStream([Pause(10), big, Pause(40), rest, EOF])
    down = ScriptedStream()
    down.block_writes()
    relay = make_relay(up, down)
    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(relay.run, b"", "close", 0)
        await trio.sleep(20)  # the write of the event's start blocks; the beat falls due
        assert down.writes == []
        down.unblock_writes()  # the client catches up
    assert timeline(down, start) == [(20, big), (60, rest)]
    assert [e.data for e in SSEParser().feed(down.written)] == [big[6:].decode() + "tial"]


async def test_a_heartbeat_is_one_chunk_on_a_chunked_client(autojump_clock: MockClock) -> None:
    """``chunked_out``: every write is one chunk (body reads and keep-alives alike), and
    ``finish`` ends the body with the last chunk; ``moved`` counts the framed bytes."""
    up = ScriptedStream([Pause(20), EVENTS[0], EOF])
    down = ScriptedStream()
    relay = make_relay(up, down, chunked_out=True)
    await relay.run(b"", "close", 0)
    await relay.finish()
    assert down.writes == [chunk(HEARTBEAT), chunk(EVENTS[0]), LAST_CHUNK]
    assert relay.moved == len(down.written)


async def test_a_client_that_stops_reading_during_a_heartbeat_is_sink_failed(
    autojump_clock: MockClock,
) -> None:
    """The body ends while a heartbeat write is stuck: ``run`` waits at most ``idle`` for
    it (it never cancels a write mid-frame), then gives up with ``SinkFailed``."""
    up = ScriptedStream([chunk(EVENTS[0]), Pause(20), LAST_CHUNK])
    down = ScriptedStream()
    relay = make_relay(up, down, idle=30)
    start = trio.current_time()

    async def stop_reading_at_14() -> None:
        await trio.sleep(14)
        down.block_writes()  # the heartbeat at 15 s gets stuck

    async with trio.open_nursery() as nursery:
        nursery.start_soon(stop_reading_at_14)
        with pytest.raises(SinkFailed, match="stopped reading"):
            await relay.run(b"", "chunked", 0)
    assert trio.current_time() - start == 20 + 30
    assert down.writes == [EVENTS[0]]


async def test_a_heartbeat_write_failure_fails_the_relay(autojump_clock: MockClock) -> None:
    """A client gone during a heartbeat: the failure is kept and raised by ``run`` even
    though the body itself then ended cleanly."""
    up = ScriptedStream([chunk(EVENTS[0]), Pause(20), LAST_CHUNK])
    down = ScriptedStream(break_after=len(EVENTS[0]))
    with pytest.raises(SinkFailed):
        await make_relay(up, down).run(b"", "chunked", 0)
    assert down.written == EVENTS[0]


# --------------------------------------------------------------------------- framing, failures


@pytest.mark.parametrize(
    ("kind", "script", "length", "leftover"),
    [
        pytest.param(
            "chunked",
            [chunk(EVENTS[0]), chunk(EVENTS[1]) + LAST_CHUNK + b"NEXT"],
            0,
            b"NEXT",
            id="chunked",
        ),
        pytest.param("length", [EVENTS[0], EVENTS[1]], len(b"".join(EVENTS)), b"", id="length"),
        pytest.param("close", [EVENTS[0], EVENTS[1], EOF], 0, b"", id="close"),
    ],
)
async def test_each_upstream_framing_ends_cleanly(
    kind: str, script: list[ScriptItem], length: int, leftover: bytes
) -> None:
    """The relay decodes each upstream framing: the last chunk (bytes past it are
    ``leftover``), ``Content-Length`` (no read past it), or EOF; the client gets the
    events unchanged, one write per read, and the hook sees each event."""
    seen: list[SSEEvent] = []

    async def on_event(event: SSEEvent) -> None:
        seen.append(event)

    up = ScriptedStream([*script, b"never"])
    down = ScriptedStream()
    relay = make_relay(up, down, on_event=on_event)
    await relay.run(b"", kind, length)
    assert down.writes == list(EVENTS)
    assert relay.leftover == leftover
    assert up.script_left == [b"never"] or kind == "close"
    assert [e.data for e in seen] == ["zero", "one"]


async def test_bytes_read_with_the_head_go_first() -> None:
    """``first`` (body bytes read along with the head) is delivered before any read, and a
    ``Content-Length`` body it completes needs no read at all."""
    up = ScriptedStream([b"never"])
    down = ScriptedStream()
    await make_relay(up, down).run(EVENTS[0], "length", len(EVENTS[0]))
    assert down.writes == [EVENTS[0]]
    assert up.reads == 0


@pytest.mark.parametrize(
    ("kind", "script", "length"),
    [
        pytest.param("chunked", [chunk(EVENTS[0]), StreamBroken("ECONNRESET")], 0, id="reset"),
        pytest.param("chunked", [chunk(EVENTS[0]), EOF], 0, id="chunked-eof"),
        pytest.param("length", [EVENTS[0], EOF], 1000, id="length-short"),
        pytest.param("close", [EVENTS[0], StreamBroken("ECONNRESET")], 0, id="close-reset"),
    ],
)
@pytest.mark.parametrize("mid_event", [False, True])
async def test_upstream_failure_then_one_error_event_at_a_boundary(
    kind: str, script: list[ScriptItem], length: int, mid_event: bool
) -> None:
    """An upstream that dies after the head (reset, EOF before the body's end) is a
    ``SourceFailed``; ``finish(error)`` then writes the error event right after the last
    complete event (the start of an unfinished one was held back, and is dropped) and
    the last chunk: a clean end the browser parses, no partial event dispatched."""
    if mid_event:
        script = [*script[:-1], b"data: par" if kind != "chunked" else chunk(b"data: par")]
        script.append(StreamBroken("ECONNRESET") if kind != "length" else EOF)
    up = ScriptedStream(script)
    down = ScriptedStream()
    relay = make_relay(up, down, chunked_out=True)
    with pytest.raises(SourceFailed):
        await relay.run(b"", kind, length)
    await relay.finish(ERROR)
    payloads = unchunk(down.writes[:-1])
    assert down.writes[-1] == LAST_CHUNK
    assert payloads[-1] == ERROR
    assert b"data: par" not in down.written, "the unfinished event was held, then dropped"
    parser = SSEParser()
    events = parser.feed(b"".join(payloads))
    assert parser.at_boundary
    assert events[0].data == "zero"
    assert [e.type for e in events].count("error") == 1
    assert events[-1].type == "error"
    assert json.loads(events[-1].data)["status"] == 502


async def test_malformed_chunked_upstream_is_framing_error() -> None:
    """The relay validates the upstream's chunked framing as it decodes it."""
    up = ScriptedStream([chunk(EVENTS[0]), b"zz\r\n"])
    down = ScriptedStream()
    with pytest.raises(FramingError):
        await make_relay(up, down).run(b"", "chunked", 0)
    assert down.written == EVENTS[0]


# --------------------------------------------------------------------------- long events


async def test_a_long_event_is_relayed_in_bounded_reads_and_kept_bounded(
    autojump_clock: MockClock,
) -> None:
    """One 100 KB event, the parser bounded to 1 KiB, 20 s pauses inside the event: its
    first ``HOLD_MAX`` bytes are held (heartbeats still go out meanwhile: the client is
    between events), then it goes out as it arrives in reads of at most 4 KiB, with no
    heartbeat inside it; the relay holds at most ``HOLD_MAX`` + one read, the parser
    keeps only a bounded start of it (``truncated``) and still finds the boundary."""
    event = b"data: " + b"x" * 100_000 + b"\n\n"
    parts: list[ScriptItem] = []
    for i in range(0, len(event), 10_000):
        parts += [event[i : i + 10_000], Pause(20)]
    up = ScriptedStream([*parts, b"data: after\n\n", EOF])
    down = ScriptedStream()
    parser = SSEParser(max_bytes=1024)
    seen: list[SSEEvent] = []

    async def on_event(e: SSEEvent) -> None:
        seen.append(e)

    relay = make_relay(up, down, parser=parser, on_event=on_event)
    await relay.run(b"", "close", 0)
    at = down.written.index(b"data: ")
    assert HEARTBEAT in down.written[:at], "heartbeats go on while the start is held"
    assert down.written[at : at + len(event)] == event, "no heartbeat inside the event"
    assert down.written.replace(HEARTBEAT, b"") == event + b"data: after\n\n"
    assert max(len(w) for w in down.writes) <= HOLD_MAX + CHUNK
    sizes = [len(w) for w in down.writes if w != HEARTBEAT]
    assert sizes[0] > HOLD_MAX and max(sizes[1:-1]) <= CHUNK
    assert parser.truncated
    assert len(seen) == 2
    assert 0 < len(seen[0].data) <= 1024
    assert seen[1].data == "after"
    assert HEARTBEAT in down.written[at + len(event) :], "the cadence resumes after the event"


async def test_the_hook_runs_after_the_client_got_the_event() -> None:
    """Forward first, parse after: when ``on_event`` runs for an event, its bytes were
    already written to the client."""
    up = ScriptedStream([EVENTS[0][:5], EVENTS[0][5:] + EVENTS[1], EOF])
    down = ScriptedStream()
    written_at_hook: list[bytes] = []

    async def on_event(e: SSEEvent) -> None:
        written_at_hook.append(down.written)

    await make_relay(up, down, on_event=on_event).run(b"", "close", 0)
    assert written_at_hook == [b"".join(EVENTS), b"".join(EVENTS)]
