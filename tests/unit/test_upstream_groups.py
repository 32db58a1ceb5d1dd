"""Upstream groups without I/O: the balancers, a group's choice and outcomes, the retry
budget, session-id wrapping, ``Retry-After`` and the ``hash_on`` key, and the config."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest

from proxycore.config import (
    Config,
    ConfigError,
    Outlier,
    RetryPolicy,
    Route,
    Upstream,
    UpstreamEntry,
    UpstreamSpec,
)
from proxycore.errors import BadRequest, SessionNotFound
from proxycore.proxy.attempts import Affinity, hash_key, retry_after_seconds
from proxycore.upstreams.affinity import SessionIds, load_key
from proxycore.upstreams.balance import HashRing, least_connections, random_two, smooth_wrr
from proxycore.upstreams.group import MIN_RETRIES, Member, RetryBudget, UpstreamGroup


def spec(name: str, weight: int = 1, backup: bool = False) -> UpstreamSpec:
    return UpstreamSpec(name, Upstream("http", name, 80, "/"), weight=weight, backup=backup)


def group(*specs: UpstreamSpec, balance: str = "round_robin", **kw: object) -> UpstreamGroup:
    retry = kw.pop("retry", RetryPolicy())
    outlier = kw.pop("outlier", Outlier())
    assert isinstance(retry, RetryPolicy) and isinstance(outlier, Outlier)
    return UpstreamGroup(
        "/v1/", specs, balance=balance, retry=retry, outlier=outlier, rng=random.Random(7)
    )


# -- balancers ---------------------------------------------------------------


def test_smooth_weighted_round_robin_is_nginx_sequence() -> None:
    members = [Member(spec("a", 5)), Member(spec("b")), Member(spec("c"))]
    picks = "".join(smooth_wrr(members).spec.name for _ in range(7))  # type: ignore[attr-defined]
    assert picks == "aabacaa"  # nginx's documented order for weights 5, 1, 1


def test_least_connections_prefers_fewest_per_weight_then_spreads_ties() -> None:
    a, b = Member(spec("a", 2)), Member(spec("b"))
    a.active, b.active = 3, 1  # 1.5 per weight vs 1
    assert least_connections([a, b]) is b
    a.active = b.active = 0
    picks = Counter(least_connections([a, b]) for _ in range(300))
    assert picks[a] == 200 and picks[b] == 100  # ties follow the weights exactly


def test_random_two_picks_the_less_loaded_of_two_draws() -> None:
    a, b, c = Member(spec("a")), Member(spec("b")), Member(spec("c"))
    c.active = 100
    rng = random.Random(1)
    picks = Counter(random_two([a, b, c], rng) for _ in range(3000))
    assert picks[c] == 0  # always paired with a less loaded one
    assert abs(picks[a] - picks[b]) < 300  # 1500 each expected; +/- 10 %


def test_hash_ring_moves_only_the_new_members_share() -> None:
    keys = [f"session-{i}".encode() for i in range(4000)]
    three = HashRing([("a", 1), ("b", 1), ("c", 1)])
    four = HashRing([("a", 1), ("b", 1), ("c", 1), ("d", 1)])
    names = "abcd"
    before = [names[three.lookup(k, [True] * 3) or 0] for k in keys]
    after = [names[four.lookup(k, [True] * 4) or 0] for k in keys]
    moved = [(x, y) for x, y in zip(before, after, strict=True) if x != y]
    assert all(y == "d" for _, y in moved)  # only to the new member
    assert 1 - len(moved) / len(keys) >= 0.73  # ideal 0.75; 160 points each


def test_hash_ring_skips_unavailable_members_and_honours_weights() -> None:
    ring = HashRing([("a", 3), ("b", 1)])
    keys = [str(i).encode() for i in range(4000)]
    share = Counter(ring.lookup(k, [True, True]) for k in keys)
    assert 0.70 < share[0] / len(keys) < 0.80  # 3:1
    assert {ring.lookup(k, [False, True]) for k in keys} == {1}
    assert ring.lookup(b"x", [False, False]) is None


# -- the group -----------------------------------------------------------------


def test_pick_prefers_available_primaries_then_backups_then_anything_untried() -> None:
    g = group(spec("a"), spec("b"), spec("z", backup=True))
    a, b, z = g.members
    assert {g.pick(0.0) for _ in range(10)} == {a, b}
    a.healthy = False
    b.ejected_until = 100.0
    assert g.pick(0.0) is z  # primaries out: the backup
    assert g.pick(0.0, tried=[z]) in (a, b)  # all out or tried: panic, anything untried
    assert g.pick(0.0, tried=[a, b, z]) is None
    assert g.pick(200.0, tried=[z]) is b  # the ejection is over


def test_busy_member_is_skipped_until_retry_after_passes() -> None:
    g = group(spec("a"), spec("b"))
    a, b = g.members
    g.busy(a, 10.0, 5)
    assert {g.pick(11.0) for _ in range(5)} == {b}
    assert a in {g.pick(15.5) for _ in range(5)}


def test_consecutive_failures_eject_with_growing_time_and_a_cap_on_the_share() -> None:
    outlier = Outlier(consecutive_failures=2, base_eject_seconds=10, max_ejected_percent=50)
    g = group(spec("a"), spec("b"), spec("c"), spec("d"), outlier=outlier)
    a, b, c, _ = g.members
    assert not g.failed(a, 0.0) and g.failed(a, 0.0)
    assert a.ejected_until == 10.0 and a.ejections == 1
    g.failed(b, 0.0)
    assert g.failed(b, 0.0)  # 2 of 4 = 50 %
    g.failed(c, 0.0)
    assert not g.failed(c, 0.0) and not c.ejected(0.0)  # a third would pass 50 %
    g.failed(a, 20.0)
    assert g.failed(a, 20.0) and a.ejected_until == 40.0  # second time: 2 x 10 s
    g.succeeded(b, 1.0)
    assert b.consecutive == 0


def test_a_success_between_failures_resets_the_count() -> None:
    g = group(spec("a"), spec("b"), outlier=Outlier(consecutive_failures=3))
    a = g.members[0]
    for _ in range(10):
        g.failed(a, 0.0)
        g.failed(a, 0.0)
        g.succeeded(a, 0.0)
    assert a.ejections == 0 and a.failures == 20


def test_retry_budget_caps_retries_to_a_share_of_recent_requests() -> None:
    budget = RetryBudget(20)
    for _ in range(100):
        budget.request(5.0)
    allowed = sum(budget.allow(5.0) for _ in range(50))
    assert allowed == 20
    fresh = RetryBudget(20)
    fresh.request(0.0)
    assert sum(fresh.allow(0.0) for _ in range(10)) == MIN_RETRIES
    assert fresh.allow(30.0)  # the window moved on


def test_reload_keeps_the_state_of_unchanged_members() -> None:
    old = group(spec("a"), spec("b"))
    old.members[0].active = 4
    new = UpstreamGroup("/v1/", [spec("a"), spec("c")], retry=RetryPolicy(), previous=old)
    assert new.members[0] is old.members[0] and new.members[0].active == 4
    assert new.members[1].active == 0 and new.budget is old.budget


def test_health_thresholds() -> None:
    m = Member(spec("a"))
    assert not m.record_check(False, 2, 3) and not m.record_check(False, 2, 3)
    assert m.record_check(False, 2, 3) and not m.healthy
    assert not m.record_check(True, 2, 3) and m.record_check(True, 2, 3) and m.healthy


# -- session ids -----------------------------------------------------------------


def test_session_ids_round_trip_and_refuse_forgeries() -> None:
    ids = SessionIds(b"k" * 32)
    tag = ids.tag("10.0.0.1:8000")
    wrapped = ids.wrap(tag, b"abc-123")
    assert b"10.0.0.1" not in wrapped and b"abc-123" not in wrapped
    assert all(0x21 <= c <= 0x7E for c in wrapped)  # visible ASCII, as MCP requires
    assert ids.unwrap(wrapped) == (tag, b"abc-123")
    assert SessionIds(b"k" * 32).unwrap(wrapped) == (tag, b"abc-123")  # same key elsewhere
    assert SessionIds(b"j" * 32).unwrap(wrapped) is None  # another key
    body, mac = wrapped[4:].split(b".")
    tampered = b"pc1." + body[:-2] + (b"AA" if body[-2:] != b"AA" else b"BB") + b"." + mac
    assert ids.unwrap(tampered) is None
    for junk in (b"abc", b"pc1.", b"pc1.!!.??", b"pc1.YWJj.", "pc1.é".encode()):
        assert ids.unwrap(junk) is None
    with pytest.raises(ValueError):
        SessionIds(b"short")


def test_load_key(tmp_path: Path) -> None:
    path = tmp_path / "key"
    path.write_bytes(b"  " + b"x" * 20 + b"\n")
    assert load_key(str(path)) == b"x" * 20
    path.write_bytes(b"short\n")
    with pytest.raises(ValueError, match="at least 16"):
        load_key(str(path))


# -- Retry-After and hash keys -------------------------------------------------------


def test_retry_after_seconds() -> None:
    assert retry_after_seconds([(b"Retry-After", b" 7 ")]) == 7.0
    assert retry_after_seconds([]) is None
    assert retry_after_seconds([(b"retry-after", b"soon")]) is None
    assert retry_after_seconds([(b"Retry-After", b"Wed, 21 Oct 2015 07:28:00 GMT")]) == 0.0


def test_hash_key_sources() -> None:
    headers = [(b"X-User", b" u1 "), (b"Cookie", b"a=1; sid=s9; b=2")]
    assert hash_key("header:x-user", headers, "1.2.3.4", "") == b"u1"
    assert hash_key("cookie:sid", headers, "1.2.3.4", "") == b"s9"
    assert hash_key("cookie:nope", headers, "1.2.3.4", "") is None
    assert hash_key("client_ip", headers, "1.2.3.4", "") == b"1.2.3.4"
    assert hash_key("identity", headers, "1.2.3.4", "alice") == b"alice"
    assert hash_key("identity", headers, "1.2.3.4", "") is None


# -- config ------------------------------------------------------------------------


def test_group_config_resolves_each_upstream(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    config = Config.from_mapping(
        {
            "routes": [
                {
                    "prefix": "/v1/",
                    "inject": {"header": "Authorization", "scheme": "Bearer", "token_env": "A"},
                    "upstreams": [
                        {"url": "http://10.0.0.1:8000/", "weight": 2},
                        {
                            "url": "https://backup.test/v1/",
                            "backup": True,
                            "ca_file": "ca.pem",
                            "inject": {"header": "x-api-key", "token_env": "B"},
                            "name": "backup",
                        },
                    ],
                    "balance": "round_robin",
                    "retry": {"attempts": 3, "on": ["503", 429, "reset"]},
                }
            ]
        },
        source=str(tmp_path / "c.toml"),
    )
    route = config.routes[0]
    first, second = route.group
    assert (first.name, first.weight, first.inject and first.inject.token_env) == (
        "10.0.0.1:8000",
        2,
        "A",
    )
    assert second.backup and second.ca_file == str(ca) and second.name == "backup"
    assert second.inject is not None and second.inject.header == "x-api-key"
    assert route.retry_policy.statuses == {503, 429}
    assert route.retry_policy.conditions == {"connect_error", "reset"}
    assert route.outlier_policy is not None  # on by default for a group
    assert Route("/x/", "http://a/").retry_policy.attempts == 1


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        ({}, "routes[0].upstream: exactly one of upstream or upstreams must be set"),
        (
            {"upstream": "http://a/", "upstreams": [{"url": "http://b/"}]},
            "routes[0].upstream: exactly one of upstream or upstreams must be set",
        ),
        ({"upstreams": []}, "routes[0].upstreams: expected a non-empty array of tables"),
        ({"upstreams": [{"url": "ftp://a/"}]}, "routes[0].upstreams[0].url: scheme must be"),
        ({"upstreams": [{"url": "http://a/", "weight": 0}]}, "routes[0].upstreams[0].weight"),
        ({"upstreams": [{"url": "http://a/", "wieght": 2}]}, "routes[0].upstreams[0].wieght"),
        (
            {"upstreams": [{"url": "http://a/"}, {"url": "http://a/"}]},
            "routes[0].upstreams: two upstreams are named 'a:80'",
        ),
        (
            {"upstreams": [{"url": "http://a/", "backup": True}]},
            "routes[0].upstreams: at least one upstream must not be a backup",
        ),
        (
            {"upstreams": [{"url": "http://a/", "ca_file": "x.pem"}]},
            "routes[0].upstreams[0].ca_file: cannot read",
        ),
        ({"upstream": "http://a/", "balance": "fastest"}, "routes[0].balance: must be one of"),
        ({"upstream": "http://a/", "balance": "hash"}, "routes[0].hash_on: required"),
        ({"upstream": "http://a/", "hash_on": "body"}, "routes[0].hash_on: must be client_ip"),
        ({"upstream": "http://a/", "retry": {"on": ["404"]}}, "routes[0].retry.on[0]: must be"),
        ({"upstream": "http://a/", "retry": {"attempts": 0}}, "routes[0].retry.attempts"),
        ({"upstream": "http://a/", "health_check": {"path": "x"}}, "routes[0].health_check.path"),
        ({"upstream": "http://a/", "outlier": {"max_ejected_percent": 150}}, "routes[0].outlier"),
        ({"upstream": "http://a/", "affinity": "sticky"}, "routes[0].affinity: must be"),
        (
            {"upstream": "http://a/", "affinity": "mcp_session"},
            "routes[0].affinity: 'mcp_session' needs server.session_key_file",
        ),
    ],
)
def test_group_config_errors_name_the_key(
    tmp_path: Path, table: dict[str, object], expected: str
) -> None:
    source = str(tmp_path / "proxycore.toml")
    with pytest.raises(ConfigError) as info:
        Config.from_mapping({"routes": [{"prefix": "/v1/", **table}]}, source=source)
    problems = info.value.problems
    assert any(p.startswith(f"{source}: {expected}") for p in problems), problems


def test_entry_values_are_never_echoed() -> None:
    with pytest.raises(ConfigError) as info:
        UpstreamEntry("http://user:sk-secret@a/")
    assert "sk-secret" not in str(info.value)
    with pytest.raises(ConfigError) as info:
        Route("/v1/", upstreams=(UpstreamEntry("http://user:sk-secret@a/"),))
    assert "sk-secret" not in str(info.value)


def test_affinity_pins_restores_the_id_and_refuses_forgeries_and_doubles() -> None:
    g = group(spec("a"), spec("b"))
    a, b = g.members
    affinity = Affinity(SessionIds(b"k" * 32), g, "/v1/")
    headers: list[tuple[bytes, bytes]] = [(b"Mcp-Session-Id", b"up-1")]
    affinity.wrap_response(b, headers)
    wrapped = headers[0][1]
    request = [(b"mcp_session_id", wrapped)]  # any spelling is the one field
    assert affinity.pinned(request, 0.0) is b and request == [(b"Mcp-Session-Id", b"up-1")]
    assert affinity.pinned([(b"accept", b"*/*")], 0.0) is None
    with pytest.raises(SessionNotFound):
        affinity.pinned([(b"Mcp-Session-Id", b"up-1")], 0.0)  # a raw upstream id
    with pytest.raises(BadRequest):
        affinity.pinned([(b"Mcp-Session-Id", wrapped), (b"Mcp_Session_Id", b"up-9")], 0.0)
    b.ejected_until = 10.0
    with pytest.raises(SessionNotFound):
        affinity.pinned([(b"Mcp-Session-Id", wrapped)], 0.0)  # its upstream is out
    b.ejected_until, b.busy_until = 0.0, 10.0
    assert affinity.pinned([(b"Mcp-Session-Id", wrapped)], 0.0) is b  # busy keeps sessions
    assert a.requests == 0
