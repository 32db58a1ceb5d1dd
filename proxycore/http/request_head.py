"""Checks on a request head that every route shares, and the client address. Pure module.

- :func:`check_head`: ``Host``, ``Authorization`` and ``Proxy-Authorization`` may appear
  at most once (a second copy is a 400, never "the first wins" or "any matches"), and
  ``Host`` must be a valid ``host[:port]`` (reg-name, IPv4 or IP-literal).
- :func:`client_address`: the client IP every decision uses. Only a peer inside
  ``[server] trusted_proxies`` may supply ``X-Forwarded-For``; the client is then the
  last hop, from the right, that is not itself a trusted proxy (nginx
  ``real_ip_recursive``, Envoy ``xff_num_trusted_hops``, Caddy ``trusted_proxies``).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from typing import Final

from ..errors import BadRequest
from ..http.headers import Headers

__all__ = ["SINGLETON_FIELDS", "ClientAddress", "check_head", "client_address", "valid_host"]

#: Fields whose second copy would let a client choose which one a component reads.
SINGLETON_FIELDS: Final = (b"host", b"authorization", b"proxy-authorization")

_REG_NAME: Final = re.compile(rb"[A-Za-z0-9\-._~!$&'()*+,;=]+")
_PORT: Final = re.compile(rb"[0-9]{1,5}")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def valid_host(value: bytes) -> bool:
    """Is ``value`` a valid ``Host`` field value (``host[:port]``, RFC 9110 section 7.2)?"""
    host, port = value, b""
    if value.startswith(b"["):
        end = value.find(b"]")
        if end < 0:
            return False
        literal, rest = value[1:end], value[end + 1 :]
        if rest:
            if not rest.startswith(b":"):
                return False
            port = rest[1:]
            if not _PORT.fullmatch(port):
                return False
        try:
            ipaddress.IPv6Address(literal.decode("ascii"))
        except (ValueError, UnicodeDecodeError):
            return False
        return True
    if b":" in value:
        host, _, port = value.rpartition(b":")
        if not _PORT.fullmatch(port):
            return False
    return bool(_REG_NAME.fullmatch(host))


def check_head(headers: Headers) -> bytes:
    """Refuse repeated singleton fields and an invalid ``Host``; return the ``Host`` value
    (``b""`` when absent, as HTTP/1.0 allows). Raises :class:`BadRequest`."""
    seen: dict[bytes, bytes] = {}
    for name, value in headers:
        lname = name.lower()
        if lname in SINGLETON_FIELDS:
            if lname in seen:
                raise BadRequest(f"the {name.decode('ascii', 'replace')} field appears twice")
            seen[lname] = value
    host = seen.get(b"host")
    if host is None:
        return b""
    if not valid_host(host):
        raise BadRequest("the Host field is not a valid host[:port]")
    return host


class ClientAddress:
    """Who the client is, and the ``X-Forwarded-For`` value to send upstream."""

    __slots__ = ("forwarded_for", "ip")

    def __init__(self, ip: str, forwarded_for: bytes) -> None:
        self.ip = ip
        self.forwarded_for = forwarded_for


def client_address(peer: str, headers: Headers, trusted: Sequence[IPNetwork]) -> ClientAddress:
    """The client IP and the forwarded chain for a request from ``peer``.

    With no trusted proxies (the default), or a peer outside them, every client
    ``X-Forwarded-For`` is ignored: the client is the peer and the chain is the peer.
    From a trusted peer only the exact name ``X-Forwarded-For`` is read (a Go proxy in
    front passes an attacker's ``X_Forwarded_For`` through, sorted after it); entries may
    carry a port (``ip:port``, ``[v6]:port``). The chain sent upstream starts at the
    client: the entries to its left are the client's own claims and are dropped.
    """
    if not trusted or not _trusted(peer, trusted):
        return ClientAddress(peer, peer.encode("ascii", "replace"))
    hops: list[str] = []
    for name, value in headers:
        if name.lower() == b"x-forwarded-for":
            hops.extend(h.strip().decode("ascii", "replace") for h in value.split(b","))
    client, start = peer, len(hops)
    for index in range(len(hops) - 1, -1, -1):
        ip = _hop_ip(hops[index])
        if ip is None:
            break  # garbage in the chain: stop at the last hop we could read
        client, start = ip, index
        if not _trusted(ip, trusted):
            break
    chain = [*hops[start:], peer]
    return ClientAddress(client, ", ".join(chain).encode("ascii", "replace"))


def _hop_ip(hop: str) -> str | None:
    """The address of one X-Forwarded-For entry (``ip``, ``ip:port``, ``[v6]``, ``[v6]:port``)."""
    if hop.startswith("["):
        hop = hop[1:].partition("]")[0]
    elif hop.count(":") == 1:
        hop = hop.partition(":")[0]
    try:
        return str(ipaddress.ip_address(hop))
    except ValueError:
        return None


def _trusted(ip: str, trusted: Sequence[IPNetwork]) -> bool:
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return any(address in network for network in trusted)
