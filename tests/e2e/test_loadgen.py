"""The load generator (proxycore.tools.loadgen) and its command line (proxycore.cli.loadtest).

Upstreams: the LLM-like simulator (``proxycore.tools.sim``, hypercorn) for realistic runs,
and raw sockets (``start_raw_server``) wherever the bytes on the wire or the number
of accepted connections matter. Every test is capped with ``fail_after``; the whole
file runs in a few seconds on real clocks, so time bounds asserted here are loose.

SSE counting rule: ``events`` counts every SSE event that has a ``data:`` field,
so each simulator stream of N deltas counts N + 1 (the final ``done`` event too),
while ``event_delay`` has one sample per event carrying ``t_ns`` (the N deltas).
"""

from __future__ import annotations

import argparse
import json
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio

from proxycore.cli import loadtest as loadtest_cli
from proxycore.tools.hdr import LOWEST
from proxycore.tools.loadgen import ERROR_KINDS, LoadProgress, LoadResult, LoadSpec, run_load
from proxycore.tools.sim import Receive, Scope, Send, make_app
from tests.helpers import start_app, start_raw_server

SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
)
OK_2 = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

Handler = Callable[[trio.SocketStream], Awaitable[None]]


# --------------------------------------------------------------------------- helpers


@pytest.fixture
async def sim(nursery: trio.Nursery) -> tuple[str, int]:
    """The simulator on 127.0.0.1 (free port)."""
    return await start_app(nursery, make_app())


async def status_app(scope: Scope, receive: Receive, send: Send) -> None:
    """Answers ``/status/NNN`` with that status and a small body."""
    if scope["type"] != "http":
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
        return
    status = int(scope["path"].rsplit("/", 1)[-1])
    body = b"status %d\n" % status
    headers = [(b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def read_head(stream: trio.SocketStream, buf: bytearray) -> bytes | None:
    """One request head off ``stream`` (``buf`` keeps what follows); None at EOF."""
    while (k := buf.find(b"\r\n\r\n")) < 0:
        data = await stream.receive_some(65536)
        if not data:
            return None
        buf += data
    head = bytes(buf[: k + 4])
    del buf[: k + 4]
    return head


def http_handler(
    respond: Callable[[bytes], bytes], *, close: bool = False, accepted: list[bytes] | None = None
) -> Handler:
    """A keep-alive HTTP/1.1 server answering every request head with ``respond(head)``.

    Closes after the first response if ``close`` or the request said Connection: close.
    Appends the first request head of every accepted connection to ``accepted``.
    """

    async def handler(stream: trio.SocketStream) -> None:
        buf = bytearray()
        first = True
        while (head := await read_head(stream, buf)) is not None:
            if first and accepted is not None:
                accepted.append(head)
            first = False
            await stream.send_all(respond(head))
            if close or b"connection: close" in head.lower():
                return

    return handler


async def raw(nursery: trio.Nursery, handler: Handler) -> int:
    return await start_raw_server(nursery, handler)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def assert_consistent(result: LoadResult) -> None:
    assert result.ok + result.errors == result.started
    assert result.errors == sum(result.error_kinds.values())
    assert set(result.error_kinds) <= set(ERROR_KINDS)
    assert result.ttfb.count == result.latency.count == result.ok


# --------------------------------------------------------------------------- closed model


async def test_closed_model_small(sim: tuple[str, int]) -> None:
    with trio.fail_after(10):
        result = await run_load(LoadSpec(*sim, path="/small", requests=50, concurrency=5))
    assert result.ok == 50
    assert result.errors == result.dropped == 0
    assert result.ttfb.count == 50
    assert result.body_bytes == 50 * 100
    assert 1 <= result.connections <= 5  # keep-alive: one connection per slot
    assert 0 < result.ttfb.percentile(50) <= result.latency.percentile(50) < 1.0
    assert result.rps > 0 and result.throughput > 0
    assert_consistent(result)


async def test_keepalive_reuses_connections_and_no_keepalive_opens_fresh(
    nursery: trio.Nursery,
) -> None:
    accepted: list[bytes] = []
    port = await raw(nursery, http_handler(lambda head: OK_2, accepted=accepted))
    with trio.fail_after(10):
        reused = await run_load(LoadSpec("127.0.0.1", port, requests=20, concurrency=2))
        assert (reused.ok, len(accepted), reused.connections) == (20, 2, 2)

        accepted.clear()
        fresh = await run_load(
            LoadSpec("127.0.0.1", port, requests=20, concurrency=2, keepalive=False)
        )
    assert (fresh.ok, len(accepted), fresh.connections) == (20, 20, 20)
    assert all(b"\r\nconnection: close\r\n" in head.lower() for head in accepted)
    assert fresh.connect.count == 20


async def test_dead_keepalive_connection_is_retried_on_a_fresh_one(
    nursery: trio.Nursery,
) -> None:
    # The server closes after every response without saying so (as when its keep-alive
    # timeout fires between two requests): the next request on that connection sees
    # EOF before any byte and is sent again on a new connection, not counted as an error.
    port = await raw(nursery, http_handler(lambda head: OK_2, close=True))
    with trio.fail_after(10):
        result = await run_load(LoadSpec("127.0.0.1", port, requests=10, concurrency=1))
    assert (result.ok, result.errors, result.connections) == (10, 0, 10)


async def test_request_on_the_wire(nursery: trio.Nursery) -> None:
    seen: list[bytes] = []

    async def handler(stream: trio.SocketStream) -> None:
        buf = bytearray()
        head = await read_head(stream, buf)
        assert head is not None
        while len(buf) < 1000:
            buf += await stream.receive_some(65536)
        seen.extend([head, bytes(buf)])
        await stream.send_all(OK_2)

    port = await raw(nursery, handler)
    spec = LoadSpec(
        "127.0.0.1",
        port,
        path="/upload?x=1",
        method="POST",
        headers=(("X-Test", "yes"), ("Authorization", "Bearer s3cret")),
        body=b"b" * 1000,
        requests=1,
        concurrency=1,
    )
    with trio.fail_after(10):
        result = await run_load(spec)
    assert result.ok == 1
    head, body = seen
    assert head.startswith(b"POST /upload?x=1 HTTP/1.1\r\n")
    for line in (b"host: 127.0.0.1:%d" % port, b"x-test: yes", b"content-length: 1000"):
        assert b"\r\n" + line + b"\r\n" in head.lower()
    assert body == b"b" * 1000
    dumped = json.dumps(result.to_json())
    assert "s3cret" not in dumped  # credentials are redacted in the report
    assert result.to_json()["spec"]["headers"] == [  # type: ignore[index]
        ["X-Test", "yes"],
        ["Authorization", "<redacted>"],
    ]


async def test_duration_bounds_the_run(sim: tuple[str, int]) -> None:
    # Each stream takes ~300 ms; starting stops at 0.3 s and the ones in flight finish.
    spec = LoadSpec(
        *sim,
        path="/v1/stream?ttft_ms=0&interval_ms=100&events=3",
        duration=0.3,
        concurrency=3,
    )
    with trio.fail_after(10):
        result = await run_load(spec)
    # Upper bounds only tell a bounded run from an endless one (never a speed limit).
    assert 0.3 <= result.elapsed < 8.0
    assert 3 <= result.ok <= 9
    assert result.errors == 0
    assert_consistent(result)


async def test_timeouts_are_counted_and_bound_the_run(nursery: trio.Nursery) -> None:
    async def never_answers(stream: trio.SocketStream) -> None:
        await trio.sleep_forever()

    port = await raw(nursery, never_answers)
    with trio.fail_after(10):
        counted = await run_load(
            LoadSpec("127.0.0.1", port, requests=4, concurrency=2, timeout=0.2)
        )
        timed = await run_load(
            LoadSpec("127.0.0.1", port, duration=0.2, concurrency=3, timeout=0.3)
        )
    assert counted.error_kinds == {"timeout": 4}
    assert counted.ok == 0
    assert 0.4 <= counted.elapsed < 8.0  # bounded, not endless (no speed assertion)
    assert timed.error_kinds == {"timeout": 3}  # one per slot: none started after 0.2 s
    assert 0.3 <= timed.elapsed < 8.0
    assert_consistent(counted)


# --------------------------------------------------------------------------- SSE


async def test_sse_events_and_delays(sim: tuple[str, int]) -> None:
    spec = LoadSpec(
        *sim,
        path="/v1/stream?events=5&interval_ms=10&ttft_ms=0",
        requests=6,
        concurrency=3,
        sse=True,
    )
    with trio.fail_after(10):
        result = await run_load(spec)
    assert result.ok == 6
    assert result.events == 6 * 6  # 5 deltas + the done event per stream
    assert result.event_delay.count == 6 * 5  # done carries no t_ns: no delay sample
    assert result.event_delay.clamped == 0  # every delay was >= 1 us, none negative
    assert LOWEST <= result.event_delay.min <= result.event_delay.max < 1.0
    assert result.first_event.count == 6
    assert result.ttfb.percentile(0) <= result.first_event.percentile(0)
    assert result.first_event.max <= result.latency.max
    assert_consistent(result)


async def test_sse_split_anywhere_with_crlf_and_chunked_framing(nursery: trio.Nursery) -> None:
    # Events with CRLF line endings, a comment, a named event; the chunked body is
    # written a few bytes at a time so every boundary falls somewhere odd.
    async def handler(stream: trio.SocketStream) -> None:
        buf = bytearray()
        while await read_head(stream, buf) is not None:
            events = (
                b'data: {"type": "text_delta", "seq": 0, "t_ns": %d}\r\n\r\n' % time.time_ns()
                + b": keep-alive comment\r\n\r\n"
                + b"event: ping\r\ndata: x\r\n\r\n"
                + b'data: {"type": "done"}\r\n\r\n'
            )
            wire = SSE_HEAD + chunk(events[:50]) + chunk(events[50:]) + b"0\r\n\r\n"
            for i in range(0, len(wire), 7):
                await stream.send_all(wire[i : i + 7])
                await trio.sleep(0.0005)

    port = await raw(nursery, handler)
    with trio.fail_after(10):
        result = await run_load(LoadSpec("127.0.0.1", port, requests=3, concurrency=1, sse=True))
    assert (result.ok, result.errors, result.connections) == (3, 0, 1)
    assert result.events == 3 * 3  # the comment has no data field
    assert result.event_delay.count == 3
    assert result.first_event.count == 3


async def test_response_framings(nursery: trio.Nursery) -> None:
    """Content-Length, chunked, close-delimited, 1xx, HEAD and 204 are all framed right."""
    responses = {
        b"/length": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
        b"/chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        + chunk(b"hel")
        + chunk(b"lo")
        + b"0\r\nX-Trailer: 1\r\n\r\n",
        b"/continue": b"HTTP/1.1 100 Continue\r\n\r\n"
        + b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
        b"/head": b"HTTP/1.1 200 OK\r\nContent-Length: 12345\r\n\r\n",
        b"/nocontent": b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n",
        b"/untilclose": b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nhello",
        b"/http10": b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\nhello",
    }

    async def handler(stream: trio.SocketStream) -> None:
        buf = bytearray()
        while (head := await read_head(stream, buf)) is not None:
            target = head.split(b" ")[1]
            await stream.send_all(responses[target])
            if target in (b"/untilclose", b"/http10"):
                return

    port = await raw(nursery, handler)
    expected = {  # path: (body bytes per response, connections for 4 requests on 1 slot)
        "/length": (5, 1),
        "/chunked": (5, 1),
        "/continue": (5, 1),
        "/head": (0, 1),
        "/nocontent": (0, 1),
        "/untilclose": (5, 4),
        "/http10": (5, 4),
    }
    with trio.fail_after(10):
        for path, (size, connections) in expected.items():
            method = "HEAD" if path == "/head" else "GET"
            spec = LoadSpec("127.0.0.1", port, path=path, method=method, requests=4, concurrency=1)
            result = await run_load(spec)
            assert (result.ok, result.errors) == (4, 0), path
            assert result.body_bytes == 4 * size, path
            assert result.connections == connections, path


# --------------------------------------------------------------------------- errors


async def test_connect_errors() -> None:
    with trio.fail_after(10):
        result = await run_load(LoadSpec("127.0.0.1", closed_port(), requests=10, concurrency=2))
    assert result.error_kinds == {"connect": 10}
    assert (result.ok, result.errors, result.connections) == (0, 10, 0)
    assert result.ttfb.count == 0
    assert_consistent(result)


async def test_status_errors(nursery: trio.Nursery) -> None:
    host, port = await start_app(nursery, status_app)
    with trio.fail_after(10):
        server_error = await run_load(
            LoadSpec(host, port, path="/status/500", requests=6, concurrency=2)
        )
        client_error = await run_load(
            LoadSpec(host, port, path="/status/404", requests=3, concurrency=1)
        )
        fine = await run_load(LoadSpec(host, port, path="/status/204", requests=3))
    assert server_error.error_kinds == {"status_5xx": 6}
    assert server_error.ok == 0
    assert server_error.connections <= 2  # error responses keep the connection
    assert server_error.ttfb.count == 0  # timings are for successful responses only
    assert client_error.error_kinds == {"status_4xx": 3}
    assert (fine.ok, fine.errors) == (3, 0)


@pytest.mark.parametrize(
    ("wire", "kind"),
    [
        (b"SSH-2.0-OpenSSH_9.6\r\n\r\n", "protocol"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", "protocol"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", "protocol"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "protocol"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello", "reset"),  # then EOF
        (b"HTTP/1.1 200 OK\r\nContent-Le", "reset"),  # EOF inside the head
        (b"", "reset"),  # EOF before any byte on a fresh connection
    ],
)
async def test_broken_responses(nursery: trio.Nursery, wire: bytes, kind: str) -> None:
    async def handler(stream: trio.SocketStream) -> None:
        if await read_head(stream, bytearray()) is not None:
            await stream.send_all(wire)

    port = await raw(nursery, handler)
    with trio.fail_after(10):
        result = await run_load(LoadSpec("127.0.0.1", port, requests=3, concurrency=1))
    assert result.error_kinds == {kind: 3}
    assert result.connections == 3


async def test_oversized_response_head_is_a_protocol_error(nursery: trio.Nursery) -> None:
    async def handler(stream: trio.SocketStream) -> None:
        if await read_head(stream, bytearray()) is not None:
            await stream.send_all(b"HTTP/1.1 200 OK\r\n" + b"X-Big: aaaaaaaa\r\n" * 10_000)
            await trio.sleep_forever()

    port = await raw(nursery, handler)
    with trio.fail_after(10):
        result = await run_load(LoadSpec("127.0.0.1", port, requests=1, timeout=5))
    assert result.error_kinds == {"protocol": 1}


# --------------------------------------------------------------------------- open model


async def test_rate_mode_starts_about_rate_times_duration(sim: tuple[str, int]) -> None:
    spec = LoadSpec(*sim, path="/small", rate=100, duration=0.5, concurrency=10)
    with trio.fail_after(10):
        result = await run_load(spec)
    assert 20 <= result.started + result.dropped <= 80
    assert result.ok >= 20
    assert_consistent(result)


async def test_open_model_latency_includes_queueing_behind_a_stalled_server(
    nursery: trio.Nursery,
) -> None:
    # One slot, 20 arrivals/s, and a server that stalls 500 ms on the first request then
    # answers at once. Arrivals 2..10 (intended at 50..450 ms) wait for the slot: timed
    # from their intended start (no coordinated omission) they took >= 500 - 50 i ms, so
    # the median is >= 250 ms; timed from the send it would be about a millisecond.
    stalled = False

    async def handler(stream: trio.SocketStream) -> None:
        nonlocal stalled
        buf = bytearray()
        while await read_head(stream, buf) is not None:
            if not stalled:
                stalled = True
                await trio.sleep(0.5)
            await stream.send_all(OK_2)

    port = await raw(nursery, handler)
    spec = LoadSpec("127.0.0.1", port, rate=20, requests=10, concurrency=1, timeout=5)
    with trio.fail_after(10):
        result = await run_load(spec)
    assert (result.ok, result.errors, result.dropped) == (10, 0, 0)
    assert result.latency.max >= 0.5
    assert result.latency.percentile(50) >= 0.25
    assert result.queue.count == 10
    assert result.queue.max >= 0.45  # the second arrival waited for the stalled first
    assert result.latency.max < 8.0  # bounded, no speed limit
    assert_consistent(result)


async def test_open_model_timeout_runs_from_the_intended_start(nursery: trio.Nursery) -> None:
    # A server that never answers, one slot, 20 arrivals 50 ms apart, timeout 0.3 s.
    # Each request is due by its intended start + 0.3 s, so the slot frees when the next
    # arrival has waited 0.25 s: it is still sent (50 ms to spare) and times out 50 ms
    # later; all 20 are sent and time out, and the run takes about 1.3 s. Timed from
    # each send instead, every request would hold the slot 0.3 s and the arrivals behind
    # it would pass their due time unsent (dropped): about 4 sent of 20.
    async def never_answers(stream: trio.SocketStream) -> None:
        await trio.sleep_forever()

    port = await raw(nursery, never_answers)
    spec = LoadSpec("127.0.0.1", port, rate=20, requests=20, concurrency=1, timeout=0.3)
    with trio.fail_after(10):
        result = await run_load(spec)
    assert result.started + result.dropped == 20
    assert result.started >= 15  # a dropped arrival needs a 50 ms stall of the generator
    assert result.error_kinds == {"timeout": result.started}
    assert result.to_json()["error_rate"] == 1.0
    assert 0.3 <= result.elapsed < 8.0  # bounded, no speed limit


# --------------------------------------------------------------------------- slow reader, progress


async def test_read_rate_throttles_the_reader(nursery: trio.Nursery) -> None:
    body = b"z" * 16384
    head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body)
    port = await raw(nursery, http_handler(lambda _: head + body))
    with trio.fail_after(10):
        result = await run_load(
            LoadSpec("127.0.0.1", port, requests=1, concurrency=1, read_rate=32768)
        )
    assert result.ok == 1
    assert result.body_bytes == len(body)
    # ~0.5 s for the head and 16 KiB at 32 KiB/s; unthrottled it takes about a millisecond.
    assert result.latency.max >= 0.35


async def test_progress_callback(sim: tuple[str, int]) -> None:
    seen: list[LoadProgress] = []
    spec = LoadSpec(*sim, path="/small", duration=0.5, concurrency=2)
    with trio.fail_after(10):
        result = await run_load(spec, progress=seen.append, progress_interval=0.1)
    assert 2 <= len(seen) <= 6  # every 0.1 s for 0.5 s, give or take a slow machine
    assert [p.elapsed for p in seen] == sorted(p.elapsed for p in seen)
    last = seen[-1]
    assert 0 < last.ok <= result.ok
    assert last.done == last.ok + last.errors
    assert 0 <= last.in_flight <= 2
    assert 0 < last.ttfb_p50 <= last.ttfb_p99
    assert last.rps > 0


# --------------------------------------------------------------------------- spec, JSON


def test_spec_must_be_bounded_and_valid() -> None:
    with pytest.raises(ValueError, match="requests or duration"):
        LoadSpec("127.0.0.1", 80)
    bad: list[dict[str, object]] = [
        {"concurrency": 0},
        {"requests": 0},
        {"duration": -1.0},
        {"rate": float("inf")},
        {"timeout": 0.0},
        {"read_rate": 0},
        {"path": "relative"},
        {"method": "GET /"},
        {"headers": (("Bad Name", "x"),)},
        {"headers": (("Transfer-Encoding", "chunked"),)},
        {"headers": (("Content-Length", "3"),), "body": b"four"},
    ]
    for fields in bad:
        with pytest.raises(ValueError):
            LoadSpec("127.0.0.1", 80, **({"requests": 1} | fields))  # type: ignore[arg-type]


async def test_progress_interval_must_be_positive() -> None:
    with pytest.raises(ValueError, match="progress_interval"):
        await run_load(LoadSpec("127.0.0.1", 80, requests=1), progress_interval=0)


async def test_to_json(sim: tuple[str, int]) -> None:
    with trio.fail_after(10):
        result = await run_load(LoadSpec(*sim, path="/small", requests=10, concurrency=2))
    data = json.loads(json.dumps(result.to_json(), allow_nan=False))
    assert set(data) == {
        "spec",
        "ok",
        "errors",
        "dropped",
        "started",
        "connections",
        "error_kinds",
        "elapsed",
        "rps",
        "throughput",
        "body_bytes",
        "events",
        "ttfb",
        "latency",
        "first_event",
        "event_delay",
        "connect",
        "ttft",
        "itl",
        "queue",
        "stream_tps",
        "output_tokens",
        "tokens_source",
        "tokens_per_s",
        "error_rate",
        "mcp",
        "cpu_seconds",
        "cpu_share",
    }
    assert data["ok"] == 10
    assert data["cpu_seconds"] > 0
    for name in ("ttfb", "latency", "first_event", "event_delay", "connect", "ttft", "itl"):
        assert set(data[name]) == {"p50", "p90", "p99", "p99.9", "max", "mean", "count"}
    assert data["ttfb"]["count"] == 10
    assert 0 < data["ttfb"]["p50"] < 1000  # milliseconds
    assert data["spec"]["path"] == "/small"


# --------------------------------------------------------------------------- CLI


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="proxycore loadtest")
    loadtest_cli.add_arguments(parser)
    return parser.parse_args(argv)


async def test_cli_json(sim: tuple[str, int], capsys: pytest.CaptureFixture[str]) -> None:
    host, port = sim
    args = parse(f"http://{host}:{port}/small", "-c", "2", "-n", "8", "--json")
    with trio.fail_after(10):
        code = await trio.to_thread.run_sync(loadtest_cli.run, args)
    out = capsys.readouterr().out
    assert code == 0
    data = json.loads(out)
    assert data["ok"] == 8
    assert data["spec"]["concurrency"] == 2


async def test_cli_plain_output(sim: tuple[str, int], capsys: pytest.CaptureFixture[str]) -> None:
    host, port = sim
    url = f"http://{host}:{port}/v1/stream?events=3&interval_ms=5&ttft_ms=0"
    args = parse(url, "-c", "2", "-d", "0.3", "--sse", "-H", "X-A: b")
    with trio.fail_after(10):
        code = await trio.to_thread.run_sync(loadtest_cli.run, args)
    out = capsys.readouterr().out
    assert code == 0
    for text in ("requests ok", "rps", "throughput", "p50", "p99", "p99.9", "max"):
        assert text in out
    for metric in ("ttfb", "latency", "first_event", "event_delay"):
        assert metric in out


async def test_cli_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    with trio.fail_after(10):
        nothing = await trio.to_thread.run_sync(
            loadtest_cli.run, parse(f"http://127.0.0.1:{closed_port()}/", "-n", "3")
        )
    assert nothing == 1
    assert "could not connect" in capsys.readouterr().err

    assert loadtest_cli.run(parse("ftp://127.0.0.1/", "-n", "1")) == 2
    assert (
        loadtest_cli.run(parse("http://127.0.0.1/", "-n", "1", "--body-file", "/nonexistent")) == 2
    )
    capsys.readouterr()

    for argv in (
        ("http://127.0.0.1/",),  # neither -n nor -d
        ("http://127.0.0.1/", "-n", "1", "-d", "1"),
        ("http://127.0.0.1/", "-n", "0"),
        ("http://127.0.0.1/", "-n", "1", "-H", "no colon"),
        ("http://127.0.0.1/", "-d", "nan"),
    ):
        with pytest.raises(SystemExit) as exc:
            parse(*argv)
        assert exc.value.code == 2


def test_cli_spec_from_args(tmp_path: Path) -> None:
    args = parse("http://[::1]:8080/a/b?q=1", "-n", "5", "--no-keepalive", "--rate", "50")
    spec = loadtest_cli.spec_from_args(args)
    assert (spec.host, spec.port, spec.path, spec.tls) == ("::1", 8080, "/a/b?q=1", False)
    assert (spec.requests, spec.rate, spec.keepalive, spec.method) == (5, 50.0, False, "GET")
    assert spec.authority == "[::1]:8080"
    default_port = loadtest_cli.spec_from_args(parse("http://example.test", "-d", "1"))
    assert (default_port.port, default_port.path, default_port.duration) == (80, "/", 1.0)
    https = loadtest_cli.spec_from_args(parse("https://example.test/v1", "-n", "1"))
    assert (https.tls, https.port, https.url) == (True, 443, "https://example.test:443/v1")
    body = tmp_path / "body.json"
    body.write_bytes(b'{"prompt": "hi"}')
    upload = loadtest_cli.spec_from_args(
        parse("http://h/v1/x", "-n", "1", "--body-file", str(body), "-H", "A:  b ")
    )
    assert (upload.method, upload.body, upload.headers) == (
        "POST",
        body.read_bytes(),
        (("A", "b"),),
    )
