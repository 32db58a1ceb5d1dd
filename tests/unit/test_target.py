"""The one view of the request target (proxycore.http.target) and the decisions made on it.

The property tests generate targets from pieces attackers use (encoded letters, dots and
slashes, ``;params``, empty segments, overlong UTF-8) and check that every decision the proxy
makes on the view (route, encoded-slash refusal, deny_paths, git push) equals the decision
made on the target as a decoding upstream reads it (percent-decode, drop ``;params`` as Tomcat
and Spring do, merge ``//`` as nginx does), and that the target forwarded upstream reads the
same as the view.
"""

from __future__ import annotations

import fnmatch
import re
from urllib.parse import unquote_to_bytes

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from proxycore.config import Route
from proxycore.errors import BadRequest
from proxycore.http.router import Router
from proxycore.http.target import parse_target
from proxycore.security.policy import Policy, is_git_push

# =========================================================================== the rules, one by one


@pytest.mark.parametrize(
    ("target", "path", "forwarded"),
    [
        (b"/", "/", b"/"),
        (b"/a/b?x=%41", "/a/b", b"/a/b?x=%41"),  # the query is never touched
        (b"/%61dmin/x", "/admin/x", b"/admin/x"),  # unreserved decoded
        (b"/%7e%2D%2e%5F%30", "/~-._0", b"/~-._0"),
        (b"/a%20b", "/a b", b"/a%20b"),  # reserved or unsafe: kept encoded
        (b'/a b"<', '/a b"<', b"/a%20b%22%3C"),  # raw bytes a URI can't carry: encoded
        (b"/a%3fb%23c", "/a?b#c", b"/a%3Fb%23c"),  # hex upper-cased
        (b"/caf%c3%a9", "/caf\u00e9", b"/caf%C3%A9"),
        (b"/caf\xc3\xa9", "/caf\u00e9", b"/caf%C3%A9"),  # raw UTF-8 is encoded
        (b"//a///b", "/a/b", b"/a/b"),  # empty segments merged
        (b"/a//", "/a/", b"/a/"),
        (b"//", "/", b"/"),
        (b"/internal;v=1/x", "/internal/x", b"/internal;v=1/x"),  # params kept on the wire
        (b"/a;x=%2e%2e/b", "/a/b", b"/a;x=../b"),
        (b"/;jsessionid=1", "/", b"/;jsessionid=1"),
        (b"/a%2Fb", "/a%2Fb", b"/a%2Fb"),  # flagged, see below
        (b"/a%5cb", "/a%5Cb", b"/a%5Cb"),
        (b"/a/%252e%252e", "/a/%2e%2e", b"/a/%252e%252e"),  # decoded once only
    ],
)
def test_normalization(target: bytes, path: str, forwarded: bytes) -> None:
    view = parse_target(target)
    assert view.path == path
    assert view.target == forwarded


def test_encoded_slash_is_flagged() -> None:
    assert parse_target(b"/a%2fb").encoded_slash
    assert parse_target(b"/a;p=%2F/b").encoded_slash
    assert not parse_target(b"/a/b").encoded_slash
    assert not parse_target(b"/a%252Fb").encoded_slash


def test_merge_slashes_off_keeps_empty_segments_on_the_wire() -> None:
    view = parse_target(b"//a///b/")
    assert view.path == "/a/b/"
    assert view.wire_path(merge_slashes=False) == b"//a///b/"
    assert view.wire_path() == b"/a/b/"


@pytest.mark.parametrize(
    "target",
    [
        b"/%00",
        b"/a%0a",
        b"/a%0D%0Ab",
        b"/a%7f",
        b"/a;x=%00",
        b"/a\x01b",
        b"/a\x7fb",
        b"/a\\b",
        b"/%c0%ae%c0%ae/x",  # overlong '.'
        b"/%c0%af",  # overlong '/'
        b"/%e0%80%af",
        b"/%ff",
        b"/%C3",
        b"/\xff",
        b"/%",
        b"/%4",
        b"/%g1",
        b"/..;/x",
        b"/.;x/y",
        b"/a/%2e%2e;x/b",
        b"/x?a\x00",
        b"*",
        b"http://h/x",
    ],
)
def test_refused(target: bytes) -> None:
    with pytest.raises(BadRequest):
        parse_target(target)


# =========================================================================== router + view


def _route(prefix: str, **kwargs: object) -> Route:
    return Route(prefix, "http://up.test/base/", name=prefix, **kwargs)  # type: ignore[arg-type]


def test_router_strips_named_segments_of_the_normalized_path() -> None:
    router = Router([_route("/v1/")])
    for target, upstream in [
        (b"/v1;x=1/chat", b"/base/chat"),
        (b"//v1//chat", b"/base/chat"),
        (b"/%76%31/chat;p", b"/base/chat;p"),
        (b"/v1", b"/base"),
    ]:
        m = router.match(parse_target(target))
        assert m is not None and m.upstream_path == upstream, target


def test_router_refuses_encoded_slash_unless_the_route_allows_it() -> None:
    with pytest.raises(BadRequest):
        Router([_route("/")]).match(parse_target(b"/a%2Fb"))
    m = Router([_route("/", allow_encoded_slashes=True)]).match(parse_target(b"/a%2fb"))
    assert m is not None and m.upstream_path == b"/base/a%2Fb"


def test_router_merge_slashes_off() -> None:
    m = Router([_route("/", merge_slashes=False)]).match(parse_target(b"/a//b"))
    assert m is not None and m.upstream_path == b"/base/a//b"


# =========================================================================== the property

PREFIXES = ["/admin/", "/v1/", "/v1/admin/", "/"]
DENY = ["/internal/*", "/v1/secret"]

PIECES = st.sampled_from(
    [
        "admin",
        "%61dmin",
        "%41dmin",
        "adm%69n",
        "internal",
        "%69nternal",
        "v1",
        "%76%31",
        "secret",
        "x",
        "",
        ";v=1",
        ";",
        "%2e",
        ".",
        "%2F",
        "%2f",
        "%5C",
        "%25",
        "%c0%ae",
        "%c3%a9",
        "%00",
        "git-receive-pack",
        "git%2Dreceive-pack",
        "a b",
        "%20",
    ]
)
SEGMENTS = st.lists(st.lists(PIECES, max_size=3).map("".join), min_size=1, max_size=5)


def _decoding_upstream(target: bytes) -> str | None:
    """How a decoding upstream reads the path: params dropped per segment, percent-decoded
    (Tomcat/Spring), empty segments merged (nginx). ``None`` when it is not valid UTF-8."""
    path = target.partition(b"?")[0]
    segments = [seg.partition(b";")[0] for seg in path[1:].split(b"/")]
    try:
        names = [unquote_to_bytes(seg).decode("utf-8") for seg in segments]
    except UnicodeDecodeError:
        return None
    joined = "/" + "/".join(n for n in names if n)
    if names[-1] == "" and joined != "/":
        joined += "/"
    return joined


def _reference_route(path: str) -> str | None:
    best = None
    for prefix in PREFIXES:
        stem = prefix.rstrip("/")
        if (path == stem or path.startswith(stem + "/")) and (
            best is None or len(stem) > len(best.rstrip("/"))
        ):
            best = prefix
    return best


ROUTER = Router([_route(p) for p in PREFIXES])
POLICY = Policy(deny_paths=DENY, deny_git_push=True)


@settings(max_examples=600, deadline=None)
@given(SEGMENTS)
@example(["%61dmin", "x"])
@example(["internal;v=1", "x"])
@example(["", "internal", "", "x"])
@example(["v1", "adm%69n;p", "x"])
@example(["v1", "secret", ""])
def test_decisions_on_the_view_equal_the_upstreams_reading(segments: list[str]) -> None:
    target = ("/" + "/".join(segments)).encode()
    try:
        view = parse_target(target)
    except BadRequest:
        return  # refused: nothing reaches the upstream, whatever it would have read
    upstream_path = _decoding_upstream(target)
    assert upstream_path is not None  # every target the upstream can't read is refused
    if view.encoded_slash:
        # The upstream would read '%2F' as a separator: refused unless the route opts in.
        with pytest.raises(BadRequest):
            ROUTER.match(view)
        return
    assert view.path == upstream_path
    match = ROUTER.match(view)
    assert (match.route.prefix if match else None) == _reference_route(upstream_path)
    denied = POLICY.check(b"GET", view.path, b"") is not None
    # A pattern also covers its path with one trailing slash (Spring's trailing-slash match).
    readings = {upstream_path, upstream_path[:-1] if upstream_path.endswith("/") else upstream_path}
    assert denied == any(fnmatch.fnmatchcase(r, p) for r in readings for p in DENY)
    push = is_git_push(b"POST", view.path, b"")
    assert push == upstream_path.rstrip("/").endswith("/git-receive-pack")
    # What is forwarded reads, for the same upstream, exactly as the view.
    assert _decoding_upstream(view.target) == view.path


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=40))
def test_arbitrary_bytes_are_refused_or_normalized_idempotently(raw: bytes) -> None:
    try:
        view = parse_target(b"/" + raw)
    except BadRequest:
        return
    again = parse_target(view.target)
    assert (again.path, again.target) == (view.path, view.target)
    assert re.fullmatch(rb"[\x21-\x7e]*", view.wire_path())
