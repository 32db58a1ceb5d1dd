"""The things under test: how each is started, where it listens, which pid to measure."""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from bench.env import Pinning, free_port, nofile_limits
from bench.procs import Child, StartError, wait_http

__all__ = [
    "DEFAULT_SCENARIOS",
    "SCENARIOS",
    "Running",
    "StartContext",
    "child_env",
    "find_nginx",
    "find_wrk",
    "start_scenario",
    "start_upstream",
    "unavailable_reason",
]

HOST: Final = "127.0.0.1"
READY_TIMEOUT_S: Final = 30.0
#: Every scenario the bench knows, in report order.
SCENARIOS: Final = ("direct", "proxycore", "proxycore-full", "nginx", "aiohttp", "fastapi")
DEFAULT_SCENARIOS: Final = SCENARIOS
REPO_ROOT: Final = Path(__file__).resolve().parent.parent
#: Requests for this path go to the canned-response upstream (``bench.fast_upstream``).
FAST_PATH: Final = "/small"
#: The inbound bearer secret of ``proxycore-full`` (a bench value, not a secret).
BENCH_BEARER: Final = "bench-inbound-secret-0123456789abcdef"


@dataclass(frozen=True)
class StartContext:
    upstream_port: int
    tmp: Path
    pinning: Pinning
    #: The canned-response upstream that serves FAST_PATH.
    fast_port: int

    @property
    def upstream_url(self) -> str:
        return f"http://{HOST}:{self.upstream_port}/"

    @property
    def fast_url(self) -> str:
        return f"http://{HOST}:{self.fast_port}/"


@dataclass
class Running:
    """A scenario that is up: the address the load goes to and the pid to measure."""

    name: str
    host: str
    port: int
    child: Child | None  # None for ``direct`` (the upstream belongs to the runner)
    description: str
    #: Headers every request through this scenario carries (proxycore-full's bearer).
    headers: tuple[tuple[str, str], ...] = ()
    #: ``direct`` only: where FAST_PATH is served (the load goes there itself).
    fast_port: int | None = None

    def port_for(self, path: str) -> int:
        """The port a request for ``path`` goes to (``direct``: the upstream serving it)."""
        if self.fast_port is not None and path.split("?", 1)[0] == FAST_PATH:
            return self.fast_port
        return self.port

    @property
    def measured_pid(self) -> int | None:
        """The proxy process (nginx: its single worker); None for ``direct``."""
        return self.child.pid if self.child is not None else None

    def check_alive(self) -> None:
        if self.child is not None and not self.child.alive():
            raise StartError(self.child.describe_exit())

    def stop(self) -> None:
        if self.child is not None:
            self.child.stop()


def find_nginx() -> str | None:
    found = shutil.which("nginx")
    if found is None and os.access("/usr/sbin/nginx", os.X_OK):
        found = "/usr/sbin/nginx"
    return found


def find_wrk() -> str | None:
    return shutil.which("wrk")


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = f"{REPO_ROOT}{os.pathsep}{path}" if path else str(REPO_ROOT)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def unavailable_reason(name: str) -> str | None:
    """Why scenario ``name`` cannot run on this machine (None if it can)."""
    if name == "nginx" and find_nginx() is None:
        return "nginx not installed"
    needs = {"fastapi": ("fastapi", "uvicorn", "httpx"), "aiohttp": ("aiohttp",)}
    missing = [m for m in needs.get(name, ()) if importlib.util.find_spec(m) is None]
    if missing:
        return f"not installed: {', '.join(missing)} (pip install -e '.[bench]')"
    return None


def start_upstream(tmp: Path, pinning: Pinning, *, fast: bool = False) -> tuple[Child, int]:
    """The simulated upstream (hypercorn), or with ``fast`` the canned-response one
    (``bench.fast_upstream``), pinned with the load generator."""
    port = free_port(HOST)
    module, name = (
        ("bench.fast_upstream", "fast upstream") if fast else ("bench.upstream", "upstream")
    )
    argv = [*pinning.prefix("load"), sys.executable, "-m", module, "--port", str(port)]
    log_path = tmp / f"{module.rpartition('.')[2]}.log"
    child = Child(name, argv, log_path=log_path, env=child_env(), cwd=REPO_ROOT)
    try:
        wait_http(child, HOST, port, FAST_PATH if fast else "/healthz", READY_TIMEOUT_S)
    except BaseException:
        child.stop()
        raise
    return child, port


def _nginx_conf(ctx: StartContext, port: int, run_dir: Path) -> str:
    _, hard = nofile_limits()
    fds = max(1024, min(hard, 65536))
    # worker_connections counts client and upstream connections alike.
    return f"""\
daemon off;
master_process off;
worker_processes 1;
worker_rlimit_nofile {fds};
pid {run_dir}/nginx.pid;
error_log {run_dir}/error.log warn;

events {{
    worker_connections {fds};
}}

http {{
    access_log off;
    client_body_temp_path {run_dir}/client_body;
    proxy_temp_path {run_dir}/proxy;
    fastcgi_temp_path {run_dir}/fastcgi;
    uwsgi_temp_path {run_dir}/uwsgi;
    scgi_temp_path {run_dir}/scgi;
    keepalive_requests 1000000;
    keepalive_timeout 75s;
    client_max_body_size 0;

    upstream sim {{
        server {HOST}:{ctx.upstream_port};
        keepalive 64;
        keepalive_requests 1000000;
    }}

    upstream fast {{
        server {HOST}:{ctx.fast_port};
        keepalive 64;
        keepalive_requests 1000000;
    }}

    server {{
        listen {HOST}:{port} backlog=4096;
        location = {FAST_PATH} {{
            proxy_pass http://fast;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
        }}
        location / {{
            proxy_pass http://sim;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout 3600s;
            proxy_send_timeout 3600s;
        }}
    }}
}}
"""


def _proxycore_toml(ctx: StartContext, run_dir: Path, *, full: bool) -> Path:
    """proxycore's config: FAST_PATH to the fast upstream, the rest to the sim.

    ``full`` (the production shape of issue 16): inbound bearer auth, a credential
    injected from a file on both routes, the admin listener (metrics), access log on.
    """
    lines: list[str] = []
    inject = ""
    if full:
        secret = run_dir / "inbound.secret"
        secret.write_text(BENCH_BEARER + "\n", encoding="utf-8")
        secret.chmod(0o600)
        token = run_dir / "upstream.token"
        token.write_text("bench-upstream-api-key\n", encoding="utf-8")
        token.chmod(0o600)
        lines += [
            "[inbound]",
            'mode = "bearer"',
            f'secret_file = "{secret}"',
            "",
            "[admin]",
            f'listen = "{HOST}:{free_port(HOST)}"',
            "",
        ]
        inject = f'inject = {{ header = "x-api-key", token_file = "{token}" }}\n'
    for prefix, url in ((FAST_PATH, ctx.fast_url), ("/", ctx.upstream_url)):
        lines += [
            "[[routes]]",
            f'prefix = "{prefix}"',
            f'upstream = "{url}"',
            "strip_prefix = false",
            inject,
        ]
    path = run_dir / "proxycore.toml"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def _argv(ctx: StartContext, name: str, port: int, run_dir: Path) -> tuple[list[str], str]:
    pin = ctx.pinning.prefix("proxy")
    if name in ("proxycore", "proxycore-full"):
        full = name == "proxycore-full"
        conf = _proxycore_toml(ctx, run_dir, full=full)
        argv = [*pin, sys.executable, "-m", "proxycore", "serve", "--config", str(conf)]
        argv += ["--listen", f"{HOST}:{port}"]
        if not full:
            argv.append("--no-access-log")
            return argv, "proxycore serve, defaults, no access log, 1 process"
        return argv, (
            "proxycore serve, production shape: inbound bearer, x-api-key injected from a "
            "file, JSON access log (stderr to a file), admin listener with metrics, 1 process"
        )
    if name == "aiohttp":
        argv = [*pin, sys.executable, "-m", "bench.peers.aiohttp_proxy", "--port", str(port)]
        loop = "uvloop" if importlib.util.find_spec("uvloop") is not None else "asyncio"
        return argv, (
            f"aiohttp, one ClientSession (keep-alive TCPConnector), iter_any() both ways, "
            f"no access log, {loop} loop, 1 process"
        )
    if name == "nginx":
        nginx = find_nginx()
        if nginx is None:
            raise StartError("nginx not installed")
        conf = run_dir / "nginx.conf"
        conf.write_text(_nginx_conf(ctx, port, run_dir), encoding="utf-8")
        argv = [*pin, nginx, "-p", f"{run_dir}/", "-c", str(conf), "-e", str(run_dir / "error.log")]
        return argv, "nginx, master_process off (1 process), proxy_buffering off, keepalive 64"
    if name == "fastapi":
        argv = [
            *pin,
            sys.executable,
            "-m",
            "uvicorn",
            "bench.peers.fastapi_httpx:app",
            "--host",
            HOST,
            "--port",
            str(port),
            "--workers",
            "1",
            "--no-access-log",
            "--log-level",
            "warning",
        ]
        return argv, "FastAPI + shared httpx.AsyncClient, uvicorn --workers 1"
    raise ValueError(f"unknown scenario {name!r}")


def start_scenario(ctx: StartContext, name: str) -> Running:
    """Start scenario ``name`` and wait until ``GET /small`` answers through it."""
    if name == "direct":
        return Running(
            name,
            HOST,
            ctx.upstream_port,
            None,
            f"load generator -> upstream ({FAST_PATH}: the fast upstream)",
            fast_port=ctx.fast_port,
        )
    reason = unavailable_reason(name)
    if reason is not None:
        raise StartError(reason)
    run_dir = ctx.tmp / name
    run_dir.mkdir(parents=True, exist_ok=True)
    port = free_port(HOST)
    argv, description = _argv(ctx, name, port, run_dir)
    env = child_env(
        BENCH_UPSTREAM=ctx.upstream_url.rstrip("/"), BENCH_FAST_UPSTREAM=ctx.fast_url.rstrip("/")
    )
    headers = (("Authorization", f"Bearer {BENCH_BEARER}"),) if name == "proxycore-full" else ()
    child = Child(name, argv, log_path=run_dir / "stdout.log", env=env, cwd=REPO_ROOT)
    try:
        wait_http(child, HOST, port, FAST_PATH, READY_TIMEOUT_S, headers=headers)
    except BaseException:
        child.stop()
        raise
    return Running(name, HOST, port, child, description, headers=headers)
