"""Review of upstream groups (issue 14): MCP session ids against replay across routes, and
``Retry-After`` values a hostile upstream may send.

Pure: no sockets. Two routes of one config share the session key
(``[server] session_key_file``); a member's tag is an HMAC of its *name* only, and the
default name is ``host:port``, so two routes with upstreams on one host and port (another
base path each: a careless but ordinary config) mint ids each other accepts.
"""

from __future__ import annotations

from typing import Final

import pytest

from proxycore.config import RetryPolicy, UpstreamSpec
from proxycore.config.checks import parse_upstream
from proxycore.errors import SessionNotFound
from proxycore.http.headers import Headers
from proxycore.proxy.attempts import SESSION_HEADER, Affinity, retry_after_seconds
from proxycore.upstreams.affinity import SessionIds
from proxycore.upstreams.group import UpstreamGroup

KEY: Final = b"k" * 32


def group(route: str, *urls: str) -> UpstreamGroup:
    specs = []
    for url in urls:
        target = parse_upstream(url)
        specs.append(UpstreamSpec(f"{target.host}:{target.port}", target))
    return UpstreamGroup(route, specs, retry=RetryPolicy())


def minted(affinity: Affinity, member_index: int, group_: UpstreamGroup, raw: bytes) -> bytes:
    """The id the client sees for ``raw`` minted by the group's member ``member_index``."""
    headers: Headers = [(SESSION_HEADER, raw)]
    affinity.wrap_response(group_.members[member_index], headers)
    return headers[0][1]


def test_an_id_is_pinned_back_to_its_minting_member_on_its_own_route() -> None:
    ids = SessionIds(KEY)
    tenant = group("/a/", "http://10.0.0.1:8000/a/", "http://10.0.0.2:8000/a/")
    affinity = Affinity(ids, tenant, tenant.route)
    wrapped = minted(affinity, 1, tenant, b"sess-1")
    headers: Headers = [(b"Mcp-Session-Id", wrapped)]
    assert affinity.pinned(headers, 0.0) is tenant.members[1]
    assert headers == [(b"Mcp-Session-Id", b"sess-1")]  # the upstream's own id goes up
    assert b"10.0.0" not in wrapped  # the id shows no internal address


def test_a_tampered_id_is_a_404_not_a_steer() -> None:
    ids = SessionIds(KEY)
    tenant = group("/a/", "http://10.0.0.1:8000/a/", "http://10.0.0.2:8000/a/")
    affinity = Affinity(ids, tenant, tenant.route)
    wrapped = minted(affinity, 0, tenant, b"sess-1")
    body, _, mac = wrapped.partition(b".")[2].partition(b".")
    forged = b"pc1." + body[:-2] + (b"AA" if body[-2:] != b"AA" else b"BB") + b"." + mac
    with pytest.raises(SessionNotFound):
        affinity.pinned([(SESSION_HEADER, forged)], 0.0)


def test_an_id_minted_on_one_route_is_refused_on_another() -> None:
    ids = SessionIds(KEY)  # one key per config: every route shares it
    tenant_a = group("/a/", "http://10.0.0.1:8000/tenant-a/", "http://10.0.0.2:8000/tenant-a/")
    tenant_b = group("/b/", "http://10.0.0.1:8000/tenant-b/", "http://10.0.0.3:8000/tenant-b/")
    wrapped = minted(Affinity(ids, tenant_a, tenant_a.route), 0, tenant_a, b"tenant-a-session")
    with pytest.raises(SessionNotFound):
        Affinity(ids, tenant_b, tenant_b.route).pinned([(SESSION_HEADER, wrapped)], 0.0)


@pytest.mark.parametrize(
    "value",
    [b"120", b"Wed, 21 Oct 2015 07:28:00 GMT", b"soon", b"", b"9" * 400, b"\xff"],
)
def test_retry_after_is_a_number_of_seconds_or_none(value: bytes) -> None:
    seconds = retry_after_seconds([(b"Retry-After", value)])
    assert seconds is None or seconds >= 0


def test_retry_after_with_a_huge_year_is_ignored() -> None:
    assert retry_after_seconds([(b"Retry-After", b"Mon, 01 Jan 99999999999 00:00:00 GMT")]) is None
