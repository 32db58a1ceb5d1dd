"""Differential fuzzing of ``ChunkedScanner``'s whole-chunk fast path.

The oracle is the scanner as it was before the fast path (``chunked_reference``: the
byte-wise states only) and, for every body accepted, h11. Every call of ``feed`` must
give exactly the same results (return value, spans, counters, ``trailer_start``,
``done``, and the same error message at the same call) for any body, any windows (the
fast path runs on windows that start on a chunk boundary: cuts there are drawn often)
and any limits.
"""

from __future__ import annotations

import itertools

import h11
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from proxycore.http.chunked import ChunkedError, ChunkedScanner
from tests.unit import chunked_reference as ref

FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
HEAD = b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"

Scanner = ChunkedScanner | ref.ChunkedScanner
Step = tuple[object, ...]


def trace(
    sc: Scanner, buf: bytes, cuts: list[int], kind: str = "bytes", with_spans: bool = True
) -> list[Step]:
    """Feed ``buf`` in the windows ``cuts`` makes; every call's observable results."""
    data: bytes | bytearray | memoryview = buf
    if kind == "bytearray":
        data = bytearray(buf)
    elif kind == "memoryview":
        data = memoryview(bytearray(buf))
    steps: list[Step] = []
    for a, b in itertools.pairwise([0, *sorted(cuts), len(buf)]):
        spans: list[tuple[int, int]] | None = [] if with_spans else None
        try:
            r = sc.feed(data, a, b, spans)
        except (ChunkedError, ref.ChunkedError) as exc:
            steps.append(("error", str(exc)))
            return steps
        steps.append((r, spans, sc.payload_bytes, sc.declared_bytes, sc.trailer_start, sc.done))
    return steps


def pieces_trace(sc: Scanner, buf: bytes, cuts: list[int]) -> list[Step]:
    """Feed separate byte strings (a fresh object per read, as ``sock.recv`` gives)."""
    steps: list[Step] = []
    for a, b in itertools.pairwise([0, *sorted(cuts), len(buf)]):
        spans: list[tuple[int, int]] = []
        try:
            r = sc.feed(buf[a:b], spans=spans)
        except (ChunkedError, ref.ChunkedError) as exc:
            steps.append(("error", str(exc)))
            return steps
        steps.append((r, spans, sc.payload_bytes, sc.declared_bytes, sc.trailer_start, sc.done))
    return steps


def same(buf: bytes, cuts: list[int], **limits: int) -> list[Step]:
    """Assert the fast scanner behaves exactly as the reference; return its trace."""
    got = trace(ChunkedScanner(**limits), buf, cuts)
    assert got == trace(ref.ChunkedScanner(**limits), buf, cuts)
    return got


# --------------------------------------------------------------------------- strategies

TEXT_BYTES = [9, *range(0x20, 0x7F), *range(0x80, 0x100)]
TOKEN_CHARS = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
# Framing-ish bytes, and what a lax parser would take in a size: sign, space, underscore,
# "0x", a 17th digit, bare CR or LF, controls.
MUTATION_BYTES = b"\r\n\r\n \t;:=_0019aAfFxX-+\x00\x01\x0b\x7f\x80\xffz"


@st.composite
def sse_bodies(draw: st.DrawFn) -> tuple[bytes, list[int]]:
    """A chunked body of many chunks (SSE-like) and the offsets where its chunks start."""
    out = bytearray()
    bounds = []
    for _ in range(draw(st.integers(0, 8))):
        bounds.append(len(out))
        payload = draw(st.binary(min_size=1, max_size=60))
        if draw(st.integers(0, 4)) == 0:  # framing look-alikes inside the data
            payload += draw(st.sampled_from([b"\r\n", b"0\r\n\r\n", b"5\r\n", b"\n\n"]))
        digits = f"{len(payload):x}"
        zeros = draw(st.integers(0, 2)) if draw(st.booleans()) else 16 - len(digits)
        digits = "0" * min(zeros, 16 - len(digits)) + digits
        out += (digits.upper() if draw(st.booleans()) else digits).encode()
        if draw(st.integers(0, 3)) == 0:
            out += b";" + bytes(draw(st.lists(st.sampled_from(TEXT_BYTES), max_size=10)))
        out += b"\r\n" + payload + b"\r\n"
    bounds.append(len(out))
    out += b"0\r\n"
    if draw(st.booleans()):
        name = draw(st.text(TOKEN_CHARS, min_size=1, max_size=8)).encode()
        if name.lower() not in (b"content-length", b"transfer-encoding"):
            out += name + b": v\r\n"
    out += b"\r\n"
    return bytes(out), bounds


@st.composite
def mutated(draw: st.DrawFn) -> tuple[bytes, list[int]]:
    body, bounds = draw(sse_bodies())
    buf = bytearray(body)
    for _ in range(draw(st.integers(0, 3))):
        pos = draw(st.integers(0, len(buf)))
        op = draw(st.sampled_from(["insert", "replace", "delete"]))
        byte = bytes([draw(st.sampled_from(MUTATION_BYTES))])
        if op == "insert":
            buf[pos:pos] = byte
        elif pos < len(buf):
            buf[pos : pos + 1] = b"" if op == "delete" else byte
    return bytes(buf) + draw(st.sampled_from([b"", b"GET / HTTP/1.1\r\n\r\n"])), bounds


@st.composite
def windows(draw: st.DrawFn, buf: bytes, bounds: list[int]) -> list[int]:
    """Cuts: mostly on chunk boundaries (the fast path's case), some anywhere."""
    on_bounds = [b for b in bounds if 0 < b < len(buf) and draw(st.booleans())]
    anywhere = draw(st.lists(st.integers(0, len(buf)), max_size=3))
    return sorted(set(on_bounds + anywhere))


def h11_reads(buf: bytes) -> tuple[bytes, bytes]:
    """h11's reading of ``buf`` as a chunked body: (payload, bytes after it)."""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(HEAD + buf)
    assert isinstance(conn.next_event(), h11.Request)
    data = bytearray()
    while True:
        ev = conn.next_event()  # must not raise: the scanner accepted this body
        if isinstance(ev, h11.Data):
            data += ev.data
            continue
        assert isinstance(ev, h11.EndOfMessage), ev
        return bytes(data), conn.trailing_data[0]


# --------------------------------------------------------------------------- tests


@FUZZ
@given(mutated(), st.data())
def test_fast_path_matches_reference_and_h11(
    case: tuple[bytes, list[int]], data: st.DataObject
) -> None:
    buf, bounds = case
    cuts = data.draw(windows(buf, bounds))
    got = same(buf, cuts)
    same(buf, [])
    kind = data.draw(st.sampled_from(["bytes", "bytearray", "memoryview"]))
    assert trace(ChunkedScanner(), buf, cuts, kind) == trace(ref.ChunkedScanner(), buf, cuts, kind)
    assert pieces_trace(ChunkedScanner(), buf, cuts) == pieces_trace(
        ref.ChunkedScanner(), buf, cuts
    )
    assert trace(ChunkedScanner(), buf, cuts, with_spans=False) == trace(
        ref.ChunkedScanner(), buf, cuts, with_spans=False
    )
    last = got[-1]
    event("error" if last[0] == "error" else "done" if last[-1] else "incomplete")
    if last[0] != "error" and last[-1]:
        end = next(step[0] for step in got if step[-1])  # the call that finished the body
        assert isinstance(end, int)
        payload = bytearray()
        for step in got:
            spans = step[1]
            assert isinstance(spans, list)
            payload += b"".join(buf[s:e] for s, e in spans)
        assert h11_reads(buf) == (bytes(payload), buf[end:])


@FUZZ
@given(mutated(), st.integers(3, 40), st.integers(2, 60), st.data())
def test_fast_path_matches_reference_with_small_limits(
    case: tuple[bytes, list[int]], max_line: int, max_trailer: int, data: st.DataObject
) -> None:
    buf, bounds = case
    cuts = data.draw(windows(buf, bounds))
    same(buf, cuts, max_line_bytes=max_line, max_trailer_bytes=max_trailer)


@FUZZ
@given(st.lists(st.sampled_from(MUTATION_BYTES), max_size=40).map(bytes), st.data())
def test_fast_path_matches_reference_on_garbage(buf: bytes, data: st.DataObject) -> None:
    cuts = data.draw(st.lists(st.integers(0, len(buf)), max_size=4))
    same(buf, cuts)
    same(buf, list(range(1, len(buf))))


LAX_SIZES = [
    b"+5",
    b"-5",
    b" 5",
    b"5 ",
    b"\t5",
    b"5_0",
    b"0x5",
    b"0X5",
    b"",
    b"g",
    b"5\x00",
    b"00000000000000005",  # 17 digits
    b"\xef\xbc\x95",  # a full-width digit (int() would take it from a str)
]


def test_lax_sizes_refused_as_before() -> None:
    """What ``int(x, 16)`` or a lax parser would take is refused, with the same error."""
    for size in LAX_SIZES:
        for tail in (b"\r\nhello\r\n0\r\n\r\n", b";x\r\nhello\r\n0\r\n\r\n"):
            body = b"5\r\nhello\r\n" + size + tail
            steps = same(body, [])
            assert steps[-1][0] == "error", size
            assert same(body, [10])[-1] == steps[-1]  # the bad line starts a window


def test_data_not_followed_by_crlf_refused_as_before() -> None:
    for bad in (
        b"5\r\nhelloX\r\n0\r\n\r\n",
        b"5\r\nhello\rX0\r\n\r\n",
        b"5\r\nhello\n0\r\n\r\n",
        b"5\r\nhello\r\r\n0\r\n\r\n",
        b"4\r\nhello\r\n0\r\n\r\n",
    ):
        steps = same(bad + b"5\r\nhello\r\n", [])
        assert steps[-1][0] == "error"


def test_whole_chunks_one_step_each() -> None:
    """The SSE shape: each read holds whole chunks; results as before, spans per chunk."""
    ev = b"data: {}\n\n"
    chunk = b"%x\r\n" % len(ev) + ev + b"\r\n"
    buf = chunk * 3 + b"0\r\n\r\n"
    steps = same(buf, [len(chunk), 3 * len(chunk)])
    assert steps[0] == (len(chunk), [(3, 3 + len(ev))], len(ev), len(ev), len(chunk), False)
    assert steps[-1][-1] is True


def test_size_line_limit_in_fast_path() -> None:
    """A whole size line longer than ``max_line_bytes`` is refused exactly as before."""
    body = b"5;" + b"e" * 20 + b"\r\nhello\r\n0\r\n\r\n"
    for limit in range(3, 30):
        same(body, [], max_line_bytes=limit)
        same(b"5\r\nhello\r\n" + body, [10], max_line_bytes=limit)
