"""Reading an upstream response head: sans-IO over h11 (client role). Pure module.

The caller feeds the bytes it read and asks for the next head event; this
module owns every decision about them, so both front ends (the native server
and the ASGI app) parse and limit upstream heads the same way:

- h11 parses a response as the answer to the request it saw sent, so the
  reader is primed with a minimal request of the same method (``HEAD``
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

__all__ = ["MAX_INTERIM_RESPONSES", "ResponseHeadReader", "prime_request"]

#: 1xx responses accepted before the final response.
MAX_INTERIM_RESPONSES: Final = 10

_PRIMES: dict[bytes, h11.Request] = {}


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

    __slots__ = ("_h11", "_max_bytes", "_max_fields", "interim", "received", "trailing")

    def __init__(self, method: bytes, max_bytes: int, max_fields: int) -> None:
        self._h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=max_bytes)
        self._h11.send(prime_request(method))
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
        self._h11.receive_data(data)

    def next_event(self) -> h11.Response | h11.InformationalResponse | None:
        """The next head event, or None if more bytes are needed.

        Raises :class:`UpstreamProtocolError`: malformed head, head over ``max_bytes``,
        over ``max_fields`` fields, too many 1xx responses, or a 101.
        """
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
