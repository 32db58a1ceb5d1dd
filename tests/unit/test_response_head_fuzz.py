"""``ResponseHeadReader`` against h11, differentially (issue 16: a faster response-head
path only if fuzzed against h11 like the chunked scanner).

The reference below is the reader as it was before the fast path: an ``h11.Connection``
(client role) primed by sending a request of the same method, every event and refusal
h11's. Heads are built from adversarial pieces, valid and invalid (status lines, field
names and values, separators, line endings, obs-fold, framing fields, 1xx responses),
fed whole, in random pieces and one byte at a time; both readers must give the same
trace: the same events (type, status, reason, version, raw and normalized fields), the
same ``None`` (need more) answers, the same refusals (type and message), the same
``trailing``, ``interim`` and ``received``.
"""

from __future__ import annotations

import itertools
from typing import Final

import h11
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxycore.errors import UpstreamProtocolError
from proxycore.http.head_parser import parse_head
from proxycore.http.response_head import MAX_INTERIM_RESPONSES, ResponseHeadReader, prime_request

FUZZ = settings(
    max_examples=400,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

Trace = list[tuple[object, ...]]


class H11Reader:
    """The reference: the reader before the fast path, h11 for every byte."""

    def __init__(self, method: bytes, max_bytes: int, max_fields: int) -> None:
        self._h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=max_bytes)
        self._h11.send(prime_request(method))
        self._max_bytes = max_bytes
        self._max_fields = max_fields
        self.received = 0
        self.interim = 0
        self.trailing = b""

    def feed(self, data: bytes) -> None:
        self.received += len(data)
        self._h11.receive_data(data)

    def next_event(self) -> h11.Response | h11.InformationalResponse | None:
        try:
            event = self._h11.next_event()
        except h11.RemoteProtocolError:
            raise UpstreamProtocolError("malformed response head from upstream") from None
        if event is h11.NEED_DATA:
            return None
        if isinstance(event, h11.InformationalResponse):
            self.interim += 1
            if self.interim > MAX_INTERIM_RESPONSES:
                raise UpstreamProtocolError("too many 1xx responses from upstream")
            if event.status_code == 101:
                raise UpstreamProtocolError(
                    "upstream switched protocols without an upgrade request"
                )
            return event
        assert isinstance(event, h11.Response)
        self.trailing = self._h11.trailing_data[0]
        if self.received - len(self.trailing) > self._max_bytes:
            raise UpstreamProtocolError("upstream response head too large")
        if len(event.headers) > self._max_fields:
            raise UpstreamProtocolError("upstream response has too many header fields")
        return event


Reader = ResponseHeadReader | H11Reader


def describe(event: object) -> tuple[object, ...]:
    if event is None:
        return ("need",)
    assert isinstance(event, h11.Response | h11.InformationalResponse)
    for value in (event.reason, event.http_version):
        assert type(value) is bytes
    for raw, lower in zip(event.headers.raw_items(), event.headers, strict=True):
        assert all(type(part) is bytes for part in (*raw, *lower))
        assert raw[1] == lower[1] and raw[0].lower() == lower[0]
    return (
        type(event).__name__,
        event.status_code,
        event.reason,
        event.http_version,
        event.headers.raw_items(),
        list(event.headers),
    )


def drain(reader: Reader, trace: Trace) -> bool:
    """Ask for events until more bytes are needed; True once done (final or refused)."""
    for _ in range(2 * MAX_INTERIM_RESPONSES + 4):
        try:
            event = reader.next_event()
        except UpstreamProtocolError as exc:
            trace.append(("refused", exc.message))
            return True
        trace.append(describe(event))
        if event is None:
            return False
        if isinstance(event, h11.Response):
            return True
    raise AssertionError("no end")


def run(reader: Reader, pieces: list[bytes], *, eof: bool = False, after: bytes = b"") -> Trace:
    """Feed ``pieces`` (asking after each), then maybe EOF; past the end, feed ``after``
    and ask once more (the readers must agree there too, even on an exception)."""
    trace: Trace = [describe(reader.next_event())]
    done = False
    for piece in pieces:
        reader.feed(piece)
        trace.append(("fed", reader.received))
        done = drain(reader, trace)
        if done:
            break
    if not done and eof:
        reader.feed(b"")
        done = drain(reader, trace)
    trace.append(("state", reader.interim, reader.received, reader.trailing))
    if done and after:
        try:
            reader.feed(after)
            trace.append(describe(reader.next_event()))
        except Exception as exc:  # both readers' h11 past the head: compare what they do
            trace.append(("raised", type(exc).__name__))
    return trace


def check_same(
    method: bytes,
    pieces: list[bytes],
    max_bytes: int = 8192,
    max_fields: int = 100,
    *,
    eof: bool = False,
    after: bytes = b"",
) -> Trace:
    want = run(H11Reader(method, max_bytes, max_fields), pieces, eof=eof, after=after)
    got = run(ResponseHeadReader(method, max_bytes, max_fields), pieces, eof=eof, after=after)
    assert got == want
    return got


# --------------------------------------------------------------------------- pieces

VERSIONS: Final[tuple[bytes, ...]] = (
    b"HTTP/1.1",
    b"HTTP/1.0",
    b"HTTP/0.9",
    b"HTTP/2.0",
    b"HTTP/1.10",
    b"HTTP/1",
    b"http/1.1",
    b"HTTP/1.x",
    b"HTTPS/1.1",
    b" HTTP/1.1",
    b"HTTP/\xb9.1",
    b"",
)
STATUSES: Final[tuple[bytes, ...]] = (
    *b"200 204 304 404 500 999 100 101 102 103 199 099 000 20 2000 2x0 +20".split(),
    b" 200",
    b"\xb2\xb0\xb0",
    b"",
)
REASONS: Final[tuple[bytes, ...]] = (
    b" OK",
    b"",
    b" ",
    b"  OK",
    b" Not Found",
    b" OK ",
    b" \tOK\t",
    b" caf\xe9",
    b" \x01ctl",
    b" a\x00b",
    b" a\x0bb",
    b" a\x0cb",
    b" a\rb",
    b"\tOK",
    b"OK",
    b" \x7f",
)
NAMES: Final[tuple[bytes, ...]] = (
    b"Content-Type",
    b"content-type",
    b"X-A",
    b"x",
    b"Set-Cookie",
    b"Link",
    b"Connection",
    b"Content-Length",
    b"content-LENGTH",
    b"Transfer-Encoding",
    b"TRANSFER-ENCODING",
    b"!#$%&'*+-.^_`|~09aZ",
    b"Bad Name",
    b"Bad\tName",
    b" Lead",
    b"\tLead",
    b"Trail ",
    b"",
    b"a(b",
    b"a/b",
    b"a@b",
    b'a"b',
    b"\xe9",
    b"a\x00b",
    b"a\x7fb",
    b"a:b",
    b"a\rb",
    b"a\nb",
)
SEPS: Final[tuple[bytes, ...]] = (b":", b": ", b":\t", b":  \t ", b" :", b"\t:", b"")
VALUES: Final[tuple[bytes, ...]] = (
    b"v",
    b"text/plain; charset=utf-8",
    b"",
    b" ",
    b"a b",
    b"a \t b",
    b"a  ",
    b"\tab\t",
    b"\x80\xff",
    b"\x01\x1f",
    b"a\x7fb",
    b"a\x00b",
    b"a\x0bb",
    b"a\x0cb",
    b"a\rb",
    b"a\r",
    b"a\nb",
    b"close",
    b"keep-alive",
    b"Upgrade",
    b"websocket",
    b"0",
    b"5",
    b"05",
    b"100",
    b"5, 5",
    b"5,5",
    b"5, 6",
    b" 5 ",
    b"-1",
    b"+5",
    b"5a",
    b"0x10",
    b"1" * 20,
    b"1" * 21,
    b"\xb5",
    b"chunked",
    b"CHUNKED",
    b"Chunked",
    b"gzip",
    b"gzip, chunked",
    b"chunked, chunked",
    b"identity",
    b"chunked ",
    b"chunked;x=1",
    b'"chunked"',
)
EOLS: Final[tuple[bytes, ...]] = (
    b"\r\n",
    b"\r\n",
    b"\r\n",
    b"\r\n",
    b"\n",
    b"\r",
    b"\r\r\n",
    b"\n\r",
)
ENDS: Final[tuple[bytes, ...]] = (b"\r\n", b"\r\n", b"\r\n", b"\n", b"\r", b"")
BODIES: Final[tuple[bytes, ...]] = (
    b"",
    b"hello",
    b"HTTP/1.1 200 OK\r\n\r\n",
    b"\r\n",
    b"\n",
    b"5\r\nhello\r\n0\r\n\r\n",
)
METHODS: Final[tuple[bytes, ...]] = (b"GET", b"HEAD", b"POST", b"CONNECT", b"OPTIONS")


@st.composite
def status_lines(draw: st.DrawFn, interim: bool = False) -> bytes:
    if draw(st.integers(0, 5)) > 0:  # mostly well-formed
        code = (
            draw(st.sampled_from((b"100", b"102", b"103")))
            if interim
            else draw(st.sampled_from((b"200", b"204", b"304", b"404", b"503", b"999")))
        )
        return b"HTTP/1.1 " + code + draw(st.sampled_from((b" OK", b"", b" Early Hints")))
    if draw(st.booleans()):  # one part wrong at a time
        return (
            draw(st.sampled_from(VERSIONS))
            + b" "
            + draw(st.sampled_from((b"200", b"103", *STATUSES)))
            + draw(st.sampled_from((b" OK", *REASONS)))
        )
    sep = draw(st.sampled_from((b" ", b" ", b"  ", b"\t", b"")))
    return (
        draw(st.sampled_from(VERSIONS))
        + sep
        + draw(st.sampled_from(STATUSES))
        + draw(st.sampled_from(REASONS))
    )


@st.composite
def field_lines(draw: st.DrawFn) -> bytes:
    kind = draw(st.integers(0, 9))
    if kind == 0:  # obs-fold: a continuation line
        return draw(st.sampled_from((b" ", b"\t", b"  "))) + draw(st.sampled_from(VALUES))
    if kind == 1:  # anything at all
        return draw(st.binary(max_size=12))
    if kind == 2:  # the framing fields
        name = draw(st.sampled_from(NAMES[7:11]))
        return name + b": " + draw(st.sampled_from(VALUES[20:]))
    if kind < 5:  # well-formed
        name = draw(st.sampled_from(NAMES[:12]))
        sep = draw(st.sampled_from(SEPS[:4]))
        return name + sep + draw(st.sampled_from(VALUES[:10]))
    return (
        draw(st.sampled_from(NAMES)) + draw(st.sampled_from(SEPS)) + draw(st.sampled_from(VALUES))
    )


@st.composite
def heads(draw: st.DrawFn, interim: bool = False) -> bytes:
    lines = [draw(status_lines(interim))]
    lines += draw(st.lists(field_lines(), max_size=8))
    eols = [draw(st.sampled_from(EOLS)) for _ in lines]
    return b"".join(line + eol for line, eol in zip(lines, eols, strict=True)) + draw(
        st.sampled_from(ENDS)
    )


@st.composite
def streams(draw: st.DrawFn) -> bytes:
    """Zero or more 1xx heads, a final head, body bytes; sometimes junk first."""
    prefix = draw(st.sampled_from((b"", b"", b"", b"", b"\r\n", b"\n", b" ", b"\x16\x03")))
    interims = draw(st.lists(heads(interim=True), max_size=3))
    return prefix + b"".join(interims) + draw(heads()) + draw(st.sampled_from(BODIES))


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    bounds = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    return [data[a:b] for a, b in itertools.pairwise(bounds) if b > a]


# --------------------------------------------------------------------------- properties


@FUZZ
@given(
    streams(),
    st.sampled_from(METHODS),
    st.lists(st.integers(0, 10_000), max_size=4),
    st.sampled_from((8192, 8192, 40, 80, 120, 200)),
    st.sampled_from((100, 100, 0, 1, 2, 4)),
    st.booleans(),
    st.sampled_from((b"", b"more body", b"HTTP/1.1 200 OK\r\n\r\n")),
)
def test_same_as_h11_in_random_pieces(
    data: bytes,
    method: bytes,
    cuts: list[int],
    max_bytes: int,
    max_fields: int,
    eof: bool,
    after: bytes,
) -> None:
    check_same(method, split(data, cuts), max_bytes, max_fields, eof=eof, after=after)


@FUZZ
@given(streams(), st.sampled_from(METHODS), st.sampled_from((8192, 60)))
def test_same_as_h11_one_byte_at_a_time(data: bytes, method: bytes, max_bytes: int) -> None:
    check_same(method, [data[i : i + 1] for i in range(len(data))], max_bytes)


@FUZZ
@given(st.binary(max_size=64), st.binary(max_size=64))
def test_same_as_h11_on_any_bytes(data: bytes, body: bytes) -> None:
    check_same(b"GET", [data + body])
    check_same(b"GET", [b"HTTP/1.1 200 OK\r\n" + data + b"\r\n\r\n" + body])


@FUZZ
@given(streams())
def test_parser_never_accepts_what_h11_refuses(data: bytes) -> None:
    """The fast path alone: whenever it reads a head, h11 reads the same one."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return
    head = data[: end + 4]
    parsed = parse_head(head)
    if parsed is None:
        return
    conn = h11.Connection(h11.CLIENT)
    conn.send(prime_request(b"GET"))
    conn.receive_data(head)
    event = conn.next_event()  # raises if h11 refuses: the test fails
    assert isinstance(event, h11.Response | h11.InformationalResponse)
    status, reason, version, fields = parsed
    assert (event.status_code, event.reason, event.http_version) == (status, reason, version)
    assert event.headers._full_items == fields  # (raw, lower, value), as h11 keeps them
    assert conn.trailing_data == (b"", False)


# --------------------------------------------------------------------------- examples


@pytest.mark.parametrize(
    "data",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nA: 1\r\n  folded\r\n\r\n",  # obs-fold: h11 joins it
        b"HTTP/1.1 200 OK\r\n folded\r\n\r\n",  # a continuation first: refused
        b"HTTP/1.1 200 OK\nA: 1\n\n",  # bare LF lines: h11 takes them
        b"HTTP/1.1 200 OK\r\nA: 1\n\r\nbody",
        b"HTTP/1.1 200 OK\r\nA: 1\r\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\nContent-Length: 5\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: CHUNKED\r\nContent-Length: 5\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nA : 1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nA:\r\n\r\n",
        b"HTTP/1.1 200\r\n\r\n",
        b"HTTP/1.1 200 \r\n\r\n",
        b"HTTP/1.0 200 \tcaf\xe9 \r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n",
        b"HTTP/1.1 099 Low\r\n\r\n",
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\nA: b\n\n",
        b"\r\nHTTP/1.1 200 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nA: b\x00c\r\n\r\n",
    ],
)
@pytest.mark.parametrize("method", [b"GET", b"HEAD", b"CONNECT"])
def test_examples_same_as_h11(data: bytes, method: bytes) -> None:
    check_same(method, [data], after=b"x")
    check_same(method, [data[i : i + 1] for i in range(len(data))], eof=True)


def test_every_status_line_piece_same_as_h11() -> None:
    """Exhaustive over the status-line pieces (version x status x reason)."""
    for version, status, reason in itertools.product(VERSIONS, STATUSES, REASONS):
        check_same(b"GET", [version + b" " + status + reason + b"\r\nA: b\r\n\r\nbody"])


def test_refusals_keep_their_messages() -> None:
    """What the fast path hands to h11 is refused with the message h11's path gives."""
    trace = check_same(b"GET", [b"HTTP/1.1 101 Switching Protocols\r\n\r\n"])
    assert ("refused", "malformed response head from upstream") in trace
    trace = check_same(b"GET", [b"HTTP/1.1 200 OK\r\nX: " + b"a" * 100 + b"\r\n\r\n"], 60)
    assert ("refused", "upstream response head too large") in trace
    trace = check_same(b"GET", [b"HTTP/1.1 200 OK\r\nX: " + b"a" * 100], 60)
    assert ("refused", "malformed response head from upstream") in trace
    trace = check_same(
        b"GET", [b"HTTP/1.1 103 Early Hints\r\n\r\n" * 11 + b"HTTP/1.1 200 OK\r\n\r\n"]
    )
    assert ("refused", "too many 1xx responses from upstream") in trace
    trace = check_same(b"GET", [b"HTTP/1.1 200 OK\r\nA: 1\r\nB: 2\r\n\r\n"], max_fields=1)
    assert ("refused", "upstream response has too many header fields") in trace


def test_eof_before_any_byte_and_mid_head() -> None:
    check_same(b"GET", [], eof=True)
    check_same(b"GET", [b"HTTP/1.1 200 OK\r\n"], eof=True)
    check_same(b"GET", [b"HTTP/1.1 200 OK\r\n\r\n"], eof=True)


@pytest.mark.parametrize("method", [b"", b"G T", b"GET\r\n", b"\xe9"])
def test_a_method_h11_refuses_fails_as_before(method: bytes) -> None:
    with pytest.raises(h11.LocalProtocolError):
        H11Reader(method, 8192, 100)
    with pytest.raises(h11.LocalProtocolError):
        ResponseHeadReader(method, 8192, 100)
