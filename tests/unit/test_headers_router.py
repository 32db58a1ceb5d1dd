"""Pure tests of proxycore.http.headers (framing, header rewriting, request ids) and
proxycore.http.router (target checks, longest-prefix matching)."""

from __future__ import annotations

import re

import pytest

from proxycore.config import Route
from proxycore.errors import BadRequest, UpstreamProtocolError
from proxycore.http.headers import (
    CHUNKED,
    HOP_BY_HOP,
    NO_BODY,
    UNTIL_CLOSE,
    Framing,
    Headers,
    connection_tokens,
    downstream_response_headers,
    request_framing,
    request_id_from,
    response_framing,
    serialize_head,
    upstream_request_headers,
)
from proxycore.http.router import Router
from proxycore.http.target import parse_target

# =========================================================================== request framing


@pytest.mark.parametrize(
    ("headers", "version", "expected"),
    [
        ([], b"1.1", NO_BODY),
        ([(b"Host", b"x")], b"1.0", NO_BODY),
        ([(b"Content-Length", b"10")], b"1.1", Framing("length", 10)),
        ([(b"content-length", b" 7 ")], b"1.0", Framing("length", 7)),
        ([(b"Content-Length", b"0")], b"1.1", NO_BODY),
        ([(b"Content-Length", b"5"), (b"Content-Length", b"5")], b"1.1", Framing("length", 5)),
        ([(b"Content-Length", b"5, 5")], b"1.1", Framing("length", 5)),
        ([(b"Transfer-Encoding", b"chunked")], b"1.1", CHUNKED),
        ([(b"transfer-encoding", b" Chunked ")], b"1.1", CHUNKED),
    ],
)
def test_request_framing(headers: Headers, version: bytes, expected: Framing) -> None:
    assert request_framing(headers, version) == expected


@pytest.mark.parametrize(
    ("headers", "version"),
    [
        ([(b"Content-Length", b"5"), (b"Transfer-Encoding", b"chunked")], b"1.1"),
        ([(b"Transfer-Encoding", b"chunked"), (b"Content-Length", b"0")], b"1.1"),
        ([(b"Transfer-Encoding", b"chunked")], b"1.0"),
        ([(b"Transfer-Encoding", b"gzip, chunked")], b"1.1"),
        ([(b"Transfer-Encoding", b"chunked, chunked")], b"1.1"),
        ([(b"Transfer-Encoding", b"chunked"), (b"Transfer-Encoding", b"chunked")], b"1.1"),
        ([(b"Transfer-Encoding", b"identity")], b"1.1"),
        ([(b"Content-Length", b"5"), (b"Content-Length", b"6")], b"1.1"),
        ([(b"Content-Length", b"5, 6")], b"1.1"),
        ([(b"Content-Length", b"-1")], b"1.1"),
        ([(b"Content-Length", b"+5")], b"1.1"),
        ([(b"Content-Length", b"0x10")], b"1.1"),
        ([(b"Content-Length", b"")], b"1.1"),
        ([(b"Content-Length", b"1" * 19)], b"1.1"),
    ],
)
def test_request_framing_refuses_smuggling_shapes(headers: Headers, version: bytes) -> None:
    with pytest.raises(BadRequest):
        request_framing(headers, version)


# =========================================================================== response framing


@pytest.mark.parametrize(
    ("method", "status", "headers", "expected"),
    [
        (b"HEAD", 200, [(b"Content-Length", b"1234")], NO_BODY),
        (b"HEAD", 200, [(b"Transfer-Encoding", b"chunked")], NO_BODY),
        (b"GET", 103, [], NO_BODY),
        (b"GET", 204, [(b"Content-Length", b"10")], NO_BODY),
        (b"GET", 304, [(b"Content-Length", b"10")], NO_BODY),
        (b"GET", 200, [(b"Content-Length", b"10")], Framing("length", 10)),
        (b"GET", 200, [(b"Content-Length", b"0")], Framing("length", 0)),
        (b"GET", 200, [(b"Content-Length", b"3"), (b"Content-Length", b"3")], Framing("length", 3)),
        (b"GET", 200, [(b"Transfer-Encoding", b"chunked")], CHUNKED),
        (b"GET", 200, [(b"Transfer-Encoding", b"gzip, chunked")], CHUNKED),
        (
            b"GET",
            200,
            [(b"Transfer-Encoding", b"gzip"), (b"Transfer-Encoding", b"chunked")],
            CHUNKED,
        ),
        (b"GET", 200, [(b"Transfer-Encoding", b"chunked, gzip")], UNTIL_CLOSE),
        (b"GET", 200, [], UNTIL_CLOSE),
        (b"POST", 500, [(b"X-A", b"1")], UNTIL_CLOSE),
    ],
)
def test_response_framing(method: bytes, status: int, headers: Headers, expected: Framing) -> None:
    assert response_framing(method, status, headers) == expected


@pytest.mark.parametrize(
    "headers",
    [
        [(b"Content-Length", b"5"), (b"Content-Length", b"6")],
        [(b"Content-Length", b"five")],
        [(b"Content-Length", b"-5")],
        [(b"Transfer-Encoding", b"chunked"), (b"Content-Length", b"5")],
        [(b"Content-Length", b"5"), (b"Transfer-Encoding", b"chunked")],
        [(b"Transfer-Encoding", b"gzip"), (b"Content-Length", b"5")],
    ],
)
def test_response_framing_refuses_bad_or_ambiguous_length(headers: Headers) -> None:
    with pytest.raises(UpstreamProtocolError):
        response_framing(b"GET", 200, headers)


# =========================================================================== tokens and ids


def test_connection_tokens_are_lowercased_across_all_connection_headers() -> None:
    headers = [
        (b"Connection", b"close, X-Foo"),
        (b"X-Foo", b"1"),
        (b"connection", b" Keep-Alive ,, "),
    ]
    assert connection_tokens(headers) == frozenset({b"close", b"x-foo", b"keep-alive"})
    assert connection_tokens([(b"X-Connection", b"close")]) == frozenset()
    assert connection_tokens([(b"Connection", b"")]) == frozenset()


def test_hop_by_hop_set() -> None:
    assert {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    } <= HOP_BY_HOP


RANDOM_ID = re.compile(r"[0-9a-f]{24}")


@pytest.mark.parametrize("value", [b"abc", b"A-Z.a_z:0-9", b"x" * 128])
def test_request_id_from_keeps_a_sane_client_id(value: bytes) -> None:
    assert request_id_from([(b"Host", b"h"), (b"x-request-id", value)]) == value.decode()


@pytest.mark.parametrize(
    "value", [b"", b"has space", b"x" * 129, b"semi;colon", b'quote"', b"caf\xc3\xa9", b"a\tb"]
)
def test_request_id_from_replaces_an_insane_client_id(value: bytes) -> None:
    rid = request_id_from([(b"X-Request-ID", value)])
    assert rid != value.decode("latin-1")
    assert RANDOM_ID.fullmatch(rid)


def test_request_id_from_generates_fresh_ids() -> None:
    ids = {request_id_from([]) for _ in range(20)}
    assert len(ids) == 20
    assert all(RANDOM_ID.fullmatch(i) for i in ids)


def test_serialize_head() -> None:
    head = serialize_head(b"GET / HTTP/1.1\r\n", [(b"Host", b"h"), (b"X-A", b"1")])
    assert head == b"GET / HTTP/1.1\r\nHost: h\r\nX-A: 1\r\n\r\n"
    assert serialize_head(b"HTTP/1.1 204 No Content\r\n", []) == b"HTTP/1.1 204 No Content\r\n\r\n"


# =========================================================================== upstream request


def _up(
    client: Headers,
    *,
    framing: Framing = NO_BODY,
    identity: bool = False,
    host: bytes = b"up.test:8000",
) -> Headers:
    return upstream_request_headers(
        client,
        host=host,
        forwarded_for=b"192.0.2.1",
        request_id=b"rid-1",
        framing=framing,
        identity_encoding=identity,
    )


def test_upstream_request_headers_full_rewrite() -> None:
    client = [
        (b"Host", b"client.example"),
        (b"User-Agent", b"ua/1"),
        (b"Connection", b"keep-alive, X-Hop"),
        (b"Keep-Alive", b"timeout=5"),
        (b"Proxy-Connection", b"keep-alive"),
        (b"Proxy-Authorization", b"Basic x"),
        (b"TE", b"trailers"),
        (b"Trailer", b"X-T"),
        (b"Upgrade", b"h2c"),
        (b"X-Hop", b"1"),
        (b"X-Forwarded-For", b"203.0.113.9"),
        (b"X-Forwarded-Proto", b"https"),
        (b"X-Forwarded-Host", b"spoofed"),
        (b"X-Request-ID", b"client-id"),
        (b"Expect", b"100-continue"),
        (b"Content-Length", b"999"),
        (b"Accept-Encoding", b"gzip"),
        (b"x-MiXeD", b"kept"),
    ]
    assert _up(client, framing=Framing("length", 12)) == [
        (b"User-Agent", b"ua/1"),
        (b"Accept-Encoding", b"gzip"),
        (b"x-MiXeD", b"kept"),
        (b"Host", b"up.test:8000"),
        (b"X-Forwarded-For", b"192.0.2.1"),
        (b"X-Forwarded-Proto", b"http"),
        (b"X-Forwarded-Host", b"client.example"),
        (b"X-Request-ID", b"rid-1"),
        (b"Content-Length", b"12"),
    ]


def test_upstream_request_headers_connection_cannot_drop_proxy_headers() -> None:
    client = [
        (b"Host", b"client.example"),
        (b"Connection", b"X-Forwarded-For, X-Request-ID, Host, Content-Length"),
        (b"X-Forwarded-For", b"10.0.0.1"),
    ]
    out = _up(client, framing=Framing("length", 3))
    names = [n.lower() for n, _ in out]
    for owned in [b"host", b"x-forwarded-for", b"x-request-id", b"content-length"]:
        assert names.count(owned) == 1, owned
    assert (b"Host", b"up.test:8000") in out
    assert (b"X-Request-ID", b"rid-1") in out
    assert (b"Content-Length", b"3") in out
    # The chain the client asked to drop is dropped; the proxy's own hop stays.
    assert (b"X-Forwarded-For", b"192.0.2.1") in out


def test_upstream_request_headers_client_forwarding_headers_never_pass() -> None:
    """The chain is the caller's (request_head.client_address decides); client copies of
    every forwarding or URL-override header are dropped."""
    client = [
        (b"X-Forwarded-For", b"1.1.1.1"),
        (b"x-forwarded-for", b"2.2.2.2, 3.3.3.3"),
        (b"Forwarded", b"for=6.6.6.6"),
        (b"X-Real-IP", b"6.6.6.6"),
        (b"X-Forwarded-Port", b"1"),
        (b"X-Forwarded-Prefix", b"/admin"),
        (b"X-Original-URL", b"/admin"),
        (b"X-Rewrite-URL", b"/admin"),
        (b"X-HTTP-Method-Override", b"DELETE"),
        (b"X_Real_IP", b"6.6.6.6"),
    ]
    out = _up(client)
    assert dict(out)[b"X-Forwarded-For"] == b"192.0.2.1"
    assert [v for n, v in out if n.lower() == b"x-forwarded-for"] == [b"192.0.2.1"]
    names = {n.lower().replace(b"_", b"-") for n, _ in out}
    for dropped in (b"forwarded", b"x-real-ip", b"x-forwarded-port", b"x-forwarded-prefix"):
        assert dropped not in names
    for dropped in (b"x-original-url", b"x-rewrite-url", b"x-http-method-override"):
        assert dropped not in names


def test_upstream_request_headers_without_client_host_has_no_forwarded_host() -> None:
    out = _up([])
    assert [n for n, _ in out] == [
        b"Host",
        b"X-Forwarded-For",
        b"X-Forwarded-Proto",
        b"X-Request-ID",
    ]


@pytest.mark.parametrize(
    ("identity", "expected"),
    [(True, [b"identity"]), (False, [b"gzip, br", b"zstd"])],
)
def test_upstream_request_headers_accept_encoding(identity: bool, expected: list[bytes]) -> None:
    client = [(b"Accept-Encoding", b"gzip, br"), (b"accept-encoding", b"zstd")]
    out = _up(client, identity=identity)
    assert [v for n, v in out if n.lower() == b"accept-encoding"] == expected


def test_upstream_request_headers_chunked_framing() -> None:
    out = _up([(b"Transfer-Encoding", b"chunked")], framing=CHUNKED)
    te = [(n, v) for n, v in out if n.lower() == b"transfer-encoding"]
    assert te == [(b"Transfer-Encoding", b"chunked")]
    assert not any(n.lower() == b"content-length" for n, _ in out)


# =========================================================================== downstream response


def test_downstream_response_headers_drop_hop_by_hop_and_connection_named() -> None:
    upstream = [
        (b"Content-Type", b"text/plain"),
        (b"Connection", b"close, X-Secret-Hop"),
        (b"X-Secret-Hop", b"1"),
        (b"Keep-Alive", b"timeout=5"),
        (b"Proxy-Authenticate", b"Basic"),
        (b"Trailer", b"X-T"),
        (b"Transfer-Encoding", b"chunked"),
        (b"Content-Length", b"5"),
        (b"X-Request-ID", b"upstream-id"),
        (b"Set-Cookie", b"a=1"),
        (b"Set-Cookie", b"b=2"),
    ]
    out = downstream_response_headers(
        upstream, request_id=b"rid-1", framing=CHUNKED, keep_length=False, close=False
    )
    assert out == [
        (b"Content-Type", b"text/plain"),
        (b"Set-Cookie", b"a=1"),
        (b"Set-Cookie", b"b=2"),
        (b"Transfer-Encoding", b"chunked"),
        (b"X-Request-ID", b"rid-1"),
    ]


def test_downstream_response_headers_length_and_close() -> None:
    out = downstream_response_headers(
        [(b"Content-Length", b"999")],
        request_id=b"r",
        framing=Framing("length", 4),
        keep_length=False,
        close=True,
    )
    assert out == [(b"Content-Length", b"4"), (b"X-Request-ID", b"r"), (b"Connection", b"close")]


def test_downstream_response_headers_keep_length_for_head_and_304() -> None:
    out = downstream_response_headers(
        [(b"Content-Length", b"1234"), (b"ETag", b'"v"')],
        request_id=b"r",
        framing=NO_BODY,
        keep_length=True,
        close=False,
    )
    assert out == [(b"Content-Length", b"1234"), (b"ETag", b'"v"'), (b"X-Request-ID", b"r")]


def test_downstream_response_headers_no_body_without_keep_length() -> None:
    out = downstream_response_headers(
        [(b"Content-Length", b"10"), (b"Transfer-Encoding", b"chunked")],
        request_id=b"r",
        framing=NO_BODY,
        keep_length=False,
        close=False,
    )
    assert out == [(b"X-Request-ID", b"r")]


def test_downstream_response_headers_until_close_adds_no_framing() -> None:
    out = downstream_response_headers(
        [(b"Content-Type", b"a/b")],
        request_id=b"r",
        framing=UNTIL_CLOSE,
        keep_length=False,
        close=True,
    )
    assert out == [(b"Content-Type", b"a/b"), (b"X-Request-ID", b"r"), (b"Connection", b"close")]


# ============================================================ parse_target (more: test_target.py)


@pytest.mark.parametrize(
    ("target", "path", "query"),
    [
        (b"/", "/", b""),
        (b"/a/b?x=1", "/a/b", b"?x=1"),
        (b"/a?", "/a", b"?"),
        (b"/a?b=/../c&d=./", "/a", b"?b=/../c&d=./"),
        (b"/a/.../b", "/a/.../b", b""),
        (b"/a/..b/c.", "/a/..b/c.", b""),
        (b"/.well-known/x", "/.well-known/x", b""),
        (b"/a%2Fb", "/a%2Fb", b""),
        (b"/a/%2e%2e%2e", "/a/...", b""),
        (b"/a/%252e%252e/b", "/a/%2e%2e/b", b""),
        (b"/file.tar.gz", "/file.tar.gz", b""),
        (b"//evil.example/x", "/evil.example/x", b""),
    ],
)
def test_parse_target_accepts(target: bytes, path: str, query: bytes) -> None:
    view = parse_target(target)
    assert (view.path, view.query) == (path, query)


@pytest.mark.parametrize(
    "target",
    [
        b"/a/../b",
        b"/..",
        b"/../",
        b"/a/..",
        b"/.",
        b"/./x",
        b"/a/./b",
        b"/a/%2e%2E/b",
        b"/a/%2E%2e",
        b"/a/.%2e/",
        b"/a/%2e./",
        b"/a/%2e/b",
        b"/a/..\\b",
        b"/a\\..\\b",
        b"http://x/y",
        b"https://x/",
        b"x/y",
        b"*",
        b"",
        b"/a#frag",
        b"/a?x#frag",
    ],
)
def test_parse_target_refuses(target: bytes) -> None:
    with pytest.raises(BadRequest):
        parse_target(target)


# =========================================================================== router


def _route(prefix: str, upstream: str = "http://up.test/", *, strip_prefix: bool = True) -> Route:
    return Route(prefix, upstream, strip_prefix=strip_prefix, name=prefix)


def _match(router: Router, path: bytes) -> tuple[str, bytes] | None:
    m = router.match(parse_target(path))
    return None if m is None else (m.route.name, m.upstream_path)


@pytest.mark.parametrize("prefix", ["/api/", "/api"])
@pytest.mark.parametrize(
    ("path", "expected"),
    [
        (b"/api", b"/base"),
        (b"/api/", b"/base/"),
        (b"/api/x", b"/base/x"),
        (b"/api/x/y/", b"/base/x/y/"),
        (b"/apix", None),
        (b"/ap", None),
        (b"/", None),
        (b"/API/x", None),
        (b"/v1/api/x", None),
    ],
)
def test_router_segment_boundary(prefix: str, path: bytes, expected: bytes | None) -> None:
    router = Router([_route(prefix, "http://up.test/base/")])
    got = _match(router, path)
    assert got == (None if expected is None else (prefix, expected))


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        (b"/api/v2/x", ("/api/v2/", b"/two/x")),
        (b"/api/v2", ("/api/v2/", b"/two")),
        (b"/api/v2x", ("/api/", b"/one/v2x")),
        (b"/api/x", ("/api/", b"/one/x")),
        (b"/apix", ("/", b"/apix")),
        (b"/", ("/", b"/")),
    ],
)
def test_router_longest_prefix_wins_in_any_order(path: bytes, expected: tuple[str, bytes]) -> None:
    routes = [
        _route("/"),
        _route("/api/", "http://up.test/one/"),
        _route("/api/v2/", "http://up.test/two"),
    ]
    for order in (routes, routes[::-1], [routes[1], routes[2], routes[0]]):
        assert _match(Router(order), path) == expected


@pytest.mark.parametrize(
    ("upstream", "strip", "path", "expected"),
    [
        ("http://h/api/", True, b"/v1/x", b"/api/x"),
        ("http://h/api/", False, b"/v1/x", b"/api/v1/x"),
        ("http://h/api", True, b"/v1/x", b"/api/x"),
        ("http://h/", True, b"/v1/x", b"/x"),
        ("http://h", True, b"/v1/x", b"/x"),
        ("http://h/", False, b"/v1/x", b"/v1/x"),
        ("http://h/", True, b"/v1", b"/"),
        ("http://h/", True, b"/v1/", b"/"),
        ("http://h/api/", True, b"/v1", b"/api"),
        ("http://h/api/", False, b"/v1", b"/api/v1"),
    ],
)
def test_router_strip_prefix(upstream: str, strip: bool, path: bytes, expected: bytes) -> None:
    router = Router([_route("/v1/", upstream, strip_prefix=strip)])
    m = router.match(parse_target(path))
    assert m is not None
    assert m.upstream_path == expected


def test_router_root_route_keeps_the_path() -> None:
    router = Router([_route("/", "http://h/base/")])
    assert _match(router, b"/") == ("/", b"/base/")
    assert _match(router, b"/x/y") == ("/", b"/base/x/y")


def test_router_without_routes_matches_nothing() -> None:
    assert Router([]).match(parse_target(b"/")) is None
