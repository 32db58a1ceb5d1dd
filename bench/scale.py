"""``python -m bench.scale``: issue 16 target 6, ``serve --workers 2`` against one worker.

The main bench pins the proxy to one core and everything else to the other, so it can't
run two workers. This measures the scaling alone: the canned-response upstream
(``bench.fast_upstream``), ``proxycore serve --workers N`` (N = 1, then 2; the supervisor
and its workers share the listener with ``SO_REUSEPORT``) and ``wrk -t2 -c<C>`` for
``--duration`` seconds on ``GET /small``, in interleaved rounds (1, 2, 2, 1, 1, 2, ...).
Nothing is pinned: on a 2-core machine the load generator and the upstream run on the
same two cores as the workers, so the report says how the cores were shared (CPU % of
the proxy's processes, of wrk and of the upstream, out of ``100 x cores``), and what the
proxy did per core it got (requests per CPU-second): the fair scaling figure when the
load takes a share of the cores the workers need.

Output: a markdown table on stdout and ``<out>/scale-<UTC stamp>.json`` / ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Final

import psutil

from bench.env import free_port
from bench.measure import parse_wrk
from bench.procs import Child, wait_http
from bench.scenarios import FAST_PATH, HOST, REPO_ROOT, child_env, find_wrk

__all__ = ["ScaleRun", "main", "measure_once", "report", "run_rounds"]

READY_TIMEOUT_S: Final = 30.0
#: Target 6 of issue 16: two workers give at least this many times one worker's rps.
BOUND: Final = 1.8


@dataclass(frozen=True)
class ScaleRun:
    """One ``wrk`` run against ``workers`` workers."""

    workers: int
    rps: float
    p50_ms: float | None
    p99_ms: float | None
    errors: int
    #: CPU used during the run, % of one core: the proxy's processes, wrk, the upstream.
    proxy_cpu_pct: float
    wrk_cpu_pct: float
    upstream_cpu_pct: float

    @property
    def rps_per_core(self) -> float:
        """Requests per CPU-second the proxy's processes used."""
        return self.rps / (self.proxy_cpu_pct / 100) if self.proxy_cpu_pct > 0 else 0.0


class _CpuMeter:
    """CPU seconds of a process tree (a supervisor and its workers), sampled while it
    runs so that a child seen once is counted even if it exits."""

    def __init__(self, pid: int) -> None:
        self.root = psutil.Process(pid)
        self.seen: dict[int, psutil.Process] = {}
        self.start: dict[int, float] = {}
        self.last: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _procs(self) -> list[psutil.Process]:
        try:
            return [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            return [self.root]

    def _read(self) -> None:
        for proc in self._procs():
            try:
                times = proc.cpu_times()
            except psutil.Error:
                continue
            cpu = float(times.user + times.system)
            if proc.pid not in self.start:
                self.seen[proc.pid] = proc
                self.start[proc.pid] = cpu
            self.last[proc.pid] = cpu

    def _loop(self) -> None:
        while not self._stop.wait(0.2):
            self._read()

    def begin(self) -> None:
        self._read()
        self._thread.start()

    def end(self) -> float:
        self._stop.set()
        self._thread.join()
        self._read()
        return sum(self.last[pid] - self.start[pid] for pid in self.start)


def _proc_cpu(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def measure_once(
    workers: int,
    upstream: Child,
    upstream_port: int,
    *,
    wrk: str,
    threads: int,
    connections: int,
    duration: int,
    tmp: Path,
) -> ScaleRun:
    """Start ``proxycore serve --workers N``, run wrk against it, stop it."""
    port = free_port(HOST)
    argv = [
        sys.executable,
        "-m",
        "proxycore",
        "serve",
        "--upstream",
        f"http://{HOST}:{upstream_port}/",
        "--listen",
        f"{HOST}:{port}",
        "--workers",
        str(workers),
        "--no-access-log",
    ]
    proxy = Child(
        f"proxycore x{workers}",
        argv,
        log_path=tmp / f"proxy-w{workers}.log",
        env=child_env(),
        cwd=REPO_ROOT,
    )
    try:
        wait_http(proxy, HOST, port, FAST_PATH, READY_TIMEOUT_S)
        _wait_listening(proxy.pid, port, workers)
        # Each worker takes its own share of new connections (SO_REUSEPORT hashes them):
        # a warm-up lets every worker open its upstream connections first.
        _wrk(wrk, threads, connections, 1, port, tmp / "warmup.txt")
        meter = _CpuMeter(proxy.pid)
        meter.begin()
        up0 = _proc_cpu(upstream.pid)
        t0 = time.monotonic()
        out = tmp / f"wrk-w{workers}.txt"
        wrk_cpu = _wrk(wrk, threads, connections, duration, port, out)
        elapsed = time.monotonic() - t0
        proxy_cpu = meter.end()
        up_cpu = _proc_cpu(upstream.pid) - up0
    finally:
        proxy.stop()
    rps, p50, p99, errors = parse_wrk(out.read_text(encoding="utf-8", errors="replace"))
    return ScaleRun(
        workers,
        rps,
        p50,
        p99,
        errors,
        100 * proxy_cpu / elapsed,
        100 * wrk_cpu / elapsed,
        100 * up_cpu / elapsed,
    )


def _wait_listening(pid: int, port: int, workers: int) -> None:
    """Wait until ``workers`` processes of the tree listen on ``port``: the kernel spreads
    new connections only over the sockets bound when they arrive, and wrk keeps its."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    root = psutil.Process(pid)
    while True:
        listening = 0
        for proc in [root, *root.children(recursive=True)]:
            try:
                conns = proc.net_connections(kind="tcp")
            except psutil.Error:
                continue
            listening += any(
                c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port for c in conns
            )
        if listening >= workers:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {listening} of {workers} workers listen on port {port}")
        time.sleep(0.05)


def _wrk(wrk: str, threads: int, connections: int, duration: int, port: int, out: Path) -> float:
    """Run wrk; return its CPU seconds."""
    argv = [
        wrk,
        f"-t{threads}",
        f"-c{connections}",
        f"-d{duration}s",
        "--timeout",
        "10s",
        "--latency",
        f"http://{HOST}:{port}{FAST_PATH}",
    ]
    with open(out, "wb") as stdout:
        child = Child("wrk", argv, log_path=out.with_suffix(".log"), stdout=stdout)
        try:
            proc = psutil.Process(child.pid)
            cpu = 0.0
            while child.popen.poll() is None:
                try:
                    cpu = _proc_cpu(proc.pid)
                except psutil.Error:
                    break
                time.sleep(0.1)
            child.popen.wait(timeout=duration + 30)
        finally:
            child.stop()
    if child.popen.returncode != 0:
        raise RuntimeError(f"wrk exited with {child.popen.returncode}: {child.log_tail()}")
    return cpu


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else 0.0


def report(
    runs: list[ScaleRun], cores: int, threads: int, connections: int, duration: int
) -> tuple[str, dict[str, object]]:
    """The markdown report and the JSON document."""
    by = {w: [r for r in runs if r.workers == w] for w in (1, 2)}
    med = {
        w: {
            "rps": _median([r.rps for r in rs]),
            "proxy_cpu_pct": _median([r.proxy_cpu_pct for r in rs]),
            "wrk_cpu_pct": _median([r.wrk_cpu_pct for r in rs]),
            "upstream_cpu_pct": _median([r.upstream_cpu_pct for r in rs]),
            "rps_per_core": _median([r.rps_per_core for r in rs]),
            "p50_ms": _median([r.p50_ms for r in rs if r.p50_ms is not None]),
            "errors": sum(r.errors for r in rs),
        }
        for w, rs in by.items()
    }
    ratio = med[2]["rps"] / med[1]["rps"] if med[1]["rps"] else 0.0
    per_core = med[2]["rps_per_core"] / med[1]["rps_per_core"] if med[1]["rps_per_core"] else 0.0
    verdict = "met" if ratio >= BOUND else "short"
    lines = [
        f"# proxycore --workers 2 vs 1 (issue 16 target 6), {len(by[1])} rounds",
        "",
        f"`wrk -t{threads} -c{connections} -d{duration}s` on `GET /small` "
        f"through `proxycore serve --workers N` to the canned-response upstream; "
        f"{cores} cores, nothing pinned: the workers, wrk and the upstream share them "
        f"(CPU in % of one core, out of {100 * cores}%). Medians over rounds.",
        "",
        "| workers | rps | p50 ms | proxy CPU % | wrk CPU % | upstream CPU % "
        "| rps per proxy core | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for w in (1, 2):
        m = med[w]
        lines.append(
            f"| {w} | {m['rps']:,.0f} | {m['p50_ms']:.2f} | {m['proxy_cpu_pct']:.0f} | "
            f"{m['wrk_cpu_pct']:.0f} | {m['upstream_cpu_pct']:.0f} | "
            f"{m['rps_per_core']:,.0f} | {m['errors']} |"
        )
    lines += [
        "",
        f"Target 6: rps with 2 workers / 1 worker = **{ratio:.2f}x** (bound >= {BOUND}x): "
        f"{verdict}. Requests per proxy CPU-second, 2 workers / 1: {per_core:.2f}x "
        "(1.0x = the second worker is as efficient as the first; the rps ratio also "
        "counts how much of the second core the load generator and the upstream took).",
    ]
    doc: dict[str, object] = {
        "cores": cores,
        "wrk": {
            "threads": threads,
            "connections": connections,
            "duration": duration,
        },
        "runs": [asdict(r) | {"rps_per_core": r.rps_per_core} for r in runs],
        "median": {str(w): m for w, m in med.items()},
        "ratio": ratio,
        "rps_per_core_ratio": per_core,
        "bound": BOUND,
        "result": verdict,
    }
    return "\n".join(lines), doc


def run_rounds(
    rounds: int, duration: int, threads: int = 2, connections: int = 100, *, log: bool = True
) -> list[ScaleRun]:
    """Interleaved rounds of 1 and 2 workers (raises RuntimeError if wrk is missing)."""
    wrk = find_wrk()
    if wrk is None:
        raise RuntimeError("wrk is not installed (apt-get install -y wrk)")
    runs: list[ScaleRun] = []
    with tempfile.TemporaryDirectory(prefix="proxycore-scale-") as tmp_name:
        tmp = Path(tmp_name)
        port = free_port(HOST)
        argv_up = [sys.executable, "-m", "bench.fast_upstream", "--port", str(port)]
        upstream = Child(
            "fast upstream", argv_up, log_path=tmp / "up.log", env=child_env(), cwd=REPO_ROOT
        )
        try:
            wait_http(upstream, HOST, port, FAST_PATH, READY_TIMEOUT_S)
            for i in range(rounds):
                for workers in (1, 2) if i % 2 == 0 else (2, 1):
                    run = measure_once(
                        workers,
                        upstream,
                        port,
                        wrk=wrk,
                        threads=threads,
                        connections=connections,
                        duration=duration,
                        tmp=tmp,
                    )
                    runs.append(run)
                    if log:
                        print(
                            f"scale round {i + 1}, {workers} worker(s): {run.rps:,.0f} rps, "
                            f"proxy {run.proxy_cpu_pct:.0f}% wrk {run.wrk_cpu_pct:.0f}% "
                            f"upstream {run.upstream_cpu_pct:.0f}%",
                            file=sys.stderr,
                        )
        finally:
            upstream.stop()
    return runs


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads")
    parser.add_argument("--connections", type=int, default=100, help="wrk connections")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    try:
        runs = run_rounds(args.rounds, args.duration, args.threads, args.connections)
    except RuntimeError as exc:
        print(f"bench.scale: {exc}", file=sys.stderr)
        return 2
    cores = len(os.sched_getaffinity(0))
    text, doc = report(runs, cores, args.threads, args.connections, args.duration)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    (args.out / f"scale-{stamp}.json").write_text(json.dumps(doc, indent=1) + "\n")
    (args.out / f"scale-{stamp}.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
