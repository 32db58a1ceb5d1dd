"""Active health checks: one task per upstream of every group with ``health_check``.

Each task waits a random part of ``interval`` first (so a hundred upstreams are not
checked in the same instant), then every ``interval`` +/- 10 % sends ``GET path`` on a
new connection (the pool's connect: the upstream's TLS settings, SNI, ``ca_file``) and
reads the response head within ``timeout``. A 2xx or 3xx is a success; anything else
(refused, reset, timed out, a malformed head, another status) a failure. The member's
thresholds decide when it goes down or up (:meth:`~proxycore.upstreams.group.Member.record_check`);
each change is one log line. Results show in ``/metrics`` and ``/readyz``.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from typing import Final

import h11
import trio

from ..config import HealthCheck
from ..errors import ProxyError
from ..http.response_head import ResponseHeadReader
from ..net.pool import Origin, UpstreamConnection, open_connection
from ..net.stream import CHUNK, StreamBroken
from ..upstreams.group import Member, UpstreamGroup

__all__ = ["USER_AGENT", "check_once", "run_health_checks"]

log: Final = logging.getLogger("proxycore.health")

USER_AGENT: Final = b"proxycore-health-check"
Connect = Callable[[Origin], Awaitable[UpstreamConnection]]


def _request(member: Member, path: str) -> bytes:
    host = member.spec.target.host_header.encode("ascii")
    return b"GET %s HTTP/1.1\r\nHost: %s\r\nUser-Agent: %s\r\nConnection: close\r\n\r\n" % (
        path.encode("ascii", "replace"),
        host,
        USER_AGENT,
    )


async def check_once(member: Member, settings: HealthCheck, connect: Connect) -> bool:
    """One check of ``member``: True for a 2xx/3xx response head within ``timeout``."""
    with trio.move_on_after(settings.timeout):
        try:
            conn = await connect(member.origin)
        except (OSError, StreamBroken):
            return False
        try:
            await conn.stream.send_all(_request(member, settings.path))
            reader = ResponseHeadReader(b"GET", 64 * 1024, 100)
            buf = bytearray(CHUNK)
            while True:
                event = reader.next_event()
                if event is None:
                    n = await conn.stream.recv_into(buf, CHUNK)
                    if not n:
                        return False
                    reader.feed(bytes(buf[:n]))
                elif not isinstance(event, h11.InformationalResponse):
                    return 200 <= event.status_code < 400
        except (OSError, StreamBroken, ProxyError):
            return False
        finally:
            conn.close()
    return False


async def _check_loop(
    group: UpstreamGroup,
    member: Member,
    settings: HealthCheck,
    connect: Connect,
    rng: random.Random,
) -> None:
    await trio.sleep(rng.uniform(0, settings.interval))
    while True:
        ok = await check_once(member, settings, connect)
        if member.record_check(ok, settings.healthy_threshold, settings.unhealthy_threshold):
            if member.healthy:
                log.warning(
                    "upstream %s of route %r is up (%d checks passed)",
                    member.name,
                    group.route,
                    member.up_run,
                )
            else:
                log.warning(
                    "upstream %s of route %r is down (%d checks failed)",
                    member.name,
                    group.route,
                    member.down_run,
                )
        await trio.sleep(settings.interval * rng.uniform(0.9, 1.1))


async def run_health_checks(
    groups: Sequence[tuple[UpstreamGroup, HealthCheck]],
    *,
    connect: Connect = open_connection,
    rng: random.Random | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Check every member of ``groups`` until cancelled (a reload cancels and restarts
    it; members carried over keep their state)."""
    rng = rng or random.Random()
    async with trio.open_nursery() as nursery:
        for group, settings in groups:
            for member in group.members:
                nursery.start_soon(_check_loop, group, member, settings, connect, rng)
        task_status.started()
