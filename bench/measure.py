"""Measuring: a run of the load generator (one long-lived ``bench.gen --serve`` process)
or of wrk against a target, while the proxy's CPU, RSS and fds are sampled."""

from __future__ import annotations

import json
import re
import selectors
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from bench.env import Pinning, StealMeter
from bench.procs import Child, ProcSampler
from bench.scenarios import REPO_ROOT, Running

__all__ = ["GenRun", "MeasureError", "Meter", "WrkRun", "parse_wrk"]

#: How often the proxy's RSS/fds are sampled while the load runs.
SAMPLE_INTERVAL_S: Final = 0.2
#: How long the load-generator process may take to start (imports).
WORKER_START_S: Final = 30.0

Tick = Callable[[float, Child], None]


class MeasureError(Exception):
    """A measurement could not be taken (the message says why)."""


@dataclass
class GenRun:
    """One ``bench.gen`` run: its result and what the sampler saw of the proxy."""

    result: dict[str, Any]
    dist: dict[str, list[list[float]]]
    gen_cpu_s: float
    sampler: ProcSampler | None
    steal_pct: float | None
    wall: float

    @property
    def elapsed(self) -> float:
        return float(self.result["elapsed"])

    def summary(self, name: str) -> dict[str, float]:
        value: dict[str, float] = self.result[name]
        return value

    def proxy_cpu_pct(self) -> float | None:
        if self.sampler is None or self.elapsed <= 0:
            return None
        return 100.0 * self.sampler.cpu_seconds / self.elapsed

    def gen_cpu_pct(self) -> float | None:
        return 100.0 * self.gen_cpu_s / self.elapsed if self.elapsed > 0 else None


@dataclass
class WrkRun:
    rps: float
    p50_ms: float | None
    p99_ms: float | None
    errors: int
    sampler: ProcSampler | None
    duration: float
    steal_pct: float | None

    def proxy_cpu_pct(self) -> float | None:
        if self.sampler is None:
            return None
        return 100.0 * self.sampler.cpu_seconds / self.duration


_UNITS: Final = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}
_DURATION: Final = re.compile(r"^([\d.]+)(us|ms|s|m|h)$")


def _wrk_ms(text: str) -> float | None:
    match = _DURATION.match(text.strip())
    return float(match[1]) * _UNITS[match[2]] if match else None


def parse_wrk(output: str) -> tuple[float, float | None, float | None, int]:
    """``(rps, p50 ms, p99 ms, errors)`` from ``wrk --latency`` output.

    Raises:
        MeasureError: no ``Requests/sec`` line.
    """
    rps_match = re.search(r"Requests/sec:\s+([\d.]+)", output)
    if rps_match is None:
        raise MeasureError(f"wrk printed no Requests/sec: {' '.join(output.split())[-300:]}")
    percentiles: dict[str, float | None] = {}
    for match in re.finditer(r"^\s+(50|99)(?:\.0+)?%\s+(\S+)\s*$", output, re.MULTILINE):
        percentiles[match[1]] = _wrk_ms(match[2])
    errors = 0
    socket_errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    if socket_errors:
        errors += sum(int(n) for n in socket_errors.groups())
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    if non_2xx:
        errors += int(non_2xx[1])
    return float(rps_match[1]), percentiles.get("50"), percentiles.get("99"), errors


@dataclass
class Meter:
    """Runs load processes (pinned to the load core) and samples the target proxy."""

    pinning: Pinning
    tmp: Path
    env: dict[str, str]
    wrk: str | None = None
    _runs: int = field(default=0, init=False)
    _gen: Child | None = field(default=None, init=False)

    def _sampler(self, target: Running) -> ProcSampler | None:
        pid = target.measured_pid
        if pid is None:
            return None
        sampler = ProcSampler(pid)
        sampler.start()
        return sampler

    def _supervise(
        self,
        child: Child,
        target: Running,
        sampler: ProcSampler | None,
        timeout: float,
    ) -> None:
        """Wait for ``child`` to exit, sampling; kill it after ``timeout`` seconds."""
        t0 = time.monotonic()
        try:
            while True:
                try:
                    child.popen.wait(SAMPLE_INTERVAL_S)
                    break
                except subprocess.TimeoutExpired:
                    pass
                elapsed = time.monotonic() - t0
                if elapsed > timeout:
                    raise MeasureError(f"{child.name} still running after {timeout:g} s: killed")
                target.check_alive()
                if sampler is not None:
                    sampler.sample()
        finally:
            child.stop()

    def _worker(self) -> Child:
        """The load-generator process (``bench.gen --serve``), started on first use."""
        if self._gen is not None and self._gen.alive():
            return self._gen
        self.close()
        argv = [*self.pinning.prefix("load"), sys.executable, "-m", "bench.gen", "--serve"]
        self._gen = Child(
            "load generator",
            argv,
            log_path=self.tmp / "gen.log",
            env=self.env,
            cwd=REPO_ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        # Wait until it has imported everything, so a run starts when its spec is sent.
        try:
            ready = self._read_line(self._gen, WORKER_START_S)
        except BaseException:
            self.close()
            raise
        if json.loads(ready).get("ready") is not True:
            self.close()
            raise MeasureError(f"load generator said {ready[:200]!r} instead of ready")
        return self._gen

    def _read_line(self, worker: Child, timeout: float) -> bytes:
        stdout = worker.popen.stdout
        assert stdout is not None
        with selectors.DefaultSelector() as selector:
            selector.register(stdout, selectors.EVENT_READ)
            if not selector.select(timeout):
                raise MeasureError(f"load generator not ready after {timeout:g} s")
        line = stdout.readline()
        if not line:
            raise MeasureError(worker.describe_exit())
        return line

    def close(self) -> None:
        """Stop the load-generator process (a new one starts on the next run)."""
        if self._gen is not None:
            self._gen.stop()
            self._gen = None

    def _answer(
        self,
        worker: Child,
        target: Running,
        sampler: ProcSampler | None,
        timeout: float,
        on_tick: Tick | None,
    ) -> bytes:
        """Wait for the worker's answer line, sampling the proxy meanwhile."""
        stdout = worker.popen.stdout
        assert stdout is not None
        t0 = time.monotonic()
        with selectors.DefaultSelector() as selector:
            selector.register(stdout, selectors.EVENT_READ)
            while not selector.select(SAMPLE_INTERVAL_S):
                elapsed = time.monotonic() - t0
                if elapsed > timeout:
                    raise MeasureError(f"load generator still running after {timeout:g} s")
                if not worker.alive():
                    break
                target.check_alive()
                if sampler is not None:
                    sampler.sample()
                if on_tick is not None:
                    on_tick(elapsed, worker)
        line = stdout.readline()
        if not line:
            raise MeasureError(worker.describe_exit())
        return line

    def gen(
        self,
        target: Running,
        spec: dict[str, Any],
        *,
        timeout: float,
        on_tick: Tick | None = None,
    ) -> GenRun:
        """Run ``spec`` (host/port filled in) against ``target`` in the load generator.

        On a timeout or any failure the load-generator process is killed (a fresh one
        serves the next run) and MeasureError (or the target's StartError) is raised.
        """
        full = {"host": target.host, "port": target.port_for(str(spec.get("path", "/"))), **spec}
        if target.headers:
            full["headers"] = [*spec.get("headers", []), *map(list, target.headers)]
        worker = self._worker()
        stdin = worker.popen.stdin
        assert stdin is not None
        sampler = self._sampler(target)
        steal = StealMeter()
        steal.start()
        t0 = time.monotonic()
        try:
            stdin.write(json.dumps(full).encode() + b"\n")
            stdin.flush()
            line = self._answer(worker, target, sampler, timeout, on_tick)
        except BaseException:
            self.close()
            raise
        wall = time.monotonic() - t0
        steal_pct = steal.stop()
        if sampler is not None:
            sampler.stop()
        data = json.loads(line)
        if "error" in data:
            raise MeasureError(f"load generator: {data['error']}")
        return GenRun(
            result=data["result"],
            dist=data.get("dist", {}),
            gen_cpu_s=float(data.get("gen_cpu_s", 0.0)),
            sampler=sampler,
            steal_pct=steal_pct,
            wall=wall,
        )

    def run_wrk(self, target: Running, path: str, *, connections: int, duration: float) -> WrkRun:
        """``wrk -t1 -c<connections> -d<duration>s --latency`` against ``target``."""
        if self.wrk is None:
            raise MeasureError("wrk not installed")
        self._runs += 1
        out = self.tmp / f"wrk-{self._runs}.txt"
        seconds = max(1, round(duration))
        argv = [
            *self.pinning.prefix("load"),
            self.wrk,
            "-t1",
            f"-c{connections}",
            f"-d{seconds}s",
            "--timeout",
            "10s",
            "--latency",
            *(f"-H{name}: {value}" for name, value in target.headers),
            f"http://{target.host}:{target.port_for(path)}{path}",
        ]
        sampler = self._sampler(target)
        steal = StealMeter()
        steal.start()
        with open(out, "wb") as stdout:
            child = Child("wrk", argv, log_path=self.tmp / "wrk.log", stdout=stdout)
            self._supervise(child, target, sampler, seconds + 30.0)
        steal_pct = steal.stop()
        if sampler is not None:
            sampler.stop()
        text = out.read_text(encoding="utf-8", errors="replace")
        if child.popen.returncode != 0:
            raise MeasureError(f"wrk exited with {child.popen.returncode}: {child.log_tail()}")
        rps, p50, p99, errors = parse_wrk(text)
        return WrkRun(rps, p50, p99, errors, sampler, float(seconds), steal_pct)
