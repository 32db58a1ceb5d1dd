"""proxycore.http.request_head: singleton fields, Host syntax, and the client address."""

from __future__ import annotations

import ipaddress

import pytest

from proxycore.errors import BadRequest
from proxycore.http.request_head import check_head, client_address, valid_host


@pytest.mark.parametrize(
    "host",
    [
        b"example.com",
        b"example.com:8080",
        b"127.0.0.1",
        b"10.0.0.1:1",
        b"[::1]",
        b"[::1]:443",
        b"a-b.c_d~e",
        b"localhost:65535",
    ],
)
def test_valid_hosts(host: bytes) -> None:
    assert valid_host(host)


@pytest.mark.parametrize(
    "host",
    [
        b"",
        b"a/b",
        b"user@evil",
        b"a b",
        b"a\x00b",
        b"a:",
        b"a:b",
        b"[::1",
        b"[nope]",
        b"[::1]x",
        b"[::1]:",
        b"a:123456",
        b"a%2fb",
        b"a\\b",
        b"a?b",
        b"a#b",
    ],
)
def test_invalid_hosts(host: bytes) -> None:
    assert not valid_host(host)


@pytest.mark.parametrize("name", [b"Host", b"Authorization", b"Proxy-Authorization"])
def test_singleton_fields_twice_are_refused(name: bytes) -> None:
    headers = [(name, b"a"), (b"X", b"y"), (name.lower(), b"a")]
    with pytest.raises(BadRequest, match="appears twice"):
        check_head(headers)


def test_check_head_returns_host_and_refuses_bad_host() -> None:
    assert check_head([(b"Host", b"h:1"), (b"Authorization", b"x")]) == b"h:1"
    assert check_head([]) == b""
    with pytest.raises(BadRequest, match="Host"):
        check_head([(b"Host", b"evil@h")])


NETS = [ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("192.0.2.7/32")]


def test_untrusted_peer_never_supplies_the_client_address() -> None:
    xff = [(b"X-Forwarded-For", b"6.6.6.6")]
    for trusted in ([], NETS):
        address = client_address("203.0.113.5", xff, trusted)
        assert (address.ip, address.forwarded_for) == ("203.0.113.5", b"203.0.113.5")


def test_trusted_peer_client_is_the_last_untrusted_hop() -> None:
    headers = [(b"X-Forwarded-For", b"6.6.6.6, 198.51.100.1"), (b"x-forwarded-for", b"10.1.1.1")]
    address = client_address("192.0.2.7", headers, NETS)
    assert address.ip == "198.51.100.1"  # 10.1.1.1 is a trusted hop; 6.6.6.6 is a claim
    # The client's own claims (left of the client) are not passed on.
    assert address.forwarded_for == b"198.51.100.1, 10.1.1.1, 192.0.2.7"


def test_trusted_chain_of_only_trusted_hops_and_garbage() -> None:
    assert client_address("10.0.0.1", [(b"X-Forwarded-For", b"10.0.0.2")], NETS).ip == "10.0.0.2"
    assert client_address("10.0.0.1", [], NETS).ip == "10.0.0.1"
    garbage = [(b"X-Forwarded-For", b"1.2.3.4, nonsense, 10.0.0.3")]
    assert client_address("10.0.0.1", garbage, NETS).ip == "10.0.0.3"


def test_only_the_exact_forwarded_for_name_is_read() -> None:
    """A Go proxy (Caddy, Traefik) in front passes X_Forwarded_For through after the real
    header: it must never be taken as the client."""
    headers = [(b"X-Forwarded-For", b"203.0.113.7"), (b"X_Forwarded_For", b"6.6.6.6")]
    assert client_address("10.0.0.1", headers, NETS).ip == "203.0.113.7"


@pytest.mark.parametrize(
    ("entry", "ip"),
    [
        (b"203.0.113.7:5555", "203.0.113.7"),
        (b"[2001:db8::1]:443", "2001:db8::1"),
        (b"[2001:db8::1]", "2001:db8::1"),
        (b"2001:db8::1", "2001:db8::1"),
    ],
)
def test_forwarded_for_entries_with_ports(entry: bytes, ip: str) -> None:
    assert client_address("10.0.0.1", [(b"X-Forwarded-For", entry)], NETS).ip == ip
