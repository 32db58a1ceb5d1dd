"""The slow-head watcher (``proxycore/proxy/slow_heads.py``) on trio's mock clock."""

from __future__ import annotations

import trio
import trio.testing

from proxycore.proxy.slow_heads import FAST_WAIT_S, slow_heads


class Call:
    def __init__(self, fail: bool = False) -> None:
        self.watched: list[float] = []
        self.fail = fail

    def watch_downstream(self) -> None:
        self.watched.append(trio.current_time())
        if self.fail:
            raise RuntimeError("boom")


async def test_only_calls_still_waiting_after_the_fast_wait_are_watched(
    autojump_clock: trio.testing.MockClock,
) -> None:
    slow = slow_heads()
    assert slow is slow_heads()  # one per run
    quick, waiting, broken = Call(), Call(), Call(fail=True)
    start = trio.current_time()
    slow.add(quick)
    slow.add(waiting)
    slow.add(broken)
    await trio.sleep(FAST_WAIT_S / 2)
    slow.discard(quick)  # its head came in time
    await trio.sleep(FAST_WAIT_S)
    assert quick.watched == []
    assert [t - start for t in waiting.watched] == [FAST_WAIT_S]
    assert len(broken.watched) == 1  # its failure is logged, the watcher goes on
    assert len(slow) == 0
    later = Call()
    slow.add(later)  # the watcher stopped when nothing waited: it starts again
    await trio.sleep(2 * FAST_WAIT_S)
    assert len(later.watched) == 1
