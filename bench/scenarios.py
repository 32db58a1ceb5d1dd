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
SCENARIOS: Final = ("direct", "proxycore", "nginx", "fastapi")
REPO_ROOT: Final = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class StartContext:
    upstream_port: int
    tmp: Path
    pinning: Pinning

    @property
    def upstream_url(self) -> str:
        return f"http://{HOST}:{self.upstream_port}/"


@dataclass
class Running:
    """A scenario that is up: the address the load goes to and the pid to measure."""

    name: str
    host: str
    port: int
    child: Child | None  # None for ``direct`` (the upstream belongs to the runner)
    description: str

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
    if name == "fastapi":
        missing = [
            m for m in ("fastapi", "uvicorn", "httpx") if importlib.util.find_spec(m) is None
        ]
        if missing:
            return f"not installed: {', '.join(missing)} (pip install -e '.[bench]')"
    return None


def start_upstream(tmp: Path, pinning: Pinning) -> tuple[Child, int]:
    """The simulated upstream (hypercorn), pinned with the load generator."""
    port = free_port(HOST)
    argv = [*pinning.prefix("load"), sys.executable, "-m", "bench.upstream", "--port", str(port)]
    child = Child("upstream", argv, log_path=tmp / "upstream.log", env=child_env(), cwd=REPO_ROOT)
    try:
        wait_http(child, HOST, port, "/healthz", READY_TIMEOUT_S)
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

    server {{
        listen {HOST}:{port} backlog=4096;
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


def _argv(ctx: StartContext, name: str, port: int, run_dir: Path) -> tuple[list[str], str]:
    pin = ctx.pinning.prefix("proxy")
    if name == "proxycore":
        argv = [
            *pin,
            sys.executable,
            "-m",
            "proxycore",
            "serve",
            "--upstream",
            ctx.upstream_url,
            "--listen",
            f"{HOST}:{port}",
            "--no-access-log",
        ]
        return argv, "proxycore serve --upstream (defaults), 1 process"
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
        return Running(name, HOST, ctx.upstream_port, None, "load generator -> upstream")
    reason = unavailable_reason(name)
    if reason is not None:
        raise StartError(reason)
    run_dir = ctx.tmp / name
    run_dir.mkdir(parents=True, exist_ok=True)
    port = free_port(HOST)
    argv, description = _argv(ctx, name, port, run_dir)
    env = child_env(BENCH_UPSTREAM=ctx.upstream_url.rstrip("/"))
    child = Child(name, argv, log_path=run_dir / "stdout.log", env=env, cwd=REPO_ROOT)
    try:
        wait_http(child, HOST, port, "/small", READY_TIMEOUT_S)
    except BaseException:
        child.stop()
        raise
    return Running(name, HOST, port, child, description)
