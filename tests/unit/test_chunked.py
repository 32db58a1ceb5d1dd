"""Tests for proxycore.http.chunked: the strict incremental chunked-body scanner."""

from __future__ import annotations

import ast
import itertools
import random
from pathlib import Path

import h11
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import proxycore.http.chunked
from proxycore.http.chunked import LAST_CHUNK, ChunkedError, ChunkedScanner, encode_chunk_header

NEXT = b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n"  # a pipelined request after the body
SECRET = b"sk-live-hunter2-TOPSECRET"
HYPOTHESIS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --------------------------------------------------------------------------- helpers


def scan_windows(
    buf: bytes, cuts: list[int], scanner: ChunkedScanner | None = None
) -> tuple[bytes, int | None]:
    """Feed buf as consecutive windows [cuts[k], cuts[k+1]) of one buffer.

    Returns (decoded payload, end offset or None if not done) and checks the return value
    contract of every call on the way."""
    sc = scanner or ChunkedScanner()
    bounds = [0, *cuts, len(buf)]
    payload = bytearray()
    end: int | None = None
    for a, b in itertools.pairwise(bounds):
        spans: list[tuple[int, int]] = []
        was_done = sc.done
        r = sc.feed(buf, a, b, spans)
        assert a <= r <= b
        assert a <= sc.trailer_start <= r
        assert sc.declared_bytes >= sc.payload_bytes
        if was_done:
            assert r == a and spans == [] and sc.trailer_start == a
            continue
        for s, e in spans:
            assert a <= s < e <= r
            payload += buf[s:e]
        if sc.done:
            end = r
        else:
            assert r == b
    assert sc.payload_bytes == len(payload)
    return bytes(payload), end


def scan_pieces(pieces: list[bytes]) -> tuple[bytes, int | None]:
    """Feed separate byte strings (spans are relative to each piece)."""
    sc = ChunkedScanner()
    payload = bytearray()
    offset = 0
    for piece in pieces:
        spans: list[tuple[int, int]] = []
        r = sc.feed(piece, spans=spans)
        payload += b"".join(piece[s:e] for s, e in spans)
        if sc.done:
            return bytes(payload), offset + r
        offset += len(piece)
    return bytes(payload), None


def drop_trailers(buf: bytes, cuts: list[int]) -> bytes:
    """What a pump dropping trailers writes for buf fed in windows (see ``trailer_start``):
    each window up to its trailer section, then CRLF once the body is done."""
    sc = ChunkedScanner()
    out = bytearray()
    for a, b in itertools.pairwise([0, *cuts, len(buf)]):
        if sc.done:
            break
        sc.feed(buf, a, b)
        out += buf[a : sc.trailer_start]
    assert sc.done
    return bytes(out) + b"\r\n"


def h11_body(body: bytes) -> tuple[bytes, list[tuple[bytes, bytes]], bytes]:
    """h11's reading of a chunked request body: (payload, trailers, bytes after it)."""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(HEAD + body)
    assert isinstance(conn.next_event(), h11.Request)
    data = bytearray()
    while True:
        ev = conn.next_event()
        if isinstance(ev, h11.Data):
            data += ev.data
            continue
        assert isinstance(ev, h11.EndOfMessage), ev
        return bytes(data), list(ev.headers), conn.trailing_data[0]


def byte_cuts(n: int) -> list[int]:
    return list(range(1, n))


def raises_everywhere(body: bytes, **limits: int) -> list[str]:
    """Assert body is rejected all at once, byte by byte and at every split; return messages."""
    messages = []
    splits: list[list[int]] = [[], byte_cuts(len(body))]
    if len(body) < 300:
        splits += [[p] for p in range(1, len(body))]
    for cuts in splits:
        sc = ChunkedScanner(**limits)
        with pytest.raises(ChunkedError) as info:
            scan_windows(body, cuts, sc)
        assert not sc.done
        messages.append(str(info.value))
        with pytest.raises(ChunkedError):  # a failed scanner stays failed
            sc.feed(b"0\r\n\r\n")
    return messages


# --------------------------------------------------------------------------- valid bodies

VALID: list[tuple[str, bytes, bytes]] = [
    ("single", b"5\r\nhello\r\n0\r\n\r\n", b"hello"),
    ("many", b"1\r\na\r\n2\r\nbc\r\n3\r\ndef\r\n4\r\nghij\r\n0\r\n\r\n", b"abcdefghij"),
    ("empty", b"0\r\n\r\n", b""),
    ("upper-hex", b"A\r\n0123456789\r\n0\r\n\r\n", b"0123456789"),
    ("lower-hex", b"a\r\n0123456789\r\n0\r\n\r\n", b"0123456789"),
    ("mixed-hex", b"1a\r\n" + b"x" * 26 + b"\r\n0\r\n\r\n", b"x" * 26),
    ("leading-zeros", b"0005\r\nhello\r\n000\r\n\r\n", b"hello"),
    ("16-digits", b"000000000000000A\r\n0123456789\r\n0000000000000000\r\n\r\n", b"0123456789"),
    ("ext", b'5;name=value;q="a b"\r\nhello\r\n0;last\r\n\r\n', b"hello"),
    ("ext-empty", b"5;\r\nhello\r\n0;\r\n\r\n", b"hello"),
    ("ext-htab-obs-text", b"3;a=\tb \x80\xff\r\nabc\r\n0\r\n\r\n", b"abc"),
    ("trailers", b"5\r\nhello\r\n0\r\nX-Sum: abc\r\nX-B:\t v  w \r\nEmpty:\r\n\r\n", b"hello"),
    ("trailer-obs-text", b"0\r\nX: \x80\xfe\xff~\r\n\r\n", b""),
    ("framing-in-data", b"7\r\n0\r\n\r\nab\r\n0\r\n\r\n", b"0\r\n\r\nab"),
    ("binary-data", b"4\r\n\x00\r\n\n\r\n0\r\n\r\n", b"\x00\r\n\n"),
]


@pytest.mark.parametrize(("body", "payload"), [v[1:] for v in VALID], ids=[v[0] for v in VALID])
def test_valid_bodies_any_split(body: bytes, payload: bytes) -> None:
    buf = body + NEXT
    expected = (payload, len(body))
    assert scan_windows(buf, []) == expected
    assert scan_windows(buf, byte_cuts(len(buf))) == expected
    for p in range(len(buf) + 1):
        assert scan_windows(buf, [p]) == expected
    for p in range(len(buf) + 1):
        for q in range(p, len(buf) + 1, 3):
            assert scan_windows(buf, [p, q]) == expected
    assert scan_pieces([buf[i : i + 1] for i in range(len(buf))]) == expected
    assert scan_pieces([buf[:3], buf[3:]]) == expected


@pytest.mark.parametrize(("body", "payload"), [v[1:] for v in VALID], ids=[v[0] for v in VALID])
def test_trailer_start_drops_exactly_the_trailer_section(body: bytes, payload: bytes) -> None:
    buf = body + NEXT
    whole = drop_trailers(buf, [])
    # What is kept is the body up to its last-chunk line, untouched; then an empty trailer.
    assert whole.endswith(b"\r\n") and body.startswith(whole[:-2])
    assert h11_body(whole + NEXT) == (payload, [], NEXT)
    _, trailers, _ = h11_body(buf)
    assert (whole == body) == (not trailers)
    for cuts in [byte_cuts(len(buf)), *([p] for p in range(len(buf) + 1))]:
        assert drop_trailers(buf, cuts) == whole


def test_trailer_start_when_trailers_span_windows() -> None:
    body = b"3\r\nabc\r\n0\r\nX-Authenticated-User: root\r\nAuthorization: x\r\n\r\n"
    sc = ChunkedScanner()
    cut1 = body.index(b"0\r\n") + 1  # inside the last-chunk line
    cut2 = body.index(b"Authorization")
    assert sc.feed(body, 0, cut1) == cut1 and sc.trailer_start == cut1
    assert sc.feed(body, cut1, cut2) == cut2 and sc.trailer_start == cut1 + 2
    assert sc.feed(body, cut2) == len(body) and sc.trailer_start == cut2
    assert sc.done


def test_declared_bytes_counts_the_promised_chunk() -> None:
    sc = ChunkedScanner()
    sc.feed(b"ff\r\nabc")
    assert (sc.payload_bytes, sc.declared_bytes) == (3, 255)
    sc.feed(b"x" * 252 + b"\r\n1")
    assert (sc.payload_bytes, sc.declared_bytes) == (255, 255)  # next size line incomplete
    sc.feed(b"0\r\n")
    assert (sc.payload_bytes, sc.declared_bytes) == (255, 255 + 16)


def test_input_types_and_window_offsets() -> None:
    body = b"3;x\r\nabc\r\n2\r\nde\r\n0\r\nT: v\r\n\r\n"
    prefix = b"HTTP HEAD BYTES"
    raw = prefix + body + NEXT
    for data in (raw, bytearray(raw), memoryview(raw)):
        sc = ChunkedScanner()
        spans: list[tuple[int, int]] = []
        end = sc.feed(data, len(prefix), len(data), spans)
        assert sc.done and end == len(prefix) + len(body)
        assert b"".join(bytes(data[s:e]) for s, e in spans) == b"abcde"
        assert sc.payload_bytes == 5


def test_large_chunk_one_span_per_read() -> None:
    payload = bytes(random.Random(1).randbytes(100_000))
    buf = encode_chunk_header(len(payload)) + payload + b"\r\n" + LAST_CHUNK
    sc = ChunkedScanner()
    spans: list[tuple[int, int]] = []
    for a in range(0, len(buf), 4096):
        sc.feed(buf, a, min(a + 4096, len(buf)), spans)
    assert sc.done
    assert len(spans) == len(range(0, len(buf), 4096))
    assert b"".join(buf[s:e] for s, e in spans) == payload


def test_after_done_feed_consumes_nothing() -> None:
    sc = ChunkedScanner()
    assert sc.feed(LAST_CHUNK) == len(LAST_CHUNK)
    assert sc.done
    spans: list[tuple[int, int]] = []
    assert sc.feed(b"5\r\nhello\r\n", 2, 7, spans) == 2
    assert spans == []
    assert sc.feed(b"") == 0


def test_feed_window_out_of_range() -> None:
    sc = ChunkedScanner()
    for start, end in ((2, 1), (-1, 2), (0, 99)):
        with pytest.raises(ValueError, match="window"):
            sc.feed(b"0\r\n\r\n", start, end)
    assert sc.feed(b"0\r\n\r\n") == 5


def test_encode_chunk_header_and_last_chunk() -> None:
    assert LAST_CHUNK == b"0\r\n\r\n"
    assert encode_chunk_header(0) == b"0\r\n"
    assert encode_chunk_header(255) == b"ff\r\n"
    assert encode_chunk_header(2**64 - 1) == b"ffffffffffffffff\r\n"
    for bad in (-1, 2**64):
        with pytest.raises(ValueError):
            encode_chunk_header(bad)
    body = encode_chunk_header(3) + b"abc\r\n" + LAST_CHUNK
    assert scan_windows(body, []) == (b"abc", len(body))


def test_module_does_not_import_trio() -> None:
    tree = ast.parse(Path(proxycore.http.chunked.__file__).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            assert all(not a.name.startswith("trio") for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert not (node.module or "").startswith("trio")


# --------------------------------------------------------------------------- limits


def size_line(total: int) -> bytes:
    """A size line for a 1-byte chunk, `total` bytes long including CRLF."""
    return b"1;" + b"e" * (total - 4) + b"\r\n"


@pytest.mark.parametrize("limit", [8, 4096])
def test_size_line_limit_boundary(limit: int) -> None:
    ok = size_line(limit) + b"x\r\n0\r\n\r\n"
    for cuts in ([], byte_cuts(len(ok))):
        assert scan_windows(ok, cuts, ChunkedScanner(max_line_bytes=limit)) == (b"x", len(ok))
    raises_everywhere(size_line(limit + 1) + b"x\r\n0\r\n\r\n", max_line_bytes=limit)


def test_size_line_5000_bytes_one_byte_at_a_time() -> None:
    line = b"5;" + b"a" * 4996 + b"\r\n"
    assert len(line) == 5000
    sc = ChunkedScanner()
    fed = 0
    with pytest.raises(ChunkedError, match="longer than 4096"):
        for i in range(len(line)):
            sc.feed(line, i, i + 1)
            fed += 1
    assert fed < 4096  # rejected before the line could grow past the limit


@pytest.mark.parametrize("limit", [40, 16384])
def test_trailer_limit_boundary(limit: int) -> None:
    # trailer section = "X: " + pad + CRLF + CRLF
    ok = b"0\r\nX: " + b"p" * (limit - 7) + b"\r\n\r\n"
    assert len(ok) - 3 == limit
    for cuts in ([], byte_cuts(len(ok))):
        sc = ChunkedScanner(max_trailer_bytes=limit)
        assert scan_windows(ok, cuts, sc) == (b"", len(ok))
    bad = b"0\r\nX: " + b"p" * (limit - 6) + b"\r\n\r\n"
    raises_everywhere(bad, max_trailer_bytes=limit)


def test_many_small_trailer_fields_bounded() -> None:
    body = b"0\r\n" + b"X-A: b\r\n" * 3000 + b"\r\n"
    raises_everywhere(body)


def test_bad_limits() -> None:
    with pytest.raises(ValueError):
        ChunkedScanner(max_line_bytes=2)
    with pytest.raises(ValueError):
        ChunkedScanner(max_trailer_bytes=1)


# --------------------------------------------------------------------------- invalid bodies

INVALID: list[tuple[str, bytes]] = [
    ("17-hex-digits", b"00000000000000005\r\nhello\r\n0\r\n\r\n"),
    ("17-hex-digits-last", b"00000000000000000\r\n\r\n"),
    ("0x-prefix", b"0x10\r\n" + b"a" * 16 + b"\r\n0\r\n\r\n"),
    ("minus", b"-1\r\n"),
    ("plus", b"+5\r\nhello\r\n0\r\n\r\n"),
    ("leading-space", b" 5\r\nhello\r\n0\r\n\r\n"),
    ("leading-htab", b"\t5\r\nhello\r\n0\r\n\r\n"),
    ("trailing-space", b"5 \r\nhello\r\n0\r\n\r\n"),
    ("space-before-ext", b"5 ;a=b\r\nhello\r\n0\r\n\r\n"),
    ("empty-size", b"\r\nhello\r\n0\r\n\r\n"),
    ("ext-without-size", b";a\r\nhello\r\n0\r\n\r\n"),
    ("non-hex", b"g\r\n"),
    ("underscore", b"1_0\r\n"),
    ("request-line", b"GET / HTTP/1.1\r\n\r\n"),
    ("bare-lf-after-size", b"5\nhello\r\n0\r\n\r\n"),
    ("bare-lf-after-ext", b"5;a\nhello\r\n0\r\n\r\n"),
    ("bare-cr-after-size", b"5\rhello\r\n0\r\n\r\n"),
    ("cr-cr-lf", b"5\r\r\nhello\r\n0\r\n\r\n"),
    ("bare-cr-in-ext", b"5;a\rb\r\nhello\r\n0\r\n\r\n"),
    ("nul-in-ext", b"5;a\x00b\r\nhello\r\n0\r\n\r\n"),
    ("ctl-in-ext", b"5;a\x01b\r\nhello\r\n0\r\n\r\n"),
    ("del-in-ext", b"5;a\x7f\r\nhello\r\n0\r\n\r\n"),
    ("missing-crlf-after-data", b"5\r\nhello0\r\n\r\n"),
    ("data-longer-than-size", b"5\r\nhello" + SECRET + b"\r\n0\r\n\r\n"),
    ("data-shorter-than-size", b"9\r\n" + SECRET[:5] + b"\r\n0\r\n\r\n" + b"x" * 9),
    ("bare-lf-after-data", b"5\r\nhello\n0\r\n\r\n"),
    ("bare-cr-after-data", b"5\r\nhello\r0\r\n\r\n"),
    ("bare-lf-last-chunk", b"0\n\r\n"),
    ("bare-lf-end", b"0\r\n\n"),
    ("bare-cr-end", b"0\r\n\r\r\n"),
    ("obs-fold", b"0\r\nX-A: b\r\n c\r\n\r\n"),
    ("obs-fold-htab", b"0\r\nX-A: b\r\n\tc\r\n\r\n"),
    ("trailer-leading-space", b"0\r\n X: y\r\n\r\n"),
    ("space-before-colon", b"0\r\nX : y\r\n\r\n"),
    ("htab-before-colon", b"0\r\nX\t: y\r\n\r\n"),
    ("no-colon", b"0\r\nXy\r\n\r\n"),
    ("empty-name", b"0\r\n: y\r\n\r\n"),
    ("non-token-name", b"0\r\nX(y): z\r\n\r\n"),
    ("nul-in-trailer", b"0\r\nX: a\x00b\r\n\r\n"),
    ("ctl-in-trailer", b"0\r\nX: a\x01b\r\n\r\n"),
    ("del-in-trailer", b"0\r\nX: a\x7fb\r\n\r\n"),
    ("bare-lf-in-trailer", b"0\r\nX: y\n\r\n"),
    ("bare-cr-in-trailer", b"0\r\nX: y\rz\r\n\r\n"),
    ("content-length-trailer", b"0\r\nContent-Length: 5\r\n\r\n"),
    ("transfer-encoding-trailer", b"0\r\ntransfer-ENCODING: gzip\r\n\r\n"),
    ("oversized-trailer", b"0\r\nX-Pad: " + SECRET * 700 + b"\r\n\r\n"),
    ("oversized-size-line", b"5;" + b"a" * 4996 + b"\r\nhello\r\n0\r\n\r\n"),
]


def with_secret(body: bytes) -> bytes:
    """Prefix a valid chunk carrying SECRET so the failure happens after secret data."""
    return encode_chunk_header(len(SECRET)) + SECRET + b"\r\n" + body


@pytest.mark.parametrize("body", [v[1] for v in INVALID], ids=[v[0] for v in INVALID])
def test_invalid_bodies(body: bytes) -> None:
    for candidate in (body, with_secret(body)):
        for msg in raises_everywhere(candidate):
            assert "malformed chunked body" in msg
            assert "hunter2" not in msg and "TOPSECRET" not in msg and "sk-live" not in msg


def test_error_names_position() -> None:
    with pytest.raises(ChunkedError, match="offset 8"):
        scan_windows(b"5\r\nhelloXX\r\n", [4, 7])


# --------------------------------------------------------------------------- hypothesis

HEX_CHARS = "0123456789abcdefABCDEF"
TOKEN_CHARS = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
TEXT_BYTES = [9, *range(0x20, 0x7F), *range(0x80, 0x100)]

text_bytes = st.lists(st.sampled_from(TEXT_BYTES), max_size=12).map(bytes)
token = st.text(TOKEN_CHARS, min_size=1, max_size=10).map(str.encode)


@st.composite
def size_field(draw: st.DrawFn, size: int) -> bytes:
    digits = f"{size:x}"
    digits = "0" * draw(st.integers(0, 16 - len(digits))) + digits
    upper = draw(st.booleans())
    return (digits.upper() if upper else digits).encode()


@st.composite
def chunked_bodies(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """A valid chunked body (with random extensions and trailers) and its payload."""
    chunks = draw(st.lists(st.binary(min_size=1, max_size=40), max_size=6))
    out = bytearray()
    for chunk in [*chunks, b""]:
        out += draw(size_field(len(chunk)))
        for ext in draw(st.lists(text_bytes, max_size=2)):
            out += b";" + ext
        out += b"\r\n"
        if chunk:
            out += chunk + b"\r\n"
    for name, value in draw(st.lists(st.tuples(token, text_bytes), max_size=3)):
        if name.lower() not in (b"content-length", b"transfer-encoding"):
            out += name + b":" + value + b"\r\n"
    out += b"\r\n"
    return bytes(out), b"".join(chunks)


@HYPOTHESIS
@given(chunked_bodies(), st.binary(max_size=8), st.data())
def test_property_valid_bodies_any_split(
    case: tuple[bytes, bytes], tail: bytes, data: st.DataObject
) -> None:
    body, payload = case
    buf = body + tail
    cuts = sorted(data.draw(st.lists(st.integers(0, len(buf)), max_size=8)))
    assert scan_windows(buf, cuts) == (payload, len(body))
    assert scan_windows(buf, []) == (payload, len(body))
    pieces = [buf[a:b] for a, b in itertools.pairwise([0, *cuts, len(buf)])]
    assert scan_pieces(pieces) == (payload, len(body))


@HYPOTHESIS
@given(chunked_bodies(), st.data())
def test_property_dropping_trailers_any_split(
    case: tuple[bytes, bytes], data: st.DataObject
) -> None:
    body, payload = case
    buf = body + NEXT
    cuts = sorted(data.draw(st.lists(st.integers(0, len(buf)), max_size=8)))
    kept = drop_trailers(buf, cuts)
    assert kept == drop_trailers(buf, [])
    assert body.startswith(kept[:-2])
    assert h11_body(kept + NEXT) == (payload, [], NEXT)


MUTATION_BYTES = b"\r\n\r\n \t;:=0019aAfFxX-+\x00\x01\x7f\x80\xffz"


@st.composite
def mutated_bodies(draw: st.DrawFn) -> bytes:
    """Valid bodies with a few random edits, or short garbage from framing-ish bytes."""
    if draw(st.integers(0, 9)) == 0:
        return bytes(draw(st.lists(st.sampled_from(MUTATION_BYTES), max_size=30)))
    body = bytearray(draw(chunked_bodies())[0])
    for _ in range(draw(st.integers(0, 3))):
        pos = draw(st.integers(0, len(body)))
        op = draw(st.sampled_from(["insert", "replace", "delete"]))
        byte = draw(st.sampled_from(MUTATION_BYTES))
        if op == "insert":
            body[pos:pos] = bytes([byte])
        elif pos < len(body):
            body[pos : pos + 1] = b"" if op == "delete" else bytes([byte])
    return bytes(body)


def outcome(buf: bytes, cuts: list[int]) -> tuple[str, bytes, int | None]:
    try:
        payload, end = scan_windows(buf, cuts)
    except ChunkedError:
        return ("error", b"", None)
    return ("done" if end is not None else "incomplete", payload, end)


HEAD = b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"


@HYPOTHESIS
@given(mutated_bodies())
def test_differential_never_more_lenient_than_h11(buf: bytes) -> None:
    result = outcome(buf, [])
    assert outcome(buf, byte_cuts(len(buf))) == result  # splitting never changes the verdict
    event(result[0])
    if result[0] != "done":
        return
    _, payload, end = result
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(HEAD + buf)
    assert isinstance(conn.next_event(), h11.Request)
    data = bytearray()
    while True:
        ev = conn.next_event()  # must not raise: we accepted this body
        if isinstance(ev, h11.Data):
            data += ev.data
            continue
        assert isinstance(ev, h11.EndOfMessage), ev
        break
    assert bytes(data) == payload
    assert conn.trailing_data == (buf[end:], False)
