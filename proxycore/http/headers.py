"""Header rewriting and body framing decisions. Pure module (bytes in, bytes out).

Order matters for safety: client headers are filtered first (hop-by-hop, every
name listed in ``Connection``, and every header the proxy owns), and the
proxy's own headers are appended after, so no client can remove or override
them with ``Connection: <name>``.

Each function runs once or twice per request: one walk of the list, a name lower-cased
only when its length could match; :func:`scan_request` answers the exchange's questions
about the client's head in one walk; fresh request ids come from a pool of random bytes.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Final, Literal, TypeAlias

from ..errors import BadRequest, UpstreamProtocolError
from ..http.sse import is_event_stream

__all__ = [
    "FRAMING_FIELDS",
    "HOP_BY_HOP",
    "IDEMPOTENT",
    "Framing",
    "Headers",
    "RequestScan",
    "add_sse_headers",
    "connection_tokens",
    "fresh_request_id",
    "invalid_header_problem",
    "is_sse",
    "may_retry",
    "reason_phrase",
    "request_framing",
    "request_id_from",
    "response_framing",
    "scan_request",
    "serialize_head",
    "upstream_reusable",
    "without_h2c_offer",
]

#: The one header-list alias: ``(name, value)`` byte pairs in wire order.
Headers: TypeAlias = list[tuple[bytes, bytes]]

HOP_BY_HOP: Final = frozenset(
    b"connection keep-alive proxy-connection proxy-authenticate proxy-authorization te "
    b"trailer transfer-encoding upgrade".split()
)

#: Request headers the proxy sets itself; client copies never pass.
PROXY_OWNED_REQUEST: Final = frozenset(
    b"host content-length expect x-forwarded-for x-forwarded-proto x-forwarded-host "
    b"x-forwarded-port x-forwarded-prefix x-real-ip forwarded x-original-url "
    b"x-original-uri x-rewrite-url x-forwarded-uri x-forwarded-method x-forwarded-ssl "
    b"x-forwarded-scheme x-forwarded-server x-http-method-override x-http-method "
    b"x-method-override x-client-ip true-client-ip cf-connecting-ip x-request-id".split()
)

#: The fields that frame a message on the wire (a hook may not change them).
FRAMING_FIELDS: Final = frozenset({b"content-length", b"transfer-encoding", b"connection"})

#: Response headers the proxy sets itself.
PROXY_OWNED_RESPONSE: Final = frozenset({b"content-length", b"x-request-id"})

_REQUEST_ID_OK: Final = re.compile(rb"[A-Za-z0-9._:\-]{1,128}")

#: What a client request header may not pass upstream as, whatever ``Connection`` says.
_REQUEST_SKIP: Final = HOP_BY_HOP | PROXY_OWNED_REQUEST
#: The same for response headers (``content-length`` is checked on its own).
_RESPONSE_SKIP: Final = HOP_BY_HOP | PROXY_OWNED_RESPONSE
_NO_TOKENS: Final[frozenset[bytes]] = frozenset()

BodyKind = Literal["none", "length", "chunked", "close"]


@dataclass(frozen=True, slots=True)
class Framing:
    kind: BodyKind
    length: int = 0


NO_BODY: Final = Framing("none")
CHUNKED: Final = Framing("chunked")
UNTIL_CLOSE: Final = Framing("close")

#: Methods a request may be repeated with (RFC 9110 section 9.2.2).
IDEMPOTENT: Final = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})


def connection_tokens(headers: Iterable[tuple[bytes, bytes]]) -> frozenset[bytes]:
    """Lower-cased names listed in every ``Connection`` header."""
    values = [v for n, v in headers if len(n) == 10 and n.lower() == b"connection"]
    return _tokens(values) if values else _NO_TOKENS


def _tokens(values: Iterable[bytes]) -> frozenset[bytes]:
    tokens = {t.strip().lower() for value in values for t in value.split(b",")}
    tokens.discard(b"")
    return frozenset(tokens)


def without_h2c_offer(headers: Headers) -> Headers | None:
    """The request without its cleartext HTTP/2 upgrade offer, or None if it has none.

    An offer is an ``Upgrade`` naming only ``h2c`` (what ``curl --http2`` sends over
    cleartext). Dropped: the ``Upgrade`` and ``HTTP2-Settings`` fields and the ``upgrade``
    and ``http2-settings`` tokens of ``Connection`` (an emptied ``Connection`` goes too),
    so the request is served as HTTP/1.1, as nginx does. Any other upgrade: None.
    """
    offers = [
        t.strip().lower() for n, v in headers if n.lower() == b"upgrade" for t in v.split(b",")
    ]
    if b"h2c" not in offers or any(t != b"h2c" for t in offers if t):
        return None
    kept: Headers = []
    for name, value in headers:
        lname = name.lower()
        if lname in (b"upgrade", b"http2-settings"):
            continue
        if lname == b"connection":
            tokens = [t.strip() for t in value.split(b",")]
            rest = [t for t in tokens if t and t.lower() not in (b"upgrade", b"http2-settings")]
            if not rest:
                continue
            value = b", ".join(rest)
        kept.append((name, value))
    return kept


def _framing_values(headers: Iterable[tuple[bytes, bytes]]) -> tuple[list[bytes], list[bytes]]:
    """The ``Transfer-Encoding`` and ``Content-Length`` values."""
    te: list[bytes] = []
    cl: list[bytes] = []
    for name, value in headers:
        size = len(name)
        if size == 17:
            if name.lower() == b"transfer-encoding":
                te.append(value)
        elif size == 14 and name.lower() == b"content-length":
            cl.append(value)
    return te, cl


def _content_length(values: list[bytes], error: type[Exception]) -> int:
    if len(values) == 1 and b"," not in values[0]:
        raw = values[0].strip()  # the one value: the set below would hold just it
    else:
        lengths = {v.strip() for value in values for v in value.split(b",")}
        if len(lengths) != 1:
            raise error("conflicting Content-Length values")
        (raw,) = lengths
    if not raw.isdigit() or len(raw) > 18:
        raise error("malformed Content-Length")
    return int(raw)


def request_framing(headers: Headers, http_version: bytes) -> Framing:
    """How the client frames its request body (RFC 9112 section 6.3).

    Refuses what request smuggling relies on, even where h11 lets it through:
    Content-Length together with Transfer-Encoding, differing duplicate
    Content-Length, any Transfer-Encoding other than exactly ``chunked``, and
    Transfer-Encoding on HTTP/1.0.
    """
    te, cl = _framing_values(headers)
    return _request_framing(te, cl, http_version)


def _request_framing(te: list[bytes], cl: list[bytes], http_version: bytes) -> Framing:
    if te:
        if cl:
            raise BadRequest("both Content-Length and Transfer-Encoding are present")
        if http_version != b"1.1":
            raise BadRequest("Transfer-Encoding is not allowed in HTTP/1.0")
        if len(te) != 1 or te[0].strip().lower() != b"chunked":
            raise BadRequest("Transfer-Encoding must be exactly 'chunked'")
        return CHUNKED
    if cl:
        n = _content_length(cl, BadRequest)
        return Framing("length", n) if n else NO_BODY
    return NO_BODY


def response_framing(method: bytes, status: int, headers: Headers) -> Framing:
    """How the upstream frames its response body (RFC 9112 section 6.3).

    A body with both Content-Length and Transfer-Encoding is refused (502), not
    guessed at: RFC 9112 section 6.3 calls it a possible smuggling or splitting attempt.
    """
    if method == b"HEAD" or status < 200 or status in (204, 304):
        return NO_BODY
    te, cl = _framing_values(headers)
    if te and cl:
        raise UpstreamProtocolError(
            "upstream response has both Content-Length and Transfer-Encoding"
        )
    if te:
        codings = [c.strip().lower() for v in te for c in v.split(b",")]
        if codings[-1] != b"chunked":
            return UNTIL_CLOSE
        return CHUNKED
    if cl:
        return Framing("length", _content_length(cl, UpstreamProtocolError))
    return UNTIL_CLOSE


def upstream_reusable(http_version: bytes, headers: Headers, framing: Framing) -> bool:
    """May the upstream connection carry another exchange after this response (as far as
    its head says)? Not after HTTP/1.0, ``Connection: close`` or a close-delimited body."""
    return (
        http_version == b"1.1"
        and framing.kind != "close"
        and b"close" not in connection_tokens(headers)
    )


def may_retry(method: bytes, framing: Framing) -> bool:
    """May a request be sent again on another connection after a stale one failed?
    Only an idempotent request without a body (its body may be gone already)."""
    return framing is NO_BODY and method in IDEMPOTENT


def is_sse(headers: Headers) -> bool:
    """Is the response an event stream (its first ``Content-Type``)?"""
    return is_event_stream(
        next((v for n, v in headers if len(n) == 12 and n.lower() == b"content-type"), None)
    )


def add_sse_headers(headers: Headers) -> None:
    """Tell every cache and proxy in between not to buffer or transform the stream."""
    names = {n.lower() for n, _ in headers}
    if b"cache-control" not in names:
        headers.append((b"Cache-Control", b"no-cache, no-transform"))
    if b"x-accel-buffering" not in names:
        headers.append((b"X-Accel-Buffering", b"no"))


#: Fresh ids not handed out yet, each 12 bytes (96 bits) of one 4,092-byte ``os.urandom``
#: draw, hex. ``list.pop`` is atomic (never one id twice, even across threads); a forked
#: child empties the list so it never repeats its parent's ids.
_fresh_ids: list[str] = []
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_fresh_ids.clear)


def _refill_ids() -> None:
    pool = os.urandom(12 * 341).hex()
    _fresh_ids.extend(pool[i : i + 24] for i in range(0, len(pool), 24))


def fresh_request_id() -> str:
    """96 random bits, hex (24 characters): as ``os.urandom(12).hex()``, from a pool."""
    while True:
        try:
            return _fresh_ids.pop()
        except IndexError:
            _refill_ids()


def request_id_from(headers: Headers) -> str:
    """The client's X-Request-ID if it is sane, else a fresh random one."""
    for name, value in headers:
        if len(name) == 12 and name.lower() == b"x-request-id" and _REQUEST_ID_OK.fullmatch(value):
            return value.decode("ascii")
    return fresh_request_id()


#: Lengths of the names :func:`scan_request` reads (no other name is lower-cased).
_SCANNED_SIZES: Final = frozenset({6, 7, 10, 12, 14, 17})


@dataclass(slots=True)
class RequestScan:
    """What the exchange asks of the client's head before admission, from one walk.

    Each answer is the one the single-purpose function gives on the same list:
    ``request_id`` (:func:`request_id_from`), ``tokens`` (:func:`connection_tokens`),
    :meth:`framing` (:func:`request_framing`, raising what it raises, only when called),
    ``upgrade`` (an ``Upgrade`` field is present), ``expect`` (every ``Expect`` value,
    stripped and lower-cased) and ``accepts_event_stream`` (an ``Accept`` value names
    ``text/event-stream``). Exact names only: ``_`` spellings are not these fields (as
    the functions above); the upstream filter still drops them.
    """

    request_id: str
    tokens: frozenset[bytes]
    upgrade: bool
    expect: list[bytes]
    accepts_event_stream: bool
    _te: list[bytes]
    _cl: list[bytes]

    def framing(self, http_version: bytes) -> Framing:
        """:func:`request_framing` of the scanned list. Raises :class:`BadRequest`."""
        return _request_framing(self._te, self._cl, http_version)


def scan_request(headers: Iterable[tuple[bytes, bytes]]) -> RequestScan:
    """Walk the client's request headers once: see :class:`RequestScan`."""
    request_id = ""
    te: list[bytes] = []
    cl: list[bytes] = []
    listed: list[bytes] = []
    expect: list[bytes] = []
    upgrade = accepts = False
    for name, value in headers:
        if len(name) not in _SCANNED_SIZES:
            continue
        lname = name.lower()
        if lname == b"content-length":
            cl.append(value)
        elif lname == b"transfer-encoding":
            te.append(value)
        elif lname == b"connection":
            listed.append(value)
        elif lname == b"upgrade":
            upgrade = True
        elif lname == b"expect":
            expect.append(value.strip().lower())
        elif lname == b"accept":
            accepts = accepts or b"text/event-stream" in value.lower()
        elif lname == b"x-request-id" and not request_id and _REQUEST_ID_OK.fullmatch(value):
            request_id = value.decode("ascii")
    return RequestScan(
        request_id or fresh_request_id(),
        _tokens(listed) if listed else _NO_TOKENS,
        upgrade,
        expect,
        accepts,
        te,
        cl,
    )


def reason_phrase(status: int) -> bytes:
    """The standard reason phrase (``b"Client Closed Request"`` for nginx's 499)."""
    try:
        return HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        return b"Client Closed Request" if status == 499 else b""


def serialize_head(start_line: bytes, headers: Headers) -> bytes:
    """``start_line`` plus header lines plus the blank line, as one bytes object."""
    parts = [start_line]
    for name, value in headers:
        parts.append(name + b": " + value + b"\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


def upstream_request_headers(
    client: Headers,
    *,
    host: bytes,
    forwarded_for: bytes,
    request_id: bytes,
    framing: Framing,
    identity_encoding: bool,
    drop: frozenset[bytes] = frozenset(),
    extra: Headers | None = None,
    proto: bytes = b"http",
) -> Headers:
    """The header list sent upstream for one request.

    ``client`` keeps its original name casing. Hop-by-hop headers, headers
    named in ``Connection``, the headers the proxy owns, and the names in
    ``drop`` (lower case) are dropped, each also in its ``_`` spelling (so
    ``X_Authenticated_User`` can't pass for ``X-Authenticated-User``); the
    proxy's own and ``extra`` are appended after. ``forwarded_for`` is the
    whole X-Forwarded-For value (see :func:`proxycore.request_head.client_address`:
    a client's own chain is kept only when its peer is a trusted proxy). ``proto`` is
    the scheme the client used (``X-Forwarded-Proto``).
    """
    # One walk: the names ``Connection`` lists are known only at its end, so a name
    # it lists that is not dropped anyway is taken out of ``out`` after (rare).
    out: Headers = []
    forwarded_host = b""
    listed: list[bytes] = []
    for name, value in client:
        lname = name.lower()
        if b"_" in lname:
            # Many frameworks read X_Foo and X-Foo as the same header: treat them so.
            lname = lname.replace(b"_", b"-")
        if lname in _REQUEST_SKIP:  # hop-by-hop or the proxy's own: never passed
            if lname == b"host":
                forwarded_host = value
            elif lname == b"connection":
                listed.append(value)
            continue
        if lname in drop:
            continue
        if identity_encoding and lname == b"accept-encoding":
            continue
        out.append((name, value))
    if listed:
        tokens = _tokens(listed)
        if b"host" in tokens:
            forwarded_host = b""
        if not tokens <= _REQUEST_SKIP:
            out = [(n, v) for n, v in out if _spelled(n) not in tokens]
    if forwarded_host and b"host" in drop:
        forwarded_host = b""
    out.append((b"Host", host))
    out.append((b"X-Forwarded-For", forwarded_for))
    out.append((b"X-Forwarded-Proto", proto))
    if forwarded_host:
        out.append((b"X-Forwarded-Host", forwarded_host))
    out.append((b"X-Request-ID", request_id))
    if identity_encoding:
        out.append((b"Accept-Encoding", b"identity"))
    if extra:
        out.extend(extra)
    if framing.kind == "length":
        out.append((b"Content-Length", b"%d" % framing.length))
    elif framing.kind == "chunked":
        out.append((b"Transfer-Encoding", b"chunked"))
    return out


def _spelled(name: bytes) -> bytes:
    """A request field name as the filters compare it: lower case, ``_`` read as ``-``."""
    lname = name.lower()
    return lname.replace(b"_", b"-") if b"_" in lname else lname


def downstream_response_headers(
    upstream: Headers,
    *,
    request_id: bytes,
    framing: Framing,
    keep_length: bool,
    close: bool,
) -> Headers:
    """The header list sent to the client for one upstream response.

    ``framing`` is how the proxy frames the body to the client. With
    ``keep_length`` (HEAD, 304) the upstream's Content-Length is kept as it
    describes the representation, not this message.
    """
    out: Headers = []
    listed: list[bytes] = []
    for name, value in upstream:
        lname = name.lower()
        if lname in _RESPONSE_SKIP:
            if lname == b"connection":
                listed.append(value)
            elif keep_length and lname == b"content-length":
                out.append((name, value))
            continue
        out.append((name, value))
    if listed:
        tokens = _tokens(listed)
        if not tokens <= HOP_BY_HOP:
            out = [(n, v) for n, v in out if n.lower() not in tokens]
    if framing.kind == "length":
        out.append((b"Content-Length", b"%d" % framing.length))
    elif framing.kind == "chunked":
        out.append((b"Transfer-Encoding", b"chunked"))
    out.append((b"X-Request-ID", request_id))
    if close:
        out.append((b"Connection", b"close"))
    return out


_FIELD_NAME: Final = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 token
#: Control characters other than HTAB (CR, LF and NUL among them): never in a field value.
_BAD_VALUE: Final = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


def invalid_header_problem(headers: object) -> str | None:
    """What is wrong with a header list from a hook, or None if it is safe to serialize.

    A list (or tuple) of ``(bytes, bytes)`` pairs; names RFC 9110 tokens; values without
    control characters except HTAB (no CR, LF or NUL). The problem names the field's
    position and what is wrong, never its value.
    """
    if not isinstance(headers, list | tuple):
        return f"headers must be a list of (name, value) pairs, got {type(headers).__name__}"
    for index, item in enumerate(headers):
        if not (isinstance(item, tuple | list) and len(item) == 2):
            return f"header {index} is not a (name, value) pair"
        name, value = item
        if not isinstance(name, bytes) or not isinstance(value, bytes):
            return f"header {index}: name and value must be bytes"
        if not _FIELD_NAME.fullmatch(name):
            return f"header {index}: the name is not a valid field name (RFC 9110 token)"
        if _BAD_VALUE.search(value):
            return f"header {index}: the value contains a control character (CR, LF, NUL...)"
    return None
