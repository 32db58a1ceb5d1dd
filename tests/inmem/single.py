"""Tries on one scripted upstream, for tests that drive ``UpstreamCall`` directly."""

from __future__ import annotations

from proxycore.config import RetryPolicy, Upstream, UpstreamSpec
from proxycore.net.pool import Origin
from proxycore.observe.accesslog import ExchangeRecord
from proxycore.proxy.attempts import Attempts
from proxycore.proxy.upstream import HeadFor
from proxycore.upstreams.group import Member, UpstreamGroup

__all__ = ["one_upstream"]


def one_upstream(origin: Origin, head: bytes, record: ExchangeRecord) -> tuple[Attempts, HeadFor]:
    """``(attempts, head_for)`` that send ``head`` to ``origin`` once."""
    scheme, host, port, ca_file = origin
    spec = UpstreamSpec(f"{host}:{port}", Upstream(scheme, host, port, "/"), ca_file=ca_file)
    group = UpstreamGroup("/", [spec], retry=RetryPolicy(attempts=1))

    def head_for(member: Member) -> tuple[Origin, bytes]:
        return origin, head

    return Attempts(group, record, method=b"GET"), head_for
