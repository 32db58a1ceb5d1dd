"""Child processes: start (own session, fd limit raised, pinned), readiness, stop, sample.

Every child runs in its own session, so ``stop()`` signals exactly that process group
(by the id we started) and nothing else.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import psutil

from bench.env import child_preexec

__all__ = ["Child", "ProcSampler", "StartError", "http_ok", "wait_http"]


class StartError(Exception):
    """A child did not become ready (the message says why, with its log's tail)."""


class Child:
    """A subprocess with its output in a log file; ``stop()`` is idempotent."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: str | Path | None = None,
        stdout: IO[bytes] | int | None = None,
        stdin: int = subprocess.DEVNULL,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 -- closed in stop()
        try:
            self.popen: subprocess.Popen[bytes] = subprocess.Popen(
                self.argv,
                stdin=stdin,
                stdout=self._log if stdout is None else stdout,
                stderr=self._log,
                env=dict(env) if env is not None else None,
                cwd=cwd,
                preexec_fn=child_preexec,  # the runner starts no threads
                start_new_session=True,
            )
        except OSError:
            self._log.close()
            raise

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, limit: int = 600) -> str:
        with contextlib.suppress(OSError):
            self._log.flush()
        try:
            data = self.log_path.read_bytes()[-limit:]
        except OSError:
            return ""
        return " ".join(data.decode("utf-8", "replace").split())

    def describe_exit(self) -> str:
        code = self.popen.poll()
        tail = self.log_tail()
        what = f"{self.name} exited with {code}" if code is not None else f"{self.name} running"
        return f"{what}: {tail}" if tail else what

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM the child's process group, SIGKILL after ``grace`` seconds."""
        try:
            if self.popen.poll() is None:
                self._signal(signal.SIGTERM)
                try:
                    self.popen.wait(grace)
                except subprocess.TimeoutExpired:
                    self._signal(signal.SIGKILL)
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        self.popen.wait(grace)
            else:
                # The leader is gone; make sure nothing it started lingers.
                self._signal(signal.SIGKILL)
        finally:
            for pipe in (self.popen.stdin, self.popen.stdout):
                if pipe is not None:
                    with contextlib.suppress(OSError):
                        pipe.close()
            self._log.close()

    def _signal(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, sig)  # our own session: pgid == the child's pid


def http_ok(
    host: str,
    port: int,
    path: str,
    timeout: float = 2.0,
    headers: Sequence[tuple[str, str]] = (),
) -> bool:
    """True if ``GET path`` (with ``headers``) answers 200 within ``timeout``."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path, headers=dict(headers))
        response = conn.getresponse()
        response.read()
        return response.status == 200
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


def wait_http(
    child: Child,
    host: str,
    port: int,
    path: str,
    timeout: float,
    *,
    headers: Sequence[tuple[str, str]] = (),
) -> None:
    """Poll ``GET path`` until it answers 200; raise StartError if ``child`` dies or
    ``timeout`` seconds pass first."""
    deadline = time.monotonic() + timeout
    while True:
        if not child.alive():
            raise StartError(child.describe_exit())
        if http_ok(host, port, path, timeout=1.0, headers=headers):
            return
        if time.monotonic() > deadline:
            tail = child.log_tail()
            raise StartError(
                f"{child.name} not ready on {host}:{port}{path} after {timeout:g} s"
                + (f": {tail}" if tail else "")
            )
        time.sleep(0.05)


@dataclass
class ProcSampler:
    """RSS, fds and CPU of one process (psutil) around and during a measurement.

    ``start()`` takes the baseline, ``sample()`` (called every few hundred ms while the
    load runs) keeps the peaks, ``stop()`` takes the final reading.
    """

    pid: int
    _proc: psutil.Process = field(init=False)
    rss_start: int = 0
    rss_peak: int = 0
    rss_end: int = 0
    fds_start: int = 0
    fds_peak: int = 0
    cpu_start: float = 0.0
    cpu_end: float = 0.0
    samples: int = 0

    def __post_init__(self) -> None:
        self._proc = psutil.Process(self.pid)

    def _cpu(self) -> float:
        times = self._proc.cpu_times()
        return float(times.user + times.system)

    def _fds(self) -> int:
        try:
            return self._proc.num_fds()
        except (psutil.Error, OSError):
            return 0

    def start(self) -> None:
        self.cpu_start = self._cpu()
        self.rss_start = self.rss_peak = self.rss_end = self._proc.memory_info().rss
        self.fds_start = self.fds_peak = self._fds()

    def sample(self) -> None:
        try:
            rss = self._proc.memory_info().rss
        except psutil.Error:
            return
        self.samples += 1
        self.rss_peak = max(self.rss_peak, rss)
        self.fds_peak = max(self.fds_peak, self._fds())

    def stop(self) -> None:
        self.sample()
        self.cpu_end = self._cpu()
        self.rss_end = self._proc.memory_info().rss

    @property
    def cpu_seconds(self) -> float:
        return self.cpu_end - self.cpu_start
