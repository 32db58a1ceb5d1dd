"""The ``streams`` workload: thousands of SSE streams held open at once, counted once
the server side stops opening more (a census of sockets, RSS and fds)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Final

import psutil

from bench.measure import Meter
from bench.procs import Child
from bench.scenarios import Running
from bench.workloads import Measurement, Runner, Sizes, loadgen_summary, to_mib

__all__ = ["streams_run"]


def _established(pid: int, port: int, *, remote: bool = True) -> int | None:
    """ESTABLISHED TCP connections of ``pid`` whose remote (or local) port is ``port``."""
    try:
        conns = psutil.Process(pid).net_connections(kind="tcp")
    except (psutil.Error, OSError):
        return None
    n = 0
    for conn in conns:
        if conn.status != psutil.CONN_ESTABLISHED:
            continue
        addr = conn.raddr if remote else conn.laddr
        if addr and addr.port == port:
            n += 1
    return n


def _listen_drops() -> int | None:
    """The host's TcpExt ListenDrops counter (SYNs dropped at full accept queues)."""
    try:
        with open("/proc/net/netstat", encoding="ascii") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            table = dict(zip(names.split()[1:], values.split()[1:], strict=False))
            value = table.get("ListenDrops")
            return int(value) if value is not None else None
    return None


@dataclass
class _Census:
    """Counts the open streams once, when the server side stops opening more.

    The server side is the proxy (its fds grow by two per stream) or, for ``direct``,
    the upstream. The census is taken when that count reaches every stream, or has not
    grown for a while, or at the latest shortly before the first streams are cut.
    """

    streams: int
    #: When the last stream has been started (s after the first).
    ramp_s: float
    #: The latest moment (s after the first stream) to count: before the first ones end.
    deadline_s: float
    target: Running
    upstream_pid: int
    upstream_port: int
    taken: bool = False
    fds_base: int | None = None
    fds_last: int = 0
    grown_at: float = 0.0
    all_at: float | None = None
    client_open: int | None = None
    upstream_open: int | None = None
    rss: int | None = None
    at: float | None = None

    @property
    def server_pid(self) -> int:
        return self.target.measured_pid or self.upstream_pid

    def _fds(self) -> int | None:
        try:
            return psutil.Process(self.server_pid).num_fds()
        except (psutil.Error, OSError):
            return None

    def prime(self) -> None:
        """Take the server side's fd count before the streams start."""
        self.fds_base = self._fds()

    def tick(self, elapsed: float, gen: Child) -> None:
        if self.taken:
            return
        fds = self._fds()
        if fds is None:
            return
        if self.fds_base is None:
            self.fds_base = fds
        if fds > self.fds_last:
            self.fds_last, self.grown_at = fds, elapsed
        per_stream = 1 if self.target.measured_pid is None else 2
        opened = (fds - self.fds_base) // per_stream
        if opened >= self.streams and self.all_at is None:
            self.all_at = elapsed
        # Every stream has a socket: give the last ones a second to reach the upstream.
        all_open = self.all_at is not None and elapsed - self.all_at >= 1.0
        ramped = elapsed >= self.ramp_s
        stalled = ramped and opened > 0 and elapsed - self.grown_at >= 1.5
        if all_open or stalled or elapsed >= self.deadline_s:
            self.take(gen, elapsed)

    def take(self, gen: Child, elapsed: float) -> None:
        self.taken = True
        self.at = elapsed
        target = self.target
        self.client_open = _established(gen.pid, target.port)
        pid = target.measured_pid
        if pid is None:  # direct: the upstream's side of the load generator's connections
            self.upstream_open = _established(self.upstream_pid, self.upstream_port, remote=False)
            return
        self.upstream_open = _established(pid, self.upstream_port)
        with contextlib.suppress(psutil.Error, OSError):
            self.rss = psutil.Process(pid).memory_info().rss


#: The second event of a held stream comes after an hour: the client's timeout ends it.
_HELD_STREAM: Final = "/v1/stream?events=2&interval_ms=3600000&ttft_ms=0"


def streams_run(sizes: Sizes, count: int, upstream_pid: int, upstream_port: int) -> Runner:
    def run(meter: Meter, target: Running) -> Measurement:
        ramp = count / sizes.stream_open_rate
        hold = ramp + sizes.stream_plateau_s
        # Streams are started at stream_open_rate; each gets its first event at once
        # and is then held open until the load generator's per-request timeout cuts it
        # (a "timeout" by design), so all are open together for about the plateau.
        spec = {
            "path": _HELD_STREAM,
            "concurrency": count,
            "requests": count,
            "rate": sizes.stream_open_rate,
            "sse": True,
            "timeout": hold,
        }
        deadline = ramp + 0.6 * sizes.stream_plateau_s
        census = _Census(count, ramp, deadline, target, upstream_pid, upstream_port)
        census.prime()
        drops0 = _listen_drops()
        g = meter.gen(target, spec, timeout=ramp + hold + 90.0, on_tick=census.tick)
        drops1 = _listen_drops()
        rss_per_stream = None
        sampler = g.sampler
        if sampler is not None and census.rss is not None and census.upstream_open:
            rss_per_stream = (census.rss - sampler.rss_start) / 1024 / census.upstream_open
        established = float(g.result["events"])  # one event per stream before the hold
        kinds: dict[str, int] = g.result.get("error_kinds", {})
        early = float(g.result["errors"]) - kinds.get("timeout", 0) + float(g.result["dropped"])
        return Measurement(
            {
                "established": established,
                "not_established": count - established,
                "failed_early": early,
                "client_open": _opt(census.client_open),
                "upstream_open": _opt(census.upstream_open),
                "rss_open_mib": to_mib(census.rss) if census.rss is not None else None,
                "rss_peak_mib": to_mib(sampler.rss_peak) if sampler is not None else None,
                "rss_per_stream_kib": rss_per_stream,
                "fds_peak": float(sampler.fds_peak) if sampler is not None else None,
                "census_at_s": census.at,
                "listen_drops": float(drops1 - drops0)
                if drops0 is not None and drops1 is not None
                else None,
            },
            loadgen=loadgen_summary(g),
            steal_pct=g.steal_pct,
        )

    return run


def _opt(n: int | None) -> float | None:
    return float(n) if n is not None else None
