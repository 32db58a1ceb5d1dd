"""Retries on another upstream in the shared core, over scripted upstreams (no socket).

:class:`~proxycore.proxy.upstream.UpstreamCall` runs with the native front end's two
ends on a scripted client and a group of scripted upstreams (one script queue per
upstream host). Pinned down: which failures move to another upstream, that a byte sent
to the client ends all retrying, that a body not in hand is never replayed, the per-try
timeout, the access log's list of attempts, and the outcome accounting (ejection,
``Retry-After``, active streams).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from typing import Final

import pytest
import trio

from proxycore import Config, Route
from proxycore.config import Outlier, RetryPolicy, Timeouts, Upstream, UpstreamSpec
from proxycore.errors import UpstreamConnectError, UpstreamReset, UpstreamTimeout
from proxycore.http.headers import Headers, request_framing
from proxycore.net.pool import Origin, UpstreamConnection
from proxycore.proxy.attempts import Attempts
from proxycore.proxy.ledger import Ledger
from proxycore.proxy.relay import RawRequestBody, RawResponseSink
from proxycore.proxy.state import ProxyState
from proxycore.proxy.upstream import UpstreamCall
from proxycore.upstreams.group import Member, UpstreamGroup
from tests.inmem.scripted import EOF, Pause, ScriptedStream, ScriptItem
from tests.inmem.test_upstream_core import Client

OK: Final = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
UNAVAILABLE: Final = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\n\r\nbusy"
POST_HEAD: Final = b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n\r\n"


class Refused:
    """A script entry: ``connect`` to this upstream fails (connection refused)."""


REFUSED: Final = Refused()


class Groups:
    """One exchange's native front end over ``UpstreamCall`` and a group of upstreams."""

    def __init__(
        self,
        names: Sequence[str] = ("a", "b", "c"),
        *,
        retry: RetryPolicy | None = None,
        method: bytes = b"GET",
        headers: Headers | None = None,
        data: bytes = b"",
        outlier: Outlier | None = None,
    ) -> None:
        specs = [UpstreamSpec(n, Upstream("http", n, 80, "/")) for n in names]
        self.group = UpstreamGroup(
            "/",
            specs,
            balance="round_robin",
            retry=retry or RetryPolicy(attempts=3, on=("503", "reset", "timeout")),
            outlier=outlier or Outlier(),
            rng=random.Random(1),
        )
        self.method = method
        self.state = ProxyState(Config(routes=(Route(prefix="/", upstream="http://a/"),)))
        self.ledger = Ledger(self.state, method.decode(), "127.0.0.1", "r1", logging.getLogger("t"))
        self.client = Client(())
        self.framing = request_framing(headers or [], b"1.1")
        self.body = RawRequestBody(self.client, self.ledger.record, data, self.framing)
        self.sink = RawResponseSink(self.client, self.ledger, method, True)
        #: What each upstream (by host) answers on its next connection.
        self.scripts: dict[str, list[Sequence[ScriptItem] | Refused]] = {n: [] for n in names}
        #: The hosts connected to, in order, and what each connection was sent.
        self.connected: list[str] = []
        self.sent: list[bytes] = []
        self.streams: list[ScriptedStream] = []

    async def connect(self, origin: Origin) -> UpstreamConnection:
        script = self.scripts[origin.host].pop(0)
        self.connected.append(origin.host)
        if isinstance(script, Refused):
            raise ConnectionRefusedError(111, "Connection refused")
        stream = ScriptedStream(script)
        self.streams.append(stream)
        return UpstreamConnection(origin, stream)

    async def forward(self, head: bytes = b"GET / HTTP/1.1\r\nHost: h\r\n\r\n") -> None:
        call = UpstreamCall(
            self.ledger,
            self.state.pool,
            self.body,
            self.sink,
            method=self.method,
            timeouts=Timeouts(connect=1, response=30, idle=30),
            server=self.state.snapshot.config.server,
            connect=self.connect,
        )
        attempts = Attempts(self.group, self.ledger.record, method=self.method)
        attempts.set_body(len(self.body.start) if self.body.done else None)

        def head_for(member: Member) -> tuple[Origin, bytes]:
            return member.origin, head + self.body.start

        with trio.fail_after(60):
            await call.forward(attempts, head_for, retry=False)

    @property
    def written(self) -> bytes:
        return self.client.stream.written

    def member(self, name: str) -> Member:
        member = self.group.by_name(name)
        assert member is not None
        return member


async def test_connect_error_moves_to_the_next_upstream() -> None:
    x = Groups()
    x.scripts["a"].append(REFUSED)
    x.scripts["b"].append([OK])
    await x.forward()
    assert x.connected == ["a", "b"]
    assert x.written.endswith(b"\r\n\r\nok")
    assert x.ledger.record.attempts == [("a", "connect_error"), ("b", "200")]
    assert x.member("a").failures == 1 and x.member("b").retries == 1


async def test_listed_status_is_retried_and_the_response_discarded() -> None:
    x = Groups()
    x.scripts["a"].append([UNAVAILABLE])
    x.scripts["b"].append([OK])
    await x.forward()
    assert x.connected == ["a", "b"]
    assert b"busy" not in x.written and x.written.startswith(b"HTTP/1.1 200")
    assert x.streams[0].closed  # never pooled: its body was not read
    assert x.ledger.record.attempts == [("a", "503"), ("b", "200")]


async def test_last_try_relays_the_upstream_response_as_is() -> None:
    x = Groups(("a", "b"), retry=RetryPolicy(attempts=2, on=("503",)))
    x.scripts["a"].append([UNAVAILABLE])
    x.scripts["b"].append([UNAVAILABLE])
    await x.forward()
    assert x.connected == ["a", "b"]
    assert x.written.startswith(b"HTTP/1.1 503") and x.written.endswith(b"busy")
    assert x.ledger.record.attempts == [("a", "503"), ("b", "503")]


async def test_status_not_listed_is_not_retried() -> None:
    x = Groups(retry=RetryPolicy(attempts=3, on=("503",)))
    x.scripts["a"].append([b"HTTP/1.1 500 Oops\r\nContent-Length: 0\r\n\r\n"])
    await x.forward()
    assert x.connected == ["a"] and x.written.startswith(b"HTTP/1.1 500")
    assert x.ledger.record.attempts is None  # one try: the access line's upstream says it


async def test_a_post_body_in_hand_is_replayed_but_one_still_coming_is_not() -> None:
    body = b"0123456789"
    x = Groups(method=b"POST", headers=[(b"Content-Length", b"10")], data=body)
    x.scripts["a"].append([UNAVAILABLE])
    x.scripts["b"].append([OK])
    await x.forward(POST_HEAD % 10)
    assert x.connected == ["a", "b"]
    assert x.streams[1].written == POST_HEAD % 10 + body

    y = Groups(method=b"POST", headers=[(b"Content-Length", b"10")], data=body[:4])
    y.client.stream.feed(body[4:])
    y.scripts["a"].append([UNAVAILABLE])
    await y.forward(POST_HEAD % 10)
    assert y.connected == ["a"] and y.written.startswith(b"HTTP/1.1 503")


async def test_no_retry_once_the_head_reached_the_client() -> None:
    x = Groups()
    x.scripts["a"].append(
        [b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhal", UpstreamReset("reset")]
    )
    x.scripts["b"].append([OK])
    with pytest.raises(UpstreamReset):
        await x.forward()
    assert x.connected == ["a"]


async def test_reset_before_the_head_is_retried_for_idempotent_requests_only() -> None:
    x = Groups()
    x.scripts["a"].append([EOF])
    x.scripts["b"].append([OK])
    await x.forward()
    assert x.connected == ["a", "b"]

    body = b"{}"
    y = Groups(method=b"POST", headers=[(b"Content-Length", b"2")], data=body)
    y.scripts["a"].append([EOF])
    with pytest.raises(UpstreamReset):
        await y.forward(POST_HEAD % 2)
    assert y.connected == ["a"]  # it may have been acted on


async def test_per_try_timeout_moves_on(autojump_clock: trio.testing.MockClock) -> None:
    x = Groups(retry=RetryPolicy(attempts=2, on=("timeout",), per_try_timeout=2))
    x.scripts["a"].append([Pause(60), OK])
    x.scripts["b"].append([OK])
    start = trio.current_time()
    await x.forward()
    assert x.connected == ["a", "b"] and x.written.endswith(b"ok")
    assert 2 <= trio.current_time() - start < 30
    assert x.ledger.record.attempts == [("a", "timeout"), ("b", "200")]


async def test_per_try_timeout_without_retry_is_a_504(
    autojump_clock: trio.testing.MockClock,
) -> None:
    x = Groups(("a",), retry=RetryPolicy(attempts=1, per_try_timeout=2))
    x.scripts["a"].append([Pause(60), OK])
    with pytest.raises(UpstreamTimeout, match="within 2 s"):
        await x.forward()


async def test_never_the_same_upstream_twice_and_attempts_bound_the_tries() -> None:
    x = Groups(retry=RetryPolicy(attempts=5, on=("503",)))
    for name in "abc":
        x.scripts[name].append([UNAVAILABLE])
    await x.forward()
    assert sorted(x.connected) == ["a", "b", "c"]  # 5 allowed, 3 upstreams


async def test_every_upstream_refusing_is_a_502_naming_no_address() -> None:
    x = Groups(("a", "b"))
    x.scripts["a"].append(REFUSED)
    x.scripts["b"].append(REFUSED)
    with pytest.raises(UpstreamConnectError) as info:
        await x.forward()
    assert "a:80" not in info.value.message and "refused" in info.value.message
    assert x.ledger.record.attempts == [("a", "connect_error"), ("b", "connect_error")]


async def test_retry_after_marks_the_upstream_busy_and_active_counts_return_to_zero() -> None:
    x = Groups(retry=RetryPolicy(attempts=2, on=("429",)))
    x.scripts["a"].append(
        [b"HTTP/1.1 429 Too Many\r\nRetry-After: 30\r\nContent-Length: 0\r\n\r\n"]
    )
    x.scripts["b"].append([OK])
    await x.forward()
    a = x.member("a")
    assert a.busy_until > trio.current_time() + 29
    assert all(m.active == 0 for m in x.group.members)


async def test_consecutive_failures_eject() -> None:
    x = Groups(("a", "b"), outlier=Outlier(consecutive_failures=2))
    close = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
    for _ in range(2):
        x.scripts["a"].append(REFUSED)
        x.scripts["b"].append([close])
    await x.forward()
    assert not x.member("a").ejected(trio.current_time())
    x.group.members[1].current = -100  # round robin's next pick is "a" again
    await x.forward()
    assert x.connected == ["a", "b", "a", "b"]
    assert x.member("a").ejected(trio.current_time()) and x.member("a").ejections == 1
