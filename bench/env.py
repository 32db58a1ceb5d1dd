"""The machine the bench runs on: pinning, fd limits, free ports, versions, host steal."""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import resource
import shutil
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata
from typing import Final, Literal

__all__ = [
    "Pinning",
    "Role",
    "StealMeter",
    "busy_cores",
    "child_preexec",
    "environment",
    "free_port",
    "nofile_limits",
    "tool_version",
]

Role = Literal["proxy", "load"]

#: Packages whose versions go into the report.
_PACKAGES = (
    "proxycore",
    "trio",
    "h11",
    "hypercorn",
    "fastapi",
    "starlette",
    "uvicorn",
    "httpx",
    "httpcore",
    "aiohttp",
    "anyio",
    "uvloop",
    "httptools",
    "psutil",
    "matplotlib",
)


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (bind port 0, read it, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
    return port


def nofile_limits() -> tuple[int, int]:
    """This process's RLIMIT_NOFILE (soft, hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft, hard


def _load_libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


_LIBC: Final = _load_libc() if sys.platform.startswith("linux") else None
_PR_SET_PDEATHSIG: Final = 1


def child_preexec() -> None:
    """Runs in every child between fork and exec.

    Raises the soft RLIMIT_NOFILE to the hard limit (raising the hard limit needs
    CAP_SYS_RESOURCE, which containers rarely have; the report states the limit the
    children got), and asks for SIGTERM when the runner dies (Linux), so a killed run
    leaves no proxy behind. The death signal survives ``taskset``'s exec.
    """
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


@dataclass(frozen=True)
class Pinning:
    """Which core the proxy under test gets, and which the upstream + load generator get."""

    method: Literal["taskset", "none"]
    proxy_core: int | None
    load_core: int | None
    note: str
    #: The cores this process could use when the run started (before pinning itself).
    usable_cores: int = 0

    @classmethod
    def detect(cls, *, enabled: bool = True) -> Pinning:
        try:
            cores = sorted(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            cores = list(range(os.cpu_count() or 1))
        n = len(cores)
        if not enabled:
            return cls("none", None, None, "pinning turned off (--no-pin): nothing pinned", n)
        if shutil.which("taskset") is None:
            return cls(
                "none", None, None, "taskset not found: nothing pinned, the OS schedules all", n
            )
        if n < 2:
            return cls("none", None, None, f"only {n} usable core(s): nothing pinned", n)
        proxy, load = cores[0], cores[1]
        note = (
            f"taskset: proxy under test on core {proxy}; upstream (hypercorn sim), load "
            f"generator, wrk and this runner on core {load}"
        )
        if len(cores) > 2:
            note += f" ({len(cores) - 2} more core(s) left unused)"
        return cls("taskset", proxy, load, note, n)

    def prefix(self, role: Role) -> list[str]:
        """The command prefix that pins a process of ``role`` (empty when not pinning)."""
        core = self.proxy_core if role == "proxy" else self.load_core
        if self.method != "taskset" or core is None:
            return []
        return ["taskset", "-c", str(core)]

    def pin_self(self) -> None:
        """Move the runner itself onto the load core, away from the proxy's core."""
        if self.method == "taskset" and self.load_core is not None:
            with contextlib.suppress(AttributeError, OSError):
                os.sched_setaffinity(0, {self.load_core})


class StealMeter:
    """Host steal time (all cores) between ``start()`` and ``stop()``, from /proc/stat."""

    def __init__(self) -> None:
        self._start: tuple[int, int] | None = None

    @staticmethod
    def _read() -> tuple[int, int] | None:
        try:
            with open("/proc/stat", encoding="ascii") as f:
                fields = f.readline().split()
        except OSError:
            return None
        if not fields or fields[0] != "cpu" or len(fields) < 9:
            return None
        values = [int(v) for v in fields[1:]]
        total = sum(values[:8])  # user nice system idle iowait irq softirq steal
        return values[7], total

    def start(self) -> None:
        self._start = self._read()

    def stop(self) -> float | None:
        """Steal as a percentage of all CPU time since ``start()`` (None if unknown)."""
        end = self._read()
        if self._start is None or end is None:
            return None
        steal = end[0] - self._start[0]
        total = end[1] - self._start[1]
        return 100.0 * steal / total if total > 0 else None


def tool_version(argv: list[str]) -> str | None:
    """The first line a tool prints for its version flag (stdout or stderr), or None."""
    if shutil.which(argv[0]) is None:
        return None
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    text = (done.stdout or done.stderr).strip()
    return text.splitlines()[0] if text else None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def busy_cores(interval: float = 0.5) -> list[float]:
    """How busy each core is right now (percent), before the bench starts anything."""
    try:
        import psutil
    except ImportError:
        return []
    return [float(v) for v in psutil.cpu_percent(interval=interval, percpu=True)]


def environment(pinning: Pinning, nginx: str | None, wrk: str | None) -> dict[str, object]:
    """Everything about the machine that the report records."""
    soft, hard = nofile_limits()
    return {
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "usable_cores": pinning.usable_cores,
        "python": sys.version.split()[0],
        "python_impl": platform.python_implementation(),
        "platform": platform.platform(),
        "kernel": platform.release(),
        "packages": _versions(),
        "nginx": tool_version([nginx, "-v"]) if nginx else None,
        "wrk": tool_version([wrk, "--version"]) if wrk else None,
        "pinning": {
            "method": pinning.method,
            "proxy_core": pinning.proxy_core,
            "load_core": pinning.load_core,
            "note": pinning.note,
        },
        "rlimit_nofile": {"soft": soft, "hard": hard},
        "loadavg": list(os.getloadavg()),
    }
