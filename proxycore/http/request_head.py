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
    """
    if not trusted or not _trusted(peer, trusted):
        return ClientAddress(peer, peer.encode("ascii", "replace"))
    hops: list[bytes] = []
    for name, value in headers:
        if name.lower().replace(b"_", b"-") == b"x-forwarded-for":
            hops.extend(h.strip() for h in value.split(b","))
    client = peer
    for hop in reversed(hops):
        text = hop.decode("ascii", "replace")
        try:
            ipaddress.ip_address(text)
        except ValueError:
            break  # garbage in the chain: stop at the last hop we could read
        client = text
        if not _trusted(text, trusted):
            break
    chain = [h for h in hops if h]
    chain.append(peer.encode("ascii", "replace"))
    return ClientAddress(client, b", ".join(chain))


def _trusted(ip: str, trusted: Sequence[IPNetwork]) -> bool:
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return any(address in network for network in trusted)
