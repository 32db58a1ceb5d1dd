"""``proxycore serve --workers 2``: real processes, SO_REUSEPORT, restarts, merged metrics.

One scenario, in order (each step builds on the process state the previous one left):

1. both workers serve: requests over many fresh connections are spread over two
   worker pids (the access log's ``pid`` field), neither of them the supervisor;
2. ``/metrics`` on the supervisor's admin listener sums the workers' counters;
3. a worker killed with SIGKILL is restarted: ``/readyz`` reports the gap and then
   200 again, requests keep succeeding, the new worker serves, and ``/metrics``
   counts the restart;
4. SIGTERM to the supervisor: it and every worker exit, code 0.

The upstream is a raw server in the test's own trio run. The supervisor runs in its
own process group, killed as a whole in a ``finally`` (no leftovers on failure).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
from pathlib import Path
from typing import Final

import trio
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.test_lifecycle import RawUpstream, reserved_port, spawn_proxycore, wait_for_log
from tests.helpers import http_request

STARTING: Final = re.compile(r"starting 2 workers on 127\.0\.0\.1:(\d+)")
WORKER_UP: Final = re.compile(r"worker (\d+) up \(pid (\d+)\)")


def free_port() -> int:
    """A port that was free a moment ago.

    The supervisor's admin listener needs a fixed port (it has no way to report a
    port-0 binding to the test other than the log, and the workers' private admin
    ports make that log ambiguous). Between closing this socket and the supervisor
    binding the port another process could take it: a small race, accepted; the test
    would then fail at startup, loudly, never pass wrongly.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def admin_get(port: int, target: str) -> tuple[int, bytes]:
    status, _, body = await http_request("127.0.0.1", port, "GET", target)
    return status, body


async def wait_ready(port: int) -> None:
    """Poll ``/readyz`` until 200 (bounded by the caller); refused until it listens."""
    while True:
        try:
            if (await admin_get(port, "/readyz"))[0] == 200:
                return
        except OSError:
            pass
        await trio.sleep(0.05)


async def scrape(port: int) -> dict[str, float]:
    """The supervisor's ``/metrics``, as ``{'name{label="v",...}': value}``."""
    status, body = await admin_get(port, "/metrics")
    assert status == 200
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(body.decode("utf-8")):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}"] = float(sample.value)
    return out


REQUESTS_2XX: Final = 'proxycore_requests_total{route="/",status_class="2xx"}'
WORKERS: Final = "proxycore_workers{}"
RESTARTS: Final = "proxycore_worker_restarts_total{}"


async def access_pids(log: Path, count: int) -> list[int]:
    """The ``pid`` of each access-log line, once ``count`` lines are there (polled).

    A worker writes the line just after the client has the response, so the log may
    lag the last request by a moment.
    """
    while True:
        text = await trio.Path(log).read_text(encoding="utf-8", errors="replace")
        pids = [json.loads(line)["pid"] for line in text.splitlines() if line.startswith("{")]
        if len(pids) >= count:
            assert len(pids) == count, f"{len(pids)} access-log lines for {count} requests"
            return pids
        await trio.sleep(0.05)


def worker_pids(log: Path) -> list[int]:
    """Worker pids in start order, from the supervisor's "worker N up (pid P)" lines."""
    return [int(m[2]) for m in WORKER_UP.finditer(log.read_text(encoding="utf-8"))]


def is_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


async def test_two_workers_share_load_restart_merge_metrics_and_stop(tmp_path: Path) -> None:
    config, log = tmp_path / "proxy.toml", tmp_path / "err.log"
    upstream = RawUpstream(b"hello")
    admin = free_port()
    with trio.fail_after(40):
        async with trio.open_nursery() as nursery:
            url = await upstream.start(nursery)
            config.write_text(
                '[server]\nlisten = "127.0.0.1:0"\nshutdown_grace = 5\n\n'
                f'[admin]\nlisten = "127.0.0.1:{admin}"\n\n'
                f'[[routes]]\nprefix = "/"\nupstream = "{url}"\n',
                encoding="utf-8",
            )
            args = ["serve", "--config", str(config), "--workers", "2"]
            async with spawn_proxycore(args, log) as supervisor:
                port = int((await wait_for_log(log, STARTING, supervisor))[1])
                with trio.fail_after(20):
                    await wait_ready(admin)
                assert len(worker_pids(log)) == 2

                async def send(count: int) -> None:
                    for i in range(count):  # one fresh connection each
                        status, _, body = await http_request("127.0.0.1", port, "GET", f"/r{i}")
                        assert (status, body) == (200, b"hello")

                # -- 1. both workers serve.
                await send(60)
                with trio.fail_after(5):
                    pids = await access_pids(log, 60)
                first, second = workers = set(pids)  # exactly two (unpacking checks it)
                assert supervisor.pid not in workers
                assert workers == set(worker_pids(log))

                # -- 2. /metrics is the sum over the workers.
                merged = await scrape(admin)
                assert merged[REQUESTS_2XX] == 60
                assert merged[WORKERS] == 2
                assert merged[RESTARTS] == 0

                # -- 3. kill -9 one worker: it is restarted.
                os.kill(first, signal.SIGKILL)
                # The supervisor notices the exit (503: a worker is missing), then restarts
                # it after a 0.5 s backoff (200 again once the new worker reports in).
                # Requests sent while it is missing still succeed (none reach the dead one).
                seen: list[int] = []
                with trio.move_on_after(15):
                    while seen[-1:] != [200] or 503 not in seen:
                        seen.append((await admin_get(admin, "/readyz"))[0])
                        if seen.count(503) == 1 and seen[-1] == 503:
                            await send(10)
                        await trio.sleep(0.02)
                assert 503 in seen, "/readyz never reported the missing worker"
                assert seen[-1] == 200, "/readyz did not come back to 200"
                restarted = [pid for pid in worker_pids(log) if pid not in workers]
                assert len(restarted) == 1
                assert is_gone(first)
                third = restarted[0]
                merged = await scrape(admin)
                assert merged[WORKERS] == 2
                assert merged[RESTARTS] == 1

                await send(60)
                with trio.fail_after(5):
                    pids = await access_pids(log, 130)
                assert first not in pids[60:]
                assert set(pids[70:]) == {second, third}, "the restarted worker is not serving"
                # The killed worker's counts died with it; the live ones add up exactly.
                live = sum(1 for pid in pids if pid in (second, third))
                merged = await scrape(admin)
                assert merged[REQUESTS_2XX] == live
                assert merged[WORKERS] == 2
                assert merged[RESTARTS] == 1

                # -- 4. SIGTERM: the supervisor and its workers exit, code 0.
                supervisor.send_signal(signal.SIGTERM)
                with trio.fail_after(10):
                    code = await supervisor.wait()
                text = log.read_text(encoding="utf-8")
                assert code == 0, text
                for pid in (second, third):
                    assert is_gone(pid), f"worker {pid} outlived the supervisor"
                assert "SIGTERM: stopping the workers" in text
            nursery.cancel_scope.cancel()


#: When SIGTERM is sent after the supervisor logged "starting 2 workers": staggered
#: over the first milliseconds, while its trio run starts and spawns the workers.
EARLY_DELAYS: Final = (0.001, 0.0015, 0.002, 0.003, 0.004, 0.005, 0.007, 0.01)


def _log_has(log: Path, text: bytes) -> bool:
    return text in log.read_bytes()


async def wait_for_bytes(log: Path, text: bytes, within: float) -> None:
    """Poll ``log`` tightly (the delays that follow are in milliseconds)."""
    with trio.fail_after(within):
        while True:
            if _log_has(log, text):
                return
            await trio.sleep(0.0002)


def group_is_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


async def test_sigterm_while_workers_are_starting_still_stops_everything(tmp_path: Path) -> None:
    """A SIGTERM that arrives while the supervisor is spawning its workers is not lost.

    There is no way to observe "the supervisor is spawning now" from outside, so the
    signal is sent at staggered delays after the "starting" log line; on this machine
    the spawn happens 1-8 ms after it. A SIGTERM before the supervisor installs its
    handlers kills it outright (default action; no worker exists yet): accepted. What
    must never happen is a supervisor (or a worker) that keeps running.
    """
    config = tmp_path / "proxy.toml"
    with reserved_port() as refused:  # the upstream is never reached: no request is sent
        config.write_text(
            '[server]\nlisten = "127.0.0.1:0"\n\n'
            f'[[routes]]\nprefix = "/"\nupstream = "http://127.0.0.1:{refused.getsockname()[1]}/"\n',
            encoding="utf-8",
        )
        args = ["serve", "--config", str(config), "--workers", "2", "--no-access-log"]
        for attempt, delay in enumerate(EARLY_DELAYS):
            log = tmp_path / f"err{attempt}.log"
            with trio.fail_after(20):
                async with spawn_proxycore(args, log) as supervisor:
                    await wait_for_bytes(log, b"starting 2 workers", within=10)
                    await trio.sleep(delay)
                    supervisor.send_signal(signal.SIGTERM)
                    with trio.move_on_after(5):
                        await supervisor.wait()
                    text = log.read_text(encoding="utf-8")
                    assert supervisor.returncode is not None, (
                        f"supervisor still running 5 s after a SIGTERM sent {delay * 1000:g} ms "
                        f"after start:\n{text}"
                    )
                    assert supervisor.returncode in (0, -signal.SIGTERM), text
                    assert group_is_gone(supervisor.pid), (
                        f"a worker outlived the supervisor:\n{text}"
                    )
