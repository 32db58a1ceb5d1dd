"""Pure tests of proxycore.security.policy: git push detection, Policy and validators."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

import pytest

from proxycore.http.target import parse_target
from proxycore.security.policy import (
    Policy,
    Refusal,
    is_git_push,
    validate_methods,
    validate_pattern,
)


def _view(target: bytes) -> str:
    """The decision path every rule sees (the normalized target view)."""
    return parse_target(target).path


REPO = b"/x/repo.git"

# =========================================================================== is_git_push


@pytest.mark.parametrize(
    ("method", "path", "query", "expected"),
    [
        # the reference cases
        (b"POST", REPO + b"/git-receive-pack", b"", True),
        (b"GET", REPO + b"/info/refs", b"?service=git-receive-pack", True),
        (b"GET", REPO + b"/info/refs", b"?a=1&service=git-receive-pack", True),
        (b"GET", REPO + b"/info/refs", b"?service=git-upload-pack", False),
        (b"GET", REPO + b"/git-receive-pack", b"", False),
        (b"POST", REPO + b"/git-upload-pack", b"", False),
        (b"GET", REPO + b"/info/refs", b"?x=service=git-receive-pack", False),
        # parameter order and separators
        (b"GET", REPO + b"/info/refs", b"?service=git-receive-pack&a=1", True),
        (b"GET", REPO + b"/info/refs", b"?a=1;service=git-receive-pack", True),
        (b"GET", REPO + b"/info/refs", b"?&&service=git-receive-pack&", True),
        (b"GET", REPO + b"/info/refs", b"?service=git-upload-pack&service=git-receive-pack", True),
        # percent-encoded variants
        (b"GET", REPO + b"/info/refs", b"?service=git%2Dreceive%2Dpack", True),
        (b"GET", REPO + b"/info/refs", b"?service=git%2dreceive-pack", True),
        (b"GET", REPO + b"/info/refs", b"?%73ervice=git-receive-pack", True),
        # an encoded slash is not a separator (routes refuse it unless allow_encoded_slashes)
        (b"GET", REPO + b"/info%2Frefs", b"?service=git-receive-pack", False),
        (b"GET", REPO + b"/info/ref%73", b"?service=git-receive-pack", True),
        (b"POST", REPO + b"/git%2Dreceive-pack", b"", True),
        (b"POST", REPO + b"/git-receive-pac%6B", b"", True),
        (b"POST", REPO + b"%2Fgit-receive-pack", b"", False),
        # parameters and empty segments do not hide a push
        (b"POST", REPO + b"/git-receive-pack;x=1", b"", True),
        (b"POST", b"/x//repo.git///git-receive-pack", b"", True),
        # trailing slashes are ignored (routers often do the same)
        (b"POST", REPO + b"/git-receive-pack/", b"", True),
        (b"GET", REPO + b"/info/refs/", b"?service=git-receive-pack", True),
        # an encoded separator inside a value is not a separator
        (b"GET", REPO + b"/info/refs", b"?x=1%26service=git-receive-pack", False),
        (b"GET", REPO + b"/info/refs", b"?service%3Dgit-receive-pack", False),
        # values and names must match exactly
        (b"GET", REPO + b"/info/refs", b"?service=git-receive-pack2", False),
        (b"GET", REPO + b"/info/refs", b"?service=GIT-RECEIVE-PACK", False),
        (b"GET", REPO + b"/info/refs", b"?Service=git-receive-pack", False),
        (b"GET", REPO + b"/info/refs", b"?xservice=git-receive-pack", False),
        (b"GET", REPO + b"/info/refs", b"?service", False),
        (b"GET", REPO + b"/info/refs", b"?", False),
        (b"GET", REPO + b"/info/refs", b"", False),
        # only the info/refs advertisement carries the service parameter
        (b"GET", REPO + b"/other", b"?service=git-receive-pack", False),
        (b"GET", REPO + b"/info/refsx", b"?service=git-receive-pack", False),
        # the suffix is a whole segment and case-sensitive
        (b"POST", REPO + b"/xgit-receive-pack", b"", False),
        (b"POST", REPO + b"/GIT-RECEIVE-PACK", b"", False),
        (b"POST", REPO + b"/git-receive-pack/more", b"", False),
        (b"POST", b"/git-receive-pack", b"", True),
        # methods are case-sensitive and exact
        (b"post", REPO + b"/git-receive-pack", b"", False),
        (b"PUT", REPO + b"/git-receive-pack", b"", False),
        (b"get", REPO + b"/info/refs", b"?service=git-receive-pack", False),
        (b"HEAD", REPO + b"/info/refs", b"?service=git-receive-pack", False),
        (b"POST", REPO + b"/info/refs", b"?service=git-receive-pack", False),
        # fetches
        (b"POST", REPO + b"/git-upload-pack", b"?service=git-receive-pack", False),
        (b"GET", REPO + b"/info/refs", b"?service=git-upload-pack&x=git-receive-pack", False),
    ],
)
def test_is_git_push(method: bytes, path: bytes, query: bytes, expected: bool) -> None:
    assert is_git_push(method, _view(path), query) is expected


# =========================================================================== Policy


def _push(policy: Policy) -> Refusal | None:
    return policy.check(b"POST", _view(REPO + b"/git-receive-pack"), b"")


def test_empty_policy() -> None:
    policy = Policy()
    assert policy.is_empty
    assert policy.check(b"DELETE", _view(b"/admin/x"), b"") is None
    assert _push(policy) is None


@pytest.mark.parametrize(
    "kwargs",
    [{"methods": ["GET"]}, {"deny_paths": ["/admin"]}, {"deny_git_push": True}],
)
def test_not_empty(kwargs: dict[str, object]) -> None:
    assert not Policy(**kwargs).is_empty  # type: ignore[arg-type]


def test_explicit_defaults_are_empty() -> None:
    assert Policy(methods=None, deny_paths=[], deny_git_push=False).is_empty


def test_git_push_refused() -> None:
    refusal = _push(Policy(deny_git_push=True))
    assert refusal is not None
    assert (refusal.status, refusal.type, refusal.headers) == (403, "git_push_denied", ())
    assert "push" in refusal.message
    assert "trusted" in refusal.message
    get = Policy(deny_git_push=True).check(
        b"GET", _view(REPO + b"/info/refs"), b"?service=git-receive-pack"
    )
    assert get is not None and get.type == "git_push_denied"


def test_git_fetch_allowed() -> None:
    policy = Policy(deny_git_push=True)
    assert policy.check(b"POST", _view(REPO + b"/git-upload-pack"), b"") is None
    assert policy.check(b"GET", _view(REPO + b"/info/refs"), b"?service=git-upload-pack") is None


def test_git_push_not_refused_without_the_rule() -> None:
    assert _push(Policy(methods=["GET", "POST"])) is None


def test_method_refused_with_allow_header() -> None:
    policy = Policy(methods=["POST", "GET", "PUT"])
    refusal = policy.check(b"DELETE", _view(b"/x"), b"")
    assert refusal is not None
    assert (refusal.status, refusal.type) == (405, "method_not_allowed")
    # config order, HEAD implied right after GET
    assert refusal.headers == ((b"Allow", b"POST, GET, HEAD, PUT"),)
    assert "POST, GET, HEAD, PUT" in refusal.message
    assert "DELETE" not in refusal.message  # never quotes the request


@pytest.mark.parametrize("method", [b"GET", b"HEAD", b"POST"])
def test_method_allowed(method: bytes) -> None:
    assert Policy(methods=["GET", "POST"]).check(method, _view(b"/x"), b"") is None


def test_head_not_implied_without_get() -> None:
    refusal = Policy(methods=["POST"]).check(b"HEAD", _view(b"/x"), b"")
    assert refusal is not None
    assert refusal.status == 405
    assert refusal.headers == ((b"Allow", b"POST"),)


def test_head_listed_explicitly_keeps_config_order() -> None:
    policy = Policy(methods=["HEAD", "GET"])
    refusal = policy.check(b"POST", _view(b"/x"), b"")
    assert refusal is not None
    assert refusal.headers == ((b"Allow", b"HEAD, GET"),)
    assert Policy(methods=["HEAD"]).check(b"HEAD", _view(b"/"), b"") is None


@pytest.mark.parametrize("method", [b"get", b"Get", b"GET ", b""])
def test_methods_case_sensitive(method: bytes) -> None:
    refusal = Policy(methods=["GET"]).check(method, _view(b"/x"), b"")
    assert refusal is not None and refusal.status == 405


ADMIN = Policy(deny_paths=["/admin/*"])


@pytest.mark.parametrize(
    ("path", "denied"),
    [
        (b"/admin/x", True),
        (b"/admin/x/y", True),
        (b"/admin/", True),
        (b"/admin", False),
        (b"/administrator", False),
        (b"/x/admin/y", False),
        (b"/Admin/x", False),  # case-sensitive
        (b"/adm%69n/x", True),
        (b"/adm%69N/x", False),
        (b"/admin%2Fx", False),  # one segment; routes refuse it unless allow_encoded_slashes
        (b"/admin;v=1/x", True),
        (b"//admin/x", True),
        (b"/%61dmin/x", True),
        (b"/admin//x", True),
        (b"/adm%2569n/x", False),  # decoded once only
    ],
)
def test_deny_paths_glob(path: bytes, denied: bool) -> None:
    refusal = ADMIN.check(b"GET", _view(path), b"")
    if denied:
        assert refusal is not None
        assert (refusal.status, refusal.type, refusal.headers) == (403, "forbidden", ())
        assert refusal.message
        assert b"admin" not in refusal.message.encode()  # never quotes the request
    else:
        assert refusal is None


def test_deny_paths_ignore_query() -> None:
    policy = Policy(deny_paths=["/a", "/b/*"])
    assert policy.check(b"GET", _view(b"/x"), b"?p=/a") is None
    assert policy.check(b"GET", _view(b"/a"), b"?x=1") is not None
    assert policy.check(b"GET", _view(b"/b"), b"") is None


def test_deny_paths_collapses_empty_segments() -> None:
    policy = Policy(deny_paths=["/api/admin/*"])
    assert policy.check(b"GET", _view(b"/api//admin/x"), b"") is not None
    assert policy.check(b"GET", _view(b"/api///admin//x"), b"") is not None
    assert policy.check(b"GET", _view(b"/api/x/admin/x"), b"") is None


@pytest.mark.parametrize(
    ("pattern", "path", "denied"),
    [
        ("/exact", b"/exact", True),
        ("/exact", b"/exact/", True),  # a trailing slash does not get round a pattern
        ("/exact", b"/exact/x", False),
        ("/files/*.env", b"/files/a/b/.env", True),
        ("/files/*.env", b"/files/a.envx", False),
        ("/v?/admin", b"/v1/admin", True),
        ("/v?/admin", b"/v10/admin", False),
        ("/v[12]/x", b"/v2/x", True),
        ("/v[12]/x", b"/v3/x", False),
        ("/v[!12]/x", b"/v3/x", True),
        ("/*/internal", b"/a/b/internal", True),
        ("/caf\u00e9/*", "/caf\u00e9/x".encode(), True),
        ("/caf\u00e9/*", b"/caf%C3%A9/x", True),
        ("/a.b", b"/axb", False),  # '.' is literal
        ("/a(b)+", b"/a(b)+", True),
    ],
)
def test_deny_paths_patterns(pattern: str, path: bytes, denied: bool) -> None:
    refusal = Policy(deny_paths=[pattern]).check(b"GET", _view(path), b"")
    assert (refusal is not None) is denied


def test_deny_paths_agree_with_fnmatchcase() -> None:
    patterns = ["/admin/*", "/v?/x*y", "/[ab]*/z", "/exact"]
    policy = Policy(deny_paths=patterns)
    for path in ["/admin/q", "/v1/xqy", "/v1/x/q/y", "/b/c/z", "/exact", "/c/z", "/v1/x"]:
        expected = any(fnmatch.fnmatchcase(path, p) for p in patterns)
        assert (policy.check(b"GET", _view(path.encode()), b"") is not None) is expected, path


def test_check_order() -> None:
    policy = Policy(methods=["GET"], deny_paths=["/*"], deny_git_push=True)
    push = _push(policy)
    assert push is not None and push.type == "git_push_denied"  # before methods (POST) and paths
    method = policy.check(b"PUT", _view(b"/x"), b"")
    assert method is not None and method.type == "method_not_allowed"  # before paths
    path = policy.check(b"GET", _view(b"/x"), b"")
    assert path is not None and path.type == "forbidden"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"methods": []},
        {"methods": ["get"]},
        {"methods": ["GET", "GET"]},
        {"methods": "GET"},
        {"deny_paths": ["admin"]},
        {"deny_paths": "/admin"},
        {"deny_paths": ["/a%2Fb"]},
    ],
)
def test_invalid_settings_raise(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        Policy(**kwargs)  # type: ignore[arg-type]


# =========================================================================== validators


@pytest.mark.parametrize(
    "methods",
    [["GET"], ["GET", "POST", "PROPFIND"], ("M-SEARCH",), ["X_CUSTOM.1"], ["A!#$%&'*+-.^_`|~"]],
)
def test_validate_methods_ok(methods: Sequence[str]) -> None:
    assert validate_methods(methods) is None


@pytest.mark.parametrize(
    ("methods", "fragment"),
    [
        ([], "non-empty"),
        ("GET", "non-empty"),
        (["get"], "upper-case"),
        (["Get"], "upper-case"),
        ([""], "token"),
        (["GET POST"], "token"),
        (["GET,POST"], "token"),
        (["G\u00c9T"], "token"),
        (["(GET)"], "token"),
        (["GET", 1], "token"),
        (["GET", "POST", "GET"], "duplicate"),
    ],
)
def test_validate_methods_problems(methods: Sequence[str], fragment: str) -> None:
    problem = validate_methods(methods)
    assert problem is not None and fragment in problem


@pytest.mark.parametrize("pattern", ["/", "/admin", "/admin/*", "/*.php", "/v[12]/x", "/a%"])
def test_validate_pattern_ok(pattern: str) -> None:
    assert validate_pattern(pattern) is None


@pytest.mark.parametrize(
    ("pattern", "fragment"),
    [("", "'/'"), ("admin/*", "'/'"), ("*/admin", "'/'"), ("/a%2fb", "decoded")],
)
def test_validate_pattern_problems(pattern: str, fragment: str) -> None:
    problem = validate_pattern(pattern)
    assert problem is not None and fragment in problem


@pytest.mark.parametrize("method", [b"TRACE", b"CONNECT"])
def test_trace_and_connect_refused_unless_listed(method: bytes) -> None:
    refusal = Policy().check(method, "/x", b"")
    assert refusal is not None and refusal.status == 405
    assert dict(refusal.headers)[b"Allow"]
    assert Policy(deny_paths=["/nothing"]).check(method, "/x", b"") is not None
    assert Policy(methods=["GET"]).check(method, "/x", b"") is not None
    assert Policy(methods=["GET", method.decode()]).check(method, "/x", b"") is None
    assert Policy().check(b"GET", "/x", b"") is None
