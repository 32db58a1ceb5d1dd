"""The header functions' fast paths (one walk, names lower-cased only when their length
could match, ids from a random pool, ``scan_request``) against the previous
implementations, kept here verbatim as the reference: same lists, same decisions, same
errors, for generated heads full of the spellings smuggling relies on. No speed is
asserted."""

from __future__ import annotations

import os
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxycore.errors import BadRequest, UpstreamProtocolError
from proxycore.http.headers import (
    CHUNKED,
    HOP_BY_HOP,
    NO_BODY,
    PROXY_OWNED_REQUEST,
    PROXY_OWNED_RESPONSE,
    UNTIL_CLOSE,
    Framing,
    Headers,
    connection_tokens,
    downstream_response_headers,
    fresh_request_id,
    is_sse,
    request_framing,
    request_id_from,
    response_framing,
    scan_request,
    upstream_request_headers,
)
from proxycore.http.sse import is_event_stream

# ================================================================ the reference (as it was)

REF_HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
REF_OWNED_REQUEST = frozenset(
    {
        b"host",
        b"content-length",
        b"expect",
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
        b"x-forwarded-port",
        b"x-forwarded-prefix",
        b"x-real-ip",
        b"forwarded",
        b"x-original-url",
        b"x-original-uri",
        b"x-rewrite-url",
        b"x-forwarded-uri",
        b"x-forwarded-method",
        b"x-forwarded-ssl",
        b"x-forwarded-scheme",
        b"x-forwarded-server",
        b"x-http-method-override",
        b"x-http-method",
        b"x-method-override",
        b"x-client-ip",
        b"true-client-ip",
        b"cf-connecting-ip",
        b"x-request-id",
    }
)
REF_OWNED_RESPONSE = frozenset({b"content-length", b"x-request-id"})
REF_REQUEST_ID_OK = re.compile(rb"[A-Za-z0-9._:\-]{1,128}")


def ref_connection_tokens(headers: Headers) -> frozenset[bytes]:
    tokens: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            tokens.update(t.strip().lower() for t in value.split(b","))
    tokens.discard(b"")
    return frozenset(tokens)


def ref_values(headers: Headers, wanted: bytes) -> list[bytes]:
    return [v for n, v in headers if n.lower() == wanted]


def ref_content_length(values: list[bytes], error: type[Exception]) -> int:
    lengths = {v.strip() for value in values for v in value.split(b",")}
    if len(lengths) != 1:
        raise error("conflicting Content-Length values")
    (raw,) = lengths
    if not raw.isdigit() or len(raw) > 18:
        raise error("malformed Content-Length")
    return int(raw)


def ref_request_framing(headers: Headers, http_version: bytes) -> Framing:
    te = ref_values(headers, b"transfer-encoding")
    cl = ref_values(headers, b"content-length")
    if te:
        if cl:
            raise BadRequest("both Content-Length and Transfer-Encoding are present")
        if http_version != b"1.1":
            raise BadRequest("Transfer-Encoding is not allowed in HTTP/1.0")
        if len(te) != 1 or te[0].strip().lower() != b"chunked":
            raise BadRequest("Transfer-Encoding must be exactly 'chunked'")
        return CHUNKED
    if cl:
        n = ref_content_length(cl, BadRequest)
        return Framing("length", n) if n else NO_BODY
    return NO_BODY


def ref_response_framing(method: bytes, status: int, headers: Headers) -> Framing:
    if method == b"HEAD" or status < 200 or status in (204, 304):
        return NO_BODY
    te = ref_values(headers, b"transfer-encoding")
    cl = ref_values(headers, b"content-length")
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
        return Framing("length", ref_content_length(cl, UpstreamProtocolError))
    return UNTIL_CLOSE


def ref_is_sse(headers: Headers) -> bool:
    return is_event_stream(next((v for n, v in headers if n.lower() == b"content-type"), None))


def ref_request_id_from(headers: Headers) -> str:
    for name, value in headers:
        if name.lower() == b"x-request-id" and REF_REQUEST_ID_OK.fullmatch(value):
            return value.decode("ascii")
    return os.urandom(12).hex()


def ref_upstream_request_headers(
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
    dropped = ref_connection_tokens(client) | REF_HOP_BY_HOP | drop
    out: Headers = []
    forwarded_host = b""
    for name, value in client:
        lname = name.lower()
        if b"_" in lname:
            # Many frameworks read X_Foo and X-Foo as the same header: treat them so.
            lname = lname.replace(b"_", b"-")
        if lname in dropped:
            continue
        if lname in REF_OWNED_REQUEST:
            if lname == b"host":
                forwarded_host = value
            continue
        if identity_encoding and lname == b"accept-encoding":
            continue
        out.append((name, value))
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


def ref_downstream_response_headers(
    upstream: Headers,
    *,
    request_id: bytes,
    framing: Framing,
    keep_length: bool,
    close: bool,
) -> Headers:
    dropped = ref_connection_tokens(upstream) | REF_HOP_BY_HOP
    out: Headers = []
    for name, value in upstream:
        lname = name.lower()
        if lname in dropped:
            continue
        if lname in REF_OWNED_RESPONSE and not (keep_length and lname == b"content-length"):
            continue
        out.append((name, value))
    if framing.kind == "length":
        out.append((b"Content-Length", b"%d" % framing.length))
    elif framing.kind == "chunked":
        out.append((b"Transfer-Encoding", b"chunked"))
    out.append((b"X-Request-ID", request_id))
    if close:
        out.append((b"Connection", b"close"))
    return out


# ================================================================ generated heads

NAMES = [
    b"Host",
    b"Content-Length",
    b"content_length",
    b"Transfer-Encoding",
    b"TRANSFER-ENCODING",
    b"Transfer_Encoding",
    b"Connection",
    b"connection",
    b"Keep-Alive",
    b"Upgrade",
    b"HTTP2-Settings",
    b"Expect",
    b"Accept",
    b"Accept-Encoding",
    b"Content-Type",
    b"X-Request-ID",
    b"x_request_id",
    b"X-Forwarded-For",
    b"X_Forwarded_For",
    b"X-Real-IP",
    b"Forwarded",
    b"Proxy-Authorization",
    b"Authorization",
    b"X-Authenticated-User",
    b"X_Authenticated_User",
    b"X-Foo",
    b"X_Foo",
    b"x-foo",
    b"TE",
    b"Trailer",
    b"Cookie",
    b"User-Agent",
    b"Mcp-Session-Id",
    b"X-Api-Key",
    b"Content-Lengthx",
    b"Host_",
]
VALUES = [
    b"",
    b" ",
    b"5",
    b" 7 ",
    b"0",
    b"5, 5",
    b"5, 6",
    b"-1",
    b"+5",
    b"0x10",
    b"1" * 19,
    b"chunked",
    b" Chunked ",
    b"gzip, chunked",
    b"chunked, gzip",
    b"identity",
    b"close",
    b"keep-alive",
    b"Keep-Alive, Upgrade",
    b"upgrade, http2-settings",
    b"x-foo, host",
    b"X_Foo",
    b"content-length",
    b"x-request-id, , te",
    b"x-authenticated-user",
    b"h2c",
    b"websocket",
    b"100-continue",
    b" 100-Continue",
    b"text/event-stream",
    b"application/json, TEXT/EVENT-STREAM;q=0.5",
    b"rid-123:abc.DEF_9",
    b"bad id with spaces",
    b"a" * 129,
    b"example.com:8080",
]
headers_st = st.lists(st.tuples(st.sampled_from(NAMES), st.sampled_from(VALUES)), max_size=12)
drop_st = st.sampled_from(
    [frozenset(), frozenset({b"x-api-key"}), frozenset({b"host", b"x-foo", b"cookie"})]
)
framing_st = st.sampled_from([NO_BODY, CHUNKED, UNTIL_CLOSE, Framing("length", 12)])


def outcome(fn: object, *args: object) -> object:
    """The value, or the error's type and message."""
    try:
        return fn(*args)  # type: ignore[operator]
    except (BadRequest, UpstreamProtocolError) as exc:
        return (type(exc), str(exc))


def test_sets_unchanged() -> None:
    assert HOP_BY_HOP == REF_HOP_BY_HOP
    assert PROXY_OWNED_REQUEST == REF_OWNED_REQUEST
    assert PROXY_OWNED_RESPONSE == REF_OWNED_RESPONSE


@settings(max_examples=1500, deadline=None)
@given(headers_st)
def test_request_side_matches_reference(headers: Headers) -> None:
    assert connection_tokens(headers) == ref_connection_tokens(headers)
    for version in (b"1.1", b"1.0"):
        assert outcome(request_framing, headers, version) == outcome(
            ref_request_framing, headers, version
        )
    scan = scan_request(headers)
    assert scan.tokens == ref_connection_tokens(headers)
    for version in (b"1.1", b"1.0"):
        assert outcome(scan.framing, version) == outcome(ref_request_framing, headers, version)
    assert scan.upgrade == any(n.lower() == b"upgrade" for n, _ in headers)
    assert scan.expect == [v.strip().lower() for n, v in headers if n.lower() == b"expect"]
    assert scan.accepts_event_stream == any(
        n.lower() == b"accept" and b"text/event-stream" in v.lower() for n, v in headers
    )
    supplied = any(
        n.lower() == b"x-request-id" and REF_REQUEST_ID_OK.fullmatch(v) for n, v in headers
    )
    for rid in (request_id_from(headers), scan.request_id):
        if supplied:
            assert rid == ref_request_id_from(headers)
        else:
            assert re.fullmatch("[0-9a-f]{24}", rid)


@settings(max_examples=1500, deadline=None)
@given(headers_st, drop_st, framing_st, st.booleans(), st.booleans())
def test_upstream_request_headers_match_reference(
    headers: Headers, drop: frozenset[bytes], framing: Framing, identity: bool, extra: bool
) -> None:
    kwargs: dict[str, object] = {
        "host": b"up:8080",
        "forwarded_for": b"10.0.0.1",
        "request_id": b"r" * 24,
        "framing": framing,
        "identity_encoding": identity,
        "drop": drop,
        "extra": [(b"X-Api-Key", b"secret")] if extra else None,
        "proto": b"https",
    }
    new = upstream_request_headers(headers, **kwargs)  # type: ignore[arg-type]
    assert new == ref_upstream_request_headers(headers, **kwargs)  # type: ignore[arg-type]


@settings(max_examples=1500, deadline=None)
@given(
    headers_st,
    framing_st,
    st.booleans(),
    st.booleans(),
    st.sampled_from([b"GET", b"HEAD"]),
    st.sampled_from([100, 101, 200, 204, 304, 502]),
)
def test_response_side_matches_reference(
    headers: Headers, framing: Framing, keep_length: bool, close: bool, method: bytes, status: int
) -> None:
    assert outcome(response_framing, method, status, headers) == outcome(
        ref_response_framing, method, status, headers
    )
    assert is_sse(headers) == ref_is_sse(headers)
    kwargs: dict[str, object] = {
        "request_id": b"r" * 24,
        "framing": framing,
        "keep_length": keep_length,
        "close": close,
    }
    new = downstream_response_headers(headers, **kwargs)  # type: ignore[arg-type]
    assert new == ref_downstream_response_headers(headers, **kwargs)  # type: ignore[arg-type]


def test_connection_listed_names_dropped_in_any_spelling() -> None:
    headers = [
        (b"X_Foo", b"1"),
        (b"Connection", b"x-foo, Host"),
        (b"Host", b"client.example"),
        (b"X-Foo", b"2"),
        (b"X-Bar", b"3"),
    ]
    out = upstream_request_headers(
        headers,
        host=b"up",
        forwarded_for=b"1.2.3.4",
        request_id=b"rid",
        framing=NO_BODY,
        identity_encoding=False,
    )
    names = [n for n, _ in out]
    assert b"X_Foo" not in names and b"X-Foo" not in names
    assert b"X-Forwarded-Host" not in names  # the client listed Host: not forwarded
    assert (b"X-Bar", b"3") in out


def test_fresh_ids_are_96_random_bits_and_unique() -> None:
    ids = [fresh_request_id() for _ in range(5000)]  # many refills of the pool
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch("[0-9a-f]{24}", i) for i in ids)
    assert request_id_from([]) not in ids


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_forked_child_never_repeats_the_parents_ids() -> None:
    fresh_request_id()  # the pool is filled before the fork
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next ids, then out at once
        try:
            os.write(write, "".join(fresh_request_id() for _ in range(20)).encode())
        finally:
            os._exit(0)
    os.close(write)
    child = b""
    while chunk := os.read(read, 4096):
        child += chunk
    os.close(read)
    os.waitpid(pid, 0)
    parent = "".join(fresh_request_id() for _ in range(20)).encode()
    child_ids = {child[i : i + 24] for i in range(0, len(child), 24)}
    parent_ids = {parent[i : i + 24] for i in range(0, len(parent), 24)}
    assert len(child_ids) == 20
    assert not child_ids & parent_ids
