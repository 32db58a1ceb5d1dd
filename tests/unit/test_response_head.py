"""``ResponseHeadReader`` (proxycore/http/response_head.py): sans-IO, no sockets, no trio."""

from __future__ import annotations

import h11
import pytest

from proxycore.errors import UpstreamProtocolError
from proxycore.http.response_head import (
    MAX_INTERIM_RESPONSES,
    ResponseHeadReader,
    prime_request,
)

OK: bytes = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"


def reader(
    method: bytes = b"GET", max_bytes: int = 8192, max_fields: int = 100
) -> ResponseHeadReader:
    return ResponseHeadReader(method, max_bytes, max_fields)


def final(r: ResponseHeadReader, data: bytes) -> h11.Response:
    r.feed(data)
    event = r.next_event()
    assert isinstance(event, h11.Response)
    return event


def test_needs_data_until_the_head_is_complete_at_any_split() -> None:
    data = OK + b"hello"
    for cut in range(1, len(OK)):  # (feeding b"" would tell h11 the connection closed)
        r = reader()
        assert r.next_event() is None
        r.feed(data[:cut])
        assert r.next_event() is None
        r.feed(data[cut:])
        event = r.next_event()
        assert isinstance(event, h11.Response)
        assert event.status_code == 200
        assert r.trailing == b"hello"
        assert r.received == len(data)


def test_received_counts_every_byte_fed() -> None:
    r = reader()
    assert r.received == 0  # nothing yet: a reused connection may still be stale
    r.feed(b"HTTP/1.1")
    assert r.received == 8


def test_priming_by_method_head_has_no_body() -> None:
    """Primed with HEAD, the bytes after the head are not this response's body: h11 sees
    them as trailing data of a bodyless message, as the proxy's framing decision will."""
    event = final(reader(b"HEAD"), OK)
    assert event.status_code == 200
    assert prime_request(b"HEAD").method == b"HEAD"
    assert prime_request(b"GET") is prime_request(b"GET")  # built once per method


def test_malformed_head_is_a_protocol_error_without_the_bytes() -> None:
    r = reader()
    r.feed(b"HTTP/1.1 2x0 OK\r\nsecret-header: value\r\n\r\n")
    with pytest.raises(UpstreamProtocolError) as info:
        r.next_event()
    assert "secret" not in str(info.value)
    assert info.value.message == "malformed response head from upstream"


def test_head_larger_than_max_bytes_is_refused_even_when_complete() -> None:
    """h11 checks its limit only on incomplete data: a complete head in one read that is
    over the limit must still be refused."""
    head = b"HTTP/1.1 200 OK\r\nX-Pad: " + b"a" * 200 + b"\r\n\r\n"
    r = reader(max_bytes=100)
    r.feed(head)
    with pytest.raises(UpstreamProtocolError, match="too large"):
        r.next_event()
    r = reader(max_bytes=len(head))
    assert final(r, head + b"body").status_code == 200


def test_incomplete_head_over_max_bytes_is_refused() -> None:
    r = reader(max_bytes=64)
    r.feed(b"HTTP/1.1 200 OK\r\nX-Pad: " + b"a" * 100)
    with pytest.raises(UpstreamProtocolError):
        r.next_event()


def test_too_many_fields_is_refused() -> None:
    fields = b"".join(b"X-%d: v\r\n" % i for i in range(5))
    r = reader(max_fields=4)
    r.feed(b"HTTP/1.1 200 OK\r\n" + fields + b"\r\n")
    with pytest.raises(UpstreamProtocolError, match="too many header fields"):
        r.next_event()
    assert final(reader(max_fields=5), b"HTTP/1.1 200 OK\r\n" + fields + b"\r\n")


def test_interim_responses_come_first_then_the_final_one() -> None:
    r = reader()
    r.feed(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" + OK)
    first, second = r.next_event(), r.next_event()
    assert isinstance(first, h11.InformationalResponse) and first.status_code == 100
    assert isinstance(second, h11.InformationalResponse) and second.status_code == 103
    assert isinstance(r.next_event(), h11.Response)
    assert r.interim == 2


def test_at_most_max_interim_responses() -> None:
    r = reader()
    r.feed(b"HTTP/1.1 102 Processing\r\n\r\n" * (MAX_INTERIM_RESPONSES + 1) + OK)
    for _ in range(MAX_INTERIM_RESPONSES):
        assert isinstance(r.next_event(), h11.InformationalResponse)
    with pytest.raises(UpstreamProtocolError, match="too many 1xx"):
        r.next_event()


def test_switching_protocols_is_refused() -> None:
    """An upgrade never goes this way: a 101 here would hand the connection to a protocol
    the proxy did not ask for (h11 refuses one to a request that did not offer an
    upgrade; the reader refuses it too, should h11 ever pass one)."""
    r = reader()
    r.feed(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n")
    with pytest.raises(UpstreamProtocolError):
        r.next_event()
