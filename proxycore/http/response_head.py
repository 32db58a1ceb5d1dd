"""Reading an upstream response head: sans-IO, h11's answer (client role). Pure module.

The caller feeds the bytes it read and asks for the next head event; this
module owns every decision about them, so both front ends (the native server
and the ASGI app) parse and limit upstream heads the same way:

- The events are h11's (:class:`h11.InformationalResponse`, :class:`h11.Response`)
  and so are the accept/refuse decisions. A common head (CRLF lines, plain status
  line and fields, at most one simple Content-Length / Transfer-Encoding) is parsed by
  :mod:`~proxycore.http.head_parser`, which answers only what h11 answers (fuzzed
  differentially against h11); anything else, from the first unusual byte on, goes to
  an ``h11.Connection`` that is given every byte not yet consumed.
- h11 parses a response as the answer to the request it saw sent, so that
  connection is primed with a minimal request of the same method (``HEAD``
  changes the framing); the real request head was serialized by the proxy.
- Limits: ``max_bytes`` for the head (h11 checks it only on incomplete data,
  so it is checked again on the complete head), ``max_fields`` header fields,
  :data:`MAX_INTERIM_RESPONSES` 1xx responses before the final one.
- A ``101 Switching Protocols`` is refused: an upgrade never goes this way.

Every refusal is an :class:`~proxycore.errors.UpstreamProtocolError` (502) whose
message never quotes the upstream's bytes.
"""

from __future__ import annotations

from typing import Final

import h11

from ..errors import UpstreamProtocolError
from .head_parser import NEED_MORE, UNSURE, ParsedHead, head_end, parse_head

__all__ = ["MAX_INTERIM_RESPONSES", "ResponseHeadReader", "prime_request"]

#: 1xx responses accepted before the final response.
MAX_INTERIM_RESPONSES: Final = 10

_PRIMES: dict[bytes, h11.Request] = {}
#: Methods whose prime h11 took in a real ``send`` (at most 64 kept).
_SENDABLE: set[bytes] = set()


def prime_request(method: bytes) -> h11.Request:
    """A minimal request for h11 to see as sent (built once per method, at most 64 kept)."""
    request = _PRIMES.get(method)
    if request is None:
        request = h11.Request(method=method, target=b"/", headers=[(b"Host", b"upstream")])
        if len(_PRIMES) < 64:
            _PRIMES[method] = request
    return request


class ResponseHeadReader:
    """The response head of one exchange, from the bytes fed so far.

    Usage: :meth:`next_event` returns None when it needs more bytes; :meth:`feed`
    them and ask again. It returns each allowed 1xx response, then the final
    :class:`h11.Response`, after which :attr:`trailing` holds the body bytes read
    with the head.
    """

    __slots__ = (
        "_buf",
        "_eof",
        "_final",
        "_h11",
        "_max_bytes",
        "_max_fields",
        "_method",
        "_scan",
        "interim",
        "received",
        "trailing",
    )

    def __init__(self, method: bytes, max_bytes: int, max_fields: int) -> None:
        if method not in _SENDABLE:  # a method h11 refuses fails here, as it always did
            h11.Connection(h11.CLIENT).send(prime_request(method))
            if len(_SENDABLE) < 64:
                _SENDABLE.add(method)
        self._method = method
        #: Set once the fast path hands over (or was never sure): from then on h11 reads.
        self._h11: h11.Connection | None = None
        #: Bytes fed and not yet consumed by an event (fast path only).
        self._buf: bytes | bytearray = b""
        #: Where the search for the end of the head resumes in ``_buf``.
        self._scan = 0
        self._eof = False
        #: The final head the fast path returned (replayed to h11 if asked for more).
        self._final: bytes | None = None
        self._max_bytes = max_bytes
        self._max_fields = max_fields
        #: Bytes fed so far (0: nothing came yet, so a reused connection may be stale).
        self.received = 0
        #: 1xx responses seen so far.
        self.interim = 0
        #: Set with the final response: the bytes read past its head (the body's start).
        self.trailing = b""

    def feed(self, data: bytes) -> None:
        self.received += len(data)
        if self._h11 is not None:
            self._h11.receive_data(data)
        elif not data:
            self._eof = True  # h11's end of file: its rules, not ours
            self._to_h11()
        elif self._buf:
            if not isinstance(self._buf, bytearray):
                self._buf = bytearray(self._buf)
            self._buf += data
        else:
            self._buf = bytes(data)

    def next_event(self) -> h11.Response | h11.InformationalResponse | None:
        """The next head event, or None if more bytes are needed.

        Raises :class:`UpstreamProtocolError`: malformed head, head over ``max_bytes``,
        over ``max_fields`` fields, too many 1xx responses, or a 101.
        """
        if self._h11 is not None or self._final is not None:
            return self._next_h11()
        buf = self._buf
        end = head_end(buf, self._scan)
        if end == NEED_MORE:
            if len(buf) > self._max_bytes:  # h11's limit on an incomplete head
                return self._next_h11()
            self._scan = max(0, len(buf) - 3)
            return None
        if end == UNSURE:
            return self._next_h11()
        head = bytes(buf[:end])
        parsed = parse_head(head)
        event = None if parsed is None else _event(parsed)
        if event is None:
            return self._next_h11()
        self._buf = bytes(buf[end:])
        self._scan = 0
        if isinstance(event, h11.InformationalResponse):
            self.interim += 1
            if self.interim > MAX_INTERIM_RESPONSES:
                raise UpstreamProtocolError("too many 1xx responses from upstream")
            return event
        self._final = head
        return self._final_checks(event, self._buf)

    def _to_h11(self) -> h11.Connection:
        """Hand every byte not yet consumed to an h11 connection in the same state."""
        conn = self._h11
        if conn is None:
            conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=self._max_bytes)
            conn.send(prime_request(self._method))
            if self._final is not None:  # past the final head: h11 reads it again
                conn.receive_data(self._final)
                conn.next_event()
            if self._buf:
                conn.receive_data(bytes(self._buf))
            if self._eof:
                conn.receive_data(b"")
            self._buf = b""
            self._h11 = conn
        return conn

    def _next_h11(self) -> h11.Response | h11.InformationalResponse | None:
        conn = self._to_h11()
        try:
            event = conn.next_event()
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
        return self._final_checks(event, conn.trailing_data[0])

    def _final_checks(self, event: h11.Response, trailing: bytes) -> h11.Response:
        self.trailing = trailing
        if self.received - len(trailing) > self._max_bytes:
            raise UpstreamProtocolError("upstream response head too large")
        if len(event.headers) > self._max_fields:
            raise UpstreamProtocolError("upstream response has too many header fields")
        return event


_Event = h11.Response | h11.InformationalResponse
#: h11's header list type, as its events hold it.
_Headers = type(h11.Response(status_code=200, headers=[]).headers)


def _public_event(parsed: ParsedHead) -> _Event:
    """The event through h11's public constructors (which validate every field again)."""
    status, reason, version, fields = parsed
    pairs = [(raw, value) for raw, _, value in fields]
    if status < 200:
        return h11.InformationalResponse(
            status_code=status, headers=pairs, http_version=version, reason=reason
        )
    return h11.Response(status_code=status, headers=pairs, http_version=version, reason=reason)


def _parsed_event(parsed: ParsedHead) -> _Event:
    """The event as h11's own reader builds it (``_parsed``: the fields are already
    normalized); :data:`_SHORTCUT` says whether this h11 builds it the same way."""
    status, reason, version, fields = parsed
    cls = h11.InformationalResponse if status < 200 else h11.Response
    return cls(
        status_code=status,
        headers=_Headers(fields),
        http_version=version,
        reason=reason,
        _parsed=True,
    )


def _shortcut_works() -> bool:
    """Whether :func:`_parsed_event` (h11's private ``_parsed`` path, pinned to h11 0.16)
    gives what the public constructors give; else they are used (slower, same events)."""
    samples = (
        (200, b"OK", b"1.1", [(b"Content-Length", b"content-length", b"5")]),
        (103, b"", b"1.0", [(b"Link", b"link", b"</a>"), (b"X", b"x", b"")]),
    )
    try:
        for sample in samples:
            fast, slow = _parsed_event(sample), _public_event(sample)
            if not (
                type(fast) is type(slow)
                and fast == slow
                and fast.headers.raw_items() == slow.headers.raw_items()
                and list(fast.headers) == list(slow.headers)
            ):
                return False
    except Exception:  # any change in h11's private path: use the public one
        return False
    return True


_SHORTCUT: Final = _shortcut_works()


def _event(parsed: ParsedHead) -> _Event | None:
    """The h11 event for a head the fast path read, or None if h11's constructors
    refuse it (they never should: the head then goes to h11 whole)."""
    if _SHORTCUT:
        return _parsed_event(parsed)
    try:
        return _public_event(parsed)
    except h11.LocalProtocolError:
        return None
